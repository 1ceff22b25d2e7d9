"""What the HTTP server's handlers share: the settings, the model's names, the engine and its scheduler."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from mtpcode.config import Settings
from mtpcode.generation import CompletionEngine
from mtpcode.scheduler import Scheduler
from mtpcode.server.errors import loading

DEFAULT_MAX_BODY = 8 * 1024 * 1024  # bytes: far more than editors send (llama.vim's ring is ~64 KiB)


@dataclass
class ServerState:
    """The server, as its handlers see it. ``engine`` and ``scheduler`` are None while the model loads
    (the loader sets the engine first, then the scheduler that runs it)."""

    settings: Settings
    model_id: str
    model_path: Path
    api_key: str | None = None
    max_body: int = DEFAULT_MAX_BODY
    cancel_previous: bool = True
    engine: CompletionEngine | None = None
    scheduler: Scheduler | None = None
    started: float = field(default_factory=time.time)

    n_slots: int = 1

    @property
    def n_ctx(self) -> int:
        return int(self.engine.n_ctx) if self.engine is not None else self.settings.ctx


def ready(state: ServerState) -> Scheduler:
    """The scheduler, or 503 while the model is still loading."""
    if state.scheduler is None:
        raise loading()
    return state.scheduler


def loaded_engine(state: ServerState) -> CompletionEngine:
    """The engine, or 503 while the model is still loading."""
    if state.engine is None:
        raise loading()
    return state.engine
