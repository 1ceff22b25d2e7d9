"""Measure a trained checkpoint's bundles on held-out code.

    python -m converters.eval_bundle --ckpt DIR BUNDLE [BUNDLE ...] [--json OUT]
    python -m converters.eval_bundle --ckpt DIR --heldout packages BUNDLE [BUNDLE ...]

``--heldout stdlib`` (the built-in model's first run) measures on the held-out
split of the standard library; ``--heldout packages`` on whole third-party
packages the package corpus never trains on (``converters.corpus.EVAL_PACKAGES``:
click, prompt_toolkit, pygments), as installed here: windows of their files for
top-1, and the *first function* of each file as a prompt (the file's text up to
and including its first ``def`` line, at most 1,500 characters of it).

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
import re
import sys
from pathlib import Path

import numpy as np

from converters import data
from converters.corpus import EVAL_PACKAGES
from converters.corpus import heldout_prompts as cut_prompts
from mtpcode import bundle as B
from mtpcode.bench.run import divergence_margins, package_files
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


def heldout_package_files() -> list[tuple[str, str]]:
    """(name, text) of every Python file of the held-out packages installed here, sorted by name."""
    files = package_files(EVAL_PACKAGES, min_chars=0, max_chars=10**9)
    missing = set(EVAL_PACKAGES) - {name.split("/", 1)[0] for name, _ in files}
    if missing:
        raise SystemExit(f"eval_bundle: held-out packages not installed here: {', '.join(sorted(missing))}")
    return files


FIRST_DEF = re.compile(r"^\s*(async\s+)?def \w+\(.*\)[^:]*:\s*$")


def first_function_prompts(files: list[tuple[str, str]], n: int, max_chars: int = 1500) -> list[tuple[str, str]]:
    """(name, prompt): each file's text up to and including its first one-line ``def`` signature (the
    last ``max_chars`` characters of it, cut at a line start), for ``n`` files spread over ``files``."""
    found = []
    for name, text in files:
        lines = text.split("\n")
        for i, line in enumerate(lines):
            if FIRST_DEF.match(line):
                prompt = "\n".join(lines[: i + 1]) + "\n"
                if len(prompt) > max_chars:
                    prompt = prompt[-max_chars:].split("\n", 1)[1]
                found.append((f"{name}:{i + 1}", prompt))
                break
    return [found[i * len(found) // n] for i in range(n)] if n < len(found) else found


def package_windows(bundle_dir: Path, files: list[tuple[str, str]], seq_len: int, n_windows: int) -> np.ndarray:
    """``n_windows`` windows of ``seq_len`` + 1 tokens, evenly spaced over the files' tokens (the bundle's
    own tokenizer, each file after a BOS)."""
    with Model(bundle_dir / B.MAIN_NAME) as model:
        stream = np.concatenate([np.asarray(model.tokenize(text, add_bos=True), dtype=np.int32) for _, text in files])
    stride = (len(stream) - seq_len - 1) // n_windows
    return np.stack([stream[i * stride : i * stride + seq_len + 1] for i in range(n_windows)])


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


def speculative(bundle_dir: Path, prompts: list[str], max_tokens: int, threads: int, n_ctx: int = 512,
                names: list[str] | None = None) -> dict:
    """Greedy decoding with all heads (adaptive drafting and drafts from the context off) vs plain:
    tokens per main forward and identity."""
    gen, fwd, identical, per_prompt, mismatches = 0, 0, 0, [], []
    with Engine(bundle_dir, n_ctx=n_ctx, n_threads=threads) as eng:
        for index, prompt in enumerate(prompts):
            runs = {}
            for heads in (None, 0):
                opts = GenerationOptions(max_tokens=max_tokens, heads=heads, adaptive=False, context_draft=False)
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
            if ids != runs[0][0]:
                plain = runs[0][0]
                at = next((i for i, (x, y) in enumerate(zip(ids, plain)) if x != y), min(len(ids), len(plain)))
                mismatches.append({"prompt_index": index, "first_difference_at": at, "token_ids": ids,
                                   "plain_token_ids": plain})
        extra_bufts = eng.extra_bufts
    out = {"prompts": len(prompts), "generated_tokens": gen, "main_forwards": fwd,
           "tokens_per_forward": gen / fwd if fwd else 0.0, "identical_to_plain": identical,
           "per_prompt": per_prompt}
    if mismatches:
        # where each output left plain decoding: the main model's logit gap between the two tokens
        doc = {"conditions": {"model": str(bundle_dir), "extra_bufts": extra_bufts, "threads": threads},
               "mismatches": mismatches,
               "prompts": [{"name": names[m["prompt_index"]] if names else f"prompt {m['prompt_index']}",
                            "text": prompts[m["prompt_index"]],
                            "plain_token_ids": m["plain_token_ids"]} for m in mismatches]}
        for k, m in enumerate(mismatches):
            m["prompt_index"] = k  # index into doc["prompts"]
        out["mismatch_margins"] = divergence_margins(doc, threads)
    return out


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
    ap.add_argument("--heldout", choices=("stdlib", "packages"), default="stdlib",
                    help="held-out code: the standard library's split, or whole packages (see above)")
    ap.add_argument("--prompts", type=int, default=48, help="--heldout packages: first-function prompts")
    args = ap.parse_args(argv)
    params = json.loads((args.ckpt / "params.json").read_text())
    n_ctx = 512
    if args.heldout == "packages":
        files = heldout_package_files()
        windows = package_windows(args.bundles[0], files, args.seq_len, args.windows)
        named = first_function_prompts(files, args.prompts)
        prompts = [p for _, p in named]
        n_ctx = 2048
    else:
        windows = _windows(args.work_dir, params["vocab_size"], args.seq_len, args.windows)
        named = []
        prompts = heldout_prompts()
    report: dict = {"heldout": args.heldout, "windows": len(windows), "seq_len": args.seq_len,
                    "prompt_names": [n for n, _ in named], "max_tokens": args.max_tokens, "bundles": {}}
    ref = None
    for b in args.bundles:
        am = bundle_argmax(b, windows, args.threads)
        entry = {"heldout_top1": top1(am, windows)}
        if ref is None:
            ref = am
        entry["agreement_with_first"] = [float((a == r).mean()) for a, r in zip(am, ref)]
        entry["size_bytes"] = sum(f.stat().st_size for f in b.iterdir() if f.is_file())
        entry["speculative"] = speculative(b, prompts, args.max_tokens, args.threads, n_ctx,
                                           names=[n for n, _ in named] or None)
        print(b, json.dumps({k: v for k, v in entry.items()}), flush=True)
        report["bundles"][str(b)] = entry
    if args.heldout == "stdlib":
        report["tokenizer_parity"] = tokenizer_parity(args.bundles[0], args.ckpt / "tokenizer.model")
        print(json.dumps(report["tokenizer_parity"]))
    report["completions"] = completions(args.bundles[0], 48, args.threads)
    for c in report["completions"]:
        print("----\n" + c["prompt"] + "\u2588" + c["completion"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
