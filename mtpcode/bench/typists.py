"""A typing simulation against completion servers: a request per keystroke, each cancelling the last.

``python -m mtpcode.bench.typists --out docs/results/typing-builtin.json``

Lines of a real file are typed one character at a time (the indentation after
Enter comes with the Enter, as an editor's auto-indent does). Every keystroke
sends a streamed completion request for the text before the cursor; when the
next keystroke comes before the answer is complete, the client drops the
request (closes its connection), as llama.vim and llama.vscode do. At the end
of each line the typist pauses until the completion has arrived.

Servers measured, one after the other on the same machine, the same
``main.gguf``, threads and context, flash attention off in both:

* ``mtpcode`` - ``mtpcode serve --http``, OpenAI ``/v1/completions``;
* ``mtpcode-infill`` - the same server's ``/infill`` with the text after the
  cursor (the completion is also bounded by it, so it can end sooner);
* ``llama_cpp.server`` - llama-cpp-python's OpenAI-compatible server (its
  ``server`` extra), ``/v1/completions``, ``interrupt_requests`` on (its default).

Reported per server: time to first content and to the complete answer
(p50/p95, client side), how many requests got content or completed, and the
prompt tokens the server evaluated per request (mtpcode: its /metrics;
llama_cpp.server: its verbose "prefix-match hit, remaining N prompt tokens"
lines).
"""

from __future__ import annotations

import argparse
import asyncio
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
SERVERS = ("mtpcode", "llama_cpp.server", "mtpcode-infill")
DEFAULT_START = "def code_stops("  # the region typed starts at the first line containing this


@dataclass
class Keystroke:
    """One request: what was sent and what came back (times in ms from sending)."""

    index: int
    prompt_chars: int
    pause: bool  # the typist waits for this one (end of a line)
    first_ms: float | None = None
    done_ms: float | None = None
    abandoned: bool = False
    text: str = ""
    prompt_n: int | None = None  # prompt tokens evaluated, when the server says


@dataclass
class RunResult:
    server: str
    endpoint: str
    keystrokes: list[Keystroke] = field(default_factory=list)
    prompt_tokens_evaluated: int | None = None  # server side, all requests together
    requests_counted: int = 0  # requests the server-side count covers
    wall_s: float = 0.0


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
        start = next((i for i, ln in enumerate(lines) if start_marker in ln), None)
        if start is None:
            raise SystemExit(f"{path}: no line contains {start_marker!r}")
        region = lines[start:start + n_lines]
        keys: list[str] = []
        for j, line in enumerate(region):
            body = line.lstrip(" \t")
            indent = line[: len(line) - len(body)]
            if j == 0:
                if indent:
                    keys.append(indent)
            else:
                keys.append("\n" + indent)
            keys.extend(body)
        before = "\n".join(lines[:start]) + "\n"
        after = "\n".join(lines[start + n_lines:])
        return cls(before, [k for k in keys if k], "\n" + after)


# --- one client ----------------------------------------------------------------------------------


async def _request(client: Any, url: str, body: dict[str, Any], ks: Keystroke, openai: bool) -> None:
    t0 = time.perf_counter()
    async with client.stream("POST", url, json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[len("data: "):]
            if payload == "[DONE]":
                break
            obj = json.loads(payload)
            if openai:
                text = obj["choices"][0]["text"] if obj.get("choices") else ""
                final = obj.get("choices") and obj["choices"][0].get("finish_reason") is not None
            else:
                text, final = obj.get("content", ""), obj.get("stop", False)
            if text:
                ks.text += text
                if ks.first_ms is None:
                    ks.first_ms = (time.perf_counter() - t0) * 1000
            if final and isinstance(obj.get("timings"), dict):
                ks.prompt_n = obj["timings"].get("prompt_n")
    ks.done_ms = (time.perf_counter() - t0) * 1000


async def type_through(base_url: str, doc: Typing, *, endpoint: str, interval_s: float, max_tokens: int,
                       pause_timeout_s: float = 30.0) -> list[Keystroke]:
    """Type ``doc`` against the server at ``base_url``: one streamed request per keystroke."""
    import httpx  # an optional dependency (mtpcode[test]): only the typing itself needs it

    openai = endpoint == "/v1/completions"
    typed = ""
    records: list[Keystroke] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=pause_timeout_s) as client:
        for i, key in enumerate(doc.keys):
            typed += key
            line_end = i + 1 == len(doc.keys) or doc.keys[i + 1].startswith("\n")
            text = doc.before + typed
            if openai:
                body: dict[str, Any] = {"prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": True}
            else:
                cut = text.rfind("\n") + 1
                body = {"input_prefix": text[:cut], "prompt": text[cut:], "input_suffix": doc.after,
                        "n_predict": max_tokens, "stream": True}
            ks = Keystroke(index=i, prompt_chars=len(text), pause=line_end)
            records.append(ks)
            task = asyncio.ensure_future(_request(client, endpoint, body, ks, openai))
            wait = pause_timeout_s if line_end else interval_s
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


