"""``--verify``: run the PyTorch reference and the written bundle through
llama.cpp on a few token sequences and compare every head's logits.

The bundle side is exactly what the runtime does: ``main.gguf`` with the trunk
captured through the eval callback, each ``head-k.gguf`` fed those captured
rows as embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from converters.checkpoint import Checkpoint
from converters.reference import MTPTransformer
from mtpcode import bundle as B
from mtpcode.errors import DataError
from mtpcode.llama import Context, Model, TrunkCapture, default_threads, use_extra_bufts

# Per quantization type: (min argmax agreement per head, max |Δlogit| relative to the
# reference's max |logit|, or None where quantization noise makes it meaningless).
TOLERANCES: dict[str, tuple[float, float | None]] = {
    "F32": (0.98, 0.01),
    "F16": (0.95, 0.03),
    "BF16": (0.90, 0.06),
    "Q8_0": (0.90, None),
    "Q6_K": (0.85, None),
}
_DEFAULT_TOLERANCE = {"Q5": (0.80, None), "Q4": (0.70, None), "IQ4": (0.70, None)}
_LOW_BIT_TOLERANCE = (0.50, None)

SNIPPETS = [
    "import os\nimport sys\n\n\ndef main(argv=None):\n    parser = argparse.ArgumentParser(description=__doc__)\n",
    "class LRUCache:\n    def __init__(self, capacity: int) -> None:\n"
    "        self.capacity = capacity\n        self.data = {}\n",
    "    for i, line in enumerate(lines):\n        if not line.strip():\n            continue\n        yield i, line\n",
]


def tolerance(quant: str) -> tuple[float, float | None]:
    if quant in TOLERANCES:
        return TOLERANCES[quant]
    for prefix, tol in _DEFAULT_TOLERANCE.items():
        if quant.startswith(prefix):
            return tol
    return _LOW_BIT_TOLERANCE


@dataclass
class HeadResult:
    head: int  # 0 = next-token head (main.gguf)
    max_abs_diff: float
    logit_scale: float
    argmax_agreement: float
    positions: int


@dataclass
class VerifyReport:
    quant: str
    heads: list[HeadResult] = field(default_factory=list)
    trunk_max_abs_diff: float = 0.0

    @property
    def failures(self) -> list[str]:
        min_agree, max_rel = tolerance(self.quant)
        out = []
        for h in self.heads:
            if h.argmax_agreement < min_agree:
                out.append(f"head {h.head}: argmax agreement {h.argmax_agreement:.1%} < {min_agree:.0%}")
            rel = h.max_abs_diff / max(h.logit_scale, 1e-6)
            if max_rel is not None and rel > max_rel:
                out.append(f"head {h.head}: max |Δlogit| {h.max_abs_diff:.3g} is {rel:.1%} "
                           f"of the logit scale (> {max_rel:.0%})")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures

    def lines(self) -> list[str]:
        min_agree, max_rel = tolerance(self.quant)
        limit = f"argmax >= {min_agree:.0%}" + (f", max |Δ| <= {max_rel:.0%} of scale" if max_rel else "")
        rows = [f"verify ({self.quant}; tolerance {limit}):"]
        for h in self.heads:
            rows.append(
                f"  head {h.head}: max |Δlogit| {h.max_abs_diff:.2e} (logit scale {h.logit_scale:.2f}), "
                f"argmax agreement {h.argmax_agreement:.1%} over {h.positions} positions"
            )
        rows.append("  passed" if self.passed else "  FAILED: " + "; ".join(self.failures))
        return rows

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise DataError(
                "verification failed, bundle not written: " + "; ".join(self.failures)
                + " (a lower-bit --quant may be too lossy for this model; F32 failing means a conversion bug)"
            )


def _sequences(model, vocab_size: int, length: int, seed: int) -> list[list[int]]:
    seqs = [model.tokenize(s)[:length] for s in SNIPPETS]
    rng = np.random.default_rng(seed)
    seqs.append([1] + rng.integers(3, vocab_size, size=length - 1).tolist())  # covers the whole vocabulary
    return seqs


def verify_bundle(ckpt: Checkpoint, bundle_dir: Path, quant: str, *, threads: int | None = None,
                  length: int = 48, seed: int = 0) -> VerifyReport:
    """Compare the bundle in ``bundle_dir`` with the reference forward of ``ckpt``."""
    p = ckpt.params
    reference = MTPTransformer.from_state_dict(p, dict(ckpt.items()))
    threads = threads or default_threads()
    extra = use_extra_bufts("auto")
    report = VerifyReport(quant)
    stats = {k: [0.0, 0.0, 0, 0] for k in range(p.n_future_tokens)}  # max diff, scale, agree, total
    trunk_rows = np.zeros((length, p.dim), dtype=np.float32)
    capture = TrunkCapture(B.trunk_tensor_name(p.n_trunk), trunk_rows)
    main = Model(bundle_dir / B.MAIN_NAME, extra_bufts=extra)
    heads = [Model(bundle_dir / B.head_name(k), extra_bufts=extra) for k in range(1, p.n_future_tokens)]
    try:
        for tokens in _sequences(main, p.vocab_size, length, seed):
            n = len(tokens)
            with torch.no_grad():
                ids = torch.tensor([tokens])
                ref_trunk = reference.trunk(ids)
                ref_logits = [reference.head_logits(ref_trunk, k)[0].numpy() for k in range(p.n_future_tokens)]
            with Context(main, n_ctx=length, n_batch=length, n_threads=threads, capture=capture) as ctx:
                batch_tokens = ctx.batch.tokens
                assert batch_tokens is not None  # a context fed tokens
                batch_tokens[:n] = tokens
                ctx.decode(n, 0, last_logits_only=False)
                got = [ctx.logits(n).copy()]
            report.trunk_max_abs_diff = max(report.trunk_max_abs_diff,
                                            float(np.abs(trunk_rows[:n] - ref_trunk[0].numpy()).max()))
            for head in heads:
                with Context(head, n_ctx=length, n_batch=length, n_threads=threads, embd_input=True) as ctx:
                    batch_embd = ctx.batch.embd
                    assert batch_embd is not None  # a context fed embeddings
                    batch_embd[:n] = trunk_rows[:n]
                    ctx.decode(n, 0, last_logits_only=False)
                    got.append(ctx.logits(n).copy())
            for k, (g, r) in enumerate(zip(got, ref_logits)):
                s = stats[k]
                s[0] = max(s[0], float(np.abs(g - r).max()))
                s[1] = max(s[1], float(np.abs(r).max()))
                s[2] += int((g.argmax(-1) == r.argmax(-1)).sum())
                s[3] += n
    finally:
        for m in (main, *heads):
            m.close()
    for k, (diff, scale, agree, total) in stats.items():
        report.heads.append(HeadResult(k, diff, scale, agree / total, int(total)))
    return report
