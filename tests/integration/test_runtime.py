"""mtpcode.runtime.Engine on real tiny bundles built by the project's converter.

The central property: self-speculative greedy decoding emits exactly the
tokens of plain greedy decoding of main.gguf, with any number of heads, and
those are exactly llama-cpp-python's own ``Llama`` at temperature 0 loaded
with the same weight buffers. Every buffer mode the engine can select on this
CPU is checked against a reference made under that mode: llama.cpp's kernels,
and so its rounding, differ per buffer type (on AMX CPUs F16 weights part
within a dozen tokens between extra buffer types on and off).
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from mtpcode.errors import ContextOverflowError, ModelError, UsageError
from mtpcode.generation import Done, GenerationOptions, Piece, SamplingOptions
from mtpcode.llama import Model, cpu_has_amx, reference_llama, repack_pattern, use_extra_bufts
from mtpcode.output import TextOutput
from mtpcode.runtime import Engine

PROMPTS = [
    "def main():\n    ",
    "import os\nimport sys\n\nclass Foo(object):\n",
    "x = [i * 2 for i in range(10)]\n",
    "# caf\u00e9 \u2014 r\u00e9sum\u00e9\nprint(",
]
N_NEW = 40
CTX = 256
# Layers to offload in the equality tests: set MTPCODE_TEST_GPU_LAYERS=-1 on a GPU build of llama.cpp
# (scripts/device/device-check.sh does). Read at import: the autouse fixture clears MTPCODE_* at test time.
GPU_LAYERS = int(os.environ.get("MTPCODE_TEST_GPU_LAYERS", "0"))


def run(engine: Engine, prompt, **opts) -> tuple[list[int], list[bool], str, Done]:
    """Generate; return tokens, drafted flags, the pieces' concatenated text and the Done event."""
    stops = opts.pop("stops", ())
    tokens: list[int] = []
    flags: list[bool] = []
    text = ""
    done = None
    for ev in engine.generate(prompt, GenerationOptions(**opts), stops=stops):
        if isinstance(ev, Piece):
            assert done is None
            assert len(ev.token_ids) == len(ev.drafted)
            tokens += ev.token_ids
            flags += ev.drafted
            text += ev.text
        else:
            done = ev
    assert isinstance(done, Done)
    assert done.stats.generated_tokens == len(tokens)
    return tokens, flags, text, done


QUANTIZED = ("Q8_0", "Q4_0", "Q4_K_M")


def buffer_modes(quant: str) -> list[str]:
    """The weight-buffer modes the engine can select for ``quant`` on this CPU ("auto" resolves to "on" or "off").

    Extra buffer types on is llama.cpp's AMX path, which segfaults on quantized weights: the engine never selects it
    there unless told to, and a test must not crash the test process with it.
    """
    return ["off", "repack"] + ([] if cpu_has_amx() and quant in QUANTIZED else ["on"])


def llama_cpp_greedy(main_gguf: Path, ids: list[int], n: int, flash_attn: bool = False,
                     mode: str = "auto") -> list[int]:
    """Reference: llama-cpp-python's high-level Llama at temperature 0, with the engine's flash-attention setting and
    its weight buffers under ``mode`` (an extra_bufts policy)."""
    repack = repack_pattern(main_gguf) if mode == "repack" else ""
    llm = reference_llama(main_gguf, extra_bufts=use_extra_bufts(mode), repack=repack, n_ctx=CTX, n_threads=1,
                          verbose=False, flash_attn=flash_attn, n_gpu_layers=GPU_LAYERS)
    try:
        out: list[int] = []
        for tok in llm.generate(ids, temp=0.0, repeat_penalty=1.0):
            if tok == llm.token_eos() or len(out) >= n:
                break
            out.append(tok)
        return out
    finally:
        llm.close()