# --- servers ----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A server subprocess; its stderr is collected."""

    def __init__(self, cmd: list[str], port: int, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.stderr: list[str] = []
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env=env)
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


def run_mtpcode(doc: Typing, bundle: str | None, endpoint: str, args: argparse.Namespace) -> RunResult:
    port = _free_port()
    cmd = [sys.executable, "-m", "mtpcode", "serve", "--http", "--port", str(port), "--threads", str(args.threads),
           "--ctx", str(args.ctx)]
    if bundle:
        cmd += ["-m", bundle]
    server = Server(cmd, port, env={**os.environ, "PYTHONPATH": str(REPO), "MTPCODE_FLASH_ATTN": "false"})
    try:
        server.wait_ready("/health")
        _warm(server.url, doc, endpoint, args)
        before = _mtpcode_metric(server.url, "llamacpp:prompt_tokens_total")
        requests_before = _mtpcode_metric(server.url, "mtpcode:requests_total")
        t0 = time.perf_counter()
        records = asyncio.run(type_through(server.url, doc, endpoint=endpoint, interval_s=args.interval_ms / 1000,
                                           max_tokens=args.max_tokens))
        wall = time.perf_counter() - t0
        evaluated = _mtpcode_metric(server.url, "llamacpp:prompt_tokens_total") - before
        counted = _mtpcode_metric(server.url, "mtpcode:requests_total") - requests_before
    finally:
        server.stop()
    name = "mtpcode" if endpoint == "/v1/completions" else "mtpcode-infill"
    return RunResult(name, endpoint, records, int(evaluated), int(counted), round(wall, 2))


def run_llama_cpp(doc: Typing, main_gguf: str, args: argparse.Namespace) -> RunResult:
    port = _free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", main_gguf, "--port", str(port), "--host",
           "127.0.0.1", "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx",
           str(args.ctx), "--flash_attn", "False", "--verbose", "True", "--interrupt_requests", "True"]
    server = Server(cmd, port)
    try:
        server.wait_ready("/v1/models")
        _warm(server.url, doc, "/v1/completions", args)
        mark = len(server.stderr)
        t0 = time.perf_counter()
        records = asyncio.run(type_through(server.url, doc, endpoint="/v1/completions",
                                           interval_s=args.interval_ms / 1000, max_tokens=args.max_tokens))
        wall = time.perf_counter() - t0
        time.sleep(0.5)
        log = server.stderr[mark:]
    finally:
        server.stop()
    # Each generation prints one of these (verbose): what it evaluated of its prompt.
    evaluated, counted = 0, 0
    for line in log:
        m = re.search(r"prefix-match hit, remaining (\d+) prompt tokens", line)
        if m:
            evaluated += int(m.group(1))
            counted += 1
        elif "full prompt already cached" in line:
            counted += 1
    return RunResult("llama_cpp.server", "/v1/completions", records, evaluated, counted, round(wall, 2))


def _warm(url: str, doc: Typing, endpoint: str, args: argparse.Namespace) -> None:
    """One completed request on the text before the region: both servers start with it cached."""
    import httpx  # an optional dependency (mtpcode[test]): only the typing itself needs it

    if endpoint == "/v1/completions":
        body: dict[str, Any] = {"prompt": doc.before, "max_tokens": args.max_tokens, "temperature": 0}
    else:
        body = {"input_prefix": doc.before, "input_suffix": doc.after, "n_predict": args.max_tokens}
    httpx.post(url + endpoint, json=body, timeout=300).raise_for_status()


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
    out = RunResult(runs[0].server, runs[0].endpoint)
    for r in runs:
        out.keystrokes.extend(r.keystrokes)
        out.prompt_tokens_evaluated = (out.prompt_tokens_evaluated or 0) + (r.prompt_tokens_evaluated or 0)
        out.requests_counted += r.requests_counted
        out.wall_s = round(out.wall_s + r.wall_s, 2)
    return out


