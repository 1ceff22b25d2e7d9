"""The Starlette application: the route table, the API-key guard, and the exception handlers.

llama.cpp server's endpoints (/infill, /completion, /completions, /health,
/v1/health, /props, /slots, /metrics, /models), OpenAI's (/v1/completions,
/v1/models) and Ollama's (/api/generate, /api/tags, /api/show). Every completion endpoint is the one
handler :func:`~mtpcode.server.completion.complete` with its API's adapter;
the others are in :mod:`mtpcode.server.info`. Whatever a handler raises is
answered through :func:`~mtpcode.server.errors.api_error`.
:func:`mtpcode.server.run.serve_http` runs the application under uvicorn.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable
from functools import partial
from typing import Protocol

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from mtpcode.errors import MtpError
from mtpcode.server import info
from mtpcode.server.apis import Api, llama, ollama, openai
from mtpcode.server.completion import complete
from mtpcode.server.errors import ApiError, api_error, routing_error
from mtpcode.server.state import ServerState
from mtpcode.server.transport import error_response

PUBLIC_PATHS = frozenset({"/health", "/v1/health"})


class InfoHandler(Protocol):
    """A handler of :mod:`mtpcode.server.info`."""

    def __call__(self, request: Request, state: ServerState) -> Awaitable[Response]: ...


def routes(state: ServerState) -> list[Route]:
    """The routes of the server, each handler bound to ``state``."""

    def info_route(path: str, handler: InfoHandler, method: str = "GET") -> Route:
        return Route(path, partial(handler, state=state), methods=[method])

    def completion_route(path: str, api: Api) -> Route:
        return Route(path, partial(complete, state=state, api=api), methods=["POST"])

    return [
        info_route("/health", info.health),
        info_route("/v1/health", info.health),
        info_route("/props", info.props),
        info_route("/models", info.models),
        info_route("/v1/models", info.models),
        info_route("/metrics", info.metrics),
        info_route("/slots", info.slots),
        completion_route("/infill", llama.INFILL),
        completion_route("/completion", llama.COMPLETION),
        completion_route("/completions", llama.COMPLETION),
        completion_route("/v1/completions", openai.COMPLETIONS),
        completion_route("/api/generate", ollama.GENERATE),
        info_route("/api/tags", info.ollama_tags),
        info_route("/api/show", info.ollama_show, "POST"),
    ]


async def on_error(request: Request, exc: Exception) -> Response:
    """The exception handler of the application: every exception becomes an error object."""
    if isinstance(exc, HTTPException):  # no route took the request
        err = routing_error(exc.status_code, request.method, request.url.path, str(exc.detail))
    else:
        err = api_error(exc)
    return error_response(err)


class Guard:
    """ASGI middleware: ``Authorization: Bearer KEY`` (or ``X-Api-Key``) on every path but /health."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key is not None and scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS \
                and scope.get("method") != "OPTIONS":
            given = b""
            for name, value in scope.get("headers", []):
                if name == b"authorization" and value[:7].lower() == b"bearer ":
                    given = value[7:].strip()
                elif name == b"x-api-key" and not given:
                    given = value.strip()
            if not hmac.compare_digest(given, self.key):
                await error_response(ApiError(401, "Invalid API Key", "authentication_error"))(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(state: ServerState) -> Guard:
    """The ASGI application for ``state`` (wrapped in the API-key guard)."""
    # ApiError, HTTPException and MtpError are answered by Starlette's exception middleware; any other
    # exception by its server-error middleware, which also lets the server log the traceback.
    app = Starlette(routes=routes(state), exception_handlers={
        ApiError: on_error, HTTPException: on_error, MtpError: on_error, Exception: on_error,
    })
    return Guard(app, state.api_key)