def _check_greedy_equality(bundle: Path, flash_attn: bool = False, mode: str = "auto") -> tuple[int, int, int]:
    """Every prompt and head count vs llama-cpp-python under the same buffer ``mode``;
    returns (drafted, accepted, forwards) over all runs."""
    drafted = accepted = forwards = 0
    with Engine(bundle, n_ctx=CTX, n_threads=1, flash_attn=flash_attn, extra_bufts=mode,
                n_gpu_layers=GPU_LAYERS) as engine:
        assert engine.n_heads == 3
        for prompt in PROMPTS:
            ids = engine.tokenize(prompt)
            ref = llama_cpp_greedy(bundle / "main.gguf", ids, N_NEW, flash_attn=flash_attn, mode=mode)
            assert len(ref) > 0
            # every head count, adaptive or not, with and without drafts from the context (heads=0 with
            # context drafts on is context-only drafting)
            configs = [(0, False, False), (0, False, True)]
            configs += [(h, a, c) for h in range(1, engine.n_heads + 1) for a in (False, True) for c in (False, True)]
            for heads, adaptive, context in configs:
                tokens, flags, text, done = run(engine, ids, max_tokens=N_NEW, heads=heads, adaptive=adaptive,
                                                context_draft=context)
                where = f"heads={heads} adaptive={adaptive} context={context} prompt={prompt!r}"
                assert tokens == ref, where
                assert text == done.text == engine.detokenize(tokens)
                assert done.stop_reason == ("max_tokens" if len(ref) == N_NEW else "eos")
                st = done.stats
                assert st.heads_used == heads and len(st.drafted_tokens) == heads
                assert sum(st.drafted_tokens) == st.drafted_by_source["heads"]
                assert sum(st.accepted_tokens) == st.accepted_by_source["heads"]
                if not context:
                    assert st.drafted_by_source["context"] == 0, where
                # accepted drafts are flagged (an EOS among them may end the output early)
                all_accepted = sum(st.accepted_by_source.values())
                assert sum(flags) <= all_accepted
                if done.stop_reason == "max_tokens":
                    assert sum(flags) == all_accepted
                drafted += sum(st.drafted_tokens)
                accepted += sum(st.accepted_tokens)
                forwards += st.main_forwards
                if heads == 0 and not context:
                    # one token per forward after the prefill's (an EOS costs a forward too)
                    assert st.main_forwards == len(tokens) - (done.stop_reason == "max_tokens")
    return drafted, accepted, forwards


@pytest.mark.parametrize("mode", ["auto", "on", "off", "repack"])
@pytest.mark.parametrize("quant,flash_attn", [("F32", False), ("F16", False), ("F32", True), ("F16", True)])
def test_greedy_speculative_equals_plain_and_llama_cpp(make_bundle, quant, flash_attn, mode) -> None:
    """Speculative == plain == Llama, for every buffer mode the engine can select here, each against a Llama loaded
    under the same mode (the F16 case is the one that parts between modes on AMX CPUs)."""
    if mode != "auto" and mode not in buffer_modes(quant):
        pytest.skip(f"extra_bufts={mode} with {quant} is the AMX crash on this CPU; the engine never selects it")
    _check_greedy_equality(make_bundle(quant=quant), flash_attn=flash_attn, mode=mode)


@pytest.mark.parametrize("quant", QUANTIZED)
def test_plain_quantized_decoding_equals_llama_cpp_per_buffer_mode(make_bundle, quant) -> None:
    """Plain decoding of a quantized main.gguf is token for token llama-cpp-python's under every buffer mode the engine
    can select on this CPU (speculative output of quantized bundles may part from plain at near-ties, because batched
    and one-row quantized kernels round differently; test_runtime_quant measures that)."""
    bundle = make_bundle(quant=quant)
    for mode in buffer_modes(quant):
        with Engine(bundle, n_ctx=CTX, n_threads=1, extra_bufts=mode, flash_attn=False,
                    n_gpu_layers=GPU_LAYERS) as engine:
            for prompt in PROMPTS[:2]:
                ids = engine.tokenize(prompt)
                tokens = run(engine, ids, max_tokens=N_NEW, heads=0)[0]
                assert tokens == llama_cpp_greedy(bundle / "main.gguf", ids, N_NEW, mode=mode), (mode, prompt)


