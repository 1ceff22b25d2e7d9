"""Reading a Meta multi-token-prediction checkpoint directory.

Tensors are memory-mapped (``torch.load(mmap=True, weights_only=True)``) and
handed out one at a time, so converting never holds the model twice. A pickle
that needs code execution to load is refused, never executed.
Model-parallel shards (``consolidated.00.pth``, ``.01``, ...) are merged one
tensor at a time along the dimension Meta's fairscale layers split.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from converters.params import ModelParams
from converters.spm import SpmVocab, read_spm
from converters.tensor_map import (
    NORM,
    OUTPUT,
    SKIPPED_BUFFERS,
    TOK_EMBEDDINGS,
    extra_head_block,
    trunk_block,
)
from mtpcode.errors import DataError, NoInputError

CHECKPOINT_NAME = "consolidated.pth"
PARAMS_NAME = "params.json"
TOKENIZER_NAME = "tokenizer.model"
_SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth$")

# Dimension along which fairscale's model-parallel layers split a tensor across
# shards (None: replicated). ParallelEmbedding splits the embedding dimension,
# ColumnParallelLinear the output rows, RowParallelLinear the input columns.
_SHARD_DIM: dict[str, int | None] = {
    TOK_EMBEDDINGS: 1,
    OUTPUT: 0,
    NORM: None,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
}


def block_shapes(p: ModelParams) -> dict[str, tuple[int, ...]]:
    """Expected shape of every tensor of one transformer block (Meta's names)."""
    kv_dim = p.kv_heads * p.head_dim
    return {
        "attention.wq.weight": (p.dim, p.dim),
        "attention.wk.weight": (kv_dim, p.dim),
        "attention.wv.weight": (kv_dim, p.dim),
        "attention.wo.weight": (p.dim, p.dim),
        "feed_forward.w1.weight": (p.ffn_hidden, p.dim),
        "feed_forward.w2.weight": (p.dim, p.ffn_hidden),
        "feed_forward.w3.weight": (p.ffn_hidden, p.dim),
        "attention_norm.weight": (p.dim,),
        "ffn_norm.weight": (p.dim,),
    }


def expected_shapes(p: ModelParams) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint with these params must have, and its shape."""
    shapes: dict[str, tuple[int, ...]] = {
        TOK_EMBEDDINGS: (p.vocab_size, p.dim),
        NORM: (p.dim,),
        OUTPUT: (p.vocab_size, p.dim),
    }
    block = block_shapes(p)
    prefixes = [trunk_block(i) for i in range(p.n_trunk + 1)]
    prefixes += [extra_head_block(k) for k in range(1, p.n_future_tokens)]
    for prefix in prefixes:
        for name, shape in block.items():
            shapes[prefix + name] = shape
    return shapes


def _shard_dim(name: str) -> int | None:
    for suffix, dim in _SHARD_DIM.items():
        if name == suffix or name.endswith("." + suffix):
            return dim
    return None


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"{path}: refused to load: the file needs code execution to unpickle, which mtpcode never does "
            f"({first[:160]})"
        ) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a readable PyTorch checkpoint ({first[:200]})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # training checkpoints wrap the weights
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{path}: expected a state dict of tensors")
    return state


@dataclass
class Checkpoint:
    """An opened checkpoint: params, the tokenizer path, and lazily read tensors."""

    directory: Path
    params: ModelParams
    tokenizer_path: Path
    vocab: SpmVocab
    files: list[Path]
    _shards: list[dict[str, torch.Tensor]]

    def names(self) -> list[str]:
        return list(self._shards[0].keys())

    def shape(self, name: str) -> tuple[int, ...]:
        shapes = [tuple(s[name].shape) for s in self._shards]
        dim = _shard_dim(name)
        if len(shapes) == 1 or dim is None:
            return shapes[0]
        merged = list(shapes[0])
        merged[dim] = sum(s[dim] for s in shapes)
        return tuple(merged)

    def dtype(self, name: str) -> torch.dtype:
        return self._shards[0][name].dtype

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor (memory-mapped for a single file; merged on demand for shards)."""
        parts = [s[name] for s in self._shards]
        dim = _shard_dim(name)
        if len(parts) == 1 or dim is None:
            return parts[0]
        return torch.cat(parts, dim=dim)

    def parameter_count(self, prefix: str = "") -> int:
        total = 0
        for name in self.names():
            if name.startswith(prefix):
                n = 1
                for d in self.shape(name):
                    n *= d
                total += n
        return total

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.tensor(name)


def find_tokenizer(ckpt_dir: Path, explicit: Path | None) -> Path:
    """The tokenizer given, else ``tokenizer.model`` beside the checkpoint or in its parent (Meta's layout)."""
    if explicit is not None:
        if not explicit.is_file():
            raise NoInputError(f"tokenizer not found: {explicit}")
        return explicit
    for candidate in (ckpt_dir / TOKENIZER_NAME, ckpt_dir.parent / TOKENIZER_NAME):
        if candidate.is_file():
            return candidate
    raise NoInputError(
        f"no {TOKENIZER_NAME} in {ckpt_dir} or its parent; pass --tokenizer PATH"
    )


def checkpoint_files(ckpt_dir: Path) -> list[Path]:
    """``consolidated.pth``, or the model-parallel shards in order."""
    single = ckpt_dir / CHECKPOINT_NAME
    shards = sorted(
        (p for p in ckpt_dir.glob("consolidated.*.pth") if _SHARD_RE.search(p.name)),
        key=lambda p: int(_SHARD_RE.search(p.name).group(1)),  # type: ignore[union-attr]
    )
    if single.is_file():
        if shards:
            raise DataError(f"{ckpt_dir} has both {CHECKPOINT_NAME} and shards {shards[0].name}…; keep one")
        return [single]
    if shards:
        indices = [int(_SHARD_RE.search(p.name).group(1)) for p in shards]  # type: ignore[union-attr]
        if indices != list(range(len(shards))):
            raise DataError(f"{ckpt_dir}: model-parallel shards are not numbered 00..{len(shards) - 1:02d}")
        return shards
    raise NoInputError(f"no {CHECKPOINT_NAME} (or consolidated.00.pth shards) in {ckpt_dir}")


def open_checkpoint(ckpt_dir: Path, tokenizer: Path | None = None) -> Checkpoint:
    """Open and fully validate a checkpoint directory (names and shapes vs params.json)."""
    if not ckpt_dir.is_dir():
        raise NoInputError(f"checkpoint directory not found: {ckpt_dir}")
    files = checkpoint_files(ckpt_dir)
    tokenizer_path = find_tokenizer(ckpt_dir, tokenizer)
    vocab = read_spm(tokenizer_path)
    params = ModelParams.load(ckpt_dir / PARAMS_NAME, default_vocab_size=len(vocab))
    if params.vocab_size != len(vocab):
        raise DataError(
            f"params.json says vocab_size={params.vocab_size} but {tokenizer_path} has {len(vocab)} pieces: "
            "wrong tokenizer for this checkpoint? (pass the right one with --tokenizer)"
        )
    shards = [_load_state_dict(f) for f in files]
    for s in shards:
        for buffer in SKIPPED_BUFFERS:
            s.pop(buffer, None)
    names = set(shards[0])
    for f, s in zip(files[1:], shards[1:]):
        if set(s) != names:
            raise DataError(f"{f.name} holds different tensors than {files[0].name}: shards do not belong together")
    ckpt = Checkpoint(ckpt_dir, params, tokenizer_path, vocab, files, shards)
    _validate(ckpt)
    return ckpt


def _validate(ckpt: Checkpoint) -> None:
    p = ckpt.params
    expected = expected_shapes(p)
    names = set(ckpt.names())
    head_names = sorted(n for n in names if n.startswith("extra_heads."))
    declared = p.n_extra_heads
    found_heads = {int(n.split(".")[1]) for n in head_names}
    if found_heads != set(range(declared)):
        raise DataError(
            f"params.json declares n_future_tokens={p.n_future_tokens} ({declared} extra heads) but the checkpoint "
            f"has extra_heads {sorted(found_heads) or 'none'}: wrong params.json for this checkpoint?"
        )
    found_layers = {int(n.split(".")[1]) for n in names if n.startswith("layers.")}
    if found_layers != set(range(p.n_trunk + 1)):
        raise DataError(
            f"params.json says n_layers={p.n_layers}, n_future_tokens={p.n_future_tokens}, so layers 0..{p.n_trunk} "
            f"are expected; the checkpoint has layers {min(found_layers, default=0)}..{max(found_layers, default=-1)}"
        )
    missing = sorted(set(expected) - names)
    if missing:
        raise DataError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[0]}")
    extra = sorted(names - set(expected))
    if extra:
        raise DataError(f"checkpoint has {len(extra)} unexpected tensor(s), e.g. {extra[0]}")
    for name, shape in expected.items():
        actual = ckpt.shape(name)
        if actual != shape:
            raise DataError(
                f"tensor {name} has shape {list(actual)} but params.json implies {list(shape)}"
            )
    for name in names:
        if not ckpt.dtype(name).is_floating_point:
            raise DataError(f"tensor {name} has non-float dtype {ckpt.dtype(name)}")
