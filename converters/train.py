"""Train a small multi-token-prediction code model and write it as a Meta checkpoint.

    python -m converters.train --out DIR --steps N [--resume] [shape / optimiser flags]

DIR receives ``consolidated.pth`` + ``params.json`` + ``tokenizer.model`` (the
layout of Meta's released MTP checkpoints, ready for ``mtpcode convert``),
``train_state.pt`` (model + optimiser + step, for ``--resume``),
``train_log.jsonl`` (one JSON object per logged step / evaluation) and
``summary.json`` (final held-out figures).

Data: ``--corpus stdlib`` (the running interpreter's standard library, split
by file) or ``--corpus packages`` (converters.corpus: named installed packages,
with whole packages such as click, prompt_toolkit and pygments held out).

Devices: ``--device cpu`` or ``cuda`` (``auto``: cuda when available). bf16
autocast on either (``--no-bf16`` for float32); the weights and the
optimiser state stay float32.

Determinism: the batch of step s depends only on (seed, s), so a run resumed
from a checkpoint sees exactly the batches the uninterrupted run would have.
On the CPU the same command gives bit-identical weights; CUDA kernels (the
attention backward) are not bit-reproducible, so a CUDA run is seeded and
resumable but repeats only to rounding.

``--time-budget S`` sizes the run to S seconds of training: after the first
``CALIBRATION_STEPS`` steps it measures the seconds per step and sets
``--steps`` so that the loop ends within the budget, and re-estimates it at
every log step until the final decay starts (the learning rate does not
depend on the step count before that). The step count it chose is in
summary.json and the saved state, so ``--steps N`` repeats the run.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from converters import corpus as package_corpus
from converters import data
from converters.data import prepare_corpus
from converters.params import ModelParams
from converters.reference import MTPTransformer
from mtpcode.errors import DataError, UsageError

STATE_NAME = "train_state.pt"
LOG_NAME = "train_log.jsonl"
SUMMARY_NAME = "summary.json"
CORPUS_NAME = "corpus.json"
# Steps run before --time-budget fixes the step count (the first few, with CUDA's
# start-up, are left out of the timing); the warmup is at least this long, so
# the learning rate so far does not depend on the step count.
CALIBRATION_STEPS = 30
CALIBRATION_SKIP = 10
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
    max_files: int | None = None  # corpus limit (stdlib corpus), for tests
    corpus: str = "stdlib"  # "stdlib" or "packages" (converters.corpus)
    packages: str = ""  # packages corpus: comma-separated training packages ("" = converters.corpus's list)
    eval_packages: str = ",".join(package_corpus.EVAL_PACKAGES)
    max_package_mb: float = package_corpus.DEFAULT_PACKAGE_CAP / 1e6
    tokenizer_mb: float = 40.0  # packages corpus: source the tokenizer trains on
    char_coverage: float = 0.9995  # packages corpus: SentencePiece character_coverage

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
) -> torch.Tensor:
    """The paper's loss with its memory-saving backward; returns per-head mean CE (a detached [n] tensor).

    ``tokens`` is (B, T + n_future_tokens): the model reads the first T and
    head k is scored on tokens[t + 1 + k]. The trunk runs forward once; each
    head's loss is backpropagated on its own into a detached copy of h_trunk
    (so only one head's activations live at a time), and the accumulated
    gradient then goes through the trunk once. Gradients accumulate into
    ``.grad`` (scaled by ``loss_scale``); the total loss is the sum over heads.
    The losses stay on the device (no synchronisation per step).
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
        losses.append(loss.detach().float())
    h.backward(h_leaf.grad)
    return torch.stack(losses)


@torch.no_grad()
def evaluate(model: MTPTransformer, batches, device: torch.device | None = None) -> tuple[list[float], list[float]]:
    """Per-head (mean CE, top-1 accuracy) over an iterable of (B, T + n) token batches (moved to ``device``)."""
    n = model.params.n_future_tokens
    loss_sum, hit_sum, count = [0.0] * n, [0.0] * n, 0
    for tokens in batches:
        if device is not None:
            tokens = tokens.to(device)
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


@torch.no_grad()
def speculative_tokens_per_forward(model: MTPTransformer, prompts: list[list[int]], n_new: int,
                                   device: torch.device | None = None, eos_id: int | None = None,
                                   keep_outputs: bool = False) -> dict:
    """Greedy self-speculative decoding simulated in PyTorch: tokens per main forward with all heads drafting.

    Each forward verifies the previous forward's next token plus the heads'
    drafts after it and keeps the drafts up to the first that differs from
    head 0's greedy choice, as mtpcode's runtime does with adaptive drafting
    off; the output is plain greedy decoding by construction. The sequence is
    recomputed each forward (no KV cache): an estimate for the training run,
    not a speed measurement; the converted bundle is measured by
    ``converters.eval_bundle`` / ``mtpcode bench``. ``keep_outputs``: also
    return each prompt's tokens (``outputs``).
    """
    n_drafts = model.params.n_future_tokens - 1
    total_tokens = total_forwards = 0
    per_prompt = []
    outputs = []

    def drafts_at(h: torch.Tensor, pos: int) -> list[int]:
        return [int(model.head_logits(h, k)[0, pos].argmax()) for k in range(1, n_drafts + 1)]

    for prompt in prompts:
        seq = torch.tensor([prompt], device=device)
        h = model.trunk(seq)  # the prompt's forward (not counted, as in the runtime's Stats)
        nxt = int(model.head_logits(h, 0)[0, -1].argmax())
        drafts = drafts_at(h, -1)
        emitted, forwards = [nxt], 0
        while len(emitted) < n_new and not (eos_id is not None and eos_id in emitted):
            full = torch.cat([seq, torch.tensor([[nxt, *drafts]], device=device)], dim=1)
            h = model.trunk(full)
            base = seq.shape[1]
            main_next = model.head_logits(h, 0)[0, base:].argmax(-1).tolist()  # greedy after full[:base+1+i]
            accepted = 0
            while accepted < n_drafts and drafts[accepted] == main_next[accepted]:
                accepted += 1
            forwards += 1
            emitted += [*drafts[:accepted], main_next[accepted]]
            seq = full[:, : base + 1 + accepted]
            nxt = main_next[accepted]
            drafts = drafts_at(h, base + accepted)
        emitted = emitted[:n_new]
        if eos_id is not None and eos_id in emitted:
            emitted = emitted[: emitted.index(eos_id) + 1]
        outputs.append(emitted)
        total_tokens += len(emitted)
        total_forwards += forwards
        per_prompt.append(len(emitted) / max(1, forwards))
    result: dict[str, Any] = {
        "prompts": len(prompts), "new_tokens": n_new, "tokens": total_tokens, "main_forwards": total_forwards,
        "tokens_per_forward": total_tokens / max(1, total_forwards),
        "per_prompt_median": float(np.median(per_prompt)) if per_prompt else 0.0}
    if keep_outputs:
        result["outputs"] = outputs
    return result


def make_optimizer(model: MTPTransformer, cfg: TrainConfig) -> torch.optim.AdamW:
    # Weight decay on matrices only; norms keep their scale.
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    # The fused kernel on CUDA: one launch for all parameters instead of several per tensor.
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None,
    )


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (``cuda:N``) or ``auto`` (cuda when available); UsageError if CUDA is asked for and absent."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise UsageError(f"--device {name!r}: choose cpu, cuda or auto")
    return torch.device(name)


