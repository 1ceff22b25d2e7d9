"""What the front ends share: loading the engine with the built-in model's note,
the stats as JSON, Ctrl-C as a clean cancel, a quiet stdout after a broken pipe,
and asking whether a stream is a terminal."""

from __future__ import annotations

import os
import sys
from typing import IO, TYPE_CHECKING, Any

from mtpcode.config import Settings
from mtpcode.errors import UsageError
from mtpcode.models import is_builtin, resolve_model

if TYPE_CHECKING:
    from pathlib import Path

    from mtpcode.generation import Stats
    from mtpcode.runtime import Engine

BUILTIN_NOTE = (
    "mtpcode: using the small built-in model (a demo, not a real code model); "
    "convert a checkpoint with `mtpcode convert` or pick one with --model"
)


def load_engine(settings: Settings, model: str | None, *, note: IO[str] | None = None,
                serving: bool = False) -> tuple[Engine, Path]:
    """Resolve and load the model; say once on ``note`` if it is the built-in one. ``serving``:
    with the ``parallel`` slots of ``mtpcode serve``."""
    from mtpcode.runtime import Engine  # (llama.cpp: loaded by the commands that run a model, not at start)

    path = resolve_model(model, settings)
    if note is not None and model is None and settings.model is None and is_builtin(path):
        print(BUILTIN_NOTE, file=note, flush=True)
    engine = Engine(path, **settings.engine_kwargs(serving=serving))
    if settings.heads is not None and settings.heads > engine.n_heads:
        engine.close()
        source = settings.sources.get("heads", "flag")
        raise UsageError(
            f"heads={settings.heads} (from {source}): the model {path} has {engine.n_heads} extra heads; "
            f"use --heads 0..{engine.n_heads}"
        )
    return engine, path


def stats_dict(stats: Stats) -> dict[str, Any]:
    """``Stats.to_dict()`` plus the timings in milliseconds (for --json and the stdio server)."""
    data = stats.to_dict()
    data.update(
        prefill_ms=round(stats.prefill_s * 1000, 3),
        decode_ms=round(stats.decode_s * 1000, 3),
        python_ms=round(stats.python_s * 1000, 3),
    )
    return data


def isatty(stream: Any) -> bool:
    """Whether ``stream`` is a terminal; False for a closed stream or one without a file behind it."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def silence_stdout() -> None:
    """Point fd 1 at /dev/null, so that flushing stdout at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass
