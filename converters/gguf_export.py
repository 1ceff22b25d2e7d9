"""Writing the bundle's GGUF files (llama architecture) from a checkpoint.

``main.gguf`` = token embeddings, trunk blocks + head 0, final norm, output.
``head-k.gguf`` = one block (``extra_heads[k-1]``), the shared final norm, and
the shared output matrix as ``token_embd`` (tied: llama.cpp uses it as the
unembedding; the head is fed trunk states as embeddings, never tokens).

Tensors are written one at a time (tensor infos first, then data), so memory
holds one converted tensor at a time, never the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from converters.checkpoint import Checkpoint
from converters.params import ModelParams
from converters.spm import SpmVocab
from converters.tensor_map import (
    BLOCK_TENSORS,
    GGUF_OUTPUT,
    GGUF_OUTPUT_NORM,
    GGUF_TOKEN_EMBD,
    NORM,
    OUTPUT,
    TOK_EMBEDDINGS,
    extra_head_block,
    gguf_block,
    is_norm,
    trunk_block,
)
from mtpcode import bundle as B

# Float storage types the GGUF writer produces directly; everything else is
# made from one of these by llama.cpp's quantizer.
FLOAT_TYPES = {
    "F32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "F16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "BF16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}

Progress = Callable[[int], None]  # called with the number of bytes just written


@dataclass(frozen=True)
class TensorPlan:
    """One tensor to write: its GGUF name and where it comes from in the checkpoint."""

    gguf_name: str
    meta_name: str


def main_plan(p: ModelParams) -> list[TensorPlan]:
    plan = [TensorPlan(GGUF_TOKEN_EMBD, TOK_EMBEDDINGS)]
    for i in range(p.n_trunk + 1):
        plan += [TensorPlan(gguf_block(i) + g, trunk_block(i) + m) for m, g in BLOCK_TENSORS.items()]
    plan += [TensorPlan(GGUF_OUTPUT_NORM, NORM), TensorPlan(GGUF_OUTPUT, OUTPUT)]
    return plan


def head_plan(k: int) -> list[TensorPlan]:
    """Extra head k (1-based) as a one-block model with the output matrix tied as token_embd."""
    plan = [TensorPlan(GGUF_TOKEN_EMBD, OUTPUT)]
    plan += [TensorPlan(gguf_block(0) + g, extra_head_block(k) + m) for m, g in BLOCK_TENSORS.items()]
    plan += [TensorPlan(GGUF_OUTPUT_NORM, NORM)]
    return plan


def _to_numpy(t: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.F32:
        return t.to(torch.float32).contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.F16:
        return t.to(torch.float16).contiguous().numpy()
    return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)


def _numpy_dtype(qtype: gguf.GGMLQuantizationType) -> type:
    return {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(qtype, np.uint16)


def _add_metadata(w: gguf.GGUFWriter, p: ModelParams, vocab: SpmVocab, *, name: str, n_blocks: int,
                  file_type: int, role: str, head_index: int, fingerprint: str) -> None:
    w.add_name(name)
    w.add_file_type(int(file_type))
    B.add_model_metadata(w, p, n_blocks=n_blocks, role=role, head_index=head_index, fingerprint=fingerprint)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab.pieces)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    w.add_unk_token_id(vocab.unk_id)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    if vocab.pad_id >= 0:
        w.add_pad_token_id(vocab.pad_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(vocab.add_dummy_prefix)
    w.add_remove_extra_whitespaces(vocab.remove_extra_whitespaces)


def write_gguf(path: Path, ckpt: Checkpoint, vocab: SpmVocab, plan: list[TensorPlan], *, float_type: str,
               name: str, role: str, head_index: int, fingerprint: str, progress: Progress | None = None) -> None:
    """Write one GGUF file holding the tensors of ``plan`` in ``float_type`` (norms stay F32)."""
    qtype, file_type = FLOAT_TYPES[float_type]
    n_blocks = len({t.gguf_name.split(".")[1] for t in plan if t.gguf_name.startswith("blk.")})
    w = gguf.GGUFWriter(path, arch="llama")
    _add_metadata(w, ckpt.params, vocab, name=name, n_blocks=n_blocks, file_type=file_type,
                  role=role, head_index=head_index, fingerprint=fingerprint)
    types = []
    for t in plan:
        ttype = gguf.GGMLQuantizationType.F32 if is_norm(t.meta_name) else qtype
        shape = ckpt.shape(t.meta_name)
        dtype = np.dtype(_numpy_dtype(ttype))
        nbytes = dtype.itemsize * int(np.prod(shape))
        w.add_tensor_info(t.gguf_name, shape, dtype, nbytes, raw_dtype=ttype)
        types.append(ttype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t, ttype in zip(plan, types):
        data = _to_numpy(ckpt.tensor(t.meta_name), ttype)
        w.write_tensor_data(data)
        if progress is not None:
            progress(data.nbytes)
        del data
    w.close()


def plan_bytes(ckpt: Checkpoint, plan: list[TensorPlan], float_type: str) -> int:
    """Bytes of tensor data ``write_gguf`` will write (for progress bars)."""
    itemsize = 4 if float_type == "F32" else 2
    total = 0
    for t in plan:
        n = int(np.prod(ckpt.shape(t.meta_name)))
        total += n * (4 if is_norm(t.meta_name) else itemsize)
    return total
