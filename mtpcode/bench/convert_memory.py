"""Peak memory of ``mtpcode convert`` on a large random checkpoint in Meta's format.

    python -m mtpcode.bench.convert_memory --workdir /tmp/mem --json docs/results/convert_memory.json \\
        [--dim 2048 --n-layers 22 --vocab 8000] [--quant Q4_K_M]

Builds the checkpoint in a separate process, then runs ``mtpcode convert`` in
a child process and samples its memory from /proc: resident anonymous memory
(what the converter itself allocates) and resident file-backed memory (the
memory-mapped checkpoint, which the kernel can drop at any time). Writes a
JSON result to ``--json``. Needs PyTorch (``mtpcode[convert]``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtpcode.errors import MtpError, run_script

PROG = "python -m mtpcode.bench.convert_memory"


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _build(workdir: Path, dim: int, n_layers: int, n_heads: int, vocab: int, n_future: int) -> Path:
    code = f"""
import torch
from pathlib import Path
from converters.synthetic import train_tokenizer, make_checkpoint
torch.manual_seed(0)
w = Path({str(workdir)!r})
tok = train_tokenizer(w / 'tokenizer.model', {vocab}, max_bytes=20_000_000)
make_checkpoint(w / 'ckpt', tok, dim={dim}, n_layers={n_layers}, n_heads={n_heads}, n_future_tokens={n_future},
                multiple_of=256)
"""
    ckpt = workdir / "ckpt"
    if not (ckpt / "consolidated.pth").is_file():
        rc = subprocess.run([sys.executable, "-c", code]).returncode
        if rc != 0:
            raise MtpError(f"building the random checkpoint failed (exit status {rc}; its error is above)")
    return ckpt


# A waiter process whose only child is the conversion, so that its
# RUSAGE_CHILDREN peak is exactly the converter's peak RSS (quantization runs
# inside the converter process, through llama.cpp, so it is included).
_WAITER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
    "sys.exit(rc)\n"
)


def _child_pid(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def measure(ckpt: Path, out: Path, quant: str, threads: int) -> dict[str, Any]:
    """Seconds and peak memory of ``mtpcode convert`` of ``ckpt`` to ``out`` in a child process."""
    cmd = [sys.executable, "-m", "mtpcode", "convert", str(ckpt), "--out", str(out), "--quant", quant,
           "--force", "--no-register", "--threads", str(threads)]
    start = time.monotonic()
    waiter = subprocess.Popen([sys.executable, "-c", _WAITER, *cmd], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    peak = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample() -> None:
        # Resident anonymous vs file-backed memory of the converter, sampled every 20 ms.
        while not done.is_set():
            child = _child_pid(waiter.pid)
            if child is not None:
                s = _status(child)
                for k in peak:
                    peak[k] = max(peak[k], s.get(k, 0))
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out_text, err = waiter.communicate()
    done.set()
    t.join()
    if waiter.returncode != 0:
        raise MtpError(f"convert failed: {err.strip().splitlines()[-1] if err.strip() else waiter.returncode}")
    return {
        "seconds": round(time.monotonic() - start, 1),
        "peak_rss_bytes": int(out_text.strip().splitlines()[-1]),
        "peak_rss_anon_bytes_sampled": peak["RssAnon"],
        "peak_rss_file_bytes_sampled": peak["RssFile"],
    }


def main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--n-layers", type=int, default=22)
    ap.add_argument("--n-heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--n-future", type=int, default=4)
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, required=True, help="write the result here")
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = _build(args.workdir, args.dim, args.n_layers, args.n_heads, args.vocab, args.n_future)
    from converters.checkpoint import open_checkpoint  # torch: imported by the one step that reads the checkpoint

    c = open_checkpoint(ckpt)
    params = c.parameter_count()
    ckpt_bytes = (ckpt / "consolidated.pth").stat().st_size
    largest = max(c.shape(n)[0] * (c.shape(n)[1] if len(c.shape(n)) > 1 else 1) for n in c.names()) * 4
    del c
    result = measure(ckpt, args.workdir / "bundle", args.quant, args.threads)
    result.update(
        command=" ".join([PROG, *argv]),
        quant=args.quant,
        parameters=params,
        checkpoint_bytes=ckpt_bytes,
        largest_tensor_f32_bytes=largest,
        shape=dict(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, vocab=args.vocab,
                   n_future_tokens=args.n_future),
        machine=f"{platform.machine()}, {os.cpu_count()} cores",
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    gib = 1 << 30
    print(f"{params / 1e9:.2f}B parameters, checkpoint {ckpt_bytes / gib:.2f} GiB (bf16), {args.quant}, "
          f"{result['seconds']} s")
    print(f"peak RSS {result['peak_rss_bytes'] / gib:.2f} GiB = "
          f"anonymous {result['peak_rss_anon_bytes_sampled'] / gib:.2f} GiB "
          f"+ mapped checkpoint pages {result['peak_rss_file_bytes_sampled'] / gib:.2f} GiB (sampled)")
    return 0


if __name__ == "__main__":
    run_script(main, PROG)
