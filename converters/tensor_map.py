"""Meta (Llama-format) tensor names -> GGUF (llama architecture) tensor names, in one table."""

from __future__ import annotations

# Per transformer block: Meta's name inside a block -> GGUF's name inside ``blk.{i}``.
BLOCK_TENSORS: dict[str, str] = {
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}

TOK_EMBEDDINGS = "tok_embeddings.weight"
NORM = "norm.weight"
OUTPUT = "output.weight"

GGUF_TOKEN_EMBD = "token_embd.weight"
GGUF_OUTPUT_NORM = "output_norm.weight"
GGUF_OUTPUT = "output.weight"

# Buffers that original Llama checkpoints carry but that are not weights.
SKIPPED_BUFFERS = ("rope.freqs",)


def trunk_block(i: int) -> str:
    """Meta prefix of block i of ``layers`` (trunk blocks and head 0)."""
    return f"layers.{i}."


def extra_head_block(k: int) -> str:
    """Meta prefix of extra head k (1-based, as in head-k.gguf): ``extra_heads.{k-1}``."""
    return f"extra_heads.{k - 1}."


def gguf_block(i: int) -> str:
    return f"blk.{i}."


def is_norm(meta_name: str) -> bool:
    """1-D norm weights, which GGUF stores in F32 whatever the model's type."""
    return meta_name.endswith("norm.weight")
