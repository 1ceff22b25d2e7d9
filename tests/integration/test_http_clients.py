"""Several clients on one `mtpcode serve --http` (slots, batching, whose request a keystroke cancels),
over real loopback, against greedy decoding of the same bundle alone."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from runtime_helpers import greedy_done

from mtpcode.generation import GenerationOptions, Piece, SamplingOptions
from mtpcode.runtime import Engine
from tests.http_helpers import HttpServer, sse_events

# Four files' worth of different code: four editors.
PROMPTS = [
    "import os\n\n\ndef list_files(root):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n",
    "def fib(n):\n    if n < 2:\n        return n\n",
    "for line in open('data.txt'):\n    fields = line.split(',')\n",
]


@pytest.fixture(scope="module")
def server(tiny_bundle: Path):
    # --no-repeat-stop: completions run as long as asked, so that a cut is the server's doing
    s = HttpServer("--parallel", "4", "--no-repeat-stop", bundle=tiny_bundle)
    yield s
    assert s.stop(signal.SIGTERM) == 0, "".join(s.stderr)


def _stream_events(url: str, path: str, body: dict[str, Any]) -> list[Any]:
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=120) as r:
        return sse_events(r.read())


def _concurrently(*calls: Any) -> list[Any]:
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_concurrent_requests_run_in_their_own_slots_and_each_is_exact(server: HttpServer, engine) -> None:
    """Four editors at once: four slots, one forward per step carrying all four, and each answer is
    the one its request gets alone (F32 on a CPU: batching changes no token)."""
    alone = [greedy_done(engine, p, 48).text for p in PROMPTS]
    answers = _concurrently(*(lambda p=p: server.post("/completion", {"prompt": p, "n_predict": 48,
                                                                       "model": "PLACEHOLDER"}).json()
                              for p in PROMPTS))
    assert [a["content"] for a in answers] == alone
    assert sorted(a["id_slot"] for a in answers) == [0, 1, 2, 3]
    assert all(a["stop_type"] == "limit" and a["tokens_predicted"] == 48 for a in answers)
    assert all(a["model"] == server.get("/v1/models").json()["data"][0]["id"] for a in answers)
    slots = server.get("/slots").json()
    assert [s["id"] for s in slots] == [0, 1, 2, 3] and all(s["n_cached"] > 0 for s in slots)
    assert not any("prompt" in s for s in slots) and PROMPTS[0] not in json.dumps(slots)


def test_another_clients_keystrokes_never_cut_a_completion(server: HttpServer, engine) -> None:
    """A long completion streams for one editor while another types: a request per key, each
    abandoning the one before (closing its connection, as llama.vim does) or not (as llama.vscode's
    FIM call does not). The first editor's completion runs to its end, unchanged."""
    n = 200
    expected = greedy_done(engine, PROMPTS[0], n).text
    result: dict[str, Any] = {}

    def long() -> None:
        result["events"] = _stream_events(server.url, "/completion", {"prompt": PROMPTS[0], "n_predict": n})

    reader = threading.Thread(target=long)
    reader.start()

    async def typist() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            unaborted = []
            text = PROMPTS[1]
            for i, ch in enumerate("        self.items.append(x)\n"):
                text += ch
                body = {"input_prefix": text, "input_suffix": "\n", "n_predict": 16, "stream": True}
                if i % 2:  # abandon after the first event
                    async with http.stream("POST", "/infill", json=body) as r:
                        async for _ in r.aiter_bytes():
                            break
                else:  # fire and forget: never abort
                    unaborted.append(asyncio.ensure_future(http.post("/infill", json={**body, "stream": False})))
                await asyncio.sleep(0.01)
            answers = [r.json() for r in await asyncio.gather(*unaborted)]
            # each ended: superseded by the same client's next key, or finished (the last)
            assert {a["stop_reason"] for a in answers[:-1]} <= {"cancelled", "max_tokens"}

    asyncio.run(typist())
    reader.join(120)
    *pieces, final = result["events"]
    assert final["stop_reason"] == "max_tokens" and final["tokens_predicted"] == n
    assert "".join(e["content"] for e in pieces) == expected


