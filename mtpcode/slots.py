"""Slots (sequences) of the engine's llama.cpp contexts, and the forwards a step runs on them.

One main context runs ``main.gguf`` and captures the trunk output ``h_trunk``
of the rows it evaluates; one context per extra head runs ``head-k.gguf`` on
those rows, fed as embeddings at the same positions. Every context holds
``n_seq`` sequences. A :class:`Slot` (one sequence) remembers what each cache holds for
it and keeps its trunk rows; :class:`Forwards` runs the forwards, for any
number of sequences at once, and is the only code that changes the caches, so
the bookkeeping always matches them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mtpcode.errors import MtpError
from mtpcode.llama import Context, TrunkCapture

_perf = time.perf_counter

# What a segment of a main forward asks for (mtpcode.llama.Batch.add).
NO_LOGITS, LAST_LOGITS, ALL_LOGITS = 0, 1, 2


class Slot:
    """One sequence of the contexts (a slot): its main cache holds ``tokens[:n_main]`` at positions
    0..n_main-1, ``trunk[:n_trunk]`` are their trunk rows (``n_trunk <= n_main``: a forward
    that needs no drafts from the heads skips the capture), and head k's cache holds the first
    ``n_head[k]`` of them (at most ``n_trunk``)."""

    __slots__ = ("head_out", "id", "n_ctx", "n_head", "n_main", "n_trunk", "tokens", "trunk")

    def __init__(self, seq_id: int, n_ctx: int, n_embd: int, n_heads: int) -> None:
        self.id = seq_id
        self.n_ctx = n_ctx
        self.tokens = np.zeros(n_ctx, dtype=np.int32)
        self.trunk = np.zeros((n_ctx, n_embd), dtype=np.float32)
        self.n_main = 0
        self.n_trunk = 0
        self.n_head = [0] * n_heads
        # (forward serial of head k's context, output row) holding head k's logits at row n_head[k] - 1
        self.head_out = [(-1, -1)] * n_heads

    @property
    def cached(self) -> list[int]:
        """The tokens the main cache holds (the prefix a next prompt may reuse)."""
        return self.tokens[: self.n_main].tolist()

    def common_prefix(self, ids: Sequence[int]) -> int:
        """How many leading tokens of ``ids`` the main cache holds already."""
        n = min(self.n_main, len(ids))
        if n == 0:
            return 0
        diff = np.flatnonzero(self.tokens[:n] != np.asarray(ids[:n], dtype=np.int32))
        return int(diff[0]) if diff.size else n


@dataclass(eq=False, slots=True)
class Segment:
    """One sequence's rows in a main forward: ``tokens`` at its next positions.

    A prompt chunk (``verify`` False) is committed by the forward; a verify's
    rows (the pending token and its drafts) stay uncommitted until
    :meth:`Forwards.commit` keeps the accepted ones. ``trunk``: capture the
    rows' trunk output (the heads will draft from it). Set by the forward:
    ``row``, the segment's first batch row, and ``out``, its first logits row.
    """

    seq: Slot
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    logits: int = LAST_LOGITS
    verify: bool = False
    trunk: bool = False
    row: int = 0
    out: int = 0
    captured: bool = False

    @property
    def n_outputs(self) -> int:
        n = len(self.tokens)
        return n if self.logits == ALL_LOGITS else min(n, self.logits)


class Forwards:
    """The engine's contexts and every forward run on them.

    ``capture`` is the main context's trunk capture; its target (a row per
    batch row) receives a forward's rows in batch order, and they are copied
    to each slot's trunk rows.
    """

    def __init__(self, main: Context, heads: Sequence[Context], capture: TrunkCapture) -> None:
        if capture.capacity < main.batch.capacity:
            raise MtpError("internal: the trunk capture needs a row per batch row")
        self.main = main
        self.heads = list(heads)
        self.capture = capture
        self.staging = capture.out

    @property
    def n_batch(self) -> int:
        return self.main.batch.capacity

    # -- bookkeeping ---------------------------------------------------------

    def reconcile(self, seq: Slot) -> None:
        """Trim every cache of ``seq`` to what its bookkeeping says (after an interruption
        anywhere, forwards may have added rows not yet recorded)."""
        self.main.trim(seq.n_main, seq.id)
        seq.n_trunk = min(seq.n_trunk, seq.n_main)
        for k, ctx in enumerate(self.heads):
            n = min(seq.n_head[k], seq.n_trunk)
            if n != seq.n_head[k]:
                seq.head_out[k] = (-1, -1)
            seq.n_head[k] = n
            ctx.trim(n, seq.id)

    def rewind(self, seq: Slot, keep: int) -> None:
        """Keep only the first ``keep`` positions of ``seq`` (a new prompt shares that prefix)."""
        seq.n_main = min(seq.n_main, keep)
        self.reconcile(seq)

    # -- the main model ------------------------------------------------------

    def run(self, segments: Sequence[Segment]) -> float:
        """One main forward over every segment (each sequence at most once); seconds in llama.cpp."""
        batch = self.main.batch
        batch.clear()
        capture = any(s.trunk for s in segments)
        for s in segments:
            seq, n = s.seq, len(s.tokens)
            start = seq.n_main
            if start + n > seq.n_ctx:
                raise MtpError(f"internal: {n} rows at {start} overflow sequence {seq.id} ({seq.n_ctx} positions)")
            s.out = batch.n_outputs
            s.row = row = batch.add(seq.id, start, n, s.logits)
            if n == 1:  # a decoding step: scalars cost less than slices
                token = s.tokens[0]
                batch.token_ids[row] = token
                seq.tokens[start] = token
            else:
                batch.token_ids[row: row + n] = s.tokens
                seq.tokens[start: start + n] = s.tokens
        self.capture.active = capture
        if capture:
            self.capture.reset(0)
        t = _perf()
        self.main.forward()
        native = _perf() - t
        for s in segments:
            seq, n = s.seq, len(s.tokens)
            start = seq.n_main
            s.captured = capture and seq.n_trunk == start
            if s.captured:
                seq.trunk[start: start + n] = self.staging[s.row: s.row + n]
            if not s.verify:
                seq.n_main = start + n
                if s.captured:
                    seq.n_trunk = start + n
        return native

    def logits(self, segment: Segment) -> np.ndarray:
        """The logits rows of ``segment`` in the last forward (a view, valid until the next one)."""
        n, out = segment.n_outputs, segment.out
        rows = self.main.logits(out + n)
        return rows if out == 0 else rows[out:]

    def argmax(self, segment: Segment, i: int) -> int:
        """The main model's most likely token at row ``i`` of ``segment`` in the last forward."""
        return self.main.argmax(segment.row + i)

    def commit(self, segment: Segment, kept: int) -> None:
        """Keep the first ``kept`` rows of the verify ``segment``; the others leave the cache."""
        seq = segment.seq
        start = seq.n_main
        keep = start + kept
        if kept < len(segment.tokens):
            self.main.trim(keep, seq.id)
        seq.n_main = keep
        if segment.captured:
            seq.n_trunk = keep

    # -- the heads -----------------------------------------------------------

    def head_lag(self, seq: Slot, k: int) -> int:
        return seq.n_main - seq.n_head[k]

    def feed_head(self, k: int, seqs: Sequence[Slot]) -> float:
        """Bring head ``k`` (0-based) of every sequence in ``seqs`` up to its trunk rows, in as few
        forwards as the batch allows; afterwards each holds the logits of its last row. Seconds in
        llama.cpp."""
        ctx = self.heads[k]
        todo: list[list] = []  # [sequence, next row, end]
        for seq in seqs:
            start, end = seq.n_head[k], seq.n_main
            if end > seq.n_trunk:
                raise MtpError(f"internal: head {k + 1} needs trunk rows {seq.n_trunk}..{end} of sequence {seq.id}")
            if start == end:
                if seq.head_out[k][0] == ctx.serial:
                    continue  # its logits are still there
                start = end - 1  # lost to another forward (or an interruption): evaluate the last row again
                ctx.trim(start, seq.id)
                seq.n_head[k] = start
            todo.append([seq, start, end])
        native = 0.0
        if sum(end - start for _, start, end in todo) > ctx.batch.capacity:
            # More rows than one forward takes: catch up to each sequence's last row first, so that
            # every sequence's logits come from one last forward (a later one would overwrite them).
            native += self._feed_rows(ctx, k, [[seq, start, end - 1] for seq, start, end in todo if end - 1 > start],
                                      logits=False)
            todo = [[seq, end - 1, end] for seq, _, end in todo]
        return native + self._feed_rows(ctx, k, todo, logits=True)

    @staticmethod
    def _feed_rows(ctx: Context, k: int, todo: list[list], logits: bool) -> float:
        """Feed each [sequence, first row, end] of ``todo`` to head context ``ctx``, batch by batch;
        with ``logits``, a sequence's last row gives its logits (all in the last forward)."""
        native = 0.0
        batch = ctx.batch
        while todo:
            batch.clear()
            outs: list[tuple[Slot, int]] = []
            for item in todo:
                seq, start, end = item
                n = min(end - start, batch.capacity - batch.n)
                if n <= 0:
                    break
                last = logits and start + n == end
                if last:
                    outs.append((seq, batch.n_outputs))
                row = batch.add(seq.id, start, n, LAST_LOGITS if last else NO_LOGITS)
                batch.embeddings[row: row + n] = seq.trunk[start: start + n]
                item[1] = start + n
            t = _perf()
            ctx.forward()
            native += _perf() - t
            for seq, fed, _end in todo:
                seq.n_head[k] = fed
            for seq, out in outs:
                seq.head_out[k] = (ctx.serial, out)
            todo = [item for item in todo if item[1] < item[2]]
        return native

    def head_logits(self, seq: Slot, k: int) -> np.ndarray:
        """Head ``k``'s logits at the last row of ``seq`` (after :meth:`feed_head`)."""
        ctx = self.heads[k]
        serial, out = seq.head_out[k]
        if serial != ctx.serial or seq.n_head[k] != seq.n_main:
            raise MtpError(f"internal: head {k + 1} has no logits for the last row of sequence {seq.id}")
        return ctx.logits(out + 1)[out]


class SlotHeads:
    """The heads of one sequence, as the head drafter sees them (mtpcode.drafters.heads.HeadForwards)."""

    def __init__(self, forwards: Forwards, seq: Slot) -> None:
        self.forwards = forwards
        self.seq = seq
        self._one = [seq]

    def feed_head(self, k: int) -> float:
        return self.forwards.feed_head(k, self._one)

    def head_logits(self, k: int) -> np.ndarray:
        return self.forwards.head_logits(self.seq, k)

    def head_lag(self, k: int) -> int:
        return self.forwards.head_lag(self.seq, k)
