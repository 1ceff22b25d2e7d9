"""OpenAI's completions API: ``/v1/completions`` (the official client, Continue, Tabby).

A ``suffix`` (or FIM markers in the prompt) makes it a completion at a
cursor. ``max_tokens`` is the length (``n_predict`` is llama.cpp's name and is
not read here); ``n`` asks for several completions. A stream is server-sent
events, chunks in the ``text_completion`` shape, then ``data: [DONE]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mtpcode import __version__
from mtpcode.server.errors import ApiError
from mtpcode.server.protocol import SSE_DONE, Partial, Result, finish_reason, get_str, sse, sse_error, timings
from mtpcode.server.state import ServerState
from mtpcode.server.task import Spec, base_spec, parse_prompt, prompt_spec

SYSTEM_FINGERPRINT = f"mtpcode-{__version__}"


def completion_object(results: Sequence[Result], spec: Spec, *, stream: bool) -> dict[str, Any]:
    """A /v1/completions response (with ``stream``: its last chunk, text empty)."""
    completion_tokens = sum((r.stats.generated_tokens if r.stats else 0) for r in results)
    prompt_tokens = results[0].n_prompt if results else 0
    res: dict[str, Any] = {
        "choices": [{"text": "" if stream else r.content, "index": r.index, "logprobs": None,
                     "finish_reason": finish_reason(r.reason)} for r in results],
        "created": int(results[-1].created) if results else 0,
        "model": spec.model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "object": "text_completion",
        "usage": {"completion_tokens": completion_tokens, "prompt_tokens": prompt_tokens,
                  "total_tokens": completion_tokens + prompt_tokens},
        "id": spec.id,
    }
    if results:
        res["timings"] = timings(results[-1].stats)
    return res


def chunk_object(p: Partial, spec: Spec) -> dict[str, Any]:
    """One streamed chunk of /v1/completions."""
    return {"choices": [{"text": p.content, "index": p.index, "logprobs": None, "finish_reason": None}],
            "created": int(p.created), "model": spec.model, "system_fingerprint": SYSTEM_FINGERPRINT,
            "object": "text_completion", "id": spec.id}


class Completions:
    """``/v1/completions``."""

    media_type = "text/event-stream"

    def parse(self, state: ServerState, body: dict[str, Any]) -> Spec:
        spec = base_spec(state, body, openai=True)
        return prompt_spec(spec, parse_prompt(body), get_str(body, "suffix"))

    def render_piece(self, spec: Spec, piece: Partial) -> bytes:
        return sse(chunk_object(piece, spec))

    def render_end(self, spec: Spec, result: Result) -> bytes:
        return sse(completion_object([result], spec, stream=True)) + SSE_DONE

    def render_error(self, spec: Spec, error: ApiError) -> bytes:
        return sse_error(error.body()["error"]) + SSE_DONE  # (llama-server ends an OpenAI stream so either way)

    def render_final(self, spec: Spec, results: Sequence[Result]) -> Any:
        return completion_object(results, spec, stream=False)


COMPLETIONS = Completions()
