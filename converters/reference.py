"""PyTorch reference of Meta's multi-token-prediction transformer.

Module and parameter names follow Meta's state dict exactly
(``layers.{i}.attention.wq.weight``, ``extra_heads.{k}.…``), so a checkpoint
loads with ``load_state_dict`` and a trained model saves in Meta's format.
RoPE rotates adjacent pairs (Meta's complex view), which is llama.cpp's
``llama`` architecture without any weight permutation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from converters.params import ModelParams


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(head_dim: int, seq_len: int, theta: float,
                device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[seq_len, head_dim/2]`` of Meta's ``precompute_freqs_cis`` (real form, so bf16 works)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)
    return angles.cos().to(device), angles.sin().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; rotates adjacent pairs (d0, d1), (d2, d3), … as Meta's complex product does."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).type_as(x)


Rope = tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    def __init__(self, p: ModelParams) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = p.n_heads, p.kv_heads, p.head_dim
        self.wq = nn.Linear(p.dim, p.n_heads * p.head_dim, bias=False)
        self.wk = nn.Linear(p.dim, p.kv_heads * p.head_dim, bias=False)
        self.wv = nn.Linear(p.dim, p.kv_heads * p.head_dim, bias=False)
        self.wo = nn.Linear(p.n_heads * p.head_dim, p.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        b, t, _ = x.shape
        q = apply_rope(self.wq(x).view(b, t, self.n_heads, self.head_dim), *rope)
        k = apply_rope(self.wk(x).view(b, t, self.n_kv, self.head_dim), *rope)
        v = self.wv(x).view(b, t, self.n_kv, self.head_dim)
        # Grouped-query attention: kv head j serves query heads j*n_rep … (j+1)*n_rep-1,
        # as llama.cpp groups them. Scale 1/sqrt(head_dim).
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=True, enable_gqa=self.n_kv != self.n_heads,
        )
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, p: ModelParams) -> None:
        super().__init__()
        self.w1 = nn.Linear(p.dim, p.ffn_hidden, bias=False)
        self.w2 = nn.Linear(p.ffn_hidden, p.dim, bias=False)
        self.w3 = nn.Linear(p.dim, p.ffn_hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, p: ModelParams) -> None:
        super().__init__()
        self.attention = Attention(p)
        self.feed_forward = FeedForward(p)
        self.attention_norm = RMSNorm(p.dim, p.norm_eps)
        self.ffn_norm = RMSNorm(p.dim, p.norm_eps)

    def forward(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope)
        return h + self.feed_forward(self.ffn_norm(h))


class MTPTransformer(nn.Module):
    """Trunk of ``n_trunk`` blocks, head 0 = ``layers[n_trunk]``, heads 1.. = ``extra_heads``."""

    def __init__(self, p: ModelParams) -> None:
        super().__init__()
        self.params = p
        self.tok_embeddings = nn.Embedding(p.vocab_size, p.dim)
        self.layers = nn.ModuleList(TransformerBlock(p) for _ in range(p.n_trunk + 1))
        self.extra_heads = nn.ModuleList(TransformerBlock(p) for _ in range(p.n_extra_heads))
        self.norm = RMSNorm(p.dim, p.norm_eps)
        self.output = nn.Linear(p.dim, p.vocab_size, bias=False)

    @property
    def heads(self) -> list[TransformerBlock]:
        """Prediction heads in order: head k predicts the token k+1 places ahead."""
        return [self.layers[self.params.n_trunk], *self.extra_heads]

    def init_weights(self, seed: int) -> None:
        """Training init (GPT-2/Llama style): N(0, 0.02), residual projections scaled by depth, norms 1."""
        gen = torch.Generator().manual_seed(seed)
        depth_scale = 1.0 / math.sqrt(2 * (self.params.n_trunk + 1))
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                    continue
                std = 0.02 * (depth_scale if name.endswith(("wo.weight", "w2.weight")) else 1.0)
                param.copy_(torch.randn(param.shape, generator=gen) * std)

    def rope(self, seq_len: int, device: torch.device | None = None) -> Rope:
        return rope_tables(self.params.head_dim, seq_len, self.params.rope_theta, device)

    def trunk(self, tokens: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        """Residual stream after the last trunk block: [B, T, dim]."""
        if rope is None:
            rope = self.rope(tokens.shape[1], tokens.device)
        h = self.tok_embeddings(tokens)
        for block in self.layers[: self.params.n_trunk]:
            h = block(h, rope)
        return h

    def head_logits(self, h_trunk: torch.Tensor, k: int, rope: Rope | None = None) -> torch.Tensor:
        """Logits of head k (0 = next token) from trunk states: [B, T, vocab]."""
        if rope is None:
            rope = self.rope(h_trunk.shape[1], h_trunk.device)
        return self.output(self.norm(self.heads[k](h_trunk, rope)))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """All heads' logits: [n_future_tokens, B, T, vocab]; head k at t predicts token t+1+k."""
        h = self.trunk(tokens)
        return torch.stack([self.head_logits(h, k) for k in range(self.params.n_future_tokens)])

    @classmethod
    def from_state_dict(cls, p: ModelParams, state: dict[str, torch.Tensor]) -> MTPTransformer:
        """Build in float32 from a Meta state dict (missing or extra tensors are an error)."""
        model = cls(p)
        model.load_state_dict({k: v.float() for k, v in state.items() if k != "rope.freqs"}, strict=True)
        return model.eval()


@torch.no_grad()
def greedy_decode(model: MTPTransformer, prompt: list[int], n_tokens: int, eos_id: int | None = None) -> list[int]:
    """Plain next-token greedy decoding with head 0 (recomputes the whole sequence: for tests only)."""
    tokens = list(prompt)
    out: list[int] = []
    for _ in range(n_tokens):
        h = model.trunk(torch.tensor([tokens]))
        nxt = int(model.head_logits(h, 0)[0, -1].argmax())
        out.append(nxt)
        tokens.append(nxt)
        if eos_id is not None and nxt == eos_id:
            break
    return out
