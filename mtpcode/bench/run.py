"""``mtpcode bench``: speculative vs plain decoding of one bundle, side by side,
on code prompts; and (``--synthetic``) a cost model at real model sizes.

The real benchmark runs, for every prompt and every repetition, plain decoding
(no drafts), an A/A control, speculative decoding with each head count (heads
only), drafts from the context alone, the product's default (every head and
the context, chosen per step), and llama-cpp-python's own ``Llama`` on the
same ``main.gguf`` (the anchor), in an order rotated per prompt and
repetition, so that the drifts of a shared, noisy machine spread over all
configurations. It reports medians and within-repetition ratios, tokens per
forward per draft source, and checks that greedy output is the same token for
token in every configuration.

Two prompt sets are built in: ``general`` (held-out standard-library files,
the model writes a function body) and ``editing`` (third-party code installed
here, at places where the completion repeats text from the file or from the
text after the cursor).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import platform
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters.data import is_heldout, iter_sources
from mtpcode.bench import synthetic as S
from mtpcode.bench.ceiling import ceiling_summary, context_ceiling
from mtpcode.bench.costmodel import PAPER_SPEEDUP, PAPER_TOKENS_PER_FORWARD
from mtpcode.bench.measure import (
    REPACK_QUANTS,
    bytes_per_forward,
    common_prefix,
    cpu_name,
    measure_costs,
    median,
    memory_bandwidth,
    peak_rss_mb,
    reset_peak_rss,
    rss_mb,
)
from mtpcode.bench.svg import Panel, Series, render
from mtpcode.bundle import open_bundle
from mtpcode.drafters.context import ContextDrafter
from mtpcode.errors import DataError, NoInputError, UsageError
from mtpcode.files import atomic_write_text
from mtpcode.generation import Done, GenerationOptions, Piece, Stats

SCHEMA = "mtpcode-bench/2"
SLOW_BAR = 0.95  # a speculative configuration slower than this fraction of plain is flagged
# Speedups are medians over repetitions of (configuration / plain) in the same
# repetition, on two clocks: wall-clock, and CPU time of the decoding thread.
# CPU time leaves out the time other programs held the CPU (not their contention
# for caches and memory, which the A/A control shows). It is the whole decode
# only when llama.cpp runs one thread (it computes in the calling thread), so
# the bar is checked on CPU time then, and on wall-clock time otherwise.


# ---------------------------------------------------------------------------
# prompts


@dataclass(frozen=True)
class Prompt:
    """A bench prompt: the text before the cursor and, for completions inside a file, the text after it."""

    name: str
    text: str
    suffix: str = ""


@dataclass(frozen=True)
class BenchConfig:
    """One configuration the bench runs; ``key`` names its results in the JSON document.

    ``control`` is the A/A control (plain decoding run a second time as its own
    configuration: its "speedup" over plain is pure measurement noise, shown
    next to the real ones); ``anchor`` is llama-cpp-python's own ``Llama``.
    """

    key: str
    heads: int = 0
    context: bool = False
    control: bool = False
    anchor: bool = False

    @property
    def plain(self) -> bool:
        """Plain decoding in the engine (the reference, or its A/A control)."""
        return not (self.heads or self.context or self.anchor)

    @property
    def speculative(self) -> bool:
        return bool(self.heads or self.context)

    @property
    def label(self) -> str:
        return self.key


PLAIN = BenchConfig("plain")
CONTROL = BenchConfig("plain-again", control=True)
ANCHOR = BenchConfig("llama.cpp", anchor=True)
CONTEXT_ONLY = BenchConfig("context", context=True)


def heads_config(k: int, context: bool = False) -> BenchConfig:
    """Speculative decoding with ``k`` heads (and, with ``context``, drafts from the context)."""
    name = f"{k} head{'s' if k != 1 else ''}"
    return BenchConfig(f"{name} + context" if context else name, heads=k, context=context)


def bench_configs(n_heads: int, heads: Sequence[int] | None, *, context: bool, anchor: bool) -> list[BenchConfig]:
    """The configurations of a run: plain, the A/A control, heads only per count, context only and
    every head with the context (the product's default), and the anchor."""
    head_list = sorted(set(range(1, n_heads + 1) if heads is None else heads) - {0})
    bad = [h for h in head_list if not 0 < h <= n_heads]
    if bad:
        raise UsageError(f"--heads {bad[0]}: this bundle has {n_heads} draft heads")
    configs = [PLAIN, CONTROL, *(heads_config(k) for k in head_list)]
    if context:
        configs.append(CONTEXT_ONLY)
        if head_list:
            configs.append(heads_config(max(head_list), context=True))
    if anchor:
        configs.append(ANCHOR)
    return configs


def _snippet(text: str, max_chars: int, min_context_lines: int = 12, min_body_lines: int = 6) -> tuple[int, str] | None:
    """The text of a file up to and including a ``def`` line that has a body to write.

    Picks the first def with at least ``min_context_lines`` lines before it and
    ``min_body_lines`` non-blank body lines after it; the prompt keeps the
    lines before it that fit in ``max_chars``. Returns (1-based line, prompt).
    """
    lines = text.split("\n")
    for i, line in enumerate(lines):
        m = re.match(r"(\s*)def \w+\(.*\):\s*$", line)
        if not m or i < min_context_lines:
            continue
        indent = len(m.group(1))
        body = 0
        for nxt in lines[i + 1: i + 1 + 3 * min_body_lines]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                break
            body += bool(nxt.strip())
        if body < min_body_lines:
            continue
        keep: list[str] = [line]
        size = len(line) + 1
        for prev in reversed(lines[:i]):
            if size + len(prev) + 1 > max_chars:
                break
            keep.insert(0, prev)
            size += len(prev) + 1
        return i + 1, "\n".join(keep) + "\n"
    return None


def default_prompts(n: int = 8, max_chars: int = 1500) -> list[Prompt]:
    """Held-out Python standard-library snippets: a file's text up to a function's
    signature, for the model to write the body.

    The files are the trainer's held-out split (``converters.data.is_heldout``,
    a hash of the path), so the built-in model has not seen them; they are
    taken in the order of a hash of their path, deterministically.
    """
    held = [s for s in iter_sources() if is_heldout(s.rel_path)]
    held.sort(key=lambda s: hashlib.sha256(("bench|" + s.rel_path).encode()).hexdigest())
    prompts: list[Prompt] = []
    for src in held:
        found = _snippet(src.text, max_chars)
        if found is not None:
            line, text = found
            prompts.append(Prompt(f"{src.rel_path}:{line}", text))
        if len(prompts) >= n:
            break
    if not prompts:
        raise NoInputError("no held-out standard-library snippets found; pass --prompts FILE|DIR")
    return prompts


# Third-party packages for the editing set: real code the built-in model was not
# trained on (its corpus holds these three out: converters.corpus.EVAL_PACKAGES),
# installed with mtpcode itself. numpy was a fourth until the built-in model trained on it.
EDITING_PACKAGES = ("click", "prompt_toolkit", "pygments")


def package_files(packages: Sequence[str], min_chars: int = 2_000,
                  max_chars: int = 400_000) -> list[tuple[str, str]]:
    """(name, text) of the installed packages' Python files of more than ``min_chars`` and fewer than
    ``max_chars`` characters, in sorted order (missing packages skipped); name is package/relative path."""
    out = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in sorted(root.rglob("*.py")):
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if min_chars < len(text) < max_chars:
                out.append((f"{name}/{path.relative_to(root).as_posix()}", text))
    return out


def _repeated_lines(lines: list[str], start: int, count: int) -> float:
    """Fraction of the ``count`` non-blank lines from ``start`` that occur, stripped, in ``lines[:start]``."""
    seen = {ln.strip() for ln in lines[:start] if ln.strip()}
    body = [ln.strip() for ln in lines[start:] if ln.strip()][:count]
    return sum(ln in seen for ln in body) / len(body) if len(body) == count else 0.0


def _edit_points(name: str, text: str, max_chars: int) -> Iterator[Prompt]:
    """Editing-style completions in one file, each at most ``max_chars`` of prompt.

    * ``repeat``: a ``def`` whose next lines mostly repeat lines above it (a
      function like the one before it, a test case following a similar one);
      the prompt ends with its signature.
    * ``retype``: a block duplicated in place: the prompt ends half-way into
      the first line of a block, and the suffix is that block and what
      follows, as when a line is retyped before identical text.
    """
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if i < 20 or not re.match(r"\s*def \w+\(.*\):\s*$", line):
            continue
        if _repeated_lines(lines, i + 1, 6) >= 0.5:
            prompt = "\n".join(lines[: i + 1]) + "\n"
            yield Prompt(f"{name}:{i + 1}:repeat", prompt[-max_chars:].split("\n", 1)[-1])
        body = lines[i + 1: i + 9]
        if len(body) == 8 and all(ln.strip() for ln in body[:3]):
            first = body[0]
            cut = len(first) - len(first.lstrip()) + max(1, len(first.strip()) // 2)
            before = "\n".join(lines[: i + 1]) + "\n" + first[:cut]
            suffix = "\n".join(lines[i + 1: i + 40])
            yield Prompt(f"{name}:{i + 2}:retype", before[-max_chars:].split("\n", 1)[-1], suffix[:max_chars // 2])


def editing_prompts(n: int = 8, max_chars: int = 3000, packages: Sequence[str] = EDITING_PACKAGES) -> list[Prompt]:
    """Editing-style prompts from third-party code installed here (see :func:`_edit_points`), half
    ``repeat`` and half ``retype``, taken in the order of a hash of their names, deterministically.

    Held out from any tuning of the drafting policy: its parameters were set
    before this set was built.
    """
    kinds: dict[str, list[Prompt]] = {"repeat": [], "retype": []}
    for name, text in package_files(packages):
        for q in _edit_points(name, text, max_chars):
            kinds[q.name.rsplit(":", 1)[1]].append(q)
    prompts: list[Prompt] = []
    for kind, found in kinds.items():
        want = (n + 1) // 2 if kind == "repeat" else n - len(prompts)
        # one prompt per file, packages in turn: variety over one file's or one project's habits
        by_package: dict[str, list[Prompt]] = {}
        files: set[str] = set()
        for q in sorted(found, key=lambda q: hashlib.sha256(("edit|" + q.name).encode()).hexdigest()):
            file = q.name.split(":", 1)[0]
            if file not in files:
                files.add(file)
                by_package.setdefault(file.split("/", 1)[0], []).append(q)
        queues = [by_package[p] for p in packages if p in by_package]
        taken = 0
        while taken < want and any(queues):
            for queue in queues:
                if queue and taken < want:
                    prompts.append(queue.pop(0))
                    taken += 1
    if not prompts:
        raise NoInputError(f"no editing-style prompts found: none of {', '.join(packages)} is installed; "
                           "pass --prompts FILE|DIR")
    return prompts


PROMPT_SETS = ("general", "editing")


def prompt_set(spec: str, n: int) -> list[Prompt]:
    """A built-in prompt set by name (``general``, ``editing``), or the prompts of a file or directory."""
    if spec == "general":
        return default_prompts(n)
    if spec == "editing":
        return editing_prompts(n)
    return load_prompts(spec)


def load_prompts(path: str | os.PathLike[str]) -> list[Prompt]:
    """Prompts from a file or directory.

    A directory: every regular file in it (sorted by name) is one prompt. A
    ``.jsonl`` file: one prompt per line, a JSON string or an object with
    ``prompt`` (and optionally ``name``). Any other file: its whole text is one prompt.
    """
    p = Path(path)
    if not p.exists():
        raise NoInputError(f"prompts not found: {p}")
    try:
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
            prompts = [Prompt(f.name, f.read_text(encoding="utf-8")) for f in files]
        elif p.suffix == ".jsonl":
            prompts = []
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                item = json.loads(line)
                if isinstance(item, str):
                    prompts.append(Prompt(f"{p.name}:{i}", item))
                elif (isinstance(item, dict) and isinstance(item.get("prompt"), str)
                      and isinstance(item.get("suffix", ""), str)):
                    prompts.append(Prompt(str(item.get("name", f"{p.name}:{i}")), item["prompt"],
                                          item.get("suffix", "")))
                else:
                    raise DataError(f"{p}:{i}: expected a JSON string or an object with a \"prompt\" string "
                                    "(and optionally \"name\" and \"suffix\" strings)")
        else:
            prompts = [Prompt(p.name, p.read_text(encoding="utf-8"))]
    except UnicodeDecodeError:
        raise DataError(f"{p}: prompts must be UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{p}: not JSON lines ({exc})") from None
    prompts = [q for q in prompts if q.text]
    if not prompts:
        raise DataError(f"{p}: no non-empty prompts")
    return prompts


# ---------------------------------------------------------------------------
# running the configurations


@dataclass
class Run:
    """One run of one configuration on one prompt; its Stats are serialised once, at the end."""

    prompt: int
    config: BenchConfig
    repeat: int
    tokens: list[int]
    stats: Stats
    peak_rss_mb: float


def bar_estimator(conditions: dict[str, Any]) -> str:
    """Which per-prompt speedup the never-slower bar is checked on (see SLOW_BAR): the decoding
    thread's CPU time when every forward ran on that one thread, wall-clock time else."""
    one = conditions["threads"] == 1 and conditions.get("threads_batch", conditions["threads"]) == 1
    return "speedup_cpu" if one else "speedup"


def _cpu_tps(stats: Stats) -> float:
    return stats.generated_tokens / stats.decode_cpu_s if stats.decode_cpu_s > 0 else 0.0


def engine_run(engine: Any, prompt: Prompt, ids: list[int], config: BenchConfig, max_tokens: int,
               adaptive: bool) -> tuple[list[int], Stats]:
    """One run of ``config`` on a prompt (``ids``: its tokens; ``prompt.suffix``: the text after the
    cursor), from an empty cache; returns the generated tokens and the run's Stats."""
    # Start from an empty cache (a 1-token prompt shares at most BOS with the next),
    # so every run pays the same prefill and prefill tok/s means something.
    for _ in engine.generate(ids[:1], GenerationOptions(max_tokens=0, heads=0, context_draft=False)):
        pass
    opts = GenerationOptions(max_tokens=max_tokens, heads=config.heads, adaptive=adaptive,
                             context_draft=config.context, suffix=prompt.suffix)
    tokens: list[int] = []
    stats = None
    for ev in engine.generate(ids, opts):
        if isinstance(ev, Piece):
            tokens.extend(ev.token_ids)
        elif isinstance(ev, Done):
            stats = ev.stats
    assert stats is not None  # generate() always ends with Done
    return tokens, stats


class Anchor:
    """Plain greedy decoding of ``main.gguf`` with llama-cpp-python's high-level ``Llama``,
    with the engine's flash-attention setting (which changes the summation order of
    attention, so it must match for the greedy outputs to be comparable) and the
    engine's weight buffers (``repack``: the engine's CPU_REPACK pattern, "" for none)."""

    def __init__(self, main_path: Path, *, n_ctx: int, n_threads: int, extra_bufts: bool, flash_attn: bool,
                 repack: str = "", gpu_layers: int = 0, n_threads_batch: int | None = None) -> None:
        from mtpcode.llama import reference_llama  # llama_cpp: only for the commands that run models

        self.llm = reference_llama(main_path, extra_bufts=extra_bufts, repack=repack, n_ctx=n_ctx,
                                   n_threads=n_threads, n_threads_batch=n_threads_batch or n_threads, verbose=False,
                                   flash_attn=flash_attn, n_gpu_layers=gpu_layers)

    def run(self, ids: list[int], max_tokens: int) -> tuple[list[int], Stats]:
        llm = self.llm
        llm.reset()
        tokens: list[int] = []
        t0 = time.perf_counter()
        t_first = t_last = t0
        c_first = c_last = time.thread_time()
        for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            now = time.perf_counter()
            if llm._model.token_is_eog(tok) if hasattr(llm._model, "token_is_eog") else tok == llm.token_eos():
                break
            tokens.append(int(tok))
            if len(tokens) == 1:
                t_first, c_first = now, time.thread_time()
            t_last, c_last = now, time.thread_time()
            if len(tokens) >= max_tokens:
                break
        # Same definitions as the engine's Stats: times after the first token was chosen,
        # one forward per token after it.
        n = len(tokens)
        return tokens, Stats(prompt_tokens=len(ids), prompt_tokens_processed=len(ids), generated_tokens=n,
                             main_forwards=max(n - 1, 0), forwards_by_source={"plain": max(n - 1, 0)},
                             tokens_by_source={"plain": max(n - 1, 0)}, prefill_s=t_first - t0,
                             decode_s=t_last - t_first if n > 1 else 0.0,
                             decode_cpu_s=c_last - c_first if n > 1 else 0.0)

    def close(self) -> None:
        self.llm.close() if hasattr(self.llm, "close") else None


def run_bench(model_path: Path, prompts: Sequence[Prompt], *, heads: Sequence[int] | None = None,
              max_tokens: int = 128, repeat: int = 3, threads: int | None = None,
              threads_batch: int | None = None, n_ctx: int = 4096,
              adaptive: bool = True, anchor: bool = True, context: bool = True, extra_bufts: str = "auto",
              flash_attn: bool = False, costs: bool = True, gpu_layers: int = 0,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every configuration on every prompt ``repeat`` times; return the results document (see SCHEMA).

    ``context`` adds the configurations that draft from the context (context only, and every
    requested head with the context). ``gpu_layers`` offloads the engine, the anchor and the cost
    measurement alike."""
    # the runtime and llama_cpp: only for the commands that run models
    from mtpcode.llama import backend_info, repack_pattern
    from mtpcode.runtime import Engine

    say = progress or (lambda _msg: None)
    rss0 = rss_mb()
    t_load = time.perf_counter()
    engine = Engine(model_path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads_batch,
                    extra_bufts=extra_bufts, flash_attn=flash_attn, n_gpu_layers=gpu_layers)
    load_s = time.perf_counter() - t_load
    n_threads = engine.n_threads  # the runtime's default when threads is None (1 for small models)
    n_threads_batch = engine.n_threads_batch
    rss_engine = rss_mb()
    anchor_obj = None
    try:
        configs = bench_configs(engine.n_heads, heads, context=context, anchor=anchor)
        if anchor:
            repack = repack_pattern(engine.bundle.main_path) if extra_bufts == "repack" else ""
            anchor_obj = Anchor(engine.bundle.main_path, n_ctx=n_ctx, n_threads=n_threads,
                                n_threads_batch=n_threads_batch, extra_bufts=engine.extra_bufts,
                                flash_attn=engine.flash_attn, repack=repack,
                                gpu_layers=gpu_layers)
        rss_all = rss_mb()
        prompt_ids = []
        suffix_ids = [engine.tokenize(q.suffix, add_bos=False) if q.suffix else [] for q in prompts]
        for q in prompts:
            ids = engine.tokenize(q.text)
            if len(ids) + max_tokens + engine.n_heads + 1 > engine.n_ctx:
                raise UsageError(f"prompt {q.name} ({len(ids)} tokens) + {max_tokens} tokens does not fit "
                                 f"in the context ({engine.n_ctx}); use --ctx or fewer --max-tokens")
            prompt_ids.append(ids)
        # warm-up: page in the weights, start the thread pools
        say("warming up")
        engine_run(engine, prompts[0], prompt_ids[0], heads_config(engine.n_heads, context),
                   min(16, max_tokens), adaptive)
        if anchor_obj is not None:
            anchor_obj.run(prompt_ids[0], min(16, max_tokens))
        runs: list[Run] = []
        total = repeat * len(prompts) * len(configs)
        for r in range(repeat):
            for pi, ids in enumerate(prompt_ids):
                shift = (r + pi) % len(configs)
                for config in configs[shift:] + configs[:shift]:
                    say(f"[{len(runs) + 1}/{total}] repeat {r + 1}, prompt {pi + 1} ({prompts[pi].name}), "
                        f"{config.label}")
                    reset_peak_rss()
                    if config.anchor:
                        assert anchor_obj is not None
                        tokens, stats = anchor_obj.run(ids, max_tokens)
                    else:
                        tokens, stats = engine_run(engine, prompts[pi], ids, config, max_tokens, adaptive)
                    runs.append(Run(pi, config, r, tokens, stats, round(peak_rss_mb(), 1)))
        doc = _summarize(engine, prompts, prompt_ids, configs, runs)
        doc["conditions"] = _conditions(engine, model_path, n_threads, n_ctx, max_tokens, repeat, adaptive,
                                        load_s=load_s)
        doc["conditions"]["backend"] = backend_info(gpu_layers)
        doc["memory"] = {
            "rss_before_load_mb": round(rss0, 1),
            "rss_after_engine_load_mb": round(rss_engine, 1),
            "engine_rss_mb": round(rss_engine - rss0, 1),
            "rss_with_anchor_mb": round(rss_all, 1),
            "peak_rss_mb": round(max(run.peak_rss_mb for run in runs), 1),
            "note": "RSS counts the mmapped model pages; the anchor maps main.gguf a second time in the same process",
        }
    finally:
        if anchor_obj is not None:
            anchor_obj.close()
        engine.close()
    doc["anchors"] = _anchors(engine, doc)
    if costs:
        say("measuring forward costs (1..n rows, one head, eval-callback overhead)")
        doc["forward_costs"] = _forward_costs(model_path, doc, n_threads, gpu_layers, n_threads_batch,
                                              rows=ContextDrafter().max_draft + 1 if context else 8)
        if context:
            doc["context_ceiling"] = _context_ceiling(doc, prompt_ids, suffix_ids)
    return doc


def _spec(doc: dict[str, Any], key: str) -> BenchConfig:
    """The configuration of a results key (from the document's config_specs)."""
    return BenchConfig(**doc["config_specs"][key])


def _forward_costs(model_path: Path, doc: dict[str, Any], threads: int, gpu_layers: int = 0,
                   threads_batch: int | None = None, rows: int = 8) -> dict[str, Any]:
    """The bundle's own cost profile (as in the synthetic cost model) and what it predicts, measured
    after a KV cache as long as the median prompt (attention over the context is much of a small
    model's step) and with the engine's flash-attention setting."""
    cond = doc["conditions"]
    mode = "on" if cond["extra_bufts"] else "off"
    n = int(cond["n_heads"]) + 1
    prefix = max(16, int(median([p["prompt_tokens"] for p in doc["prompts"]])))
    # small models: many cheap repeats (their forwards take a millisecond and are noisy); large: a few
    small = doc["anchors"]["main_bytes_per_forward"] < 200e6
    costs = measure_costs(model_path, mode=mode, max_batch=max(n, rows), repeat=40 if small else 5, threads=threads,
                          threads_batch=threads_batch,
                          prefix=prefix, flash_attn=bool(cond["flash_attn"]), n_gpu_layers=gpu_layers)
    costs["context_tokens"] = prefix
    costs.pop("verify_all_s", None)
    # predicted speedup from the measured tokens/forward and these costs (no Python overhead): each kind of
    # step at its mean number of rows (plain 1; heads and context steps 1 + their mean drafts)
    pred = {}
    rel = {int(b): float(v) for b, v in costs["verify_rel"].items()}
    top = max(rel)

    def rel_at(rows: float) -> float:
        if rows >= top:  # beyond the table: continue its last segment
            return rel[top] + (rows - top) * (rel[top] - rel[top - 1])
        lo = int(np.floor(rows))
        return rel[lo] + (rows - lo) * (rel[lo + 1] - rel[lo])

    head_rel = float(costs["head_rel"] or 0.0)
    for key, s in doc["summary"].items():
        if not _spec(doc, key).speculative or not s.get("forwards_by_source"):
            continue
        fwd, drafted = s["forwards_by_source"], s["drafted_by_source"]
        with_heads = fwd.get("heads", 0) + fwd.get("context+heads", 0)
        with_context = fwd.get("context", 0) + fwd.get("context+heads", 0)
        heads_rows = drafted.get("heads", 0) / with_heads if with_heads else 0.0
        context_rows = drafted.get("context", 0) / with_context if with_context else 0.0
        cost = (fwd.get("plain", 0) + fwd.get("heads", 0) * (rel_at(1 + heads_rows) + heads_rows * head_rel)
                + fwd.get("context", 0) * rel_at(1 + context_rows)
                + fwd.get("context+heads", 0) * (rel_at(1 + context_rows + heads_rows) + heads_rows * head_rel))
        total = sum(fwd.values())
        pred[key] = round(s["tokens_per_forward"] * total / cost, 3) if cost else 0.0
    costs["predicted_speedup_without_python"] = pred
    return costs


def _context_ceiling(doc: dict[str, Any], prompt_ids: Sequence[list[int]],
                     suffix_ids: Sequence[list[int]]) -> dict[str, Any]:
    """The most drafting from the context could gain on each prompt (mtpcode/bench/ceiling.py),
    with the forward costs just measured."""
    costs = doc["forward_costs"]
    verify = {int(b): float(t) for b, t in costs["verify_s"].items()}
    rebuild = float(costs.get("rebuild_s", 0.0))
    per_prompt = [{"prompt": p["name"], **context_ceiling(ids, suffix, p["plain_token_ids"], verify, rebuild)}
                  for p, ids, suffix in zip(doc["prompts"], prompt_ids, suffix_ids)]
    return {**ceiling_summary(per_prompt), "per_prompt": per_prompt,
            "note": "an oracle that drafts from the context exactly the tokens the model will accept, when "
                    "that is cheaper; measured forward costs plus one graph rebuild per verify, no Python"}


def _conditions(engine, model_path: Path, threads: int, n_ctx: int, max_tokens: int, repeat: int,
                adaptive: bool, load_s: float) -> dict[str, Any]:
    import llama_cpp  # only for the commands that run models

    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    m = engine.manifest
    return {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": str(model_path),
        "quantization": m.quantization,
        "n_embd": m.n_embd, "n_vocab": m.n_vocab, "n_trunk": m.n_trunk, "n_heads": engine.n_heads,
        "threads": threads, "threads_batch": engine.n_threads_batch, "n_ctx": n_ctx, "max_tokens": max_tokens,
        "repeat": repeat,
        "adaptive": adaptive, "extra_bufts": engine.extra_bufts, "flash_attn": engine.flash_attn,
        "native_capture": engine.native_capture,
        "load_s": round(load_s, 3),
        "cpu": cpu_name(), "cpus": os.cpu_count(), "loadavg_at_end": [round(x, 2) for x in load],
        "python": platform.python_version(), "llama_cpp_python": llama_cpp.__version__,
    }


def _by_source(rs: Sequence[Run]) -> dict[str, Any]:
    """Draft-source figures summed over runs: tokens per forward per kind of step, acceptance per source."""
    fwd: dict[str, int] = {}
    tok: dict[str, int] = {}
    drafted: dict[str, int] = {}
    accepted: dict[str, int] = {}
    for r in rs:
        for k, v in r.stats.forwards_by_source.items():
            fwd[k] = fwd.get(k, 0) + v
        for k, v in r.stats.tokens_by_source.items():
            tok[k] = tok.get(k, 0) + v
        for k, v in r.stats.drafted_by_source.items():
            drafted[k] = drafted.get(k, 0) + v
        for k, v in r.stats.accepted_by_source.items():
            accepted[k] = accepted.get(k, 0) + v
    return {
        "forwards_by_source": fwd,
        "tokens_per_forward_by_source": {k: round(tok.get(k, 0) / n, 3) for k, n in fwd.items() if n},
        "drafted_by_source": drafted,
        "accepted_by_source": accepted,
        "acceptance_by_source": {k: round(accepted.get(k, 0) / d, 4) for k, d in drafted.items() if d},
    }


def _config_entry(config: BenchConfig, rs: list[Run], base: list[Run]) -> dict[str, Any]:
    """One configuration's figures on one prompt (medians over repetitions, ratios within them)."""
    tps = [r.stats.decode_tps for r in rs]
    paired = [r.stats.decode_tps / b.stats.decode_tps
              for r in rs for b in base if b.repeat == r.repeat and b.stats.decode_tps > 0]
    paired_cpu = [_cpu_tps(r.stats) / _cpu_tps(b.stats)
                  for r in rs for b in base if b.repeat == r.repeat and _cpu_tps(b.stats) > 0]
    base_tps = median([b.stats.decode_tps for b in base])
    c: dict[str, Any] = {
        "decode_tokens_per_s": round(median(tps), 2),
        "decode_tokens_per_s_all": [round(t, 2) for t in tps],
        "decode_tokens_per_cpu_s": round(median([_cpu_tps(r.stats) for r in rs]), 2),
        "speedup": round(median(paired), 3),
        "speedup_cpu": round(median(paired_cpu), 3),
        "speedup_of_medians": round(median(tps) / base_tps, 3) if base_tps else 0.0,
        "prefill_tokens_per_s": round(median([r.stats.prefill_tps for r in rs]), 1),
        "tokens_per_forward": round(median([r.stats.tokens_per_forward for r in rs]), 3),
        "peak_rss_mb": max(r.peak_rss_mb for r in rs),
    }
    if not config.anchor:
        steps = [max(r.stats.main_forwards, 1) for r in rs]
        if config.heads:
            drafted = np.sum([r.stats.drafted_tokens for r in rs], axis=0)
            accepted = np.sum([r.stats.accepted_tokens for r in rs], axis=0)
            c["acceptance"] = [round(float(a) / float(d), 4) if d else 0.0 for a, d in zip(accepted, drafted)]
            c["drafted_tokens"] = [int(d) for d in drafted]
        c.update(_by_source(rs))
        c["python_ms_per_step"] = round(median([1e3 * r.stats.python_s / n for r, n in zip(rs, steps)]), 4)
        c["native_ms_per_step"] = round(median([1e3 * (r.stats.decode_s - r.stats.python_s) / n
                                                 for r, n in zip(rs, steps)]), 4)
        c["main_forwards"] = int(median([r.stats.main_forwards for r in rs]))
    return c


def _summarize(engine, prompts: Sequence[Prompt], prompt_ids: list[list[int]], configs: list[BenchConfig],
               runs: list[Run]) -> dict[str, Any]:
    bar_key = bar_estimator({"threads": engine.n_threads, "threads_batch": engine.n_threads_batch})
    by: dict[tuple[int, str], list[Run]] = {}
    for run in runs:
        by.setdefault((run.prompt, run.config.key), []).append(run)
    # greedy outputs must be identical in every configuration
    mismatches = []
    for pi in range(len(prompts)):
        ref = by[(pi, PLAIN.key)][0].tokens
        for config in configs:
            for run in by[(pi, config.key)]:
                if run.tokens != ref:
                    first = common_prefix(run.tokens, ref)
                    mismatches.append({"prompt": prompts[pi].name, "prompt_index": pi, "config": config.key,
                                       "repeat": run.repeat, "first_difference_at": first,
                                       "tokens": len(run.tokens), "reference_tokens": len(ref),
                                       "token_ids": run.tokens})
    per_prompt = []
    for pi, q in enumerate(prompts):
        base = by[(pi, PLAIN.key)]
        entry: dict[str, Any] = {"name": q.name, "prompt_tokens": len(prompt_ids[pi]),
                                 "generated_tokens": len(base[0].tokens), "text": q.text, "suffix": q.suffix,
                                 "plain_token_ids": base[0].tokens, "configs": {}}
        for config in configs:
            entry["configs"][config.key] = _config_entry(config, by[(pi, config.key)], base)
        per_prompt.append(entry)
    summary: dict[str, Any] = {}
    for config in configs:
        cs = [p["configs"][config.key] for p in per_prompt]
        speedups = [c["speedup"] for c in cs]
        cpu = [c["speedup_cpu"] for c in cs]
        rs = [r for r in runs if r.config == config]
        s: dict[str, Any] = {
            "median_speedup": round(median(speedups), 3),
            "min_speedup": round(min(speedups), 3),
            "max_speedup": round(max(speedups), 3),
            "median_speedup_cpu": round(median(cpu), 3),
            "min_speedup_cpu": round(min(cpu), 3),
            "prompts_below_bar": [p["name"] for p, c in zip(per_prompt, cs)
                                  if config.speculative and c[bar_key] < SLOW_BAR],
            "median_decode_tokens_per_s": round(median([c["decode_tokens_per_s"] for c in cs]), 2),
            "median_prefill_tokens_per_s": round(median([c["prefill_tokens_per_s"] for c in cs]), 1),
        }
        if not config.anchor:
            gen = sum(r.stats.generated_tokens for r in rs)
            fwd = sum(r.stats.main_forwards for r in rs)
            s["tokens_per_forward"] = round(gen / fwd, 3) if fwd else 0.0
            if config.heads:
                drafted = np.sum([r.stats.drafted_tokens for r in rs], axis=0)
                accepted = np.sum([r.stats.accepted_tokens for r in rs], axis=0)
                s["acceptance"] = [round(float(a) / float(d), 4) if d else 0.0 for a, d in zip(accepted, drafted)]
            src = _by_source(rs)
            s.update(src)
            drafts = sum(src["drafted_by_source"].values())
            s["drafts_per_step"] = round(drafts / fwd, 3) if fwd else 0.0
            s["head_drafts_per_step"] = round(src["drafted_by_source"].get("heads", 0) / fwd, 3) if fwd else 0.0
            s["python_ms_per_step"] = round(median([c["python_ms_per_step"] for c in cs]), 4)
            s["native_ms_per_step"] = round(median([c["native_ms_per_step"] for c in cs]), 4)
        summary[config.key] = s
    return {
        "schema": SCHEMA,
        "kind": "bench",
        "configs": [c.key for c in configs],
        "config_specs": {c.key: dataclasses.asdict(c) for c in configs},
        "prompts": per_prompt,
        "summary": summary,
        "greedy_identical": not mismatches,
        "mismatches": mismatches,
        "runs": [{"prompt": r.prompt, "config": r.config.key, "repeat": r.repeat, "stats": r.stats.to_dict(),
                  "peak_rss_mb": r.peak_rss_mb} for r in runs],
    }


def _anchors(engine, doc: dict[str, Any]) -> dict[str, Any]:
    main_bytes = bytes_per_forward(engine.bundle.main_path, embd_input=False)
    head_bytes = [bytes_per_forward(p, embd_input=True) for p in engine.bundle.head_paths]
    bw = memory_bandwidth()
    gbs = bw["best_gb_s"] * 1e9
    out: dict[str, Any] = {
        "paper_table_s2_code_4_heads": {"speedup": PAPER_SPEEDUP, "tokens_per_forward": PAPER_TOKENS_PER_FORWARD},
        "memory_bandwidth": bw,
        "main_bytes_per_forward": main_bytes,
        "head_bytes_per_forward": head_bytes,
        "plain_tokens_per_s_bound": round(gbs / main_bytes, 1),
    }
    for key, s in doc["summary"].items():
        config = _spec(doc, key)
        if not config.speculative:
            continue
        tpf = s.get("tokens_per_forward", 1.0)
        heads_read = sum(head_bytes[:config.heads])  # an upper bound: the policy may run fewer heads
        out[f"bound_tokens_per_s[{key}]"] = round(gbs * tpf / (main_bytes + heads_read), 1)
    return out


# ---------------------------------------------------------------------------
# reporting


def format_table(doc: dict[str, Any]) -> str:
    """The terminal report of a bench document."""
    configs = doc["configs"]
    specs = {key: _spec(doc, key) for key in configs}
    spec = [c for c in configs if specs[c].speculative]
    lines = []
    cond = doc["conditions"]
    bar_key = bar_estimator(cond)
    clock = "CPU-time" if bar_key == "speedup_cpu" else "wall-clock"
    batch = cond.get("threads_batch", cond["threads"])
    threads = f"{cond['threads']} threads" + (f" ({batch} for batches)" if batch != cond["threads"] else "")
    lines.append(f"model {cond['model']} ({cond['quantization']}, {cond['n_heads']} heads), {threads}, "
                 f"{cond['max_tokens']} tokens x {len(doc['prompts'])} prompts x {cond['repeat']} repeats, "
                 f"adaptive={'on' if cond['adaptive'] else 'off'}, flash attention "
                 f"{'on' if cond['flash_attn'] else 'off'}")
    if cond.get("native_capture") is False:
        lines.append("note: the C trunk-capture callback is not built in this install; the Python one costs "
                     "a large part of a small model's forward (reinstall mtpcode with a C compiler)")
    lines.append(f"speedup over plain per prompt ({clock}; ! = below {SLOW_BAR}x), tokens per forward in brackets")
    head = f"{'prompt':<34} {'tok':>5} {'plain tok/s':>11}"
    if CONTROL.key in configs:
        head += f" {'A/A':>6}"
    for c in spec:
        head += f" | {c[:16]:>16}"
    if ANCHOR.key in configs:
        head += f" | {'llama.cpp':>9}"
    lines.append(head)
    lines.append("-" * len(head))
    for p in doc["prompts"]:
        cs = p["configs"]
        row = f"{p['name'][-34:]:<34} {p['prompt_tokens']:>5} {cs[PLAIN.key]['decode_tokens_per_s']:>11.1f}"
        if CONTROL.key in configs:
            row += f" {cs[CONTROL.key][bar_key]:>5.2f}x"
        for c in spec:
            mark = "!" if cs[c][bar_key] < SLOW_BAR else " "
            row += f" | {cs[c][bar_key]:>7.2f}x{mark}({cs[c]['tokens_per_forward']:>5.2f})"
        if ANCHOR.key in configs:
            row += f" | {cs[ANCHOR.key]['decode_tokens_per_s']:>9.1f}"
        lines.append(row)
    lines.append("")
    lines.append(f"{'config':<18} {'median x':>8} {'min x':>6} {'cpu x':>6} {'min':>5} {'tok/fwd':>7} "
                 f"{'tok/s':>8} {'prefill':>8} {'py ms/step':>10} {'llama ms/step':>13}  acceptance per head")
    for c in configs:
        s = doc["summary"][c]
        acc = " ".join(f"{a:.0%}" for a in s.get("acceptance", [])) or "-"
        py = f"{s['python_ms_per_step']:.2f}" if "python_ms_per_step" in s else "-"
        nat = f"{s['native_ms_per_step']:.2f}" if "native_ms_per_step" in s else "-"
        tpf = f"{s['tokens_per_forward']:.2f}" if "tokens_per_forward" in s else "1.00"
        lines.append(f"{c[:18]:<18} {s['median_speedup']:>7.2f}x {s['min_speedup']:>5.2f}x "
                     f"{s['median_speedup_cpu']:>5.2f}x {s['min_speedup_cpu']:>4.2f}x {tpf:>7} "
                     f"{s['median_decode_tokens_per_s']:>8.1f} {s['median_prefill_tokens_per_s']:>8.0f} "
                     f"{py:>10} {nat:>13}  {acc}")
    lines.append("")
    lines.append("by draft source (steps: share of forwards, tokens per forward; drafts: accepted / drafted):")
    for c in spec:
        s = doc["summary"][c]
        fwd = s.get("forwards_by_source", {})
        total = sum(fwd.values()) or 1
        steps = ", ".join(f"{k} {n / total:.0%} {s['tokens_per_forward_by_source'].get(k, 0):.2f}"
                          for k, n in sorted(fwd.items()) if n)
        drafts = ", ".join(f"{k} {s['accepted_by_source'].get(k, 0)}/{d}"
                           for k, d in sorted(s.get("drafted_by_source", {}).items()) if d) or "none"
        lines.append(f"  {c}: steps {steps}; drafts {drafts}")
    a = doc["anchors"]
    lines.append("")
    lines.append(f"memory bandwidth {a['memory_bandwidth']['best_gb_s']} GB/s (numpy copy); main.gguf reads "
                 f"{a['main_bytes_per_forward'] / 1e6:.1f} MB per forward -> plain decoding <= "
                 f"{a['plain_tokens_per_s_bound']:.0f} tok/s")
    lines.append(f"paper Table S2 (code, 4 heads): {a['paper_table_s2_code_4_heads']['speedup']}x, "
                 f"{a['paper_table_s2_code_4_heads']['tokens_per_forward']} tokens/forward")
    fc = doc.get("forward_costs")
    if fc:
        rel = " ".join(f"{b}:{v:.2f}" for b, v in fc["verify_rel"].items())
        pred = ", ".join(f"{c} {v:.2f}x" for c, v in fc["predicted_speedup_without_python"].items())
        lines.append(f"main forward, 1 row: {1e3 * fc['verify_s']['1']:.2f} ms (of which trunk-capture callback "
                     f"{1e3 * fc['capture_overhead_s']:.2f} ms); one head: {1e3 * fc['head_s']:.2f} ms "
                     f"({fc['head_rel']:.0%} of a 1-row forward)")
        lines.append(f"time of b rows / 1 row: {rel}")
        if pred:
            lines.append(f"speedup these costs predict at the measured tokens/forward (no Python overhead): {pred}")
        if fc.get("rebuild_s"):
            lines.append(f"graph rebuild for the step after a verify: {1e3 * fc['rebuild_s']:.2f} ms")
    ceiling = doc.get("context_ceiling")
    if ceiling:
        lines.append(f"ceiling of drafting from the context (an oracle that drafts exactly what will be accepted, "
                     f"these costs): median {ceiling['median_speedup']:.2f}x (min {ceiling['min_speedup']:.2f}x, "
                     f"max {ceiling['max_speedup']:.2f}x), {ceiling['median_copied']:.0%} of tokens copied")
    mem = doc["memory"]
    lines.append(f"memory: engine {mem['engine_rss_mb']:.0f} MB RSS after load, peak {mem['peak_rss_mb']:.0f} MB "
                 "(process, with the llama.cpp anchor loaded)")
    if CONTROL.key in configs:
        aa = [p["configs"][CONTROL.key][bar_key] for p in doc["prompts"]]
        lines.append(f"A/A control (plain decoding run again as its own configuration): {clock} ratios "
                     f"{min(aa):.2f}x-{max(aa):.2f}x over the prompts: differences of that size are noise")
    slow = {c: doc["summary"][c]["prompts_below_bar"] for c in spec if doc["summary"][c]["prompts_below_bar"]}
    if slow:
        for c, names in slow.items():
            lines.append(f"SLOWER THAN PLAIN ({c}, {clock} speedup < {SLOW_BAR}x): {', '.join(names)}")
    else:
        lines.append(f"speculative >= {SLOW_BAR}x plain on every prompt ({clock} speedup)")
    return "\n".join(lines)


def divergence_margins(doc: dict[str, Any], threads: int | None = None) -> list[dict[str, Any]]:
    """For each distinct point where a speculative run left the plain output: how close
    the main model's logits of the two competing tokens are there.

    The logits are recomputed by a plain prefill of prompt + the common prefix. A
    gap that is tiny next to the logits' spread means a near-tie that llama.cpp
    resolves differently for a 1-row decode and a batched verify (its kernels
    are not batch-invariant), not a wrong acceptance rule. Also stored in
    ``doc["mismatch_margins"]``.
    """
    from mtpcode.llama import Context, Model, default_threads  # llama_cpp: only for the commands that run models

    cond = doc["conditions"]
    bundle = open_bundle(cond["model"])
    seen: dict[tuple[int, int, int], dict[str, Any]] = {}
    model = Model(bundle.main_path, extra_bufts=bool(cond["extra_bufts"]))
    ctx = None
    try:
        for m in doc["mismatches"]:
            p = doc["prompts"][m["prompt_index"]]
            i = m["first_difference_at"]
            ref, other = p["plain_token_ids"], m["token_ids"]
            if i >= len(ref) or i >= len(other):
                continue  # one output is a prefix of the other (an end-of-text decision)
            key = (m["prompt_index"], i, other[i])
            if key in seen:
                continue
            ids = model.tokenize(p["text"], add_bos=True) + list(ref[:i])
            if ctx is None or ctx.n_ctx < len(ids) + 1:
                if ctx is not None:
                    ctx.close()
                n_ctx = max(len(ids) + 16, 256)
                ctx = Context(model, n_ctx=n_ctx, n_batch=min(512, n_ctx),
                              n_threads=threads or cond["threads"] or default_threads())
            ctx.trim(0)
            pos = 0
            while pos < len(ids):
                n = min(ctx.batch.capacity, len(ids) - pos)
                ctx.batch.token_ids[:n] = ids[pos: pos + n]
                ctx.decode(n, pos, last_logits_only=True)
                pos += n
            logits = np.asarray(ctx.logits(1)[0], dtype=np.float64)
            a, b = int(ref[i]), int(other[i])
            seen[key] = {"prompt": p["name"], "at_token": i, "plain_token": a, "speculative_token": b,
                         "logit_gap": round(float(logits[a] - logits[b]), 6),
                         "logit_std": round(float(logits.std()), 4),
                         "argmax_here": int(logits.argmax())}
    finally:
        if ctx is not None:
            ctx.close()
        model.close()
    doc["mismatch_margins"] = list(seen.values())
    return doc["mismatch_margins"]


# A logit gap under this share of the logits' standard deviation is a near-tie: a batched
# verify and a one-row decode may resolve it differently in quantized (or GPU) kernels.
NEAR_TIE = 0.01


def is_near_tie(margin: dict[str, Any]) -> bool:
    return abs(margin["logit_gap"]) < NEAR_TIE * margin["logit_std"]


def unexplained_mismatches(doc: dict[str, Any], skip_config: str) -> list[dict[str, Any]]:
    """The mismatches (other than ``skip_config``'s) whose first difference is not a measured near-tie
    (see :func:`divergence_margins`): the ones no kernel rounding explains."""
    ties = {(g["prompt"], g["at_token"]) for g in doc.get("mismatch_margins", []) if is_near_tie(g)}
    return [m for m in doc.get("mismatches", [])
            if m["config"] != skip_config and (m["prompt"], m["first_difference_at"]) not in ties]


def format_mismatches(doc: dict[str, Any]) -> str:
    lines = [f"MISMATCH: prompt {m['prompt']}, {m['config']}, repeat {m['repeat'] + 1}: greedy output differs "
             f"from plain decoding at token {m['first_difference_at']}" for m in doc["mismatches"]]
    for g in doc.get("mismatch_margins", []):
        lines.append(f"  at {g['prompt']} token {g['at_token']}: "
                     f"logit({g['plain_token']}) - logit({g['speculative_token']}) "
                     f"= {g['logit_gap']:+.2e} (logits' std {g['logit_std']:.2f}): "
                     f"{'a near-tie' if is_near_tie(g) else 'NOT a near-tie'}")
    return "\n".join(lines)


def bench_svg(doc: dict[str, Any]) -> str:
    """Speedup and tokens per forward per configuration (per prompt and median)."""
    keys = [k for k in doc["configs"] if not _spec(doc, k).control]
    xs = list(range(len(keys)))
    names = "; ".join(f"{x}: {k}" for x, k in zip(xs, keys))
    sp = Panel("decode speedup over plain", f"configuration ({names})", "speedup (x)", xticks=xs,
               hlines=[(1.0, "plain"), (SLOW_BAR, f"{SLOW_BAR}x bar")])
    tp = Panel("tokens per main forward", "configuration", "tokens / forward", xticks=xs, hlines=[(1.0, "")])
    dots_s, dots_t = [], []
    for p in doc["prompts"]:
        for x, k in zip(xs, keys):
            c = p["configs"][k]
            dots_s.append((x, c["speedup"]))
            dots_t.append((x, c["tokens_per_forward"]))
    sp.series = [Series("per prompt", dots_s, line=False, color="#999999"),
                 Series("median", [(x, doc["summary"][k]["median_speedup"]) for x, k in zip(xs, keys)], line=False)]
    tp.series = [Series("per prompt", dots_t, line=False, color="#999999"),
                 Series("all prompts", [(x, doc["summary"][k].get("tokens_per_forward", 1.0))
                                        for x, k in zip(xs, keys)], line=False)]
    cond = doc["conditions"]
    title = f"mtpcode bench: {Path(cond['model']).name} ({cond['quantization']}), {cond['threads']} threads"
    return render([sp, tp], title=title)


def synthetic_svg(doc: dict[str, Any]) -> str:
    """Main forward time over b rows relative to 1 row, per quantization and buffer mode."""
    panel = Panel("main forward cost vs rows verified", "rows in the forward", "time / time of 1 row",
                  hlines=[(1.0, "")])
    for m in doc["measurements"]:
        if m.get("crashed"):
            continue
        pts = [(int(b), v) for b, v in m["verify_rel"].items()]
        panel.series.append(Series(f"{m['quantization']} {m['mode']}", pts))
    panel.xticks = sorted({x for s in panel.series for x, _ in s.points})
    return render([panel], title=f"synthetic {doc['shape']} shape, {doc['threads']} threads", width=640)


def write_plot(doc: dict[str, Any], out: Path) -> None:
    svg = synthetic_svg(doc) if doc.get("kind") == "synthetic" else bench_svg(doc)
    if out.suffix.lower() == ".svg":
        atomic_write_text(out, svg)
        return
    raise UsageError(f"--plot {out}: only .svg plots are written (matplotlib is not a dependency)")


def check_plot_path(out: Path | None) -> None:
    if out is not None and out.suffix.lower() != ".svg":
        raise UsageError(f"--plot {out}: give a .svg path (plots are written as SVG; PNG would need matplotlib, "
                         "which mtpcode does not depend on)")


# ---------------------------------------------------------------------------
# synthetic cost model


def run_synthetic(shape: str, quants: Sequence[str], *, max_batch: int = 8, repeat: int = 3, threads: int = 2,
                  repack: bool = True, modes: Sequence[str] = ("off", "on", "repack"),
                  tokens_per_forward: float | None = None, n_drafts: int | None = None,
                  cache: Path | None = None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build (or reuse) the synthetic bundles, measure each in a child process, and project speedups."""
    say = progress or (lambda _msg: None)
    if max_batch < 2:
        raise UsageError("--max-batch must be at least 2")
    tpf = PAPER_TOKENS_PER_FORWARD if tokens_per_forward is None else tokens_per_forward
    drafts = S.SHAPES[shape]["n_future_tokens"] - 1 if n_drafts is None else n_drafts
    measurements = []
    for quant in quants:
        path = S.build_bundle(shape, quant, cache, n_heads=1, progress=say)
        for mode in modes:
            if mode == "repack" and not (repack and quant in REPACK_QUANTS):
                continue
            say(f"measuring {shape} {quant}, {MODE_LABELS[mode]}")
            m = S.measure_in_child(path, mode=mode, max_batch=max_batch, repeat=repeat, threads=threads)
            m.setdefault("quantization", quant)
            m["main_bytes_per_forward"] = bytes_per_forward(path / "main.gguf", embd_input=False)
            if not m.get("crashed"):
                m["projection"] = S.project(m, tpf, min(drafts, max_batch - 1))
                m["projection_min"] = S.project(m, tpf, min(drafts, max_batch - 1), statistic="min")
            measurements.append(m)
    bw = memory_bandwidth()
    for m in measurements:
        if not m.get("crashed"):
            m["bandwidth_bound_s"] = round(m["main_bytes_per_forward"] / (bw["best_gb_s"] * 1e9), 4)
    return {
        "schema": SCHEMA,
        "kind": "synthetic",
        "shape": shape,
        "params": S.SHAPES[shape],
        "threads": threads,
        "max_batch": max_batch,
        "repeat": repeat,
        "tokens_per_forward_assumed": tpf,
        "paper_table_s2_code_4_heads": {"speedup": PAPER_SPEEDUP, "tokens_per_forward": PAPER_TOKENS_PER_FORWARD},
        "memory_bandwidth": bw,
        "measurements": measurements,
        "conditions": {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu": cpu_name(),
                       "cpus": os.cpu_count(), "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
    }


MODE_LABELS = {
    "off": "extra buffer types off",
    "on": "extra buffer types on (llama.cpp default; crashes on AMX CPUs)",
    "repack": "extra buffer types off + CPU_REPACK for Q4_0/Q4_K blocks",
}


def format_synthetic(doc: dict[str, Any]) -> str:
    lines = [f"synthetic {doc['shape']} shape ({', '.join(f'{k}={v}' for k, v in doc['params'].items())}), "
             f"{doc['threads']} threads, median of {doc['repeat']}; memory bandwidth "
             f"{doc['memory_bandwidth']['best_gb_s']} GB/s"]
    for m in doc["measurements"]:
        label = f"{m['quantization']} {MODE_LABELS.get(m['mode'], m['mode'])}"
        if m.get("crashed"):
            lines.append(f"{label}: CRASHED ({m['error']})")
            continue
        t1 = m["verify_s"]["1"]
        rel = " ".join(f"{b}:{v:.2f}" for b, v in m["verify_rel"].items())
        lines.append(f"{label}: 1-row forward {1e3 * t1:.0f} ms "
                     f"(bandwidth bound {1e3 * m['bandwidth_bound_s']:.0f} ms), "
                     f"head {1e3 * m['head_s']:.1f} ms = {m['head_rel']:.1%} of it")
        lines.append(f"  time of b rows / 1 row: {rel}")
        rel_min = " ".join(f"{b}:{v:.2f}" for b, v in m["verify_min_rel"].items())
        lines.append(f"  same from the fastest run of each size:   {rel_min}")
        lines.append(f"  eval-callback (trunk capture) cost per forward: {1e3 * m['capture_overhead_s']:.2f} ms")
        for key, what in (("projection", "medians"), ("projection_min", "fastest runs")):
            pj = m[key]
            at, best = pj["at_n"], pj["best"]
            lines.append(f"  PROJECTED speedup ({what}) at {pj['tokens_per_forward_at_n']} tokens/forward with "
                         f"{pj['n_drafts']} drafts: {at['speedup']:.2f}x "
                         f"(best: {best['drafts']} drafts, {best['speedup']:.2f}x)")
    lines.append("paper Table S2 (code, 4 heads, measured on their hardware): "
                 f"{doc['paper_table_s2_code_4_heads']['speedup']}x "
                 f"at {doc['paper_table_s2_code_4_heads']['tokens_per_forward']} tokens/forward")
    return "\n".join(lines)
