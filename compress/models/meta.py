"""The ``meta`` a model file or training checkpoint carries (see
:mod:`compress.compression.serialize`), checked as untrusted input: every key's type, every size
bounded (the input size and class count decide how large a model is built), and the
``transforms`` a list of mappings whose ``kind`` is registered, before any model is built.
"""

from __future__ import annotations

import json
import math
from typing import Any

from compress.checks import MAX_CHANNELS, MAX_CLASSES, MAX_IMAGE_SIDE
from compress.errors import UserError, clip, shorten

__all__ = ["parse_meta", "check_meta", "MAX_TRANSFORMS", "MAX_LABEL_CHARS"]

MAX_TRANSFORMS = 1000
MAX_LABEL_CHARS = 1000
MAX_META_CHARS = 64 << 20


def parse_meta(text: str | None, source: str) -> dict[str, Any]:
    """The checked ``meta`` of a file from its JSON text (``{}`` when there is none).

    Raises:
        UserError: naming ``source``: not JSON, not a mapping, or a key of the wrong type or size.
    """
    if text is None:
        return {}
    if len(text) > MAX_META_CHARS:
        raise UserError(f"{source}: its metadata is {len(text):,} characters long; it is not a model file")
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise UserError(f"{source}: its metadata is not valid JSON ({clip(str(e), 120)}); the file is damaged: "
                        f"save the model again") from None
    return check_meta(meta, source)


def _fail(source: str, key: str, value: Any, valid: str) -> UserError:
    return UserError(f"{source}: metadata {key} {shorten(value)} is invalid; {valid}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_meta(meta: Any, source: str) -> dict[str, Any]:
    """Check a parsed ``meta`` mapping (only the keys present; :func:`load_model
    <compress.compression.serialize.load_model>` requires ``model``); returns it.

    Raises:
        UserError: ``<source>: metadata <key> <value> is invalid; <what is valid>``.
    """
    if not isinstance(meta, dict):
        raise UserError(f"{source}: its metadata is {shorten(meta)}, not a JSON mapping; the file is damaged")
    for key in ("model", "dataset", "channel_order"):
        if key in meta and (not isinstance(meta[key], str) or len(meta[key]) > 300):
            raise _fail(source, key, meta[key], "expected a short string")
    options = meta.get("options", {})
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise _fail(source, "options", meta["options"], "expected a mapping of architecture options")
    channels = _check_size(meta, source)
    _check_labels(meta, source)
    for key in ("mean", "std"):
        if key in meta:
            v = meta[key]
            if (not isinstance(v, list) or len(v) != channels or not all(_is_number(x) for x in v)
                    or key == "std" and any(x <= 0 for x in v)):
                raise _fail(source, key, v, f"expected {channels} finite numbers, one per input channel"
                                            + (", each above 0" if key == "std" else ""))
    _check_transforms(meta, source)
    return meta


def _check_size(meta: dict[str, Any], source: str) -> int:
    """Check ``input_size``; returns its channels (3 when absent)."""
    if "input_size" not in meta:
        return 3
    size = meta["input_size"]
    if (not isinstance(size, list) or len(size) != 3 or not all(_is_int(v) for v in size)
            or not 1 <= size[0] <= MAX_CHANNELS or not all(1 <= v <= MAX_IMAGE_SIDE for v in size[1:])):
        raise _fail(source, "input_size", size, f"expected [C, H, W] with 1 <= C <= {MAX_CHANNELS} and "
                                                f"1 <= H, W <= {MAX_IMAGE_SIDE}")
    return size[0]


def _check_labels(meta: dict[str, Any], source: str) -> None:
    if "num_classes" in meta and (not _is_int(meta["num_classes"]) or not 1 <= meta["num_classes"] <= MAX_CLASSES):
        raise _fail(source, "num_classes", meta["num_classes"], f"expected an integer from 1 to {MAX_CLASSES:,}")
    if "label_names" in meta:
        names = meta["label_names"]
        if (not isinstance(names, list) or not 1 <= len(names) <= MAX_CLASSES
                or not all(isinstance(n, str) and len(n) <= MAX_LABEL_CHARS for n in names)):
            raise _fail(source, "label_names", names, f"expected a list of 1 to {MAX_CLASSES:,} strings of at most "
                                                      f"{MAX_LABEL_CHARS} characters")
        if "num_classes" in meta and meta["num_classes"] != len(names):
            raise _fail(source, "num_classes", meta["num_classes"], f"it must equal the {len(names)} label_names")


def _check_transforms(meta: dict[str, Any], source: str) -> None:
    if "transforms" not in meta:
        return
    from compress.models.transforms import list_transforms

    specs = meta["transforms"]
    if not isinstance(specs, list) or len(specs) > MAX_TRANSFORMS:
        raise _fail(source, "transforms", specs, f"expected a list of at most {MAX_TRANSFORMS} transforms")
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
            raise _fail(source, f"transforms[{i}]", spec, "expected a mapping with a 'kind'")
        kinds = list_transforms()
        if kinds and spec["kind"] not in kinds:
            raise _fail(source, f"transforms[{i}].kind", spec["kind"], f"valid: {', '.join(kinds)}")