@pytest.mark.parametrize("n_future", [1, 2])
def test_bundles_with_fewer_heads(make_bundle, n_future) -> None:
    bundle = make_bundle(n_future_tokens=n_future)
    with Engine(bundle, n_ctx=CTX, n_threads=1, flash_attn=False, n_gpu_layers=GPU_LAYERS) as engine:
        assert engine.n_heads == n_future - 1
        ids = engine.tokenize(PROMPTS[0])
        ref = llama_cpp_greedy(bundle / "main.gguf", ids, N_NEW)
        for heads in range(n_future):
            assert run(engine, ids, max_tokens=N_NEW, heads=heads)[0] == ref
        assert run(engine, ids, max_tokens=N_NEW)[3].stats.heads_used == n_future - 1  # None: all


def test_accepted_drafts_keep_greedy_output_exact(agree_bundle) -> None:
    drafted, accepted, _ = _check_greedy_equality(agree_bundle)
    # both paths exercised: drafts accepted (tokens per forward > 1) and rejected (rollback)
    assert 0 < accepted < drafted


def test_accepting_bundle_yields_more_than_one_token_per_forward(agree_bundle) -> None:
    with Engine(agree_bundle, n_ctx=CTX, n_threads=1) as engine:
        tokens, flags, _, done = run(engine, PROMPTS[2], max_tokens=N_NEW, heads=3, adaptive=False)
        plain, _, _, plain_done = run(engine, PROMPTS[2], max_tokens=N_NEW, heads=0)
    assert tokens == plain
    assert any(flags)
    assert done.stats.tokens_per_forward > 1.2
    assert done.stats.main_forwards < plain_done.stats.main_forwards
    assert done.stats.acceptance[0] > 0


def test_prefix_reuse_matches_cold_start_and_evaluates_only_new_tokens(agree_bundle) -> None:
    opts = dict(max_tokens=24, heads=3)
    with Engine(agree_bundle, n_ctx=CTX, n_threads=1) as warm:
        p1 = warm.tokenize(PROMPTS[2])
        gen1, _, _, d1 = run(warm, p1, **opts)
        assert d1.stats.prompt_tokens_processed == len(p1)
        # an editor re-sends the prompt plus the accepted completion plus new typing
        p2 = p1 + gen1 + warm.tokenize("\n    def f(self):\n", add_bos=False)
        gen2, _, _, d2 = run(warm, p2, **opts)
        assert d2.stats.prompt_tokens == len(p2)
        # the last generated token was never evaluated; everything before it was
        assert d2.stats.prompt_tokens_processed == len(p2) - (len(p1) + len(gen1) - 1)
        # identical prompt again: only the last token is re-evaluated (its logits pick the first token)
        gen3, _, _, d3 = run(warm, p2, **opts)
        assert d3.stats.prompt_tokens_processed == 1 and gen3 == gen2
        # a prompt diverging after a shared prefix, with fewer heads (the rest lag and catch up later)
        p4 = p1[:6] + warm.tokenize("for i in range(3):\n", add_bos=False)
        gen4, _, _, d4 = run(warm, p4, max_tokens=24, heads=1)
        assert d4.stats.prompt_tokens_processed == len(p4) - 6
        gen5, _, _, _ = run(warm, p2, **opts)
        assert gen5 == gen2
    with Engine(agree_bundle, n_ctx=CTX, n_threads=1) as cold:
        assert run(cold, p2, **opts)[0] == gen2
    with Engine(agree_bundle, n_ctx=CTX, n_threads=1) as cold:
        assert run(cold, p4, max_tokens=24, heads=1)[0] == gen4


def test_prompt_longer_than_context_raises_before_any_event(tiny_bundle) -> None:
    with Engine(tiny_bundle, n_ctx=32, n_threads=1) as engine:
        ids = engine.tokenize("x = 1\n" * 40)
        assert len(ids) > 32
        message = rf"prompt is {len(ids)} tokens but the context holds 32; use --ctx"
        with pytest.raises(ContextOverflowError, match=message):
            engine.generate(ids)
        # still usable afterwards
        assert run(engine, "x = 1\n", max_tokens=4)[3].stats.generated_tokens == 4


