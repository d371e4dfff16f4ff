"""Pipeline parallelism: the cut of a Kiln model into a DeepSpeed `PipelineModule`.

The model code stays free of DeepSpeed: this module wraps its blocks as pipeline layers whose
parameter names are the plain model's (so :func:`key_map` is a table from plain keys to
``(layer index, key in that layer)``), and builds them from the config.

Decoder (Llama): ``embed -> block x L -> norm -> head``; a tied head is a `TiedLayerSpec` of the
embedding (DeepSpeed all-reduces the tied weight's gradient between the first and last stage).

Encoder-decoder (T5): ``shared embed -> encoder bias -> encoder block x N -> encoder norm ->
shared embed (decoder) -> decoder bias -> decoder block x M -> decoder norm -> head``. Between
layers travels a tuple: in the encoder ``(x, bias, attention_mask, decoder_input_ids)``, in the
decoder ``(y, bias, memory, attention_mask)``. The relative position bias of a stack is computed
once by its bias layer and travels with the activations to every stage holding blocks of that
stack (its gradient flows back the same way); the encoder output (``memory``) and the encoder's
padding mask travel to every decoder stage, which cross-attends on whichever device it runs.
Floating tensors in the tuple all carry gradients (DeepSpeed runs backward on each of them);
masks and ids are integer tensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.layers import RMSNorm, rope_cos_sin
from model.llama.config import LlamaConfig
from model.llama.model import DecoderLayer
from model.registry import ModelConfig
from model.t5.config import T5Config
from model.t5.model import RelativePositionBias, T5Block, padding_bias

if TYPE_CHECKING:
    from trainer.config import KilnConfig


# -- decoder layers ---------------------------------------------------------------------------
class LlamaEmbedPipe(nn.Module):
    """input_ids (B, T) int64 -> hidden (B, T, D)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.embed_tokens(input_ids)


def _llama_tied_head(module: LlamaEmbedPipe, x: Tensor) -> Tensor:
    return F.linear(x, module.embed_tokens.weight)  # (B, T, V)


class LlamaBlockPipe(DecoderLayer):
    """A Llama block with its own RoPE tables (non-persistent buffers): (B, T, D) -> same."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__(cfg)
        cos, sin = rope_cos_sin(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        T = x.shape[1]
        return super().forward(x, self.rope_cos[:T], self.rope_sin[:T])


class LlamaNormPipe(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x)


class LlamaHeadPipe(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.lm_head(x)  # (B, T, V)


# -- encoder-decoder layers -------------------------------------------------------------------
class T5SharedPipe(nn.Module):
    """The shared embedding (``shared.weight``); used three ways through `TiedLayerSpec`."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.scale = cfg.d_model**-0.5

    def forward(self, inputs):  # the encoder embedding
        input_ids, attention_mask, decoder_input_ids = inputs
        return self.shared(input_ids), attention_mask, decoder_input_ids


def _t5_embed_decoder(module: T5SharedPipe, inputs):
    memory, attention_mask, decoder_input_ids = inputs
    return module.shared(decoder_input_ids), memory, attention_mask


def _t5_tied_head(module: T5SharedPipe, h: Tensor) -> Tensor:
    return F.linear(h * module.scale, module.shared.weight)


class T5EncoderBiasPipe(nn.Module):
    """(x, mask, dec_ids) -> (dropout(x), position bias + padding bias (B, H, S, S), mask,
    dec_ids)."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.relative_attention_bias = RelativePositionBias(cfg, bidirectional=True)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, inputs):
        x, attention_mask, decoder_input_ids = inputs
        S = x.shape[1]
        bias = self.relative_attention_bias(S, S) + padding_bias(attention_mask, x.dtype)
        return self.dropout(x), bias, attention_mask, decoder_input_ids


class T5EncoderBlockPipe(T5Block):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__(cfg, is_decoder=False)

    def forward(self, inputs):
        x, bias, attention_mask, decoder_input_ids = inputs
        return super().forward(x, bias), bias, attention_mask, decoder_input_ids


class T5EncoderNormPipe(nn.Module):
    """-> (memory (B, S, D), mask, dec_ids)."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, inputs):
        x, _bias, attention_mask, decoder_input_ids = inputs
        return self.dropout(self.final_layer_norm(x)), attention_mask, decoder_input_ids


class T5DecoderBiasPipe(nn.Module):
    """(y, memory, mask) -> (dropout(y), causal position bias (1, H, T, T), memory, mask)."""

    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.relative_attention_bias = RelativePositionBias(cfg, bidirectional=False)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, inputs):
        y, memory, attention_mask = inputs
        T = y.shape[1]
        bias = self.relative_attention_bias(T, T)
        future = torch.ones(T, T, dtype=torch.bool, device=y.device).triu(1)
        bias = bias.masked_fill(future, torch.finfo(bias.dtype).min)
        return self.dropout(y), bias, memory, attention_mask


