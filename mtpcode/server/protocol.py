"""What every API of the HTTP server shares: the JSON spelling, request fields, typed results.

Field names, their order and the JSON spelling (compact, UTF-8, no spaces
after ``:``) follow llama.cpp's ``llama-server``, because some editor plugins
look at the raw text (llama.vim checks for ``"content":"`` before it parses).
Unknown request fields are ignored, as real clients send many.

A request's common fields become :class:`Params`; a generation becomes
:class:`Partial` pieces while it streams and one :class:`Result` per
completion. Each API's adapter (:mod:`mtpcode.server.apis`) renders these
typed values in its own shape.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mtpcode.generation import Stats
from mtpcode.server.errors import bad_request

MAX_COMPLETIONS = 8  # n_cmpl / n: completions per request
MAX_PREDICT = 1 << 20  # n_predict above this is refused as nonsense; up to it, the context is the limit


def dumps(obj: Any) -> bytes:
    """JSON as llama-server writes it: compact, UTF-8 (not \\u-escaped)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def sse(obj: Any) -> bytes:
    """One server-sent event as llama-server frames it."""
    return b"data: " + dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def sse_error(error: dict[str, Any]) -> bytes:
    """A failure in the middle of a stream, as llama-server sends it: an ``error`` event with the
    error object (code, message, type)."""
    return b"error: " + dumps(error) + b"\n\n"


