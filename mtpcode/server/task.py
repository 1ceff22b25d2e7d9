"""A completion request, whichever API it came through: the common spec, its plan and its job.

Each API's adapter (:mod:`mtpcode.server.apis`) parses its request body into
a :class:`Spec` with the helpers here (:func:`base_spec` for the fields every
API shares, :func:`prompt_spec` for a prompt that may hold a cursor). The
completion handler turns the spec into a scheduler :class:`Job`; when the
job's turn comes, the worker thread builds its :class:`Plan` (tokenizing
needs the engine, which only that thread uses), and the job's outcome becomes
a typed :class:`~mtpcode.server.protocol.Result` for the adapter to render.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from mtpcode.config import override_settings
from mtpcode.errors import UsageError
from mtpcode.generation import CompletionEngine, GenerationOptions
from mtpcode.scheduler import Event, Job, Outcome
from mtpcode.server.errors import ApiError, bad_request
from mtpcode.server.infill import (
    Chunk,
    PromptTooLong,
    build_infill_prompt,
    has_markers,
    split_fim,
    strip_markers,
    truncate_tokens,
)
from mtpcode.server.protocol import Params, Result, parse_params
from mtpcode.server.state import ServerState, loaded_engine
from mtpcode.stops import IndentLimit, StopCondition, TimeLimit, WordStop, code_stops


@dataclass(frozen=True)
class Spec:
    """A parsed request: everything but what needs the engine's tokenizer (see :class:`Plan`).

    It also carries what the renderers need of the request, so that an
    adapter renders from the spec and a typed result alone.
    """

    params: Params
    options: GenerationOptions
    settings_json: dict[str, Any]  # llama-server's "generation_settings"
    model: str  # the model id the answers name
    n_ctx: int
    id: str  # "cmpl-...": OpenAI's completion id
    infill: bool = False  # complete at a cursor (before, suffix, chunks) rather than continue ``prompt``
    prompt: str | list[int] = ""
    before: str = ""
    suffix: str = ""
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def key(self) -> str | list[int]:
        """What the keystroke rule compares (mtpcode.scheduler): the text before the cursor."""
        return self.before if self.infill else self.prompt


@dataclass
class Plan:
    """A request turned into what the engine runs (built on the worker thread)."""

    prompt: str | list[int]
    prompt_text: str  # the prompt as text, for the response's "prompt" field
    n_prompt: int
    stops: list[StopCondition]
    word: WordStop
    truncated: bool


# --- parsing: the helpers the adapters share -------------------------------------------------


def check_model(body: dict[str, Any]) -> None:
    """A request may name any model (clients send whatever name they were configured with): the
    server runs the one it loaded, as llama-server does, and its answer names that one."""
    name = body.get("model")
    if name is not None and not isinstance(name, str):
        raise bad_request('"model" must be a string')


def base_spec(state: ServerState, body: dict[str, Any], *, openai: bool = False) -> Spec:
    """The spec of the fields every API shares (the model, the generation fields), with no prompt yet.

    ``openai``: ``n_predict`` is not one of the request's fields (OpenAI's
    ``max_tokens`` only).
    """
    check_model(body)
    engine = loaded_engine(state)
    n_ctx = state.n_ctx
    params = parse_params(body, n_ctx, state.settings.max_tokens, openai=openai, n_slots=state.n_slots)
    if params.stream and params.n_cmpl > 1:
        raise bad_request("streaming gives one completion: ask for n_cmpl (or n) 1")
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
        "t_max_predict_ms": params.t_max_predict_ms, "stream": params.stream, "n_ctx": n_ctx,
        "speculative.n_max": engine.n_heads if options.heads is None else options.heads,
        "samplers": ["top_k", "top_p", "min_p", "temperature"] if not s.greedy else [],
    }
    return Spec(params=params, options=options, settings_json=settings_json, model=state.model_id, n_ctx=n_ctx,
                id="cmpl-" + uuid.uuid4().hex)


def prompt_spec(spec: Spec, prompt: str | list[int], suffix: str = "") -> Spec:
    """``spec`` completing ``prompt``: at a cursor when a ``suffix`` follows it or the prompt
    holds FIM markers (which are never fed to the model), else a plain continuation."""
    if isinstance(prompt, str):
        if suffix:
            return replace(spec, infill=True, before=prompt, suffix=suffix)
        split = split_fim(prompt) if has_markers(prompt) else None
        if split is not None:
            chunks = [Chunk("", split.context)] if split.context.strip() else []
            return replace(spec, infill=True, before=split.prefix, suffix=split.suffix, chunks=chunks)
        prompt = strip_markers(prompt)
    return replace(spec, prompt=prompt)


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


# --- planning: on the worker thread ---------------------------------------------------------------


def build_plan(engine: CompletionEngine, spec: Spec) -> Plan:
    """Tokenize and fit ``spec`` into the context (uses the engine: worker thread only)."""
    return _plan_infill(engine, spec) if spec.infill else _plan_plain(engine, spec)


def _budget(engine: CompletionEngine, params: Params) -> int:
    """Prompt tokens allowed: the context less room for the completion (at most a quarter of it)."""
    n_ctx = engine.n_ctx
    return n_ctx - max(1, min(params.n_predict, n_ctx // 4))


def _extra_stops(params: Params) -> tuple[WordStop, list[StopCondition]]:
    word = WordStop(params.stop)
    stops: list[StopCondition] = [word]
    if params.n_indent > 0:
        stops.append(IndentLimit(params.n_indent))
    if params.t_max_predict_ms > 0:
        stops.append(TimeLimit(params.t_max_predict_ms))
    return word, stops


def _plan_infill(engine: CompletionEngine, spec: Spec) -> Plan:
    """Prompt and stops for a completion at the cursor: ``before`` it, ``suffix`` after it."""

    def count(text: str) -> int:
        return len(engine.tokenize(text))

    try:
        built = build_infill_prompt(spec.before, spec.chunks, count, _budget(engine, spec.params))
    except PromptTooLong as exc:
        raise ApiError(400, f"{exc}: shorten the line or start the server with a larger --ctx",
                       "exceed_context_size_error", n_ctx=engine.n_ctx) from None
    ids = engine.tokenize(built.text)
    word, stops = _extra_stops(spec.params)
    stops.extend(code_stops(built.before_cursor, suffix=strip_markers(spec.suffix)))
    return Plan(prompt=ids, prompt_text=built.text, n_prompt=len(ids), stops=stops, word=word,
                truncated=built.truncated)


def _plan_plain(engine: CompletionEngine, spec: Spec) -> Plan:
    """Prompt and stops for a plain continuation of ``prompt`` (text, or token ids)."""
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
    ids, truncated = truncate_tokens(ids, _budget(engine, spec.params), keep_first=keep_first)
    if not ids:
        raise bad_request("the prompt is empty")
    text = engine.detokenize(ids) if truncated or not isinstance(prompt, str) else prompt
    word, stops = _extra_stops(spec.params)
    return Plan(prompt=ids, prompt_text=text, n_prompt=len(ids), stops=stops, word=word, truncated=truncated)


# --- the job and its result ---------------------------------------------------------------------


@dataclass(eq=False)
class ServerJob(Job):
    """A scheduler job whose events go to an asyncio queue of the event loop that serves its request."""

    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.sink = self._post

    def _post(self, event: Event) -> None:  # on the worker thread
        if self.loop is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass


def make_job(engine: CompletionEngine, spec: Spec, *, pieces: bool, seed_offset: int = 0,
             label: str = "") -> ServerJob:
    """The scheduler job running ``spec`` once on ``engine`` (bound to the running event loop).

    ``pieces``: post the text as it comes (to stream it); ``seed_offset``: the
    how-many-th of a request's completions this is, so each samples differently;
    ``label``: who asked, for the log.
    A request that only fills the cache (``n_predict`` 0) is a background job.
    """
    options = spec.options
    if spec.infill and spec.suffix:  # the text after the cursor: a source of context drafts, never generated from
        options = replace(options, suffix=strip_markers(spec.suffix))
    if seed_offset and options.sampling.seed is not None:
        options = replace(options, sampling=replace(options.sampling, seed=options.sampling.seed + seed_offset))

    def prepare() -> tuple[Sequence[int] | str, list[StopCondition], Plan]:
        plan = build_plan(engine, spec)
        return plan.prompt, plan.stops, plan

    job = ServerJob(options=options, prepare=prepare, slot=spec.params.id_slot, key=spec.key,
                    background=spec.params.n_predict == 0, pieces=pieces, label=label)
    job.bind(asyncio.get_running_loop())
    return job


def to_result(job: Job, outcome: Outcome, index: int = 0) -> Result:
    """The typed result of a job that ended (without a plan: it was dropped before its turn came)."""
    reason = "cancelled" if outcome.cancelled is not None else (outcome.stop_reason or "limit")
    plan: Plan | None = job.plan
    slot = max(job.ran_on, 0)
    if plan is None:
        return Result(content="", reason=reason, stats=None, prompt="", n_prompt=0, index=index, slot=slot)
    return Result(content=outcome.text, reason=reason, stats=outcome.stats, prompt=plan.prompt_text,
                  n_prompt=plan.n_prompt, stopping_word=plan.word.matched if reason == "word" else "",
                  truncated=plan.truncated, index=index, slot=slot)
