"""The endpoints that describe the server rather than complete: health, props, models, metrics,
and Ollama's tags and show.

Each handler is a function of the request and the :class:`ServerState`
(:func:`mtpcode.server.app.routes` binds the state). What the server says
about its model is written once, in the ``model_*`` functions, and each
API's listing is built from them.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from mtpcode import __version__
from mtpcode.server.errors import ApiError, loading
from mtpcode.server.protocol import rfc3339
from mtpcode.server.state import ServerState
from mtpcode.server.transport import error_response, json_response, read_json

# The model's "details", as Ollama describes a model (llama-server copies them).
MODEL_DETAILS: dict[str, Any] = {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                                 "parameter_size": "", "quantization_level": ""}


# --- the model ------------------------------------------------------------------------------


def model_meta(state: ServerState) -> dict[str, Any]:
    """llama-server's ``meta`` of the model (vocabulary and context sizes; None while it loads) and its heads."""
    e = state.engine
    return {"vocab_type": 1, "n_vocab": e.n_vocab if e else None, "n_ctx_train": state.n_ctx,
            "n_ctx": state.n_ctx, "n_heads": e.n_heads if e else None, "builtin": state.model_id == "builtin"}


def model_entry(state: ServerState, *, placeholders: bool = False) -> dict[str, Any]:
    """The model as Ollama lists it (/api/tags).

    llama-server's /v1/models copies that listing into its ``models`` field
    with ``placeholders``: ``modified_at`` and ``size`` empty, and a few
    fields more.
    """
    entry: dict[str, Any] = {"name": state.model_id, "model": state.model_id,
                             "modified_at": "" if placeholders else rfc3339(state.started),
                             "size": "" if placeholders else 0, "digest": ""}
    if placeholders:
        entry.update(type="model", description="", tags=[""], capabilities=["completion"], parameters="")
    entry["details"] = MODEL_DETAILS
    return entry


def model_object(state: ServerState) -> dict[str, Any]:
    """The model as OpenAI lists it (the ``data`` of /v1/models), with llama-server's ``meta``."""
    return {"id": state.model_id, "object": "model", "created": int(state.started), "owned_by": "mtpcode",
            "meta": model_meta(state)}


# --- the handlers ------------------------------------------------------------------------------


async def health(request: Request, state: ServerState) -> Response:
    """200 ``{"status":"ok"}`` once the model is loaded, 503 before (llama-server's /health)."""
    if state.scheduler is None:
        return error_response(loading())
    return json_response({"status": "ok"})


async def models(request: Request, state: ServerState) -> Response:
    """/v1/models: llama-server's answer, which is OpenAI's list with Ollama's listing beside it."""
    return json_response({"models": [model_entry(state, placeholders=True)], "object": "list",
                          "data": [model_object(state)]})


async def props(request: Request, state: ServerState) -> Response:
    """llama-server's /props: the default generation settings, the slot, and mtpcode's own facts."""
    s = state.settings
    engine, sched = state.engine, state.scheduler
    params: dict[str, Any] = {
        "n_predict": s.max_tokens, "seed": -1 if s.seed is None else s.seed, "temperature": s.temperature,
        "top_k": s.top_k, "top_p": s.top_p, "min_p": s.min_p, "stop": [], "max_tokens": s.max_tokens,
        "stream": False, "speculative.n_max": engine.n_heads if engine else None}
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
        "mtpcode": {"version": __version__, "model": state.model_id, "heads": model_meta(state)["n_heads"],
                    "n_ctx": state.n_ctx, "loaded": sched is not None,
                    "cancel_previous": state.cancel_previous, "infill": "emulated (no FIM tokens)"},
    })


async def metrics(request: Request, state: ServerState) -> Response:
    """Prometheus text: llama-server's counters and gauges, and mtpcode's request and draft totals."""
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


async def ollama_tags(request: Request, state: ServerState) -> Response:
    """Ollama's /api/tags: the one model."""
    return json_response({"models": [model_entry(state)]})


async def ollama_show(request: Request, state: ServerState) -> Response:
    """Ollama's /api/show for ``model`` (or ``name``): 404 for a model this server does not run."""
    body = await read_json(request, state.max_body)
    name = body.get("model", body.get("name"))
    if name not in (None, "") and name not in state.model_names:
        raise ApiError(404, f"model {name!r} not found: this server runs {state.model_id!r}", "not_found_error")
    return json_response({"modelfile": "", "parameters": "", "template": "{{ .Prompt }}", "details": MODEL_DETAILS,
                          "model_info": {"general.architecture": "llama", "llama.context_length": state.n_ctx},
                          "capabilities": ["completion", "insert"]})
