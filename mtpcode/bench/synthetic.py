"""A cost model at real model sizes: random-weight bundles written directly in a
quantized type, the measured time of a main forward over 1..n tokens and of one
head forward, and the speedup they project at given acceptance rates.

Why random weights: no real MTP checkpoint can be downloaded here, and the time
of a forward does not depend on the weight values, only on the shape and the
storage type. The bundle is written block by block (random quantized blocks with
sane scales), so a 7B shape never exists as a 13 GB float file.

Each measurement runs in a child process (``python -m mtpcode.bench.synthetic``):
a configuration that crashes llama.cpp (the AMX / CPU_REPACK segfaults of
docs/design.md §6) is reported as a crash instead of taking the benchmark down, and
every configuration starts from a clean address space.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtpcode import bundle as B
from mtpcode.bench.measure import median, peak_rss_mb
from mtpcode.config import cache_dir
from mtpcode.errors import MtpError, UsageError

# name -> ModelParams fields. "7b" is Meta's 7B MTP code model (Gloeckle et al. 2024).
SHAPES: dict[str, dict[str, Any]] = {
    "7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, n_future_tokens=4, multiple_of=256),
    "1b": dict(dim=2048, n_layers=24, n_heads=16, vocab_size=32000, n_future_tokens=4, multiple_of=256),
    "tiny": dict(dim=256, n_layers=6, n_heads=4, vocab_size=512, n_future_tokens=4, multiple_of=256),
}
QUANTS = ("Q4_0", "Q4_K_M", "Q8_0")
FORMAT_TAG = "v2"  # bump when the written files change, so stale caches are rebuilt

# Bundles whose block weights can be routed to CPU_REPACK (mtpcode.llama.REPACK_TYPES:
# Q4_0 and Q4_K; docs/design.md §6: routing Q8_0 weights crashed at load).
REPACK_QUANTS = ("Q4_0", "Q4_K_M")

# The paper's Table S2 anchor (code, 7B, n=4): tokens per forward and measured speedup.
PAPER_TOKENS_PER_FORWARD = 3.50
PAPER_SPEEDUP = 3.05


# ---------------------------------------------------------------------------
# writing random quantized blocks


@dataclass(frozen=True)
class _BlockLayout:
    """Bytes of one quantization block and where its float16 scales sit."""

    weights: int  # weights per block
    size: int  # bytes per block
    scales: tuple[int, ...]  # byte offsets of f16 scale fields
    scale_gain: float  # typical |dequantized weight| for scale 1.0 (sets the scale for a target std)


_LAYOUTS = {
    "Q4_0": _BlockLayout(32, 18, (0,), 4.6),  # d, qs[16]: w = d * (q - 8)
    "Q8_0": _BlockLayout(32, 34, (0,), 74.0),  # d, qs[32]: w = d * q
    "Q4_K": _BlockLayout(256, 144, (0, 2), 32 * 4.6),  # d, dmin, scales[12], qs[128]
    "Q6_K": _BlockLayout(256, 210, (208,), 9.2 * 18.5),  # ql, qh, scales[16] (kept in -16..15), d
    "F32": _BlockLayout(1, 4, (), 1.0),
}


def _gguf_type(name: str):
    import gguf

    return gguf.GGMLQuantizationType[name]


def tensor_types(quant: str, name: str, layer: int, n_layers: int, tied_output: bool) -> str:
    """Storage type of one tensor, following llama.cpp's recipe for ``quant``.

    Output (and a tied token_embd) is Q6_K except in Q8_0 files; Q4_K_M keeps
    attn_v and ffn_down in Q6_K on llama.cpp's "more bits" layers.
    """
    if name.endswith("norm.weight"):
        return "F32"
    is_output = name == "output.weight" or (tied_output and name == "token_embd.weight")
    if quant == "Q8_0":
        return "Q8_0"
    if is_output:
        return "Q6_K"
    if quant == "Q4_0":
        return "Q4_0"
    # Q4_K_M
    if name.endswith(("attn_v.weight", "ffn_down.weight")):
        eighth = n_layers // 8
        more = layer < eighth or layer >= 7 * n_layers // 8 or (layer - eighth) % 3 == 2
        return "Q6_K" if more else "Q4_K"
    return "Q4_K"


class _RandomBytes:
    """Deterministic random bytes from a fixed pool (values need only be valid, not unique)."""

    def __init__(self, seed: int, pool_bytes: int = 1 << 24) -> None:
        self.pool = np.frombuffer(np.random.default_rng(seed).bytes(pool_bytes), dtype=np.uint8)
        self.offset = 0

    def take(self, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.uint8)
        done = 0
        while done < n:
            chunk = min(n - done, len(self.pool) - self.offset)
            out[done: done + chunk] = self.pool[self.offset: self.offset + chunk]
            done += chunk
            self.offset = (self.offset + chunk + 4099) % len(self.pool)
        return out


def random_tensor(kind: str, rows: int, cols: int, std: float, rnd: _RandomBytes) -> np.ndarray:
    """Bytes (rows, row_bytes) of a ``kind`` matrix whose dequantized weights have roughly ``std``."""
    lay = _LAYOUTS[kind]
    if kind == "F32":
        return (np.ones((rows, cols), dtype=np.float32) + 0.1 * (rnd.take(rows * cols).reshape(rows, cols) / 255.0 - 0.5)).astype(np.float32)
    if cols % lay.weights:
        raise UsageError(f"row length {cols} is not a multiple of {lay.weights} ({kind} blocks)")
    n_blocks = rows * cols // lay.weights
    data = rnd.take(n_blocks * lay.size).reshape(n_blocks, lay.size)
    if kind == "Q6_K":  # small block scales keep d a normal float16
        data[:, 192:208] = ((data[:, 192:208] & 0x1F).astype(np.int16) - 16).astype(np.int8).view(np.uint8)
    # A random sign per block scale: the quantized values of a block are not zero-mean
    # (Q4_0: q - 8 for q in 0..15 averages -0.5), and with one sign for all blocks every
    # matrix has a rank-one bias that blows the residual stream up to ~1e4 and drives
    # SiLU outputs into subnormal floats, which makes the CPU kernels many times slower
    # than for a real model.
    scale = np.frombuffer(np.float16(std / lay.scale_gain).tobytes(), dtype=np.uint8)
    signs = (data[:, -1] & 0x80) if lay.scales else None
    for off in lay.scales:
        data[:, off] = scale[0]
        data[:, off + 1] = scale[1] | signs
    return data.reshape(rows, cols // lay.weights * lay.size)


# ---------------------------------------------------------------------------
# the synthetic bundle


def _vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    """A valid Llama SentencePiece vocabulary of ``n`` pieces: unk, bos, eos, 256 byte pieces, fillers."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    pieces += [f"\u2581t{i}" for i in range(n - len(pieces))]
    types += [1] * (n - len(types))
    return pieces[:n], [float(-i) for i in range(n)], types[:n]


