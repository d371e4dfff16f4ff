"""The T5 v1.1 encoder-decoder (Raffel et al. 2020, "Exploring the Limits of Transfer Learning
with a Unified Text-to-Text Transformer", Sec. 2.1; v1.1 changes in google-research/
text-to-text-transfer-transformer `released_checkpoints.md`).

Pre-norm blocks with RMSNorm (no mean subtraction, no bias), relative position buckets computed
once per stack and added to the attention scores of every layer of it (bidirectional in the
encoder, causal in the decoder; none in cross-attention), gated-GELU feed-forward, no biases
anywhere, no 1/sqrt(d) score scaling (T5 folds it into the query initialisation), an untied
output head, decoder inputs = targets shifted right behind the pad id.

Shape legend: B batch, S encoder positions, T decoder positions, D d_model, H heads,
Dk d_kv, V vocab.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.family import Piece
from model.init import Fill, InitRule, Normal, fill_parameters, seed_source
from model.layers import (
    GatedMLP,
    KVCache,
    LMHead,
    RMSNorm,
    additive_mask,
    allowed_keys,
    linear_cross_entropy,
)
from model.t5.config import T5Config


def relative_position_bucket(
    relative_position: Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> Tensor:
    """Bucket of each relative position ``key - query`` (int64 tensor, any shape).

    Half of the buckets (per direction when bidirectional) hold the exact offsets 0..n/2-1; the
    other half are logarithmically wider bins up to ``max_distance``, beyond which all offsets
    share the last bucket. Causal (``bidirectional=False``): positive offsets (the future) fall
    in bucket 0. Source: Mesh TensorFlow `transformer_layers._relative_position_bucket`, as used
    by T5 (Raffel et al. 2020, Sec. 2.1), and HF `T5Attention._relative_position_bucket`.

    Returns:
        int64 tensor of ``relative_position``'s shape with values in ``[0, num_buckets)``.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # log-spaced bins; the clamp keeps log(0) out of the unused branch of the where
    log_ratio = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(
        max_distance / max_exact
    )
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """Learned scalar per (bucket, head), added to the attention scores of every layer of a
    stack. ``weight``: (num_buckets, H)."""

    def __init__(self, cfg: T5Config, *, bidirectional: bool) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        self.embedding = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def forward(self, query_length: int, key_length: int, offset: int = 0) -> Tensor:
        """Bias for queries at positions ``offset .. offset + query_length - 1`` over keys at
        ``0 .. key_length - 1``: (1, H, query_length, key_length) in the weight's dtype."""
        device = self.embedding.weight.device
        query = torch.arange(offset, offset + query_length, device=device)[:, None]
        key = torch.arange(key_length, device=device)[None, :]
        bucket = relative_position_bucket(
            key - query,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )  # (Tq, Tk)
        return self.embedding(bucket).permute(2, 0, 1).unsqueeze(0)  # (1, H, Tq, Tk)


class T5Attention(nn.Module):
    """Multi-head attention without score scaling, with an additive float bias (relative
    positions and masks), through `F.scaled_dot_product_attention(scale=1.0)`.

    A float ``attn_mask`` rules out the flash kernel; SDPA uses the memory-efficient kernel on
    GPU (which takes an additive bias) and the math kernel on CPU.
    """

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.dropout = cfg.dropout_rate
        self.q_proj = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.o_proj = nn.Linear(cfg.inner_dim, cfg.d_model, bias=False)

    def _heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.d_kv).transpose(1, 2)  # (B, H, T, Dk)

    def forward(
        self,
        x: Tensor,
        bias: Tensor,
        *,
        memory: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """x: (B, T, D) queries' input; bias: float, broadcastable to (B, H, T, S), added to the
        scores (a large negative value masks); ``memory``: (B, S, D) encoder output for
        cross-attention (None: self-attention over x). Returns (B, T, D) in x's dtype.

        ``cache`` (inference): self-attention appends this call's keys and values; cross-
        attention computes them from ``memory`` on the first call and reuses them after.
        """
        B, T, _ = x.shape
        q = self._heads(self.q_proj(x))
        if memory is None:
            k, v = self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
            if cache is not None:
                k, v = cache.update(k, v)
        elif cache is not None and cache.k is not None:
            k, v = cache.k, cache.v
        else:
            k, v = self._heads(self.k_proj(memory)), self._heads(self.v_proj(memory))
            if cache is not None:
                cache.update(k, v)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=bias.to(q.dtype),
            dropout_p=self.dropout if self.training else 0.0,
            scale=1.0,
        )  # (B, H, T, Dk)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.d_kv))