def rfc3339(t: float) -> str:
    """A Unix time as Ollama writes it: UTC, microseconds, ``Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


# --- fields -------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _json_type(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return "a string" if isinstance(v, str) else type(v).__name__


def get_int(body: dict[str, Any], name: str, default: int | None, lo: int | None = None,
            hi: int | None = None) -> int | None:
    """``body[name]`` as an int in [lo, hi]; absent or null gives ``default``. 400 otherwise."""
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer() and math.isfinite(v):
        v = int(v)
    if not _is_int(v):
        raise bad_request(f'"{name}" must be an integer, not {json.dumps(v)[:40]}')
    if lo is not None and v < lo:
        raise bad_request(f'"{name}" must be at least {lo}, not {v}')
    if hi is not None and v > hi:
        raise bad_request(f'"{name}" must be at most {hi}, not {v}')
    return int(v)


def get_float(body: dict[str, Any], name: str, default: float | None) -> float | None:
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v):
        raise bad_request(f'"{name}" must be a number, not {json.dumps(v)[:40]}')
    return float(v)


def get_bool(body: dict[str, Any], name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad_request(f'"{name}" must be true or false, not {json.dumps(v)[:40]}')
    return v


def get_str(body: dict[str, Any], name: str, default: str = "") -> str:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, str):
        raise bad_request(f'"{name}" must be a string, not {_json_type(v)}')
    return v


def get_stop(body: dict[str, Any], name: str = "stop") -> list[str]:
    """Stop strings: a string or an array of strings (empty strings are ignored)."""
    v = body.get(name)
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad_request(f'"{name}" must be a string or an array of strings')
    return [s for s in v if s]


# --- what a request asks for ---------------------------------------------------------------


@dataclass
class Params:
    """The generation fields common to every endpoint, checked."""

    n_predict: int  # tokens to generate at most (0: only evaluate the prompt)
    n_predict_requested: int
    sampling: dict[str, Any]  # temperature, top_k, top_p, min_p, seed (only those the request set)
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    n_indent: int = 0
    t_max_predict_ms: float = 0.0
    n_cmpl: int = 1
    response_fields: list[str] = field(default_factory=list)
    id_slot: int | None = None  # llama-server's slot to run on (None: the server picks)


def parse_params(body: dict[str, Any], n_ctx: int, default_n_predict: int, *, openai: bool = False,
                 n_slots: int = 1) -> Params:
    """The common fields of ``body``. ``n_predict`` -1 means "until the context is full"; ``id_slot``
    -1 (or absent) lets the server pick one of its ``n_slots`` slots."""
    n = get_int(body, "max_tokens", None, lo=-1)
    n = get_int(body, "max_completion_tokens", n, lo=-1)
    if not openai:
        n = get_int(body, "n_predict", n, lo=-1)
    if n is None:
        n = default_n_predict
    if n > MAX_PREDICT:
        raise bad_request(f"n_predict {n} is more than any context holds (at most {MAX_PREDICT}); "
                          "ask for fewer tokens, or -1 for as many as fit")
    # Like llama-server: more than the context allows means "until the context is full".
    n_predict = n_ctx if n < 0 or n > n_ctx else n
    sampling: dict[str, Any] = {}
    temperature = get_float(body, "temperature", None)
    if temperature is not None:
        sampling["temperature"] = max(0.0, temperature)  # llama.cpp: negative = greedy
    top_k = get_int(body, "top_k", None)
    if top_k is not None:
        sampling["top_k"] = max(0, top_k)  # llama.cpp: <= 0 = off
    for name in ("top_p", "min_p"):
        value = get_float(body, name, None)
        if value is not None:
            sampling[name] = value
    seed = get_int(body, "seed", None, lo=-1)
    if seed is not None and seed >= 0 and seed != 0xFFFFFFFF:  # -1 (and its unsigned 0xFFFFFFFF): random
        sampling["seed"] = seed % 2**32  # llama.cpp's seeds are 32-bit; Tabby sends 64-bit ones
    n_cmpl = get_int(body, "n_cmpl", None, lo=1, hi=MAX_COMPLETIONS)
    n_cmpl = get_int(body, "n", n_cmpl, lo=1, hi=MAX_COMPLETIONS)
    fields = body.get("response_fields") or []
    if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
        raise bad_request('"response_fields" must be an array of strings')
    id_slot = get_int(body, "id_slot", -1, lo=-1)
    if id_slot is not None and id_slot >= n_slots:
        raise bad_request(f'"id_slot" {id_slot}: this server has {n_slots} slot(s), 0..{n_slots - 1} '
                          "(or -1: any); start it with --parallel for more")
    return Params(
        n_predict=n_predict, n_predict_requested=n, sampling=sampling, stop=get_stop(body),
        stream=get_bool(body, "stream", False), n_indent=get_int(body, "n_indent", 0, lo=0) or 0,
        t_max_predict_ms=get_float(body, "t_max_predict_ms", 0.0) or 0.0, n_cmpl=n_cmpl or 1,
        response_fields=[f for f in fields if f], id_slot=None if id_slot is None or id_slot < 0 else id_slot,
    )


# --- results ------------------------------------------------------------------------------

# mtpcode's stop reasons in llama.cpp's terms (stop_type) and OpenAI's (finish_reason).
_STOP_TYPE = {"eos": "eos", "word": "word", "stop": "word", "suffix": "word", "block": "word", "lines": "word",
              "repeat": "word",
              "max_tokens": "limit", "context": "limit", "limit": "limit", "cancelled": "limit",
              "interrupted": "limit"}


def stop_type(reason: str) -> str:
    return _STOP_TYPE.get(reason, "limit")


def finish_reason(reason: str) -> str:
    return "stop" if stop_type(reason) in ("eos", "word") else "length"


@dataclass(frozen=True)
class Partial:
    """A streamed piece of a completion, ready to be rendered in any of the formats."""

    content: str  # the new text
    n_decoded: int  # tokens generated so far
    n_prompt: int
    index: int = 0
    created: float = field(default_factory=time.time)  # Unix time
    slot: int = 0  # the slot it runs on


@dataclass(frozen=True)
class Result:
    """One finished completion, ready to be rendered in any of the formats."""

    content: str
    reason: str  # mtpcode's: eos, word, suffix, block, lines, max_tokens, context, limit, cancelled
    stats: Stats | None
    prompt: str
    n_prompt: int
    stopping_word: str = ""
    truncated: bool = False
    index: int = 0
    created: float = field(default_factory=time.time)  # Unix time the completion ended
    slot: int = 0  # the slot it ran on


def timings(stats: Stats | None) -> dict[str, Any]:
    """llama-server's ``timings`` plus mtpcode's draft statistics."""
    if stats is None:
        stats = Stats()
    prompt_n, predicted_n = stats.prompt_tokens_processed, stats.generated_tokens
    prompt_ms, predicted_ms = stats.prefill_s * 1000.0, stats.decode_s * 1000.0
    out: dict[str, Any] = {
        "cache_n": stats.prompt_tokens - prompt_n,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
        "prompt_per_second": prompt_n * 1000.0 / prompt_ms if prompt_ms > 0 else 0.0,
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
        "predicted_per_second": predicted_n * 1000.0 / predicted_ms if predicted_ms > 0 else 0.0,
    }
    # llama-server's draft counts cover every drafted token, whatever drafted it
    drafted, accepted = sum(stats.drafted_by_source.values()), sum(stats.accepted_by_source.values())
    if drafted > 0:
        out["draft_n"] = drafted
        out["draft_n_accepted"] = accepted
    out["heads"] = stats.heads_used
    out["main_forwards"] = stats.main_forwards
    out["tokens_per_forward"] = round(stats.tokens_per_forward, 4)
    out["draft_acceptance"] = [round(a, 4) for a in stats.acceptance]  # per head
    out["drafted_by_source"] = dict(stats.drafted_by_source)  # "heads", "context"
    out["accepted_by_source"] = dict(stats.accepted_by_source)
    out["tokens_per_forward_by_source"] = {k: round(v, 4) for k, v in stats.tokens_per_forward_by_source.items()}
    return out


def nested_fields(paths: Sequence[str], res: dict[str, Any]) -> dict[str, Any]:
    """llama-server's ``response_fields``: keep these (``a/b`` unnests ``res["a"]["b"]`` as key ``"a/b"``)."""
    out: dict[str, Any] = {}
    for path in paths:
        node: Any = res
        ok = True
        for part in path.split("/"):
            if isinstance(node, dict) and part in node:
                node = node[part]
            else:
                ok = False
                break
        if ok:
            out[path] = node
    return out