def summarize(run: RunResult) -> dict[str, Any]:
    ks = run.keystrokes
    first = [k.first_ms for k in ks if k.first_ms is not None]
    done = [k.done_ms for k in ks if k.done_ms is not None and not k.abandoned]
    paused = [k.done_ms for k in ks if k.pause and k.done_ms is not None and not k.abandoned]
    return {
        "server": run.server, "endpoint": run.endpoint, "requests": len(ks),
        "got_content": len(first), "completed": len(done), "abandoned": sum(k.abandoned for k in ks),
        "first_content_ms_p50": _pct(first, 0.5), "first_content_ms_p95": _pct(first, 0.95),
        "complete_ms_p50": _pct(done, 0.5), "complete_ms_p95": _pct(done, 0.95),
        "line_end_complete_ms_p50": _pct(paused, 0.5), "line_end_complete_ms_p95": _pct(paused, 0.95),
        "prompt_tokens_evaluated_per_request": round(run.prompt_tokens_evaluated / run.requests_counted, 2)
        if run.prompt_tokens_evaluated is not None and run.requests_counted else None,
        "requests_counted_server_side": run.requests_counted,
        "wall_s": run.wall_s,
    }


def table(summaries: list[dict[str, Any]]) -> str:
    head = ("| server | endpoint | requests | got content | completed | first content p50 / p95 (ms) | "
            "complete p50 / p95 (ms) | prompt tokens evaluated per request |")
    rows = [head, "|" + "---|" * 8]
    for s in summaries:
        rows.append(f"| {s['server']} | `{s['endpoint']}` | {s['requests']} | {s['got_content']} | {s['completed']} | "
                    f"{s['first_content_ms_p50']} / {s['first_content_ms_p95']} | "
                    f"{s['complete_ms_p50']} / {s['complete_ms_p95']} | {s['prompt_tokens_evaluated_per_request']} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mtpcode.bench.typists", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="bundle directory (default: the built-in model)")
    p.add_argument("--file", type=Path, default=DEFAULT_FILE, help="the file whose lines are typed")
    p.add_argument("--start", default=DEFAULT_START, help="type from the first line containing this text")
    p.add_argument("--lines", type=int, default=8, help="lines to type")
    p.add_argument("--interval-ms", type=float, default=150.0, help="time between keystrokes")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1,
                   help="llama.cpp threads of every server (1: the built-in model's default, and the steadiest "
                        "on a shared machine)")
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--rounds", type=int, default=2, help="rounds; the order of the servers rotates each round")
    p.add_argument("--out", type=Path, required=True, help="write the results as JSON here")
    args = p.parse_args(argv)
    import llama_cpp  # for its version in the results: the servers load it, this process need not

    bundle = args.model or str(builtin_model_path())
    main_gguf = str(Path(bundle) / "main.gguf")
    doc = Typing.from_file(args.file, args.start, args.lines)
    wanted = args.servers.split(",")
    unknown = [name for name in wanted if name not in SERVERS]
    if unknown:
        p.error(f"--servers: unknown server {unknown[0]!r} (choose from {', '.join(SERVERS)})")
    runs: list[RunResult] = []
    for round_ in range(args.rounds):
        shift = round_ % len(wanted)
        for name in wanted[shift:] + wanted[:shift]:
            print(f"round {round_ + 1}: typing {len(doc.keys)} keystrokes against {name} ...", file=sys.stderr,
                  flush=True)
            if name == "mtpcode":
                runs.append(run_mtpcode(doc, args.model, "/v1/completions", args))
            elif name == "mtpcode-infill":
                runs.append(run_mtpcode(doc, args.model, "/infill", args))
            elif name == "llama_cpp.server":
                runs.append(run_llama_cpp(doc, main_gguf, args))
    summaries = [summarize(merge([r for r in runs if r.server == name])) for name in wanted]
    print(table(summaries))
    try:
        file_label = str(args.file.resolve().relative_to(REPO))
    except ValueError:
        file_label = str(args.file)
    data = {
        "command": "python -m mtpcode.bench.typists " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": cpu_name(), "cpus": os.cpu_count(), "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(), "llama_cpp_python": llama_cpp.__version__,
        "model": "builtin" if args.model is None else args.model, "file": file_label,
        "start": args.start, "lines": args.lines, "keystrokes": len(doc.keys), "interval_ms": args.interval_ms,
        "rounds": args.rounds,
        "max_tokens": args.max_tokens, "threads": args.threads, "ctx": args.ctx, "flash_attn": False,
        "summary": summaries,
        "runs": [{**asdict(r), "round": i // len(wanted) + 1, "keystrokes": [asdict(k) for k in r.keystrokes]}
                 for i, r in enumerate(runs)],
    }
    atomic_write_text(args.out, json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
