"""Pipeline parallelism: the cut of a Kiln model into a DeepSpeed `PipelineModule`.

The model code stays free of DeepSpeed: the model gives its forward as an ordered list of pieces
(``model.pipeline_pieces()``, `model.family.Piece`), each a function over some of the model's own
modules, and this module makes each piece a pipeline layer (:class:`PipeLayer`) holding those
modules under the piece's names. The pipeline thus runs the model's code on the model's
parameters, and a layer's keys are the plain model's keys inside that piece: the map from plain
keys to ``(layer index, key in that layer)`` (:func:`key_map`) follows from parameter identity.

Decoder (Llama): ``embed -> block x L -> norm -> head``. Encoder-decoder (T5): ``embed -> bias ->
block x N -> norm -> embed -> bias -> block x M -> norm -> head`` with tuples travelling between
layers (see `T5ForConditionalGeneration.pipeline_pieces`). Pieces with a tie key (an embedding
used on several stages, a tied head) are one `TiedLayerSpec` module: DeepSpeed builds it on every
stage that uses it, all-reduces its gradient between them and saves it once, at its first layer.
Floating tensors in the activations all carry gradients (DeepSpeed runs backward on each of
them); masks and ids are integer tensors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from model.family import Piece
from model.init import Source, materialise
from model.layers import linear_cross_entropy
from model.registry import ModelConfig, spec

if TYPE_CHECKING:
    from trainer.config import KilnConfig


class PipeLayer(nn.Module):
    """One pipeline layer: a piece of the model, holding the piece's modules (the model's own)
    under the piece's names and its buffers (non-persistent); ``forward(inputs)`` is the piece's.
    """

    def __init__(self, piece: Piece) -> None:
        super().__init__()
        for name, module in piece.modules.items():
            self.add_module(name, module)
        for name, tensor in piece.buffers.items():
            self.register_buffer(name, tensor, persistent=False)
        self.piece = piece

    def forward(self, inputs: Any) -> Any:
        return self.piece.forward(self, inputs)


class PipeBlock(PipeLayer):
    """A transformer block's layer (activation checkpointing and the ``blocks`` partition find
    blocks by this class name)."""


BLOCK_TYPES = (PipeBlock.__name__,)


# -- the cut ------------------------------------------------------------------------------------
def _holders(pieces: list[Piece]) -> list[Piece]:
    """For each piece, the piece whose layer holds its modules: itself, or the first piece of
    its tie key (DeepSpeed builds a tied module from the first spec of its key on a stage, so
    every use must build the same one)."""
    first: dict[str, Piece] = {}
    out = []
    for piece in pieces:
        if piece.tie is None:
            out.append(piece)
            continue
        holder = first.setdefault(piece.tie, piece)
        assert _held(piece) == _held(holder), f"pieces tied by {piece.tie!r} hold different modules"
        out.append(holder)
    return out


def _held(piece: Piece) -> list[tuple[str, int]]:
    """What a piece holds, by name and identity."""
    return [(k, id(v)) for k, v in [*piece.modules.items(), *piece.buffers.items()]]


def _layer_type(piece: Piece) -> type[PipeLayer]:
    return PipeBlock if piece.kind == "block" else PipeLayer


def layer_specs(model: nn.Module, *, head_loss: bool = False) -> list:
    """DeepSpeed layer specs of ``model``'s pieces, in order; the layers they build hold the
    model's own modules (see the module docstring). ``head_loss``: the head hands the loss its
    operands in training (``pipeline_pieces(head_loss=True)``, :func:`pipeline_loss`)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    pieces = model.pipeline_pieces(head_loss=head_loss)
    specs = []
    for piece, holder in zip(pieces, _holders(pieces), strict=True):
        if piece.tie is None:
            specs.append(LayerSpec(_layer_type(piece), piece))
            continue
        tied = [name for name, _ in PipeLayer(holder).named_parameters()]
        forward_fn = None if piece is holder else piece.forward  # called as (module, inputs)
        specs.append(
            TiedLayerSpec(
                piece.tie,
                _layer_type(holder),
                holder,
                forward_fn=forward_fn,
                tied_weight_attr=tied,
            )
        )
    return specs


