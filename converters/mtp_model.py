"""A trainable PyTorch model of Meta's multi-token-prediction transformer.

Module and parameter names are exactly those of Meta's checkpoints, so
``model.state_dict()`` *is* a ``consolidated.pth``:

    tok_embeddings.weight
    layers.{i}.attention.{wq,wk,wv,wo}.weight      i = 0 .. n_trunk   (layers[n_trunk] is head 0)
    layers.{i}.feed_forward.{w1,w2,w3}.weight
    layers.{i}.{attention_norm,ffn_norm}.weight
    extra_heads.{k}.<same block names>             k = 0 .. n_future_tokens - 2
    norm.weight, output.weight                      shared by every head

The forward is Llama 2's (RMSNorm, RoPE on *adjacent* pairs, SwiGLU), with no
dropout and no KV cache: this module is for training and for checking a
trained model, not for serving it (that is llama.cpp's job).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from converters.params import ModelParams


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def rope_tables(head_dim: int, n_pos: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (n_pos, head_dim/2) of Meta's ``precompute_freqs_cis``."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(n_pos, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of the last dim; x is (B, T, H, D)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, p: ModelParams):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = p.n_heads, p.kv_heads, p.head_dim
        self.wq = nn.Linear(p.dim, p.n_heads * p.head_dim, bias=False)
        self.wk = nn.Linear(p.dim, p.kv_heads * p.head_dim, bias=False)
        self.wv = nn.Linear(p.dim, p.kv_heads * p.head_dim, bias=False)
        self.wo = nn.Linear(p.n_heads * p.head_dim, p.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = apply_rope(self.wq(x).view(b, t, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(b, t, self.n_kv, self.head_dim), cos, sin)
        v = self.wv(x).view(b, t, self.n_kv, self.head_dim)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=True, enable_gqa=self.n_kv != self.n_heads,
        )
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, p: ModelParams):
        super().__init__()
        self.w1 = nn.Linear(p.dim, p.ffn_hidden, bias=False)
        self.w2 = nn.Linear(p.ffn_hidden, p.dim, bias=False)
        self.w3 = nn.Linear(p.dim, p.ffn_hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, p: ModelParams):
        super().__init__()
        self.attention = Attention(p)
        self.feed_forward = FeedForward(p)
        self.attention_norm = RMSNorm(p.dim, p.norm_eps)
        self.ffn_norm = RMSNorm(p.dim, p.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class MTPTransformer(nn.Module):
    """Trunk + ``n_future_tokens`` one-block heads + shared norm/unembedding."""

    def __init__(self, params: ModelParams):
        super().__init__()
        self.params = params
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(params) for _ in range(params.n_trunk + 1))
        self.extra_heads = nn.ModuleList(
            TransformerBlock(params) for _ in range(params.n_future_tokens - 1)
        )
        self.norm = RMSNorm(params.dim, params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)

    @property
    def heads(self) -> list[TransformerBlock]:
        """Prediction heads in order: head k predicts the token k+1 places ahead."""
        return [self.layers[-1], *self.extra_heads]

    def init_weights(self, seed: int) -> None:
        """GPT-2/Llama-style init: N(0, 0.02), residual projections scaled by depth."""
        gen = torch.Generator().manual_seed(seed)
        depth_scale = 1.0 / math.sqrt(2 * (self.params.n_trunk + 1))
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
                continue
            std = 0.02 * (depth_scale if name.endswith(("wo.weight", "w2.weight")) else 1.0)
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=gen) * std)

    def _rope(self, t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rope_tables(self.params.head_dim, t, self.params.rope_theta)
        return cos.to(device), sin.to(device)

    def trunk(self, tokens: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """h_trunk (B, T, dim) for tokens (B, T) at positions 0..T-1, and the RoPE tables."""
        rope = self._rope(tokens.shape[1], tokens.device)
        h = self.tok_embeddings(tokens)
        for layer in self.layers[:-1]:
            h = layer(h, *rope)
        return h, rope

    def head_logits(self, k: int, h_trunk: torch.Tensor, rope) -> torch.Tensor:
        """Logits (B, T, vocab) of head k (0 = next token) on h_trunk."""
        return self.output(self.norm(self.heads[k](h_trunk, *rope)))

    def forward(self, tokens: torch.Tensor, n_heads: int | None = None) -> torch.Tensor:
        """Logits (B, T, n_heads, vocab), like Meta's ``return_all_heads`` forward."""
        h, rope = self.trunk(tokens)
        n = self.params.n_future_tokens if n_heads is None else n_heads
        return torch.stack([self.head_logits(k, h, rope) for k in range(n)], dim=-2).float()


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
    h, rope = model.trunk(tokens[:, :t])
    h_leaf = h.detach().requires_grad_(True)
    losses = []
    for k in range(n):
        logits = model.head_logits(k, h_leaf, rope)
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
        h, rope = model.trunk(tokens[:, :t])
        for k in range(n):
            logits = model.head_logits(k, h, rope).float()
            target = tokens[:, 1 + k : 1 + k + t]
            loss_sum[k] += F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
            hit_sum[k] += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    return [s / count for s in loss_sum], [s / count for s in hit_sum]


@torch.no_grad()
def greedy(model: MTPTransformer, prompt: list[int], n_new: int, stop: set[int] = frozenset()) -> list[int]:
    """Plain greedy continuation with the next-token head (full recompute; for small checks)."""
    ids = list(prompt)
    for _ in range(n_new):
        h, rope = model.trunk(torch.tensor([ids]))
        nxt = int(model.head_logits(0, h[:, -1:], (rope[0][-1:], rope[1][-1:]))[0, -1].argmax())
        ids.append(nxt)
        if nxt in stop:
            break
    return ids[len(prompt):]


@torch.no_grad()
def speculative_tokens_per_forward(model: MTPTransformer, prompt: list[int], generated: list[int],
                                   n_heads: int | None = None) -> tuple[int, int]:
    """(tokens, main forwards) of greedy self-speculative decoding that yields ``generated``.

    ``generated`` must be the plain greedy continuation of ``prompt``. Because
    the model is causal, one teacher-forced pass over prompt + generated gives
    every head's draft at every position; the walk then accepts, after the
    main model's own token, each draft d_k while it equals the greedy token.
    """
    n = model.params.n_future_tokens if n_heads is None else n_heads
    seq = torch.tensor([list(prompt) + list(generated)])
    h, rope = model.trunk(seq)
    drafts = [model.head_logits(k, h, rope)[0].argmax(-1).tolist() for k in range(1, n)]
    full = list(prompt) + list(generated)
    pos = len(prompt) - 1  # last position whose token is known
    end = len(full) - 1
    forwards = 0
    while pos < end:
        forwards += 1
        accepted = 1  # the main model's own next token
        for k in range(1, n):
            idx = pos + 1 + k
            if idx > end or drafts[k - 1][pos] != full[idx]:
                break
            accepted += 1
        pos += accepted
    return len(generated), forwards
