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


def allowed_keys(
    query_length: int,
    key_length: int,
    *,
    causal: bool,
    query_documents: Tensor | None = None,
    key_documents: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor | None:
    """Which keys each query may attend: the one mask builder of both families (Llama's causal
    and document masks, T5's causal, document and cross-attention masks).

    Queries are the last ``query_length`` of ``key_length`` positions (keys before them are
    cached). ``causal``: a query sees keys at its position and before. With document ids (a
    packed row's per-token document, ``trainer.objectives.document_ids``), a query sees only
    keys of its own document; ``key_documents`` defaults to ``query_documents`` (self-attention).
    Built once per forward and shared by every layer: O(B T S) booleans against the
    O(B H T S Dh) of the attention itself.

    An SDPA boolean mask rather than ``flex_attention`` block masks: SDPA trains eagerly and
    compiled on CPU and GPU in torch 2.13 and takes T5's additive bias through the same
    argument (`additive_mask`), while ``flex_attention`` has no backward on a CPU in torch 2.13
    (``NotImplementedError``) and its compiled CPU forward took ~18x SDPA's at the debug
    preset's shape (``bench/document_mask.py --attention``). On a GPU a mask rules out SDPA's
    flash kernel (the memory-efficient one takes it), where block masks would skip the masked
    blocks: a GPU-only path is left for when one can be measured.

    Args:
        query_length: T, the queries.
        key_length: S >= T, the keys (cached ones first).
        causal: mask the keys after each query.
        query_documents: (B, T) int64 document id of each query, or None.
        key_documents: (B, S) int64 document id of each key (None: ``query_documents``).
        device: where to build the mask (default: the document ids').

    Returns:
        (B|1, 1, T, S) bool, True where the query may attend the key; None when nothing is
        masked (not causal, no documents): call SDPA without a mask.
    """
    if key_documents is None:
        key_documents = query_documents
    if query_documents is not None:
        device = query_documents.device
    mask = None
    if causal:
        past = key_length - query_length
        mask = torch.ones(query_length, key_length, dtype=torch.bool, device=device).tril(past)
        mask = mask[None, None]  # (1, 1, T, S)
    if query_documents is not None:
        same = query_documents[:, None, :, None] == key_documents[:, None, None, :]  # (B,1,T,S)
        mask = same if mask is None else mask & same
    return mask


def additive_mask(bias: Tensor, mask: Tensor | None) -> Tensor:
    """An additive attention bias with the keys ``mask`` rules out set to the dtype's most
    negative value (Hugging Face's convention: a query with no allowed key then attends all
    keys evenly rather than producing nan). bias and mask broadcast together (-> their
    broadcast shape, bias's dtype); mask None: bias unchanged."""
    if mask is None:
        return bias
    return bias.masked_fill(~mask, torch.finfo(bias.dtype).min)


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
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        kv_cache: KVCache | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """x: (B, T, D); cos, sin: (T, Dh), or (B, 1, T, Dh) with per-sequence positions, for
        x's positions; returns (B, T, D) in x's dtype.

        With `kv_cache`, x holds the positions after the cached ones and attends to all of them.
        ``mask``: (B|1, 1, T, T) bool from `allowed_keys` (True: attend), replacing the causal
        mask (training only, no cache); None: causal (SDPA's ``is_causal``, no mask tensor).
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
            assert mask is None, "a document mask is for training, without a key/value cache"
            past = kv_cache.length
            k, v = kv_cache.update(k, v)  # (B, K, S, Dh), S = past + T
        if mask is None and past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            # SDPA's is_causal aligns the mask top-left; with cached keys query i sits at
            # position past + i, so it may see keys up to past + i.
            if mask is None:
                mask = allowed_keys(T, past + T, causal=True, device=x.device)
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


IGNORE_INDEX = -100  # a label that counts for no loss (PyTorch's cross_entropy default)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``h @ weight.T`` over the labelled tokens, never holding more than
    one chunk of logits: the forward keeps only each token's log-sum-exp; the backward recomputes
    each chunk's logits from ``h`` and ``weight`` (the technique of Liger-Kernel's fused linear
    cross-entropy and of Wijmans et al. 2024, "Cut your losses", with the gradients computed in
    backward rather than forward, so a no-grad forward costs one projection)."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int) -> Tensor:
        N = h.shape[0]
        lse = torch.empty(N, dtype=torch.float32, device=h.device)  # (N,) log-sum-exp
        target = torch.zeros(N, dtype=torch.float32, device=h.device)  # (N,) logit of the label
        valid = labels != IGNORE_INDEX  # (N,)
        for s in range(0, N, chunk_tokens):
            e = min(s + chunk_tokens, N)
            logits = F.linear(h[s:e], weight).float()  # (n, V): the plain head's, then fp32
            y = labels[s:e].clamp(min=0)
            target[s:e] = logits.gather(1, y[:, None]).squeeze(1)
            # log-sum-exp in place (torch.logsumexp would hold a second (n, V) buffer)
            top = logits.amax(dim=-1)  # (n,)
            lse[s:e] = logits.sub_(top[:, None]).exp_().sum(dim=-1).log_().add_(top)
            del logits  # before the next chunk's: one (n, V) buffer at a time
        count = valid.sum()
        loss = torch.where(valid, lse - target, 0.0).sum() / count  # nan without labels, as F
        ctx.save_for_backward(h, weight, labels, lse, count)
        ctx.chunk_tokens = chunk_tokens
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        h, weight, labels, lse, count = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        chunk, N = ctx.chunk_tokens, h.shape[0]
        grad_h = torch.empty_like(h) if need_h else None
        # accumulated over the chunks in place, in the weight's dtype (each chunk's product is
        # summed in fp32 inside the matmul and rounded once as it is added): no (V, D) buffer
        # beside the gradient itself, where an fp32 accumulator of a 16-bit weight would cost
        # twice the gradient plus a (V, D) product per chunk (Liger-Kernel's default likewise)
        grad_w = torch.zeros_like(weight) if need_w else None
        scale = grad_loss.float() / count
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            h_c, y = h[s:e], labels[s:e]
            valid = y != IGNORE_INDEX
            # d(lse - logit_y)/d logits = softmax - onehot(y), for each labelled token
            g = F.linear(h_c, weight).float().sub_(lse[s:e, None]).exp_()  # (n, V) softmax
            rows = torch.arange(e - s, device=h.device)
            g[rows, y.clamp(min=0)] -= 1.0
            g = g.to(h.dtype)
            # each row's factor (d loss / d its term; 0 when unlabelled), applied to the (n, D)
            # side of each product rather than to the (n, V) one
            row_scale = torch.where(valid, scale, 0.0)[:, None]  # (n, 1) fp32
            if need_h:
                grad_h[s:e] = ((g @ weight) * row_scale).to(h.dtype)  # (n, D)
            if need_w:
                h_scaled = (h_c * row_scale).to(h.dtype)  # (n, D)
                grad_w.addmm_(g.t(), h_scaled)  # (V, D) += (V, n) @ (n, D), in place
            del g  # before the next chunk's: one (n, V) buffer at a time
        return grad_h, grad_w, None, None


def linear_cross_entropy(
    h: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int | None = None
) -> Tensor:
    """Mean cross-entropy of the logits ``h @ weight.T`` over the labelled tokens, as
    ``F.cross_entropy(F.linear(h, weight).float(), labels, ignore_index=-100)`` (the plain head
    then `trainer.objectives.token_loss`), computed ``chunk_tokens`` tokens at a time so that the
    full (tokens x V) logits never exist, in forward or backward.

    Logits are the projection in the inputs' dtype, softmax and loss in fp32, as the plain path;
    the weight's gradient accumulates over the chunks in place in the weight's dtype (in 16 bits
    one rounding per chunk where the plain path has one in all). With no labelled token the loss
    is nan, as ``F.cross_entropy``'s mean.

    Args:
        h: (..., D) final hidden states (after the final norm), any float dtype.
        weight: (V, D) the output head's weight, same dtype as ``h``.
        labels: (...) int64 aligned with ``h``; ``-100`` (``IGNORE_INDEX``) marks positions that
            do not count.
        chunk_tokens: tokens per chunk; None or <= 0: all at once (still without storing the
            logits for backward).

    Returns:
        () fp32 loss, in nats per labelled token.

    Raises:
        ValueError: ``labels`` does not match ``h``'s leading shape.
    """
    if labels.shape != h.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(h.shape)}")
    h, labels = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
    chunk = chunk_tokens if chunk_tokens and chunk_tokens > 0 else max(h.shape[0], 1)
    return _LinearCrossEntropy.apply(h, weight, labels, chunk)


class LMHead(nn.Linear):
    """The output head D -> V without bias (an ``nn.Linear``, keys as HF's ``lm_head``) that can
    also return the loss without materialising the logits.

    The loss runs inside this module's call so that ZeRO-3's parameter-fetch hooks gather the
    weight (tied or not) for it, in forward and in backward.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(
        self, h: Tensor, labels: Tensor | None = None, chunk_tokens: int | None = None
    ) -> Tensor:
        """h: (B, T, D) -> logits (B, T, V) in h's dtype; with ``labels`` (B, T) int64 the mean
        cross-entropy () fp32 of :func:`linear_cross_entropy`, ``chunk_tokens`` at a time."""
        if labels is None:
            return super().forward(h)
        return linear_cross_entropy(h, self.weight, labels, chunk_tokens)