def key_map(cfg: ModelConfig, model: nn.Module | None = None) -> dict[str, tuple[int, str]]:
    """Plain model key -> (pipeline layer index, key inside that layer), by parameter identity
    between the model and its pipeline layers. A tied piece maps to its key's first layer
    (DeepSpeed saves a tied module once, there), so a tied head maps to the embedding's layer.

    Args:
        cfg: the model config.
        model: the model of ``cfg``; None builds one on the meta device (no memory).
    """
    if model is None:
        with torch.device("meta"):
            model = spec(cfg).model_class(cfg)
    pieces = model.pipeline_pieces()
    slot: dict[int, tuple[int, str]] = {}
    for idx, (piece, holder) in enumerate(zip(pieces, _holders(pieces), strict=True)):
        if piece is not holder:  # a later use of a tied module: nothing of its own
            continue
        for key, tensor in PipeLayer(piece).state_dict(keep_vars=True).items():
            assert id(tensor) not in slot, f"{key!r} of layer {idx} is already in another layer"
            slot[id(tensor)] = (idx, key)
    plain = model.state_dict(keep_vars=True)
    missing = [k for k, v in plain.items() if id(v) not in slot]
    assert not missing, f"the pipeline layers hold no {missing}"
    assert len(slot) == len({id(v) for v in plain.values()}), "a layer holds a non-model tensor"
    return {k: slot[id(v)] for k, v in plain.items()}


@dataclass(frozen=True)
class StageShape:
    """What one pipeline stage holds, as :func:`build_pipeline`'s `PipelineModule` cuts the model:
    ``parameters`` (elements; a tied module counted once per stage that builds it), the global
    indices of its transformer ``blocks`` (in the order of ``model.blocks()``: T5's encoder
    blocks, then its decoder's), and whether it ``has_head`` (the last stage: logits and loss)."""

    parameters: int
    blocks: tuple[int, ...]
    has_head: bool


def stage_shapes(cfg: KilnConfig) -> list[StageShape]:
    """Each of the ``parallel.pipeline_stages`` stages of ``cfg``'s model, in order, as DeepSpeed
    partitions the layers (``parallel.pipeline_partition``): ``parameters`` balances the
    parameter counts of the layers (``PipelineModule._count_layer_params``: a tied layer counts
    at each use) with ``deepspeed.runtime.utils.partition_balanced``; ``uniform`` splits the
    layer count (``partition_uniform``); ``blocks`` balances the transformer blocks. The model
    is built on the meta device: no memory, ~0.1 s, plus DeepSpeed's import (~2 s) on first use.
    """
    from deepspeed.runtime.utils import partition_balanced, partition_uniform

    m = cfg.derived.model
    with torch.device("meta"):
        model = spec(m).model_class(m)
    pieces = model.pipeline_pieces(head_loss=cfg.train.loss_chunk_tokens > 0)
    layers = [PipeLayer(holder) for holder in _holders(pieces)]
    stages, method = cfg.parallel.pipeline_stages, cfg.parallel.pipeline_partition
    if method == "uniform":
        parts = partition_uniform(len(pieces), stages)
    else:
        weights = [
            sum(p.numel() for p in layer.parameters() if p.requires_grad)
            if method == "parameters"
            else int(piece.kind == "block")
            for piece, layer in zip(pieces, layers, strict=True)
        ]
        parts = partition_balanced(weights, stages)
    block_index = {}
    for i, piece in enumerate(pieces):
        if piece.kind == "block":
            block_index[i] = len(block_index)
    out = []
    for s in range(stages):
        held = {
            id(p): p.numel()
            for layer in layers[parts[s] : parts[s + 1]]
            for p in layer.parameters()
        }
        blocks = tuple(block_index[i] for i in range(parts[s], parts[s + 1]) if i in block_index)
        out.append(StageShape(sum(held.values()), blocks, s == stages - 1))
    return out