def test_a_clients_next_keystroke_supersedes_its_request_even_without_an_abort(server: HttpServer) -> None:
    """llama.vscode's FIM requests are never aborted: the same client's next keystroke (its text
    before the cursor, one key longer) ends the stale one, which answers cut short."""
    text = PROMPTS[2]
    first_body = {"input_prefix": text, "input_suffix": "\n", "n_predict": 2000, "stream": True}
    with httpx.Client(base_url=server.url, timeout=120) as http, \
            http.stream("POST", "/infill", json=first_body) as first:
        lines = first.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # it is running
        second = http.post("/infill", json={"input_prefix": text + "    r", "input_suffix": "\n", "n_predict": 8})
        rest = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert second.status_code == 200 and second.json()["stop_reason"] == "max_tokens"
    final = rest[-1]
    assert final["stop"] and final["stop_reason"] == "cancelled" and final["tokens_predicted"] < 2000
    assert server.metrics()["mtpcode:requests_cancelled_total"] >= 1


def test_slot_choice(server: HttpServer) -> None:
    """``id_slot`` picks the slot; without it a client's next request goes back to the slot that
    holds its text (and reuses its cache), and a new text to a free one."""
    body = {"prompt": PROMPTS[3], "n_predict": 4, "id_slot": 2}
    assert server.post("/completion", body).json()["id_slot"] == 2
    again = server.post("/completion", {"prompt": PROMPTS[3] + "    x", "n_predict": 4}).json()
    assert again["id_slot"] == 2 and again["timings"]["cache_n"] >= len(PROMPTS[3]) // 4
    other = server.post("/completion", {"prompt": "# an unrelated file\nx = 1\n", "n_predict": 4}).json()
    assert other["id_slot"] != 2


def test_seeded_sampling_gives_the_same_text_whatever_other_slots_do(server: HttpServer) -> None:
    body = {"prompt": PROMPTS[1], "n_predict": 32, "temperature": 0.9, "top_k": 40, "seed": 1234}
    quiet = server.post("/completion", body).json()["content"]
    busy = _concurrently(lambda: server.post("/completion", body).json()["content"],
                         *(lambda p=p: server.post("/completion", {"prompt": p, "n_predict": 64}) for p in PROMPTS[2:]))
    assert busy[0] == quiet


def test_slots_needs_the_api_key(tiny_bundle: Path) -> None:
    s = HttpServer("--api-key", "sekrit", bundle=tiny_bundle)
    try:
        assert s.get("/slots").status_code == 401
        slots = s.get("/slots", headers={"Authorization": "Bearer sekrit"}).json()
        assert len(slots) == 4 and s.get("/props", headers={"X-Api-Key": "sekrit"}).json()["total_slots"] == 4
    finally:
        s.stop()


def test_engine_steps_slots_together_exactly(tiny_bundle: Path, engine) -> None:
    """The engine alone (no server): four requests stepped together, heads and context drafting on,
    give each request's own greedy text; one step's forward carries every slot's rows."""
    opts = GenerationOptions(max_tokens=40)
    alone = [greedy_done(engine, p, 40).text for p in PROMPTS]
    with Engine(tiny_bundle, n_threads=2, n_seq=4) as multi:
        gens = [multi.start(p, opts, slot=i) for i, p in enumerate(PROMPTS)]
        texts = ["" for _ in PROMPTS]
        steps = 0
        while not all(g.finished for g in gens):
            multi.step([g for g in gens if not g.finished])
            steps += 1
            for i, g in enumerate(gens):
                texts[i] += "".join(e.text for e in g.take_events() if isinstance(e, Piece))
        for g in gens:
            multi.release(g)
    assert texts == alone
    assert steps <= 45  # about one step per token for all four together, not four


def test_a_request_names_a_slot_that_is_busy_waits_for_it(tiny_bundle: Path) -> None:
    """llama-server's rule: a request for a busy slot waits (is never pre-empted), others go on."""
    from mtpcode.scheduler import Job, Outcome, Scheduler

    with Engine(tiny_bundle, n_threads=2, n_seq=2) as multi:
        sched = Scheduler(multi, supersede=False)
        order: list[str] = []
        done = threading.Event()

        def job(name: str, prompt: str, slot: int | None, n: int) -> Job:
            def sink(event: Any) -> None:
                if isinstance(event, Outcome):
                    order.append(name)
                    if len(order) == 3:
                        done.set()
            return Job(prompt=prompt, options=GenerationOptions(max_tokens=n), slot=slot, sink=sink)

        sched.submit(job("long", PROMPTS[0], 0, 300))
        sched.submit(job("waits", PROMPTS[1], 0, 4))  # slot 0 is busy: waits
        sched.submit(job("free", PROMPTS[2], None, 4))  # takes slot 1 at once
        assert done.wait(120)
        sched.close()
    assert order.index("free") < order.index("waits") and order.index("long") < order.index("waits")


