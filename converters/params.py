"""``params.json`` of a Meta (Llama-format) checkpoint, with Llama's defaults."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from mtpcode.errors import DataError, NoInputError


@dataclass(frozen=True)
class ModelParams:
    """Model shape. Optional keys that ``params.json`` omits get Llama's defaults."""

    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    n_kv_heads: int | None = None  # None: same as n_heads (no grouped-query attention)
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    n_future_tokens: int = 1
    max_seq_len: int = 4096  # not in Meta's params.json; Llama 2's training context

    def __post_init__(self) -> None:
        problems = []
        if self.dim <= 0 or self.n_layers <= 0 or self.n_heads <= 0 or self.vocab_size <= 0:
            problems.append("dim, n_layers, n_heads and vocab_size must be positive")
        elif self.dim % self.n_heads:
            problems.append(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        elif self.head_dim % 2:
            problems.append(f"head dimension {self.head_dim} is odd (RoPE needs pairs)")
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            problems.append(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.kv_heads}")
        if not 1 <= self.n_future_tokens < self.n_layers:
            problems.append(f"n_future_tokens {self.n_future_tokens} must be between 1 and n_layers-1")
        if problems:
            raise DataError("params.json: " + "; ".join(problems))

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_trunk(self) -> int:
        """Trunk blocks shared by all heads; ``layers`` has n_trunk + 1 entries (the last is head 0)."""
        return self.n_layers - self.n_future_tokens

    @property
    def n_extra_heads(self) -> int:
        return self.n_future_tokens - 1

    @property
    def ffn_hidden(self) -> int:
        """SwiGLU hidden size, computed as Meta's Llama code does."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_dict(cls, data: dict[str, Any], default_vocab_size: int | None = None) -> ModelParams:
        """Known keys are taken, unknown keys ignored, missing required keys reported.

        ``vocab_size`` of -1 (as Llama 2's params.json has) means "the tokenizer's
        size", given as ``default_vocab_size``.
        """
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known and v is not None}
        if default_vocab_size is not None and values.get("vocab_size", -1) == -1:
            values["vocab_size"] = default_vocab_size
        missing = [k for k in ("dim", "n_layers", "n_heads", "vocab_size") if k not in values]
        if missing:
            raise DataError(f"params.json: missing required key(s) {', '.join(missing)}")
        try:
            for key in ("dim", "n_layers", "n_heads", "vocab_size", "n_kv_heads", "multiple_of",
                        "n_future_tokens", "max_seq_len"):
                if key in values:
                    values[key] = _as_int(key, values[key])
            for key in ("ffn_dim_multiplier", "norm_eps", "rope_theta"):
                if key in values:
                    values[key] = float(values[key])
        except (TypeError, ValueError) as exc:
            raise DataError(f"params.json: {exc}") from None
        return cls(**values)

    @classmethod
    def load(cls, path: Path, default_vocab_size: int | None = None) -> ModelParams:
        if not path.is_file():
            raise NoInputError(f"{path} not found: a Meta checkpoint directory has params.json beside consolidated.pth")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected a JSON object")
        return cls.from_dict(data, default_vocab_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return int(value)
