"""``mtpcode serve --stdio``: a long-running JSON-lines completion server for editors.

One JSON object per line on stdin, one per line on stdout (UTF-8). The model
is loaded once; each of its slots (``--parallel``, default 1) keeps the KV
cache of its last prompt, so a request whose prompt starts like an earlier one
only evaluates the new tokens. Requests start in the order they arrive, as
many at once as there are slots; stdin is read while they run, so a later
line can cancel one by its id. The protocol is
documented in docs/cli.md.

Requests::

    {"id": 1, "prompt": "def fib(n):\\n", "max_tokens": 64, "lines": 3}
    {"id": 2, "prefix": "x = [", "suffix": "]\\nprint(x)\\n", "temperature": 0.2}
    {"cancel": 1}

Responses::

    {"id": 1, "text": "    if n"}                 zero or more deltas
    {"id": 1, "done": true, "text": "...", "stop_reason": "lines", "stats": {...}}
    {"id": null, "error": "malformed JSON: ..."}  or {"id": 7, "error": "..."}

Every accepted request ends with exactly one ``done`` or ``error`` message.
"""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import click

from mtpcode import __version__
from mtpcode.cli.frontend import load_engine, silence_stdout, stats_dict
from mtpcode.cli.options import model_option, repeat_stop_option, runtime_options
from mtpcode.config import Settings, load_settings, override_settings
from mtpcode.errors import Interrupted, MtpError, UsageError
from mtpcode.generation import Piece
from mtpcode.models import is_builtin
from mtpcode.scheduler import Event, Job, Outcome, Scheduler, SlotEngine
from mtpcode.stops import code_stops

# Request keys that map onto settings; the others are handled here.
_SETTING_OPTIONS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "heads", "adaptive",
                    "context_draft")
_OTHER_KEYS = ("id", "prompt", "prefix", "suffix", "stop", "lines", "block")


class RequestError(Exception):
    """A request that cannot be run; answered with an error message, the server goes on."""

    def __init__(self, message: str, request_id: Any = None) -> None:
        super().__init__(message)
        self.request_id = request_id


def _valid_id(value: Any) -> bool:
    return (isinstance(value, (str, int)) and not isinstance(value, bool))


def parse_request(obj: Any, settings: Settings) -> StdioJob | tuple[str, Any]:
    """A decoded JSON line -> a scheduler Job (its ``label`` the request id), or ("cancel", target_id).
    RequestError if invalid."""
    if not isinstance(obj, dict):
        raise RequestError(f"a request must be a JSON object, not {type(obj).__name__}")
    request_id = obj.get("id")
    if "cancel" in obj:
        target = obj["cancel"]
        if not _valid_id(target):
            raise RequestError("cancel: give the id (string or integer) of the request to cancel",
                               request_id if _valid_id(request_id) else None)
        return ("cancel", target)
    if not _valid_id(request_id):
        raise RequestError('every request needs an "id" (a string or an integer)')
    unknown = sorted(set(obj) - set(_SETTING_OPTIONS) - set(_OTHER_KEYS))
    if unknown:
        raise RequestError(
            f"unknown field {unknown[0]!r} (known: {', '.join(_OTHER_KEYS + _SETTING_OPTIONS)}, cancel)", request_id
        )
    has_prompt, has_prefix = "prompt" in obj, "prefix" in obj
    if has_prompt == has_prefix:
        raise RequestError('give either "prompt" or "prefix" (with an optional "suffix")', request_id)
    if has_prompt and "suffix" in obj:
        raise RequestError('"suffix" goes with "prefix", not with "prompt"', request_id)
    prompt = obj["prompt"] if has_prompt else obj["prefix"]
    suffix = obj.get("suffix")
    if not isinstance(prompt, str) or (suffix is not None and not isinstance(suffix, str)):
        raise RequestError("prompt, prefix and suffix must be strings", request_id)
    if not prompt:
        raise RequestError("empty prompt: nothing to complete", request_id)
    stop = obj.get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError('"stop" must be a string or a list of strings', request_id)
    lines = obj.get("lines")
    if lines is not None and (not isinstance(lines, int) or isinstance(lines, bool) or lines < 1):
        raise RequestError('"lines" must be an integer >= 1', request_id)
    block = obj.get("block", False)
    if not isinstance(block, bool):
        raise RequestError('"block" must be true or false', request_id)
    try:
        effective = override_settings(settings, "request", **{k: obj[k] for k in _SETTING_OPTIONS if k in obj})
    except UsageError as exc:
        raise RequestError(str(exc), request_id) from None
    options = effective.generation_options(stop=tuple(s for s in stop if s), suffix=suffix or "")
    stops = code_stops(prompt, suffix=suffix, lines=lines, block=block)
    return StdioJob(request_id=request_id, prompt=prompt, options=options, stops=stops)


