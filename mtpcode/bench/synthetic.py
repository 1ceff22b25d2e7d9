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
every configuration starts from a clean address space. ``mtpcode bench --synthetic
SHAPE`` runs it so; by hand (the JSON goes to stdout, and to ``--out``):

    python -m mtpcode.bench.synthetic BUNDLE [--mode off|on|repack] [--max-batch 8] [--threads 2]
    python -m mtpcode.bench.synthetic MODEL --contexts 64,512,2000 [--rows 1,2,4,8] [--flash off,on] \\
        [--threads 1,2] --out FILE.json
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters.params import ModelParams
from mtpcode import bundle as B
from mtpcode.bench.costmodel import (
    DESKTOPS,
    PAPER_TOKENS_PER_FORWARD,
    fit_context_costs,
    fit_roofline,
    geometric_acceptance,
    project_speedup,
)
from mtpcode.bench.measure import cpu_name, measure_costs, median, memory_bandwidth
from mtpcode.config import cache_dir
from mtpcode.errors import UsageError, run_script
from mtpcode.files import atomic_write_text

# name -> ModelParams fields. "7b" is Meta's 7B MTP code model (Gloeckle et al. 2024).
SHAPES: dict[str, dict[str, Any]] = {
    "7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, n_future_tokens=4, multiple_of=256),
    "1b": dict(dim=2048, n_layers=24, n_heads=16, vocab_size=32000, n_future_tokens=4, multiple_of=256),
    "tiny": dict(dim=256, n_layers=6, n_heads=4, vocab_size=512, n_future_tokens=4, multiple_of=256),
}
QUANTS = ("Q4_0", "Q4_K_M", "Q8_0")
FORMAT_TAG = "v2"  # bump when the written files change, so stale caches are rebuilt


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
    import gguf  # ~75 ms to import: only the writer of synthetic bundles needs it

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
        jitter = rnd.take(rows * cols).reshape(rows, cols) / 255.0 - 0.5
        return (np.ones((rows, cols), dtype=np.float32) + 0.1 * jitter).astype(np.float32)
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
        yield name, functools.partial(random_tensor, kind, rows, cols, cols ** -0.5, rnd), kind


def _write_gguf(path: Path, p, quant: str, *, role: str, head_index: int, fingerprint: str,
                n_blocks: int, block_offset: int, with_output: bool, seed: int) -> None:
    import gguf  # ~75 ms to import: only the writer of synthetic bundles needs it

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


def shape_params(shape: str, trunk_blocks: int | None = None):
    """ModelParams of a synthetic ``shape``; ``trunk_blocks`` keeps only that many trunk blocks
    (a shallower model of the same width, whose per-block costs scale to the full depth)."""
    if shape not in SHAPES:
        raise UsageError(f"unknown synthetic shape {shape!r}; choose one of {', '.join(SHAPES)}")
    fields = dict(SHAPES[shape])
    if trunk_blocks is not None:
        if trunk_blocks < 1:
            raise UsageError(f"a synthetic model needs at least one trunk block, not {trunk_blocks}")
        fields["n_layers"] = trunk_blocks + fields["n_future_tokens"]
    return ModelParams(**fields)