class T5DecoderBlockPipe(T5Block):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__(cfg, is_decoder=True)

    def forward(self, inputs):
        y, bias, memory, attention_mask = inputs
        memory_bias = padding_bias(attention_mask, y.dtype)
        return super().forward(y, bias, memory, memory_bias), bias, memory, attention_mask


class T5DecoderNormPipe(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, inputs) -> Tensor:
        y = inputs[0]
        return self.dropout(self.final_layer_norm(y))


class T5HeadPipe(nn.Module):
    def __init__(self, cfg: T5Config) -> None:
        super().__init__()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        return self.lm_head(h)  # (B, T, V)


BLOCK_TYPES = ("LlamaBlockPipe", "T5EncoderBlockPipe", "T5DecoderBlockPipe")
EMBED, SHARED = ["embed_tokens.weight"], ["shared.weight"]  # the tied parameter of each family


# -- the cut ------------------------------------------------------------------------------------
def layer_specs(cfg: ModelConfig) -> list:
    """DeepSpeed layer specs of the model, in order (see the module docstring)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    if cfg.model_type == "llama":
        tied = cfg.tie_word_embeddings
        embed = (
            TiedLayerSpec("embed", LlamaEmbedPipe, cfg, tied_weight_attr=EMBED)
            if tied
            else LayerSpec(LlamaEmbedPipe, cfg)
        )
        head = (
            TiedLayerSpec(
                "embed", LlamaEmbedPipe, cfg, forward_fn=_llama_tied_head, tied_weight_attr=EMBED
            )
            if tied
            else LayerSpec(LlamaHeadPipe, cfg)
        )
        blocks = [LayerSpec(LlamaBlockPipe, cfg) for _ in range(cfg.num_hidden_layers)]
        return [embed, *blocks, LayerSpec(LlamaNormPipe, cfg), head]
    head = (
        TiedLayerSpec(
            "shared", T5SharedPipe, cfg, forward_fn=_t5_tied_head, tied_weight_attr=SHARED
        )
        if cfg.tie_word_embeddings
        else LayerSpec(T5HeadPipe, cfg)
    )
    return [
        TiedLayerSpec("shared", T5SharedPipe, cfg, tied_weight_attr=SHARED),
        LayerSpec(T5EncoderBiasPipe, cfg),
        *[LayerSpec(T5EncoderBlockPipe, cfg) for _ in range(cfg.num_layers)],
        LayerSpec(T5EncoderNormPipe, cfg),
        TiedLayerSpec(
            "shared", T5SharedPipe, cfg, forward_fn=_t5_embed_decoder, tied_weight_attr=SHARED
        ),
        LayerSpec(T5DecoderBiasPipe, cfg),
        *[LayerSpec(T5DecoderBlockPipe, cfg) for _ in range(cfg.num_decoder_layers)],
        LayerSpec(T5DecoderNormPipe, cfg),
        head,
    ]


def num_blocks(cfg: ModelConfig) -> int:
    """Transformer blocks of the model (the most pipeline stages it can be cut into)."""
    if cfg.model_type == "llama":
        return cfg.num_hidden_layers
    return cfg.num_layers + cfg.num_decoder_layers


def key_map(cfg: ModelConfig) -> dict[str, tuple[int, str]]:
    """Plain model key -> (pipeline layer index, key inside that layer). A tied head maps to the
    embedding's layer (DeepSpeed saves a tied module once, at its first layer)."""
    out: dict[str, tuple[int, str]] = {}
    if cfg.model_type == "llama":
        L = cfg.num_hidden_layers
        out["embed_tokens.weight"] = (0, "embed_tokens.weight")
        for i in range(L):
            for k in _block_keys(DecoderLayer(cfg)):
                out[f"layers.{i}.{k}"] = (1 + i, k)
        out["norm.weight"] = (L + 1, "norm.weight")
        tied = cfg.tie_word_embeddings
        out["lm_head.weight"] = (0, "embed_tokens.weight") if tied else (L + 2, "lm_head.weight")
        return out
    N, M = cfg.num_layers, cfg.num_decoder_layers
    out["shared.weight"] = (0, "shared.weight")
    bias = "relative_attention_bias.embedding.weight"
    out[f"encoder.{bias}"] = (1, bias)
    for i in range(N):
        for k in _block_keys(T5Block(cfg, is_decoder=False)):
            out[f"encoder.layers.{i}.{k}"] = (2 + i, k)
    out["encoder.final_layer_norm.weight"] = (N + 2, "final_layer_norm.weight")
    out[f"decoder.{bias}"] = (N + 4, bias)
    for i in range(M):
        for k in _block_keys(T5Block(cfg, is_decoder=True)):
            out[f"decoder.layers.{i}.{k}"] = (N + 5 + i, k)
    out["decoder.final_layer_norm.weight"] = (N + M + 5, "final_layer_norm.weight")
    tied = cfg.tie_word_embeddings
    out["lm_head.weight"] = (0, "shared.weight") if tied else (N + M + 6, "lm_head.weight")
    return out