@pytest.mark.parametrize("when", ["started", "starting"])
def test_a_keystroke_waits_for_its_clients_slot_rather_than_evict_another(tiny_bundle: Path, when: str) -> None:
    """Client A's keystroke arrives while A's request is still reading its prompt ("started": it
    has its slot) or still being prepared ("starting": no slot yet), and client B's slot is free:
    the keystroke waits for the slot A's request gets and stops (A's own: its prompt cached, a few
    tokens evaluated), leaving B's cached prompt alone."""
    from mtpcode.scheduler import Job, Outcome, Scheduler, Started

    a_text, b_text = PROMPTS[0] * 6, PROMPTS[1] * 6
    with Engine(tiny_bundle, n_threads=2, n_seq=2) as multi:
        sched = Scheduler(multi)
        outcomes: dict[str, Outcome] = {}
        started: dict[str, int] = {}
        ended = {name: threading.Event() for name in ("a0", "b", "a1", "a2")}

        def job(name: str, prompt: str, n: int, on_start: Any = None, prepare: Any = None) -> Job:
            def sink(event: Any) -> None:
                if isinstance(event, Started):
                    started[name] = event.slot
                    if on_start is not None:
                        on_start()
                elif isinstance(event, Outcome):
                    outcomes[name] = event
                    ended[name].set()

            return Job(prompt=prompt, options=GenerationOptions(max_tokens=n), key=prompt, sink=sink,
                       prepare=prepare)

        sched.submit(job("a0", a_text, 2))  # A's slot holds A's text
        assert ended["a0"].wait(120)
        sched.submit(job("b", b_text, 2))  # B's slot holds B's
        assert ended["b"].wait(120)
        # A types a key after a pause (a1), and the next one (a2) before a1's first step: from a1's
        # Started event, or from its prepare, before it has a slot (both on the worker thread)
        a2 = job("a2", a_text + "  ", 4)
        if when == "started":
            a1 = job("a1", a_text + " ", 4, on_start=lambda: sched.submit(a2))
        else:
            def prepare_a1() -> tuple:
                sched.submit(a2)
                return a_text + " ", (), None

            a1 = job("a1", a_text + " ", 4, prepare=prepare_a1)
        sched.submit(a1)
        assert ended["a2"].wait(120) and ended["a1"].wait(120)
        sched.close()
    assert started["a0"] == started["a1"] == started["a2"] != started["b"]
    assert outcomes["a1"].cancelled == "superseded"
    assert outcomes["a2"].stats.prompt_tokens_processed <= 3  # the new spaces (and the last token again)


def test_sampling_options_reach_batched_requests(tiny_bundle: Path) -> None:
    """A seeded sampled request stepped beside greedy ones gives its text alone."""
    opts = GenerationOptions(max_tokens=24, sampling=SamplingOptions(temperature=0.8, seed=7))
    with Engine(tiny_bundle, n_threads=2, n_seq=3) as multi:
        alone = "".join(e.text for e in multi.generate(PROMPTS[0], opts, slot=0) if isinstance(e, Piece))
        gens = [multi.start(PROMPTS[0], opts, slot=0),
                *(multi.start(p, GenerationOptions(max_tokens=40), slot=i) for i, p in enumerate(PROMPTS[1:3], 1))]
        text = ""
        while not all(g.finished for g in gens):
            multi.step([g for g in gens if not g.finished])
            text += "".join(e.text for e in gens[0].take_events() if isinstance(e, Piece))
            for g in gens[1:]:
                g.take_events()
        for g in gens:
            multi.release(g)
    assert text == alone


def test_verbose_log_lines_carry_the_request_id(tiny_bundle: Path) -> None:
    s = HttpServer("-v", bundle=tiny_bundle)
    try:
        s.post("/completion", {"prompt": PROMPTS[0], "n_predict": 4})
        s.post("/completion", {"prompt": PROMPTS[1], "n_predict": 4})
    finally:
        s.stop()
    log = "".join(s.stderr)
    assert "mtpcode: request 1 (127.0.0.1:" in log and "/completion): slot 0" in log
    assert "mtpcode: request 2 (" in log and "mtpcode: request 2: max_tokens: 4 tokens" in log
