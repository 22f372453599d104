"""Bounds on what one input may cost to read: nesting depth, YAML alias expansion, key length.

Every spec file, request body and DAFNI definition is read through ``load_json`` or
``load_yaml``. A few hundred bytes of YAML aliases ("billion laughs") expand to gigabytes once
walked, and JSON nested a thousand deep overflows Python's stack in json.loads; both are refused
here before anything is built from them. See docs/dags.md, "Limits".
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

import yaml

from smifdb import errors
from smifdb.pgtext import text_problem

MAX_DEPTH = 64  # nested lists and mappings; nothing legitimate comes close
EXPANSION_FACTOR = 10  # aliases may make a YAML document this many times its own size...
EXPANSION_FLOOR = 1_000_000  # ...or this size, whichever is larger
MAX_KEY_LENGTH = 1000  # characters: a job key, or a DAFNI step id (btree rows stop near 2700 bytes)
MAX_NAME_LENGTH = 200  # an API user name
# Linux refuses to exec with one argument or NAME=value longer than this (MAX_ARG_STRLEN).
MAX_ARG_BYTES = 128 * 1024 - 1
# A YAML request body: libyaml takes about a second a megabyte, much of it in C that never lets
# the event loop's thread run. A DAFNI model definition is a few kB; a larger one can be JSON.
MAX_YAML_BODY = 128 * 1024


class LimitError(errors.BadInput, ValueError):
    """Input past one of the bounds above; ``status`` is the HTTP status that answers it."""

    status = 400


class TooLarge(LimitError):
    status = 413


def _too_deep() -> LimitError:
    return LimitError(f"nested more than {MAX_DEPTH} levels deep")


# -- JSON -----------------------------------------------------------------------------------

# A string, or an unterminated one running to the end: a failed match would be retried from
# every later quote, quadratic in a body of escaped quotes.
_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_depth(text: str | bytes) -> int:
    """How deep the brackets of JSON text nest, outside its strings (or just how many open,
    when that is within MAX_DEPTH): a few C-speed passes, about half what json.loads costs,
    without the recursion that parsing needs."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")  # quotes, backslashes and brackets are ASCII
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return text.count("[") + text.count("{")
    brackets = _NOT_BRACKETS.sub("", _STRINGS.sub("", text))
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def load_json(text: str | bytes, **kwargs: Any) -> Any:
    """json.loads, refusing nesting past MAX_DEPTH before parsing (LimitError)."""
    if json_depth(text) > MAX_DEPTH:
        raise _too_deep()
    try:
        return json.loads(text, **kwargs)
    except RecursionError:  # the pre-scan misjudged an odd encoding: still a clear refusal
        raise _too_deep() from None


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether plain data nests lists and mappings more than ``limit`` deep, walked without
    recursion (a structure that contains itself is found too: it is infinitely deep)."""
    todo = [(value, 1)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list | tuple):
            continue
        if level > limit:
            return True
        todo += ((child, level + 1) for child in item)
    return False


# -- YAML -----------------------------------------------------------------------------------


class DuplicateKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """libyaml's safe loader (when available), refusing a mapping that repeats a key (YAML and
    JSON parsers keep the last value, so `after: [x]` then `after: [y]` lost x), and refusing a
    document whose aliases nest it past MAX_DEPTH, expand it past its budget, or make it
    contain itself: checked on the composed node graph, before any value is constructed."""

    budget = EXPANSION_FLOOR

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _check_nodes(node, self.budget)
        return self.construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: explicit keys win
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                repeated = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if repeated:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    if isinstance(node, yaml.SequenceNode):
        return node.value
    return []


def _check_nodes(root: yaml.Node, budget: int) -> None:
    """Size and depth of the document as aliases expand it, each shared node measured once.

    Size counts one per node plus the characters of each scalar, about the length of the JSON
    it becomes; an alias costs the size of what it names, every time it is used."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_nodes: set[int] = set()  # the path from the root: a node met again there is a cycle
    todo: list[tuple[yaml.Node, bool]] = [(root, False)]
    while todo:
        node, finished = todo.pop()
        key = id(node)
        if finished:
            open_nodes.discard(key)
            children = _children(node)
            size[key] = 1 + sum(size[id(c)] for c in children)
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
            if depth[key] > MAX_DEPTH:
                raise _too_deep()
            if size[key] > budget:
                raise TooLarge(
                    f"YAML aliases expand the document past {budget:,} characters "
                    f"({EXPANSION_FACTOR} times its size, at least {EXPANSION_FLOOR:,})"
                )
            continue
        if key in size:
            continue
        if isinstance(node, yaml.ScalarNode):
            size[key], depth[key] = 1 + len(node.value), 0
            continue
        if key in open_nodes:
            raise LimitError("a YAML alias makes the document contain itself")
        open_nodes.add(key)
        todo.append((node, True))
        todo += ((c, False) for c in _children(node) if id(c) not in size)


def load_yaml(text: str | bytes) -> Any:
    """YAML (a superset of JSON) through DuplicateKeyLoader, its alias budget set by its size."""
    loader = DuplicateKeyLoader(text)
    loader.budget = max(EXPANSION_FLOOR, EXPANSION_FACTOR * len(text))
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


# -- names ----------------------------------------------------------------------------------


def name_problem(name: str, what: str = "a user name") -> str | None:
    """Why a name cannot be stored as a text key, or None."""
    if not name.strip() or len(name) > MAX_NAME_LENGTH:
        return f"{what} must be 1 to {MAX_NAME_LENGTH} characters"
    if problem := text_problem(name):
        return f"{what} {problem}"
    return None