class T5Block(nn.Module):
    """x + attn(norm(x)) [+ cross(norm(x), memory)] + mlp(norm(x)), dropout on each branch."""

    def __init__(self, cfg: T5Config, *, is_decoder: bool) -> None:
        super().__init__()
        eps = cfg.layer_norm_epsilon
        self.self_attn_norm = RMSNorm(cfg.d_model, eps)
        self.self_attn = T5Attention(cfg)
        if is_decoder:
            self.cross_attn_norm = RMSNorm(cfg.d_model, eps)
            self.cross_attn = T5Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, eps)
        self.mlp = GatedMLP(cfg.d_model, cfg.d_ff, "gelu_tanh", cfg.dropout_rate)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(
        self,
        x: Tensor,
        bias: Tensor,
        memory: Tensor | None = None,
        memory_bias: Tensor | None = None,
        cache: tuple[KVCache, KVCache] | None = None,
    ) -> Tensor:
        """x: (B, T, D); bias: self-attention bias (B|1, H, T, T'); memory: (B, S, D) and
        memory_bias: (B, 1, 1, S) in decoder blocks. Returns (B, T, D)."""
        self_cache, cross_cache = cache if cache is not None else (None, None)
        x = x + self.dropout(self.self_attn(self.self_attn_norm(x), bias, cache=self_cache))
        if memory is not None:
            h = self.cross_attn(
                self.cross_attn_norm(x), memory_bias, memory=memory, cache=cross_cache
            )
            x = x + self.dropout(h)
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class T5Stack(nn.Module):
    """The encoder (bidirectional) or decoder (causal, cross-attending) stack of T5 blocks with
    the relative position bias of the stack and the final norm; the embedding is the model's."""

    def __init__(self, cfg: T5Config, *, is_decoder: bool) -> None:
        super().__init__()
        self.is_decoder = is_decoder
        n = cfg.num_decoder_layers if is_decoder else cfg.num_layers
        self.relative_attention_bias = RelativePositionBias(cfg, bidirectional=not is_decoder)
        self.layers = nn.ModuleList(T5Block(cfg, is_decoder=is_decoder) for _ in range(n))
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(
        self,
        x: Tensor,
        pad_bias: Tensor | None = None,
        memory: Tensor | None = None,
        memory_bias: Tensor | None = None,
        cache: list[tuple[KVCache, KVCache]] | None = None,
        document_ids: Tensor | None = None,
    ) -> Tensor:
        """x: (B, T, D) embedded tokens; pad_bias: (B, 1, 1, T) encoder key mask (encoder only);
        memory, memory_bias: the encoder output and its key bias (decoder only); cache: one
        (self, cross) pair per layer (decoder inference); document_ids: (B, T) int64 document
        of each position (packed rows) or None. Returns (B, T, D)."""
        past = cache[0][0].length if cache is not None else 0
        bias = self.position_bias(x.shape[1], pad_bias, past, document_ids)
        x = self.dropout(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, bias, memory, memory_bias, None if cache is None else cache[i])
        return self.finish(x)

    def position_bias(
        self,
        length: int,
        pad_bias: Tensor | None = None,
        past: int = 0,
        document_ids: Tensor | None = None,
    ) -> Tensor:
        """The self-attention bias of T = ``length`` queries after ``past`` cached positions,
        shared by every block of the stack: the relative position bias (1, H, T, past + T), in
        the encoder plus ``pad_bias`` (B, 1, 1, T), the keys' padding, if given (-> (B, H, T,
        T)); the keys `model.layers.allowed_keys` rules out (the decoder's future; with
        ``document_ids`` (B, T) int64, other documents' keys) set to the dtype's most negative
        value (-> (B, H, T, T) with documents)."""
        T = length
        bias = self.relative_attention_bias(T, past + T, offset=past)  # (1, H, T, past + T)
        if not self.is_decoder and pad_bias is not None:
            bias = bias + pad_bias
        mask = allowed_keys(
            T, past + T, causal=self.is_decoder, query_documents=document_ids, device=bias.device
        )  # (B|1, 1, T, past + T) bool or None
        return additive_mask(bias, mask)

    def finish(self, x: Tensor) -> Tensor:
        """The last block's output (B, T, D) -> the stack's: final norm, then dropout."""
        return self.dropout(self.final_layer_norm(x))


