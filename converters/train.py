"""Train a small multi-token-prediction code model and write it as a Meta checkpoint.

    python -m converters.train --out DIR --steps N [--resume] [shape / optimiser flags]

DIR receives ``consolidated.pth`` + ``params.json`` + ``tokenizer.model`` (the
layout of Meta's released MTP checkpoints, ready for ``mtpcode convert``),
``train_state.pt`` (model + optimiser + step, for ``--resume``),
``train_log.jsonl`` (one JSON object per logged step / evaluation) and
``summary.json`` (final held-out figures).

Determinism: the batch of step s depends only on (seed, s), so a run resumed
from a checkpoint sees exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from converters.data import prepare_corpus
from converters.params import ModelParams
from converters.reference import MTPTransformer
from mtpcode.errors import DataError, UsageError

STATE_NAME = "train_state.pt"
LOG_NAME = "train_log.jsonl"
SUMMARY_NAME = "summary.json"
# Keys written to params.json, in Meta's spelling.
PARAMS_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
               "ffn_dim_multiplier", "norm_eps", "rope_theta", "n_future_tokens")


@dataclass
class TrainConfig:
    """Everything that determines the trained weights (except thread count)."""

    steps: int = 1000
    dim: int = 256
    n_layers: int = 14
    n_heads: int = 4
    n_kv_heads: int | None = None
    vocab_size: int = 2048
    n_future_tokens: int = 4
    multiple_of: int = 64
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup: int = 100
    decay_frac: float = 0.25  # the last quarter of the steps decays lr to min_lr
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bf16: bool = True
    seed: int = 0
    max_files: int | None = None  # corpus limit, for tests

    def model_params(self) -> ModelParams:
        return ModelParams(
            dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
            vocab_size=self.vocab_size, multiple_of=self.multiple_of, norm_eps=self.norm_eps,
            rope_theta=self.rope_theta, n_future_tokens=self.n_future_tokens,
        )


def decay_start(cfg: TrainConfig) -> int:
    """First step of the final cosine decay."""
    return max(cfg.warmup, cfg.steps - int(cfg.decay_frac * cfg.steps))


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Warmup-stable-decay: linear warmup to ``lr``, constant, then a cosine to ``min_lr``.

    Until the decay starts the rate does not depend on ``steps``, so a run can
    be resumed with a different ``--steps`` (before its decay started) and
    still follow exactly the trajectory of a fresh run with that value.
    """
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    start = decay_start(cfg)
    if step < start:
        return cfg.lr
    progress = min(1.0, (step - start) / max(1, cfg.steps - start))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def train_batch(stream: np.ndarray, cfg: TrainConfig, step: int) -> torch.Tensor:
    """Batch of step ``step``: random windows of seq_len + n_future_tokens tokens, seeded by (seed, step)."""
    width = cfg.seq_len + cfg.n_future_tokens
    if len(stream) <= width:
        raise DataError(f"training corpus has {len(stream)} tokens, fewer than one window of {width}")
    rng = np.random.default_rng([cfg.seed, step])
    starts = rng.integers(0, len(stream) - width, size=cfg.batch_size)
    return torch.from_numpy(np.stack([stream[s : s + width] for s in starts]).astype(np.int64))


