"""Ollama's generate API: ``/api/generate`` (for editor plugins written for an Ollama server).

Generation fields may come at the top level or in ``options`` (``num_predict``
is the length); ``suffix`` makes it a completion at a cursor. Unlike the
others it streams unless told ``"stream": false``, as newline-delimited JSON:
one object per piece, then one with ``"done": true`` and the durations in
nanoseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mtpcode.server.errors import ApiError
from mtpcode.server.protocol import Partial, Result, dumps, get_bool, get_str, rfc3339, stop_type, timings
from mtpcode.server.state import ServerState
from mtpcode.server.task import Spec, base_spec, check_model, parse_prompt, prompt_spec


def line(obj: dict[str, Any]) -> bytes:
    """One object of an NDJSON stream."""
    return dumps(obj) + b"\n"


def done_object(r: Result, spec: Spec, *, stream: bool) -> dict[str, Any]:
    """The last object of /api/generate (with ``stream``: its response empty)."""
    t = timings(r.stats)
    return {"model": spec.model, "created_at": rfc3339(r.created), "response": "" if stream else r.content,
            "done": True, "done_reason": "stop" if stop_type(r.reason) in ("eos", "word") else "length",
            "total_duration": int((t["prompt_ms"] + t["predicted_ms"]) * 1e6), "load_duration": 0,
            "prompt_eval_count": r.n_prompt, "prompt_eval_duration": int(t["prompt_ms"] * 1e6),
            "eval_count": t["predicted_n"], "eval_duration": int(t["predicted_ms"] * 1e6)}


class Generate:
    """``/api/generate``."""

    media_type = "application/x-ndjson"

    def parse(self, state: ServerState, body: dict[str, Any]) -> Spec:
        check_model(body)  # the top level's "model": options cannot name one
        options = body.get("options")
        body = {**(options if isinstance(options, dict) else {}), **body, "model": None}
        if "num_predict" in body:
            body["n_predict"] = body["num_predict"]
        body["stream"] = get_bool(body, "stream", True)
        spec = base_spec(state, body)
        return prompt_spec(spec, parse_prompt(body, tokens=False), get_str(body, "suffix"))

    def render_piece(self, spec: Spec, piece: Partial) -> bytes:
        return line({"model": spec.model, "created_at": rfc3339(piece.created), "response": piece.content,
                     "done": False})

    def render_end(self, spec: Spec, result: Result) -> bytes:
        return line(done_object(result, spec, stream=True))

    def render_error(self, spec: Spec, error: ApiError) -> bytes:
        return line({"error": error.message})  # (Ollama's error object: the message alone)

    def render_final(self, spec: Spec, results: Sequence[Result]) -> Any:
        return done_object(results[0], spec, stream=False)


GENERATE = Generate()