CKPT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def write_checkpoint(model: MTPTransformer, out: Path, tokenizer_path: Path, dtype: str = "float32") -> None:
    """``consolidated.pth`` (Meta's state-dict names), ``params.json`` and ``tokenizer.model`` in ``out``.

    ``dtype``: the stored precision (Meta's released checkpoints are bfloat16; half
    the bytes of float32, which matters when the file must travel).
    """
    p = model.params
    state = {k: v.detach().to("cpu", CKPT_DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}
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
                       for k, v in record.items() if not isinstance(v, (list, dict)))
        heads = " ".join(f"{k}=[{', '.join(f'{x:.3f}' for x in v)}]"
                         for k, v in record.items() if isinstance(v, list))
        print(f"{fmt} {heads}", flush=True)


def load_corpus(cfg: TrainConfig, work_dir: Path, threads: int | None, quiet: bool = True):
    """The corpus ``cfg.corpus`` names: data.Corpus (stdlib) or corpus.PackageCorpus (packages)."""
    if cfg.corpus == "stdlib":
        return prepare_corpus(work_dir, cfg.vocab_size, seed=cfg.seed, max_files=cfg.max_files)
    if cfg.corpus != "packages":
        raise UsageError(f"--corpus {cfg.corpus!r}: choose stdlib or packages")
    return package_corpus.prepare_package_corpus(
        work_dir, cfg.vocab_size,
        package_corpus.parse_list(cfg.packages, package_corpus.DEFAULT_PACKAGES),
        package_corpus.parse_list(cfg.eval_packages, package_corpus.EVAL_PACKAGES),
        seed=cfg.seed, max_package_bytes=int(cfg.max_package_mb * 1e6),
        tokenizer_bytes=int(cfg.tokenizer_mb * 1e6), char_coverage=cfg.char_coverage, threads=threads or 1,
        progress=None if quiet else (lambda msg: print(msg, flush=True)))


