"""The HTTP endpoints: llama.cpp server's (/infill, /completion, /health, /props), OpenAI's
(/v1/completions, /v1/models) and Ollama's (/api/generate, /api/tags, /api/show).

A Starlette application; :func:`mtpcode.server.run.serve_http` runs it under
uvicorn. Generation happens on the scheduler's worker thread; the endpoints
only parse, build the prompt, and relay what the worker produces, watching
for the client to go away (which cancels its job).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from mtpcode import __version__
from mtpcode.config import Settings, override_settings
from mtpcode.errors import ContextOverflowError, DataError, MtpError, UsageError
from mtpcode.generation import GenerationOptions, Piece, StopCondition
from mtpcode.server.infill import (
    Chunk,
    IndentLimit,
    PromptTooLong,
    TimeLimit,
    WordStop,
    build_infill_prompt,
    has_markers,
    split_fim,
    strip_markers,
    truncate_tokens,
)
from mtpcode.server.protocol import (
    SSE_DONE,
    ApiError,
    Params,
    Result,
    bad_request,
    dumps,
    get_bool,
    get_str,
    llama_final,
    llama_partial,
    openai_final,
    openai_partial,
    parse_params,
    sse,
    stop_type,
    timings,
)
from mtpcode.server.scheduler import Job, Outcome, Scheduler, Started
from mtpcode.stops import code_stops

DEFAULT_MAX_BODY = 8 * 1024 * 1024  # bytes: far more than editors send (llama.vim's ring is ~64 KiB)
PUBLIC_PATHS = frozenset({"/health", "/v1/health"})


@dataclass
class ServerState:
    """What the endpoints share. ``engine`` and ``scheduler`` are None while the model loads."""

    settings: Settings
    model_id: str
    model_path: Path
    model_names: frozenset[str]  # names accepted in a request's "model" field
    api_key: str | None = None
    max_body: int = DEFAULT_MAX_BODY
    cancel_previous: bool = True
    engine: Any = None
    scheduler: Scheduler | None = None
    started: float = field(default_factory=time.time)

    @property
    def n_ctx(self) -> int:
        return int(self.engine.n_ctx) if self.engine is not None else self.settings.ctx


# --- responses ------------------------------------------------------------------------------


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json; charset=utf-8")


def error_response(err: ApiError) -> Response:
    return json_response(err.body(), err.status)


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


# --- requests -------------------------------------------------------------------------------


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object: 413 past ``limit`` bytes, 400 if not a JSON object."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body is {length} bytes, more than the limit of {limit}")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(413, f"request body is more than the limit of {limit} bytes")
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


def ready(state: ServerState) -> Scheduler:
    """The scheduler, or 503 while the model is still loading."""
    if state.scheduler is None:
        raise ApiError(503, "Loading model", "unavailable_error")
    return state.scheduler


def check_model(state: ServerState, body: dict[str, Any]) -> None:
    name = body.get("model")
    if name is None or name == "":
        return
    if not isinstance(name, str):
        raise bad_request('"model" must be a string')
    if name not in state.model_names:
        raise ApiError(404, f"model {name!r} not found: this server runs {state.model_id!r} (see GET /v1/models)",
                       "not_found_error")


@dataclass
class Spec:
    """A parsed request: everything but what needs the engine's tokenizer (see :class:`Plan`)."""

    params: Params
    options: GenerationOptions
    settings_json: dict[str, Any]
    infill: bool  # complete at a cursor (before, suffix, chunks) rather than continue ``prompt``
    prompt: str | list[int] = ""
    before: str = ""
    suffix: str = ""
    chunks: list[Chunk] = field(default_factory=list)


@dataclass
class Plan:
    """A request turned into what the engine runs (built on the worker thread)."""

    prompt: str | list[int]
    prompt_text: str  # the prompt as text, for the response's "prompt" field
    n_prompt: int
    stops: list[StopCondition]
    word: WordStop
    truncated: bool


