"""Measure a trained checkpoint's bundles on held-out standard-library code.

    python -m converters.eval_bundle --ckpt DIR BUNDLE [BUNDLE ...] [--json OUT]

For each bundle (the first is the reference, normally the F32 one):

* per-head top-1 accuracy on held-out windows, through llama.cpp exactly as
  the runtime runs it (trunk captured from main.gguf, fed to each head-K.gguf),
  and per-head argmax agreement with the first bundle;
* greedy self-speculative decoding with the runtime's Engine on prompts cut
  from held-out files: tokens per main forward with all heads (adaptive
  drafting off, so every step drafts every head) and whether the output is
  token-for-token identical to plain greedy decoding (heads=0);
* whether llama.cpp tokenizes the held-out files exactly as SentencePiece does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from converters import data
from converters.corpus import heldout_prompts as cut_prompts
from mtpcode import bundle as B
from mtpcode.generation import Done, GenerationOptions
from mtpcode.llama import Context, Model, TrunkCapture, use_extra_bufts
from mtpcode.runtime import Engine

IDIOMS = [
    "import os\nimport sys\n\n\ndef main(",
    "class Point:\n    def __init__(self, x, y):\n",
    "    def __repr__(self):\n        return ",
    "if __name__ == '__main__':\n",
    "    with open(filename, 'rb') as f:\n",
    "        try:\n            import ",
    "    for i, line in enumerate(lines):\n",
    "def is_empty(seq):\n    \"\"\"Return True if",
]


def heldout_prompts(max_chars: int = 400, per_file: int = 2) -> list[str]:
    """Prompts cut from held-out files: the whole lines (at most ``max_chars``
    characters) before a non-blank line, at evenly spaced places in each file.

    About 140 tokens, so prompt + completion stays within the 256 positions the
    model was trained on. Deterministic.
    """
    _, held = data.split_sources()
    return [prompt for _, prompt in cut_prompts(held, per_file=per_file, max_chars=max_chars)]


def _windows(work_dir: Path, vocab_size: int, seq_len: int, n_windows: int) -> np.ndarray:
    corpus = data.prepare_corpus(work_dir, vocab_size)
    stream = corpus.heldout
    stride = len(stream) // n_windows
    return np.stack([stream[i * stride : i * stride + seq_len + 1] for i in range(n_windows)]).astype(np.int32)


def bundle_argmax(bundle_dir: Path, windows: np.ndarray, threads: int) -> list[np.ndarray]:
    """Per head k: argmax at every position of every window, shape (n_windows, seq_len)."""
    manifest = B.open_bundle(bundle_dir).manifest
    n = windows.shape[1] - 1
    extra = use_extra_bufts("auto")
    trunk = np.zeros((n, manifest.n_embd), dtype=np.float32)
    capture = TrunkCapture(manifest.trunk_tensor, trunk)
    main = Model(bundle_dir / B.MAIN_NAME, extra_bufts=extra)
    heads = [Model(bundle_dir / B.head_name(k), extra_bufts=extra) for k in range(1, manifest.n_future_tokens)]
    out = [np.zeros((len(windows), n), dtype=np.int32) for _ in range(manifest.n_future_tokens)]
    try:
        with Context(main, n_ctx=n, n_batch=n, n_threads=threads, capture=capture) as ctx:
            head_ctx = [Context(h, n_ctx=n, n_batch=n, n_threads=threads, embd_input=True) for h in heads]
            try:
                for w, tokens in enumerate(windows):
                    ctx.trim(0)
                    ctx.batch.tokens[:n] = tokens[:n]
                    ctx.decode(n, 0, last_logits_only=False)
                    out[0][w] = ctx.logits(n).argmax(-1)
                    for k, hc in enumerate(head_ctx, start=1):
                        hc.trim(0)
                        hc.batch.embd[:n] = trunk[:n]
                        hc.decode(n, 0, last_logits_only=False)
                        out[k][w] = hc.logits(n).argmax(-1)
            finally:
                for hc in head_ctx:
                    hc.close()
    finally:
        for m in (main, *heads):
            m.close()
    return out


def top1(argmax: list[np.ndarray], windows: np.ndarray) -> list[float]:
    """Per head k: fraction of positions t where argmax equals token t+1+k."""
    n = windows.shape[1] - 1
    accs = []
    for k, a in enumerate(argmax):
        valid = n - k  # targets beyond the window are unknown
        accs.append(float((a[:, : valid] == windows[:, 1 + k : 1 + k + valid]).mean()))
    return accs


def speculative(bundle_dir: Path, prompts: list[str], max_tokens: int, threads: int) -> dict:
    """Greedy decoding with all heads vs plain: tokens per main forward and identity."""
    gen, fwd, identical, per_prompt = 0, 0, 0, []
    with Engine(bundle_dir, n_ctx=512, n_threads=threads) as eng:
        for prompt in prompts:
            runs = {}
            for heads in (None, 0):
                opts = GenerationOptions(max_tokens=max_tokens, heads=heads, adaptive=False)
                ids, stats = [], None
                for ev in eng.generate(prompt, opts):
                    if isinstance(ev, Done):
                        stats = ev.stats
                    else:
                        ids.extend(ev.token_ids)
                runs[heads] = (ids, stats)
            ids, stats = runs[None]
            gen += stats.generated_tokens
            fwd += stats.main_forwards
            identical += ids == runs[0][0]
            per_prompt.append(round(stats.tokens_per_forward, 3))
    return {"prompts": len(prompts), "generated_tokens": gen, "main_forwards": fwd,
            "tokens_per_forward": gen / fwd if fwd else 0.0, "identical_to_plain": identical,
            "per_prompt": per_prompt}


def completions(bundle_dir: Path, max_tokens: int, threads: int) -> list[dict]:
    out = []
    with Engine(bundle_dir, n_ctx=512, n_threads=threads) as eng:
        for prompt in IDIOMS:
            text = "".join(ev.text for ev in eng.generate(prompt, GenerationOptions(max_tokens=max_tokens))
                           if not isinstance(ev, Done))
            out.append({"prompt": prompt, "completion": text})
    return out


def tokenizer_parity(bundle_dir: Path, tokenizer_path: Path) -> dict:
    """Held-out files where llama.cpp's tokenization equals SentencePiece's."""
    sp = data.load_tokenizer(tokenizer_path)
    _, held = data.split_sources()
    same = 0
    with Model(bundle_dir / B.MAIN_NAME) as model:
        for src in held:
            same += model.tokenize(src.text, add_bos=False) == sp.encode(src.text)
    return {"files": len(held), "identical": same}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m converters.eval_bundle", description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--ckpt", type=Path, required=True, help="checkpoint directory (tokenizer, params)")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/mtpcode-train-cache"))
    ap.add_argument("--windows", type=int, default=48)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    params = json.loads((args.ckpt / "params.json").read_text())
    windows = _windows(args.work_dir, params["vocab_size"], args.seq_len, args.windows)
    prompts = heldout_prompts()
    report: dict = {"windows": len(windows), "seq_len": args.seq_len, "bundles": {}}
    ref = None
    for b in args.bundles:
        am = bundle_argmax(b, windows, args.threads)
        entry = {"heldout_top1": top1(am, windows)}
        if ref is None:
            ref = am
        entry["agreement_with_first"] = [float((a == r).mean()) for a, r in zip(am, ref)]
        entry["size_bytes"] = sum(f.stat().st_size for f in b.iterdir() if f.is_file())
        entry["speculative"] = speculative(b, prompts, args.max_tokens, args.threads)
        print(b, json.dumps({k: v for k, v in entry.items()}), flush=True)
        report["bundles"][str(b)] = entry
    report["tokenizer_parity"] = tokenizer_parity(args.bundles[0], args.ckpt / "tokenizer.model")
    report["completions"] = completions(args.bundles[0], 48, args.threads)
    print(json.dumps(report["tokenizer_parity"]))
    for c in report["completions"]:
        print("----\n" + c["prompt"] + "\u2588" + c["completion"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