def forward_bytes(shape: str, quant: str, trunk_blocks: int | None = None) -> tuple[int, int]:
    """Weight bytes one forward reads: (main model, one head), from the tensor types of ``quant``.

    The token embedding is looked up (one row per token), not read, in the main model;
    a head has no output matrix of its own and multiplies by the (tied) token embedding.
    """
    if quant not in QUANTS:
        raise UsageError(f"synthetic bundles are written in {', '.join(QUANTS)}, not {quant!r}")
    p = shape_params(shape, trunk_blocks)

    def nbytes(name: str, layer: int, n_layers: int, tied: bool) -> int:
        kind = tensor_types(quant, name, layer, n_layers, tied)
        if kind == "F32":
            return 4 * p.dim
        rows, cols = _shape_of(name, p)
        lay = _LAYOUTS[kind]
        return rows * cols // lay.weights * lay.size

    def block(prefix: str, layer: int, n_layers: int, tied: bool) -> int:
        names = ["attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                 "ffn_down"]
        return sum(nbytes(f"{prefix}{n}.weight", layer, n_layers, tied) for n in names)

    n_all = p.n_trunk + 1
    main = sum(block(f"blk.{i}.", i, n_all, False) for i in range(n_all))
    main += nbytes("output_norm.weight", 0, n_all, False) + nbytes("output.weight", 0, n_all, False)
    head = block("blk.0.", 0, 1, True) + nbytes("output_norm.weight", 0, 1, True)
    head += nbytes("token_embd.weight", 0, 1, True)
    return main, head


def build_bundle(shape: str, quant: str, cache: Path | None = None, *, n_heads: int | None = None,
                 trunk_blocks: int | None = None, progress: Callable[[str], None] | None = None) -> Path:
    """The random-weight bundle of ``shape`` in ``quant``, built once and cached.

    ``n_heads`` limits how many head files are written (the cost model times
    one head; all heads have the same shape). ``trunk_blocks`` builds a shallower
    model of the shape (see :func:`shape_params`). Returns the bundle directory.
    """
    if quant not in QUANTS:
        raise UsageError(f"synthetic bundles are written in {', '.join(QUANTS)}, not {quant!r}")
    p = shape_params(shape, trunk_blocks)
    heads = p.n_future_tokens - 1 if n_heads is None else min(n_heads, p.n_future_tokens - 1)
    root = (cache or cache_dir()) / "synthetic"
    depth = "" if trunk_blocks is None else f"-{trunk_blocks}t"
    out = root / f"{shape}{depth}-{quant.lower()}-{heads}h-{FORMAT_TAG}"
    if (out / B.MANIFEST_NAME).is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    key = f"synthetic|{shape}{depth}|{json.dumps(SHAPES[shape], sort_keys=True)}"
    fp = hashlib.sha256(key.encode()).hexdigest()[:16]
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
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------------
# measuring (in a child process)


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
    """:func:`mtpcode.bench.measure.measure_costs` in a child process; a crash becomes ``{"crashed": True, ...}``."""
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
# forward costs by context length, rows, threads and flash attention


def _rotate(xs: Sequence[Any], r: int) -> list[Any]:
    """``xs`` started at position r (mod len): each repetition visits the cells in another order."""
    if not xs:
        return []
    r %= len(xs)
    return list(xs[r:]) + list(xs[:r])


def _main_gguf(path: Path) -> Path:
    """main.gguf of a bundle directory, or the .gguf file itself."""
    path = Path(path)
    return path / B.MAIN_NAME if path.is_dir() else path


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def measure_context_costs(model_path: Path, *, contexts: Sequence[int] = (64, 512, 2000),
                          rows: Sequence[int] = tuple(range(1, 9)), flash: Sequence[bool] = (False, True),
                          threads: Sequence[int] = (1, 2), repeat: int = 5, mode: str = "off",
                          text: str | None = None, warm_graph: bool = True,
                          progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time forwards of each of ``rows`` rows after each of ``contexts`` cached tokens, with flash
    attention on and off and at each thread count, as llama.cpp runs them for plain ``Llama``
    (logits for every row, as a verify needs; no trunk capture).

    One llama.cpp context per (flash attention, context length), each filled once; the thread
    count is switched on the context (``llama_set_n_threads``). Each repetition visits every
    cell in a rotated order, and every b-row forward is paired with a 1-row forward right
    before it on the same context: the ratio of the pair (``rel``) cancels most of the drift
    of a shared machine. ``text`` gives the cached tokens (tokenized real code; repeated if
    short), else random token ids. ``warm_graph`` times each forward after an untimed one of
    the same shape, as decoding reuses llama.cpp's graph (worth it for small models, whose
    graph rebuild is a large part of a forward; doubles the time of the measurement).
    ``mode``: extra buffer types "off" or "on" (llama.cpp's default).
    Returns per-cell medians (wall-clock and CPU time) and a :class:`mtpcode.policy.prior.ContextCosts` fit
    per (flash, threads), of CPU time with one thread (robust to other programs' load) and of
    wall-clock time with more.
    """
    # llama_cpp only for the commands that time forwards, not for every importer of this module
    import llama_cpp

    # (the native layer: the same reason)
    from mtpcode.llama import Context, Model

    say = progress or (lambda _msg: None)
    contexts = sorted({int(c) for c in contexts})
    rows = sorted({int(b) for b in rows} | {1})
    threads = [int(t) for t in threads]
    if not contexts or contexts[0] < 1 or repeat < 1 or not threads or min(threads) < 1:
        raise UsageError("context lengths, repeat and thread counts must be positive")
    if mode not in ("off", "on"):
        raise UsageError(f"unknown buffer mode {mode!r} (off or on)")
    path = _main_gguf(model_path)
    max_rows = rows[-1]
    load_before = _loadavg()
    t0 = time.perf_counter()
    model = Model(path, extra_bufts=mode == "on")
    rng = np.random.default_rng(0)
    need = contexts[-1] + max_rows
    if text:
        ids = model.tokenize(text)
        ids = (ids * (need // max(1, len(ids)) + 1))[:need]
        source = "text"
    else:
        ids = [int(x) for x in rng.integers(3, model.n_vocab, need)]
        source = "random token ids"
    tokens = np.asarray(ids, dtype=np.int32)
    n_batch = max(max_rows, min(512, contexts[-1]))
    ctxs: dict[tuple[bool, int], Context] = {}
    samples: dict[tuple[bool, int, int, int], list[float]] = {}
    cpu: dict[tuple[bool, int, int, int], list[float]] = {}
    ratios: dict[tuple[bool, int, int, int], list[float]] = {}
    cpu_ratios: dict[tuple[bool, int, int, int], list[float]] = {}

    def fill(c: Context, start: int, n: int) -> None:
        c.batch.token_ids[:n] = tokens[start: start + n]

    def forward(c: Context, start: int, b: int) -> tuple[float, float]:
        """Wall-clock and calling-thread CPU seconds of one forward (with one llama.cpp thread,
        which computes in the calling thread, the CPU time leaves out the time other programs
        held the core; with more threads it counts only this thread's share)."""
        dt = dc = 0.0
        for _ in range(2 if warm_graph else 1):
            fill(c, start, b)
            c0, t = time.thread_time(), time.perf_counter()
            c.decode(b, start, last_logits_only=False)
            dt, dc = time.perf_counter() - t, time.thread_time() - c0
            c.trim(start)
        return dt, dc

    try:
        for fa in flash:
            for n in contexts:
                say(f"filling {n} tokens of context, flash attention {'on' if fa else 'off'}")
                c = Context(model, n_ctx=n + max_rows + 16, n_batch=n_batch, n_threads=max(threads),
                            flash_attn=fa)
                ctxs[(fa, n)] = c
                for start in range(0, n, n_batch):
                    k = min(n_batch, n - start)
                    fill(c, start, k)
                    c.decode(k, start, last_logits_only=True)
                for t in threads:  # warm-up: page faults, thread pool start
                    llama_cpp.llama_set_n_threads(c.ptr, t, t)
                    forward(c, n, 1)
                    forward(c, n, max_rows)
        fill_s = time.perf_counter() - t0
        cells = list(ctxs)
        for r in range(repeat):
            say(f"repetition {r + 1} of {repeat}")
            for fa, n in _rotate(cells, r):
                c = ctxs[(fa, n)]
                for t in _rotate(threads, r):
                    llama_cpp.llama_set_n_threads(c.ptr, t, t)
                    for b in _rotate(rows[1:], r):
                        t1, c1 = forward(c, n, 1)
                        tb, cb = forward(c, n, b)
                        for key, wall, cpu_s in (((fa, t, n, 1), t1, c1), ((fa, t, n, b), tb, cb)):
                            samples.setdefault(key, []).append(wall)
                            cpu.setdefault(key, []).append(cpu_s)
                        ratios.setdefault((fa, t, n, b), []).append(tb / t1)
                        cpu_ratios.setdefault((fa, t, n, b), []).append(cb / c1 if c1 > 0 else 0.0)
    finally:
        for c in ctxs.values():
            c.close()
        model.close()
    out_cells = []
    for fa in flash:
        for t in threads:
            for n in contexts:
                out_cells.append({
                    "flash_attn": fa, "threads": t, "n_ctx_used": n,
                    "seconds": {str(b): round(median(samples[(fa, t, n, b)]), 7) for b in rows},
                    "min_s": {str(b): round(min(samples[(fa, t, n, b)]), 7) for b in rows},
                    "rel": {str(b): (1.0 if b == 1 else round(median(ratios[(fa, t, n, b)]), 4)) for b in rows},
                    "cpu_seconds": {str(b): round(median(cpu[(fa, t, n, b)]), 7) for b in rows},
                    "cpu_min_s": {str(b): round(min(cpu[(fa, t, n, b)]), 7) for b in rows},
                    "cpu_rel": {str(b): (1.0 if b == 1 else round(median(cpu_ratios[(fa, t, n, b)]), 4))
                                for b in rows},
                    "n_samples": {str(b): len(samples[(fa, t, n, b)]) for b in rows},
                })
    fits = {}
    if len(contexts) >= 2:
        for fa in flash:
            for t in threads:
                pts = [(b, n, median((cpu if t == 1 else samples)[(fa, t, n, b)])) for n in contexts for b in rows]
                label = f"flash attention {'on' if fa else 'off'}, {t} thread{'s' if t > 1 else ''}"
                fits[f"fa{int(fa)}-t{t}"] = fit_context_costs(pts, label).to_dict()
    return {
        "kind": "context_costs",
        "model": str(path),
        "mode": mode,
        "contexts": contexts,
        "rows": rows,
        "threads": threads,
        "flash_attn": [bool(f) for f in flash],
        "repeat": repeat,
        "warm_graph": warm_graph,
        "cached_tokens": source,
        "fill_s": round(fill_s, 2),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
        "cells": out_cells,
        "fits": fits,
    }


def context_table(doc: dict[str, Any]) -> str:
    """Markdown table of :func:`measure_context_costs`' cells: 1-row ms and b-row / 1-row ratios
    (medians; CPU time of the calling thread with one thread, wall-clock with more)."""
    rows = [b for b in doc["rows"] if b != 1]
    head = "| flash attn | threads | context | clock | 1 row (ms) | " + " | ".join(f"{b} rows" for b in rows) + " |"
    lines = [head, "|" + " --- |" * (5 + len(rows))]
    for cell in doc["cells"]:
        use_cpu = cell["threads"] == 1 and "cpu_seconds" in cell
        secs, rels = (cell["cpu_seconds"], cell["cpu_rel"]) if use_cpu else (cell["seconds"], cell["rel"])
        rel = " | ".join(f"{rels[str(b)]:.2f}x" for b in rows)
        lines.append(f"| {'on' if cell['flash_attn'] else 'off'} | {cell['threads']} | {cell['n_ctx_used']} | "
                     f"{'CPU' if use_cpu else 'wall'} | {1e3 * secs['1']:.2f} | {rel} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# thread scaling and the projection to other machines

# Trunk blocks of the two shallow models of a shape that the projection measures: their
# difference is the cost of blocks, the rest that of the embedding lookup, the output
# matrix and the fixed per-forward work; the full depth is scaled from them.
PROJECTION_DEPTHS = (1, 5)


def _child_json(cmd: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run ``python -m mtpcode.bench.synthetic ...`` in a child; its last stdout line is the JSON result."""
    try:
        proc = subprocess.run([sys.executable, "-m", "mtpcode.bench.synthetic", *cmd], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"crashed": True, "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
        return {"crashed": True, "error": f"{how}: {_failure_line(proc.stderr)}"}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"crashed": True, "error": "no result from the measuring process"}


def scale_depth(shallow: dict[int, dict[tuple[int, int], float]], full_blocks: int) -> dict[tuple[int, int], float]:
    """Forward times of a ``full_blocks``-block model from two shallower ones of the same width.

    ``shallow`` maps a block count to {(rows, threads): seconds}. Per cell: the cost of one
    block is the slope between the two depths, the rest (embedding lookup, output matrix,
    fixed work) the intercept, so ``T(full) = T(d1) + (full - d1) * (T(d2) - T(d1)) / (d2 - d1)``.
    Attention is part of each block; at the measured prefix (64 tokens) it is small.
    """
    if len(shallow) != 2:
        raise ValueError("scaling to the full depth needs exactly two measured depths")
    (d1, t1), (d2, t2) = sorted(shallow.items())
    out = {}
    for cell in sorted(set(t1) & set(t2)):
        per_block = (t2[cell] - t1[cell]) / (d2 - d1)
        out[cell] = t1[cell] + (full_blocks - d1) * per_block
    return out


def run_projection(shape: str, quants: Sequence[str], *, max_batch: int = 8, threads: Sequence[int] = (1, 2),
                   repeat: int = 7, mode: str = "on", tokens_per_forward: float | None = None,
                   n_drafts: int | None = None, cache: Path | None = None,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure 1..max_batch-row forwards of ``shape`` at each thread count (through two shallow
    models of the shape, scaled to the full depth), fit a :class:`mtpcode.bench.costmodel.Roofline`, and
    project speculative decoding's speedup on the desktops of :data:`mtpcode.bench.costmodel.DESKTOPS`.

    The results are PROJECTIONS: a fitted model x an assumed acceptance, labelled as such.
    """
    say = progress or (lambda _msg: None)
    if max_batch < 2:
        raise UsageError("--max-batch must be at least 2")
    if len(set(threads)) < 2:
        raise UsageError("the projection needs forwards at two or more thread counts, e.g. 1,2")
    tpf = PAPER_TOKENS_PER_FORWARD if tokens_per_forward is None else tokens_per_forward
    drafts = SHAPES[shape]["n_future_tokens"] - 1 if n_drafts is None else n_drafts
    drafts = min(drafts, max_batch - 1)
    full = shape_params(shape)
    full_blocks = full.n_trunk + 1
    rows = list(range(1, max_batch + 1))
    bw = memory_bandwidth()
    results = []
    for quant in quants:
        shallow: dict[int, dict[tuple[int, int], float]] = {}
        raw = {}
        crashed = None
        for depth in PROJECTION_DEPTHS:
            path = build_bundle(shape, quant, cache, n_heads=1, trunk_blocks=depth, progress=say)
            say(f"measuring {shape} {quant} with {depth} trunk block(s): 1..{max_batch} rows, "
                f"{','.join(map(str, threads))} threads")
            m = _child_json([str(path), "--mode", mode, "--contexts", "64", "--rows", ",".join(map(str, rows)),
                             "--flash", "off", "--threads", ",".join(map(str, threads)), "--repeat", str(repeat),
                             "--no-warm"], timeout=3600)
            if m.get("crashed"):
                crashed = m["error"]
                break
            raw[str(depth + 1)] = m["cells"]
            # the least disturbed estimate of each cell on a shared machine, the fastest run: with
            # one thread of CPU time (it leaves out the time other programs held the core), with more
            # of wall-clock time (a thread descheduled at a barrier stalls all of them)
            shallow[depth + 1] = {(int(b), c["threads"]): float(c["cpu_min_s"][b] if c["threads"] == 1
                                                                 else c["min_s"][b])
                                  for c in m["cells"] for b in c["seconds"]}
        if crashed:
            results.append({"quantization": quant, "crashed": True, "error": crashed})
            continue
        scaled_all = scale_depth(shallow, full_blocks)
        # a cell whose deeper model did not take longer than the shallower one was disturbed
        # (a shared machine): its per-block cost is noise, so it is left out and reported
        d1, d2 = sorted(shallow)
        unusable = sorted(cell for cell in scaled_all if shallow[d2][cell] <= shallow[d1][cell])
        scaled = {cell: v for cell, v in scaled_all.items() if cell not in unusable}
        if any(b <= drafts + 1 and (b, 1) not in scaled for b in rows):
            results.append({"quantization": quant, "crashed": True, "measured": raw,
                            "error": "one-thread forwards were too disturbed to scale (a deeper model measured "
                                     "faster than a shallower one); measure again on a quieter machine"})
            continue
        main_bytes, head_bytes = forward_bytes(shape, quant)
        # fitted to the row counts the projection uses (kernels that work 4 rows at a time
        # make 5-8 rows dearer than a line through 1-4 rows would say)
        fit = fit_roofline([(b, t, s) for (b, t), s in scaled.items() if b <= drafts + 1],
                           bytes_per_forward=main_bytes, head_bytes=head_bytes, label=f"{shape} {quant}")
        machines: list[dict[str, Any]] = [{"name": "this machine (check of the fit)", "cores": max(threads),
                                           "bandwidth_gb_s": fit.bandwidth_here_gb_s}]
        machines += [{"name": d.name, "cores": d.cores, "bandwidth_gb_s": d.bandwidth_gb_s, "note": d.note}
                     for d in DESKTOPS]
        projections = []
        for mach in machines:
            pj = project_speedup(fit.model, int(mach["cores"]), mach["bandwidth_gb_s"], tokens_per_forward=tpf,
                                 n_drafts=drafts)
            projections.append({"machine": mach, **pj})
        results.append({
            "quantization": quant,
            "main_bytes_per_forward": main_bytes,
            "head_bytes_per_forward": head_bytes,
            "full_depth_blocks": full_blocks,
            "measured_depth_blocks": [d + 1 for d in PROJECTION_DEPTHS],
            "statistic": "fastest run: one thread, CPU time of the calling thread; more threads, wall-clock",
            "scaled_seconds": {f"{b}x{t}": round(s, 6) for (b, t), s in sorted(scaled.items())},
            "unusable_cells": [f"{b}x{t}" for b, t in unusable],
            "scaled_rel": {f"t{t}": {str(b): round(scaled[(b, t)] / scaled[(1, t)], 3) for b in rows
                                     if (b, t) in scaled}
                           for t in sorted(set(threads)) if (1, t) in scaled},
            "measured": raw,
            "fit": fit.model.to_dict(),
            "fit_rows": list(range(1, drafts + 2)),
            "fit_memory_floor_here_s": round(fit.memory_here_s, 6),
            "fit_bandwidth_here_gb_s": round(fit.bandwidth_here_gb_s, 2) if fit.bandwidth_here_gb_s else None,
            "fit_residuals": fit.residuals,
            "fit_dropped": fit.dropped,
            "overhead_fitted": fit.overhead_fitted,
            "fit_max_abs_error": round(fit.max_abs_error, 4),
            "memory_bound_here_s": round(main_bytes / (bw["best_gb_s"] * 1e9), 4),
            "projections": projections,
        })
    return {
        "kind": "projection",
        "label": "PROJECTIONS: a cost model fitted to forwards measured on this machine, with assumed target "
                 "machines and the paper's acceptance; not measured speedups",
        "shape": shape,
        "params": SHAPES[shape],
        "mode": mode,
        "flash_attn": False,
        "prefix_tokens": 64,
        "threads": list(threads),
        "max_batch": max_batch,
        "repeat": repeat,
        "tokens_per_forward_assumed": tpf,
        "n_drafts": drafts,
        "memory_bandwidth": bw,
        "assumptions": [
            "time(b rows, P cores) = overhead + max(weight bytes / bandwidth, compute_1core(b) / P): "
            "compute_1core(b) + overhead is the one-thread time measured here for each row count (the fastest "
            "run's CPU time, which leaves out other programs' load); the overhead (and this machine's memory "
            "floor) is fitted to the forwards with more threads, except those slower than on one thread (an "
            "oversubscribed machine), and taken as 0 when none is left",
            "target cores are as fast as this machine's and scale perfectly; bandwidth is what llama.cpp reads "
            "at (about 60 GB/s for two channels of DDR5)",
            f"the full depth ({full_blocks} blocks) is scaled from models of "
            f"{' and '.join(str(d + 1) for d in PROJECTION_DEPTHS)} blocks of the same width",
            "a head costs its share of a 1-row forward by weight bytes",
            f"acceptance: {tpf} tokens per forward with {drafts} drafts, each further draft accepted with the "
            "same conditional probability (geometric)",
            "64 tokens of context, flash attention off; Python overhead per step is left out",
        ],
        "conditions": {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu": cpu_name(),
                       "cpus": os.cpu_count(), "loadavg_at_end": _loadavg()},
        "results": results,
    }


def format_projection(doc: dict[str, Any]) -> str:
    """The projection as text: scaled forward costs, the fit, and the projected speedups."""
    lines = [f"{doc['shape']} shape, {doc['mode']} buffers, memory bandwidth here "
             f"{doc['memory_bandwidth']['best_gb_s']} GB/s (numpy copy)", doc["label"]]
    for r in doc["results"]:
        if r.get("crashed"):
            lines.append(f"{r['quantization']}: CRASHED ({r['error']})")
            continue
        f = r["fit"]
        lines.append(f"{r['quantization']}: {r['main_bytes_per_forward'] / 1e9:.2f} GB per forward; fitted "
                     "one-core compute " + " ".join(f"{b}:{1e3 * v:.0f}" for b, v in f["compute_1core_s"].items())
                     + f" ms, overhead {1e3 * f['overhead_s']:.1f} ms"
                     + ("" if r["overhead_fitted"] else " (assumed: no usable multi-thread forward)")
                     + f" (fit within {r['fit_max_abs_error']:.0%}); "
                     + (f"memory floor here {1e3 * r['fit_memory_floor_here_s']:.0f} ms "
                        f"({r['fit_bandwidth_here_gb_s']:g} GB/s)" if r["fit_bandwidth_here_gb_s"]
                        else "no memory floor reached here"))
        if r.get("fit_dropped") or r.get("unusable_cells"):
            lines.append(f"  left out of the fit (disturbed by other programs): {len(r['fit_dropped'])} "
                         f"multi-thread forwards slower than on one thread, {len(r['unusable_cells'])} cells "
                         "whose deeper model was not slower")
        for t, rel in r["scaled_rel"].items():
            one = r["scaled_seconds"][f"1x{t[1:]}"]
            lines.append(f"  measured, {t[1:]} thread(s): 1 row {1e3 * one:.0f} ms; b rows / 1 row: "
                         + " ".join(f"{b}:{v:.2f}" for b, v in rel.items()))
        for pj in r["projections"]:
            mach, at, best = pj["machine"], pj["at_n"], pj["best"]
            bw = f"{mach['bandwidth_gb_s']:g} GB/s" if mach["bandwidth_gb_s"] else "no memory bound"
            lines.append(f"  PROJECTED {mach['name']} ({mach['cores']} cores, {bw}): plain {pj['one_row_ms']:.0f} ms"
                         f"/token; {at['drafts']} drafts {at['speedup']:.2f}x (best {best['drafts']} drafts "
                         f"{best['speedup']:.2f}x)")
    lines.append("assumptions: " + "; ".join(doc["assumptions"]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# projection


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


def _ints(value: str) -> list[int]:
    return [int(x) for x in value.split(",") if x.strip()]


def _flags(value: str) -> list[bool]:
    table = {"on": True, "off": False}
    if any(x.strip() not in table for x in value.split(",")):
        raise UsageError(f"--flash {value!r}: give on, off or on,off")
    return [table[x.strip()] for x in value.split(",")]


def _main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m mtpcode.bench.synthetic",
                                 description="Measure forward costs of a bundle (or a .gguf): the cost model's "
                                             "1..n rows after a 64-token prefix, or with --contexts, rows x "
                                             "context lengths x flash attention x threads.")
    ap.add_argument("bundle")
    ap.add_argument("--mode", default="off", help="extra buffer types: off, on (llama.cpp's default) or repack")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", default="2", help="thread count (with --contexts: a list, e.g. 1,2)")
    ap.add_argument("--contexts", help="cached-token counts to measure at, e.g. 64,512,2000")
    ap.add_argument("--rows", default="1,2,3,4,5,6,7,8", help="with --contexts: row counts, e.g. 1,2,4,8")
    ap.add_argument("--flash", default="off,on", help="with --contexts: flash attention settings")
    ap.add_argument("--text", help="with --contexts: a file whose tokens fill the cache (default: random ids)")
    ap.add_argument("--no-warm", action="store_true", help="with --contexts: time forwards without a warm graph")
    ap.add_argument("--out", help="write the JSON here as well as to stdout")
    args = ap.parse_args(argv)
    if args.contexts:
        text = Path(args.text).read_text(encoding="utf-8", errors="replace") if args.text else None
        result = measure_context_costs(Path(args.bundle), contexts=_ints(args.contexts), rows=_ints(args.rows),
                                       flash=_flags(args.flash), threads=_ints(args.threads), repeat=args.repeat,
                                       mode=args.mode, text=text, warm_graph=not args.no_warm,
                                       progress=lambda m: print(m, file=sys.stderr, flush=True))
        result["command"] = "python -m mtpcode.bench.synthetic " + " ".join(argv)
        result["cpu"] = cpu_name()
        print(context_table(result), file=sys.stderr)
    else:
        result = measure_costs(Path(args.bundle), mode=args.mode, max_batch=args.max_batch, repeat=args.repeat,
                               threads=_ints(args.threads)[0])
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    run_script(_main, "python -m mtpcode.bench.synthetic")
