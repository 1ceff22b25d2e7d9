"""Types shared by the runtime and its front ends: options, the event stream, stats,
draft sources, and the engine contract (:class:`CompletionEngine`).

``Engine.generate()`` (mtpcode.runtime) yields ``Piece`` events while it
decodes and ends with exactly one ``Done`` event carrying the ``Stats``.
Front ends only consume this stream.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Protocol

from mtpcode.stops import StopCondition, StopReason


@dataclass(frozen=True)
class SamplingOptions:
    """How to pick tokens. ``temperature == 0`` is greedy (and ignores the rest)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off
    seed: int | None = None  # None: a random seed, reported in Stats

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class GenerationOptions:
    """Per-call options of ``Engine.generate``."""

    max_tokens: int = 256
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    heads: int | None = None  # draft heads to use: None = all the bundle has, 0 = plain decoding
    stop: tuple[str, ...] = ()  # stop strings (may span token boundaries; not included in the output)
    adaptive: bool = True  # draft with fewer heads when drafting does not pay
    # Drafts from the context (prompt lookup over the prompt, the suffix and the output), chosen per
    # step against the heads by the adaptive policy. None: on when heads draft (heads > 0); True: also
    # with heads=0 (context drafts only); False: off.
    context_draft: bool | None = None
    # The text after the cursor, when completing in the middle of a file: never generated from,
    # only a source of context drafts (a line being retyped before identical text).
    suffix: str = ""
    # Stop a degenerate loop (mtpcode.stops.RepeatStop). Off here, so that the library decodes
    # exactly as long as asked; every front end turns it on by default (setting repeat_stop).
    repeat_stop: bool = False


class DraftSource(str, Enum):
    """Where a drafted token came from."""

    HEADS = "heads"  # the bundle's extra heads
    CONTEXT = "context"  # the text so far or the text after the cursor (prompt lookup)

    def __str__(self) -> str:
        return self.value


class StepKind(str, Enum):
    """What drafted a step's tokens (``Plan.kind``; the keys of ``Stats.forwards_by_source``)."""

    PLAIN = "plain"
    HEADS = "heads"
    CONTEXT = "context"
    CONTEXT_HEADS = "context+heads"  # a context draft that the heads extend

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Piece:
    """A chunk of output text and the tokens that produced it.

    ``drafted[i]`` tells whether ``token_ids[i]`` was a draft (of a head or
    from the context) that the main model accepted (True), or came from the
    main model's own prediction (False).
    ``text`` may be empty (a token that ends inside a UTF-8 character, or
    text held back by a stop condition) and may cover text from earlier tokens.
    """

    text: str
    token_ids: tuple[int, ...]
    drafted: tuple[bool, ...]


_SOURCES = tuple(s.value for s in DraftSource)


@dataclass(slots=True)
class Stats:
    """Numbers for one generation. Times are seconds; rates are per second."""

    prompt_tokens: int = 0
    prompt_tokens_processed: int = 0  # prompt tokens actually evaluated (the rest came from the reused prefix)
    generated_tokens: int = 0
    main_forwards: int = 0  # decode-phase calls of the main model (prefill not counted)
    heads_used: int = 0  # draft heads at the start of the generation
    drafted_tokens: list[int] = field(default_factory=list)  # per head: drafts proposed
    accepted_tokens: list[int] = field(default_factory=list)  # per head: drafts accepted
    context_draft: bool = False  # whether drafting from the context was on
    # per source of a drafted token (DraftSource: "heads", "context"): drafts proposed and accepted
    drafted_by_source: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_SOURCES, 0))
    accepted_by_source: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_SOURCES, 0))
    # per kind of step ("plain", "heads", "context", "context+heads": a context draft extended by
    # heads): main forwards, and the tokens they yielded (accepted drafts + the main model's own)
    forwards_by_source: dict[str, int] = field(default_factory=dict)
    tokens_by_source: dict[str, int] = field(default_factory=dict)
    prefill_s: float = 0.0  # from the start to the step that chose the first token
    # from there to the end (what a consumer of the events does on the same thread meanwhile included)
    decode_s: float = 0.0
    python_s: float = 0.0  # decode time spent in Python (sampling, bookkeeping), not in llama.cpp
    # CPU time of the generating thread over decode_s: with one llama.cpp thread, which computes in the
    # calling thread, all of the decode's work, without the time other programs took the CPU
    decode_cpu_s: float = 0.0
    seed: int | None = None

    @property
    def tokens_per_forward(self) -> float:
        return self.generated_tokens / self.main_forwards if self.main_forwards else 0.0

    @property
    def acceptance(self) -> list[float]:
        """Per head: fraction of its drafts that were accepted."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_tokens, self.drafted_tokens)]

    @property
    def tokens_per_forward_by_source(self) -> dict[str, float]:
        """Per kind of step: tokens per main forward (before stop conditions cut the output)."""
        return {k: self.tokens_by_source.get(k, 0) / n for k, n in self.forwards_by_source.items() if n}

    @property
    def acceptance_by_source(self) -> dict[str, float]:
        """Per source of drafts: fraction accepted."""
        return {k: self.accepted_by_source.get(k, 0) / d for k, d in self.drafted_by_source.items() if d}

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens_processed / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            tokens_per_forward=round(self.tokens_per_forward, 4),
            acceptance=[round(a, 4) for a in self.acceptance],
            tokens_per_forward_by_source={k: round(v, 4) for k, v in self.tokens_per_forward_by_source.items()},
            acceptance_by_source={k: round(v, 4) for k, v in self.acceptance_by_source.items()},
            prefill_tokens_per_s=round(self.prefill_tps, 2),
            decode_tokens_per_s=round(self.decode_tps, 2),
            decode_tokens_per_cpu_s=(round(self.generated_tokens / self.decode_cpu_s, 2)
                                     if self.decode_cpu_s > 0 else 0.0),
        )
        return data

    def summary(self) -> str:
        """One human line, e.g. for ``--stats`` and the REPL."""
        acc = " ".join(f"{a:.0%}" for a in self.acceptance) or "-"
        ctx = ""
        if self.context_draft:
            source = DraftSource.CONTEXT
            d, a = self.drafted_by_source.get(source, 0), self.accepted_by_source.get(source, 0)
            ctx = f", context drafts {a}/{d}"
        return (
            f"{self.generated_tokens} tokens, {self.decode_tps:.1f} tok/s, "
            f"{self.tokens_per_forward:.2f} tok/forward, heads {self.heads_used} (accept {acc}){ctx}, "
            f"prompt {self.prompt_tokens} tok ({self.prompt_tokens_processed} new, {self.prefill_tps:.0f} tok/s)"
        )


@dataclass(frozen=True)
class Done:
    """Last event of a generation. ``text`` is the whole output (after stop cuts)."""

    text: str
    stop_reason: StopReason
    stats: Stats


Event = Piece | Done


class CompletionEngine(Protocol):
    """What the front ends (``complete``, the servers, the REPL, the bench) need of an engine.

    :class:`mtpcode.runtime.Engine` implements it; mypy checks every front end against
    this contract, not against the Engine's internals.
    """

    n_ctx: int
    n_heads: int
    n_vocab: int

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]: ...

    def detokenize(self, ids: Sequence[int]) -> str: ...

    def generate(self, prompt: str | Sequence[int], options: GenerationOptions | None = None,
                 stops: Sequence[StopCondition] = (), cancel: threading.Event | None = None
                 ) -> Iterator[Piece | Done]: ...

    def close(self) -> None: ...
