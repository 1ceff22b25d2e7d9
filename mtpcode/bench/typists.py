"""A typing simulation against completion servers: a request per keystroke, each cancelling the last.

``python -m mtpcode.bench.typists --out docs/results/typing-builtin.json``

``python -m mtpcode.bench.typists --typists 1,4 --keys 120 --pause-every 10 --out docs/results/typing-typists.json``

Lines of a real file are typed one character at a time (the indentation after
Enter comes with the Enter, as an editor's auto-indent does). Every keystroke
sends a streamed completion request for the text before the cursor; when the
next keystroke comes before the answer is complete, the client drops the
request (closes its connection), as llama.vim and llama.vscode do. At the end
of each line (``--pause-every K``: at every K-th keystroke) the typist pauses
until the completion has arrived.

``--typists N``: N typists at once, each its own client on its own region of
the file (the regions start at 1/N, 2/N, ... of the way to the ``--start``
line, so the last one types where a single typist does), each abandoning only
its own stale requests; typist i starts i/N of an interval after the first, so
that their keystrokes interleave. Every request names the model
``--model-name`` (an arbitrary name, as editor plugins send).

Servers measured, one after the other on the same machine, the same
``main.gguf``, threads and context, flash attention off in both:

* ``mtpcode`` - ``mtpcode serve --http``, OpenAI ``/v1/completions``;
* ``mtpcode-infill`` - the same server's ``/infill`` with the text after the
  cursor (the completion is also bounded by it, so it can end sooner);
* ``llama_cpp.server`` - llama-cpp-python's OpenAI-compatible server (its
  ``server`` extra), ``/v1/completions``, ``interrupt_requests`` on (its default),
  started through ``mtpcode.bench.llama_server`` so that its weights sit in the
  buffers mtpcode's engine uses (on CPUs with AMX it would otherwise crash on a
  quantized model).

* ``mtpcode-baseline`` - ``mtpcode serve --http`` of another checkout of
  mtpcode (``--baseline DIR``, an older commit with its extension built), the
  same way as ``mtpcode`` but naming no model (older servers answered 404 to a
  model name not their own).

Reported per server and number of typists: the pauses answered with a
finished suggestion (its final chunk came with a finish reason, and a
"length" one only with all ``--max-tokens`` tokens when the server counts
them: a request cut short is not an answer) and their latency (p50/p95, from
sending to the last chunk), time to first content and to the complete answer
(p50/p95, client side; the JSON has p90s too), how many requests got content,
completed or were finished, the prompt tokens the server evaluated per keystroke
(mtpcode: its /metrics; llama_cpp.server: its verbose "prefix-match hit,
remaining N prompt tokens" lines), and mtpcode's tokens generated per second of
typing (/metrics).

``--connect URL``: type against a server (or a proxy in front of several) that is already
running instead of starting any; ``--servers`` is then that one entry, named ``--label`` (default
the URL), typed to at ``--endpoint`` (``/infill``, as llama.vim and llama.vscode, or
``/v1/completions``). Its prompt tokens, requests and tokens generated are counted on the
``/metrics`` of ``--metrics URL,...`` (default the URL itself; behind a proxy, the servers behind
it). ``--source ADDR,...``: typist i sends every request (and its warm-up) from source address i
(127.0.0.2, 127.0.0.3, ... on loopback), so that a proxy routing by client address (nginx's
``hash $remote_addr``) keeps each typist on one server:

``python -m mtpcode.bench.typists --connect http://127.0.0.1:8100 --label nginx --metrics
http://127.0.0.1:8101,http://127.0.0.1:8102 --source 127.0.0.2,127.0.0.4,127.0.0.7,127.0.0.3
--typists 4 --keys 120 --pause-every 10 --rounds 1 --out r1-B.json``
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import platform
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mtpcode.bench.measure import cpu_name
from mtpcode.files import atomic_write_text
from mtpcode.models import builtin_model_path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_FILE = REPO / "mtpcode" / "stops.py"
SERVERS = ("mtpcode", "llama_cpp.server", "mtpcode-infill", "mtpcode-baseline")
DEFAULT_SERVERS = ("mtpcode", "llama_cpp.server", "mtpcode-infill")
DEFAULT_START = "def code_stops("  # the region typed starts at the first line containing this
MODEL_NAME = "PLACEHOLDER"  # what every request names as its model (editor plugins send a name of their own)


@dataclass
class Keystroke:
    """One request: what was sent and what came back (times in ms from sending)."""

    index: int
    prompt_chars: int
    pause: bool  # the typist waits for this one (end of a line, or every K-th key)
    first_ms: float | None = None
    done_ms: float | None = None
    abandoned: bool = False
    text: str = ""
    prompt_n: int | None = None  # prompt tokens evaluated, when the server says
    typist: int = 0
    finish_reason: str | None = None  # the final chunk's; None: the stream ended without one
    tokens: int | None = None  # tokens generated, when the server says (OpenAI usage, llama.cpp tokens_predicted)
    status: int | None = None  # the HTTP status of the answer


@dataclass
class RunResult:
    server: str
    endpoint: str
    keystrokes: list[Keystroke] = field(default_factory=list)
    prompt_tokens_evaluated: int | None = None  # server side, all requests together
    requests_counted: int = 0  # requests the server-side count covers
    wall_s: float = 0.0
    typists: int = 1
    model_name: str | None = None  # the model every request named
    tokens_predicted: int | None = None  # server side (/metrics), all requests together
    requests_per_server: dict[str, int] | None = None  # --connect: requests each --metrics server counted
    sources: list[str] | None = None  # the source address of each typist (--source)


def finished(ks: Keystroke, max_tokens: int) -> bool:
    """Whether ``ks`` got a finished suggestion: its stream ended with a finish reason before the
    client gave up on it, and not cut short ("length" with fewer than ``max_tokens`` tokens, where
    the server says how many: a server's cancelled request ends that way)."""
    if ks.abandoned or ks.done_ms is None or ks.finish_reason is None:
        return False
    return not (ks.finish_reason in ("length", "limit") and ks.tokens is not None and ks.tokens < max_tokens)


# --- the document being typed ----------------------------------------------------------------


@dataclass(frozen=True)
class Typing:
    """The file split into what is there before the region, the keystrokes, and what follows."""

    before: str
    keys: list[str]  # each keystroke's inserted text ("\n" + indentation for Enter)
    after: str

    @classmethod
    def from_file(cls, path: Path, start_marker: str, n_lines: int) -> Typing:
        lines = path.read_text(encoding="utf-8").split("\n")
        return cls.at(lines, _marker_line(path, lines, start_marker), n_lines)

    @classmethod
    def at(cls, lines: list[str], start: int, n_lines: int, max_keys: int = 0) -> Typing:
        """The region of ``lines`` from line ``start``: ``n_lines`` lines, or with ``max_keys`` the
        first ``max_keys`` keystrokes from there (as many lines as they take)."""
        keys: list[str] = []
        j = start
        while j < len(lines) and (len(keys) < max_keys if max_keys else j < start + n_lines):
            line = lines[j]
            body = line.lstrip(" \t")
            indent = line[: len(line) - len(body)]
            if j > start:
                keys.append("\n" + indent)
            elif indent:
                keys.append(indent)
            keys.extend(body)
            j += 1
        if max_keys:
            keys = keys[:max_keys]
        # the keys are the region's text character for character: what follows them is the rest
        rest = "\n".join(lines[start:])
        before = "\n".join(lines[:start]) + "\n"
        return cls(before, keys, rest[len("".join(keys)):])

    @classmethod
    def regions(cls, path: Path, start_marker: str, n_lines: int, typists: int, max_keys: int = 0) -> list[Typing]:
        """One region per typist, far apart: typist i (from 0) starts at the first non-blank line from
        (i + 1) / ``typists`` of the way to the line containing ``start_marker`` (the last typist, and a
        single one, type from that line). SystemExit when regions would overlap."""
        lines = path.read_text(encoding="utf-8").split("\n")
        marker = _marker_line(path, lines, start_marker)
        docs: list[Typing] = []
        end = -1  # the line after the previous region
        for i in range(typists):
            start = _code_line(lines, round(marker * (i + 1) / typists))
            if start < end:
                raise SystemExit(f"{path}: {typists} regions of typing overlap; type fewer keys or lines, "
                                 "or start further into the file")
            doc = cls.at(lines, start, n_lines, max_keys)
            docs.append(doc)
            end = start + "".join(doc.keys).count("\n") + 1
        return docs


def _marker_line(path: Path, lines: list[str], marker: str) -> int:
    start = next((i for i, ln in enumerate(lines) if marker in ln), None)
    if start is None:
        raise SystemExit(f"{path}: no line contains {marker!r}")
    return start


def _code_line(lines: list[str], j: int) -> int:
    """The first line at or after ``j`` that is not blank (``j`` when there is none)."""
    return next((k for k in range(j, len(lines)) if lines[k].strip()), j)


def is_pause(keys: list[str], i: int, pause_every: int) -> bool:
    """Whether the typist waits for the answer to keystroke ``i`` (from 0): every ``pause_every``-th
    key, or with 0 at the end of each line (before an Enter, and the last key)."""
    if pause_every:
        return (i + 1) % pause_every == 0
    return i + 1 == len(keys) or keys[i + 1].startswith("\n")


def request_body(text: str, doc: Typing, *, endpoint: str, max_tokens: int, model: str | None) -> dict[str, Any]:
    """The streamed request of a keystroke whose text before the cursor is ``text``."""
    if endpoint == "/v1/completions":
        body: dict[str, Any] = {"prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    else:
        cut = text.rfind("\n") + 1
        body = {"input_prefix": text[:cut], "prompt": text[cut:], "input_suffix": doc.after,
                "n_predict": max_tokens, "stream": True}
    if model is not None:
        body["model"] = model
    return body


# --- one client ----------------------------------------------------------------------------------


async def _request(client: Any, url: str, body: dict[str, Any], ks: Keystroke, openai: bool) -> None:
    t0 = time.perf_counter()
    async with client.stream("POST", url, json=body) as r:
        ks.status = r.status_code
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[len("data: "):]
            if payload == "[DONE]":
                break
            obj = json.loads(payload)
            if openai:
                choice = obj["choices"][0] if obj.get("choices") else {}
                text, reason = choice.get("text") or "", choice.get("finish_reason")
                final = reason is not None
                tokens = obj["usage"].get("completion_tokens") if isinstance(obj.get("usage"), dict) else None
            else:
                text, final = obj.get("content", ""), obj.get("stop", False)
                reason, tokens = obj.get("stop_type"), obj.get("tokens_predicted")
            if text:
                ks.text += text
                if ks.first_ms is None:
                    ks.first_ms = (time.perf_counter() - t0) * 1000
            if final:
                ks.finish_reason, ks.tokens = reason, tokens
                if isinstance(obj.get("timings"), dict):
                    ks.prompt_n = obj["timings"].get("prompt_n")
    ks.done_ms = (time.perf_counter() - t0) * 1000


async def type_through(base_url: str, doc: Typing, *, endpoint: str, interval_s: float, max_tokens: int,
                       pause_timeout_s: float = 30.0, pause_every: int = 0, model: str | None = None,
                       typist: int = 0, delay_s: float = 0.0, source: str | None = None) -> list[Keystroke]:
    """Type ``doc`` against the server at ``base_url`` as one client: one streamed request per
    keystroke, ``interval_s`` apart, each dropped (its connection closed) when the next key comes
    first; at a pause (:func:`is_pause`) it waits up to ``pause_timeout_s`` for the answer. Starts
    after ``delay_s``; sends from the local address ``source`` when given."""
    import httpx  # an optional dependency (mtpcode[test]): only the typing itself needs it

    openai = endpoint == "/v1/completions"
    typed = ""
    records: list[Keystroke] = []
    await asyncio.sleep(delay_s)
    transport = httpx.AsyncHTTPTransport(local_address=source) if source else None
    async with httpx.AsyncClient(base_url=base_url, timeout=pause_timeout_s, transport=transport) as client:
        for i, key in enumerate(doc.keys):
            typed += key
            pause = is_pause(doc.keys, i, pause_every)
            text = doc.before + typed
            body = request_body(text, doc, endpoint=endpoint, max_tokens=max_tokens, model=model)
            ks = Keystroke(index=i, prompt_chars=len(text), pause=pause, typist=typist)
            records.append(ks)
            task = asyncio.ensure_future(_request(client, endpoint, body, ks, openai))
            wait = pause_timeout_s if pause else interval_s
            t0 = time.perf_counter()
            done, _ = await asyncio.wait({task}, timeout=wait)
            if task in done:
                task.result()
                await asyncio.sleep(max(0.0, interval_s - (time.perf_counter() - t0)))
            else:
                ks.abandoned = True
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    return records


async def type_together(base_url: str, docs: list[Typing], *, endpoint: str, interval_s: float, max_tokens: int,
                        pause_every: int = 0, model: str | None = None,
                        sources: list[str] | None = None) -> list[Keystroke]:
    """One client per document, typing at once (typist i starts i/N of an interval after the first,
    from the local address ``sources[i]`` when given); every typist's keystrokes, in typist order."""
    n = len(docs)
    per_typist = await asyncio.gather(*(
        type_through(base_url, doc, endpoint=endpoint, interval_s=interval_s, max_tokens=max_tokens,
                     pause_every=pause_every, model=model, typist=i, delay_s=interval_s * i / n,
                     source=sources[i] if sources else None)
        for i, doc in enumerate(docs)))
    return [ks for records in per_typist for ks in records]


# --- servers ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A server subprocess; its stderr is collected."""

    def __init__(self, cmd: list[str], port: int, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.stderr: list[str] = []
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env=env, cwd=cwd)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def wait_ready(self, path: str, timeout: float = 300) -> None:
        import httpx  # an optional dependency (mtpcode[test]): only the typing itself needs it

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit("server exited:\n" + "".join(self.stderr[-30:]))
            try:
                if httpx.get(self.url + path, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit("server not ready:\n" + "".join(self.stderr[-30:]))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _mtpcode_metric(url: str, name: str) -> float:
    import httpx  # an optional dependency (mtpcode[test]): only the typing itself needs it

    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def _type(url: str, docs: list[Typing], endpoint: str, args: argparse.Namespace, model: str | None) -> list[Keystroke]:
    return asyncio.run(type_together(url, docs, endpoint=endpoint, interval_s=args.interval_ms / 1000,
                                     max_tokens=args.max_tokens, pause_every=args.pause_every, model=model,
                                     sources=args.source))


def run_mtpcode(docs: list[Typing], bundle: str | None, endpoint: str, args: argparse.Namespace, *,
                root: Path = REPO, name: str | None = None, model: str | None = MODEL_NAME) -> RunResult:
    """Type ``docs`` against ``mtpcode serve --http`` of the checkout at ``root`` (its default slots),
    every request naming ``model`` (None: none)."""
    port = free_port()
    cmd = [sys.executable, "-m", "mtpcode", "serve", "--http", "--port", str(port), "--threads", str(args.threads),
           "--ctx", str(args.ctx)]
    if bundle:
        cmd += ["-m", str(Path(bundle).resolve())]
    # in the checkout's folder: ``python -m`` puts the working directory first on the path
    server = Server(cmd, port, env={**os.environ, "PYTHONPATH": str(root), "MTPCODE_FLASH_ATTN": "false"}, cwd=root)
    try:
        server.wait_ready("/health")
        warm(server.url, docs, endpoint=endpoint, max_tokens=args.max_tokens, model=model, sources=args.source)
        before = _mtpcode_metric(server.url, "llamacpp:prompt_tokens_total")
        requests_before = _mtpcode_metric(server.url, "mtpcode:requests_total")
        predicted_before = _mtpcode_metric(server.url, "llamacpp:tokens_predicted_total")
        t0 = time.perf_counter()
        records = _type(server.url, docs, endpoint, args, model)
        wall = time.perf_counter() - t0
        time.sleep(0.5)  # a request dropped at the end has stopped, its count is in
        evaluated = _mtpcode_metric(server.url, "llamacpp:prompt_tokens_total") - before
        counted = _mtpcode_metric(server.url, "mtpcode:requests_total") - requests_before
        predicted = _mtpcode_metric(server.url, "llamacpp:tokens_predicted_total") - predicted_before
    finally:
        server.stop()
    if name is None:
        name = "mtpcode" if endpoint == "/v1/completions" else "mtpcode-infill"
    return RunResult(name, endpoint, records, int(evaluated), int(counted), round(wall, 2), len(docs), model,
                     tokens_predicted=int(predicted), sources=args.source)


def run_llama_cpp(docs: list[Typing], main_gguf: str, args: argparse.Namespace) -> RunResult:
    port = free_port()
    # llama_cpp.server loading its weights as mtpcode does (mtpcode.bench.llama_server)
    cmd = [sys.executable, "-m", "mtpcode.bench.llama_server", "--model", main_gguf, "--port", str(port), "--host",
           "127.0.0.1", "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx",
           str(args.ctx), "--flash_attn", "False", "--verbose", "True", "--interrupt_requests", "True"]
    server = Server(cmd, port)
    try:
        server.wait_ready("/v1/models")
        warm(server.url, docs, endpoint="/v1/completions", max_tokens=args.max_tokens, model=args.model_name,
             sources=args.source)
        mark = len(server.stderr)
        t0 = time.perf_counter()
        records = _type(server.url, docs, "/v1/completions", args, args.model_name)
        wall = time.perf_counter() - t0
        time.sleep(0.5)
        log = server.stderr[mark:]
    finally:
        server.stop()
    evaluated, counted = llama_cpp_evaluated(log)
    return RunResult("llama_cpp.server", "/v1/completions", records, evaluated, counted, round(wall, 2), len(docs),
                     args.model_name, sources=args.source)


COUNTED = ("llamacpp:prompt_tokens_total", "mtpcode:requests_total", "llamacpp:tokens_predicted_total")


def _server_counts(urls: list[str]) -> dict[str, dict[str, float]] | None:
    """The counters of :data:`COUNTED` on the /metrics of each server in ``urls`` (a counter a server
    lacks is left out); None when one of them answers no /metrics."""
    import httpx  # an optional dependency (mtpcode[test]): only the typing itself needs it

    counts: dict[str, dict[str, float]] = {}
    for url in urls:
        try:
            r = httpx.get(url + "/metrics", timeout=10)
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        counts[url] = {}
        for line in r.text.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] in COUNTED:
                counts[url][parts[0]] = float(parts[1])
    return counts


def run_connected(docs: list[Typing], args: argparse.Namespace) -> RunResult:
    """Type ``docs`` against the server (or proxy) already listening at ``--connect``, at ``--endpoint``,
    every request naming ``--model-name``; the server-side counts are those of the ``--metrics`` servers
    (None where one of them has no /metrics or lacks a counter)."""
    url = args.connect
    warm(url, docs, endpoint=args.endpoint, max_tokens=args.max_tokens, model=args.model_name, sources=args.source)
    before = _server_counts(args.metrics)
    t0 = time.perf_counter()
    records = _type(url, docs, args.endpoint, args, args.model_name)
    wall = time.perf_counter() - t0
    time.sleep(0.5)  # a request dropped at the end has stopped, its count is in
    after = _server_counts(args.metrics)
    run = RunResult(args.label or url, args.endpoint, records, wall_s=round(wall, 2), typists=len(docs),
                    model_name=args.model_name, sources=args.source)
    if before is None or after is None:
        return run

    def delta(name: str) -> int | None:
        if not all(name in before[u] and name in after[u] for u in args.metrics):
            return None
        return int(sum(after[u][name] - before[u][name] for u in args.metrics))

    run.prompt_tokens_evaluated = delta("llamacpp:prompt_tokens_total")
    run.requests_counted = delta("mtpcode:requests_total") or 0
    run.tokens_predicted = delta("llamacpp:tokens_predicted_total")
    if run.requests_counted:
        run.requests_per_server = {u: int(after[u]["mtpcode:requests_total"] - before[u]["mtpcode:requests_total"])
                                   for u in args.metrics}
    return run


def llama_cpp_evaluated(log: list[str]) -> tuple[int, int]:
    """Prompt tokens llama_cpp.server evaluated, and the generations that covers, from its verbose
    stderr: each generation prints one of these lines."""
    evaluated, counted = 0, 0
    for line in log:
        m = re.search(r"prefix-match hit, remaining (\d+) prompt tokens", line)
        if m:
            evaluated += int(m.group(1))
            counted += 1
        elif "full prompt already cached" in line:
            counted += 1
    return evaluated, counted


def warm(url: str, docs: list[Typing], *, endpoint: str, max_tokens: int, model: str | None,
         sources: list[str] | None = None) -> None:
    """One completed request per typist on the text before its region, all at once (a server with
    slots takes one per typist), each from its typist's source address when given (behind a proxy
    routing by address: to the server that typist types to): every server starts with them cached
    as far as it can."""
    import httpx  # an optional dependency (mtpcode[test]): only the typing itself needs it

    def one(doc: Typing, source: str | None) -> None:
        if endpoint == "/v1/completions":
            body: dict[str, Any] = {"prompt": doc.before, "max_tokens": max_tokens, "temperature": 0}
        else:
            body = {"input_prefix": doc.before, "input_suffix": doc.after, "n_predict": max_tokens}
        if model is not None:
            body["model"] = model
        transport = httpx.HTTPTransport(local_address=source) if source else None
        with httpx.Client(timeout=300, transport=transport) as client:
            client.post(url + endpoint, json=body).raise_for_status()

    failed: list[BaseException] = []

    def run(doc: Typing, source: str | None) -> None:
        try:
            one(doc, source)
        except BaseException as exc:  # raised in the caller's thread below
            failed.append(exc)

    threads = [threading.Thread(target=run, args=(doc, sources[i] if sources else None))
               for i, doc in enumerate(docs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        raise SystemExit(f"warming the server up failed: {failed[0]}")


# --- report -------------------------------------------------------------------------------------------


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return round(xs[lo] + (xs[hi] - xs[lo]) * (k - lo), 1)


def merge(runs: list[RunResult]) -> RunResult:
    """One server's rounds as one run (keystrokes and server-side counts added up)."""
    out = RunResult(runs[0].server, runs[0].endpoint, typists=runs[0].typists, model_name=runs[0].model_name)
    for r in runs:
        out.keystrokes.extend(r.keystrokes)
        out.prompt_tokens_evaluated = (out.prompt_tokens_evaluated or 0) + (r.prompt_tokens_evaluated or 0)
        out.requests_counted += r.requests_counted
        out.wall_s = round(out.wall_s + r.wall_s, 2)
        if r.tokens_predicted is not None:
            out.tokens_predicted = (out.tokens_predicted or 0) + r.tokens_predicted
        if r.requests_per_server is not None:
            out.requests_per_server = out.requests_per_server or {}
            for url, n in r.requests_per_server.items():
                out.requests_per_server[url] = out.requests_per_server.get(url, 0) + n
    out.sources = runs[0].sources
    return out


def summarize(run: RunResult, max_tokens: int) -> dict[str, Any]:
    """The figures of ``run`` (one server, one number of typists, any rounds merged)."""
    ks = run.keystrokes
    first = [k.first_ms for k in ks if k.first_ms is not None]
    done = [k.done_ms for k in ks if k.done_ms is not None and not k.abandoned]
    pauses = [k for k in ks if k.pause]
    answered = [k for k in pauses if finished(k, max_tokens)]
    ended = [k for k in pauses if k.done_ms is not None and not k.abandoned]  # finished or cut short
    evaluated = run.prompt_tokens_evaluated
    return {
        "server": run.server, "endpoint": run.endpoint, "typists": run.typists, "model_name": run.model_name,
        "requests": len(ks),
        "got_content": len(first), "completed": len(done), "abandoned": sum(k.abandoned for k in ks),
        "http_errors": sum(k.status is not None and k.status != 200 for k in ks),
        "finished": sum(finished(k, max_tokens) for k in ks),
        "pauses": len(pauses), "pauses_finished": len(answered), "pauses_ended": len(ended),
        "pauses_cut_short_tokens": [k.tokens for k in pauses if not finished(k, max_tokens)],
        "pause_ms_p50": _pct([k.done_ms for k in answered if k.done_ms is not None], 0.5),
        "pause_ms_p90": _pct([k.done_ms for k in answered if k.done_ms is not None], 0.9),
        "pause_ms_p95": _pct([k.done_ms for k in answered if k.done_ms is not None], 0.95),
        "pause_end_ms_p50": _pct([k.done_ms for k in ended if k.done_ms is not None], 0.5),
        "pause_end_ms_p95": _pct([k.done_ms for k in ended if k.done_ms is not None], 0.95),
        "first_content_ms_p50": _pct(first, 0.5), "first_content_ms_p90": _pct(first, 0.9),
        "first_content_ms_p95": _pct(first, 0.95),
        "complete_ms_p50": _pct(done, 0.5), "complete_ms_p90": _pct(done, 0.9), "complete_ms_p95": _pct(done, 0.95),
        "prompt_tokens_evaluated_per_keystroke": round(evaluated / len(ks), 2) if evaluated is not None and ks
        else None,
        "prompt_tokens_evaluated_per_request": round(evaluated / run.requests_counted, 2)
        if evaluated is not None and run.requests_counted else None,
        "requests_counted_server_side": run.requests_counted,
        "requests_per_server": run.requests_per_server,
        "tokens_predicted": run.tokens_predicted,
        "tokens_per_s": round(run.tokens_predicted / run.wall_s, 1)
        if run.tokens_predicted is not None and run.wall_s else None,
        "sources": run.sources,
        "wall_s": run.wall_s,
    }


def round_figures(runs: list[RunResult], max_tokens: int) -> dict[str, list[Any]]:
    """The headline figures of each round of one server and number of typists, to show the noise."""
    figures = [summarize(r, max_tokens) for r in runs]
    keys = ("pauses_finished", "pause_ms_p50", "pause_ms_p90", "pause_ms_p95", "pauses_ended", "pause_end_ms_p95",
            "complete_ms_p50", "complete_ms_p90", "prompt_tokens_evaluated_per_keystroke",
            "prompt_tokens_evaluated_per_request", "tokens_per_s")
    return {key: [f[key] for f in figures] for key in keys}


def table(summaries: list[dict[str, Any]]) -> str:
    head = ("| server | typists | pauses finished | pause p50 / p95 (ms) | pauses ended | pause end p50 / p95 (ms) | "
            "requests | finished | first content p50 / p95 (ms) | complete p50 / p95 (ms) | "
            "prompt tokens evaluated per keystroke |")
    rows = [head, "|" + "---|" * 11]
    for s in summaries:
        rows.append(f"| {s['server']} | {s['typists']} | {s['pauses_finished']} / {s['pauses']} | "
                    f"{s['pause_ms_p50']} / {s['pause_ms_p95']} | {s['pauses_ended']} | "
                    f"{s['pause_end_ms_p50']} / {s['pause_end_ms_p95']} | {s['requests']} | {s['finished']} | "
                    f"{s['first_content_ms_p50']} / {s['first_content_ms_p95']} | "
                    f"{s['complete_ms_p50']} / {s['complete_ms_p95']} | {s['prompt_tokens_evaluated_per_keystroke']} |")
    return "\n".join(rows)


def _typists(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"typists must be positive: {text!r}")
    return counts


def _addresses(text: str) -> list[str]:
    addresses = [a.strip() for a in text.split(",")]
    for a in addresses:
        try:
            ipaddress.ip_address(a)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an IP address: {a!r}") from None
    return addresses


def _urls(text: str) -> list[str]:
    urls = [u.strip().rstrip("/") for u in text.split(",")]
    if not all(u.startswith(("http://", "https://")) for u in urls):
        raise argparse.ArgumentTypeError(f"not a list of http:// URLs: {text!r}")
    return urls


def _url(text: str) -> str:
    urls = _urls(text)
    if len(urls) != 1:
        raise argparse.ArgumentTypeError(f"one URL: {text!r}")
    return urls[0]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mtpcode.bench.typists", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--model", help="bundle directory (default: the built-in model)")
    p.add_argument("--file", type=Path, default=DEFAULT_FILE, help="the file whose lines are typed")
    p.add_argument("--start", default=DEFAULT_START, help="type from the first line containing this text")
    p.add_argument("--lines", type=int, default=8, help="lines to type (each typist)")
    p.add_argument("--keys", type=int, default=0, help="keystrokes to type (each typist; as many lines as they take; "
                                                        "0: the --lines lines)")
    p.add_argument("--typists", type=_typists, default=[1],
                   help="typists at once, each its own client on its own region of the file; a comma-separated "
                        "list runs each number in turn (e.g. 1,4)")
    p.add_argument("--pause-every", type=int, default=0,
                   help="pause for the answer at every K-th keystroke (0: at the end of each line)")
    p.add_argument("--interval-ms", type=float, default=150.0, help="time between keystrokes")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--model-name", default=MODEL_NAME, help="the model every request names (any name)")
    p.add_argument("--threads", type=int,
                   help="llama.cpp threads of every server started (default 1: the built-in model's default, and "
                        "the steadiest on a shared machine)")
    p.add_argument("--ctx", type=int, help="context of every server started (default 4096)")
    p.add_argument("--servers", help=f"from {', '.join(SERVERS)} (default {','.join(DEFAULT_SERVERS)})")
    p.add_argument("--connect", type=_url, metavar="URL",
                   help="type against this server (or proxy), already running, instead of starting servers")
    p.add_argument("--label", help="--connect: the server's name in the results (default: the URL)")
    p.add_argument("--endpoint", choices=("/infill", "/v1/completions"),
                   help="--connect: the endpoint typed to (default /infill)")
    p.add_argument("--metrics", type=_urls, metavar="URL[,URL...]",
                   help="--connect: the servers whose /metrics count prompt tokens, requests and tokens "
                        "generated (default: the --connect URL; behind a proxy, the servers behind it)")
    p.add_argument("--source", type=_addresses, metavar="ADDR[,ADDR...]",
                   help="typist i sends from local address i (e.g. 127.0.0.2,127.0.0.3: a proxy routing by "
                        "client address keeps each typist on one server); as many as the most typists")
    p.add_argument("--baseline", type=Path,
                   help="mtpcode-baseline: a checkout of another mtpcode commit (its extension built) to serve")
    p.add_argument("--rounds", type=int, default=2, help="rounds; the order of the servers rotates each round")
    p.add_argument("--out", type=Path, required=True, help="write the results as JSON here")
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.connect:
        given = [opt for opt, value in (("--servers", args.servers), ("--baseline", args.baseline),
                                        ("--threads", args.threads), ("--ctx", args.ctx), ("--model", args.model))
                 if value is not None]
        if given:
            p.error(f"{given[0]} is for the servers the bench starts; --connect starts none")
        args.endpoint = args.endpoint or "/infill"
        args.metrics = args.metrics or [args.connect]
        wanted = [args.label or args.connect]
    else:
        given = [opt for opt, value in (("--label", args.label), ("--endpoint", args.endpoint),
                                        ("--metrics", args.metrics)) if value is not None]
        if given:
            p.error(f"{given[0]} goes with --connect")
        args.threads = 1 if args.threads is None else args.threads
        args.ctx = 4096 if args.ctx is None else args.ctx
        wanted = (args.servers or ",".join(DEFAULT_SERVERS)).split(",")
        unknown = [name for name in wanted if name not in SERVERS]
        if unknown:
            p.error(f"--servers: unknown server {unknown[0]!r} (choose from {', '.join(SERVERS)})")
        if "mtpcode-baseline" in wanted and args.baseline is None:
            p.error("--servers mtpcode-baseline needs --baseline DIR")
    if args.pause_every < 0 or args.keys < 0:
        p.error("--pause-every and --keys must not be negative")
    if args.source is not None and len(args.source) < max(args.typists):
        p.error(f"--source: {len(args.source)} address(es) for {max(args.typists)} typists")
    try:  # for its version in the results: the servers load it, this process need not
        import llama_cpp

        llama_cpp_version: str | None = llama_cpp.__version__
    except ImportError:
        if not args.connect:
            raise
        llama_cpp_version = None  # the servers connected to may run elsewhere

    main_gguf = "" if args.connect else str(Path(args.model or str(builtin_model_path())) / "main.gguf")
    layouts = {n: Typing.regions(args.file, args.start, args.lines, n, args.keys) for n in args.typists}
    runs: list[RunResult] = []
    for round_ in range(args.rounds):
        shift = round_ % len(wanted)
        for n, docs in layouts.items():
            for name in wanted[shift:] + wanted[:shift]:
                print(f"round {round_ + 1}: {n} typist(s), {sum(len(d.keys) for d in docs)} keystrokes, "
                      f"against {name} ...", file=sys.stderr, flush=True)
                if args.connect:
                    runs.append(run_connected(docs, args))
                elif name == "mtpcode":
                    runs.append(run_mtpcode(docs, args.model, "/v1/completions", args, model=args.model_name))
                elif name == "mtpcode-infill":
                    runs.append(run_mtpcode(docs, args.model, "/infill", args, model=args.model_name))
                elif name == "mtpcode-baseline":  # (a commit before this round answered 404 to a name not its own)
                    runs.append(run_mtpcode(docs, args.model, "/v1/completions", args, root=args.baseline,
                                            name="mtpcode-baseline", model=None))
                elif name == "llama_cpp.server":
                    runs.append(run_llama_cpp(docs, main_gguf, args))
    summaries = []
    for n in args.typists:
        for name in wanted:
            mine = [r for r in runs if r.server == name and r.typists == n]
            summaries.append({**summarize(merge(mine), args.max_tokens),
                              "per_round": round_figures(mine, args.max_tokens)})
    print(table(summaries))
    data = {
        "command": "python -m mtpcode.bench.typists " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": cpu_name(), "cpus": os.cpu_count(), "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(), "llama_cpp_python": llama_cpp_version,
        "model": None if args.connect else "builtin" if args.model is None else args.model, "file": _label(args.file),
        "start": args.start, "lines": args.lines, "keys": args.keys, "interval_ms": args.interval_ms,
        "pause_every": args.pause_every, "model_name": args.model_name, "rounds": args.rounds,
        "typists": args.typists,
        "regions": {str(n): [{"first_line": doc.before.count("\n") + 1, "keystrokes": len(doc.keys),
                              "prompt_chars": len(doc.before)} for doc in docs] for n, docs in layouts.items()},
        "baseline": _describe_checkout(args.baseline) if "mtpcode-baseline" in wanted else None,
        "connect": args.connect, "endpoint": args.endpoint, "metrics": args.metrics, "source": args.source,
        "max_tokens": args.max_tokens, "threads": args.threads, "ctx": args.ctx,
        "flash_attn": None if args.connect else False,  # --connect: the servers' own settings
        "summary": summaries,
        "runs": [{**asdict(r), "round": i // (len(wanted) * len(layouts)) + 1,
                  "keystrokes": [asdict(k) for k in r.keystrokes]} for i, r in enumerate(runs)],
    }
    atomic_write_text(args.out, json.dumps(data, indent=1) + "\n")


def _label(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _describe_checkout(root: Path) -> dict[str, str]:
    """The commit of a checkout (``git describe``-like: its hash and subject), for the results."""
    proc = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    return {"commit": proc.stdout.strip() if proc.returncode == 0 else "unknown"}


if __name__ == "__main__":
    main()