def build_pipeline(cfg: KilnConfig, model: nn.Module, loss_fn, *, source: Source | None = None):
    """The `PipelineModule` of ``model``: this stage's layers hold ``model``'s own modules (which
    DeepSpeed moves to the stage's device).

    With ``source`` None, ``model`` is materialised and the pipeline starts from exactly its
    weights. With a ``source`` (`model.init.Source`), ``model`` is on the meta device and only
    this stage's layers are materialised, from ``source`` under their plain names (DeepSpeed
    builds no other stage's layer), so the stage never holds another's weights.

    Args:
        cfg: the run config (``parallel.pipeline_stages``, ``parallel.pipeline_partition``,
            ``train.activation_checkpointing[_every]``, ``train.loss_chunk_tokens``).
        model: the plain model (`LlamaForCausalLM` / `T5ForConditionalGeneration`).
        loss_fn: ``(logits, labels) -> loss`` on the last stage (with
            ``train.loss_chunk_tokens`` it serves evaluation; training uses the chunked loss,
            :func:`pipeline_loss`).
        source: where a meta model's values come from (None: ``model`` holds them).

    Activation checkpointing wraps the model's blocks (`trainer.engine.
    apply_activation_checkpointing`), which the block layers call, rather than DeepSpeed's
    ``activation_checkpoint_interval``: that recomputes runs of k consecutive layers as one
    checkpoint, not every k-th block, so the choices would mean other things here.
    """
    from deepspeed.pipe import PipelineModule

    from trainer.engine import apply_activation_checkpointing

    t = cfg.train
    apply_activation_checkpointing(
        model, t.activation_checkpointing, t.activation_checkpointing_every
    )
    chunk = t.loss_chunk_tokens
    kwargs = dict(
        layers=layer_specs(model, head_loss=chunk > 0),
        num_stages=cfg.parallel.pipeline_stages,
        loss_fn=pipeline_loss(loss_fn, chunk) if chunk > 0 else loss_fn,
        partition_method=_partition_method(cfg.parallel.pipeline_partition),
        activation_checkpoint_interval=0,
        checkpointable_layers=list(BLOCK_TYPES),
    )
    if source is None:
        return PipelineModule(**kwargs)
    return _stage_pipeline_class()(model=model, source=source, **kwargs)


def first_stage_inputs(cfg: ModelConfig, inputs: dict[str, torch.Tensor]):
    """The first pipeline layer's input for a batch's model inputs (`trainer.objectives.Batch`):
    the family's ``model_inputs`` in the spec's order, then the ``document_inputs`` the batch
    has (``data.document_mask``: document ids, position ids), as the model's pieces read them;
    a lone input is the tensor itself (the decoder's ``input_ids``), several are a tuple."""
    s = spec(cfg)
    values = tuple(inputs[k] for k in (*s.model_inputs, *s.document_inputs) if k in inputs)
    return values[0] if len(values) == 1 else values


def pipeline_loss(loss_fn, chunk_tokens: int):
    """The last stage's loss with a head that hands over its operands in training
    (``layer_specs(head_loss=True)``): ``(h (B, T, D), weight (V, D))`` -> the chunked
    `model.layers.linear_cross_entropy` (the plain loss's value and gradients without the full
    logits); logits (B, T, V) in evaluation -> ``loss_fn``."""

    def loss(outputs, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, tuple):
            h, weight = outputs
            return linear_cross_entropy(h, weight, labels, chunk_tokens)
        return loss_fn(outputs, labels)

    return loss


@functools.cache
def _stage_pipeline_class() -> type:
    """A `PipelineModule` that materialises the layers it builds (this stage's) from a source
    between DeepSpeed building them and moving them to the device. Made on first use: the
    class derives from DeepSpeed's, imported lazily."""
    from deepspeed.pipe import PipelineModule

    class StagePipelineModule(PipelineModule):
        def __init__(self, *, model: nn.Module, source: Source, **kwargs: Any) -> None:
            # Kept out of the module tree: the plain model stays on meta, unregistered.
            self.__dict__["_plain_and_source"] = (model, source)
            super().__init__(**kwargs)

        def _build(self) -> None:
            super()._build()  # this stage's layers and tied modules, still on meta
            model, source = self.__dict__.pop("_plain_and_source")
            materialise(model, source, modules=[self])

    return StagePipelineModule


def _partition_method(name: str) -> str:
    # "blocks": balance the transformer blocks only (DeepSpeed's type:<regex> method)
    return "type:" + "|".join(BLOCK_TYPES) if name == "blocks" else name