def _block_tensors(p, prefix: str, layer: int, n_layers: int, quant: str, tied: bool,
                   rnd: _RandomBytes) -> Iterator[tuple[str, Callable[[], np.ndarray], str]]:
    d, h, kv = p.dim, p.ffn_hidden, p.kv_heads * p.head_dim
    mats = [("attn_q", d, d), ("attn_k", kv, d), ("attn_v", kv, d), ("attn_output", d, d),
            ("ffn_gate", h, d), ("ffn_up", h, d), ("ffn_down", d, h)]
    yield f"{prefix}attn_norm.weight", lambda: random_tensor("F32", 1, d, 1.0, rnd)[0], "F32"
    yield f"{prefix}ffn_norm.weight", lambda: random_tensor("F32", 1, d, 1.0, rnd)[0], "F32"
    for short, rows, cols in mats:
        name = f"{prefix}{short}.weight"
        kind = tensor_types(quant, name, layer, n_layers, tied)
        yield name, (lambda kind=kind, rows=rows, cols=cols: random_tensor(kind, rows, cols, cols ** -0.5, rnd)), kind


def _write_gguf(path: Path, p, quant: str, *, role: str, head_index: int, fingerprint: str,
                n_blocks: int, block_offset: int, with_output: bool, seed: int) -> None:
    import gguf

    rnd = _RandomBytes(seed)
    tied = not with_output
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_name(f"mtpcode synthetic {role} {head_index}")
    B.add_model_metadata(w, p, n_blocks=n_blocks, role=role, head_index=head_index, fingerprint=fingerprint)
    w.add_file_type({"Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15}[quant])
    pieces, scores, types = _vocab(p.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)

    n_all = p.n_trunk + 1  # the layer numbering llama.cpp's quantizer would see in main.gguf
    tensors: list[tuple[str, Callable[[], np.ndarray], str]] = []
    emb_kind = tensor_types(quant, "token_embd.weight", 0, n_all, tied)
    tensors.append(("token_embd.weight",
                    lambda: random_tensor(emb_kind, p.vocab_size, p.dim, 1.0 if not tied else p.dim ** -0.5, rnd),
                    emb_kind))
    for i in range(n_blocks):
        layer = block_offset + i
        tensors += list(_block_tensors(p, f"blk.{i}.", layer if role == "main" else 0,
                                       n_all if role == "main" else 1, quant, tied, rnd))
    tensors.append(("output_norm.weight", lambda: random_tensor("F32", 1, p.dim, 1.0, rnd)[0], "F32"))
    if with_output:
        out_kind = tensor_types(quant, "output.weight", 0, n_all, False)
        tensors.append(("output.weight", lambda: random_tensor(out_kind, p.vocab_size, p.dim, p.dim ** -0.5, rnd),
                        out_kind))
    # shapes first (tensor infos), then data one tensor at a time
    makers = []
    for name, make, kind in tensors:
        if kind == "F32":
            shape = (p.dim,)
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * p.dim)
        else:
            rows, cols = _shape_of(name, p)
            lay = _LAYOUTS[kind]
            nbytes = rows * cols // lay.weights * lay.size
            w.add_tensor_info(name, (rows, cols // lay.weights * lay.size), np.dtype(np.uint8), nbytes,
                              raw_dtype=_gguf_type(kind))
        makers.append(make)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for make in makers:
        w.write_tensor_data(make())
    w.close()


def _shape_of(name: str, p) -> tuple[int, int]:
    d, h, kv = p.dim, p.ffn_hidden, p.kv_heads * p.head_dim
    short = name.split(".")[-2]
    return {
        "token_embd": (p.vocab_size, d), "output": (p.vocab_size, d),
        "attn_q": (d, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_output": (d, d),
        "ffn_gate": (h, d), "ffn_up": (h, d), "ffn_down": (d, h),
    }[short]


def build_bundle(shape: str, quant: str, cache: Path | None = None, *, n_heads: int | None = None,
                 progress: Callable[[str], None] | None = None) -> Path:
    """The random-weight bundle of ``shape`` in ``quant``, built once and cached.

    ``n_heads`` limits how many head files are written (the cost model times
    one head; all heads have the same shape). Returns the bundle directory.
    """
    from converters.params import ModelParams

    if shape not in SHAPES:
        raise UsageError(f"unknown synthetic shape {shape!r}; choose one of {', '.join(SHAPES)}")
    if quant not in QUANTS:
        raise UsageError(f"synthetic bundles are written in {', '.join(QUANTS)}, not {quant!r}")
    p = ModelParams(**SHAPES[shape])
    heads = p.n_future_tokens - 1 if n_heads is None else min(n_heads, p.n_future_tokens - 1)
    root = (cache or cache_dir()) / "synthetic"
    out = root / f"{shape}-{quant.lower()}-{heads}h-{FORMAT_TAG}"
    if (out / B.MANIFEST_NAME).is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    fp = hashlib.sha256(f"synthetic|{shape}|{json.dumps(SHAPES[shape], sort_keys=True)}".encode()).hexdigest()[:16]
    try:
        entries = []
        jobs = [(B.MAIN_NAME, "main", 0)] + [(B.head_name(k), "head", k) for k in range(1, heads + 1)]
        for file_name, role, k in jobs:
            if progress:
                progress(f"writing {out.name}/{file_name}")
            path = tmp / file_name
            if role == "main":
                _write_gguf(path, p, quant, role=role, head_index=0, fingerprint=fp, n_blocks=p.n_trunk + 1,
                            block_offset=0, with_output=True, seed=1)
            else:
                _write_gguf(path, p, quant, role=role, head_index=k, fingerprint=fp, n_blocks=1,
                            block_offset=0, with_output=False, seed=1 + k)
            entries.append(B.FileEntry(file_name, path.stat().st_size, B.sha256_file(path)))
        manifest = B.Manifest(
            n_future_tokens=heads + 1, n_trunk=p.n_trunk, n_embd=p.dim, n_vocab=p.vocab_size,
            quantization=quant, fingerprint=fp, main=entries[0], heads=tuple(entries[1:]),
            source={"synthetic": shape, "params": p.to_dict(), "weights": "random"},
        )
        (tmp / B.MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        os.replace(tmp, out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------------
# measuring (in a child process)


def measure_costs(bundle_dir: Path, *, mode: str = "off", max_batch: int = 8, repeat: int = 3,
                  threads: int = 2, prefix: int = 64, flash_attn: bool = True) -> dict[str, Any]:
    """Time main forwards of 1..max_batch rows (after a ``prefix``-token KV) and one head forward,
    with flash attention as the runtime's default (``flash_attn``).

    ``mode``: "off" (extra buffer types off, the AMX-safe default), "on"
    (llama.cpp's default extra buffer types: crashes on AMX CPUs with quantized
    weights) or "repack" (extra buffer types off, Q4_0/Q4_K block weights routed to
    CPU_REPACK). The main context captures h_trunk through the eval callback,
    as the runtime does; the cost of that callback is measured separately
    (``capture_overhead_s``: a 1-row forward with minus without it).
    Runs in this process: call it through :func:`measure_in_child` to survive crashes.
    """
    from mtpcode.bundle import open_bundle
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
    main = Model(bundle.main_path, extra_bufts=extra, repack=pattern)
    if pattern and not main.repacked:
        main.close()
        raise MtpError("this llama.cpp build has no CPU_REPACK buffer type")
    head = Model(bundle.head_paths[0], extra_bufts=extra) if bundle.head_paths else None
    load_s = time.perf_counter() - t0
    trunk = np.zeros((n_ctx, m.n_embd), dtype=np.float32)
    capture = TrunkCapture(m.trunk_tensor, trunk)
    rng = np.random.default_rng(0)
    try:
        ctx = Context(main, n_ctx=n_ctx, n_batch=n_batch, n_threads=threads, capture=capture, flash_attn=flash_attn)
        ctx.batch.tokens[:prefix] = rng.integers(3, m.n_vocab, prefix)
        ctx.decode(prefix, 0, last_logits_only=True)
        # the same model without the trunk capture: what the eval callback costs per forward
        bare = Context(main, n_ctx=n_ctx, n_batch=n_batch, n_threads=threads, flash_attn=flash_attn)
        bare.batch.tokens[:prefix] = ctx.batch.tokens[:prefix]
        bare.decode(prefix, 0, last_logits_only=True)
        hctx = None
        if head is not None:
            hctx = Context(head, n_ctx=n_ctx, n_batch=n_batch, n_threads=threads, embd_input=True,
                           flash_attn=flash_attn)
            np.copyto(hctx.batch.embd[:prefix], trunk[:prefix])
            hctx.decode(prefix, 0, last_logits_only=True)
        sizes = list(range(1, max_batch + 1))
        times: dict[int, list[float]] = {b: [] for b in sizes}
        ratios: dict[int, list[float]] = {b: [] for b in sizes}
        head_ratios: list[float] = []
        capture_diffs: list[float] = []
        head_times: list[float] = []

        # llama.cpp rebuilds its compute graph when the batch shape changes and reuses
        # it otherwise; decoding keeps one shape for many steps, so each timed forward
        # follows an untimed one of the same shape (for a small model the rebuild is a
        # large part of a forward: ~0.3 ms of the built-in model's 0.5-0.8 ms).
        def main_forward(c: Context, b: int) -> float:
            dt = 0.0
            for _ in range(2):
                c.batch.tokens[:b] = rng.integers(3, m.n_vocab, b)
                t = time.perf_counter()
                c.decode(b, prefix, last_logits_only=False)
                dt = time.perf_counter() - t
                c.trim(prefix)
            return dt

        def head_forward() -> float:
            dt = 0.0
            for _ in range(2):
                np.copyto(hctx.batch.embd[:1], trunk[prefix: prefix + 1])
                t = time.perf_counter()
                hctx.decode(1, prefix, last_logits_only=True)
                dt = time.perf_counter() - t
                hctx.trim(prefix)
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
                th = head_forward()
                head_times.append(th)
                head_ratios.append(th / t1)
        ratios[1] = [1.0]
        verify = {b: median(times[b]) for b in sizes}
        result = {
            "mode": mode,
            "bundle": str(bundle_dir),
            "quantization": m.quantization,
            "threads": threads,
            "prefix_tokens": prefix,
            "flash_attn": flash_attn,
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


def _failure_line(stderr: str) -> str:
    """The line of a child's stderr that says why it died (ggml abort or Python error), not the backtrace."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if re.search(r"\.(c|cpp):\d+: ", line) or "GGML_ASSERT" in line:
            return re.sub(r"^.*/(ggml/src/|src/)", "", line)
    for line in reversed(lines):
        if not line.startswith(("#", "[", "warning:")):
            return line
    return "no message"


def measure_in_child(bundle_dir: Path, *, mode: str, max_batch: int, repeat: int, threads: int,
                     timeout: float = 1800) -> dict[str, Any]:
    """:func:`measure_costs` in a child process; a crash becomes ``{"crashed": True, ...}``."""
    cmd = [sys.executable, "-m", "mtpcode.bench.synthetic", str(bundle_dir), "--mode", mode,
           "--max-batch", str(max_batch), "--repeat", str(repeat), "--threads", str(threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "crashed": True, "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
        return {"mode": mode, "crashed": True, "error": f"{how}: {_failure_line(proc.stderr)}"}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"mode": mode, "crashed": True, "error": "no result from the measuring process"}


# ---------------------------------------------------------------------------
# projection


def geometric_acceptance(tokens_per_forward: float, n_drafts: int) -> float:
    """The per-draft acceptance a with 1 + a + a^2 + ... + a^n = tokens_per_forward (an assumption:
    each further draft is accepted with the same conditional probability)."""
    lo, hi = 0.0, 1.0
    target = min(tokens_per_forward, n_drafts + 1.0)
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(mid ** i for i in range(n_drafts + 1)) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def project(costs: dict[str, Any], tokens_per_forward: float = PAPER_TOKENS_PER_FORWARD,
            n_drafts: int = 3, *, statistic: str = "median") -> dict[str, Any]:
    """Projected speedup of self-speculative decoding over plain decoding from measured costs.

    Plain decoding: one 1-row forward per token. Speculative with k drafts: one
    (k+1)-row forward plus k head forwards per step, yielding 1 + a + ... + a^k
    tokens (a from ``tokens_per_forward`` at ``n_drafts`` drafts, geometric).
    Python overhead per step is not included (see the real benchmark for it).
    ``statistic``: which timings to use, "median" or "min" (the least-disturbed
    run of each size, on a shared machine the closer to the intrinsic cost).
    """
    if statistic not in ("median", "min"):
        raise UsageError(f"statistic must be median or min, not {statistic!r}")
    suffix = "_min_rel" if statistic == "min" else "_rel"
    rel = {int(b): float(v) for b, v in costs["verify" + suffix].items()}
    head = float(costs.get("head" + suffix) or 0.0)
    a = geometric_acceptance(tokens_per_forward, n_drafts)
    per_k = []
    for k in range(0, min(n_drafts, max(rel) - 1) + 1):
        tpf = sum(a ** i for i in range(k + 1))
        cost = rel[k + 1] + k * head
        per_k.append({"drafts": k, "tokens_per_forward": round(tpf, 3), "step_cost_rel": round(cost, 3),
                      "speedup": round(tpf / cost, 3)})
    best = max(per_k, key=lambda r: r["speedup"])
    return {
        "label": "PROJECTION (measured forward costs x assumed acceptance), not a measured speedup",
        "statistic": statistic,
        "tokens_per_forward_at_n": tokens_per_forward,
        "n_drafts": n_drafts,
        "per_draft_acceptance": round(a, 4),
        "per_k": per_k,
        "at_n": per_k[min(n_drafts, len(per_k) - 1)],
        "best": best,
    }


def _main(argv: Sequence[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mtpcode.bench.synthetic")
    ap.add_argument("bundle")
    ap.add_argument("--mode", default="off")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    result = measure_costs(Path(args.bundle), mode=args.mode, max_batch=args.max_batch, repeat=args.repeat,
                           threads=args.threads)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