def device_name(dev: torch.device) -> str:
    """The GPU's name, or the CPU's model name (Linux), for the records."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def steps_for_budget(cfg: TrainConfig, step: int, seconds_per_step: float, budget_left: float) -> int:
    """The step count that ends training within ``budget_left`` seconds from ``step``.

    At least one step past the calibration and never into the warmup (the
    schedule so far must not depend on the result).
    """
    more = int(budget_left / seconds_per_step) if seconds_per_step > 0 else 0
    return max(step + 1, cfg.warmup, step + more)


def train(cfg: TrainConfig, out: Path, *, work_dir: Path | None = None, resume: bool = False,
          ckpt_every: int = 200, eval_every: int = 200, eval_batches: int = 8, log_every: int = 10,
          threads: int | None = 2, quiet: bool = False, stop_at: int | None = None, device: str = "cpu",
          time_budget: float | None = None, ckpt_dtype: str = "float32", spec_prompts: int = 0,
          spec_tokens: int = 64) -> dict | None:
    """Run (or resume) training; returns the summary written to ``summary.json``.

    ``stop_at`` ends the run early after that step, with its state saved (as an
    interruption would), and returns None; ``--resume`` continues it.
    ``time_budget`` (seconds, fresh runs only) replaces ``cfg.steps`` by the
    count measured to fit (see the module docstring). ``spec_prompts`` > 0
    adds a simulated self-speculative decoding on that many held-out prompts to
    the summary (:func:`speculative_tokens_per_forward`).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = replace(cfg)  # --time-budget changes steps: never the caller's object
    dev = resolve_device(device)
    if threads:
        torch.set_num_threads(threads)
    if ckpt_dtype not in CKPT_DTYPES:
        raise UsageError(f"--ckpt-dtype {ckpt_dtype!r}: choose {', '.join(CKPT_DTYPES)}")
    if time_budget is not None and resume:
        raise UsageError("--time-budget sizes a fresh run; to continue one, --resume with the --steps it chose")
    if time_budget is not None and cfg.warmup < CALIBRATION_STEPS:
        raise UsageError(f"--time-budget needs --warmup >= {CALIBRATION_STEPS} (the steps it times before "
                         "choosing --steps must not depend on it)")
    if time_budget is not None:
        # the step count must leave the timed steps before the decay, whatever --steps said
        while decay_start(cfg) <= CALIBRATION_STEPS:
            cfg.steps += 1
    if dev.type == "cuda":
        # float32 matrix products (outside autocast) may use TF32 tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    corpus = load_corpus(cfg, Path(work_dir) if work_dir else out / "cache", threads, quiet)
    params = cfg.model_params()
    model = MTPTransformer(params)
    model.init_weights(cfg.seed)  # on the CPU, so every device starts from the same weights
    model.to(dev)
    opt = make_optimizer(model, cfg)
    step, tokens_seen = 0, 0
    state_path = out / STATE_NAME
    if resume:
        if not state_path.exists():
            raise UsageError(f"--resume: {state_path} not found; start without --resume")
        state = torch.load(state_path, weights_only=True, map_location=dev)
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
    parts = getattr(corpus, "heldout_parts", {})
    manifest_path = getattr(corpus, "manifest_path", None)
    if manifest_path is not None:
        shutil.copyfile(manifest_path, out / CORPUS_NAME)

    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16)

    def run_eval() -> dict:
        model.eval()
        with autocast():
            loss, acc = evaluate(model, held, dev)
        model.train()
        return {"step": step, "heldout_loss": loss, "heldout_top1": acc}

    n_params = sum(p.numel() for p in model.parameters())
    if not resume:
        _log(out, {"event": "start", "n_params": n_params, "device": str(dev),
                   "device_name": device_name(dev),
                   "train_tokens": len(corpus.train), "heldout_tokens": len(corpus.heldout),
                   "train_files": corpus.n_train_files, "heldout_files": corpus.n_heldout_files,
                   "config": json.dumps(asdict(cfg))}, quiet)
    budget: dict = {}
    t_start = t_calib = time.time()
    t0, window_losses, grad_norm = time.time(), [], torch.zeros(())
    while step < cfg.steps:
        lr = lr_at(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = train_batch(corpus.train, cfg, step).to(dev, non_blocking=True)
        with autocast():
            losses = mtp_loss_backward(model, batch)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += cfg.batch_size * cfg.seq_len
        window_losses.append(losses)
        if time_budget is not None and step == CALIBRATION_SKIP:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t_calib = time.time()
        elif time_budget is not None and step >= CALIBRATION_STEPS and step < decay_start(cfg) and (
                step == CALIBRATION_STEPS or step % log_every == 0):
            # Until the decay starts the learning rate does not depend on the step count, so the
            # count may still change: re-estimated from all steps timed so far, it follows the
            # machine's real rate (evaluations included) and the run ends within the budget.
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            per_step = (time.time() - t_calib) / (step - CALIBRATION_SKIP)
            steps = steps_for_budget(cfg, step, per_step, time_budget - (time.time() - t_start))
            steps = max(steps, next(n for n in range(step + 1, 10 * step + 100)
                                    if decay_start(replace(cfg, steps=n)) > step))
            if steps != cfg.steps or not budget:
                cfg.steps = steps
                budget = {"time_budget_s": time_budget, "timed_steps": step - CALIBRATION_SKIP,
                          "seconds_per_step": per_step,
                          "tokens_per_s": cfg.batch_size * cfg.seq_len / per_step, "steps": cfg.steps}
                _log(out, {"event": "time_budget", "step": step, **budget}, quiet)
        if step % log_every == 0 or step == cfg.steps:
            mean = [float(x) for x in torch.stack(window_losses).mean(0).tolist()]
            _log(out, {"step": step, "lr": lr, "grad_norm": float(grad_norm), "train_loss": mean,
                       "tok_per_s": round(len(window_losses) * cfg.batch_size * cfg.seq_len
                                          / (time.time() - t0), 1)}, quiet)
            t0, window_losses = time.time(), []
        if step % eval_every == 0 or step == cfg.steps:
            _log(out, run_eval(), quiet)
        if step % ckpt_every == 0 or step == cfg.steps or step == stop_at:
            save_state(state_path, model, opt, cfg, step, tokens_seen)
        if step == stop_at:
            return None
    train_seconds = time.time() - t_start
    write_checkpoint(model, out, corpus.tokenizer_path, ckpt_dtype)
    final = run_eval()
    summary = {"steps": step, "tokens_seen": tokens_seen, "n_params": n_params,
               "train_tokens": len(corpus.train), "heldout_tokens": len(corpus.heldout),
               "train_files": corpus.n_train_files, "heldout_files": corpus.n_heldout_files,
               "train_bytes": corpus.n_train_bytes,
               "heldout_loss": final["heldout_loss"], "heldout_top1": final["heldout_top1"],
               "train_seconds": round(train_seconds, 1), "device": str(dev),
               "device_name": device_name(dev),
               "checkpoint_dtype": ckpt_dtype,
               "config": asdict(cfg), "python": sys.version.split()[0], "torch": torch.__version__}
    if budget:
        summary["time_budget"] = budget
    if parts:
        model.eval()
        with autocast():
            summary["heldout_by_package"] = {
                name: dict(zip(("loss", "top1"), evaluate(model, heldout_batches(stream, cfg, eval_batches), dev)))
                for name, stream in parts.items()}
    if spec_prompts > 0:
        summary["speculative"] = _speculative_summary(model, corpus, cfg, spec_prompts, spec_tokens, dev, autocast)
    (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _speculative_summary(model: MTPTransformer, corpus, cfg: TrainConfig, n_prompts: int, n_new: int,
                         dev: torch.device, autocast) -> dict:
    """Simulated tokens per forward on held-out prompts (packages corpus: cut from the held-out packages)."""
    sp = data.load_tokenizer(corpus.tokenizer_path)
    if isinstance(corpus, package_corpus.PackageCorpus):
        files = [f for fs in package_corpus.build_corpus(
            [], package_corpus.parse_list(cfg.eval_packages, package_corpus.EVAL_PACKAGES)).heldout.values()
            for f in fs]
    else:
        files = data.split_sources()[1]
    # evenly spaced over all prompts, so every held-out package is represented
    picked = package_corpus.spread(package_corpus.heldout_prompts(files), n_prompts)
    ids = [[data.BOS_ID, *sp.encode(text)][-(cfg.seq_len - n_new):] for _, text in picked]
    model.eval()
    with autocast():
        return speculative_tokens_per_forward(model, ids, n_new, dev, eos_id=data.EOS_ID)


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
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (cuda when available) [default: cpu]")
    ap.add_argument("--time-budget", type=float, metavar="SECONDS",
                    help="choose --steps so that training takes about this long (timed over the first steps)")
    ap.add_argument("--ckpt-dtype", default="float32", choices=sorted(CKPT_DTYPES),
                    help="precision of consolidated.pth [default: float32]")
    ap.add_argument("--spec-prompts", type=int, default=0,
                    help="at the end, simulate self-speculative decoding on this many held-out prompts")
    ap.add_argument("--spec-tokens", type=int, default=64, help="new tokens per simulated prompt")
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
                        threads=args.threads, quiet=args.quiet, stop_at=args.stop_at, device=args.device,
                        time_budget=args.time_budget, ckpt_dtype=args.ckpt_dtype,
                        spec_prompts=args.spec_prompts, spec_tokens=args.spec_tokens)
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
