"""llama.cpp server's completion API: ``/completion`` (a prompt to continue) and ``/infill`` (a cursor).

The answers copy llama-server's field order and spelling byte for byte
(llama.vim looks for ``"content":"`` in the raw text). A stream is
server-sent events: one object per piece, then the final object with its
content empty. ``n_cmpl`` above 1 answers with an array of final objects;
``response_fields`` keeps only the fields named (``timings/prompt_n``
unnests).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from mtpcode.generation import Stats
from mtpcode.server.errors import ApiError
from mtpcode.server.protocol import Partial, Result, get_str, nested_fields, sse, sse_error, stop_type, timings
from mtpcode.server.state import ServerState
from mtpcode.server.task import Spec, base_spec, parse_chunks, parse_prompt, prompt_spec


def final_object(r: Result, spec: Spec, *, stream: bool) -> dict[str, Any]:
    """The last object of /completion and /infill (llama-server's order; content empty when streamed)."""
    stats = r.stats or Stats()
    return {
        "index": r.index,
        "content": "" if stream else r.content,
        "tokens": [],
        "id_slot": r.slot,
        "stop": True,
        "model": spec.model,
        "tokens_predicted": stats.generated_tokens,
        "tokens_evaluated": r.n_prompt,
        "generation_settings": spec.settings_json,
        "prompt": r.prompt,
        "has_new_line": "\n" in r.content,
        "truncated": r.truncated or r.reason == "context",
        "stop_type": stop_type(r.reason),
        "stopping_word": r.stopping_word,
        "tokens_cached": min(spec.n_ctx, r.n_prompt + stats.generated_tokens),
        "timings": timings(r.stats),
        "stop_reason": r.reason,
    }


def partial_object(p: Partial) -> dict[str, Any]:
    """One streamed piece of /completion and /infill."""
    return {"index": p.index, "content": p.content, "tokens": [], "stop": False, "id_slot": p.slot,
            "tokens_predicted": p.n_decoded, "tokens_evaluated": p.n_prompt}


class Completion:
    """``/completion``: continue ``prompt`` (text, token ids, or text with FIM markers)."""

    media_type = "text/event-stream"

    def parse(self, state: ServerState, body: dict[str, Any]) -> Spec:
        return prompt_spec(base_spec(state, body), parse_prompt(body))

    def render_piece(self, spec: Spec, piece: Partial) -> bytes:
        return sse(partial_object(piece))

    def render_end(self, spec: Spec, result: Result) -> bytes:
        return sse(final_object(result, spec, stream=True))

    def render_error(self, spec: Spec, error: ApiError) -> bytes:
        return sse_error(error.body()["error"])

    def render_final(self, spec: Spec, results: Sequence[Result]) -> Any:
        fields = spec.params.response_fields
        out = [final_object(r, spec, stream=False) for r in results]
        if fields:
            out = [nested_fields(fields, obj) for obj in out]
        return out[0] if len(out) == 1 else out


class Infill(Completion):
    """``/infill``: complete at the cursor between ``input_prefix`` + ``prompt`` and ``input_suffix``,
    with the editor's extra context chunks (``input_extra``) before them."""

    def parse(self, state: ServerState, body: dict[str, Any]) -> Spec:
        spec = base_spec(state, body)
        prefix, suffix, middle = get_str(body, "input_prefix"), get_str(body, "input_suffix"), get_str(body, "prompt")
        return replace(spec, infill=True, before=prefix + middle, suffix=suffix, chunks=parse_chunks(body))


COMPLETION = Completion()
INFILL = Infill()