def _budget(state: ServerState, params: Params) -> int:
    """Prompt tokens allowed: the context less room for the completion (at most a quarter of it)."""
    return state.n_ctx - max(1, min(params.n_predict, state.n_ctx // 4))


def _options(state: ServerState, params: Params) -> tuple[GenerationOptions, dict[str, Any]]:
    try:
        effective = override_settings(state.settings, "request", **params.sampling)
    except UsageError as exc:
        raise bad_request(str(exc)) from None
    options = effective.generation_options(max_tokens=params.n_predict, stop=())
    s = options.sampling
    settings_json = {
        "n_predict": params.n_predict_requested, "seed": -1 if s.seed is None else s.seed,
        "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "min_p": s.min_p,
        "stop": params.stop, "max_tokens": params.n_predict_requested, "n_indent": params.n_indent,
        "t_max_predict_ms": params.t_max_predict_ms, "stream": params.stream, "n_ctx": state.n_ctx,
        "speculative.n_max": state.engine.n_heads if options.heads is None else options.heads,
        "samplers": ["top_k", "top_p", "min_p", "temperature"] if not s.greedy else [],
    }
    return options, settings_json


def _extra_stops(params: Params) -> tuple[WordStop, list[StopCondition]]:
    word = WordStop(params.stop)
    stops: list[StopCondition] = [word]
    if params.n_indent > 0:
        stops.append(IndentLimit(params.n_indent))
    if params.t_max_predict_ms > 0:
        stops.append(TimeLimit(params.t_max_predict_ms))
    return word, stops


def build_plan(state: ServerState, spec: Spec) -> Plan:
    """Tokenize and fit ``spec`` into the context (uses the engine: worker thread only)."""
    return _plan_infill(state, spec) if spec.infill else _plan_plain(state, spec)


def _plan_infill(state: ServerState, spec: Spec) -> Plan:
    """Prompt and stops for a completion at the cursor: ``before`` it, ``suffix`` after it."""
    engine = state.engine

    def count(text: str) -> int:
        return len(engine.tokenize(text))

    try:
        built = build_infill_prompt(spec.before, spec.chunks, count, _budget(state, spec.params))
    except PromptTooLong as exc:
        raise ApiError(400, f"{exc}: shorten the line or start the server with a larger --ctx",
                       "exceed_context_size_error", n_ctx=state.n_ctx) from None
    ids = engine.tokenize(built.text)
    word, stops = _extra_stops(spec.params)
    stops.extend(code_stops(built.before_cursor, suffix=strip_markers(spec.suffix)))
    return Plan(prompt=ids, prompt_text=built.text, n_prompt=len(ids), stops=stops, word=word,
                truncated=built.truncated)


def _plan_plain(state: ServerState, spec: Spec) -> Plan:
    """Prompt and stops for a plain continuation of ``prompt`` (text, or token ids)."""
    engine = state.engine
    prompt = spec.prompt
    if isinstance(prompt, str):
        ids = engine.tokenize(prompt)
        keep_first = 1
    else:
        ids = list(prompt)
        keep_first = 0
        bad = [t for t in ids if not 0 <= t < engine.n_vocab]
        if bad:
            raise bad_request(f"prompt token {bad[0]} is outside the vocabulary (0..{engine.n_vocab - 1})")
    ids, truncated = truncate_tokens(ids, _budget(state, spec.params), keep_first=keep_first)
    if not ids:
        raise bad_request("the prompt is empty")
    text = engine.detokenize(ids) if truncated or not isinstance(prompt, str) else prompt
    word, stops = _extra_stops(spec.params)
    return Plan(prompt=ids, prompt_text=text, n_prompt=len(ids), stops=stops, word=word, truncated=truncated)


def parse_chunks(body: dict[str, Any]) -> list[Chunk]:
    """``input_extra``: an array of {"filename": string, "text": string}."""
    raw = body.get("input_extra")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise bad_request('"input_extra" must be an array of {"filename": string, "text": string} objects')
    chunks = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise bad_request(f'input_extra[{i}] must be an object with a string "text" field')
        filename = item.get("filename", "")
        if not isinstance(filename, str):
            raise bad_request(f'input_extra[{i}]: "filename" must be a string')
        chunks.append(Chunk(filename, item["text"]))
    return chunks


def parse_prompt(body: dict[str, Any], name: str = "prompt", *, tokens: bool = True) -> str | list[int]:
    """A prompt: a string, an array of one string, or (with ``tokens``) an array of token ids."""
    v = body.get(name)
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        if len(v) == 1 and isinstance(v[0], str):
            return v[0]
        if tokens and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            return list(v)
        if v and all(isinstance(t, str) for t in v):
            raise bad_request(f'"{name}": one prompt per request, not {len(v)}')
    raise bad_request(f'"{name}" must be a string, an array of one string'
                      + (" or an array of token ids" if tokens else ""))


def parse_request(state: ServerState, body: dict[str, Any], kind: str) -> Spec:
    """Parse ``body`` for endpoint ``kind`` ("infill", "completion", "openai", "ollama")."""
    check_model(state, body)
    if kind == "ollama":
        options = body.get("options")
        body = {**(options if isinstance(options, dict) else {}), **body}
        if "num_predict" in body:
            body["n_predict"] = body["num_predict"]
        body["stream"] = get_bool(body, "stream", True)
    params = parse_params(body, state.n_ctx, state.settings.max_tokens, openai=(kind == "openai"))
    if params.stream and params.n_cmpl > 1:
        raise bad_request("streaming gives one completion: ask for n_cmpl (or n) 1")
    gen, settings_json = _options(state, params)
    spec = Spec(params=params, options=gen, settings_json=settings_json, infill=False)
    if kind == "infill":
        prefix, suffix, middle = get_str(body, "input_prefix"), get_str(body, "input_suffix"), get_str(body, "prompt")
        return replace(spec, infill=True, before=prefix + middle, suffix=suffix, chunks=parse_chunks(body))
    prompt = parse_prompt(body, tokens=(kind != "ollama"))
    suffix = get_str(body, "suffix") if kind in ("openai", "ollama") else ""
    if isinstance(prompt, str):
        if suffix:
            return replace(spec, infill=True, before=prompt, suffix=suffix)
        split = split_fim(prompt) if has_markers(prompt) else None
        if split is not None:
            chunks = [Chunk("", split.context)] if split.context.strip() else []
            return replace(spec, infill=True, before=split.prefix, suffix=split.suffix, chunks=chunks)
        prompt = strip_markers(prompt)
    return replace(spec, prompt=prompt)


# --- running ----------------------------------------------------------------------------------


def make_job(state: ServerState, spec: Spec, *, pieces: bool, seed_offset: int = 0) -> Job:
    options = spec.options
    if spec.infill and spec.suffix:  # the text after the cursor: a source of context drafts, never generated from
        options = replace(options, suffix=strip_markers(spec.suffix))
    if seed_offset and options.sampling.seed is not None:
        options = replace(options, sampling=replace(options.sampling, seed=options.sampling.seed + seed_offset))

    def prepare() -> tuple[list[int] | str, list[StopCondition], Plan]:
        plan = build_plan(state, spec)
        return plan.prompt, plan.stops, plan

    job = Job(prompt="", options=options, prepare=prepare, supersedes=spec.params.n_predict > 0, pieces=pieces)
    job.bind(asyncio.get_running_loop())
    return job


def outcome_error(outcome: Outcome) -> ApiError | None:
    """The ApiError for a failed job (None if it did not fail)."""
    exc = outcome.error
    if exc is None:
        return None
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return ApiError(400, str(exc), "exceed_context_size_error")
    if isinstance(exc, (DataError, UsageError)):
        return ApiError(400, str(exc))
    return ApiError(500, str(exc), "server_error")


def to_result(plan: Plan | None, outcome: Outcome, index: int = 0) -> Result:
    reason = "cancelled" if outcome.cancelled is not None else (outcome.stop_reason or "limit")
    if plan is None:  # dropped before its turn came
        return Result(content="", reason=reason, stats=None, prompt="", n_prompt=0, index=index)
    return Result(content=outcome.text, reason=reason, stats=outcome.stats, prompt=plan.prompt_text,
                  n_prompt=plan.n_prompt, stopping_word=plan.word.matched if reason == "word" else "",
                  truncated=plan.truncated, index=index)


async def next_event(request: Request, scheduler: Scheduler, job: Job) -> Piece | Outcome | Started | None:
    """The job's next event; None if the client disconnected first (the job is then cancelled)."""
    assert job.events is not None
    get = asyncio.ensure_future(job.events.get())
    watch = asyncio.ensure_future(wait_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        scheduler.abandon(job)
        return None
    finally:
        watch.cancel()


async def run_once(request: Request, scheduler: Scheduler, job: Job) -> Outcome | None:
    """Submit ``job`` and wait for its Outcome; None if the client disconnected (the job is cancelled)."""
    scheduler.submit(job)
    while True:
        item = await next_event(request, scheduler, job)
        if item is None or isinstance(item, Outcome):
            return item


async def run_all(request: Request, state: ServerState, spec: Spec) -> list[Result] | None:
    """Run ``spec`` ``n_cmpl`` times (once when greedy: the answers would be the same)."""
    scheduler = ready(state)
    n = spec.params.n_cmpl
    runs = 1 if spec.options.sampling.greedy else n
    results: list[Result] = []
    for i in range(runs):
        job = make_job(state, spec, pieces=False, seed_offset=i)
        outcome = await run_once(request, scheduler, job)
        if outcome is None:
            return None
        err = outcome_error(outcome)
        if err is not None:
            raise err
        results.append(to_result(job.plan, outcome, index=i))
    while len(results) < n:
        results.append(replace(results[0], index=len(results)))
    return results


async def stream_job(request: Request, state: ServerState, spec: Spec,
                     render_piece: Callable[[Piece, int, Plan], bytes],
                     render_end: Callable[[Result], list[bytes]]) -> Any:
    """Run ``spec`` once, streaming each piece and then the end through the renderers.

    The response starts once the job's turn has come and its prompt was built,
    so that a request that cannot run still gets its 4xx status.
    """
    scheduler = ready(state)
    job = make_job(state, spec, pieces=True)
    scheduler.submit(job)
    first = await next_event(request, scheduler, job)
    if first is None:
        return Response(status_code=204)
    if isinstance(first, Outcome):
        err = outcome_error(first)
        if err is not None:
            raise err

    async def chunks() -> AsyncIterator[bytes]:
        assert job.events is not None
        item = first
        n_decoded = 0
        while True:
            if isinstance(item, Piece):
                n_decoded += len(item.token_ids)
                yield render_piece(item, n_decoded, job.plan)
            elif isinstance(item, Outcome):
                err = outcome_error(item)
                if err is not None:
                    yield sse(err.body())
                    return
                for chunk in render_end(to_result(job.plan, item)):
                    yield chunk
                return
            item = await job.events.get()

    return EventStream(chunks(), lambda: scheduler.abandon(job))


# --- endpoints ---------------------------------------------------------------------------------

def endpoints(state: ServerState) -> list[Route]:
    """The routes of the server, bound to ``state``."""

    async def health(request: Request) -> Response:
        if state.scheduler is None:
            return error_response(ApiError(503, "Loading model", "unavailable_error"))
        return json_response({"status": "ok"})

    async def llama_endpoint(request: Request, kind: str) -> Any:
        body = await read_json(request, state.max_body)
        ready(state)
        spec = parse_request(state, body, kind)
        fields = spec.params.response_fields
        if spec.params.stream:
            return await stream_job(
                request, state, spec,
                lambda piece, n, plan: sse(llama_partial(piece.text, n, plan.n_prompt)),
                lambda r: [sse(llama_final(r, state.model_id, spec.settings_json, stream=True, n_ctx=state.n_ctx))],
            )
        results = await run_all(request, state, spec)
        if results is None:
            return Response(status_code=204)
        out = [llama_final(r, state.model_id, spec.settings_json, stream=False, n_ctx=state.n_ctx,
                           response_fields=fields) for r in results]
        return json_response(out[0] if len(out) == 1 else out)

    async def infill(request: Request) -> Any:
        return await llama_endpoint(request, "infill")

    async def completion(request: Request) -> Any:
        return await llama_endpoint(request, "completion")

    async def openai_completions(request: Request) -> Any:
        body = await read_json(request, state.max_body)
        ready(state)
        spec = parse_request(state, body, "openai")
        cmpl_id = "cmpl-" + uuid.uuid4().hex
        if spec.params.stream:
            return await stream_job(
                request, state, spec,
                lambda piece, n, plan: sse(openai_partial(piece.text, state.model_id, cmpl_id)),
                lambda r: [sse(openai_final([r], state.model_id, cmpl_id, stream=True)), SSE_DONE],
            )
        results = await run_all(request, state, spec)
        if results is None:
            return Response(status_code=204)
        return json_response(openai_final(results, state.model_id, cmpl_id, stream=False))

    async def ollama_generate(request: Request) -> Any:
        body = await read_json(request, state.max_body)
        ready(state)
        spec = parse_request(state, body, "ollama")

        def line(obj: dict[str, Any]) -> bytes:
            return dumps(obj) + b"\n"

        def head() -> dict[str, Any]:
            return {"model": state.model_id, "created_at": _rfc3339(time.time())}

        def end(r: Result) -> dict[str, Any]:
            stats = r.stats
            t = timings(stats)
            return {**head(), "response": "" if spec.params.stream else r.content, "done": True,
                    "done_reason": "stop" if stop_type(r.reason) in ("eos", "word") else "length",
                    "total_duration": int((t["prompt_ms"] + t["predicted_ms"]) * 1e6), "load_duration": 0,
                    "prompt_eval_count": r.n_prompt, "prompt_eval_duration": int(t["prompt_ms"] * 1e6),
                    "eval_count": t["predicted_n"], "eval_duration": int(t["predicted_ms"] * 1e6)}

        if spec.params.stream:
            stream = await stream_job(request, state, spec,
                                      lambda piece, n, plan: line({**head(), "response": piece.text, "done": False}),
                                      lambda r: [line(end(r))])
            if isinstance(stream, EventStream):
                stream.media_type = "application/x-ndjson"
            return stream
        results = await run_all(request, state, spec)
        if results is None:
            return Response(status_code=204)
        return json_response(end(results[0]))

    def model_meta() -> dict[str, Any]:
        e = state.engine
        return {"vocab_type": 1, "n_vocab": e.n_vocab if e else None, "n_ctx_train": state.n_ctx,
                "n_ctx": state.n_ctx, "n_heads": e.n_heads if e else None, "builtin": state.model_id == "builtin"}

    async def models(request: Request) -> Response:
        created = int(state.started)
        details = {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                   "parameter_size": "", "quantization_level": ""}
        return json_response({
            "models": [{"name": state.model_id, "model": state.model_id, "modified_at": "", "size": "", "digest": "",
                        "type": "model", "description": "", "tags": [""], "capabilities": ["completion"],
                        "parameters": "", "details": details}],
            "object": "list",
            "data": [{"id": state.model_id, "object": "model", "created": created, "owned_by": "mtpcode",
                      "meta": model_meta()}],
        })

    async def props(request: Request) -> Response:
        s = state.settings
        params: dict[str, Any] = {
                  "n_predict": s.max_tokens, "seed": -1 if s.seed is None else s.seed, "temperature": s.temperature,
                  "top_k": s.top_k, "top_p": s.top_p, "min_p": s.min_p, "stop": [], "max_tokens": s.max_tokens,
                  "stream": False, "speculative.n_max": state.engine.n_heads if state.engine else None}
        sched = state.scheduler
        return json_response({
            "default_generation_settings": {"id": 0, "id_task": -1, "n_ctx": state.n_ctx, "speculative": True,
                                            "is_processing": bool(sched and sched.busy), "params": params,
                                            "prompt": ""},
            "total_slots": 1,
            "model_path": str(state.model_path),
            "chat_template": "",
            "chat_template_caps": {},
            "modalities": {"vision": False, "audio": False},
            "build_info": f"mtpcode-{__version__}",
            "is_sleeping": False,
            "mtpcode": {"version": __version__, "model": state.model_id, "heads": model_meta()["n_heads"],
                        "n_ctx": state.n_ctx, "loaded": state.scheduler is not None,
                        "cancel_previous": state.cancel_previous, "infill": "emulated (no FIM tokens)"},
        })

    async def metrics(request: Request) -> Response:
        sched = state.scheduler
        c = sched.counters if sched is not None else None
        rows = [
            ("llamacpp:prompt_tokens_total", "counter", "Prompt tokens evaluated.",
             c.prompt_tokens_evaluated if c else 0),
            ("llamacpp:prompt_seconds_total", "counter", "Prompt evaluation time.", c.prompt_seconds if c else 0),
            ("llamacpp:tokens_predicted_total", "counter", "Tokens generated.", c.tokens_predicted if c else 0),
            ("llamacpp:tokens_predicted_seconds_total", "counter", "Generation time.",
             c.predict_seconds if c else 0),
            ("llamacpp:requests_processing", "gauge", "Generations running.", int(bool(sched and sched.busy))),
            ("llamacpp:requests_deferred", "gauge", "Generations queued.", sched.queued if sched else 0),
            ("mtpcode:requests_total", "counter", "Generations submitted.", c.requests if c else 0),
            ("mtpcode:requests_finished_total", "counter", "Generations that ran to their end.",
             c.finished if c else 0),
            ("mtpcode:requests_cancelled_total", "counter", "Generations cut short (newer request, disconnect).",
             c.cancelled if c else 0),
            ("mtpcode:requests_dropped_total", "counter", "Queued generations dropped before they ran.",
             c.dropped if c else 0),
            ("mtpcode:requests_failed_total", "counter", "Generations that failed.", c.errors if c else 0),
            ("mtpcode:prompt_tokens_requested_total", "counter", "Prompt tokens, cached or evaluated.",
             c.prompt_tokens if c else 0),
            ("mtpcode:draft_tokens_total", "counter", "Draft tokens proposed by the heads.",
             sum(c.drafted) if c else 0),
            ("mtpcode:draft_tokens_accepted_total", "counter", "Draft tokens accepted.",
             sum(c.accepted) if c else 0),
        ]
        lines = []
        for name, kind, help_text, value in rows:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def ollama_tags(request: Request) -> Response:
        return json_response({"models": [_ollama_model(state)]})

    async def ollama_show(request: Request) -> Response:
        body = await read_json(request, state.max_body)
        name = body.get("model", body.get("name"))
        if name not in (None, "") and name not in state.model_names:
            raise ApiError(404, f"model {name!r} not found: this server runs {state.model_id!r}", "not_found_error")
        return json_response({"modelfile": "", "parameters": "", "template": "{{ .Prompt }}",
                              "details": _ollama_model(state)["details"],
                              "model_info": {"general.architecture": "llama", "llama.context_length": state.n_ctx},
                              "capabilities": ["completion", "insert"]})

    return [
        Route("/health", health, methods=["GET"]),
        Route("/v1/health", health, methods=["GET"]),
        Route("/props", props, methods=["GET"]),
        Route("/models", models, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/infill", infill, methods=["POST"]),
        Route("/completion", completion, methods=["POST"]),
        Route("/completions", completion, methods=["POST"]),
        Route("/v1/completions", openai_completions, methods=["POST"]),
        Route("/api/generate", ollama_generate, methods=["POST"]),
        Route("/api/tags", ollama_tags, methods=["GET"]),
        Route("/api/show", ollama_show, methods=["POST"]),
    ]


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def _ollama_model(state: ServerState) -> dict[str, Any]:
    return {"name": state.model_id, "model": state.model_id, "modified_at": _rfc3339(state.started), "size": 0,
            "digest": "", "details": {"parent_model": "", "format": "gguf", "family": "llama",
                                      "families": ["llama"], "parameter_size": "", "quantization_level": ""}}


# --- the application ---------------------------------------------------------------------------


class Guard:
    """ASGI middleware: ``Authorization: Bearer KEY`` (or ``X-Api-Key``) on every path but /health."""

    def __init__(self, app: Any, api_key: str | None) -> None:
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


def create_app(state: ServerState) -> Any:
    """The ASGI application for ``state`` (wrapped in the API-key guard)."""

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        message = {404: f"no endpoint {request.url.path}", 405: f"{request.method} is not allowed on "
                   f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error_response(ApiError(exc.status_code, message, kind))

    async def mtp_error(request: Request, exc: Exception) -> Response:
        return error_response(ApiError(400 if isinstance(exc, (DataError, UsageError)) else 500, str(exc),
                                       "invalid_request_error" if isinstance(exc, (DataError, UsageError))
                                       else "server_error"))

    async def internal_error(request: Request, exc: Exception) -> Response:
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))

    app = Starlette(routes=endpoints(state), exception_handlers={
        ApiError: api_error, HTTPException: http_error, MtpError: mtp_error, Exception: internal_error,
    })
    return Guard(app, state.api_key)
