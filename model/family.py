"""What a model family provides: :class:`FamilySpec`, and the values the families share.

A family is one folder under ``model/`` (``model/llama/``, ``model/t5/``) holding its config,
presets, module, Hugging Face adapter and a ``SPEC``; ``model/registry.py`` maps ``model_type`` to
it. Generic code (config validation, objectives, memory and FLOPs estimates, publishing,
``model.init_from``, the model card, the CLI) asks the spec, the pipeline cut asks the module
(``pipeline_pieces()``), and none branches on ``model_type``.

Adding a third family (say ``model/gpt2/``) is:

1. ``model/gpt2/config.py``: a pydantic config with ``model_type: Literal["gpt2"]`` and the
   shape properties every family config has (``num_blocks``, ``max_seq_len``, ``d_model``,
   ``num_parameters``, ``head_dim``);
2. ``model/gpt2/presets.py``: ``PRESETS``, a dict of factory functions with a ``debug`` entry;
3. ``model/gpt2/model.py``: the ``nn.Module`` with ``from_config``, ``blocks()``, a forward
   that takes the batch's model inputs by keyword and ``pipeline_pieces()``, that forward as a
   list of :class:`Piece` (the pipeline cut); ``init_rule(name)``, each parameter's initial
   distribution, and ``fresh_buffers()``, its non-persistent buffers' values (`model.init`: what
   lets a ZeRO-3 rank or a pipeline stage initialise only what it holds);
4. ``model/gpt2/hf.py``: ``to_hf_config``, ``from_hf_config``, ``to_hf_state_dict``,
   ``from_hf_state_dict``, ``key_pairs`` (our key, HF key) per parameter (``model.init_from``
   reads tensors by it);
5. ``model/gpt2/__init__.py``: ``SPEC = FamilySpec(...)``;
6. in ``model/registry.py``: import ``model.gpt2.SPEC`` and add it to ``FAMILIES``.

``tests/test_family.py`` checks that every registered family provides all of this.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

INIT_FROM_DESCRIPTION = (
    "Hugging Face checkpoint folder (config.json + safetensors) to continue pretraining from: "
    "its config.json gives the architecture, its weights the start (a resumed run takes its "
    "checkpoint's), its tokenizer.model the tokenizer"
)


@dataclass(frozen=True)
class ActivationStack:
    """One stack of identical blocks for the activation-memory estimate: ``num_blocks`` blocks
    over ``seq_len`` positions of width ``d_model`` keeping ``values_per_token`` x ``d_model``
    16-bit values per position each (34 for a self-attention block, 51 with cross-attention:
    Korthikanti et al. 2022, eq. 1, without the attention-score term that flash /
    memory-efficient SDPA never stores)."""

    num_blocks: int
    seq_len: int
    d_model: int
    values_per_token: int


@dataclass(frozen=True, repr=False)
class Piece:
    """One piece of a model's forward, in the order of a pipeline cut (``trainer.pipeline`` makes
    each a DeepSpeed pipeline layer): a function of the previous piece's output over some of the
    model's own modules, so the cut runs the model's code on the model's parameters.

    Attributes:
        kind: ``"embed"``, ``"bias"``, ``"block"``, ``"norm"`` or ``"head"``; a ``"block"`` is a
            transformer block (recomputed under activation checkpointing).
        forward: ``(holder, inputs) -> outputs``: ``inputs`` is the previous piece's output (the
            first piece's is the model's inputs), a tensor or a tuple of tensors; ``holder`` is a
            module holding ``modules`` and ``buffers`` under their names. It reads parameters and
            buffers only through those: from ``holder``, or by calling (in a closure) the
            model's modules and methods over them, such as a block whose children are held flat.
            A module called so is not the holder's and never sees ``train()``/``eval()`` itself,
            only through its held children: it must not read its own ``training``.
        modules: name -> a module of the model, held under that name; the holder's state-dict
            keys are the model's keys below these modules (``embed_tokens.weight``, a block's
            ``self_attn.q_proj.weight``).
        buffers: name -> a tensor ``forward`` reads from the holder (RoPE tables); not saved.
        tie: pieces with the same key share one holder, built from the first of them (an
            embedding used again by the decoder or as the tied head); None: its own holder.
    """

    kind: str
    forward: Callable[[Any, Any], Any]
    modules: Mapping[str, Any]
    buffers: Mapping[str, Any] = field(default_factory=dict)
    tie: str | None = None

    def __repr__(self) -> str:  # DeepSpeed prints its layer specs' arguments
        return f"Piece({self.kind!r}, modules={list(self.modules)}, tie={self.tie!r})"


@dataclass(frozen=True)
class FamilySpec:
    """Everything family-specific, in one object per family (see the module docstring).

    Attributes:
        model_type: the ``model.model_type`` value and the Hugging Face ``model_type``.
        description: a few words for listings ("decoder", "encoder-decoder").
        config_class: the family's pydantic config (field names as the HF config's).
        model_class: the ``nn.Module``; ``model_class.from_config(cfg, seed=, device=, dtype=)``;
            an instance's ``init_rule(name)`` and ``fresh_buffers()`` (see `model.init`).
        presets: name -> factory of a config; smallest first, always with ``debug``.
        hf: the Hugging Face adapter module (config and key maps both ways).
        hf_model_class: name of the ``transformers`` model class (``LlamaForCausalLM``).
        hf_auto_class: name of the ``transformers`` Auto class that loads it.
        pipeline_tag: the Hub's task tag of a published model.
        architecture: one line for the model card ("decoder-only transformer (Llama ...)").
        objectives: the objective types that train the family; the first is the default.
        default_num_sentinels: ``tokenizer.num_sentinels`` when unset (T5's 100 ``<extra_id_N>``).
        tokenizer_appends_eos: the published tokenizer's ``encode`` appends EOS (T5's
            convention); a decoder's adds no special tokens.
        model_inputs: the keys of the batch dict the module's forward takes by keyword.
        document_inputs: the keys a packed batch adds with ``data.document_mask`` (the
            documents' ids; ``position_ids`` where the family's positions can restart per
            document, ``data.reset_position_ids``), after ``model_inputs`` in a pipeline's
            first input.
        flops_per_sequence: ``(cfg, lengths) -> FLOPs`` of forward + backward on one sequence,
            ``lengths`` the model's input lengths (decoder: ``(T,)``; T5: ``(S, T)``).
        activation_stacks: ``(cfg, lengths) -> [ActivationStack]`` for the memory estimate; the
            last stack feeds the head.
        architecture_rows: ``cfg -> [(name, value)]`` for the model card's table.
        check_batch: ``(cfg, rows) -> batch`` the fixed batch of the publishing logits check,
            ``rows(length)`` giving (2, length) int64 token ids.
        generation_config: ``cfg -> dict`` of ``transformers.GenerationConfig`` arguments.
        complete: ``(model, tokenizer, prompt, **sampling) -> text``: the prompt continued
            (decoder) or its sentinel spans filled in (T5), for ``kiln generate``; ``sampling``
            as `model.generate.generate`'s keyword arguments.
        shape_row: ``cfg -> (layers, width, heads)`` as text, for ``kiln presets``.
    """

    model_type: str
    description: str
    config_class: type
    model_class: type
    presets: Mapping[str, Callable[[], Any]]
    hf: ModuleType
    hf_model_class: str
    hf_auto_class: str
    pipeline_tag: str
    architecture: str
    objectives: tuple[str, ...]
    default_num_sentinels: int
    tokenizer_appends_eos: bool
    model_inputs: tuple[str, ...]
    document_inputs: tuple[str, ...]
    flops_per_sequence: Callable[[Any, tuple[int, ...]], float]
    activation_stacks: Callable[[Any, tuple[int, ...]], list[ActivationStack]]
    architecture_rows: Callable[[Any], list[tuple[str, Any]]]
    check_batch: Callable[[Any, Callable[[int], Any]], dict[str, Any]]
    generation_config: Callable[[Any], dict[str, int]]
    complete: Callable[..., str]
    shape_row: Callable[[Any], tuple[str, str, str]]

    def preset(self, name: str) -> Any:
        """A fresh config of preset ``name``.

        Raises:
            ValueError: unknown name (the message lists the family's presets).
        """
        if name not in self.presets:
            raise ValueError(
                f"unknown {self.model_type} preset {name!r}; choose one of {list(self.presets)}"
            )
        return self.presets[name]()
