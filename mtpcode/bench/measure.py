"""Measurement helpers shared by the benchmarks: the median of a sample, how long two token
sequences agree, the process's memory marks, the CPU's name and memory bandwidth, the weight
bytes a forward reads, and the time of forwards outside the decoding loop (a bundle's main
forwards of 1..n rows and one head forward; a prefill and the forwards after it)."""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtpcode.bundle import open_bundle
from mtpcode.errors import MtpError, UsageError

# Bundles whose block weights can be routed to CPU_REPACK (mtpcode.llama.REPACK_TYPES:
# Q4_0 and Q4_K; docs/design.md §6: routing Q8_0 weights crashed at load).
REPACK_QUANTS = ("Q4_0", "Q4_K_M")


def median(xs: Sequence[float]) -> float:
    """Median of ``xs`` as a float; 0.0 for an empty sample (a configuration that produced no runs)."""
    return float(np.median(np.asarray(xs, dtype=np.float64))) if len(xs) else 0.0


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens ``a`` and ``b`` share from their start (the index of the first difference,
    or the shorter length when one is a prefix of the other)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _status_kb(key: str) -> float | None:
    """A ``kB`` field of /proc/self/status (Linux), or None where the file or the field is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    """Current resident set size in MiB; 0.0 where /proc is unavailable."""
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else 0.0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size in MiB since start or the last :func:`reset_peak_rss`.

    VmHWM where /proc has it (it can be reset); otherwise getrusage's lifetime maximum
    (kilobytes on Linux)."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    import resource  # Unix only: imported where /proc is missing, so that this module imports everywhere

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), for every result file: figures must name the CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------------
# the machine: memory bandwidth and the bytes a forward reads


def memory_bandwidth(mb: int = 256, repeat: int = 7) -> dict[str, float]:
    """Copy bandwidth (read + write bytes per second) of a numpy copy of ``mb`` MiB, larger than any cache."""
    n = mb * (1 << 20) // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch every page first
    rates = []
    for _ in range(repeat):
        t = time.perf_counter()
        np.copyto(dst, src)
        rates.append(2 * src.nbytes / (time.perf_counter() - t))
    return {"copy_mib": mb, "best_gb_s": round(max(rates) / 1e9, 2),
            "median_gb_s": round(float(np.median(rates)) / 1e9, 2)}


def bytes_per_forward(gguf_path: Path, *, embd_input: bool) -> int:
    """Weight bytes one forward reads: every tensor, less the token embedding table
    (one row is looked up) unless the file is fed embeddings and uses it as its output."""
    import gguf  # ~75 ms to import (as long as llama_cpp): only the readers of GGUF files pay it

    reader = gguf.GGUFReader(str(gguf_path))
    total = 0
    for t in reader.tensors:
        if t.name == "token_embd.weight" and not embd_input:
            continue
        total += int(t.n_bytes)
    return total


# ---------------------------------------------------------------------------
# forwards outside the decoding loop


def measure_costs(bundle_dir: Path, *, mode: str = "off", max_batch: int = 8, repeat: int = 3,
                  threads: int = 2, prefix: int = 64, flash_attn: bool = False,
                  n_gpu_layers: int = 0, threads_batch: int | None = None) -> dict[str, Any]:
    """Time main forwards of 1..max_batch rows (after a ``prefix``-token KV) and one head forward,
    with flash attention as the runtime's default (``flash_attn``, off) and ``n_gpu_layers``
    offloaded (the head too, as the engine does). ``threads_batch`` (default: ``threads``) runs
    the forwards of several rows, as the engine's setting of that name does.

    ``mode``: "off" (extra buffer types off, the AMX-safe default), "on"
    (llama.cpp's default extra buffer types: crashes on AMX CPUs with quantized
    weights) or "repack" (extra buffer types off, Q4_0/Q4_K block weights routed to
    CPU_REPACK). The main context captures h_trunk through the eval callback,
    as the runtime does; the cost of that callback is measured separately
    (``capture_overhead_s``: a 1-row forward with minus without it).
    Runs in this process: call it through :func:`mtpcode.bench.synthetic.measure_in_child`
    to survive crashes.
    """
    # llama_cpp only for the commands that time forwards, not for every importer of this module
    from mtpcode.llama import Context, Model, TrunkCapture, repack_pattern

    bundle = open_bundle(bundle_dir)
    m = bundle.manifest
    pattern = ""
    if mode == "repack":
        if m.quantization not in REPACK_QUANTS:
            raise UsageError(f"CPU_REPACK is only routed for {', '.join(REPACK_QUANTS)} weights, not {m.quantization}")
        pattern = repack_pattern(bundle.main_path)
    elif mode not in ("off", "on"):
        raise UsageError(f"unknown cost-model mode {mode!r} (off, on or repack)")
    extra = mode == "on"
    n_ctx = prefix + max_batch + 16
    n_batch = max(prefix, max_batch)
    t0 = time.perf_counter()
    main = Model(bundle.main_path, extra_bufts=extra, repack=pattern, n_gpu_layers=n_gpu_layers)
    if pattern and not main.repacked:
        main.close()
        raise MtpError("this llama.cpp build has no CPU_REPACK buffer type")
    head = Model(bundle.head_paths[0], extra_bufts=extra, n_gpu_layers=n_gpu_layers) if bundle.head_paths else None
    load_s = time.perf_counter() - t0
    trunk = np.zeros((n_ctx, m.n_embd), dtype=np.float32)
    capture = TrunkCapture(m.trunk_tensor, trunk)
    rng = np.random.default_rng(0)
    try:
        ctx = Context(main, n_ctx=n_ctx, n_batch=n_batch, n_threads=threads, n_threads_batch=threads_batch,
                      capture=capture, flash_attn=flash_attn)
        ctx.batch.token_ids[:prefix] = rng.integers(3, m.n_vocab, prefix)
        ctx.decode(prefix, 0, last_logits_only=True)
        # the same model without the trunk capture: what the eval callback costs per forward
        bare = Context(main, n_ctx=n_ctx, n_batch=n_batch, n_threads=threads, n_threads_batch=threads_batch,
                       flash_attn=flash_attn)
        bare.batch.token_ids[:prefix] = ctx.batch.token_ids[:prefix]
        bare.decode(prefix, 0, last_logits_only=True)
        hctx = None
        if head is not None:
            hctx = Context(head, n_ctx=n_ctx, n_batch=n_batch, n_threads=threads, embd_input=True,
                           flash_attn=flash_attn)
            np.copyto(hctx.batch.embeddings[:prefix], trunk[:prefix])
            hctx.decode(prefix, 0, last_logits_only=True)
        sizes = list(range(1, max_batch + 1))
        times: dict[int, list[float]] = {b: [] for b in sizes}
        ratios: dict[int, list[float]] = {b: [] for b in sizes}
        head_ratios: list[float] = []
        capture_diffs: list[float] = []
        head_times: list[float] = []
        rebuilds: list[float] = []
        ctx_rows = [0]  # the row count of ctx's last forward

        # llama.cpp rebuilds its compute graph when the batch shape changes and reuses
        # it otherwise; decoding keeps one shape for many steps, so each timed forward
        # follows an untimed one of the same shape (for a small model the rebuild is a
        # large part of a forward: ~0.3 ms of the built-in model's 0.5-0.8 ms). What
        # that first forward costs more, for one row after a verify, is ``rebuild_s``:
        # the one-row step after each verify pays it.
        def main_forward(c: Context, b: int) -> float:
            times = []
            for _ in range(2):
                c.batch.token_ids[:b] = rng.integers(3, m.n_vocab, b)
                t = time.perf_counter()
                c.decode(b, prefix, last_logits_only=False)
                times.append(time.perf_counter() - t)
                c.trim(prefix)
            if c is ctx:
                if b == 1 and ctx_rows[0] > 1:
                    rebuilds.append(times[0] - times[1])
                ctx_rows[0] = b
            return times[1]

        def head_forward(hc: Context) -> float:
            dt = 0.0
            for _ in range(2):
                np.copyto(hc.batch.embeddings[:1], trunk[prefix: prefix + 1])
                t = time.perf_counter()
                hc.decode(1, prefix, last_logits_only=True)
                dt = time.perf_counter() - t
                hc.trim(prefix)
            return dt

        # one warm-up pass (page faults of the mmapped weights, thread pool start)
        for b in (1, max_batch):
            main_forward(ctx, b)
        main_forward(bare, 1)
        # Every measurement is paired with a 1-row forward right before it, and the
        # ratio of the pair is kept: on a shared machine the load drifts over seconds,
        # and a ratio of neighbours cancels most of that drift.
        for r in range(repeat):
            order = sizes[1:][r % (len(sizes) - 1):] + sizes[1:][: r % (len(sizes) - 1)]
            for b in order:
                t1 = main_forward(ctx, 1)
                tb = main_forward(ctx, b)
                times[1].append(t1)
                times[b].append(tb)
                ratios[b].append(tb / t1)
            t1 = main_forward(ctx, 1)
            capture_diffs.append(t1 - main_forward(bare, 1))
            if hctx is not None:
                th = head_forward(hctx)
                head_times.append(th)
                head_ratios.append(th / t1)
        ratios[1] = [1.0]
        verify = {b: median(times[b]) for b in sizes}
        result = {
            "mode": mode,
            "bundle": str(bundle_dir),
            "quantization": m.quantization,
            "threads": threads,
            "threads_batch": threads_batch or threads,
            "prefix_tokens": prefix,
            "flash_attn": flash_attn,
            "gpu_layers": n_gpu_layers,
            "native_capture": capture.native,
            "repeat": repeat,
            "load_s": round(load_s, 3),
            "verify_s": {str(b): round(v, 6) for b, v in verify.items()},
            "verify_all_s": {str(b): [round(x, 6) for x in times[b]] for b in sizes},
            "verify_rel": {str(b): round(median(ratios[b]), 4) for b in sizes},
            "head_s": round(median(head_times), 6),
            "head_rel": round(median(head_ratios), 4) if head_ratios else None,
            "head_min_s": round(min(head_times), 6) if head_times else 0.0,
            "head_min_rel": round(min(head_times) / min(times[1]), 4) if head_times else None,
            "verify_min_s": {str(b): round(min(times[b]), 6) for b in sizes},
            "verify_min_rel": {str(b): round(min(times[b]) / min(times[1]), 4) for b in sizes},
            "capture_overhead_s": round(median(capture_diffs), 6),
            "rebuild_s": round(max(0.0, median(rebuilds)), 6) if rebuilds else 0.0,
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
        return result
    finally:
        for obj in ("hctx", "bare", "ctx"):
            c = locals().get(obj)
            if c is not None:
                c.close()
        if head is not None:
            head.close()
        main.close()


def isolated_forwards(model_path: str | Path, threads_batch: int, repeat: int = 40) -> dict[str, float]:
    """A 1,000-token prefill of ``model_path`` (a .gguf), then 1- and 8-row forwards after it, median
    seconds; one thread for one-row forwards, ``threads_batch`` for the others.

    Each timed forward follows an untimed one of the same shape, so llama.cpp reuses its graph as
    in decoding; ``rows_8_worst_s`` is the slowest 8-row forward (a stall on a busy machine).
    """
    # llama_cpp only for the commands that time forwards, not for every importer of this module
    from mtpcode.llama import Context, Model

    rng = np.random.default_rng(0)
    with Model(model_path) as model, Context(model, n_ctx=2048, n_batch=512, n_threads=1,
                                             n_threads_batch=threads_batch) as ctx:
        ids = rng.integers(3, model.n_vocab, 1000)
        prefill = []
        for _ in range(5):
            ctx.trim(0)
            t = time.perf_counter()
            for pos in range(0, 1000, 500):
                ctx.batch.token_ids[:500] = ids[pos: pos + 500]
                ctx.decode(500, pos, last_logits_only=True)
            prefill.append(time.perf_counter() - t)
        rows: dict[int, list[float]] = {1: [], 8: []}
        for _ in range(repeat):
            for b in rows:
                for i in range(2):  # the second of two same-shape forwards: the graph is reused
                    ctx.batch.token_ids[:b] = rng.integers(3, model.n_vocab, b)
                    t = time.perf_counter()
                    ctx.decode(b, 1000, last_logits_only=False)
                    if i:
                        rows[b].append(time.perf_counter() - t)
                    ctx.trim(1000)
    return {"prefill_1000_s": round(median(prefill), 6), "rows_1_s": round(median(rows[1]), 6),
            "rows_8_s": round(median(rows[8]), 6), "rows_8_worst_s": round(max(rows[8]), 6)}
