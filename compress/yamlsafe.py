"""Reading YAML that a user (or anyone) wrote: recipes, ``--set`` values, a run folder's recorded
settings.

:class:`StrictLoader` is PyYAML's safe loader (plain data only, no ``!!python`` tags) that also
refuses what the safe loader lets through: a key given twice in one mapping (the last would
silently win), nesting deeper than :data:`MAX_DEPTH` (PyYAML's recursive composer would crash
with a ``RecursionError``), and aliases that expand to more than :data:`MAX_NODES` nodes or refer
to themselves ("billion laughs": a few lines that become gigabytes once copied). Files are read
as bytes and decoded here, so a binary or non-UTF-8 file is one clear error.

A leaf: it imports nothing but PyYAML and :mod:`compress.errors`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, SequenceNode

from compress.errors import UserError, clip, shorten

__all__ = ["StrictLoader", "loads", "load_file", "describe_error", "MAX_DEPTH", "MAX_NODES", "MAX_BYTES"]

MAX_DEPTH = 64  # nested mappings and lists
MAX_NODES = 100_000  # nodes once every alias is expanded
MAX_BYTES = 1 << 20  # a recipe or a settings file is small text

_MERGE = "tag:yaml.org,2002:merge"


class StrictLoader(yaml.SafeLoader):
    """The safe loader, refusing duplicate keys, deep nesting and alias bombs."""

    def __init__(self, stream: Any):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels of mappings and lists",
                                    self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self) -> Node:
        node = super().compose_document()
        _check_expansion(node)
        return node

    def construct_mapping(self, node: Node, deep: bool = False) -> dict:
        if isinstance(node, MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable: the safe loader's own error follows
                    continue
                if first is not None:
                    raise ConstructorError("while constructing a mapping", node.start_mark,
                                           f"found the key {shorten(key, 60)} twice (first on line {first + 1}); "
                                           f"each key may appear once", key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root: Node | None) -> None:
    """Count the nodes of ``root`` with every alias expanded (iteratively, each shared node
    counted once per use); refuse more than :data:`MAX_NODES` and aliases that contain themselves."""
    if root is None:
        return
    size: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            open_.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in _children(node))
            if size[key] > MAX_NODES:
                raise ComposerError(None, None, f"expands to more than {MAX_NODES:,} values (aliases repeated "
                                                f"inside aliases); write the values out", node.start_mark)
            continue
        if key in size:
            continue
        if key in open_:
            raise ComposerError(None, None, "an alias refers to the mapping or list that contains it",
                                node.start_mark)
        open_.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in size)


def describe_error(e: yaml.YAMLError) -> str:
    """A YAML error in one line: the problem and where (line and column, 1-based)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or getattr(e, "context", None) or str(e)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return clip(f"{problem}{where}", 300)


def loads(text: str, what: str) -> Any:
    """Parse YAML ``text`` with :class:`StrictLoader`.

    Args:
        text: the YAML.
        what: how the message names it (``recipe 'r.yaml'``, ``--set model.name``).

    Raises:
        UserError: not valid YAML, or refused by the loader; the message names ``what``.
    """
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader
    except yaml.YAMLError as e:
        problem = describe_error(e)
        plain = "; it must be plain YAML (mappings, lists, numbers, strings), no !!python tags"
        hint = plain if "tag" in problem else ""
        raise UserError(f"{what} is not valid YAML: {problem}{hint}") from None
    except RecursionError:  # defensive: the depth bound should make this unreachable
        raise UserError(f"{what} is nested too deeply; a recipe has at most {MAX_DEPTH} levels") from None


def read_text(path: str | os.PathLike, what: str, limit: int = MAX_BYTES) -> str:
    """The UTF-8 text of a small file; a missing, unreadable, binary, huge or non-UTF-8 file is a
    :class:`UserError` naming it as ``what``."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise UserError(f"{what} {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{what} {str(path)!r} is a folder; give a YAML file") from None
    except OSError as e:
        raise UserError(f"{what} {str(path)!r} cannot be read: {e.strerror}") from None
    if len(data) > limit:
        raise UserError(f"{what} {str(path)!r} is larger than {limit // 1024} KiB; it is not a recipe (a small "
                        f"YAML text file)")
    if b"\x00" in data:
        raise UserError(f"{what} {str(path)!r} is a binary file, not YAML text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {str(path)!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                        f"save it as UTF-8") from None


def load_file(path: str | os.PathLike, what: str = "recipe") -> Any:
    """Read and parse a YAML file (:func:`read_text`, then :func:`loads`)."""
    return loads(read_text(path, what), f"{what} {str(path)!r}")
