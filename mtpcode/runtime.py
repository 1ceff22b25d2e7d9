"""Self-speculative decoding of an mtpcode bundle on llama.cpp.

One main context runs ``main.gguf`` (trunk + next-token head) and captures the
trunk output ``h_trunk`` of every token it evaluates (eval callback). One
context per extra head runs ``head-k.gguf`` on those rows, fed as embeddings;
head k at the row of position t predicts the token at t+1+k.

A step (blockwise parallel decoding, Stern et al. 2018; speculative sampling,
Leviathan et al. 2023; prompt lookup, Saxena 2023):

* draft   - the policy (mtpcode.drafting.DraftPolicy) chooses the drafts after
            the pending token x (x is already chosen by the main model, not yet
            evaluated): heads 1..K propose d_1..d_K, or the context drafter
            proposes the tokens that followed the longest recent match of the
            text's end in the prompt, the suffix or the output, or a context
            draft is extended by heads, or nothing;
* verify  - one main forward over [x, d_1, ..., d_K], logits for every row;
* accept  - d_i is kept while the main model agrees (greedy: same argmax;
            sampling: min(1, p/q) test, q one-hot for a context draft); the
            main model's own token after the last kept row becomes the next
            pending x (the bonus token);
* commit  - rejected rows leave the main KV cache (llama_memory_seq_rm); the
            heads are fed only kept rows, so they never need a rollback.

The step does all this through a KVState, which owns the bookkeeping of what
each cache holds.

The engine remembers which tokens each KV cache holds, and all captured
trunk rows, so a later prompt sharing a prefix evaluates only what is new,
and a head left idle (adaptive drafting, fewer heads requested) catches up
from the stored rows when it is used again.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtpcode import sampling
from mtpcode.bundle import KV_FINGERPRINT, KV_HEAD_INDEX, KV_ROLE, Bundle, Manifest, open_bundle
from mtpcode.drafting import CONTEXT, HEADS, ContextDrafter, DraftPolicy, HeadDrafter, Match, Plan
from mtpcode.errors import ContextOverflowError, DataError, ModelError, MtpError, OutputError, UsageError
from mtpcode.files import atomic_write_text
from mtpcode.generation import Done, GenerationOptions, Piece, Stats, StopCondition, StopStrings
from mtpcode.llama import Context, Model, TrunkCapture, default_threads, repack_pattern, use_extra_bufts

log = logging.getLogger("mtpcode.runtime")
_perf = time.perf_counter
_cpu = time.thread_time


# ---------------------------------------------------------------------------
# output text: incremental detokenization and stop conditions


class _Output:
    """Turns accepted tokens into text pieces, applying stop conditions.

    Token bytes go through an incremental UTF-8 decoder, so a character split
    over byte-fallback tokens appears once all its bytes are there.
    """

    def __init__(self, model: Model, stops: Sequence[StopCondition]) -> None:
        self._model = model
        self._stops = tuple(stops)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.shown = 0  # characters of text already emitted
        self.stop_reason: str | None = None
        self.cut: int | None = None

    def push(self, tokens: Sequence[int], final: bool = False) -> str:
        """Add tokens; return the newly showable text ("" if none). Sets stop_reason on a stop."""
        if tokens or final:
            data = b"".join(self._model.token_bytes(t) for t in tokens)
            self.text += self._decoder.decode(data, final)
        end = len(self.text)
        for stop in self._stops:
            cut = stop.check(self.text)
            if cut is not None and (self.cut is None or cut < self.cut):
                self.cut, self.stop_reason = cut, stop.reason
        if self.cut is not None:
            end = max(self.cut, self.shown)
        elif not final and self._stops:
            hold = max(stop.holdback(self.text) for stop in self._stops)
            end = max(len(self.text) - hold, self.shown)
        piece = self.text[self.shown:end]
        self.shown = end
        return piece

    @property
    def final_text(self) -> str:
        return self.text[: self.cut] if self.cut is not None else self.text


# ---------------------------------------------------------------------------
# the engine


class Engine:
    """A bundle loaded for generation: main context, head contexts and their caches.

    Not thread-safe: one ``generate`` at a time (``cancel`` may be set from
    another thread). Starting a new ``generate`` ends the previous stream.

    ``n_threads`` computes one-row forwards (decoding steps, head drafts),
    ``n_threads_batch`` forwards of several rows (prefill, verification);
    None: :func:`~mtpcode.llama.default_threads`, and the same for both
    (llama.cpp's rule for ``-t`` and ``-tb``; docs/runtime.md, *Threads for
    verification*).
    """

    def __init__(self, bundle: str | os.PathLike[str] | Bundle, *, n_ctx: int = 4096, n_batch: int = 512,
                 n_threads: int | None = None, n_gpu_layers: int = 0, head_gpu_layers: int | None = None,
                 extra_bufts: str = "auto", flash_attn: bool = False, n_threads_batch: int | None = None,
                 policy_dir: str | os.PathLike[str] | None = None) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
        self.manifest: Manifest = self.bundle.manifest
        self.n_heads = self.manifest.n_heads
        if n_ctx < 8:
            raise UsageError(f"context size {n_ctx} is too small (at least 8 tokens)")
        if n_batch < 1:
            raise UsageError(f"batch size {n_batch} must be positive")
        n_batch = max(min(n_batch, n_ctx), self.n_heads + 1)
        extra = use_extra_bufts(extra_bufts)
        head_layers = n_gpu_layers if head_gpu_layers is None else head_gpu_layers
        self.extra_bufts = extra
        self.flash_attn = flash_attn
        self._main_model: Model | None = None
        self._head_models: list[Model] = []
        self._main: Context | None = None
        self._heads: list[Context] = []
        try:
            def repack(path: os.PathLike[str]) -> str:
                return repack_pattern(path) if extra_bufts == "repack" else ""

            self._main_model = Model(self.bundle.main_path, n_gpu_layers=n_gpu_layers, extra_bufts=extra,
                                     repack=repack(self.bundle.main_path))
            self._check_main(self._main_model)
            for k, path in enumerate(self.bundle.head_paths, start=1):
                model = Model(path, n_gpu_layers=head_layers, extra_bufts=extra, repack=repack(path))
                self._head_models.append(model)
                self._check_head(k, model)
            threads = n_threads if n_threads and n_threads > 0 else default_threads(self._main_model.n_params)
            threads_batch = n_threads_batch if n_threads_batch and n_threads_batch > 0 else threads
            n_embd = self._main_model.n_embd
            self._trunk = np.zeros((n_ctx, n_embd), dtype=np.float32)
            self._capture = TrunkCapture(self.manifest.trunk_tensor, self._trunk)
            self._main = Context(self._main_model, n_ctx=n_ctx, n_batch=n_batch, n_threads=threads,
                                 n_threads_batch=threads_batch, capture=self._capture, flash_attn=flash_attn)
            self._heads = [Context(m, n_ctx=n_ctx, n_batch=n_batch, n_threads=threads,
                                   n_threads_batch=threads_batch, embd_input=True, flash_attn=flash_attn)
                           for m in self._head_models]
        except BaseException:
            self.close()
            raise
        self.n_ctx = min(n_ctx, self._main.n_ctx, *(h.n_ctx for h in self._heads))
        self.n_batch = n_batch
        self.n_threads = threads
        self.n_threads_batch = threads_batch
        self.n_vocab = self._main_model.n_vocab
        self._kv = KVState(self._main, self._heads, self._trunk, n_ctx, n_batch)
        self._owner: object | None = None
        self._policies: dict[tuple[int, bool], DraftPolicy] = {}  # learned across calls
        # ... and across processes: kept per bundle and runtime settings in policy_dir
        self._policy_file = None if policy_dir is None else Path(policy_dir) / (
            f"{self.manifest.fingerprint}-t{threads}-tb{threads_batch}-fa{int(flash_attn)}-xb{int(extra)}-gpu{n_gpu_layers}.json")
        self._saved_policies = self._read_policies()
        self._context_drafter = ContextDrafter()  # its prompt index is reused across calls, like the KV cache

    # -- loading checks ---------------------------------------------------

    def _mismatch(self, file: str, detail: str) -> ModelError:
        return ModelError(
            f"bundle {self.bundle.path}: {file} does not belong to {self.manifest.main.file} ({detail}); "
            "reconvert the bundle with `mtpcode convert`"
        )

    def _check_main(self, model: Model) -> None:
        m, name = self.manifest, self.manifest.main.file
        role, fp = model.meta(KV_ROLE), model.meta(KV_FINGERPRINT)
        if role != "main":
            raise ModelError(f"bundle {self.bundle.path}: {name} is not an mtpcode main model ({KV_ROLE}={role!r})")
        if fp != m.fingerprint:
            raise ModelError(
                f"bundle {self.bundle.path}: {name} fingerprint {fp} does not match mtp.json ({m.fingerprint})")
        if model.n_embd != m.n_embd or model.n_vocab != m.n_vocab:
            raise ModelError(
                f"bundle {self.bundle.path}: {name} has n_embd={model.n_embd}, n_vocab={model.n_vocab}; "
                f"mtp.json says {m.n_embd}, {m.n_vocab}"
            )

    def _check_head(self, k: int, model: Model) -> None:
        main = self._model
        name = self.manifest.heads[k - 1].file
        role, index, fp = model.meta(KV_ROLE), model.meta(KV_HEAD_INDEX), model.meta(KV_FINGERPRINT)
        if role != "head" or index != str(k):
            raise self._mismatch(name, f"{KV_ROLE}={role!r}, {KV_HEAD_INDEX}={index!r}, expected head {k}")
        if fp != main.meta(KV_FINGERPRINT):
            raise self._mismatch(name, f"fingerprint {fp} != {main.meta(KV_FINGERPRINT)}")
        if model.n_embd != main.n_embd:
            raise self._mismatch(name, f"n_embd {model.n_embd} != {main.n_embd}")
        if model.n_vocab != main.n_vocab:
            raise self._mismatch(name, f"n_vocab {model.n_vocab} != {main.n_vocab}")

    # -- public API ---------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        return self._model.tokenize(text, add_bos=add_bos)

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` as a continuation (special tokens such as BOS render as nothing)."""
        data = b"".join(self._model.token_bytes(int(t)) for t in ids)
        return data.decode("utf-8", errors="replace")

    @property
    def cached_tokens(self) -> list[int]:
        """The tokens whose KV entries the main context holds (the reusable prefix)."""
        return self._kv.tokens[: self._kv.n_main].tolist()

    def generate(self, prompt: str | Sequence[int], options: GenerationOptions | None = None,
                 stops: Sequence[StopCondition] = (), cancel: threading.Event | None = None
                 ) -> Iterator[Piece | Done]:
        """Stream ``Piece`` events for the continuation of ``prompt``, then one ``Done``.

        A str prompt is tokenized with BOS. Raises ContextOverflowError here,
        before any event, when the prompt does not fit in the context; if the
        prompt fits but prompt + max_tokens does not, generation stops with
        stop_reason "context" when the context is full.
        """
        options = options if options is not None else GenerationOptions()
        ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise DataError("the prompt is empty")
        if len(ids) > self.n_ctx:
            raise ContextOverflowError(
                f"prompt is {len(ids)} tokens but the context holds {self.n_ctx}; "
                "use --ctx to raise it or shorten the input"
            )
        bad = [t for t in ids if not 0 <= t < self.n_vocab]
        if bad:
            raise DataError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.n_vocab - 1})")
        heads = self.n_heads if options.heads is None else options.heads
        if not 0 <= heads <= self.n_heads:
            raise UsageError(f"heads must be between 0 and {self.n_heads} for this bundle, not {heads}")
        if options.max_tokens < 0:
            raise UsageError(f"max_tokens must be >= 0, not {options.max_tokens}")
        all_stops: list[StopCondition] = []
        if options.stop:
            all_stops.append(StopStrings(options.stop))
        all_stops.extend(stops)
        owner = object()
        self._owner = owner  # a previous, unfinished stream is now stale
        self._reconcile()
        return self._run(owner, ids, options, heads, all_stops, cancel)

    def close(self) -> None:
        """Save what the drafting policies learned (with ``policy_dir``), free every context and
        model (idempotent)."""
        self._owner = None
        if getattr(self, "_policies", None):
            self._write_policies()
            self._policies = {}
        for ctx in getattr(self, "_heads", []):
            ctx.close()
        if (main := getattr(self, "_main", None)) is not None:
            main.close()
        for model in getattr(self, "_head_models", []):
            model.close()
        if (main_model := getattr(self, "_main_model", None)) is not None:
            main_model.close()
        self._heads, self._main, self._head_models, self._main_model = [], None, [], None

    @property
    def native_capture(self) -> bool:
        """Whether the trunk is captured by the C callback (else by the slower Python one)."""
        return self._capture.native

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------

    @property
    def _model(self) -> Model:
        if self._main_model is None:
            raise MtpError("engine used after close()")
        return self._main_model

    def _draft_policy(self, heads: int, adaptive: bool, greedy: bool, context: bool = False) -> DraftPolicy:
        """The adaptive policy for ``heads``; what it learned carries over to the next call
        (kept apart for greedy and sampled decoding, whose acceptance differs).

        Sampling gets a fresh policy on the fixed cost model, seeded or not: its
        draft counts, hence its random draws, must depend only on the seed and
        the prompt, not on timings or on earlier calls, so that the seed a run
        reports (``Stats.seed``, drawn when none was given) repeats it.
        """
        reproducible = not greedy
        if not (adaptive and (heads or context)) or reproducible:
            return DraftPolicy(heads, adaptive, measured=not reproducible, flash_attn=self.flash_attn)
        key = (heads, greedy)
        if key not in self._policies:
            policy = DraftPolicy(heads, adaptive=True, flash_attn=self.flash_attn)
            saved = self._saved_policies.get(self._policy_key(key))
            if saved is not None and not policy.restore(saved):
                log.debug("ignoring an invalid saved drafting policy for %s heads", heads)
            self._policies[key] = policy
        return self._policies[key]

    @staticmethod
    def _policy_key(key: tuple[int, bool]) -> str:
        return f"{key[0]} heads, {'greedy' if key[1] else 'sampled'}"

    def _read_policies(self) -> dict[str, Any]:
        """The saved policies for this bundle and settings ({} if none or unreadable: they are only a head start)."""
        if self._policy_file is None:
            return {}
        try:
            data = json.loads(self._policy_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            if not isinstance(exc, FileNotFoundError):
                log.debug("ignoring %s: %s", self._policy_file, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def _write_policies(self) -> None:
        if self._policy_file is None:
            return
        learned = {self._policy_key(k): p.state() for k, p in self._policies.items() if p.steps > p.warmup_steps}
        if not learned:
            return
        data = {**self._saved_policies, **learned}
        try:  # concurrent engines: the last one to close wins
            atomic_write_text(self._policy_file, json.dumps(data, indent=1))
        except OutputError as exc:
            log.debug("could not save the drafting policies to %s: %s", self._policy_file, exc)

    def _reconcile(self) -> None:
        """Make the KV caches hold exactly what the bookkeeping says (after an
        interruption anywhere, decodes may have added rows not yet recorded)."""
        if self._main is None:
            raise MtpError("engine used after close()")
        self._kv.reconcile()

    def _context_drafting(self, options: GenerationOptions, heads: int) -> bool:
        """Whether this generation drafts from the context: on with draft heads unless switched off,
        and with ``heads=0`` only when asked for explicitly; the per-step choice needs the adaptive policy."""
        wanted = options.context_draft if options.context_draft is not None else heads > 0
        return wanted and options.adaptive

    def _run(self, owner: object, ids: list[int], options: GenerationOptions, heads: int,
             stops: list[StopCondition], cancel: threading.Event | None) -> Iterator[Piece | Done]:
        sopts = options.sampling
        seed = None if sopts.greedy else (sopts.seed if sopts.seed is not None else sampling.new_seed())
        context = self._context_drafting(options, heads)
        stats = Stats(prompt_tokens=len(ids), heads_used=heads, drafted_tokens=[0] * heads,
                      accepted_tokens=[0] * heads, seed=seed, context_draft=context)
        suffix = self.tokenize(options.suffix, add_bos=False) if context and options.suffix else []
        step = _Step(self, self._kv, options, heads, seed, context)
        out = _Output(self._model, stops)
        try:
            t0 = _perf()
            stats.prompt_tokens_processed = self._kv.prefill(ids, cancel)
            if self._kv.n_main < len(ids):  # cancelled between prefill batches: what is evaluated stays cached
                stats.prefill_s = _perf() - t0
                yield Done(text="", stop_reason="interrupted", stats=stats)
                return
            step.start(ids, suffix, self._kv.last_logits())
            stats.prefill_s = _perf() - t0
            t_decode, c_decode = _perf(), _cpu()
            native = suspended = suspended_cpu = 0.0
            pending = [step.pending]
            drafted_flags = [False]
            n_total = len(ids)
            reason: str | None = None
            while True:
                # commit the tokens chosen so far to the output and check every stop
                emit, flags = [], []
                for tok, flag in zip(pending, drafted_flags):
                    if self._model.is_eog(tok):
                        reason = "eos"
                        break
                    if stats.generated_tokens >= options.max_tokens:
                        reason = "max_tokens"
                        break
                    if n_total >= self.n_ctx:
                        reason = "context"
                        break
                    emit.append(tok)
                    flags.append(flag)
                    stats.generated_tokens += 1
                    n_total += 1
                text = out.push(emit)
                if emit or text:
                    t_yield, c_yield = _perf(), _cpu()
                    yield Piece(text=text, token_ids=tuple(emit), drafted=tuple(flags))
                    suspended += _perf() - t_yield  # the consumer's time is not decode time
                    suspended_cpu += _cpu() - c_yield
                if self._owner is not owner:
                    raise MtpError("this generation was superseded by a newer generate() call on the same engine")
                reason = reason or out.stop_reason
                if reason is None and stats.generated_tokens >= options.max_tokens:
                    reason = "max_tokens"
                if reason is None and n_total >= self.n_ctx:
                    reason = "context"
                if reason is None and cancel is not None and cancel.is_set():
                    reason = "interrupted"
                if reason is not None:
                    break
                # one speculative step: draft, verify, accept, commit
                room = min(self.n_ctx - n_total - 1, options.max_tokens - stats.generated_tokens - 1)
                native += step.run(max(0, room), stats)
                pending, drafted_flags = step.new_tokens, step.new_flags
            stats.decode_s = _perf() - t_decode - suspended
            stats.decode_cpu_s = max(0.0, _cpu() - c_decode - suspended_cpu)
            stats.python_s = max(0.0, stats.decode_s - native)
            tail = out.push([], final=True)
            if tail:
                yield Piece(text=tail, token_ids=(), drafted=())
            yield Done(text=out.final_text, stop_reason=out.stop_reason or reason, stats=stats)
        finally:
            if self._owner is owner:
                self._owner = None
                if self._main is not None:
                    self._reconcile()

    # -- the KV state, for tools that look inside (the step uses self._kv) ----

    def feed_head(self, k: int) -> float:
        """Feed head k (0-based) the trunk rows it has not seen; returns seconds in llama.cpp."""
        return self._kv.feed_head(k)

    @property
    def _n_main(self) -> int:
        return self._kv.n_main

    @property
    def _n_head(self) -> list[int]:
        return self._kv.n_head


class KVState:
    """What the main and head KV caches hold, and the operations a step performs on them.

    The main cache holds ``tokens[:n_main]``; head k's holds the first
    ``n_head[k]`` of those; ``trunk[:n_main]`` are their trunk rows (captured
    by the main context). Steps call these methods instead of assigning the
    bookkeeping themselves, so it always matches the caches.
    """

    def __init__(self, main: Context, heads: Sequence[Context], trunk: np.ndarray, n_ctx: int, n_batch: int) -> None:
        self.main = main
        self.heads = list(heads)
        self.trunk = trunk
        self.n_batch = n_batch
        self.tokens = np.zeros(n_ctx, dtype=np.int32)
        self.n_main = 0
        self.n_head = [0] * len(self.heads)
        self.head_logits_at = [-1] * len(self.heads)  # position whose logits each head context holds

    def reconcile(self) -> None:
        """Trim every cache to what the bookkeeping says it holds."""
        self.main.trim(self.n_main)
        for k, ctx in enumerate(self.heads):
            self.n_head[k] = min(self.n_head[k], self.n_main)
            ctx.trim(self.n_head[k])
            if self.head_logits_at[k] != self.n_head[k] - 1:
                self.head_logits_at[k] = -1

    def prefill(self, ids: list[int], cancel: threading.Event | None = None) -> int:
        """Bring the main KV to ``ids`` reusing the common prefix; returns tokens evaluated.

        The last prompt token is always evaluated (its logits choose the first token).
        ``cancel`` is checked between batches: then the KV holds only a prefix of ``ids``.
        """
        main = self.main
        cached = self.tokens[: self.n_main]
        n = min(len(cached), len(ids) - 1)
        common = 0
        if n > 0:
            diff = np.flatnonzero(cached[:n] != np.asarray(ids[:n], dtype=np.int32))
            common = int(diff[0]) if diff.size else n
        self.n_main = min(self.n_main, common)
        self.reconcile()
        self.tokens[common: len(ids)] = ids[common:]
        pos = common
        while pos < len(ids) and not (cancel is not None and cancel.is_set()):
            n_rows = min(self.n_batch, len(ids) - pos)
            main.batch.token_ids[:n_rows] = self.tokens[pos: pos + n_rows]
            main.decode(n_rows, pos, last_logits_only=True)
            pos += n_rows
            self.n_main = pos
        return pos - common

    def last_logits(self) -> np.ndarray:
        """The main model's logits at the last evaluated row (after a prefill)."""
        return self.main.logits(1)[0]

    def feed_head(self, k: int) -> float:
        """Feed head k (0-based) the trunk rows it has not seen; returns seconds in llama.cpp.

        Afterwards its context holds the logits of the last row (position n_main - 1).
        """
        ctx = self.heads[k]
        start, end = self.n_head[k], self.n_main
        if start == end and self.head_logits_at[k] == end - 1:
            return 0.0
        if start == end:  # logits lost (interrupted run): re-evaluate the last row
            start = end - 1
            ctx.trim(start)
            self.n_head[k] = start
        native = 0.0
        while start < end:
            n_rows = min(self.n_batch, end - start)
            np.copyto(ctx.batch.embeddings[:n_rows], self.trunk[start: start + n_rows])
            t = _perf()
            ctx.decode(n_rows, start, last_logits_only=True)
            native += _perf() - t
            start += n_rows
            self.n_head[k] = start
        self.head_logits_at[k] = end - 1
        return native

    def head_logits(self, k: int) -> np.ndarray:
        return self.heads[k].logits(1)[0]

    def head_lag(self, k: int) -> int:
        return self.n_main - self.n_head[k]

    def verify(self, pending: int, drafts: np.ndarray) -> float:
        """One main forward over [pending, *drafts] after the cached tokens, logits for every row
        (read them with :meth:`rows`); returns seconds in llama.cpp."""
        m = self.n_main
        k = len(drafts)
        batch = self.main.batch
        batch.token_ids[0] = pending
        batch.token_ids[1: k + 1] = drafts
        self.tokens[m: m + k + 1] = batch.token_ids[: k + 1]
        t = _perf()
        self.main.decode(k + 1, m, last_logits_only=False)
        return _perf() - t

    def rows(self, n: int) -> np.ndarray:
        """The logits of the last verify's ``n`` rows."""
        return self.main.logits(n)

    def commit(self, kept: int, verified: int) -> None:
        """Keep the first ``kept`` of the last verify's ``verified`` rows in the main cache, drop the rest."""
        keep = self.n_main + kept
        if kept < verified:
            self.main.trim(keep)
        self.n_main = keep


class _Step:
    """The per-generation decoding state: pending token, drafters, buffers, policy."""

    def __init__(self, engine: Engine, kv: KVState, options: GenerationOptions, heads: int, seed: int | None,
                 context: bool) -> None:
        self.kv = kv
        self.heads = heads
        self.greedy = options.sampling.greedy
        self.policy = engine._draft_policy(heads, options.adaptive, self.greedy, context=context)
        self.context = engine._context_drafter if context else None  # its prompt index outlives a call
        # a verify's rows must fit in one batch
        self.max_drafts = min(max(heads, self.context.max_draft if self.context else 0), kv.n_batch - 1)
        self.pending = -1
        self.new_tokens: list[int] = []
        self.new_flags: list[bool] = []
        self.drafts = np.zeros(max(self.max_drafts, 1), dtype=np.int32)
        self.rng: np.random.Generator | None = None
        self.warper: sampling.Warper | None = None
        if not self.greedy:
            self.rng = np.random.default_rng(seed)
            self.warper = sampling.Warper(engine.n_vocab, options.sampling)
            self.p = self.warper.new_buffer()
            self.scratch = self.warper.new_buffer()
            self.one_hot = np.zeros(engine.n_vocab, dtype=np.float64)  # q of a deterministic (context) draft
        self.head_drafter = HeadDrafter(kv, heads, self.warper, self.rng) if heads else None
        # The policy's costs: with one llama.cpp thread for every forward (which computes in this
        # thread) the thread's CPU time, which leaves out the time other programs held the CPU; a
        # shared machine would otherwise make the longer, multi-row forwards look dearer than they
        # are. Wall-clock else.
        self.cost_clock = _cpu if engine.n_threads == 1 and engine.n_threads_batch == 1 else _perf

    def pick(self, logits: np.ndarray) -> int:
        """The main model's token from one row of logits."""
        if self.warper is None or self.rng is None:
            return sampling.greedy(logits)
        return sampling.sample(self.warper.probs(logits, self.p), self.rng)

    def start(self, prompt: list[int], suffix: list[int], logits: np.ndarray) -> None:
        """After the prefill: feed the heads, index the context, pick the first token."""
        if self.head_drafter is not None:
            self.head_drafter.begin()
        if self.context is not None:
            self.context.begin(prompt, suffix)
            self.policy.begin()
        self.pending = self.pick(logits)

    def _accept(self, n: int, n_context: int) -> tuple[int, int]:
        """Compare drafts with the main rows: (number accepted, the main model's next token).

        Under sampling, a context draft is deterministic (q is one-hot on it):
        it is accepted with probability p(token), and a rejection draws from p
        without that token, which is speculative sampling's rule for that q.
        """
        rows = self.kv.rows(n + 1)
        if self.warper is None or self.rng is None:
            for i in range(n):
                target = sampling.greedy(rows[i])
                if target != self.drafts[i]:
                    return i, target
            return n, sampling.greedy(rows[n])
        rng = self.rng
        for i in range(n):
            p = self.warper.probs(rows[i], self.p)
            d = int(self.drafts[i])
            if i < n_context:
                q = self.one_hot
                q[d] = 1.0
                try:
                    if not sampling.accept(p, q, d, rng):
                        return i, sampling.residual(p, q, rng, self.scratch)
                finally:
                    q[d] = 0.0
            else:
                q = self.head_drafter.q[i] if self.head_drafter is not None else self.one_hot
                if not sampling.accept(p, q, d, rng):
                    return i, sampling.residual(p, q, rng, self.scratch)
        return n, sampling.sample(self.warper.probs(rows[n], self.p), rng)

    def run(self, room: int, stats: Stats) -> float:
        """One step with at most ``room`` drafts; sets new_tokens/new_flags; returns seconds in llama.cpp."""
        room = min(room, self.max_drafts)
        match: Match | None = None
        if self.context is not None and room > 0:
            match = self.context.draft(self.pending)
        plan: Plan = self.policy.plan(match, room, context=self.context is not None, n_cached=self.kv.n_main)
        n_context = plan.context
        if n_context and match is not None:
            self.drafts[:n_context] = match.tokens[:n_context]
        native_heads = 0.0
        typical = True
        clock = self.cost_clock
        c0 = clock()
        if plan.heads > n_context and self.head_drafter is not None:
            native_heads, typical = self.head_drafter.draft(n_context, plan.heads, self.drafts)
        c1 = clock()
        n = plan.drafts
        verify_s = self.kv.verify(self.pending, self.drafts[:n])
        c2 = clock()
        accepted, nxt = self._accept(n, n_context)
        self.kv.commit(1 + accepted, n + 1)
        self._count(stats, plan, accepted)
        self.policy.observe_plan(plan, match, accepted, c2 - c1, c1 - c0,
                                 plan.head_forwards if typical else 0)
        kept = [int(t) for t in self.drafts[:accepted]]
        self.policy.after_step(match, plan, kept[0] if kept else nxt)
        if self.context is not None:
            self.context.accept([self.pending, *kept])
        self.new_tokens = [*kept, nxt]
        self.new_flags = [True] * accepted + [False]
        self.pending = nxt
        return native_heads + verify_s

    def _count(self, stats: Stats, plan: Plan, accepted: int) -> None:
        stats.main_forwards += 1
        kind = plan.kind
        stats.forwards_by_source[kind] = stats.forwards_by_source.get(kind, 0) + 1
        stats.tokens_by_source[kind] = stats.tokens_by_source.get(kind, 0) + accepted + 1
        if plan.context:
            stats.drafted_by_source[CONTEXT] += plan.context
            stats.accepted_by_source[CONTEXT] += min(accepted, plan.context)
        for i in range(plan.context, plan.heads):
            stats.drafted_tokens[i] += 1
            stats.accepted_tokens[i] += int(i < accepted)
            stats.drafted_by_source[HEADS] += 1
            stats.accepted_by_source[HEADS] += int(i < accepted)