@pytest.mark.parametrize("heads", [0, 3])
def test_generation_stops_with_context_when_full(agree_bundle, heads) -> None:
    with Engine(agree_bundle, n_ctx=CTX, n_threads=1) as big:
        ids = big.tokenize(PROMPTS[2])
        ref = run(big, ids, max_tokens=64, heads=0)[0]
    n_ctx = len(ids) + 20
    with Engine(agree_bundle, n_ctx=n_ctx, n_threads=1) as engine:
        tokens, _, _, done = run(engine, ids, max_tokens=64, heads=heads)
        assert done.stop_reason == "context"
        assert len(ids) + len(tokens) == n_ctx
        assert tokens == ref[: len(tokens)]
        # a prompt exactly filling the context generates nothing
        full = ref[: n_ctx - len(ids)]
        tokens, _, _, done = run(engine, ids + full, max_tokens=8, heads=heads)
        assert tokens == [] and done.stop_reason == "context"


def test_stop_string_cuts_output_and_is_not_emitted(tiny_bundle) -> None:
    with Engine(tiny_bundle, n_ctx=CTX, n_threads=1) as engine:
        _, _, full, _ = run(engine, PROMPTS[0], max_tokens=N_NEW, heads=3)
        stop = full[12:15]
        cut = full.find(stop)
        _, _, text, done = run(engine, PROMPTS[0], max_tokens=N_NEW, heads=3, stop=(stop,))
    assert done.stop_reason == "stop"
    assert text == done.text == full[:cut]
    assert stop not in text


class StopAtNewline:
    """A front end's stop condition: the first completed line."""

    reason = "line"

    def check(self, text: str) -> int | None:
        i = text.find("\n")
        return i if i >= 0 else None

    def holdback(self, text: str) -> int:
        return 0


def test_custom_stop_condition_and_its_reason(tiny_bundle) -> None:
    with Engine(tiny_bundle, n_ctx=CTX, n_threads=1) as engine:
        _, _, full, _ = run(engine, PROMPTS[2], max_tokens=N_NEW, heads=2)
        _, _, text, done = run(engine, PROMPTS[2], max_tokens=N_NEW, heads=2, stops=[StopAtNewline()])
    if "\n" in full:
        assert done.stop_reason == "line" and text == done.text == full[: full.index("\n")]
    else:
        assert done.stop_reason == "max_tokens" and text == full


def test_incremental_detokenization_waits_for_whole_utf8_characters(tiny_bundle) -> None:
    with Engine(tiny_bundle, n_ctx=CTX, n_threads=1) as engine:
        ids = engine.tokenize("\u20ac\u00e9", add_bos=False)  # not in the 512-piece vocabulary: byte fallback
        assert len(ids) == 5
    with Model(tiny_bundle / "main.gguf") as model:
        out = TextOutput(model.token_bytes, ())
        shown = [out.push([t]) for t in ids]
        assert shown == ["", "", "\u20ac", "", "\u00e9"]
        assert out.push([], final=True) == ""


class Explode:
    """Raises KeyboardInterrupt at the n-th check, as Ctrl-C in the middle of decoding would."""

    reason = "never"

    def __init__(self, n: int) -> None:
        self.n = n

    def check(self, text: str) -> int | None:
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt
        return None

    def holdback(self, text: str) -> int:
        return 0


def test_keyboard_interrupt_and_cancel_leave_engine_consistent(agree_bundle) -> None:
    opts = dict(max_tokens=30, heads=3)
    with Engine(agree_bundle, n_ctx=CTX, n_threads=1) as cold:
        ref = run(cold, PROMPTS[2], **opts)[0]
    with Engine(agree_bundle, n_ctx=CTX, n_threads=1) as engine:
        with pytest.raises(KeyboardInterrupt):
            run(engine, PROMPTS[2], stops=[Explode(4)], **opts)
        assert run(engine, PROMPTS[2], **opts)[0] == ref
        # cancel from "another thread" after the first piece
        cancel = threading.Event()
        events = []
        for ev in engine.generate(PROMPTS[2], GenerationOptions(**opts), cancel=cancel):
            events.append(ev)
            cancel.set()
        assert isinstance(events[-1], Done) and events[-1].stop_reason == "interrupted"
        got = [t for ev in events[:-1] for t in ev.token_ids]
        assert got == ref[: len(got)] and len(got) < len(ref)
        # an abandoned stream, then a new one
        stream = engine.generate(PROMPTS[0], GenerationOptions(**opts))
        next(stream)
        assert run(engine, PROMPTS[2], **opts)[0] == ref
        from mtpcode.errors import MtpError

        with pytest.raises(MtpError, match="superseded"):
            list(stream)
        assert run(engine, PROMPTS[2], **opts)[0] == ref


