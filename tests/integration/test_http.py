"""`mtpcode serve --http` over real loopback HTTP: a real server process on the tiny bundle (and the
built-in model), driven by httpx, the official openai client, and the request bodies llama.vim and
llama.vscode send (copied from their sources)."""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from runtime_helpers import greedy_done

from mtpcode.generation import GenerationOptions
from mtpcode.stops import code_stops
from tests.http_helpers import (
    HttpServer,
    continue_llama_cpp_request,
    env,
    llama_vim_fim_request,
    llama_vim_ring_request,
    llama_vscode_request,
    sse_events,
)

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

PROMPT = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n"
PREFIX = "import os\n\n\ndef read(path):\n"
MIDDLE = "    with open(path) as f:"
SUFFIX = "\n\n\ndef write(path, text):\n    pass\n"


@pytest.fixture(scope="module")
def server(tiny_bundle: Path):
    s = HttpServer(bundle=tiny_bundle)
    yield s
    code = s.stop(signal.SIGTERM)
    assert code == 0, "".join(s.stderr)
    assert "mtpcode: stopped" in "".join(s.stderr)


# --- metadata --------------------------------------------------------------------------------


def test_health_models_props(server: HttpServer, tiny_bundle: Path) -> None:
    r = server.get("/health")
    assert r.status_code == 200 and r.content == b'{"status":"ok"}'
    models = server.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == tiny_bundle.name
    assert models["data"][0]["meta"]["n_heads"] == 3 and models["data"][0]["meta"]["n_ctx"] == 4096
    props = server.get("/props").json()
    assert props["default_generation_settings"]["n_ctx"] == 4096 and props["total_slots"] == 4  # --parallel
    assert props["model_path"] == str(tiny_bundle) and props["mtpcode"]["heads"] == 3


# --- /completion ------------------------------------------------------------------------------


def test_completion_equals_mtpcode_complete(server: HttpServer, tiny_bundle: Path) -> None:
    r = server.post("/completion", {"prompt": PROMPT, "n_predict": 12})
    assert r.status_code == 200
    # llama.vim accepts a response only if it matches '^\s*{' and '"content"\s*:"' (no space after the colon).
    assert r.content.startswith(b'{"index":0,"content":"')
    body = r.json()
    cli = subprocess.run([sys.executable, "-m", "mtpcode", "complete", "-m", str(tiny_bundle), "-n", "12",
                          "--threads", "2"], input=PROMPT.encode(), capture_output=True, env=env(), timeout=120)
    assert cli.returncode == 0, cli.stderr.decode()
    assert body["content"] == cli.stdout.decode()
    assert list(body)[:16] == ["index", "content", "tokens", "id_slot", "stop", "model", "tokens_predicted",
                               "tokens_evaluated", "generation_settings", "prompt", "has_new_line", "truncated",
                               "stop_type", "stopping_word", "tokens_cached", "timings"]
    assert body["stop"] is True and body["stop_type"] == "limit" and body["tokens_predicted"] == 12
    t = body["timings"]
    assert t["prompt_n"] + t["cache_n"] == body["tokens_evaluated"] and t["predicted_n"] == 12
    assert t["heads"] == 3 and len(t["draft_acceptance"]) == 3 and t["tokens_per_forward"] >= 1.0


