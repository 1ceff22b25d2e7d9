"""Small checkpoints in Meta's exact format, with random weights, for tests and
benchmarks: ``consolidated.pth`` (Meta's state-dict names), ``params.json`` and
a SentencePiece ``tokenizer.model`` trained here on Python source."""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from converters.data import train_code_tokenizer
from converters.params import ModelParams
from converters.reference import MTPTransformer


def stdlib_python_files(limit: int | None = None) -> list[Path]:
    """The running interpreter's standard-library ``*.py`` files, sorted (tests excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts
    )
    return files[:limit] if limit else files


def _lines(files: Iterable[Path], max_bytes: int) -> Iterator[str]:
    used = 0
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for line in text.splitlines():
            if line.strip():
                used += len(line) + 1
                yield line
            if used >= max_bytes:
                return


def train_tokenizer(out_path: Path, vocab_size: int, files: Iterable[Path] | None = None,
                    max_bytes: int = 2_000_000) -> Path:
    """Train a code-friendly SentencePiece BPE model (byte fallback, whitespace kept) to ``out_path``,
    on the first ``max_bytes`` of non-blank lines of ``files`` (default: 200 stdlib modules).

    Every character seen gets a piece (coverage 1.0); sentencepiece's own
    4192-byte line limit applies, as it always has for the test tokenizers."""
    lines = _lines(files if files is not None else stdlib_python_files(200), max_bytes)
    return train_code_tokenizer(lines, out_path, vocab_size, character_coverage=1.0, max_sentence_length=4192)


def random_model(p: ModelParams, seed: int = 0, logit_scale: float = 4.0) -> MTPTransformer:
    """A random MTP model. Norm weights are perturbed and the output scaled so that
    argmax margins are wide (tests compare argmaxes across implementations)."""
    gen = torch.Generator().manual_seed(seed)
    model = MTPTransformer(p)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            elif name == "tok_embeddings.weight":
                param.copy_(torch.randn(param.shape, generator=gen))
            else:
                fan_in = param.shape[1]
                param.copy_(torch.randn(param.shape, generator=gen) / fan_in**0.5)
        model.output.weight.mul_(logit_scale)
    return model


def save_checkpoint(out_dir: Path, p: ModelParams, state: dict[str, torch.Tensor], tokenizer: Path | None = None,
                    *, params_json: dict[str, Any] | None = None, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write ``consolidated.pth`` + ``params.json`` (+ a copy of the tokenizer) in Meta's layout."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().to(dtype).contiguous() for k, v in state.items()}, out_dir / "consolidated.pth")
    (out_dir / "params.json").write_text(json.dumps(params_json or _params_json(p), indent=2), encoding="utf-8")
    if tokenizer is not None and tokenizer.resolve() != (out_dir / "tokenizer.model").resolve():
        (out_dir / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return out_dir


def _params_json(p: ModelParams) -> dict[str, Any]:
    """params.json as Meta writes it: optional keys only when they differ from Llama's defaults."""
    data: dict[str, Any] = {
        "dim": p.dim, "n_layers": p.n_layers, "n_heads": p.n_heads, "vocab_size": p.vocab_size,
        "multiple_of": p.multiple_of, "norm_eps": p.norm_eps, "n_future_tokens": p.n_future_tokens,
    }
    if p.n_kv_heads is not None:
        data["n_kv_heads"] = p.n_kv_heads
    if p.ffn_dim_multiplier is not None:
        data["ffn_dim_multiplier"] = p.ffn_dim_multiplier
    if p.rope_theta != 10000.0:
        data["rope_theta"] = p.rope_theta
    return data


def make_checkpoint(out_dir: Path, tokenizer: Path, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                    logit_scale: float = 4.0, **params: Any) -> tuple[Path, MTPTransformer]:
    """Random-weight checkpoint with the given params (vocab_size defaults to the tokenizer's).

    Returns the directory and the float32 reference model holding exactly the
    saved weights (rounded through ``dtype``), for comparisons.
    """
    import sentencepiece as spm  # (the convert extra: only to size the vocabulary)

    params.setdefault("vocab_size", spm.SentencePieceProcessor(model_file=str(tokenizer)).get_piece_size())
    params.setdefault("multiple_of", 32)
    p = ModelParams(**params)
    model = random_model(p, seed=seed, logit_scale=logit_scale)
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    save_checkpoint(out_dir, p, state, tokenizer, dtype=dtype)
    return out_dir, MTPTransformer.from_state_dict(p, state)
