"""The HTTP server's parts without a model: the adapters' parsing and the exact bytes they write,
the one error mapping, and handlers called directly (no server process, no engine)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from mtpcode import __version__
from mtpcode.config import load_settings
from mtpcode.errors import ContextOverflowError, DataError, ModelError, UsageError
from mtpcode.generation import Stats
from tests.http_helpers import llama_vim_fim_request, llama_vim_ring_request

pytest.importorskip("starlette")

from starlette.requests import Request
from starlette.testclient import TestClient

from mtpcode.server import info
from mtpcode.server.apis import llama, ollama, openai
from mtpcode.server.app import create_app, on_error
from mtpcode.server.completion import complete
from mtpcode.server.errors import ApiError, api_error
from mtpcode.server.infill import Chunk
from mtpcode.server.protocol import Partial, Result, dumps
from mtpcode.server.state import ServerState
from mtpcode.server.transport import error_response

PREFIX = "import os\n\n\ndef read(path):\n"
MIDDLE = "    with open(path) as f:"
SUFFIX = "\n\n\ndef write(path, text):\n    pass\n"
EXTRA = [{"text": "def helper(x):\n    return x * 2\n", "time": 1733212345.5, "filename": "util.py"}]
CREATED = 1700000000.75  # 2023-11-14T22:13:20.750000Z


class Sizes:
    """The engine as a request's parsing sees it: its sizes (the adapters never generate)."""

    n_ctx = 4096
    n_heads = 3
    n_vocab = 512

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        raise NotImplementedError("parsing does not tokenize")

    def detokenize(self, ids: Sequence[int]) -> str:
        raise NotImplementedError("parsing does not detokenize")

    def generate(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        raise NotImplementedError("parsing does not generate")

    def close(self) -> None:
        pass


def server_state(*, loaded: bool = True, **kw: Any) -> ServerState:
    return ServerState(settings=load_settings(), model_id="tiny", model_path=Path("/models/tiny"),
                       engine=Sizes() if loaded else None, **kw)


def stats() -> Stats:
    """Numbers whose timings are exact in binary (25 ms prefill of 10 tokens, 500 ms for 4)."""
    return Stats(prompt_tokens=12, prompt_tokens_processed=10, generated_tokens=4, main_forwards=2, heads_used=3,
                 drafted_tokens=[2, 1, 0], accepted_tokens=[1, 1, 0], drafted_by_source={"heads": 3, "context": 0},
                 accepted_by_source={"heads": 2, "context": 0}, forwards_by_source={"heads": 2},
                 tokens_by_source={"heads": 4}, prefill_s=0.025, decode_s=0.5)


RESULT = Result(content='    return "é"\n', reason="eos", stats=stats(), prompt="def f():\n", n_prompt=12,
                created=CREATED)
PIECE = Partial("é\n", n_decoded=3, n_prompt=12, created=CREATED)
TIMINGS = ('"timings":{"cache_n":2,"prompt_n":10,"prompt_ms":25.0,"prompt_per_token_ms":2.5,"prompt_per_second":400.0,'
           '"predicted_n":4,"predicted_ms":500.0,"predicted_per_token_ms":125.0,"predicted_per_second":8.0,'
           '"draft_n":3,"draft_n_accepted":2,"heads":3,"main_forwards":2,"tokens_per_forward":2.0,'
           '"draft_acceptance":[0.5,1.0,0.0],"drafted_by_source":{"heads":3,"context":0},'
           '"accepted_by_source":{"heads":2,"context":0},"tokens_per_forward_by_source":{"heads":2.0}}')
SETTINGS = ('"generation_settings":{"n_predict":4,"seed":-1,"temperature":0.0,"top_k":0,"top_p":1.0,"min_p":0.0,'
            '"stop":[],"max_tokens":4,"n_indent":0,"t_max_predict_ms":0.0,"stream":false,"n_ctx":4096,'
            '"speculative.n_max":3,"samplers":[]}')


# --- parsing ---------------------------------------------------------------------------------


def test_infill_parses_a_llama_vim_body() -> None:
    spec = llama.INFILL.parse(server_state(), llama_vim_fim_request(PREFIX, MIDDLE, SUFFIX, EXTRA, 4))
    assert spec.infill and spec.before == PREFIX + MIDDLE and spec.suffix == SUFFIX
    assert spec.chunks == [Chunk("util.py", EXTRA[0]["text"])]  # "time" is llama.vim's own
    p = spec.params
    assert (p.n_predict, p.n_indent, p.t_max_predict_ms, p.stream, p.n_cmpl) == (128, 4, 250.0, False, 1)
    assert p.response_fields[:2] == ["content", "timings/prompt_n"] and len(p.response_fields) == 11
    s = spec.options.sampling
    assert (s.top_k, s.top_p, s.temperature) == (40, 0.9, 0.0) and spec.options.max_tokens == 128
    assert spec.settings_json["speculative.n_max"] == 3 and spec.settings_json["n_ctx"] == 4096
    assert spec.model == "tiny" and spec.n_ctx == 4096

    ring = llama.INFILL.parse(server_state(), llama_vim_ring_request(EXTRA))
    assert ring.params.n_predict == 0 and ring.before == "" and ring.chunks == spec.chunks
    assert ring.params.response_fields == []  # llama.vim sends [""]


@pytest.mark.parametrize(("body", "want"), [
    ({"prompt": "x = 1\n"}, {"infill": False, "prompt": "x = 1\n"}),
    ({"prompt": ["x = 1\n"]}, {"infill": False, "prompt": "x = 1\n"}),
    ({"prompt": [1, 200, 300]}, {"infill": False, "prompt": [1, 200, 300]}),
    ({"prompt": "<PRE> a = <SUF>\nb = 2\n <MID>"}, {"infill": True, "before": "a =", "suffix": "\nb = 2\n"}),
    ({"prompt": "a = ", "suffix": "\n"}, {"infill": False, "prompt": "a = "}),  # llama.cpp reads no suffix here
])
def test_completion_prompts(body: dict[str, Any], want: dict[str, Any]) -> None:
    spec = llama.COMPLETION.parse(server_state(), body)
    assert {k: getattr(spec, k) for k in want} == want


def test_openai_and_ollama_read_their_own_fields() -> None:
    state = server_state()
    oa = openai.COMPLETIONS.parse(state, {"prompt": "a = ", "suffix": "\n", "max_tokens": 5, "n_predict": 2})
    assert oa.infill and oa.before == "a = " and oa.suffix == "\n" and oa.params.n_predict == 5
    ol = ollama.GENERATE.parse(state, {"prompt": "a", "options": {"num_predict": 7, "temperature": 0.5,
                                                                  "model": "other"}})
    assert ol.params.n_predict == 7 and ol.params.stream  # Ollama streams unless told not to
    assert ol.options.sampling.temperature == 0.5  # options count; an options "model" does not
    with pytest.raises(ApiError, match="must be a string, an array of one string$"):
        ollama.GENERATE.parse(state, {"prompt": [1, 2]})  # no token ids for Ollama


@pytest.mark.parametrize("api", [llama.COMPLETION, openai.COMPLETIONS, ollama.GENERATE])
def test_any_model_name_gets_the_loaded_model(api: Any) -> None:
    """Clients send the name they were configured with (a Neovim plugin's llama.cpp recipe sends
    "PLACEHOLDER"): one model is loaded, so it answers, and the answer names it, as llama-server does."""
    for name in ("PLACEHOLDER", "qwen2.5-coder:1.5b", "", None):
        spec = api.parse(server_state(), {"prompt": "x", "model": name})
        assert spec.model == "tiny"


def test_id_slot_is_checked_against_the_slots() -> None:
    state = server_state(n_slots=4)
    assert llama.INFILL.parse(state, {"id_slot": 3}).params.id_slot == 3
    assert llama.INFILL.parse(state, {"id_slot": -1}).params.id_slot is None  # any slot
    assert llama.INFILL.parse(state, {}).params.id_slot is None
    with pytest.raises(ApiError, match="has 4 slot"):
        llama.INFILL.parse(state, {"id_slot": 4})


@pytest.mark.parametrize(("api", "body", "status", "words"), [
    (openai.COMPLETIONS, {"prompt": "x", "model": 3}, 400, '"model" must be a string'),
    (llama.COMPLETION, {"prompt": "x", "stream": True, "n_cmpl": 2}, 400, "streaming gives one completion"),
    (llama.INFILL, {"input_extra": [{"filename": 1, "text": ""}]}, 400, 'input_extra[0]: "filename"'),
    (llama.COMPLETION, {"prompt": ["a", "b"]}, 400, "one prompt per request, not 2"),
])
def test_parse_refuses(api: Any, body: dict[str, Any], status: int, words: str) -> None:
    with pytest.raises(ApiError) as err:
        api.parse(server_state(), body)
    assert err.value.status == status and words in err.value.message


# --- rendering: the exact bytes --------------------------------------------------------------------


def test_llama_renders_llama_servers_bytes() -> None:
    spec = llama.COMPLETION.parse(server_state(), {"prompt": "def f():\n", "n_predict": 4})
    final = ('{"index":0,"content":"    return \\"é\\"\\n","tokens":[],"id_slot":0,"stop":true,"model":"tiny",'
             '"tokens_predicted":4,"tokens_evaluated":12,' + SETTINGS + ',"prompt":"def f():\\n","has_new_line":true,'
             '"truncated":false,"stop_type":"eos","stopping_word":"","tokens_cached":16,' + TIMINGS
             + ',"stop_reason":"eos"}')
    assert dumps(llama.COMPLETION.render_final(spec, [RESULT])) == final.encode()
    assert dumps(llama.COMPLETION.render_final(spec, [RESULT, RESULT])) == f"[{final},{final}]".encode()
    end = final.replace('"content":"    return \\"é\\"\\n"', '"content":""')
    assert llama.COMPLETION.render_end(spec, RESULT) == f"data: {end}\n\n".encode()
    assert llama.COMPLETION.render_piece(spec, PIECE) == (
        'data: {"index":0,"content":"é\\n","tokens":[],"stop":false,"id_slot":0,"tokens_predicted":3,'
        '"tokens_evaluated":12}\n\n').encode()
    fields = llama.INFILL.parse(server_state(), {"response_fields": ["content", "timings/prompt_n", "nope"]})
    assert dumps(llama.INFILL.render_final(fields, [RESULT])) == b'{"content":"    return \\"\xc3\xa9\\"\\n",' \
                                                                b'"timings/prompt_n":10}'


def test_openai_renders_text_completion_bytes() -> None:
    spec = openai.COMPLETIONS.parse(server_state(), {"prompt": "def f():\n", "max_tokens": 4})
    head = (f'"created":1700000000,"model":"tiny","system_fingerprint":"mtpcode-{__version__}",'
            '"object":"text_completion"')
    usage = '"usage":{"completion_tokens":4,"prompt_tokens":12,"total_tokens":16}'
    final = ('{"choices":[{"text":"    return \\"é\\"\\n","index":0,"logprobs":null,"finish_reason":"stop"}],'
             + head + "," + usage + f',"id":"{spec.id}",' + TIMINGS + "}")
    assert dumps(openai.COMPLETIONS.render_final(spec, [RESULT])) == final.encode()
    end = final.replace('"text":"    return \\"é\\"\\n"', '"text":""')
    assert openai.COMPLETIONS.render_end(spec, RESULT) == f"data: {end}\n\ndata: [DONE]\n\n".encode()
    assert openai.COMPLETIONS.render_piece(spec, PIECE) == (
        'data: {"choices":[{"text":"é\\n","index":0,"logprobs":null,"finish_reason":null}],' + head
        + f',"id":"{spec.id}"}}\n\n').encode()
    assert spec.id.startswith("cmpl-") and spec.id != openai.COMPLETIONS.parse(server_state(), {}).id


def test_ollama_renders_ndjson_bytes() -> None:
    spec = ollama.GENERATE.parse(server_state(), {"prompt": "def f():\n"})
    head = '{"model":"tiny","created_at":"2023-11-14T22:13:20.750000Z",'
    tail = ('"done":true,"done_reason":"stop","total_duration":525000000,"load_duration":0,"prompt_eval_count":12,'
            '"prompt_eval_duration":25000000,"eval_count":4,"eval_duration":500000000}')
    assert ollama.GENERATE.media_type == "application/x-ndjson"
    assert ollama.GENERATE.render_piece(spec, PIECE) == (head + '"response":"é\\n","done":false}\n').encode()
    assert ollama.GENERATE.render_end(spec, RESULT) == (head + '"response":"",' + tail + "\n").encode()
    assert dumps(ollama.GENERATE.render_final(spec, [RESULT])) == (
        head + '"response":"    return \\"é\\"\\n",' + tail).encode()


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("exc", "status", "kind", "message"), [
    (ApiError(413, "too big"), 413, "invalid_request_error", "too big"),
    (ContextOverflowError("prompt of 5000 tokens"), 400, "exceed_context_size_error", "prompt of 5000 tokens"),
    (DataError("binary prompt"), 400, "invalid_request_error", "binary prompt"),
    (UsageError("bad top_p"), 400, "invalid_request_error", "bad top_p"),
    (ModelError("llama.cpp failed"), 500, "server_error", "llama.cpp failed"),
    (KeyError("x"), 500, "server_error", "internal error: KeyError: 'x'"),
])
def test_one_error_mapping(exc: Exception, status: int, kind: str, message: str) -> None:
    err = api_error(exc)
    assert (err.status, err.kind, err.message) == (status, kind, message)
    response = asyncio.run(on_error(request(), exc))  # the application's exception handler agrees
    assert response.status_code == status
    assert response.body == dumps({"error": {"code": status, "message": message, "type": kind}})