def test_cancel_during_a_long_prefill_stops_it_and_keeps_the_evaluated_prefix(tiny_bundle) -> None:
    prompt = "for i in range(10):\n    x = i * 2\n" * 20
    with Engine(tiny_bundle, n_ctx=1024, n_batch=16, n_threads=1) as engine:
        ids = engine.tokenize(prompt)
        ref = run(engine, ids, max_tokens=8, heads=3)[0]
        other = engine.tokenize("# a different file\n" + prompt)
        before = engine.cached_tokens
        common = next(i for i, (a, b) in enumerate(zip(before, other)) if a != b)
        assert len(other) - common > 4 * 16
        cancel = threading.Event()
        gen = engine.start(other, GenerationOptions(max_tokens=8, heads=3), cancel=cancel)
        for _ in range(3):  # three prompt chunks of 16 tokens, then Ctrl-C in the REPL
            engine.step([gen])
            assert not gen.take_events()
        cancel.set()
        engine.step([gen])  # no 4th chunk
        events = gen.take_events()
        engine.release(gen)
        assert len(events) == 1 and events[0].stop_reason == "interrupted" and events[0].text == ""
        assert events[0].stats.prompt_tokens_processed == 3 * 16
        assert engine.cached_tokens == other[: common + 3 * 16]  # the evaluated prefix stays cached
        assert run(engine, ids, max_tokens=8, heads=3)[0] == ref  # and the engine goes on as before


def test_sampling_is_reproducible_with_a_seed(tiny_bundle) -> None:
    sampling = SamplingOptions(temperature=0.9, top_k=40, top_p=0.95, min_p=0.02, seed=1234)
    with Engine(tiny_bundle, n_ctx=CTX, n_threads=1) as engine:
        a, _, _, da = run(engine, PROMPTS[0], max_tokens=20, heads=3, sampling=sampling)
        b, _, _, db = run(engine, PROMPTS[0], max_tokens=20, heads=3, sampling=sampling)
        _, _, _, dc = run(engine, PROMPTS[0], max_tokens=20, heads=3,
                          sampling=SamplingOptions(temperature=0.9, seed=None))
    with Engine(tiny_bundle, n_ctx=CTX, n_threads=1) as fresh:
        d = run(fresh, PROMPTS[0], max_tokens=20, heads=3, sampling=sampling)[0]
    assert a == b == d and da.stats.seed == db.stats.seed == 1234
    assert isinstance(dc.stats.seed, int)


def test_invalid_head_count_is_a_usage_error(tiny_bundle) -> None:
    with Engine(tiny_bundle, n_ctx=64, n_threads=1) as engine, \
            pytest.raises(UsageError, match="heads must be between 0 and 3"):
        engine.generate("x", GenerationOptions(heads=4))


def test_head_from_another_model_is_rejected(make_bundle, tmp_path) -> None:
    ours, other = make_bundle(), make_bundle(seed=1)
    mixed = tmp_path / "mixed"
    shutil.copytree(ours, mixed)
    shutil.copy(other / "head-2.gguf", mixed / "head-2.gguf")  # same shape, same size
    with pytest.raises(ModelError, match=r"head-2\.gguf does not belong to main\.gguf \(fingerprint"):
        Engine(mixed, n_ctx=64, n_threads=1)


