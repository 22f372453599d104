"""What PostgreSQL refuses as text or jsonb that Python accepts.

A NUL character cannot be text; an unpaired surrogate is not Unicode; NaN and Infinity are not
JSON. Caught early, each is a clear message about one spec or one job; caught by PostgreSQL, it
fails a whole statement: a submission, or every outcome in a runner's batch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any


def text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "holds a NUL character"
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            return "holds an unpaired surrogate"
    return None


def clean_text(text: str | None) -> str | None:
    """NULs and unpaired surrogates replaced, for logs and messages (not for data)."""
    if text is None or text_problem(text) is None:
        return text
    return text.replace("\x00", "\ufffd").encode(errors="replace").decode()


def strings(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every string in plain data (keys too), with where it is: ``jobs[3].args.name``."""
    todo = [(path, value)]
    seen: set[int] = set()  # YAML anchors can make a structure that contains itself
    while todo:
        where, item = todo.pop()
        if isinstance(item, str):
            yield where, item
            continue
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str):
                    yield f"{where} (a key)", key
                todo.append((f"{where}.{key}" if where else str(key), child))
        elif isinstance(item, list | tuple):
            todo += ((f"{where}[{i}]", child) for i, child in enumerate(item))


def _clean_json(text: str) -> bool:
    """No string in this JSON (dumped with ensure_ascii=False) holds a NUL or a surrogate.

    One C-speed pass answers the common case for a big spec or result; a literal backslash
    before 'u0000' is a false alarm that only costs the walk."""
    return "\\u0000" not in text and text_problem(text) is None


def text_problems(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(where, problem) for every string in plain data that PostgreSQL would refuse."""
    try:
        if _clean_json(json.dumps(value, ensure_ascii=False, default=repr)):
            return
    except (TypeError, ValueError, RecursionError):  # not JSON (a date key, a cycle): walk it
        pass
    for where, item in strings(value, path):
        if problem := text_problem(item):
            yield where, problem


def jsonb_problems(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(where, problem) for everything in plain data that jsonb would refuse: what
    text_problems finds, NaN and Infinity, and values JSON has no type for (a date, a set)."""
    try:
        if _clean_json(json.dumps(value, allow_nan=False, ensure_ascii=False)):
            return
    except (TypeError, ValueError, RecursionError):
        pass
    todo = [(path, value)]
    seen: set[int] = set()
    while todo:
        where, item = todo.pop()
        at = where or "the value"
        if isinstance(item, str):
            if problem := text_problem(item):
                yield at, f"the string {problem}"
        elif isinstance(item, float):
            if not math.isfinite(item):
                yield at, f"{item} is not a JSON number"
        elif isinstance(item, dict | list | tuple):
            if id(item) in seen:
                yield at, "the value contains itself"
                continue
            seen.add(id(item))
            if isinstance(item, dict):
                for key, child in item.items():
                    name = clean_text(key) if isinstance(key, str) else str(key)
                    inner = f"{where}.{name}" if where else name
                    if isinstance(key, str) and (problem := text_problem(key)):
                        yield f"{inner} (a key)", f"the string {problem}"
                    elif not isinstance(key, str | int | float | bool) and key is not None:
                        yield f"{inner} (a key)", f"a {type(key).__name__} is not a JSON key"
                    todo.append((inner, child))
            else:
                todo += ((f"{where}[{i}]", child) for i, child in enumerate(item))
        elif not (item is None or isinstance(item, bool | int)):
            yield at, f"a {type(item).__name__} is not a JSON value"


def unstorable(value: Any) -> str | None:
    """Why jsonb would refuse a value, or None if it can be stored."""
    try:
        if _clean_json(json.dumps(value, allow_nan=False, ensure_ascii=False)):
            return None
    except (TypeError, ValueError, RecursionError) as exc:
        return str(exc)
    for where, problem in text_problems(value, "the value"):
        return f"a string in {where} {problem}"
    return None