def heldout_batches(stream: np.ndarray, cfg: TrainConfig, n_batches: int) -> list[torch.Tensor]:
    """Fixed, evenly spaced, non-overlapping held-out windows (the same for every evaluation)."""
    width = cfg.seq_len + cfg.n_future_tokens
    n_windows = min(n_batches * cfg.batch_size, len(stream) // width)
    if n_windows == 0:
        raise DataError(f"held-out corpus has {len(stream)} tokens, fewer than one window of {width}")
    stride = len(stream) // n_windows
    windows = np.stack([stream[i * stride : i * stride + width] for i in range(n_windows)])
    return [torch.from_numpy(windows[i : i + cfg.batch_size].astype(np.int64))
            for i in range(0, n_windows, cfg.batch_size)]


def mtp_loss_backward(
    model: MTPTransformer, tokens: torch.Tensor, loss_scale: float = 1.0
) -> list[float]:
    """The paper's loss with its memory-saving backward; returns per-head mean CE.

    ``tokens`` is (B, T + n_future_tokens): the model reads the first T and
    head k is scored on tokens[t + 1 + k]. The trunk runs forward once; each
    head's loss is backpropagated on its own into a detached copy of h_trunk
    (so only one head's activations live at a time), and the accumulated
    gradient then goes through the trunk once. Gradients accumulate into
    ``.grad`` (scaled by ``loss_scale``); the total loss is the sum over heads.
    """
    n = model.params.n_future_tokens
    t = tokens.shape[1] - n
    rope = model.rope(t, tokens.device)
    h = model.trunk(tokens[:, :t], rope)
    h_leaf = h.detach().requires_grad_(True)
    losses = []
    for k in range(n):
        logits = model.head_logits(h_leaf, k, rope)
        target = tokens[:, 1 + k : 1 + k + t]
        loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten())
        (loss * loss_scale).backward()
        losses.append(loss.item())
    h.backward(h_leaf.grad)
    return losses


@torch.no_grad()
def evaluate(model: MTPTransformer, batches) -> tuple[list[float], list[float]]:
    """Per-head (mean CE, top-1 accuracy) over an iterable of (B, T + n) token batches."""
    n = model.params.n_future_tokens
    loss_sum, hit_sum, count = [0.0] * n, [0.0] * n, 0
    for tokens in batches:
        t = tokens.shape[1] - n
        rope = model.rope(t, tokens.device)
        h = model.trunk(tokens[:, :t], rope)
        for k in range(n):
            logits = model.head_logits(h, k, rope).float()
            target = tokens[:, 1 + k : 1 + k + t]
            loss_sum[k] += F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
            hit_sum[k] += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    return [s / count for s in loss_sum], [s / count for s in hit_sum]


def make_optimizer(model: MTPTransformer, cfg: TrainConfig) -> torch.optim.AdamW:
    # Weight decay on matrices only; norms keep their scale.
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
    )


def write_checkpoint(model: MTPTransformer, out: Path, tokenizer_path: Path) -> None:
    """``consolidated.pth`` (Meta's state-dict names), ``params.json`` and ``tokenizer.model`` in ``out``."""
    p = model.params
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, out / "consolidated.pth")
    params = {k: getattr(p, k) for k in PARAMS_KEYS}
    (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    if tokenizer_path.resolve() != (out / "tokenizer.model").resolve():
        shutil.copyfile(tokenizer_path, out / "tokenizer.model")


def save_state(path: Path, model, opt, cfg: TrainConfig, step: int, tokens_seen: int) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "config": asdict(cfg),
                "step": step, "tokens_seen": tokens_seen}, tmp)
    tmp.replace(path)


def _log(out: Path, record: dict, quiet: bool) -> None:
    with (out / LOG_NAME).open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    if not quiet:
        fmt = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in record.items() if not isinstance(v, list))
        heads = " ".join(f"{k}=[{', '.join(f'{x:.3f}' for x in v)}]"
                         for k, v in record.items() if isinstance(v, list))
        print(f"{fmt} {heads}", flush=True)