def padding_bias(attention_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """(B, S) mask (1/True = token, 0 = padding) -> (B, 1, 1, S) additive bias: 0 or the
    dtype's most negative value. None stays None (no padding)."""
    if attention_mask is None:
        return None
    keep = attention_mask.bool()[:, None, None, :]
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(
        ~keep, torch.finfo(dtype).min
    )


def memory_bias(
    attention_mask: Tensor | None,
    memory: Tensor,
    dtype: torch.dtype,
    document_ids: Tensor | None = None,
    decoder_document_ids: Tensor | None = None,
) -> Tensor:
    """The cross-attention bias over the encoder output memory (B, S, D): `padding_bias` of the
    encoder's (B, S) mask, or zeros (1, 1, 1, S) without one (the attention adds a tensor).
    With the encoder's ``document_ids`` (B, S) and the decoder's ``decoder_document_ids`` (B, T)
    (packed rows), a decoder position sees only the encoder positions of its own document:
    -> (B, 1, T, S), the others at the dtype's most negative value."""
    bias = padding_bias(attention_mask, dtype)
    if bias is None:
        bias = torch.zeros(1, 1, 1, memory.shape[1], dtype=dtype, device=memory.device)
    if document_ids is None:
        return bias
    mask = allowed_keys(
        decoder_document_ids.shape[1],
        document_ids.shape[1],
        causal=False,
        query_documents=decoder_document_ids,
        key_documents=document_ids,
    )  # (B, 1, T, S)
    return additive_mask(bias, mask)


class T5ForConditionalGeneration(nn.Module):
    """T5 v1.1 returning logits; the trainer computes the loss.

    Children: ``shared`` (the embedding of both stacks), ``encoder``, ``decoder``, ``lm_head``.
    Build, materialise and initialise are separate steps, as `LlamaForCausalLM`.

    Raises:
        ValueError: ``cfg.vocab_size`` is None.
    """

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError(
                "T5Config.vocab_size is None; set it (the trainer takes it from the tokenizer)"
            )
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg, is_decoder=False)
        self.decoder = T5Stack(cfg, is_decoder=True)
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size)
        self.tie_weights()

    @classmethod
    def from_config(
        cls,
        cfg: T5Config,
        *,
        seed: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> T5ForConditionalGeneration:
        """Build on meta, materialise on `device`, `init_weights(seed)`, in `dtype`."""
        with torch.device("meta"):
            model = cls(cfg).to(dtype)
        model.to_empty(device=device)
        model.init_weights(seed)
        return model

    def tie_weights(self) -> None:
        """Share `lm_head.weight` with `shared.weight` when the config ties them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Initialise every parameter from `seed` with the distributions of `init_rule`.

        Each parameter is drawn in fp32 by `model.init.init_values` from generators seeded by
        (seed, its name), so the values depend neither on the device nor on the order or layout
        in which parameters are built (a ZeRO-3 rank or a pipeline stage draws only its own
        part, `trainer.construct`).
        """
        self.tie_weights()
        fill_parameters(self, seed_source(self, seed))

    def init_rule(self, name: str) -> InitRule:
        """The initial distribution of parameter `name` (a key of `named_parameters()`), as the
        T5 reference (Mesh TensorFlow's variance-scaling initialisers, reproduced by HF
        `T5PreTrainedModel._init_weights`), all times ``initializer_factor`` c:

        - embedding: N(0, c); q: N(0, c (D Dk)^-1/2) (the folded 1/sqrt(Dk) score scale);
          k, v: N(0, c D^-1/2); o: N(0, c (H Dk)^-1/2); wi_0, wi_1: N(0, c D^-1/2);
          wo: N(0, c F^-1/2); relative position bias: N(0, c D^-1/2); norms: ones.
        - untied head: N(0, c D^-1/2), the fan-in variance scaling of Mesh TF's
          `mtf.layers.dense` that T5 uses for its "logits" layer (HF draws it from N(0, c),
          which gives initial logits a std of sqrt(D)). A tied head is the embedding and the
          decoder output is then scaled by D^-1/2 in `forward`, as T5.

        Raises:
            KeyError: `name` is not a parameter of this model.
        """
        cfg, c = self.config, self.config.initializer_factor
        d, inner, ff = cfg.d_model, cfg.inner_dim, cfg.d_ff
        if name.endswith("norm.weight"):  # the blocks' *_norm and the stacks' final_layer_norm
            return Fill(1.0)
        stds = {
            "shared.weight": c,
            "lm_head.weight": c * d**-0.5,
            "q_proj.weight": c * (d * cfg.d_kv) ** -0.5,
            "k_proj.weight": c * d**-0.5,
            "v_proj.weight": c * d**-0.5,
            "o_proj.weight": c * inner**-0.5,
            "gate_proj.weight": c * d**-0.5,
            "up_proj.weight": c * d**-0.5,
            "down_proj.weight": c * ff**-0.5,
            "relative_attention_bias.embedding.weight": c * d**-0.5,
        }
        for suffix, std in stds.items():
            if name.endswith(suffix):
                return Normal(std)
        raise KeyError(f"{name!r} is not a parameter of T5ForConditionalGeneration")

    def fresh_buffers(self) -> dict[str, Tensor]:
        """The non-persistent buffers' values: T5 has none (its position bias is learned)."""
        return {}

    def blocks(self) -> list[nn.Module]:
        """The repeated blocks, encoder then decoder (activation checkpointing wraps these)."""
        return [*self.encoder.layers, *self.decoder.layers]

    def encode(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
    ) -> Tensor:
        """input_ids: (B, S) int64, attention_mask: (B, S) 1 = token, 0 = padding (None: all
        tokens), document_ids: (B, S) int64 each token's document in a packed row (None: one
        sequence) -> encoder output (B, S, D) in the parameters' dtype."""
        x = self.shared(input_ids)
        pad_bias = padding_bias(attention_mask, x.dtype)
        return self.encoder(x, pad_bias=pad_bias, document_ids=document_ids)

    def decode(
        self,
        decoder_input_ids: Tensor,
        memory: Tensor,
        attention_mask: Tensor | None = None,
        cache: list[tuple[KVCache, KVCache]] | None = None,
    ) -> Tensor:
        """decoder_input_ids: (B, T) int64; memory: (B, S, D) from `encode`; attention_mask:
        the encoder's (B, S) mask; cache (inference, from `new_cache`): the ids are the positions
        after the cached ones. Returns logits (B, T, V)."""
        x = self.shared(decoder_input_ids)
        bias = memory_bias(attention_mask, memory, x.dtype)
        return self.head(self.decoder(x, memory=memory, memory_bias=bias, cache=cache))

    def head(
        self,
        h: Tensor,
        weight: Tensor | None = None,
        labels: Tensor | None = None,
        chunk_tokens: int | None = None,
    ) -> Tensor:
        """Decoder output h: (B, T, D) -> logits (B, T, V). A tied head first rescales h by
        d_model**-0.5, as T5 (Mesh TF; HF `T5ForConditionalGeneration.forward`).

        ``weight``: project with this (V, D) matrix instead of calling ``lm_head`` (a pipeline's
        tied head holds ``shared.weight``, which is ``lm_head.weight``); the call is what ZeRO-3's
        parameter-fetch hooks see.

        ``labels`` (B, T) int64 (-100: no loss): return instead the mean cross-entropy () fp32
        over the labelled positions, ``chunk_tokens`` tokens at a time without the full logits
        (`model.layers.linear_cross_entropy`).
        """
        h = self.head_hidden(h)
        if weight is not None:
            if labels is None:
                return F.linear(h, weight)  # (B, T, V)
            return linear_cross_entropy(h, weight, labels, chunk_tokens)  # ()
        if labels is None:
            return self.lm_head(h)  # (B, T, V)
        return self.lm_head(h, labels, chunk_tokens)  # ()

    def head_hidden(self, h: Tensor) -> Tensor:
        """The head's input: the decoder output h (B, T, D), rescaled by d_model**-0.5 when the
        head is tied (see `head`)."""
        if self.config.tie_word_embeddings:
            return h * self.config.d_model**-0.5
        return h

    def new_cache(self) -> list[tuple[KVCache, KVCache]]:
        """An empty (self, cross) key/value cache pair per decoder layer, for `decode`."""
        return [(KVCache(), KVCache()) for _ in self.decoder.layers]

    def forward(
        self,
        input_ids: Tensor,
        decoder_input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        document_ids: Tensor | None = None,
        decoder_document_ids: Tensor | None = None,
        labels: Tensor | None = None,
        loss_chunk_tokens: int | None = None,
    ) -> Tensor:
        """input_ids: (B, S) int64 encoder tokens; decoder_input_ids: (B, T) int64 (targets
        shifted right behind ``decoder_start_token_id``); attention_mask: (B, S) encoder mask
        (None: no padding). Returns logits (B, T, V) in the parameters' dtype.

        ``document_ids`` (B, S) and ``decoder_document_ids`` (B, T) int64 (training on packed
        rows, ``data.document_mask``; both or neither): each position's document. The encoder
        attends within a document, the decoder causally within a document, and cross-attention
        only to the encoder positions of the decoder position's document; the relative position
        bias and the padding add to the same masks (`model.layers.allowed_keys`, built once per
        forward). None: one sequence per row.

        With ``labels`` (B, T) int64 (-100: no loss) it returns instead the mean cross-entropy
        () fp32 over the labelled positions, computed by the head ``loss_chunk_tokens`` tokens
        at a time without the full logits (`model.layers.linear_cross_entropy`).

        Raises:
            ValueError: only one of ``document_ids`` and ``decoder_document_ids``.
        """
        if (document_ids is None) != (decoder_document_ids is None):
            raise ValueError(
                "document_ids and decoder_document_ids go together (the encoder's and the "
                "decoder's documents); pass both or neither"
            )
        memory = self.encode(input_ids, attention_mask, document_ids)
        x = self.shared(decoder_input_ids)
        bias = memory_bias(attention_mask, memory, x.dtype, document_ids, decoder_document_ids)
        h = self.decoder(x, memory=memory, memory_bias=bias, document_ids=decoder_document_ids)
        return self.head(h, labels=labels, chunk_tokens=loss_chunk_tokens)  # logits or loss

    def pipeline_pieces(self, *, head_loss: bool = False) -> list[Piece]:
        """The forward as pieces for a pipeline cut, in order, each mapping the previous one's
        output (a tuple; ``mask`` is the encoder's attention_mask, None: no padding):

        - encoder embed: (input_ids, mask, decoder_input_ids) -> (x, mask, decoder_input_ids);
        - encoder bias: -> (x, bias, mask, decoder_input_ids), bias the stack's
          `T5Stack.position_bias` (B, H, S, S); encoder block x N: -> the same;
        - encoder norm: -> (memory, mask, decoder_input_ids);
        - decoder embed: -> (y, memory, mask); decoder bias: -> (y, bias, memory, mask);
          decoder block x M: -> the same; decoder norm: -> h (B, T, D); head: -> logits (B, T, V).

        Each stack's bias is computed once and travels to all its blocks (and its gradient back
        from them); the encoder output and mask travel to every decoder block. Both embeddings
        and a tied head are one holder of ``shared`` (tie key ``"shared"``).

        With document masking the model's input is ``(input_ids, mask, decoder_input_ids,
        document_ids, decoder_document_ids)`` and the two document id tensors travel at the end
        of every tuple up to the decoder norm: the bias pieces fold them into the stacks' biases
        ((B, H, S, S), (B, H, T, T)), each decoder block into its cross-attention bias.

        ``head_loss``: in training mode the head returns ``(h (B, T, D), weight (V, D))``, the
        projection's operands (h rescaled as `head` does), instead of the logits, for a loss
        that applies the head chunk by chunk (`model.layers.linear_cross_entropy`); in eval mode
        it returns the logits.
        """
        enc, dec = self.encoder, self.decoder
        shared = {"shared": self.shared}
        if self.config.tie_word_embeddings:
            head = Piece("head", partial(_tied_head, self, head_loss), shared, tie="shared")
        else:
            head = Piece("head", partial(_head, self, head_loss), {"lm_head": self.lm_head})
        return [
            Piece("embed", _embed_encoder, shared, tie="shared"),
            Piece("bias", partial(_encoder_bias, enc), _bias_modules(enc)),
            *[Piece("block", partial(_encoder_block, b), _children(b)) for b in enc.layers],
            Piece("norm", partial(_encoder_norm, enc), _norm_modules(enc)),
            Piece("embed", _embed_decoder, shared, tie="shared"),
            Piece("bias", partial(_decoder_bias, dec), _bias_modules(dec)),
            *[Piece("block", partial(_decoder_block, b), _children(b)) for b in dec.layers],
            Piece("norm", partial(_decoder_norm, dec), _norm_modules(dec)),
            head,
        ]


# -- the pieces' forwards: (holder, inputs) -> outputs (see `model.family.Piece`) ----------------
# The stack and block functions call the model's modules, whose children the holder holds.
def _children(block: nn.Module) -> dict[str, nn.Module]:
    return dict(block.named_children())  # held flat: the holder's keys are the block's


def _bias_modules(stack: T5Stack) -> dict[str, nn.Module]:
    return {"relative_attention_bias": stack.relative_attention_bias, "dropout": stack.dropout}


def _norm_modules(stack: T5Stack) -> dict[str, nn.Module]:
    return {"final_layer_norm": stack.final_layer_norm, "dropout": stack.dropout}


# Document ids, when given, ride at the end of each tuple (``*docs``: (document_ids,
# decoder_document_ids), or nothing).
def _embed_encoder(holder: nn.Module, inputs: tuple) -> tuple:
    input_ids, attention_mask, decoder_input_ids, *docs = inputs
    return holder.shared(input_ids), attention_mask, decoder_input_ids, *docs


def _encoder_bias(stack: T5Stack, holder: nn.Module, inputs: tuple) -> tuple:
    x, attention_mask, decoder_input_ids, *docs = inputs
    pad_bias = padding_bias(attention_mask, x.dtype)
    bias = stack.position_bias(x.shape[1], pad_bias, 0, docs[0] if docs else None)  # (B,H,S,S)
    return stack.dropout(x), bias, attention_mask, decoder_input_ids, *docs


def _encoder_block(block: T5Block, holder: nn.Module, inputs: tuple) -> tuple:
    x, bias, *rest = inputs
    return block(x, bias), bias, *rest


def _encoder_norm(stack: T5Stack, holder: nn.Module, inputs: tuple) -> tuple:
    x, _bias, *rest = inputs
    return stack.finish(x), *rest


def _embed_decoder(holder: nn.Module, inputs: tuple) -> tuple:
    memory, attention_mask, decoder_input_ids, *docs = inputs
    return holder.shared(decoder_input_ids), memory, attention_mask, *docs


def _decoder_bias(stack: T5Stack, holder: nn.Module, inputs: tuple) -> tuple:
    y, *rest = inputs
    docs = rest[2:]
    bias = stack.position_bias(y.shape[1], None, 0, docs[1] if docs else None)  # causal
    return stack.dropout(y), bias, *rest  # bias (1, H, T, T), (B, H, T, T) with documents


def _decoder_block(block: T5Block, holder: nn.Module, inputs: tuple) -> tuple:
    y, bias, memory, attention_mask, *docs = inputs
    y = block(y, bias, memory, memory_bias(attention_mask, memory, y.dtype, *docs))
    return y, bias, memory, attention_mask, *docs


def _decoder_norm(stack: T5Stack, holder: nn.Module, inputs: tuple) -> Tensor:
    return stack.finish(inputs[0])  # (B, T, D)


def _head(
    model: T5ForConditionalGeneration, head_loss: bool, holder: nn.Module, h: Tensor
) -> Tensor | tuple[Tensor, Tensor]:
    if head_loss and holder.training:
        return model.head_hidden(h), holder.lm_head.weight  # (B, T, D), (V, D)
    return model.head(h)  # (B, T, V); calls lm_head, which the holder holds


def _tied_head(
    model: T5ForConditionalGeneration, head_loss: bool, holder: nn.Module, h: Tensor
) -> Tensor | tuple[Tensor, Tensor]:
    if head_loss and holder.training:
        return model.head_hidden(h), holder.shared.weight  # (B, T, D), (V, D)
    return model.head(h, holder.shared.weight)  # (B, T, V)