def test_completion_stream_and_prefix_reuse(server: HttpServer, engine) -> None:
    expected = greedy_done(engine, PROMPT, 16).text
    r = server.post("/completion", {"prompt": PROMPT, "n_predict": 16, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.content)
    *partials, final = events
    assert all(e["stop"] is False and set(e) >= {"content", "tokens_predicted"} for e in partials)
    assert "".join(e["content"] for e in partials) == expected
    assert final["stop"] is True and final["content"] == "" and final["timings"]["predicted_n"] == 16
    # The same prompt again: everything but the last prompt token comes from the KV cache.
    again = server.post("/completion", {"prompt": PROMPT, "n_predict": 4}).json()
    assert again["timings"]["prompt_n"] == 1 and again["timings"]["cache_n"] == again["tokens_evaluated"] - 1


def test_completion_stop_words_and_tokens(server: HttpServer, engine) -> None:
    full = greedy_done(engine, PROMPT, 24).text
    word = full.strip()[3:6]
    assert word
    body = server.post("/completion", {"prompt": PROMPT, "n_predict": 24, "stop": [word]}).json()
    assert body["content"] == full[: full.index(word)]
    assert body["stop_type"] == "word" and body["stopping_word"] == word
    ids = engine.tokenize(PROMPT)
    by_ids = server.post("/completion", {"prompt": ids, "n_predict": 8}).json()
    assert by_ids["content"] == greedy_done(engine, PROMPT, 8).text


# --- /infill ------------------------------------------------------------------------------------


def test_infill_is_the_cursor_completion(server: HttpServer, engine) -> None:
    before = PREFIX + MIDDLE
    expected = greedy_done(engine, before, 48, code_stops(before, suffix=SUFFIX))
    body = server.post("/infill", {"input_prefix": PREFIX, "input_suffix": SUFFIX, "prompt": MIDDLE,
                                   "n_predict": 48}).json()
    assert body["content"] == expected.text
    assert body["prompt"] == before  # no FIM tokens: the text before the cursor, as it is
    streamed = sse_events(server.post("/infill", {"input_prefix": PREFIX, "input_suffix": SUFFIX, "prompt": MIDDLE,
                                                  "n_predict": 48, "stream": True}).content)
    assert "".join(e["content"] for e in streamed[:-1]) == expected.text


def test_infill_extra_context_comes_first_and_is_reused(server: HttpServer) -> None:
    extra = [{"filename": "util.py", "text": "def helper(x):\n    return x * 2\n"},
             {"filename": "lib.c", "text": "int twice(int x) { return 2 * x; }\n"}]
    warm = server.post("/infill", {"input_prefix": "", "input_suffix": "", "input_extra": extra, "prompt": "",
                                   "n_predict": 0}).json()
    assert warm["content"] == "" and warm["tokens_predicted"] == 0
    assert warm["prompt"].startswith("# util.py\ndef helper") and "// lib.c\nint twice" in warm["prompt"]
    typed = ""
    for i, ch in enumerate("value = helper("):
        typed += ch
        body = server.post("/infill", {"input_prefix": "x = 1\n", "prompt": typed, "input_suffix": ")\n",
                                       "input_extra": extra, "n_predict": 4}).json()
        assert body["prompt"].startswith(warm["prompt"]) and body["prompt"].endswith("x = 1\n" + typed)
        # Only the last few tokens of each keystroke's prompt are evaluated again (the first keystroke
        # after the warm-up also evaluates the prefix line).
        assert body["timings"]["prompt_n"] <= (8 if i == 0 else 4), (i, body["timings"])
        assert body["timings"]["cache_n"] >= len(warm["prompt"]) // 8


def test_n_indent_and_time_limit(server: HttpServer, engine) -> None:
    prefix = "class A:\n    def f(self):\n"
    free = greedy_done(engine, prefix, 64).text
    body = server.post("/infill", {"input_prefix": prefix, "n_predict": 64, "n_indent": 200}).json()
    # Every line after the first is indented less than 200 columns: the completion is at most the first line.
    assert "\n" not in body["content"] and free.startswith(body["content"])
    timed = server.post("/infill", {"input_prefix": prefix, "n_predict": 64, "t_max_predict_ms": 1}).json()
    assert timed["content"].count("\n") <= 1 and timed["stop_type"] in ("limit", "eos", "word")


# --- plugins' own request bodies ------------------------------------------------------------------


def test_llama_vim_bodies(server: HttpServer, engine) -> None:
    extra = [{"text": "def helper(x):\n    return x * 2\n", "time": 1733212345.5, "filename": "util.py"}]
    ring = server.post("/infill", llama_vim_ring_request(extra))
    assert ring.status_code == 200
    r = server.post("/infill", llama_vim_fim_request(PREFIX, MIDDLE, SUFFIX, extra, 4))
    assert r.status_code == 200
    raw = r.content.decode()
    assert re.match(r"^\s*{", raw) and re.search(r'"content"\s*:"', raw)  # llama.vim's own checks
    body = r.json()
    assert list(body) == ["content", "timings/prompt_n", "timings/prompt_ms", "timings/prompt_per_token_ms",
                          "timings/prompt_per_second", "timings/predicted_n", "timings/predicted_ms",
                          "timings/predicted_per_token_ms", "timings/predicted_per_second", "truncated",
                          "tokens_cached"]
    assert body["truncated"] is False and body["timings/predicted_n"] >= 1
    # The ring update filled the cache: the FIM request evaluated only what follows the extra context.
    extra_tokens = len(engine.tokenize("# util.py\n" + extra[0]["text"] + "\n"))
    assert body["timings/prompt_n"] <= len(engine.tokenize(PREFIX + MIDDLE)) + 2 < extra_tokens + 20


def test_llama_vscode_bodies(server: HttpServer, engine) -> None:
    chunks = [{"text": "def helper(x):\n    return x * 2\n", "time": 1733212345000, "filename": "/src/util.py"}]
    warm = server.post("/infill", llama_vscode_request(PREFIX, SUFFIX, chunks, MIDDLE, 4, no_predict=True))
    assert warm.status_code == 200 and warm.json()["content"] == ""
    r = server.post("/infill", llama_vscode_request(PREFIX, SUFFIX, chunks, MIDDLE, 4))
    assert r.status_code == 200
    body = r.json()
    # n_cmpl 3: an array of three results (greedy, so the same text), as llama-server answers.
    assert isinstance(body, list) and [b["index"] for b in body] == [0, 1, 2]
    assert len({b["content"] for b in body}) == 1
    assert server.get("/health").json() == {"status": "ok"}


def test_continue_llama_cpp_body(server: HttpServer, engine) -> None:
    # Continue's autocomplete wraps prefix and suffix in a FIM template, and sends "Bearer undefined"
    # when no API key is configured.
    before = PREFIX + MIDDLE
    prompt = f"<fim_prefix>{before}<fim_suffix>{SUFFIX}<fim_middle>"
    r = server.post("/completion", continue_llama_cpp_request(prompt), headers={"Authorization": "Bearer undefined"})
    assert r.status_code == 200
    text = "".join(e["content"] for e in sse_events(r.content) if not e["stop"])
    assert text == greedy_done(engine, before, 48, code_stops(before, suffix=SUFFIX)).text


# --- OpenAI --------------------------------------------------------------------------------------


def test_openai_client(server: HttpServer, engine, tiny_bundle: Path) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    expected = greedy_done(engine, PROMPT, 10).text
    c = client.completions.create(model=tiny_bundle.name, prompt=PROMPT, max_tokens=10, temperature=0)
    assert c.choices[0].text == expected and c.choices[0].finish_reason == "length"
    assert c.usage.completion_tokens == 10 and c.usage.prompt_tokens == len(engine.tokenize(PROMPT))
    chunks = list(client.completions.create(model=tiny_bundle.name, prompt=PROMPT, max_tokens=10, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"
    assert [m.id for m in client.models.list()] == [tiny_bundle.name]
    # suffix: infill.
    before = PREFIX + MIDDLE
    fill = client.completions.create(model=tiny_bundle.name, prompt=before, suffix=SUFFIX, max_tokens=48)
    assert fill.choices[0].text == greedy_done(engine, before, 48, code_stops(before, suffix=SUFFIX)).text
    # whatever model a client names, the loaded one answers, and says so
    other = client.completions.create(model="gpt-4o", prompt=PROMPT, max_tokens=10, temperature=0)
    assert other.model == tiny_bundle.name and other.choices[0].text == c.choices[0].text


def test_openai_stream_framing(server: HttpServer) -> None:
    r = server.post("/v1/completions", {"prompt": [PROMPT], "max_tokens": 6, "stream": True})
    events = sse_events(r.content)
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert final["object"] == "text_completion" and final["choices"][0]["finish_reason"] == "length"
    assert final["usage"]["completion_tokens"] == 6
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-2])


def test_fim_markers_become_prefix_and_suffix(server: HttpServer) -> None:
    plain = server.post("/v1/completions", {"prompt": PREFIX + MIDDLE, "suffix": SUFFIX, "max_tokens": 48}).json()
    want = plain["choices"][0]["text"]
    for template in ("<PRE> {p} <SUF>{s} <MID>", "<fim_prefix>{p}<fim_suffix>{s}<fim_middle>", "{p}<|FIM|>{s}",
                     "<|fim_prefix|>{p}<|fim_suffix|>{s}<|fim_middle|>", "<SUF>{s}<PRE> {p} <MID>"):
        prompt = template.format(p=PREFIX + MIDDLE, s=SUFFIX)
        got = server.post("/v1/completions", {"prompt": prompt, "max_tokens": 48}).json()
        assert got["choices"][0]["text"] == want, template
        raw = server.post("/completion", {"prompt": prompt, "n_predict": 1}).json()
        assert raw["prompt"] == PREFIX + MIDDLE  # the markers never reach the model


def test_tabby_bodies(server: HttpServer, tiny_bundle: Path) -> None:
    """Tabby's backends (crates/http-api-bindings/src/completion): llama.cpp/completion posts to /completion
    with a 64-bit seed; openai/completion posts to /v1/completions with the prompt and a separate suffix."""
    before = PREFIX + MIDDLE
    want = server.post("/v1/completions", {"prompt": before, "suffix": SUFFIX, "max_tokens": 32}).json()
    llama = server.post("/completion", {"seed": 18446744073709551615 // 3, "prompt": f"{before}<|FIM|>{SUFFIX}",
                                        "n_predict": 32, "temperature": 0.0, "stream": True, "penalty_last_n": 0,
                                        "presence_penalty": 0.0})
    events = sse_events(llama.content)
    assert "".join(e["content"] for e in events) == want["choices"][0]["text"] and events[-1]["stop"] is True
    openai = server.post("/v1/completions", {"model": tiny_bundle.name, "prompt": before, "suffix": SUFFIX,
                                             "max_tokens": 32, "temperature": 0.0, "stream": True,
                                             "presence_penalty": 0.0})
    chunks = sse_events(openai.content)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == want["choices"][0]["text"]
    no_suffix = server.post("/v1/completions", {"model": tiny_bundle.name, "prompt": PROMPT, "suffix": None,
                                                "max_tokens": 4, "temperature": 0.0, "stream": False})
    assert no_suffix.status_code == 200


def test_ollama_generate(server: HttpServer, engine) -> None:
    expected = greedy_done(engine, PROMPT, 8).text
    r = server.post("/api/generate", {"model": "", "prompt": PROMPT, "options": {"num_predict": 8}})
    lines = [json.loads(ln) for ln in r.text.splitlines()]
    assert "".join(ln["response"] for ln in lines) == expected and lines[-1]["done"] is True
    one = server.post("/api/generate", {"prompt": PROMPT, "stream": False, "options": {"num_predict": 8}}).json()
    assert one["response"] == expected and one["eval_count"] == 8
    assert server.get("/api/tags").json()["models"][0]["name"]


# --- bad input -----------------------------------------------------------------------------------

BAD = [
    ("/completion", b"{not json", 400, "not valid JSON"),
    ("/completion", b"[1, 2]", 400, "JSON object"),
    ("/completion", b"\xff\xfe", 400, "not UTF-8"),
    ("/completion", b'{"prompt": "x", "n_predict": -2}', 400, "n_predict"),
    ("/completion", b'{"prompt": "x", "n_predict": 99999999}', 400, "more than any context"),
    ("/completion", b'{"prompt": "x", "n_predict": "12"}', 400, "must be an integer"),
    ("/completion", b'{"prompt": "x", "stream": "yes"}', 400, "true or false"),
    ("/completion", b'{"prompt": "x", "stop": 5}', 400, "stop"),
    ("/completion", b'{"prompt": "x", "temperature": "hot"}', 400, "must be a number"),
    ("/completion", b'{"prompt": "x", "top_p": 7}', 400, "top_p"),
    ("/completion", b'{"prompt": {"a": 1}}', 400, "prompt"),
    ("/completion", b'{"prompt": ["a", "b"]}', 400, "one prompt"),
    ("/completion", b'{"prompt": [999999]}', 400, "outside the vocabulary"),
    ("/infill", b'{"input_prefix": 3}', 400, "input_prefix"),
    ("/infill", b'{"input_extra": [{"filename": "a"}]}', 400, "input_extra[0]"),
    ("/infill", b'{"input_extra": "text"}', 400, "input_extra"),
    ("/v1/completions", b'{"model": ["a"], "prompt": "x"}', 400, '"model" must be a string'),
    ("/completion", b'{"prompt": "x", "id_slot": 9}', 400, "slot"),
    ("/completion", b'{"prompt": "x", "nested": ' + b"[" * 100 + b"]" * 100 + b"}", 400, "levels deep"),
    ("/completion", b"[" * 100_000 + b"]" * 100_000, 400, "levels deep"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": -3}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "n": 2, "stream": true}', 400, "one completion"),
]


@pytest.mark.parametrize(("path", "data", "status", "words"), BAD, ids=[f"{p}:{d[:24]!r}" for p, d, *_ in BAD])
def test_bad_input(server: HttpServer, path: str, data: bytes, status: int, words: str) -> None:
    r = httpx.post(server.url + path, content=data, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["type"] and err["code"] == status


def test_bad_input_size_method_path(server: HttpServer) -> None:
    big = b'{"prompt": "' + b"x" * (9 * 1024 * 1024) + b'"}'
    r = httpx.post(server.url + "/completion", content=big, timeout=60)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = server.get("/infill")
    assert r.status_code == 405 and r.json()["error"]["type"]
    r = server.get("/no/such/endpoint")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert server.get("/health").status_code == 200  # still serving


# --- cancellation ----------------------------------------------------------------------------------

LONG = 800


@pytest.fixture(scope="module")
def long_prompt(server: HttpServer) -> str:
    """A prompt the tiny model continues for LONG tokens without an end of text (greedy is deterministic)."""
    for seed in range(20):
        prompt = f"# {seed}\n" + PROMPT
        body = server.post("/completion", {"prompt": prompt, "n_predict": LONG}).json()
        if body["stop_type"] == "limit" and body["tokens_predicted"] == LONG:
            return prompt
    pytest.skip("the tiny model ends every candidate prompt early")


def _read_until_first_event(url: str, body: dict, out: list, started: threading.Event) -> None:
    with httpx.stream("POST", url, json=body, timeout=120) as r:
        data = b""
        for chunk in r.iter_bytes():
            data += chunk
            started.set()
        out.append(data)


def test_newer_request_cancels_the_running_one(server: HttpServer, long_prompt: str) -> None:
    before = server.metrics()
    out: list[bytes] = []
    started = threading.Event()
    t = threading.Thread(target=_read_until_first_event,
                         args=(server.url + "/completion", {"prompt": long_prompt, "n_predict": LONG, "stream": True},
                               out, started))
    t.start()
    assert started.wait(60)
    newer = server.post("/completion", {"prompt": PROMPT, "n_predict": 4}).json()
    t.join(60)
    assert newer["tokens_predicted"] == 4
    final = sse_events(out[0])[-1]
    assert final["stop"] is True and final["stop_reason"] == "cancelled"
    after = server.metrics()
    evaluated = after["llamacpp:tokens_predicted_total"] - before["llamacpp:tokens_predicted_total"]
    assert final["tokens_predicted"] < LONG // 2 and evaluated == final["tokens_predicted"] + 4
    assert after["mtpcode:requests_cancelled_total"] == before["mtpcode:requests_cancelled_total"] + 1


def test_disconnect_cancels(server: HttpServer, long_prompt: str) -> None:
    for stream in (False, True):
        before = server.metrics()
        with socket.create_connection(server.url.removeprefix("http://").split(":")) as sock:
            body = json.dumps({"prompt": long_prompt, "n_predict": LONG, "stream": stream}).encode()
            sock.sendall(b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            deadline = time.monotonic() + 30
            while not server.metrics()["llamacpp:requests_processing"] and time.monotonic() < deadline:
                time.sleep(0.01)  # hang up once the generation runs
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            after = server.metrics()
            if after["mtpcode:requests_cancelled_total"] > before["mtpcode:requests_cancelled_total"]:
                break
            time.sleep(0.05)
        generated = after["llamacpp:tokens_predicted_total"] - before["llamacpp:tokens_predicted_total"]
        assert after["mtpcode:requests_cancelled_total"] == before["mtpcode:requests_cancelled_total"] + 1
        assert generated < LONG // 2, (stream, generated)
    assert server.get("/health").status_code == 200


# --- the scheduler, in process ---------------------------------------------------------------------


class Gate:
    """A stop condition that holds the worker thread inside a generation step until released."""

    reason = "gate"

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def check(self, text: str) -> int | None:
        self.entered.set()
        assert self.release.wait(60)
        return None

    def holdback(self, text: str) -> int:
        return 0


def test_scheduler_supersedes_and_drops_a_clients_stale_jobs(engine) -> None:
    """A client's next keystroke (its text before the cursor changed near the end) cancels its
    running job and drops its queued one; another client's job is never touched."""
    from mtpcode.scheduler import Job, Outcome, Scheduler

    expected = greedy_done(engine, PROMPT, 50).text
    other_prompt = "import os\n\nclass Other:\n"
    other_expected = greedy_done(engine, other_prompt, 20).text
    sched = Scheduler(engine)
    gate = Gate()
    outcomes: dict[str, Outcome] = {}
    ended = threading.Event()

    def job(name: str, prompt: str, key: str, n: int, stops=()) -> Job:
        def sink(event) -> None:
            if isinstance(event, Outcome):
                outcomes[name] = event
                if len(outcomes) == 4:
                    ended.set()

        return Job(prompt=prompt, options=GenerationOptions(max_tokens=n), stops=stops, key=key, sink=sink)

    a = job("a", PROMPT, PROMPT, 50, stops=[gate])
    sched.submit(a)
    assert gate.entered.wait(60)  # a is running, held in its first step
    sched.submit(job("other", other_prompt, other_prompt, 20))  # another client: waits for the slot
    sched.submit(job("b", PROMPT, PROMPT + "x", 50))  # a's client typed a key: a ends, b waits
    sched.submit(job("c", PROMPT, PROMPT + "xy", 50))  # and another: b is dropped, c waits
    gate.release.set()
    assert ended.wait(120)
    sched.close()
    a_, b, c, other = outcomes["a"], outcomes["b"], outcomes["c"], outcomes["other"]
    assert a_.ran and a_.cancelled == "superseded" and a_.stats.generated_tokens < 50
    assert not b.ran and b.cancelled == "superseded" and b.stats is None
    assert c.ran and c.cancelled is None and c.stop_reason == "max_tokens" and c.text == expected
    assert other.ran and other.cancelled is None and other.text == other_expected
    assert (sched.counters.cancelled, sched.counters.dropped, sched.counters.finished) == (1, 1, 2)


def test_scheduler_survives_a_broken_sink_a_missing_slot_and_stops_a_job_being_started(engine, caplog) -> None:
    """A sink that raises ends its own job only; a slot that does not exist is an error at once
    (not a worker spinning); a job caught in its prepare by its client's next keystroke, or by
    the shutdown, is stopped before it decodes anything."""
    import queue

    from mtpcode.errors import UsageError
    from mtpcode.scheduler import Job, Outcome, Scheduler

    def outcome_of(events: queue.Queue) -> Outcome:
        while True:
            event = events.get(timeout=120)
            if isinstance(event, Outcome):
                return event

    def broken(event: object) -> None:
        raise RuntimeError("Event loop is closed")

    sched = Scheduler(engine)
    sched.submit(Job(prompt=PROMPT, options=GenerationOptions(max_tokens=5), sink=broken))
    after: queue.Queue = queue.Queue()
    sched.submit(Job(prompt=PROMPT, options=GenerationOptions(max_tokens=5), sink=after.put))
    done = outcome_of(after)
    assert done.error is None and done.stop_reason == "max_tokens"
    assert "its events cannot be delivered" in caplog.text

    missing: queue.Queue = queue.Queue()
    sched.submit(Job(prompt=PROMPT, slot=len(engine.slots), sink=missing.put))
    bad = outcome_of(missing)
    assert isinstance(bad.error, UsageError) and not bad.ran

    def held_job(key: str, events: queue.Queue) -> tuple[Job, threading.Event, threading.Event]:
        entered, release = threading.Event(), threading.Event()

        def prepare():
            entered.set()
            assert release.wait(60)
            return PROMPT, (), None

        job = Job(options=GenerationOptions(max_tokens=50), prepare=prepare, key=key, sink=events.put)
        sched.submit(job)
        assert entered.wait(60)  # off the queue, not yet running
        return job, entered, release

    first: queue.Queue = queue.Queue()
    _, _, release = held_job(PROMPT, first)
    sched.submit(Job(prompt=PROMPT, options=GenerationOptions(max_tokens=5), key=PROMPT + "x"))
    release.set()
    superseded = outcome_of(first)
    assert superseded.cancelled == "superseded" and superseded.stats.generated_tokens == 0

    last: queue.Queue = queue.Queue()
    _, _, release = held_job("import os\n", last)
    closing = threading.Thread(target=sched.cancel_all)
    closing.start()
    closing.join(60)
    release.set()
    shut = outcome_of(last)
    assert shut.cancelled == "shutdown" and shut.stats.generated_tokens == 0
    assert sched.close()  # the worker has stopped: the engine may be closed


def test_keystroke_rule() -> None:
    from mtpcode.scheduler import KEYSTROKE_CHARS, keystroke

    file = "".join(f"line {i} = compute({i})\n" for i in range(400))
    at = file.index("line 200")
    before = file[:at]
    assert keystroke(before, before + "x") and keystroke(before + "x", before)  # a key, a backspace
    assert keystroke(before, before + "line 200 = compute(200)\n    ")  # Enter after a line
    window = before.split("\n", 2)[2]  # an editor's window slid down two lines
    assert keystroke(before, window + "y") and keystroke(window, before + "y")
    assert not keystroke(before, file[:at + 2 * KEYSTROKE_CHARS])  # a typist further down the file
    assert not keystroke(before, file[:at // 2])  # ... or further up
    assert not keystroke(before, "import os\n")  # another file
    assert not keystroke("def f1(x):\n", "def f2(x):\n")  # two requests, not one typed over
    assert keystroke([1, 5, 6, 7], [1, 5, 6, 7, 8]) and not keystroke([1, 5, 6, 7], [1, 5, 6, 8])  # token prompts


# --- load -------------------------------------------------------------------------------------------


def test_load_500_requests_8_clients(server: HttpServer) -> None:
    """500 requests from 8 concurrent clients, a quarter abandoned mid-stream: every other one gets a
    complete answer (possibly cut short by a newer request) or a clean error; memory stays flat."""
    rng = random.Random(7)
    outcomes: dict[str, int] = {}

    async def client(worker: int, n: int, http: httpx.AsyncClient) -> None:
        for _ in range(n):
            kind = rng.choice(["infill", "completion", "openai"])
            abandon = rng.random() < 0.25
            stream = abandon or rng.random() < 0.5
            text = PREFIX + "x" * rng.randint(0, 30)
            if kind == "infill":
                path, body = "/infill", {"input_prefix": text, "input_suffix": SUFFIX, "n_predict": 16}
            elif kind == "completion":
                path, body = "/completion", {"prompt": text, "n_predict": 16}
            else:
                path, body = "/v1/completions", {"prompt": text, "max_tokens": 16}
            body["stream"] = stream
            if abandon:
                async with http.stream("POST", path, json=body) as r:
                    async for _ in r.aiter_bytes():
                        break
                outcomes["abandoned"] = outcomes.get("abandoned", 0) + 1
                continue
            r = await http.post(path, json=body)
            assert r.status_code == 200, r.text
            if stream:
                events = sse_events(r.content)
                final = events[-2] if kind == "openai" else events[-1]
            else:
                final = r.json()
            reason = (final["choices"][0]["finish_reason"] if kind == "openai" else final["stop_type"])
            assert reason in ("stop", "length", "eos", "word", "limit")
            outcomes[reason] = outcomes.get(reason, 0) + 1

    async def main(n_requests: int) -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            counts = [n_requests // 8 + (1 if w < n_requests % 8 else 0) for w in range(8)]
            await asyncio.gather(*(client(w, counts[w], http) for w in range(8)))

    asyncio.run(main(80))  # warm up allocators and caches
    failed_before = server.metrics()["mtpcode:requests_failed_total"]
    rss_before = server.rss_kib()
    outcomes.clear()
    asyncio.run(main(500))
    assert sum(outcomes.values()) == 500 and outcomes["abandoned"] > 80
    rss_after = server.rss_kib()
    assert rss_after - rss_before < 40 * 1024, (rss_before, rss_after)
    assert server.get("/health").json() == {"status": "ok"}
    deadline = time.monotonic() + 30  # the last abandoned requests end within a step
    while (m := server.metrics())["llamacpp:requests_processing"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert m["llamacpp:requests_processing"] == 0 and m["llamacpp:requests_deferred"] == 0, m
    assert m["mtpcode:requests_failed_total"] == failed_before, m


# --- a server with a small context and an API key ------------------------------------------------------


def test_api_key_truncation_and_sigint(tiny_bundle: Path) -> None:
    s = HttpServer("--ctx", "128", bundle=tiny_bundle, extra_env={"MTPCODE_API_KEY": "s3cret"})
    try:
        assert s.get("/health").status_code == 200  # public
        r = s.post("/completion", {"prompt": "x", "n_predict": 1})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = s.post("/completion", {"prompt": "x", "n_predict": 1}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert s.get("/v1/models", headers=auth).status_code == 200
        # A prefix far longer than the context: the oldest lines go, the answer says truncated.
        long_prefix = "".join(f"x{i} = {i}\n" for i in range(300))
        body = s.post("/infill", {"input_prefix": long_prefix, "n_predict": 8}, headers=auth).json()
        assert body["truncated"] is True and body["tokens_evaluated"] <= 128 - 8
        assert long_prefix.endswith(body["prompt"]) and body["prompt"].startswith("x")
        plain = s.post("/completion", {"prompt": long_prefix, "n_predict": 8}, headers=auth).json()
        assert plain["truncated"] is True and plain["tokens_evaluated"] <= 128 - 8
        # More tokens than the context holds: generation runs until the context is full, as llama-server's.
        full = s.post("/completion", {"prompt": "x = 1\n", "n_predict": 5000}, headers=auth).json()
        assert full["stop_type"] in ("limit", "eos") and full["tokens_predicted"] + full["tokens_evaluated"] <= 128
        if full["stop_type"] == "limit":
            assert full["truncated"] is True and full["stop_reason"] == "context"
        # Only a line at the cursor longer than the context is refused.
        r = s.post("/infill", {"input_prefix": "y = [" + "1, " * 400, "n_predict": 8}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["type"] == "exceed_context_size_error"
    finally:
        code = s.stop(signal.SIGINT)
    assert code == 0, "".join(s.stderr)


def test_loading_then_port_in_use(tiny_bundle: Path) -> None:
    s = HttpServer("--host", "0.0.0.0", bundle=tiny_bundle, wait_ready=False)
    try:
        assert "reachable from other machines, WITHOUT an API key" in "".join(s.stderr)
        first = httpx.get(s.url + "/health", timeout=10)
        assert first.status_code in (200, 503)
        if first.status_code == 503:
            assert first.json()["error"]["message"] == "Loading model"
        s.wait_ready()
        port = s.url.rsplit(":", 1)[1]
        taken = subprocess.run([sys.executable, "-m", "mtpcode", "serve", "--http", "--host", "0.0.0.0", "--port", port,
                                "-m",
                                str(tiny_bundle)], capture_output=True, text=True, env=env(), timeout=60)
        assert taken.returncode == 2 and "in use" in taken.stderr and "Traceback" not in taken.stderr
    finally:
        assert s.stop() == 0


def test_cli_usage_errors() -> None:
    for args, words in ((["serve"], "--stdio"), (["serve", "--stdio", "--http"], "one transport"),
                        (["serve", "--stdio", "--port", "1"], "goes with --http"),
                        (["serve", "--http", "--port", "70000"], "0..65535")):
        r = subprocess.run([sys.executable, "-m", "mtpcode", *args], capture_output=True, text=True, env=env(),
                           timeout=60)
        assert r.returncode == 2 and words in r.stderr, (args, r.stderr)


# --- the built-in model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def builtin() -> HttpServer:
    s = HttpServer()
    yield s
    assert s.stop() == 0


def test_builtin_model_infill_equals_complete_cursor(builtin: HttpServer, tmp_path: Path) -> None:
    assert builtin.get("/v1/models").json()["data"][0]["id"] == "builtin"
    request = llama_vim_fim_request(PREFIX, MIDDLE, SUFFIX, [], 4) | {"t_max_predict_ms": 0, "n_indent": 0,
                                                                       "n_predict": 48}
    body = builtin.post("/infill", request).json()
    src = tmp_path / "code.py"
    src.write_text(PREFIX + MIDDLE + SUFFIX)
    line = PREFIX.count("\n") + 1
    cli = subprocess.run([sys.executable, "-m", "mtpcode", "complete", str(src), "--cursor",
                          f"{line}:{len(MIDDLE) + 1}", "-n", "48", "--threads", "2"],
                         capture_output=True, text=True, env=env(), timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert body["content"] == cli.stdout


def test_builtin_infill_stops_at_the_suffix(builtin: HttpServer) -> None:
    # Make the suffix's next line exactly what the model would write: the completion must stop before it.
    free = builtin.post("/completion", {"prompt": PREFIX, "n_predict": 64}).json()["content"]
    lines = [ln for ln in free.split("\n") if ln.strip()]
    assert len(lines) >= 2, free
    target = lines[1]
    body = builtin.post("/infill", {"input_prefix": PREFIX, "input_suffix": target + "\nrest\n",
                                    "n_predict": 64}).json()
    assert body["content"] == free[: free.index(target)].rstrip() and body["stop_type"] == "word"
    assert body["stop_reason"] == "suffix"
    # The cursor inside a line that continues: the completion ends with that line.
    mid = builtin.post("/infill", {"input_prefix": PREFIX, "prompt": "    x = (", "input_suffix": ")\n",
                                   "n_predict": 64}).json()
    assert "\n" not in mid["content"]
    # n_indent: no line indented less than the cursor's block.
    free2 = builtin.post("/completion", {"prompt": PREFIX, "n_predict": 64}).json()["content"]
    body = builtin.post("/infill", {"input_prefix": PREFIX, "n_predict": 64, "n_indent": 4}).json()
    assert free2.startswith(body["content"])
    assert all(ln.startswith(("    ", "\t")) or not ln.strip() for ln in body["content"].split("\n")[1:])


def test_builtin_timings_report_drafts_per_source(builtin: HttpServer) -> None:
    """The built-in model loops on `import os` (import sys, import sys, ...): drafts from the context are accepted,
    reported per source in `timings`, and the text is plain greedy decoding's (`complete --heads 0
    --no-context-draft`)."""
    body = builtin.post("/infill", {"input_prefix": "import os\n", "input_suffix": "", "n_predict": 48,
                                    "t_max_predict_ms": 0, "n_indent": 0}).json()
    t = body["timings"]
    assert t["accepted_by_source"]["context"] > 0 and t["tokens_per_forward"] > 1.5
    assert t["draft_n"] == sum(t["drafted_by_source"].values()) >= t["draft_n_accepted"]
    plain = subprocess.run([sys.executable, "-m", "mtpcode", "complete", "-n", "48", "--heads", "0",
                            "--no-context-draft"], input="import os\n", capture_output=True, text=True, env=env(),
                           timeout=120)
    assert plain.returncode == 0, plain.stderr
    assert body["content"] == plain.stdout
