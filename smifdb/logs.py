"""Log lines of the long-running processes (runner, manager, API): text or one JSON object each.

Events pass their identifiers as ``extra=`` fields (workflow_id, job_key, attempt, runner,
status...) rather than only inside the message, so JSON logs can be filtered on them and text
logs show them as ``key=value`` pairs. Only logging's own configuration holds any state.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from smifdb.store.queue import Outcome

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
# uvicorn adds ``color_message``, a copy of the message with terminal colours.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}
_ACCESS_FIELDS = ("client", "method", "path", "http_version", "status")


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra=`` fields of a record, in the order they were given."""
    return {
        k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            entry.update(zip(_ACCESS_FIELDS, args, strict=True))
        for key, value in fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message [key=value ...]``: readable, and still greppable by id."""

    def __init__(self, fmt: str | None = TEXT_FORMAT, datefmt: str | None = None) -> None:
        super().__init__(fmt, datefmt)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        extra = fields(record)
        if not extra:
            return line
        return f"{line} [{' '.join(f'{k}={_text(v)}' for k, v in extra.items())}]"


def _text(value: object) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in '"=[]' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


def _root_level(level: str) -> str:
    """Libraries (alembic, psycopg...) log at ``level`` only if it is warning or above: their
    info and debug lines are noise to an operator; smifdb's own follow ``level``."""
    return max(level.upper(), "WARNING", key=logging.getLevelName)


def configure(level: str, fmt: str = "text", stream: IO[str] | None = None) -> None:
    """Send log records to standard error in ``fmt``: smifdb's from ``level`` up.

    Does nothing if logging is set up already (by a program embedding smifdb, or pytest).
    """
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(fmt))
    root.addHandler(handler)
    root.setLevel(_root_level(level))
    logging.getLogger("smifdb").setLevel(level.upper())
    logging.captureWarnings(True)  # warnings become log lines too, so JSON output stays JSON


def uvicorn_config(level: str, fmt: str) -> dict[str, Any]:
    """uvicorn's logging configuration (applied in every worker process) with smifdb's own
    loggers on standard error; with ``json``, uvicorn's error and access logs as JSON too."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    name = "JsonFormatter" if fmt == "json" else "TextFormatter"
    config["formatters"]["smifdb"] = {"()": f"{__name__}.{name}"}
    config["handlers"]["smifdb"] = {
        "class": "logging.StreamHandler",
        "formatter": "smifdb",
        "stream": "ext://sys.stderr",
    }
    config["root"] = {"handlers": ["smifdb"], "level": _root_level(level)}
    config["loggers"]["smifdb"] = {"level": level.upper()}
    if fmt == "json":
        for name in ("uvicorn", "uvicorn.access"):
            config["loggers"][name]["handlers"] = ["smifdb"]
    return config


def job_fields(outcome: Outcome, event: str) -> dict[str, Any]:
    """The fields of a job event about an attempt's outcome (or a rescue on its behalf);
    ``status`` is the job's status after the event, absent if the outcome was not recorded."""
    entry: dict[str, Any] = {
        "event": event,
        "workflow_id": outcome.workflow_id,
        "job_key": outcome.key,
        "job_id": outcome.job_id,
        "attempt": outcome.attempt,
        "runner": outcome.owner,
    }
    if event in ("retried", "released"):
        entry["status"] = "ready"
    elif event == "rescued":
        entry["status"] = "ready" if outcome.retries else "failed"
    elif event != "not_recorded":
        entry["status"] = outcome.status
    return entry


def job_event(log: logging.Logger, outcome: Outcome, event: str) -> None:
    """Log ``job EVENT: why`` at info; callers check ``isEnabledFor`` first, once per batch."""
    why = (outcome.reason or outcome.error or "").removeprefix(f"{event}: ")
    if why and why != event:
        log.info("job %s: %s", event, why, extra=job_fields(outcome, event))
    else:
        log.info("job %s", event, extra=job_fields(outcome, event))


def taken_back(log: logging.Logger, outcomes: list[Outcome], event: str) -> None:
    """One line per job taken from its lease holder (``rescued`` or ``released``)."""
    if log.isEnabledFor(logging.INFO):
        for outcome in outcomes:
            job_event(log, outcome, event)