def test_a_stream_that_fails_ends_as_each_api_ends_it() -> None:
    """llama-server's `error:` event (and `[DONE]` for OpenAI's stream); Ollama's error line."""
    err = api_error(KeyError("x"))
    body = b'{"code":500,"message":"internal error: KeyError: \'x\'","type":"server_error"}'
    spec = llama.INFILL.parse(server_state(), {})
    assert llama.INFILL.render_error(spec, err) == b"error: " + body + b"\n\n"
    spec = openai.COMPLETIONS.parse(server_state(), {})
    assert openai.COMPLETIONS.render_error(spec, err) == b"error: " + body + b"\n\ndata: [DONE]\n\n"
    spec = ollama.GENERATE.parse(server_state(), {})
    assert ollama.GENERATE.render_error(spec, err) == b'{"error":"internal error: KeyError: \'x\'"}\n'


def test_error_body_bytes() -> None:
    err = ApiError(400, "the line at the cursor is long", "exceed_context_size_error", n_ctx=4096)
    response = error_response(err)
    assert response.status_code == 400 and response.media_type == "application/json; charset=utf-8"
    assert response.body == (b'{"error":{"code":400,"message":"the line at the cursor is long",'
                             b'"type":"exceed_context_size_error","n_ctx":4096}}')


# --- handlers, called directly -------------------------------------------------------------------


