"""Property: whatever a recipe holds, loading it either succeeds or raises a
:class:`~compress.errors.UserError` (one line at the command line), never another exception.

A valid recipe is mutated at random, seeded: values replaced by other types, signs flipped, NaN,
infinities, huge and tiny numbers, long and control-character strings, keys removed and added,
values wrapped in deep lists and mappings, containers swapped. A few hundred mutants go through
:func:`compress.recipe.parse_recipe` in this process; a handful, written as YAML, go through
``compress run --dry-run`` as processes of their own.
"""

from __future__ import annotations

import copy
import math
import random
from typing import Any

import pytest
import yaml

from compress.errors import UserError
from compress.recipe import parse_recipe
from forkserver import ForkServer

VALID = {
    "name": "fuzz",
    "model": {"name": "vgg6", "options": {"width": 0.125, "fc_hidden": [], "batch_norm": True},
              "train": {"epochs": 1, "lr": 0.05, "momentum": 0.9, "schedule": "cosine", "lr_factors": {"head": 1.0}}},
    "data": {"name": "digits", "limit_train": 100, "limit_test": 50, "val_fraction": 0.1, "image_size": 32},
    "analysis": {"probe_epochs": 2, "taps": ["features.pool2", "features.pool3"], "threshold": 0.3},
    "steps": [{"trim": {"tap": "plateau"}}, {"finetune": {"epochs": 1, "lr": 0.01}},
              {"prune": {"target": 0.5, "metric": "params"}}, {"export": {"opset": 17}},
              {"bench": {"models": ["original", "final"], "batch_sizes": [1], "repeats": 2}}],
}
SAMPLES = 400
ATOMS = [None, True, False, 0, 1, -1, 2, -7, 10**100, -(10**100), 0.0, -0.0, 0.5, -0.5, 1e308, -1e308, 1e-320,
         math.nan, math.inf, -math.inf, "", "x", "plateau", "auto", "x" * 5000, "\x00\x1b[2J\n", "../..", "1e3",
         "nan", "-1", [], {}, [1, 2], ["a"], {"a": 1}, {"": None}, [[[]]], 3.5, 2**63, -(2**63) - 1]


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into ``node`` (mappings and lists), the root included."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


def _nested(depth: int, leaf: Any, kind: str) -> Any:
    for _ in range(depth):
        leaf = [leaf] if kind == "list" else {"k": leaf}
    return leaf


def _value(rng: random.Random, old: Any, max_depth: int) -> Any:
    """A replacement for ``old``: an atom, a sign flip or scaling of a number, a deep nest, or a
    container of the other kind."""
    choice = rng.random()
    if choice < 0.45:
        return copy.deepcopy(rng.choice(ATOMS))
    if choice < 0.65 and isinstance(old, (int, float)) and not isinstance(old, bool):
        return rng.choice([-old, old * 10**rng.randint(1, 300), old / 3, int(old) if math.isfinite(old) else 0,
                           float(old), str(old)])
    if choice < 0.8:
        depth = rng.choice([d for d in (2, 10, 60, 100, 500) if d <= max_depth])
        return _nested(depth, rng.choice(ATOMS[:12]), rng.choice(["list", "dict"]))
    if isinstance(old, dict):
        return list(old.values())
    if isinstance(old, list):
        return {str(i): v for i, v in enumerate(old)}
    return [old] if rng.random() < 0.5 else {"value": old}


def mutate(recipe: dict, rng: random.Random, max_depth: int = 500) -> tuple[dict, list[str]]:
    """One to three random mutations of ``recipe``, nesting at most ``max_depth`` deep; returns the
    mutant and what was done."""
    data, done = copy.deepcopy(recipe), []
    for _ in range(rng.randint(1, 3)):
        paths = [p for p in _paths(data) if p]
        if not paths:
            break
        path = rng.choice(paths)
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        last, action = path[-1], rng.random()
        if action < 0.15 and isinstance(parent, dict):
            del parent[last]
            done.append(f"delete {path}")
        elif action < 0.3 and isinstance(parent, dict):
            extra = rng.choice(["extra", "lr", "steps", "name", "", "1", "options"])
            parent[extra] = _value(rng, None, max_depth)
            done.append(f"add {path[:-1] + (extra,)}")
        else:
            parent[last] = _value(rng, parent[last], max_depth)
            done.append(f"set {path} = {str(parent[last])[:80]}")
    return data, done


def test_the_valid_recipe_loads():
    assert parse_recipe(copy.deepcopy(VALID)).name == "fuzz"


@pytest.mark.parametrize("seed", range(4))
def test_mutated_recipes_load_or_raise_a_user_error(seed):
    rng = random.Random(seed)
    accepted = refused = 0
    for i in range(SAMPLES // 4):
        data, done = mutate(VALID, rng)
        try:
            parse_recipe(data)
            accepted += 1
        except UserError as e:
            refused += 1
            message = str(e)
            assert "\n" not in message and len(message) < 2000, (done, message[:500])
        except Exception as e:  # noqa: BLE001 - the property under test
            pytest.fail(f"mutant {seed}/{i} ({'; '.join(done)}) raised {type(e).__name__}: {str(e)[:300]}")
    assert refused > SAMPLES // 16 and accepted > 0  # the mutations reach both outcomes


def test_mutated_recipe_files_never_print_a_traceback(tmp_path):
    rng = random.Random(99)
    server = ForkServer(tmp_path / "server")
    try:
        handles = []
        for i in range(8):
            data, done = mutate(VALID, rng, max_depth=100)  # PyYAML's writer recurses: 100 levels it can write
            path = tmp_path / f"r{i}.yaml"
            path.write_text(yaml.safe_dump(data, allow_unicode=False, width=10**6))
            handles.append((done, server.submit(["run", str(path), "--dry-run"])))
        for done, handle in handles:
            r = server.result(handle)
            err = r.stderr.strip()
            assert "Traceback" not in r.stderr, (done, r.stderr[-2000:])
            assert r.returncode in (0, 2), (done, r.returncode, err[-500:])
            if r.returncode == 2:
                assert err.splitlines() == [err] and err.startswith("error: "), (done, err[-500:])
    finally:
        server.close()
