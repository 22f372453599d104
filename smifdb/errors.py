"""smifdb's errors that the user can act on, raised by the store and mapped once per surface.

Each class carries its HTTP status; the CLI maps every one of them to exit status 2 with its
message (smifdb.cli), the API to a JSON error in the shape of the route's surface
(smifdb.api.errors). Anything else is a bug or an outage: exit 1, or a 500 that is logged.
"""

from __future__ import annotations

from collections.abc import Mapping


class Error(Exception):
    """Bad input, a missing or conflicting record, or a refusal: never a traceback."""

    status = 400

    def __init__(
        self,
        message: str,
        *,
        problems: list[str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.problems = problems
        self.headers = dict(headers or {})


class BadInput(Error):
    status = 400


class Unauthorized(Error):
    """No credentials, or none that are valid."""

    status = 401


class Forbidden(Error):
    """Valid credentials that do not allow this."""

    status = 403


class NotFound(Error):
    status = 404


class Conflict(Error):
    """The request is fine but the record's state does not allow it now."""

    status = 409


class TooLarge(Error):
    status = 413


class UnsupportedMediaType(Error):
    status = 415


class TooManyRequests(Error):
    status = 429

    def __init__(self, message: str, *, retry_after: float) -> None:
        self.retry_after = max(1, int(retry_after + 0.999))
        super().__init__(message, headers={"Retry-After": str(self.retry_after)})
