"""Helpers for the runtime tests: checkpoint variants whose draft heads agree
with the main model often enough to exercise acceptance and rollback."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BLOCK_TENSORS = (
    "attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
    "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
    "attention_norm.weight", "ffn_norm.weight",
)


def agreeing_checkpoint(src: Path, out: Path, *, block_scale: float = 1.0, tie: float = 0.5) -> Path:
    """Copy the Meta checkpoint ``src`` to ``out`` with drafts made to agree with the main model.

    Every extra head becomes a copy of the next-token head (``layers[n_trunk]``),
    so each head drafts the token the main model just chose; the unembedding is
    mixed with the token embeddings (weight ``tie``) and the blocks' residual
    contributions are scaled by ``block_scale``, so the main model tends to
    repeat its current token. Drafts are then accepted exactly when the main model repeats a
    token: often, but not always, which exercises both acceptance and rollback.
    """
    import torch

    params = json.loads((src / "params.json").read_text())
    state = torch.load(src / "consolidated.pth", map_location="cpu", weights_only=True)
    n_trunk = params["n_layers"] - params["n_future_tokens"]
    for name in list(state):
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            state[name] = state[name] * block_scale
    for k in range(params["n_future_tokens"] - 1):
        for t in BLOCK_TENSORS:
            state[f"extra_heads.{k}.{t}"] = state[f"layers.{n_trunk}.{t}"].clone()
    emb, outw = state["tok_embeddings.weight"].float(), state["output.weight"].float()
    state["output.weight"] = (tie * emb / emb.norm() * outw.norm() + (1 - tie) * outw).to(state["output.weight"].dtype)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state, out / "consolidated.pth")
    shutil.copy(src / "params.json", out / "params.json")
    shutil.copy(src / "tokenizer.model", out / "tokenizer.model")
    return out


def greedy_done(engine: Any, prompt: str, max_tokens: int, stops: Sequence[Any] = ()) -> Any:
    """Greedy generation of ``prompt`` with the engine's defaults; the Done event (its ``text``, ``stats``)."""
    from mtpcode.generation import Done, GenerationOptions

    *_, done = engine.generate(prompt, GenerationOptions(max_tokens=max_tokens), stops)
    assert isinstance(done, Done)
    return done


def apply_stops(text: str, stops) -> tuple[str, str | None]:
    """Cut a finished ``text`` with ``stops`` as a generation would: (text, reason or None)."""
    best: tuple[int, str] | None = None
    for stop in stops:
        cut = stop.check(text)
        if cut is not None and (best is None or cut < best[0]):
            best = (cut, stop.reason)
    return (text, None) if best is None else (text[: best[0]], best[1])
