"""Checkpoint directory -> bundle directory, built in a temporary directory and
moved into place at the end, so an error or Ctrl-C leaves nothing half-written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from converters.checkpoint import Checkpoint, open_checkpoint
from converters.gguf_export import head_plan, main_plan, plan_bytes, write_gguf
from converters.quantize import FLOAT_QUANTS, normalize_quant, quantize_file
from converters.tensor_map import NORM, OUTPUT
from converters.verify import VerifyReport, verify_bundle
from mtpcode import bundle as B
from mtpcode.errors import OutputError

# Called as progress(stage, done, total): stage is a short label, done/total in bytes (total 0: unknown).
ProgressFn = Callable[[str, int, int], None]


@dataclass
class ConversionResult:
    out_dir: Path
    quant: str
    files: dict[str, int]  # file name -> bytes
    parameters: dict[str, int]  # "main" / "head-k" -> parameter count
    seconds: float
    manifest: B.Manifest
    verify_report: VerifyReport | None = None
    notes: list[str] = field(default_factory=list)


def fingerprint(ckpt: Checkpoint) -> str:
    """Identifies the source model (shape, tokenizer, shared final norm), whatever the quantization."""
    h = hashlib.sha256()
    h.update(json.dumps(ckpt.params.to_dict(), sort_keys=True).encode())
    h.update(ckpt.vocab.sha256.encode())
    h.update(ckpt.tensor(NORM).to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _intermediate_type(ckpt: Checkpoint, quant: str) -> str:
    """Float type to write: the target for float quants, else lossless for the source dtype."""
    if quant in FLOAT_QUANTS:
        return quant
    dtype = ckpt.dtype(OUTPUT)
    return {torch.bfloat16: "BF16", torch.float16: "F16"}.get(dtype, "F32")


def check_output(out_dir: Path, force: bool) -> None:
    """OutputError unless ``out_dir`` can be (re)created."""
    if out_dir.exists() and not force:
        raise OutputError(f"{out_dir} already exists; pass --force to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir} exists and is not a directory")
    parent = out_dir.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {probe}: permission denied; choose another --out")


def convert_checkpoint(
    ckpt_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    quant: str = "Q8_0",
    tokenizer: str | os.PathLike[str] | None = None,
    force: bool = False,
    threads: int | None = None,
    verify: bool = False,
    progress: ProgressFn | None = None,
) -> ConversionResult:
    """Convert a Meta MTP checkpoint into a bundle at ``out_dir``.

    Raises NoInputError / DataError for bad input, OutputError if ``out_dir``
    exists (without ``force``) or is not writable; ``verify=True`` runs
    ``converters.verify`` on the finished bundle before it is moved into place
    and raises DataError when it is outside tolerance.
    """
    start = time.monotonic()
    quant = normalize_quant(quant)
    out = Path(out_dir).expanduser().resolve()
    check_output(out, force)
    ckpt = open_checkpoint(Path(ckpt_dir).expanduser(), Path(tokenizer).expanduser() if tokenizer else None)
    p = ckpt.params
    fp = fingerprint(ckpt)
    report = lambda stage, done, total: progress(stage, done, total) if progress else None  # noqa: E731

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=out.parent))
    except OSError as exc:
        raise OutputError(f"cannot write to {out.parent}: {exc.strerror}; choose another --out") from None
    try:
        float_type = _intermediate_type(ckpt, quant)
        name = ckpt.directory.resolve().name
        jobs = [(B.MAIN_NAME, main_plan(p), "main", 0)]
        jobs += [(B.head_name(k), head_plan(k), "head", k) for k in range(1, p.n_future_tokens)]
        total = sum(plan_bytes(ckpt, plan, float_type) for _, plan, _, _ in jobs)
        written = 0
        entries: dict[str, B.FileEntry] = {}
        for file_name, plan, role, index in jobs:
            final = tmp / file_name
            raw = final if quant in FLOAT_QUANTS else tmp / (file_name + f".{float_type.lower()}")

            def tick(n: int, file_name: str = file_name) -> None:
                nonlocal written
                written += n
                report(f"writing {file_name}", written, total)

            write_gguf(raw, ckpt, ckpt.vocab, plan, float_type=float_type,
                       name=name if role == "main" else f"{name} head {index}",
                       role=role, head_index=index, fingerprint=fp, progress=tick)
            if raw != final:
                report(f"quantizing {file_name} to {quant}", 0, 0)
                quantize_file(raw, final, quant, threads)
                raw.unlink()
            entries[file_name] = B.FileEntry(file_name, final.stat().st_size, B.sha256_file(final))

        manifest = B.Manifest(
            n_future_tokens=p.n_future_tokens,
            n_trunk=p.n_trunk,
            n_embd=p.dim,
            n_vocab=p.vocab_size,
            quantization=quant,
            fingerprint=fp,
            main=entries[B.MAIN_NAME],
            heads=tuple(entries[B.head_name(k)] for k in range(1, p.n_future_tokens)),
            source={
                "checkpoint": str(ckpt.directory.resolve()),
                "tokenizer": str(ckpt.tokenizer_path.resolve()),
                "params": p.to_dict(),
                "tokenizer_sha256": ckpt.vocab.sha256,
            },
        )
        (tmp / B.MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")

        verify_report = None
        if verify:
            report("verifying against the PyTorch reference", 0, 0)
            verify_report = verify_bundle(ckpt, tmp, quant, threads=threads)
            verify_report.raise_if_failed()

        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    parameters = {"main": _count(ckpt, [t.meta_name for t in main_plan(p)])}
    for k in range(1, p.n_future_tokens):
        parameters[f"head-{k}"] = _count(ckpt, [t.meta_name for t in head_plan(k)])
    return ConversionResult(
        out_dir=out,
        quant=quant,
        files={e.file: e.size for e in (manifest.main, *manifest.heads)}
        | {B.MANIFEST_NAME: (out / B.MANIFEST_NAME).stat().st_size},
        parameters=parameters,
        seconds=time.monotonic() - start,
        manifest=manifest,
        verify_report=verify_report,
    )


def _count(ckpt: Checkpoint, names: list[str]) -> int:
    total = 0
    for name in names:
        n = 1
        for d in ckpt.shape(name):
            n *= d
        total += n
    return total


def _move_into_place(tmp: Path, out: Path) -> None:
    """Atomically (per rename) replace ``out`` with ``tmp``; the old bundle is removed only after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