def _block_keys(block: nn.Module) -> list[str]:
    with torch.device("meta"):
        return list(block.state_dict())


def build_pipeline(cfg: KilnConfig, model: nn.Module, loss_fn):
    """The `PipelineModule` of ``model``'s config with ``model``'s weights on this stage.

    Every rank built ``model`` from the same seed, so each stage copies its own layers' weights
    from it: the pipeline starts from exactly the plain model's weights.

    Args:
        cfg: the run config (``parallel.pipeline_stages``, ``parallel.pipeline_partition``,
            ``train.activation_checkpointing``).
        model: the plain model (`LlamaForCausalLM` / `T5ForConditionalGeneration`).
        loss_fn: ``(logits, labels) -> loss`` on the last stage.
    """
    from deepspeed.pipe import PipelineModule

    pipe = PipelineModule(
        layers=layer_specs(cfg.model),
        num_stages=cfg.parallel.pipeline_stages,
        loss_fn=loss_fn,
        partition_method=_partition_method(cfg.parallel.pipeline_partition),
        activation_checkpoint_interval=1 if cfg.train.activation_checkpointing else 0,
        checkpointable_layers=list(BLOCK_TYPES),
    )
    load_plain_state_dict(pipe, model.state_dict(), cfg.model)
    return pipe


def _partition_method(name: str) -> str:
    # "blocks": balance the transformer blocks only (DeepSpeed's type:<regex> method)
    return "type:" + "|".join(BLOCK_TYPES) if name == "blocks" else name


@torch.no_grad()
def load_plain_state_dict(pipe: nn.Module, state: dict[str, Tensor], cfg: ModelConfig) -> None:
    """Copy the plain model's ``state`` into the layers this stage holds.

    Raises:
        ValueError: a parameter of this stage has no source in ``state``.
    """
    wanted: dict[tuple[int, str], str] = {v: k for k, v in key_map(cfg).items()}
    for idx, layer in _local_layers(pipe):
        for name, param in layer.state_dict(keep_vars=True).items():
            plain = wanted.get((idx, name))
            if plain is None:
                raise ValueError(f"pipeline layer {idx} key {name!r} has no plain model key")
            param.copy_(state[plain])


def _local_layers(pipe) -> list[tuple[int, nn.Module]]:
    """(global layer index, module) of this stage's layers. A tied module is listed once, at
    the first layer of its key in the whole pipeline (where :func:`key_map` puts its weights),
    even on a stage that holds only a later use of it (a tied head)."""
    from deepspeed.pipe import TiedLayerSpec

    out, tied = [], set()
    for key, module in pipe.tied_modules.items():
        first = next(
            i
            for i, spec in enumerate(pipe._layer_specs)
            if isinstance(spec, TiedLayerSpec) and spec.key == key
        )
        out.append((first, module))
        tied.add(id(module))
    for local, fn in enumerate(pipe.forward_funcs):
        if isinstance(fn, nn.Module) and id(fn) not in tied:
            out.append((pipe._local_start + local, fn))
    return out


def consolidate(ckpt_dir, cfg: ModelConfig) -> dict[str, Tensor]:
    """The plain model's state dict from a pipeline checkpoint's ``layer_XX-model_states.pt``
    files (any stage count; one CPU process).

    Raises:
        FileNotFoundError: a layer file is missing (not a complete pipeline checkpoint).
    """
    from pathlib import Path

    ckpt_dir = Path(ckpt_dir)
    layers: dict[int, dict[str, Tensor]] = {}
    out = {}
    for plain, (idx, key) in key_map(cfg).items():
        if idx not in layers:
            files = sorted(ckpt_dir.glob(f"layer_{idx:02d}-*model_states.pt"))
            if not files:
                raise FileNotFoundError(
                    f"{ckpt_dir} has no layer_{idx:02d}-*model_states.pt: not a complete "
                    f"pipeline checkpoint of this model"
                )
            layers[idx] = torch.load(files[0], map_location="cpu", weights_only=True)
        out[plain] = layers[idx][key]
    return out
