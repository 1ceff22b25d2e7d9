"""The one completion handler called directly, as Starlette would call it, on the tiny model: a real
engine and scheduler, no server process and no socket."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from runtime_helpers import greedy_done
from starlette.requests import Request

from mtpcode.config import load_settings
from mtpcode.scheduler import Scheduler
from mtpcode.server.apis import Api, llama, ollama, openai
from mtpcode.server.completion import complete
from mtpcode.server.errors import ApiError
from mtpcode.server.state import ServerState
from mtpcode.stops import code_stops
from tests.http_helpers import llama_vim_fim_request, sse_events

PROMPT = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n"
PREFIX = "import os\n\n\ndef read(path):\n"
MIDDLE = "    with open(path) as f:"
SUFFIX = "\n\n\ndef write(path, text):\n    pass\n"


@pytest.fixture(scope="module")
def state(engine, tiny_bundle: Path):
    scheduler = Scheduler(engine)
    yield ServerState(settings=load_settings(), model_id=tiny_bundle.name, model_path=tiny_bundle, engine=engine,
                      scheduler=scheduler)
    scheduler.close()


async def exchange(state: ServerState, api: Api, body: dict[str, Any]) -> tuple[int, str, bytes]:
    """POST ``body`` to ``complete`` for ``api`` and play the answer it returns: (status, content type, body).

    The client sends the body, then stays until the whole answer has come.
    """
    data = json.dumps(body).encode()
    sent = asyncio.Event()
    answered = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if not sent.is_set():
            sent.set()
            return {"type": "http.request", "body": data, "more_body": False}
        await answered.wait()
        return {"type": "http.disconnect"}

    messages: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]}
    answer = await complete(Request(scope, receive), state, api)
    await answer(scope, receive, send)
    answered.set()
    start, *rest = messages
    return start["status"], dict(start["headers"])[b"content-type"].decode(), b"".join(m["body"] for m in rest)


def test_infill_of_a_llama_vim_body(state: ServerState, engine) -> None:
    body = {**llama_vim_fim_request(PREFIX, MIDDLE, SUFFIX, [], 0), "t_max_predict_ms": 0}  # no clock in the way
    status, kind, raw = asyncio.run(exchange(state, llama.INFILL, body))
    assert status == 200 and kind == "application/json; charset=utf-8"
    assert raw.startswith(b'{"content":"')  # response_fields, in the order asked
    got = json.loads(raw)
    assert list(got) == body["response_fields"]
    before = PREFIX + MIDDLE
    assert got["content"] == greedy_done(engine, before, 128, code_stops(before, suffix=SUFFIX)).text


@pytest.mark.parametrize(("api", "body", "kind"), [
    (llama.COMPLETION, {"prompt": PROMPT, "n_predict": 8, "stream": True}, "text/event-stream"),
    (openai.COMPLETIONS, {"prompt": PROMPT, "max_tokens": 8, "stream": True}, "text/event-stream"),
    (ollama.GENERATE, {"prompt": PROMPT, "options": {"num_predict": 8}}, "application/x-ndjson"),
])
def test_every_api_streams_the_same_completion(state: ServerState, engine, api: Api, body: dict[str, Any],
                                              kind: str) -> None:
    status, media_type, raw = asyncio.run(exchange(state, api, body))
    assert status == 200 and media_type == kind
    if api is ollama.GENERATE:
        *pieces, end = [json.loads(line) for line in raw.decode().splitlines()]
        text = "".join(p["response"] for p in pieces)
        assert end["done"] is True and end["eval_count"] == 8
    elif api is openai.COMPLETIONS:
        *pieces, end, done = sse_events(raw)
        text = "".join(p["choices"][0]["text"] for p in pieces)
        assert done == "[DONE]" and end["usage"]["completion_tokens"] == 8
    else:
        *pieces, end = sse_events(raw)
        text = "".join(p["content"] for p in pieces)
        assert end["stop"] is True and end["tokens_predicted"] == 8
    assert text == greedy_done(engine, PROMPT, 8).text


def test_a_failed_job_is_answered_through_the_error_mapping(state: ServerState) -> None:
    body = {"input_prefix": "x" * 30000, "n_predict": 4, "stream": True}  # one line longer than the context
    with pytest.raises(ApiError) as err:
        asyncio.run(exchange(state, llama.INFILL, body))
    assert err.value.status == 400 and err.value.kind == "exceed_context_size_error"
    assert err.value.body()["error"]["n_ctx"] == 4096
