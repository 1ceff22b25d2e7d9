"""Errors of the HTTP server, and the one mapping from an exception to what the client gets.

Every failure a client sees goes through :func:`api_error`: a job that failed
on the worker thread (its ``Outcome.error``), and whatever a handler raised
(the application's exception handlers). The answer is an :class:`ApiError`:
a status and an error object in OpenAI's shape, which llama-server also uses.
"""

from __future__ import annotations

from typing import Any

from mtpcode.errors import ContextOverflowError, DataError, MtpError, UsageError


class ApiError(MtpError):
    """A request the server answers with an error object, in OpenAI's shape (an MtpError: the
    client's fault or an expected failure, not a bug to log with its traceback)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.status, "message": self.message, "type": self.kind, **self.extra}}


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


def loading() -> ApiError:
    """503 while the model loads, as llama-server says it."""
    return ApiError(503, "Loading model", "unavailable_error")


def api_error(exc: BaseException) -> ApiError:
    """What the client gets for ``exc``: the request's fault (4xx) or the server's (500).

    ``ContextOverflowError`` is llama-server's ``exceed_context_size_error``;
    other bad data or options are 400; any other mtpcode error is a 500 with its
    message; anything else is a bug, reported by its type and message.
    """
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return ApiError(400, str(exc), "exceed_context_size_error")
    if isinstance(exc, (DataError, UsageError)):
        return ApiError(400, str(exc))
    if isinstance(exc, MtpError):
        return ApiError(500, str(exc), "server_error")
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")


def routing_error(status: int, method: str, path: str, detail: str) -> ApiError:
    """A request no route takes: 404 for an unknown path, 405 for a method the path does not take."""
    if status == 404:
        return ApiError(404, f"no endpoint {path}", "not_found_error")
    if status == 405:
        return ApiError(405, f"{method} is not allowed on {path}")
    return ApiError(status, detail)
