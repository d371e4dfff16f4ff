"""Transformer building blocks shared by the model families: RMSNorm, RoPE, attention,
gated feed-forward.

Shape legend: B batch, T time (query positions), S key positions, D model dim, H query heads,
K key/value heads, Dh head dim, F feed-forward inner dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Root-mean-square layer norm without mean subtraction (Zhang & Sennrich 2019).

    Computes in fp32 and casts back to the input dtype before the weight multiply, exactly as
    `transformers.models.llama.modeling_llama.LlamaRMSNorm` (and T5's `T5LayerNorm`).
    Input and output: (..., D), any float dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(
    head_dim: int, max_positions: int, theta: float, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """RoPE tables (Su et al. 2021, "RoFormer", Eq. 34) in Hugging Face Llama's layout.

    inv_freq = 1 / theta^(arange(0, Dh, 2) / Dh); angles = position x inv_freq;
    cos/sin = cos/sin(cat(angles, angles)), as `LlamaRotaryEmbedding` (rope_type "default").

    Returns:
        (cos, sin), each (max_positions, head_dim) float32, in radians' cosine/sine.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)  # (Dh/2,)
    positions = torch.arange(max_positions, dtype=torch.int64, device=device).float()
    angles = torch.outer(positions, inv_freq)  # (T, Dh/2)
    emb = torch.cat((angles, angles), dim=-1)  # (T, Dh)
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim split in halves (HF Llama's convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate queries or keys x: (B, heads, T, Dh) by cos/sin: (T, Dh); returns x's shape/dtype."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Keys and values of one attention layer, grown by each call; for inference only.

    `k`, `v`: (B, K, S, Dh) after the first update, None before.
    """

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    @property
    def length(self) -> int:
        """Number of cached positions S."""
        return 0 if self.k is None else self.k.shape[2]

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v: (B, K, T, Dh) and return all keys and values: (B, K, S + T, Dh)."""
        if self.k is None or self.v is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat((self.k, k), dim=2)
            self.v = torch.cat((self.v, v), dim=2)
        return self.k, self.v


class Attention(nn.Module):
    """Causal grouped-query self-attention (Ainslie et al. 2023) with RoPE, no biases.

    Scores are scaled by 1/sqrt(Dh) inside `F.scaled_dot_product_attention` (flash or
    memory-efficient kernels on GPU). Names match HF `LlamaAttention`.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        assert hidden_size % num_heads == 0 and num_heads % num_kv_heads == 0
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, kv_cache: KVCache | None = None
    ) -> Tensor:
        """x: (B, T, D); cos, sin: (T, Dh) for x's positions; returns (B, T, D) in x's dtype.

        With `kv_cache`, x holds the positions after the cached ones and attends to all of them.
        """
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B,H,T,Dh)
        k = (
            self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        )  # (B,K,T,Dh)
        v = (
            self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        )  # (B,K,T,Dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            k, v = kv_cache.update(k, v)  # (B, K, S, Dh), S = past + T
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            # SDPA's is_causal aligns the mask top-left; with cached keys query i sits at
            # position past + i, so it may see keys up to past + i.
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, H*Dh)
        return self.o_proj(y)


_ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # HF "gelu_new", T5's gated-gelu
}


class GatedMLP(nn.Module):
    """Gated feed-forward down(act(gate(x)) * up(x)) (Shazeer 2020, "GLU Variants Improve
    Transformer": SwiGLU Eq. 6 with ``silu``, GEGLU Eq. 5 with ``gelu_tanh``).

    x: (B, T, D) -> (B, T, D); no biases. Names match HF `LlamaMLP`; T5's `wi_0`, `wi_1`, `wo`
    are `gate_proj`, `up_proj`, `down_proj` (the key map in `model.llama.hf` renames them).
    ``dropout`` applies to the gated product, as in T5's `T5DenseGatedActDense`.

    Raises:
        ValueError: unknown activation.
    """

    def __init__(
        self, hidden_size: int, intermediate_size: int, activation: str = "silu", dropout=0.0
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation={activation!r}; use one of {sorted(_ACTIVATIONS)}")
        self.act = _ACTIVATIONS[activation]
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.gate_proj(x)) * self.up_proj(x)  # (B, T, F)
        return self.down_proj(self.dropout(h))  # (B, T, D)