def train(cfg: TrainConfig, out: Path, *, work_dir: Path | None = None, resume: bool = False,
          ckpt_every: int = 200, eval_every: int = 200, eval_batches: int = 8, log_every: int = 10,
          threads: int | None = 2, quiet: bool = False, stop_at: int | None = None) -> dict | None:
    """Run (or resume) training; returns the summary written to ``summary.json``.

    ``stop_at`` ends the run early after that step, with its state saved (as an
    interruption would), and returns None; ``--resume`` continues it.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    corpus = prepare_corpus(Path(work_dir) if work_dir else out / "cache", cfg.vocab_size,
                            seed=cfg.seed, max_files=cfg.max_files)
    params = cfg.model_params()
    model = MTPTransformer(params)
    model.init_weights(cfg.seed)
    opt = make_optimizer(model, cfg)
    step, tokens_seen = 0, 0
    state_path = out / STATE_NAME
    if resume:
        if not state_path.exists():
            raise UsageError(f"--resume: {state_path} not found; start without --resume")
        state = torch.load(state_path, weights_only=True)
        saved = TrainConfig(**state["config"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        diff = [f.name for f in fields(cfg) if getattr(saved, f.name) != getattr(cfg, f.name)]
        if diff == ["steps"] and step <= min(decay_start(saved), decay_start(cfg)):
            diff = []  # same trajectory so far: the schedules agree up to here
        if diff:
            raise UsageError(f"--resume: settings differ from the saved run ({', '.join(diff)})")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    elif (out / LOG_NAME).exists():
        (out / LOG_NAME).unlink()
    held = heldout_batches(corpus.heldout, cfg, eval_batches)

    def run_eval() -> dict:
        model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss, acc = evaluate(model, held)
        model.train()
        return {"step": step, "heldout_loss": loss, "heldout_top1": acc}

    if not resume:
        _log(out, {"event": "start", "n_params": sum(p.numel() for p in model.parameters()),
                   "train_tokens": len(corpus.train), "heldout_tokens": len(corpus.heldout),
                   "train_files": corpus.n_train_files, "heldout_files": corpus.n_heldout_files,
                   "config": json.dumps(asdict(cfg))}, quiet)
    t0, window_losses = time.time(), []
    while step < cfg.steps:
        lr = lr_at(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = train_batch(corpus.train, cfg, step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            losses = mtp_loss_backward(model, batch)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += cfg.batch_size * cfg.seq_len
        window_losses.append(losses)
        if step % log_every == 0 or step == cfg.steps:
            mean = [float(x) for x in np.mean(window_losses, axis=0)]
            _log(out, {"step": step, "lr": lr, "grad_norm": grad_norm, "train_loss": mean,
                       "tok_per_s": round(len(window_losses) * cfg.batch_size * cfg.seq_len
                                          / (time.time() - t0), 1)}, quiet)
            t0, window_losses = time.time(), []
        if step % eval_every == 0 or step == cfg.steps:
            _log(out, run_eval(), quiet)
        if step % ckpt_every == 0 or step == cfg.steps or step == stop_at:
            save_state(state_path, model, opt, cfg, step, tokens_seen)
        if step == stop_at:
            return None
    write_checkpoint(model, out, corpus.tokenizer_path)
    final = run_eval()
    summary = {"steps": step, "tokens_seen": tokens_seen,
               "n_params": sum(p.numel() for p in model.parameters()),
               "train_tokens": len(corpus.train), "heldout_tokens": len(corpus.heldout),
               "train_files": corpus.n_train_files, "heldout_files": corpus.n_heldout_files,
               "train_bytes": corpus.n_train_bytes,
               "heldout_loss": final["heldout_loss"], "heldout_top1": final["heldout_top1"],
               "config": asdict(cfg), "python": sys.version.split()[0], "torch": torch.__version__}
    (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m converters.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output directory (checkpoint, state, logs)")
    ap.add_argument("--resume", action="store_true", help=f"continue from OUT/{STATE_NAME}")
    ap.add_argument("--work-dir", type=Path, help="tokenizer/token cache (default OUT/cache)")
    ap.add_argument("--ckpt-every", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--stop-at", type=int, help="stop after this step, state saved (resume later)")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif f.name in ("n_kv_heads", "max_files"):
            ap.add_argument(flag, type=int, default=default)
        else:
            ap.add_argument(flag, type=type(default), default=default)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    try:
        cfg.model_params()
        summary = train(cfg, args.out, work_dir=args.work_dir, resume=args.resume,
                        ckpt_every=args.ckpt_every, eval_every=args.eval_every,
                        eval_batches=args.eval_batches, log_every=args.log_every,
                        threads=args.threads, quiet=args.quiet, stop_at=args.stop_at)
    except (DataError, UsageError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return exc.exit_code
    if summary is None:
        print(f"stopped at step {args.stop_at}; continue with --resume")
        return 0
    print(json.dumps({k: summary[k] for k in ("steps", "tokens_seen", "heldout_loss", "heldout_top1")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
