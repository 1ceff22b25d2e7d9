"""The HTTP side of the server: JSON bodies in and out, and streams that notice a client leaving.

Starlette plumbing that knows nothing of completions: the handlers
(:mod:`mtpcode.server.completion`, :mod:`mtpcode.server.info`) read requests
and write answers with these.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from mtpcode.server.errors import ApiError, bad_request
from mtpcode.server.protocol import dumps


def json_response(obj: Any, status: int = 200) -> Response:
    """``obj`` as llama-server writes JSON (see :func:`~mtpcode.server.protocol.dumps`)."""
    return Response(dumps(obj), status_code=status, media_type="application/json; charset=utf-8")


def error_response(err: ApiError) -> Response:
    return json_response(err.body(), err.status)


# Real clients nest a few levels (input_extra: an array of objects). Python's parser recurses per
# level, and a body of 100,000 "[" would exhaust its stack: deeper bodies are refused.
MAX_NESTING = 64
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def nesting(data: bytes) -> int:
    """How deeply ``data`` (JSON text) nests arrays and objects, at C speed: strings are blanked
    out, then the brackets are counted."""
    bare = np.frombuffer(_STRING.sub(b'""', data), dtype=np.uint8)
    step = ((bare == ord("[")) | (bare == ord("{"))).astype(np.int32)
    step -= (bare == ord("]")) | (bare == ord("}"))
    return int(np.cumsum(step).max(initial=0))


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object: 413 past ``limit`` bytes, 400 if not a JSON object or
    nested more than :data:`MAX_NESTING` levels deep."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body is {length} bytes, more than the limit of {limit}")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(413, f"request body is more than the limit of {limit} bytes")
    if nesting(bytes(data)) > MAX_NESTING:
        raise bad_request(f"request body nests arrays and objects more than {MAX_NESTING} levels deep")
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise bad_request("request body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise bad_request(f"request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") \
            from None
    if not isinstance(obj, dict):
        raise bad_request("request body must be a JSON object")
    return obj


class EventStream:
    """A streamed response that cancels its job when the client goes away.

    Sends what ``chunks`` yields; at the same time watches ``receive`` for
    the disconnect, on which it calls ``on_disconnect`` and stops.
    """

    def __init__(self, chunks: AsyncIterator[bytes], on_disconnect: Callable[[], None],
                 media_type: str = "text/event-stream") -> None:
        self.chunks = chunks
        self.on_disconnect = on_disconnect
        self.media_type = media_type

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", self.media_type.encode()), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")]

        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        pump_task = asyncio.ensure_future(pump())
        watch_task = asyncio.ensure_future(wait_disconnect(receive))
        try:
            done, _ = await asyncio.wait({pump_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
            if pump_task in done:
                pump_task.result()
            else:
                self.on_disconnect()
        except OSError:  # the client went away while we were writing
            self.on_disconnect()
        finally:
            for task in (pump_task, watch_task):
                task.cancel()
            await asyncio.gather(pump_task, watch_task, return_exceptions=True)
            aclose = getattr(self.chunks, "aclose", None)
            if aclose is not None:
                await aclose()


async def wait_disconnect(receive: Receive) -> None:
    """Return when the client has disconnected (the request body must have been read)."""
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return