def test_default_threads_count_physical_cores(tmp_path) -> None:
    import os

    from mtpcode.llama import default_threads, physical_cores

    usable = sorted(os.sched_getaffinity(0))
    smt = tmp_path / "smt"  # every usable CPU pairs up with a hyperthread sibling
    for cpu in usable:
        (smt / f"cpu{cpu}" / "topology").mkdir(parents=True)
        (smt / f"cpu{cpu}" / "topology" / "thread_siblings_list").write_text(f"{cpu // 2 * 2}-{cpu // 2 * 2 + 1}\n")
    assert physical_cores(str(smt)) == len({cpu // 2 for cpu in usable})
    assert physical_cores(str(tmp_path / "missing")) == len(usable)  # no topology: every CPU counts
    assert default_threads(3_900_000) == 1  # small models: one thread
    assert default_threads(7_000_000_000) == physical_cores() >= 1


def test_steps_and_batches_get_their_own_thread_counts(tiny_bundle) -> None:
    """One-row steps on ``n_threads``, prefill and verification on ``n_threads_batch``; by default
    both are the step's count (one thread for a small model), as llama.cpp's -tb follows -t. The
    counts reach the llama.cpp contexts, heads included."""
    import llama_cpp

    def counts(engine: Engine) -> set[tuple[int, int]]:
        ctxs = [engine.forwards.main, *engine.forwards.heads]
        return {(llama_cpp.llama_n_threads(c.ptr), llama_cpp.llama_n_threads_batch(c.ptr)) for c in ctxs}

    with Engine(tiny_bundle, n_ctx=64) as e:
        assert (e.n_threads, e.n_threads_batch) == (1, 1)
        assert counts(e) == {(1, 1)}
    with Engine(tiny_bundle, n_ctx=64, n_threads=3) as e:
        assert counts(e) == {(3, 3)}
    with Engine(tiny_bundle, n_ctx=64, n_threads=1, n_threads_batch=2) as e:
        assert counts(e) == {(1, 2)}


def test_extra_bufts_policy(tmp_path) -> None:
    amx = tmp_path / "cpuinfo-amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile amx_int8\n")
    plain = tmp_path / "cpuinfo"
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    assert cpu_has_amx(str(amx)) and not cpu_has_amx(str(plain))
    assert use_extra_bufts("auto") == (not cpu_has_amx())
    assert use_extra_bufts("on") and not use_extra_bufts("off") and not use_extra_bufts("repack")


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("native_capture", [True, False])
def test_ctrl_c_during_prefill_propagates_and_engine_recovers(tiny_bundle, capfd, monkeypatch,
                                                              native_capture) -> None:
    """SIGINT while llama_decode runs: with the Python trunk callback it lands inside the
    callback, with the C one after llama_decode returns; either way it must not be swallowed."""
    import os
    import signal

    import mtpcode.llama

    if not native_capture:
        monkeypatch.setattr(mtpcode.llama, "_native_capture", None)

    body = "for i in range(10):\n    x = i * 2\n" * 60
    prompts = [body, "# other\n" + body]  # alternate: no shared prefix, a full prefill each time
    with Engine(tiny_bundle, n_ctx=2048, n_batch=64, n_threads=1) as cold:
        ids = cold.tokenize(body)
        assert 600 < len(ids) < 2000
        ref = run(cold, ids, max_tokens=8, heads=3)[0]
    with Engine(tiny_bundle, n_ctx=2048, n_batch=64, n_threads=1) as engine:
        for _attempt in range(4):  # a signal lost in the callback fails the attempt; repeat to catch it
            timer = threading.Timer(0.03, os.kill, (os.getpid(), signal.SIGINT))
            timer.start()
            with pytest.raises(KeyboardInterrupt):
                for i in range(200):  # until the signal arrives; nearly all the time is in the main prefill
                    run(engine, prompts[i % 2], max_tokens=1, heads=0)
            timer.join()
        assert "Exception ignored" not in capfd.readouterr().err
        assert run(engine, ids, max_tokens=8, heads=3)[0] == ref


def test_adaptive_policy_learns_across_calls(tiny_bundle) -> None:
    """Random heads are never accepted: after one long call the next starts without them."""
    with Engine(tiny_bundle, n_ctx=CTX, n_threads=1) as engine:
        first = run(engine, PROMPTS[0], max_tokens=80, heads=3)[3].stats
        second = run(engine, PROMPTS[2], max_tokens=20, heads=3)[3].stats
        assert first.drafted_tokens[0] >= 4  # warm-up with one head
        assert sum(second.drafted_tokens) <= 2  # at most a probe
        # seeded sampling does not use (or change) what greedy decoding learned
        opts = dict(max_tokens=20, heads=3, sampling=SamplingOptions(temperature=1.0, seed=3))
        assert run(engine, PROMPTS[2], **opts)[3].stats.drafted_tokens[0] >= 4  # a fresh policy's warm-up


def test_what_the_policy_learned_starts_the_next_engine(tiny_bundle, tmp_path) -> None:
    """With a policy store (the CLI's cache), a new engine (a new `mtpcode complete`) skips the warm-up."""
    import json

    from mtpcode.policy.store import PolicyStore

    policies = tmp_path / "policy"
    with Engine(tiny_bundle, n_ctx=CTX, n_threads=1, policies=PolicyStore(policies)) as first:
        run(first, PROMPTS[0], max_tokens=80, heads=3)  # random heads: never accepted
    (saved,) = policies.glob("*.json")
    state = json.loads(saved.read_text())["3 heads, greedy"]
    assert state["chain"][0] < 0.2 and set(state["t_verify"]) >= {"1", "2"}

    def drafted(**kwargs) -> list[int]:
        with Engine(tiny_bundle, n_ctx=CTX, n_threads=1, **kwargs) as engine:
            return run(engine, PROMPTS[2], max_tokens=20, heads=3)[3].stats.drafted_tokens

    assert sum(drafted(policies=PolicyStore(policies))) <= 2  # no warm-up: at most a probe
    assert drafted()[0] >= 4  # without it, the warm-up drafts with one head
    assert drafted(policies=PolicyStore(tmp_path / "other"))[0] >= 4  # nothing saved there yet
    # a damaged or foreign file is only a lost head start
    for bad in ("{not json", json.dumps({"3 heads, greedy": {**state, "chain": [2.0, 0.0, 0.0]}}), "[]"):
        saved.write_text(bad)
        assert drafted(policies=PolicyStore(policies))[0] >= 4
    # another thread count is another file (timings differ)
    with Engine(tiny_bundle, n_ctx=CTX, n_threads=2, policies=PolicyStore(policies)) as two:
        run(two, PROMPTS[0], max_tokens=40, heads=3)
    assert len(list(policies.glob("*.json"))) == 2


def test_small_batches_chunk_prefill_and_head_catch_up(agree_bundle) -> None:
    prompt = PROMPTS[1] + PROMPTS[2] * 4
    with Engine(agree_bundle, n_ctx=CTX, n_threads=1) as big:
        ids = big.tokenize(prompt)
        ref = run(big, ids, max_tokens=N_NEW, heads=0)[0]
    with Engine(agree_bundle, n_ctx=CTX, n_batch=2, n_threads=1) as small:  # raised to heads + 1 = 4
        assert small.n_batch == 4 and len(ids) > 10 * small.n_batch
        assert run(small, ids, max_tokens=N_NEW, heads=3, adaptive=False)[0] == ref


def test_corrupt_gguf_is_a_model_error_naming_the_file(tiny_bundle, tmp_path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    with open(broken / "main.gguf", "r+b") as f:  # same size, so the manifest check passes
        f.seek(100)
        f.write(b"\xff" * 64)
    with pytest.raises(ModelError, match=r"main\.gguf: llama\.cpp could not load the model \(.*failed"):
        Engine(broken, n_ctx=64, n_threads=1)


def test_the_seed_a_sampled_run_reports_repeats_it(agree_bundle) -> None:
    """Without a seed a run draws one and reports it; passing it back gives the same text, even though the engine
    has meanwhile learned (greedy) timings: sampled runs draft on the fixed cost model."""
    with Engine(agree_bundle, n_ctx=CTX, n_threads=1) as engine:
        run(engine, PROMPTS[0], max_tokens=60, heads=3)  # greedy: the shared policy learns timings
        first = run(engine, PROMPTS[2], max_tokens=40, heads=3, sampling=SamplingOptions(temperature=1.0))
        seed = first[3].stats.seed
        assert isinstance(seed, int)
        again = run(engine, PROMPTS[2], max_tokens=40, heads=3, sampling=SamplingOptions(temperature=1.0, seed=seed))
    assert again[0] == first[0] and again[3].stats.main_forwards == first[3].stats.main_forwards
