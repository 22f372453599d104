"""Spec fields more than one kind takes: ``cwd`` and ``env``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

FIELDS = frozenset({"cwd", "env"})
SCHEMA: dict[str, Any] = {
    "cwd": {"type": "string", "minLength": 1},
    "env": {"type": "object", "additionalProperties": {"type": "string"}},
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_cwd_env(
    raw: Mapping[str, Any], where: str, problems: list[str], payload: dict[str, Any]
) -> None:
    """``cwd`` and ``env`` into ``payload`` (env values as strings), or their problems."""
    if "cwd" in raw:
        if isinstance(raw["cwd"], str) and raw["cwd"]:
            payload["cwd"] = raw["cwd"]
        else:
            problems.append(f"{where}: 'cwd' must be a non-empty string")
    if "env" in raw:
        env = raw["env"]
        if isinstance(env, Mapping) and all(
            isinstance(k, str) and k and "=" not in k and (isinstance(v, str) or _is_number(v))
            for k, v in env.items()
        ):
            payload["env"] = {k: str(v) for k, v in env.items()}
        else:
            problems.append(f"{where}: 'env' must map names (without '=') to strings or numbers")
