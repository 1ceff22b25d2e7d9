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
from mtpcode.server.errors import loading
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


def _generation_settings(state: ServerState) -> dict[str, Any]:
    """The default generation settings (llama-server's ``params`` of a slot)."""
    s = state.settings
    engine = state.engine
    return {"n_predict": s.max_tokens, "seed": -1 if s.seed is None else s.seed, "temperature": s.temperature,
            "top_k": s.top_k, "top_p": s.top_p, "min_p": s.min_p, "stop": [], "max_tokens": s.max_tokens,
            "stream": False, "speculative.n_max": engine.n_heads if engine else None}


async def props(request: Request, state: ServerState) -> Response:
    """llama-server's /props: the default generation settings, the slots, and mtpcode's own facts."""
    sched = state.scheduler
    return json_response({
        "default_generation_settings": {"id": 0, "id_task": -1, "n_ctx": state.n_ctx, "speculative": True,
                                        "is_processing": bool(sched and sched.busy),
                                        "params": _generation_settings(state), "prompt": ""},
        "total_slots": state.n_slots,
        "model_path": str(state.model_path),
        "chat_template": "",
        "chat_template_caps": {},
        "modalities": {"vision": False, "audio": False},
        "build_info": f"mtpcode-{__version__}",
        "is_sleeping": False,
        "mtpcode": {"version": __version__, "model": state.model_id, "heads": model_meta(state)["n_heads"],
                    "n_ctx": state.n_ctx, "loaded": sched is not None, "parallel": state.n_slots,
                    "cancel_previous": state.cancel_previous, "infill": "emulated (no FIM tokens)"},
    })


async def slots(request: Request, state: ServerState) -> Response:
    """llama-server's /slots: each slot's state, never its prompt (slots serve other clients)."""
    sched = state.scheduler
    if sched is None:
        raise loading()
    params = _generation_settings(state)
    return json_response([
        {"id": slot.id, "id_task": slot.id_task, "n_ctx": slot.n_ctx, "speculative": True,
         "is_processing": slot.is_processing, "params": params,
         "next_token": {"has_next_token": slot.is_processing, "n_decoded": slot.n_decoded},
         "n_cached": slot.n_cached}
        for slot in sched.slots()
    ])


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
        ("llamacpp:requests_processing", "gauge", "Slots generating.", sched.busy if sched else 0),
        ("llamacpp:requests_deferred", "gauge", "Requests waiting for a slot.", sched.queued if sched else 0),
        ("mtpcode:slots_total", "gauge", "Slots (--parallel).", state.n_slots),
        ("mtpcode:requests_total", "counter", "Generations submitted.", c.requests if c else 0),
        ("mtpcode:requests_finished_total", "counter", "Generations that ran to their end.",
         c.finished if c else 0),
        ("mtpcode:requests_cancelled_total", "counter",
         "Generations cut short (their client left, or sent its next keystroke).", c.cancelled if c else 0),
        ("mtpcode:requests_dropped_total", "counter", "Queued generations dropped before they ran.",
         c.dropped if c else 0),
        ("mtpcode:requests_failed_total", "counter", "Generations that failed.", c.errors if c else 0),
        ("mtpcode:prompt_tokens_requested_total", "counter", "Prompt tokens, cached or evaluated.",
         c.prompt_tokens if c else 0),
        ("mtpcode:draft_tokens_total", "counter", "Draft tokens proposed (heads and context).",
         c.drafted if c else 0),
        ("mtpcode:draft_tokens_accepted_total", "counter", "Draft tokens accepted.", c.accepted if c else 0),
    ]
    lines = []
    for name, kind, help_text, value in rows:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


async def ollama_tags(request: Request, state: ServerState) -> Response:
    """Ollama's /api/tags: the one model."""
    return json_response({"models": [model_entry(state)]})


async def ollama_show(request: Request, state: ServerState) -> Response:
    """Ollama's /api/show: whatever ``model`` (or ``name``) it asks about, the model this server runs."""
    await read_json(request, state.max_body)
    return json_response({"modelfile": "", "parameters": "", "template": "{{ .Prompt }}", "details": MODEL_DETAILS,
                          "model_info": {"general.architecture": "llama", "llama.context_length": state.n_ctx},
                          "capabilities": ["completion", "insert"]})
