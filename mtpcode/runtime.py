"""Self-speculative decoding of an mtpcode bundle on llama.cpp: the Engine.

The Engine loads a bundle (checking that its files belong together), owns the
llama.cpp contexts (mtpcode.slots) and the per-slot state that outlives a
request (the KV caches, the context drafter's prompt index, the drafting
policies), and runs the speculation loop (mtpcode.speculative) one step at a
time for any number of slots at once (:meth:`Engine.step`).
:meth:`Engine.generate` is the one-request stream the front ends consume.

The caches of a slot hold what its last request evaluated, so a next prompt
sharing a prefix (an editor re-sending the file) evaluates only what is new,
and a head left idle catches up from the stored trunk rows when it is used
again.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np

from mtpcode import sampling
from mtpcode.bundle import KV_FINGERPRINT, KV_HEAD_INDEX, KV_ROLE, Bundle, Manifest, open_bundle
from mtpcode.drafters.context import ContextDrafter
from mtpcode.errors import ContextOverflowError, DataError, ModelError, MtpError, NoRoom, UsageError
from mtpcode.generation import Done, GenerationOptions, Piece
from mtpcode.llama import Context, Model, TrunkCapture, default_threads, repack_pattern, use_extra_bufts
from mtpcode.policy.chooser import DraftPolicy
from mtpcode.policy.store import PolicyStore, SavedPolicies
from mtpcode.slots import Forwards, Segment, Slot
from mtpcode.speculative import Generation, Phase, Request
from mtpcode.stops import RepeatStop, StopCondition, StopReason, StopStrings

_perf = time.perf_counter
_cpu = time.thread_time


def _no_clock() -> float:
    return 0.0


class Engine:
    """A bundle loaded for generation: main context, head contexts, and ``n_seq`` slots.

    Not thread-safe: one thread drives it (``cancel`` events may be set from
    others). Starting a request on a slot ends the previous stream on that slot.

    The ``n_seq`` slots share the context's ``n_ctx`` KV cells: any one request
    may use all of them (its prompt and output up to ``n_ctx`` tokens), and
    together the slots hold at most ``n_ctx``. A request starts only when what
    it may come to need fits beside the running ones' (:class:`NoRoom` otherwise);
    idle slots give their cached prompts up for it, least recently used first.
    ``n_chunk``: the most prompt tokens one step reads while other requests
    decode, so that a long prompt does not stall their steps.

    ``n_threads`` computes one-row forwards (decoding steps, head drafts),
    ``n_threads_batch`` forwards of several rows (prefill, verification); None:
    :func:`~mtpcode.llama.default_threads`, and the same for both (llama.cpp's
    rule for ``-t`` and ``-tb``). ``policies`` keeps what the drafting policies
    learn between processes.
    """

    def __init__(self, bundle: str | os.PathLike[str] | Bundle, *, n_ctx: int = 4096, n_batch: int = 512,
                 n_threads: int | None = None, n_gpu_layers: int = 0, head_gpu_layers: int | None = None,
                 extra_bufts: str = "auto", flash_attn: bool = False, n_threads_batch: int | None = None,
                 n_seq: int = 1, n_chunk: int = 128, policies: PolicyStore | None = None) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
        self.manifest: Manifest = self.bundle.manifest
        self.n_heads = self.manifest.n_heads
        if n_ctx < 8:
            raise UsageError(f"context size {n_ctx} is too small (at least 8 tokens)")
        if n_batch < 1:
            raise UsageError(f"batch size {n_batch} must be positive")
        if n_seq < 1:
            raise UsageError(f"the number of slots must be positive, not {n_seq}")
        n_batch = max(min(n_batch, n_ctx), self.n_heads + 1, n_seq)
        extra = use_extra_bufts(extra_bufts)
        head_layers = n_gpu_layers if head_gpu_layers is None else head_gpu_layers
        self.extra_bufts = extra
        self.flash_attn = flash_attn
        self.n_gpu_layers = n_gpu_layers
        self._main_model: Model | None = None
        self._head_models: list[Model] = []
        self._contexts: list[Context] = []
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
            # the capture writes a forward's trunk rows here, in batch order (mtpcode.slots.Forwards)
            capture = TrunkCapture(self.manifest.trunk_tensor, np.zeros((n_batch, n_embd), dtype=np.float32))
            main = Context(self._main_model, n_ctx=n_ctx, n_batch=n_batch, n_threads=threads,
                           n_threads_batch=threads_batch, capture=capture, flash_attn=flash_attn, n_seq=n_seq)
            self._contexts.append(main)
            for m in self._head_models:
                self._contexts.append(Context(m, n_ctx=n_ctx, n_batch=n_batch, n_threads=threads,
                                              n_threads_batch=threads_batch, embd_input=True,
                                              flash_attn=flash_attn, n_seq=n_seq))
        except BaseException:
            self.close()
            raise
        self.n_ctx = min(n_ctx, *(ctx.n_ctx for ctx in self._contexts))
        self.n_batch = n_batch
        self.n_chunk = max(1, min(n_chunk, n_batch))
        self.n_seq = n_seq
        self.n_threads = threads
        self.n_threads_batch = threads_batch
        self.n_vocab = self._main_model.n_vocab
        self.forwards = Forwards(self._contexts[0], self._contexts[1:], capture)
        self.slots = [Slot(i, self.n_ctx, n_embd, self.n_heads) for i in range(n_seq)]
        # What a slot keeps between requests besides its caches: the context drafter's prompt
        # index (an editor re-sends the file), the drafting policies, its current request.
        self._context_drafters = [ContextDrafter() for _ in range(n_seq)]
        self._policies: dict[tuple[int, int, bool], DraftPolicy] = {}
        self._owners: list[Generation | None] = [None] * n_seq
        self._needs = [0] * n_seq  # KV cells each slot's current request may come to use
        self._last_used = [0] * n_seq  # when each slot was last released (for evicting idle caches)
        self._clock = 0
        self._saved: SavedPolicies | None = policies.for_runtime(self.runtime_id) if policies else None
        # The policy's clock: with one llama.cpp thread for every forward (which then computes in
        # this thread) the thread's CPU time, which leaves out the time other programs held the CPU:
        # on a shared machine the longer, multi-row forwards would otherwise look dearer than they are.
        self._cost_clock = _cpu if threads == 1 and threads_batch == 1 else _perf

    @property
    def runtime_id(self) -> str:
        """The bundle and the settings its speed depends on (what the saved policies are kept by)."""
        return (f"{self.manifest.fingerprint}-t{self.n_threads}-tb{self.n_threads_batch}-fa{int(self.flash_attn)}"
                f"-xb{int(self.extra_bufts)}-gpu{self.n_gpu_layers}")

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
        """The tokens whose KV entries slot 0's main cache holds (the reusable prefix)."""
        return self.slots[0].cached

    @property
    def repacked(self) -> bool:
        """Whether the main model's block weights sit in llama.cpp's CPU_REPACK buffers
        (``extra_bufts="repack"`` on a build that has them)."""
        return self._model.repacked

    @property
    def native_capture(self) -> bool:
        """Whether the trunk is captured by the C callback (else by the slower Python one)."""
        return self.forwards.capture.native

    def generate(self, prompt: str | Sequence[int], options: GenerationOptions | None = None,
                 stops: Sequence[StopCondition] = (), cancel: threading.Event | None = None, *,
                 slot: int = 0) -> Iterator[Piece | Done]:
        """Stream ``Piece`` events for the continuation of ``prompt``, then one ``Done``.

        A str prompt is tokenized with BOS. Raises ContextOverflowError here,
        before any event, when the prompt does not fit in the context; if the
        prompt fits but prompt + max_tokens does not, generation stops with
        stop_reason "context" when the context is full.
        """
        return self._stream(self.start(prompt, options, stops, cancel, slot=slot))

    def _stream(self, gen: Generation) -> Iterator[Piece | Done]:
        slot = gen.seq.id
        try:
            while True:
                self.step([gen])
                for event in gen.take_events():
                    yield event
                    if self._owners[slot] is not gen:
                        raise MtpError("this generation was superseded by a newer request on the same slot")
                if gen.finished:
                    return
        finally:
            self.release(gen)

    def start(self, prompt: str | Sequence[int], options: GenerationOptions | None = None,
              stops: Sequence[StopCondition] = (), cancel: threading.Event | None = None, *,
              slot: int = 0) -> Generation:
        """A request on ``slot``, checked and ready for its first :meth:`step` (nothing evaluated yet).

        The slot's previous request, if unfinished, is abandoned. Raises here for a
        prompt that is empty, out of the vocabulary or longer than the context.
        """
        options = options if options is not None else GenerationOptions()
        if not 0 <= slot < self.n_seq:
            raise UsageError(f"slot {slot} does not exist (this engine has {self.n_seq})")
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
        if options.repeat_stop:
            all_stops.append(RepeatStop())
        all_stops.extend(stops)
        sopts = options.sampling
        seed = None if sopts.greedy else (sopts.seed if sopts.seed is not None else sampling.new_seed())
        context = self._context_drafting(options, heads)
        suffix = self.tokenize(options.suffix, add_bos=False) if context and options.suffix else []
        seq = self.slots[slot]
        self._make_room(slot, min(self.n_ctx, len(ids) + options.max_tokens))
        # Reuse the cached prefix; the last prompt token is evaluated again (its logits choose the
        # first token). Drafting from the heads needs the trunk rows of every cached token.
        reuse = min(seq.common_prefix(ids), len(ids) - 1)
        if heads:
            reuse = min(reuse, seq.n_trunk)
        self.forwards.rewind(seq, reuse)
        request = Request(ids, options, all_stops, cancel, seed, suffix)
        gen = Generation(request, self.forwards, seq, reuse, self._model, heads=heads,
                         context=self._context_drafters[slot] if context else None,
                         policy=self._policy(slot, heads, options, context), cost_clock=self._cost_clock)
        self._owners[slot] = gen
        return gen

    def last_used(self, slot: int) -> int:
        """When ``slot`` was last released (a count of releases; 0: never used)."""
        return self._last_used[slot]

    def _make_room(self, slot: int, need: int) -> None:
        """Reserve ``need`` KV cells for a request on ``slot``: evict idle slots' caches (least
        recently used first) until its need, the running requests' and the idle caches fit in
        the cells; NoRoom when the running requests leave too little."""
        others = [i for i in range(self.n_seq) if i != slot]
        running = sum(self._needs[i] for i in others if self._owners[i] is not None)
        if running + need > self.n_ctx:
            raise NoRoom(f"the context's {self.n_ctx} tokens are taken by running requests ({running}); "
                         f"this one may need {need}")
        idle = sorted((i for i in others if self._owners[i] is None and self.slots[i].n_main),
                      key=lambda i: self._last_used[i])
        cached = sum(self.slots[i].n_main for i in idle)
        for i in idle:
            if running + need + cached <= self.n_ctx:
                break
            cached -= self.slots[i].n_main
            self.forwards.rewind(self.slots[i], 0)
        self._needs[slot] = need

    def step(self, gens: Sequence[Generation]) -> None:
        """One main forward for every generation in ``gens`` (at most one per slot): a prompt chunk
        for those still reading their prompt, a verify of the pending token and its drafts for the
        others. Their events (:meth:`Generation.take_events`) hold what it produced."""
        t0 = _perf()
        live: list[Generation] = []
        for gen in gens:
            if gen.cancel is not None and gen.cancel.is_set():
                gen.finish(StopReason.INTERRUPTED)  # between steps, or between prompt chunks
            if not gen.finished:
                live.append(gen)
        decoding = [gen for gen in live if gen.phase is Phase.DECODE]
        share = self.n_batch // max(1, len(decoding))  # the rows each verify may have
        drafting = False
        for gen in decoding:  # 1. propose: the policy picks a drafter and a length ...
            gen.plan(share - 1, len(live))  # (the policy's costs depend on what shares the forward)
            drafting = drafting or gen.drafting
        if len(decoding) > 1 and drafting:
            self._feed_heads(decoding)
        segments: list[Segment] = [gen.propose() for gen in decoding]  # ... which drafts
        budget = self.n_batch - sum(len(s.tokens) for s in segments)
        if decoding:
            budget = min(budget, self.n_chunk)
        for gen in live:
            if gen.phase is Phase.PREFILL and budget > 0:
                segments.append(gen.prompt_chunk(budget))
                budget -= len(segments[-1].tokens)
        if not segments:
            return
        clock = self._cost_clock if drafting else _no_clock  # (only a drafting policy reads the cost)
        c1 = clock()
        native = self.forwards.run(segments)  # 2. verify (and read prompts): one forward for all
        per_row = (clock() - c1) / sum(len(s.tokens) for s in segments) if drafting else 0.0
        for gen in live:
            if gen.phase is Phase.DECODE:
                # 3. accept, 4. commit, 5. observe; the policy is charged its rows' share of the forward
                gen.settle(native, per_row * len(gen.segment.tokens))
            elif gen.segment in segments:
                gen.after_prompt_chunk()
        wall = _perf() - t0
        for gen in live:
            gen.account(wall)

    def _feed_heads(self, gens: Sequence[Generation]) -> None:
        """The heads that the generations' plans draft with, one forward per head for all of them
        (each generation's head drafter then finds its logits there). The time goes to each
        generation's share."""
        clock = self._cost_clock
        for k in range(self.n_heads):
            drafting = [gen for gen in gens if gen.plan_.context <= k < gen.plan_.heads]
            if not drafting:
                continue
            for gen in drafting:
                gen.head_catch_up(k)
            c0 = clock()
            native = self.forwards.feed_head(k, [gen.seq for gen in drafting])
            cost = clock() - c0
            for gen in drafting:
                gen.charge_heads(native / len(drafting), cost / len(drafting))

    def release(self, gen: Generation) -> None:
        """The caller is done with ``gen`` (finished or not): make its slot's caches hold exactly
        what the bookkeeping says, and free the slot for the next request."""
        slot = gen.seq.id
        if self._owners[slot] is gen:
            self._owners[slot] = None
            self._needs[slot] = 0
            self._clock += 1
            self._last_used[slot] = self._clock
            if self._contexts:
                self.forwards.reconcile(gen.seq)

    def close(self) -> None:
        """Save what the drafting policies learned (with ``policies``), free every context and
        model (idempotent)."""
        saved, policies = getattr(self, "_saved", None), getattr(self, "_policies", {})
        if saved is not None and policies:
            saved.save({self._policy_key(heads, greedy): p.state()
                        for (_, heads, greedy), p in policies.items() if p.learned})
        self._policies = {}
        for ctx in reversed(getattr(self, "_contexts", [])):
            ctx.close()
        self._contexts = []
        for model in getattr(self, "_head_models", []):
            model.close()
        if (main_model := getattr(self, "_main_model", None)) is not None:
            main_model.close()
        self._head_models, self._main_model = [], None

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

    @staticmethod
    def _context_drafting(options: GenerationOptions, heads: int) -> bool:
        """Whether a generation drafts from the context: on with draft heads unless switched off,
        and with ``heads=0`` only when asked for explicitly; the per-step choice needs the adaptive policy."""
        wanted = options.context_draft if options.context_draft is not None else heads > 0
        return wanted and options.adaptive

    def _policy(self, slot: int, heads: int, options: GenerationOptions, context: bool) -> DraftPolicy:
        """The slot's adaptive policy for ``heads``; what it learned carries over to the slot's next
        request (kept apart for greedy and sampled decoding, whose acceptance differs).

        Sampling gets a fresh policy on the fixed cost model, seeded or not: its
        draft counts, hence its random draws, must depend only on the seed and
        the prompt, not on timings or on earlier calls, so that the seed a run
        reports (``Stats.seed``) repeats it.
        """
        greedy = options.sampling.greedy
        if not (options.adaptive and (heads or context)) or not greedy:
            return DraftPolicy(heads, options.adaptive, measured=greedy, flash_attn=self.flash_attn)
        key = (slot, heads, greedy)
        policy = self._policies.get(key)
        if policy is None:
            policy = self._policies[key] = DraftPolicy(heads, adaptive=True, flash_attn=self.flash_attn)
            saved = self._saved.get(self._policy_key(heads, greedy)) if self._saved is not None else None
            if saved is not None:
                policy.restore(saved)  # an invalid state is ignored: it was only a head start
        return policy

    @staticmethod
    def _policy_key(heads: int, greedy: bool) -> str:
        return f"{heads} heads, {'greedy' if greedy else 'sampled'}"