def request(method: str = "GET", path: str = "/", body: bytes = b"") -> Request:
    """A Starlette request as a server would hand it over: ``body`` arrives, then the client leaves."""
    messages = [{"type": "http.request", "body": body, "more_body": False}, {"type": "http.disconnect"}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if len(messages) > 1 else messages[0]

    scope = {"type": "http", "method": method, "path": path, "query_string": b"",
             "headers": [(b"content-length", str(len(body)).encode())]}
    return Request(scope, receive)


def test_info_handlers_while_loading() -> None:
    state = server_state(loaded=False)
    health = asyncio.run(info.health(request(), state))
    assert health.status_code == 503 and json.loads(health.body)["error"]["message"] == "Loading model"
    models = json.loads(asyncio.run(info.models(request(), state)).body)
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert models["data"][0]["meta"]["n_heads"] is None  # not known before the model loads
    listed, tag = models["models"][0], json.loads(asyncio.run(info.ollama_tags(request(), state)).body)["models"][0]
    assert listed["details"] == tag["details"] == info.MODEL_DETAILS
    assert (listed["modified_at"], listed["size"], tag["size"]) == ("", "", 0)
    assert list(listed) == ["name", "model", "modified_at", "size", "digest", "type", "description", "tags",
                            "capabilities", "parameters", "details"]


def test_ollama_show_handler() -> None:
    state = server_state()
    shown = json.loads(asyncio.run(info.ollama_show(request("POST", "/api/show", b'{"name": "tiny"}'), state)).body)
    assert shown["details"] == info.MODEL_DETAILS and shown["model_info"]["llama.context_length"] == 4096
    other = json.loads(asyncio.run(info.ollama_show(request("POST", "/api/show", b'{"model": "other"}'), state)).body)
    assert other == shown  # whatever it asks about, the model this server runs


def test_complete_handler_reads_the_body_then_needs_the_model() -> None:
    state = server_state(loaded=False)
    with pytest.raises(ApiError) as err:
        asyncio.run(complete(request("POST", "/completion", b"{not json"), state, llama.COMPLETION))
    assert err.value.status == 400 and "not valid JSON" in err.value.message
    with pytest.raises(ApiError) as err:
        asyncio.run(complete(request("POST", "/completion", b'{"prompt": "x"}'), state, llama.COMPLETION))
    assert err.value.status == 503


def test_app_answers_every_error_as_an_error_object() -> None:
    client = TestClient(create_app(server_state(loaded=False)))
    assert client.get("/health").status_code == 503
    r = client.post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable_error"
    r = client.get("/no/such/endpoint")
    assert r.status_code == 404 and r.content == (b'{"error":{"code":404,"message":"no endpoint /no/such/endpoint",'
                                                  b'"type":"not_found_error"}}')
    r = client.get("/infill")
    assert r.status_code == 405 and r.json()["error"]["message"] == "GET is not allowed on /infill"
    r = client.post("/completion", content=b"x" * 100)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("request body is not valid JSON")
    guarded = TestClient(create_app(server_state(loaded=False, api_key="sekrit", max_body=50)))
    assert guarded.get("/props").status_code == 401 and guarded.get("/health").status_code == 503
    r = guarded.post("/completion", content=b"x" * 100, headers={"Authorization": "Bearer sekrit"})
    assert r.status_code == 413 and "more than the limit of 50" in r.json()["error"]["message"]