@dataclass(eq=False)
class StdioJob(Job):
    """A scheduler job for one request line, known to the client by ``request_id``."""

    request_id: Any = None


class Server:
    """Reads requests on the calling thread; the shared scheduler (mtpcode.scheduler) generates
    on its worker thread. Requests run in the order they arrive, as many at once as the engine
    has slots; the client cancels one by its id (a newer request never cancels an older one)."""

    def __init__(self, engine: SlotEngine, settings: Settings, out: IO[bytes], log: IO[str] | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.out = out
        self.log = log
        self.scheduler = Scheduler(engine, supersede=False)
        self._write_lock = threading.Lock()
        self._jobs: dict[Any, StdioJob] = {}  # by request id, until their last message
        self._idle = threading.Condition()
        self.broken = False  # the client stopped reading our output
        self.stopped = False  # the scheduler's worker has ended: the engine may be closed

    # -- output --

    def send(self, message: dict[str, Any]) -> None:
        """Write one JSON line; a client that has gone away marks the server broken."""
        data = json.dumps(message, ensure_ascii=False).encode("utf-8") + b"\n"
        with self._write_lock:
            if self.broken:
                return
            try:
                self.out.write(data)
                self.out.flush()
                return
            except (BrokenPipeError, ValueError):
                self.broken = True
                silence_stdout()  # nothing left in the buffer can fail again at exit
        # (outside the lock: cancelling sends the queued requests' ends, which come back here)
        self.scheduler.cancel_all("disconnected")

    def _on_event(self, job: StdioJob, event: Event) -> None:  # on the worker thread
        if isinstance(event, Piece):
            if event.text:
                self.send({"id": job.request_id, "text": event.text})
        elif isinstance(event, Outcome):
            if event.error is not None:
                exc = event.error
                message = str(exc) if isinstance(exc, MtpError) else f"internal error: {type(exc).__name__}: {exc}"
                self.send({"id": job.request_id, "error": message})
            else:
                reason = "cancelled" if event.cancelled is not None else event.stop_reason
                self.send({"id": job.request_id, "done": True, "text": event.text, "stop_reason": reason,
                           "stats": stats_dict(event.stats) if event.stats is not None else None})
                if self.log is not None and event.stats is not None:
                    print(f"mtpcode: request {job.request_id!r}: {reason}: {event.stats.summary()}", file=self.log,
                          flush=True)
            with self._idle:
                self._jobs.pop(job.request_id, None)
                self._idle.notify_all()

    # -- input --

    def handle_line(self, line: bytes) -> None:
        """Parse one request line and queue, cancel, or answer with an error."""
        if not line.strip():
            return
        try:
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                raise RequestError("request is not UTF-8") from None
            except json.JSONDecodeError as exc:
                raise RequestError(f"malformed JSON: {exc.msg} at column {exc.colno}") from None
            parsed = parse_request(obj, self.settings)
        except RequestError as exc:
            self.send({"id": exc.request_id, "error": str(exc)})
            return
        except RecursionError:
            self.send({"id": None, "error": "request nests arrays and objects too deeply"})
            return
        if isinstance(parsed, StdioJob):
            self._submit(parsed)
        else:
            self._cancel(parsed[1])

    def _submit(self, job: StdioJob) -> None:
        with self._idle:
            duplicate = job.request_id in self._jobs
            if not duplicate:
                self._jobs[job.request_id] = job
        if duplicate:
            self.send({"id": job.request_id, "error": f"request {job.request_id!r} is still running or queued; "
                                                      "use a new id"})
            return
        job.sink = lambda event: self._on_event(job, event)
        self.scheduler.submit(job)

    def _cancel(self, target: Any) -> None:
        job = self._jobs.get(target)
        if job is not None:  # unknown or already finished ids are ignored: the race is normal
            self.scheduler.abandon(job, "cancelled")

    # -- main loop --

    def serve(self, stdin: IO[bytes]) -> None:
        """Answer requests from ``stdin`` until EOF (then finish what is queued) or Ctrl-C."""
        try:
            for line in iter(stdin.readline, b""):
                self.handle_line(line)
                if self.broken:
                    break
            with self._idle:
                while self._jobs and not self.broken:
                    self._idle.wait()
        except KeyboardInterrupt:
            raise Interrupted("interrupted") from None
        finally:
            self.stopped = self.scheduler.close()


@click.command("serve")
@click.option("--stdio", is_flag=True, help="Speak JSON lines on stdin/stdout.")
@click.option("--http", "http", is_flag=True,
              help="Serve llama.cpp server's, OpenAI's and Ollama's completion APIs over HTTP (docs/http.md).")
@click.option("--host", help="--http: address to listen on [default: 127.0.0.1, this machine only].")
@click.option("--port", type=int, help="--http: port to listen on (0 = any free port) [default: 8012].")
@click.option("--api-key", help="--http: require 'Authorization: Bearer KEY' (also MTPCODE_API_KEY, config api_key).")
@click.option("--cancel-previous/--no-cancel-previous", default=True, show_default=True,
              help="--http: a client's next keystroke (a request whose text before the cursor differs from a "
                   "running or queued one's only near its end) cancels that one; off: only a client that "
                   "disconnects cancels its request.")
@click.option("-np", "--parallel", type=int,
              help="Requests served at once, each in a slot with its own KV cache, batched together "
                   "(llama-server's -np) [default: 4 with --http, 1 with --stdio; setting parallel].")
@model_option
@click.option("--heads", type=int, help="Default draft heads per request (0 = no speculation).")
@click.option("--max-tokens", type=int, help="Default max_tokens per request [default: 256].")
@click.option("--temperature", type=float, help="Default temperature per request [default: 0, greedy].")
@repeat_stop_option
@runtime_options
@click.option("-v", "--verbose", is_flag=True, help="Log requests and stats on stderr.")
def serve(stdio: bool, http: bool, host: str | None, port: int | None, api_key: str | None, cancel_previous: bool,
          model: str | None, verbose: bool, **setting_flags: Any) -> None:
    """Serve completions to an editor: over stdin/stdout (--stdio) or HTTP (--http).

    \b
    --stdio, one JSON object per line:
    Request:  {"id": 1, "prompt": "def f(x):\\n", "max_tokens": 64, "lines": 2}
              {"id": 2, "prefix": "...", "suffix": "...", "block": true}
              {"cancel": 1}
    Replies:  {"id": 1, "text": "..."}  (deltas, as they are generated)
              {"id": 1, "done": true, "text": "...", "stop_reason": "...", "stats": {...}}
              {"id": 1, "error": "..."}  ({"id": null, ...} for unreadable lines)

    The first line written is {"id": null, "ready": true, "model": ..., ...}
    once the model is loaded. EOF on stdin finishes the queued requests and
    exits 0. See docs/cli.md for editor examples.

    \b
    --http: llama.cpp server's /infill, /completion, /health, /props, OpenAI's
    /v1/completions and /v1/models, Ollama's /api/generate, on
    http://127.0.0.1:8012 by default, so llama.vim, llama.vscode, Continue and
    Tabby work unchanged. SIGINT/SIGTERM stop it. See docs/http.md.
    """
    if stdio == http:
        raise UsageError("give one transport: --stdio (JSON lines) or --http (llama.cpp/OpenAI HTTP API)")
    if stdio:
        given = [name for name, value in (("--host", host), ("--port", port), ("--api-key", api_key))
                 if value is not None]
        if given or not cancel_previous:
            raise UsageError(f"{(given or ['--no-cancel-previous'])[0]} goes with --http, not --stdio")
    else:
        if port is not None and not 0 <= port <= 65535:
            raise UsageError(f"--port {port}: a port is 0..65535 (0 = any free port)")
        settings = load_settings(model=model, api_key=api_key, **setting_flags)
        _serve_http(settings, model, host=host, port=port, cancel_previous=cancel_previous, verbose=verbose)
        return
    settings = load_settings(model=model, **setting_flags)
    engine, path = load_engine(settings, model, note=sys.stderr, serving=True)
    out = sys.stdout.buffer
    log = sys.stderr if verbose else None
    server: Server | None = None
    try:
        server = Server(engine, settings, out, log)
        server.send({"id": None, "ready": True, "model": str(Path(path)), "builtin": is_builtin(path),
                     "heads": engine.n_heads, "n_ctx": engine.n_ctx, "version": __version__})
        server.serve(sys.stdin.buffer)
    finally:
        if server is None or server.stopped:  # (never under a step still running: the process ends)
            engine.close()


def _serve_http(settings: Settings, model: str | None, *, host: str | None, port: int | None, cancel_previous: bool,
                verbose: bool) -> None:
    """``mtpcode serve --http``: load the model and serve the HTTP API until SIGINT/SIGTERM."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UsageError("serve --http needs Starlette and uvicorn: pip install 'mtpcode[server]'") from None
    from mtpcode.server.run import DEFAULT_HOST, DEFAULT_PORT, serve_http  # (the server's imports: only for --http)

    serve_http(settings, model, host=host or DEFAULT_HOST, port=DEFAULT_PORT if port is None else port,
               api_key=settings.api_key or None, cancel_previous=cancel_previous, verbose=verbose)
