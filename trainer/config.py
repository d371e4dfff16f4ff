"""The typed, validated config tree of a Kiln run.

Precedence: model preset (code, ``model.name``) < YAML file < ``key=value`` overrides on the
command line (``train.lr=3e-4 parallel.zero_stage=3``). Every section is a strict pydantic model
(unknown keys and wrong types are refused); rules that span sections live in one place,
:meth:`KilnConfig._cross_field_rules`, and raise :class:`ConfigError` naming the fields, the values
and the fix. Rules that need the filesystem or the world size are separate functions
(:func:`check_paths`, :func:`batch_plan`) so that a config can be loaded anywhere.

The config holds what the user wrote (and the defaults); it is never rewritten. Values a run
derives from it (the padded model vocabulary, the sentinel count, the default objective) come from
one property, :attr:`KilnConfig.derived`, so ``load(dump(cfg)) == cfg`` and every rank derives the
same values from the same function.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from model.registry import (
    DEFAULT_MODEL_TYPE,
    ModelConfig,
    ModelConfigField,
    family,
    model_types,
    spec,
)
from trainer.errors import ConfigError
from trainer.init_from import resolve_init_from
from trainer.objectives import span_corruption_lengths
from trainer.storage import RunFolder

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
VOCAB_MULTIPLE = 64  # pad the model vocab so the embedding / head matmuls tile well on GPUs


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class TokenizerConfig(_Section):
    path: str | None = Field(
        None,
        description="tokenizer.model to use; trained there from the data sources if missing "
        "(default <data.root>/tokenizer/tokenizer.model)",
    )
    model_type: Literal["bpe", "unigram"] = Field("bpe", description="sentencepiece algorithm")
    vocab_size: PositiveInt = Field(32000, description="pieces in the trained tokenizer")
    input_sentence_size: PositiveInt = Field(
        1_000_000, description="sentences sampled from the corpus to train the tokenizer"
    )
    character_coverage: Annotated[float, Field(ge=0.98, le=1)] = Field(
        0.9995, description="share of characters covered by pieces; the rest fall back to bytes"
    )
    byte_fallback: bool = Field(True, description="unknown characters become UTF-8 byte pieces")
    num_sentinels: NonNegativeInt | None = Field(
        None,
        description="span-corruption sentinels <extra_id_0>... reserved at the end of the "
        "vocabulary; None: 100 for model_type t5, 0 for llama",
    )
    seed: int = Field(0, description="seed of the sentence sample")


class SourceConfig(_Section):
    path: str = Field(description="a file, a glob, or a folder (of files or a saved dataset)")
    format: Literal["text", "json", "parquet", "saved"] | None = Field(
        None, description="None: inferred from the file suffix (.txt, .json/.jsonl, .parquet)"
    )
    text_field: str = Field("text", description="column holding the text (json, parquet, saved)")
    sample_by: Literal["document", "paragraph", "line"] = Field(
        "document",
        description="text files: one document per file, per blank-line paragraph, or per line",
    )


class DatasetConfig(_Section):
    name: str = Field(description="prepared into <data.root>/<name>/")
    sources: list[SourceConfig] = Field(description="raw inputs of this dataset")
    weight: PositiveFloat = Field(1.0, description="relative share of training samples")
    license: str | None = Field(
        None,
        description="licence of the text (e.g. 'public domain', 'cc-by-4.0'); recorded in the "
        "manifest and the model card of published checkpoints",
    )


class DataConfig(_Section):
    root: str = Field("data", description="folder of prepared datasets and the tokenizer")
    datasets: list[DatasetConfig] = Field(default_factory=list, description="the training mixture")
    seq_len: PositiveInt = Field(256, description="tokens per training sequence")
    validation_fraction: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.01,
        description="share held out for validation: whole documents, or the last sequences when "
        "the documents are too few (see trainer.data.prepare); 0: no validation",
    )
    max_skipped_fraction: Annotated[float, Field(ge=0, le=1)] = Field(
        0.1,
        description="share of a dataset's non-empty documents that may be skipped as invalid "
        "UTF-8, malformed json or without the text field; more refuses to prepare it",
    )
    num_proc: PositiveInt = Field(2, description="processes that tokenize in parallel")
    shard_tokens: PositiveInt = Field(
        64 * 1024 * 1024, description="approximate tokens per shard file"
    )
    seed: int = Field(0, description="seed of the validation split and of the sample order")
    verify_checksums: bool = Field(
        True,
        description="hash every shard against its manifest before training starts (sha256, "
        "about 1.4 GiB/s per CPU core; sizes are always checked)",
    )
    prefetch_steps: NonNegativeInt = Field(
        2,
        description="optimizer steps of batches prepared ahead of the training step in "
        "DataLoader worker processes (reads and the objective, e.g. span corruption; pinned "
        "for non-blocking copies on CUDA); 0: each batch read in the training process when "
        "the step needs it",
    )
    prefetch_workers: PositiveInt = Field(
        1, description="DataLoader worker processes per rank that prepare the batches ahead"
    )
    document_mask: bool = Field(
        False,
        description="attention stops at document boundaries inside a packed row (a document "
        "ends at and includes its EOS); training only, the published model has no mask",
    )
    reset_position_ids: bool = Field(
        False,
        description="RoPE positions restart at 0 with each document of a packed row (decoder; "
        "needs data.document_mask; Megatron-LM's option)",
    )

    @property
    def hf_cache_dir(self) -> Path:
        """Where ``datasets`` caches the Arrow conversion of raw sources."""
        return Path(self.root) / ".cache" / "huggingface"


class TrainConfig(_Section):
    seed: int = Field(1234, description="seed of the model initialisation")
    micro_batch_size: PositiveInt = Field(4, description="sequences per device per micro-step")
    gradient_accumulation_steps: PositiveInt | None = Field(
        None, description="micro-steps per optimizer step; None: derived from global_batch_size"
    )
    global_batch_size: PositiveInt | None = Field(
        None, description="sequences per optimizer step over all data-parallel ranks"
    )
    max_steps: PositiveInt = Field(1000, description="optimizer steps of the whole run")
    lr: PositiveFloat = Field(3e-4, description="peak learning rate")
    min_lr: Annotated[float, Field(ge=0)] = Field(3e-5, description="learning rate after decay")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="decay after warmup"
    )
    warmup_steps: NonNegativeInt = Field(100, description="linear warmup from 0 to lr")
    weight_decay: Annotated[float, Field(ge=0)] = Field(0.1, description="AdamW decoupled decay")
    adam_beta1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    adam_beta2: Annotated[float, Field(ge=0, lt=1)] = 0.95
    adam_eps: PositiveFloat = 1e-8
    grad_clip: Annotated[float, Field(ge=0)] = Field(1.0, description="max grad norm; 0 = off")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="fp16 uses dynamic loss scaling"
    )
    activation_checkpointing: Literal["none", "full", "attention", "mlp"] = Field(
        "none",
        description="what the checkpointed blocks recompute in backward instead of storing: "
        "none; full (the whole block, keeping only its input); attention or mlp (that sublayer "
        "with its norm); true / false mean full / none",
    )
    activation_checkpointing_every: PositiveInt = Field(
        1,
        description="checkpoint every k-th transformer block (blocks k, 2k, ... counted from 1, "
        "as torchtitan's selective_ac_option); 1: every block",
    )
    loss_chunk_tokens: NonNegativeInt = Field(
        0,
        description="training loss: apply the output head and cross-entropy this many tokens "
        "at a time, recomputing each chunk's logits in backward, so the (tokens x vocab) logits "
        "never exist whole; 0: the plain head and loss (evaluation always uses the plain path)",
    )
    compile: bool = Field(
        False,
        description="torch.compile each transformer block (regional compilation, inductor, "
        "static shapes); the first step pays the compile time; trains eagerly with a warning "
        "where the backend cannot compile (no C++ compiler on a CPU, no Triton on a GPU)",
    )
    eval_every: PositiveInt = Field(100, description="steps between validation passes")
    eval_samples: PositiveInt = Field(64, description="validation sequences per pass")
    log_every: PositiveInt = Field(10, description="steps between metric lines")
    log_sample_ids: bool = Field(
        False, description="every rank records the sample ids of each step under run_dir"
    )
    peak_flops: PositiveFloat | None = Field(
        None, description="device peak FLOP/s for MFU; None: known GPU table or measured on CPU"
    )

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _checkpointing_bool(cls, value: Any) -> Any:
        # the field was a bool before it named what to recompute: true / false stay valid
        if isinstance(value, bool):
            return "full" if value else "none"
        return value


class ParallelConfig(_Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="DeepSpeed ZeRO stage, 0-3")
    pipeline_stages: PositiveInt = Field(
        1,
        description="pipeline-parallel stages P (DeepSpeed pipeline engine when > 1); the "
        "world is P x data-parallel ranks; micro-batches per step = gradient_accumulation_steps",
    )
    pipeline_partition: Literal["parameters", "uniform", "blocks"] = Field(
        "parameters",
        description="how layers are split over the stages: balance parameters, layer count, or "
        "transformer blocks",
    )
    offload_optimizer: bool = Field(
        False, description="optimizer state (and its step) off the device, to offload_device"
    )
    offload_params: bool = Field(
        False, description="parameters off the device, to offload_device (ZeRO-3 only)"
    )
    offload_device: Literal["cpu", "nvme"] = Field(
        "cpu",
        description="where offload_optimizer / offload_params put their tensors: host memory, "
        "or files under nvme_path (ZeRO-Infinity; ZeRO-3 only, needs DeepSpeed's async I/O op: "
        "libaio-dev)",
    )
    nvme_path: str | None = Field(
        None,
        description="folder on a fast local disk for offload_device=nvme (a swap folder per rank "
        "is made in it)",
    )
    # DeepSpeed's memory knobs, in elements (DeepSpeed's names and units); None: derived from the
    # model and the device by trainer.estimate.ds_memory_settings (see the README's "Memory").
    reduce_bucket_size: PositiveInt | None = Field(
        None,
        description="gradient elements reduced at a time; one buffer of it lives on the device "
        "(larger: fewer, faster collectives; smaller: less memory)",
    )
    allgather_bucket_size: PositiveInt | None = Field(
        None,
        description="ZeRO 1-2: updated parameter elements all-gathered at a time after a step",
    )
    stage3_prefetch_bucket_size: NonNegativeInt | None = Field(
        None,
        description="ZeRO-3: parameter elements fetched ahead of use (overlap vs memory)",
    )
    stage3_max_live_parameters: PositiveInt | None = Field(
        None,
        description="ZeRO-3: gathered parameter elements held at once before release",
    )
    stage3_max_reuse_distance: NonNegativeInt | None = Field(
        None,
        description="ZeRO-3: keep a gathered parameter if it is used again within this many "
        "elements (saves a re-gather, costs memory)",
    )
    stage3_param_persistence_threshold: NonNegativeInt | None = Field(
        None,
        description="ZeRO-3: parameters of at most this many elements stay whole on every rank "
        "(fewer tiny collectives, a little memory)",
    )
    sub_group_size: PositiveInt | None = Field(
        None,
        description="ZeRO-3: parameter elements the optimizer steps at once (the fp32 gradient "
        "copy of the step, and the NVMe swap unit, are this big)",
    )


class CausalLMObjective(_Section):
    type: Literal["causal_lm"] = "causal_lm"
    weight: PositiveFloat = Field(1.0, description="relative share of sequences")


class SpanCorruptionObjective(_Section):
    type: Literal["span_corruption"] = "span_corruption"
    weight: PositiveFloat = Field(1.0, description="relative share of sequences")
    noise_density: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.15, description="share of raw tokens hidden in noise spans (T5: 0.15)"
    )
    mean_noise_span_length: Annotated[float, Field(ge=1)] = Field(
        3.0, description="mean tokens per noise span (T5: 3)"
    )


class PrefixLMObjective(_Section):
    type: Literal["prefix_lm"] = "prefix_lm"
    weight: PositiveFloat = Field(1.0, description="relative share of sequences")


OBJECTIVES = {
    o.model_fields["type"].default: o
    for o in (CausalLMObjective, SpanCorruptionObjective, PrefixLMObjective)
}
ObjectiveConfig = Annotated[
    CausalLMObjective | SpanCorruptionObjective | PrefixLMObjective, Field(discriminator="type")
]


class ObjectiveSection(_Section):
    mixture: list[ObjectiveConfig] | None = Field(
        None,
        description="weighted objectives, each sequence draws one; None: causal_lm for llama, "
        "span_corruption for t5",
    )


class CheckpointConfig(_Section):
    save_every: PositiveInt = Field(1000, description="steps between checkpoints (and at the end)")
    keep_last: PositiveInt = Field(3, description="complete checkpoints kept; older are pruned")
    publish_every: PositiveInt | None = Field(
        None,
        description="steps between publishes of a checkpoint in the transformers format into "
        "<run_dir>/hf/step-N (a multiple of save_every; None: never during training)",
    )
    publish_at_end: bool = Field(
        False, description="publish the final checkpoint into <run_dir>/hf/step-N when done"
    )
    publish_dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="dtype of the published weights"
    )
    verify_checksums: bool = Field(
        True,
        description="record each checkpoint file's sha256 when saving and check them before "
        "resuming, passing over a damaged checkpoint (sizes are always recorded and checked)",
    )


class TrackingConfig(_Section):
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="None: online with WANDB_API_KEY set, else offline"
    )
    project: str = Field("kiln", description="wandb project")
    entity: str | None = Field(None, description="wandb entity (team or user)")
    run_name: str | None = Field(None, description="wandb run name; default the run folder name")


class HealthConfig(_Section):
    """The training-health supervisor (:mod:`trainer.health`): checks every step, agreed by all
    ranks, and what to do about an unhealthy one."""

    enabled: bool = Field(True, description="check every step for non-finite losses and spikes")
    window: Annotated[int, Field(ge=3)] = Field(
        100, description="recent applied steps the spike statistic is taken over"
    )
    spike_threshold: PositiveFloat = Field(
        6.0,
        description="a spike is above median + spike_threshold x 1.4826 x MAD of the window",
    )
    on_nonfinite: Literal["warn", "skip_step", "rollback", "stop"] = Field(
        "skip_step", description="action on a NaN or infinite loss on any rank"
    )
    on_spike: Literal["warn", "skip_step", "rollback", "stop"] = Field(
        "warn", description="action on a loss spike"
    )
    on_grad_norm_spike: Literal["warn", "stop"] = Field(
        "warn",
        description="action on a non-finite or spiking gradient norm (known after the update, "
        "so it cannot be skipped)",
    )
    max_rollbacks: PositiveInt = Field(
        3,
        description="rollbacks allowed within rollback_window steps; one more divergence saves "
        "and ends the run with a report",
    )
    rollback_window: PositiveInt = Field(
        1000, description="steps (by step number) over which max_rollbacks counts rollbacks"
    )
    rollback_lr_scale: Annotated[float, Field(gt=0, le=1)] = Field(
        1.0,
        description="learning-rate factor for the rollback_cooldown_steps steps after a "
        "rollback (1: no cool-down)",
    )
    rollback_cooldown_steps: NonNegativeInt = Field(
        0, description="steps after a rollback trained at rollback_lr_scale x the scheduled rate"
    )
    step_timeout: Annotated[float, Field(ge=0)] | None = Field(
        1800.0,
        description="seconds a training step may make no progress before every rank writes its "
        "Python stacks to <run_dir>/hangs/ and exits (SIGALRM), so that the launcher restarts "
        "the run from its newest checkpoint; the first step of a launch gets 3x; evaluation and "
        "checkpoint saves are not timed; 0 or null: off (trainer.watchdog)",
    )

    @property
    def rolls_back(self) -> bool:
        """Whether an action of this section is ``rollback``."""
        return self.enabled and "rollback" in (self.on_nonfinite, self.on_spike)


class LaunchConfig(_Section):
    nproc_per_node: PositiveInt = Field(1, description="processes per node (one per GPU)")
    nnodes: PositiveInt = Field(1, description="nodes")


@dataclass(frozen=True)
class Derived:
    """What a run derives from its config: one function (:attr:`KilnConfig.derived`) computes it,
    and it is never written back into the user's sections.

    Attributes:
        model: the model section with ``vocab_size`` set: as given, else ``tokenizer.vocab_size``
            rounded up to a multiple of 64 (:func:`pad_vocab`).
        num_sentinels: ``tokenizer.num_sentinels`` as given, else the family's default (T5: 100
            ``<extra_id_N>`` pieces, Llama: 0).
        objectives: ``objective.mixture`` as given, else the family's default objective (causal
            LM for Llama, span corruption for T5).
    """

    model: ModelConfig
    num_sentinels: int
    objectives: tuple[ObjectiveConfig, ...]


class KilnConfig(_Section):
    run_dir: str = Field(
        "runs/default",
        description="checkpoints, metrics, config and wandb: a path or an fsspec URL (s3://...)",
    )
    model: ModelConfigField = Field(
        default_factory=lambda: family(DEFAULT_MODEL_TYPE).config_class()
    )
    objective: ObjectiveSection = Field(default_factory=ObjectiveSection)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)

    @property
    def derived(self) -> Derived:
        """The values this run derives from its config (see :class:`Derived`); computed on each
        access (cheap), never stored into the sections."""
        family_spec = spec(self.model)
        model = self.model
        if model.vocab_size is None:
            model = model.model_copy(update={"vocab_size": pad_vocab(self.tokenizer.vocab_size)})
        sentinels = self.tokenizer.num_sentinels
        mixture = self.objective.mixture
        return Derived(
            model=model,
            num_sentinels=family_spec.default_num_sentinels if sentinels is None else sentinels,
            objectives=tuple(
                mixture if mixture is not None else [OBJECTIVES[family_spec.objectives[0]]()]
            ),
        )

    @model_validator(mode="after")
    def _cross_field_rules(self) -> KilnConfig:
        p, t, m = self.parallel, self.train, self.model
        if p.offload_params and p.zero_stage != 3:
            raise ConfigError(
                f"parallel.offload_params=true needs parallel.zero_stage=3 "
                f"(got {p.zero_stage}); set parallel.zero_stage=3 or offload_params=false"
            )
        self._offload_rules()
        if p.pipeline_stages > 1 and p.zero_stage > 1:
            raise ConfigError(
                f"parallel.pipeline_stages={p.pipeline_stages} cannot run with parallel.zero_stage="
                f"{p.zero_stage}: DeepSpeed's pipeline engine partitions optimizer states (ZeRO "
                f"0 or 1) but not gradients or weights; use parallel.zero_stage=1, or ZeRO 3 "
                f"without a pipeline"
            )
        if p.pipeline_stages > 1 and p.offload_optimizer:
            raise ConfigError(
                "parallel.offload_optimizer=true is not supported with parallel.pipeline_stages "
                "> 1; turn one of them off"
            )
        if t.activation_checkpointing_every > 1:
            if t.activation_checkpointing == "none":
                raise ConfigError(
                    f"train.activation_checkpointing_every={t.activation_checkpointing_every} "
                    f"does nothing with train.activation_checkpointing=none; set "
                    f"activation_checkpointing to full, attention or mlp, or drop the interval"
                )
            if t.activation_checkpointing_every > m.num_blocks:
                raise ConfigError(
                    f"train.activation_checkpointing_every={t.activation_checkpointing_every} "
                    f"exceeds the model's {m.num_blocks} transformer blocks, so no block would "
                    f"be checkpointed; use at most {m.num_blocks}"
                )
        if t.min_lr > t.lr:
            raise ConfigError(f"train.min_lr={t.min_lr} exceeds train.lr={t.lr}; lower min_lr")
        self._objective_rules()
        self._document_rules()
        c = self.checkpoint
        if c.publish_every is not None and c.publish_every % c.save_every:
            raise ConfigError(
                f"checkpoint.publish_every={c.publish_every} is not a multiple of "
                f"checkpoint.save_every={c.save_every}: a publish reads the checkpoint of its "
                f"step; use a multiple of {c.save_every}"
            )
        if m.vocab_size is not None and m.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(
                f"tokenizer.vocab_size={self.tokenizer.vocab_size} is larger than "
                f"model.vocab_size={m.vocab_size}; raise model.vocab_size to at least "
                f"{self.tokenizer.vocab_size} or leave it unset to derive it"
            )
        blocks = m.num_blocks
        if p.pipeline_stages > blocks:
            raise ConfigError(
                f"parallel.pipeline_stages={p.pipeline_stages} exceeds the model's {blocks} "
                f"transformer blocks; use at most {blocks} stages"
            )
        if m.max_seq_len is not None and self.data.seq_len > m.max_seq_len:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_position_embeddings="
                f"{m.max_seq_len}; shorten data.seq_len or raise the limit"
            )
        names = [d.name for d in self.data.datasets]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.datasets names must be unique, got {names}")
        self._rollback_rules()
        return self

    def _rollback_rules(self) -> None:
        """``health.*=rollback`` needs a checkpoint saved before the last step to go back to,
        and the plain engine (the pipeline engine is not reloaded in a running process)."""
        h = self.health
        if not h.rolls_back:
            return
        setting = next(
            f"health.{k}" for k in ("on_nonfinite", "on_spike") if getattr(h, k) == "rollback"
        )
        c, t = self.checkpoint, self.train
        if c.save_every >= t.max_steps:
            raise ConfigError(
                f"{setting}=rollback goes back to the newest checkpoint, but checkpoint."
                f"save_every={c.save_every} with train.max_steps={t.max_steps} saves none before "
                f"the last step; save more often (checkpoint.save_every < {t.max_steps}) or use "
                f"{setting}=skip_step"
            )
        if self.parallel.pipeline_stages > 1:
            raise ConfigError(
                f"{setting}=rollback is not supported with parallel.pipeline_stages="
                f"{self.parallel.pipeline_stages} (the pipeline engine is not reloaded in a "
                f"running process); use {setting}=skip_step or stop"
            )

    def _offload_rules(self) -> None:
        p = self.parallel
        if p.offload_device == "nvme":
            if not (p.offload_optimizer or p.offload_params):
                raise ConfigError(
                    "parallel.offload_device=nvme offloads nothing: set "
                    "parallel.offload_params=true and/or parallel.offload_optimizer=true"
                )
            if p.zero_stage != 3:
                raise ConfigError(
                    f"parallel.offload_device=nvme needs parallel.zero_stage=3 (got "
                    f"{p.zero_stage}): DeepSpeed swaps to NVMe only under ZeRO-3 (ZeRO-Infinity)"
                )
            if not p.nvme_path:
                raise ConfigError(
                    "parallel.offload_device=nvme needs parallel.nvme_path: a folder on a fast "
                    "local disk, e.g. parallel.nvme_path=/local_nvme/kiln"
                )
        elif p.nvme_path is not None:
            raise ConfigError(
                f"parallel.nvme_path={p.nvme_path!r} does nothing with parallel.offload_device="
                f"{p.offload_device}; set parallel.offload_device=nvme or drop nvme_path"
            )

    def _document_rules(self) -> None:
        d = self.data
        if d.reset_position_ids and not d.document_mask:
            raise ConfigError(
                "data.reset_position_ids=true needs data.document_mask=true (positions restart "
                "per document only when attention stops at documents); set "
                "data.document_mask=true or data.reset_position_ids=false"
            )
        if d.reset_position_ids and "position_ids" not in spec(self.model).document_inputs:
            raise ConfigError(
                f"data.reset_position_ids=true does nothing for model.model_type="
                f"{self.model.model_type!r}, whose positions are relative (under "
                f"data.document_mask they already count from each document); set "
                f"data.reset_position_ids=false"
            )

    def _objective_rules(self) -> None:
        m, obj = self.model, self.objective
        if obj.mixture is not None and not obj.mixture:
            raise ConfigError("objective.mixture is empty; name at least one objective")
        derived = self.derived
        allowed = spec(m).objectives
        for i, o in enumerate(derived.objectives):
            if o.type not in allowed:
                raise ConfigError(
                    f"objective.mixture[{i}].type={o.type!r} does not train model.model_type="
                    f"{m.model_type!r}; use one of {list(allowed)}"
                )
            if o.type != "causal_lm" and self.data.seq_len < 2:
                raise ConfigError(
                    f"objective.mixture[{i}].type={o.type!r} splits each sequence into inputs "
                    f"and targets: data.seq_len={self.data.seq_len} must be at least 2"
                )
            if o.type != "span_corruption":
                continue
            n = span_corruption_lengths(
                self.data.seq_len, o.noise_density, o.mean_noise_span_length
            )
            if o.mean_noise_span_length > n.num_noise_tokens:
                raise ConfigError(
                    f"objective.mixture[{i}].mean_noise_span_length={o.mean_noise_span_length} "
                    f"cannot fit: data.seq_len={self.data.seq_len} x noise_density="
                    f"{o.noise_density} gives {n.num_noise_tokens} noise tokens per sequence; "
                    f"lower mean_noise_span_length or raise data.seq_len / noise_density"
                )
            if n.num_noise_spans > derived.num_sentinels:
                raise ConfigError(
                    f"objective.mixture[{i}] makes {n.num_noise_spans} noise spans per sequence "
                    f"of data.seq_len={self.data.seq_len} tokens but tokenizer.num_sentinels="
                    f"{derived.num_sentinels}; raise tokenizer.num_sentinels to at least "
                    f"{n.num_noise_spans}, or raise mean_noise_span_length / shorten seq_len"
                )

    # Paths derived from the config, so that every component agrees on them.
    @property
    def tokenizer_path(self) -> Path:
        if self.tokenizer.path is not None:
            return Path(self.tokenizer.path)
        return Path(self.data.root) / "tokenizer" / "tokenizer.model"

    def dataset_dir(self, name: str) -> Path:
        return Path(self.data.root) / name

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def pad_vocab(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Round ``vocab_size`` up to a multiple of ``multiple`` (Megatron's
    ``make_vocab_size_divisible_by``)."""
    return math.ceil(vocab_size / multiple) * multiple


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> KilnConfig:
    """Resolve preset < YAML < overrides into a validated :class:`KilnConfig`.

    Args:
        path: a YAML experiment file, or None for defaults.
        overrides: ``dotted.key=value`` strings; values are parsed as YAML scalars.

    Raises:
        FileNotFoundError: the YAML file does not exist.
        ConfigError: unknown key, wrong type, bad value or broken cross-field rule.
    """
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    for o in overrides:
        key = o.split("=", 1)[0]
        if "=" not in o or not key or not all(key.split(".")):
            raise ConfigError(
                f"override {o!r} is not dotted.key=value; write it like train.lr=3e-4"
            )
    try:
        base = OmegaConf.load(path) if path is not None else OmegaConf.create({})
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if OmegaConf.is_list(base):
        raise ConfigError(
            f"{path} holds a YAML list, not a mapping of sections (model:, data:, train:, ...); "
            f"see configs/sample.yaml"
        )
    try:
        user = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        tree: dict[str, Any] = OmegaConf.to_container(user, resolve=True) or {}  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse the config ({path}, {list(overrides)}): {e}") from e
    return config_from_dict(tree)


def config_from_dict(tree: dict[str, Any]) -> KilnConfig:
    """Validate a plain nested dict (YAML already merged); the model preset fills unset fields,
    or, with ``model.init_from``, the Hugging Face folder it names (:mod:`trainer.init_from`)."""
    model = tree.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError(f"model must be a mapping, got {model!r}")
    if model.get("init_from") is not None:
        tree = resolve_init_from(tree, model)
        model = tree["model"]
    else:
        model = _apply_preset(model)
    try:
        return KilnConfig.model_validate({**tree, "model": model})
    except ValidationError as e:
        raise ConfigError(_explain(e)) from None


def _apply_preset(model: dict[str, Any]) -> dict[str, Any]:
    model_type = model.get("model_type", DEFAULT_MODEL_TYPE)
    if model_type not in model_types():
        raise ConfigError(
            f"model.model_type={model_type!r} is not a model family; use one of {model_types()}"
        )
    model = {**model, "model_type": model_type}
    presets = family(model_type).presets
    name = model.get("name", "debug")
    if name != "custom":
        if name not in presets:
            raise ConfigError(
                f"model.name={name!r} is not a {model_type} preset; use one of "
                f"{list(presets)} or 'custom'"
            )
        model = {**presets[name]().model_dump(exclude={"vocab_size"}), **model}
    return model


def _keys_at(loc: tuple[Any, ...]) -> list[str]:
    """The field names of the config section at pydantic's error location ``loc`` (the model
    section's location names its family: ``("model", "llama")``); [] where none is known."""
    section: Any = KilnConfig
    for part in loc:
        if isinstance(part, int):  # an item of a list section
            continue
        if part in model_types():
            section = family(part).config_class
            continue
        field = getattr(section, "model_fields", {}).get(part)
        if field is None:
            return []
        section = field.annotation
        args = [a for a in getattr(section, "__args__", ()) if hasattr(a, "model_fields")]
        if args:  # list[X] / X | None: the section class inside
            section = args[0]
    return list(getattr(section, "model_fields", {}))


def _explain(e: ValidationError) -> str:
    lines = ["invalid config:"]
    for err in e.errors():
        where = ".".join(str(x) for x in err["loc"]) or "(root)"
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(err["loc"][-1]), _keys_at(err["loc"][:-1]), 1)
            hint = f"did you mean {close[0]!r}?" if close else "check the spelling"
            lines.append(f"  {where}: unknown key; {hint} (see `kiln train --help`)")
        elif err["type"] == "literal_error":
            lines.append(f"  {where}={err.get('input')!r} is not allowed: {err['msg']}")
        elif err["type"] == "value_error":
            lines.append(f"  {err['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {where}={err.get('input')!r}: {err['msg']}")
    return "\n".join(lines)


@dataclass(frozen=True)
class BatchPlan:
    """Batch arithmetic of one run: micro x accumulation x data-parallel = global."""

    micro_batch_size: int
    gradient_accumulation_steps: int
    data_parallel_size: int
    global_batch_size: int
    seq_len: int
    pipeline_stages: int = 1

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len


def batch_plan(cfg: KilnConfig, world_size: int) -> BatchPlan:
    """Derive the batch arithmetic for ``world_size`` processes: ``parallel.pipeline_stages`` x
    data-parallel ranks.

    ``global_batch_size`` (sequences) is the invariant when given: resuming on another number of
    processes changes ``gradient_accumulation_steps``, not the optimisation.

    Raises:
        ConfigError: the sizes do not divide, or two given sizes disagree.
    """
    t, pp = cfg.train, cfg.parallel.pipeline_stages
    if world_size % pp:
        raise ConfigError(
            f"parallel.pipeline_stages={pp} does not divide the {world_size} processes; the world "
            f"is pipeline_stages x data-parallel ranks, so use a multiple of {pp} processes"
        )
    dp, micro = world_size // pp, t.micro_batch_size
    if t.global_batch_size is None:
        accum = t.gradient_accumulation_steps or 1
        return BatchPlan(micro, accum, dp, micro * accum * dp, cfg.data.seq_len, pp)
    per_micro_step = micro * dp
    if t.global_batch_size % per_micro_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size={micro} x data_parallel_size={dp} = {per_micro_step}; "
            f"use a multiple of {per_micro_step} or change micro_batch_size"
        )
    accum = t.global_batch_size // per_micro_step
    if t.gradient_accumulation_steps not in (None, accum):
        raise ConfigError(
            f"train.gradient_accumulation_steps={t.gradient_accumulation_steps} disagrees with "
            f"train.global_batch_size={t.global_batch_size} / (micro_batch_size={micro} x "
            f"data_parallel_size={dp}) = {accum}; set only one of the two"
        )
    return BatchPlan(micro, accum, dp, t.global_batch_size, cfg.data.seq_len, pp)


def check_paths(cfg: KilnConfig) -> None:
    """Refuse a run whose data cannot exist: every dataset is prepared or has readable sources.

    Raises:
        ConfigError: no datasets, a source path of an unprepared dataset matches nothing, or
            run_dir is a URL no installed filesystem opens (the message names the package).
    """
    try:
        RunFolder(cfg.run_dir).check()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_data_root(cfg)
    if not cfg.data.datasets:
        raise ConfigError("data.datasets is empty; name at least one dataset with its sources")
    for i, ds in enumerate(cfg.data.datasets):
        if (cfg.dataset_dir(ds.name) / "manifest.json").is_file():
            continue
        for j, src in enumerate(ds.sources):
            if not _matches(src.path):
                raise ConfigError(
                    f"data.datasets[{i}].sources[{j}].path={src.path!r} matches no file and "
                    f"dataset {ds.name!r} is not prepared in {cfg.dataset_dir(ds.name)}; "
                    f"fix the path (relative paths start at {Path.cwd()})"
                )
        if not ds.sources:
            raise ConfigError(
                f"data.datasets[{i}] ({ds.name!r}) has no sources and is not prepared"
            )


def check_data_root(cfg: KilnConfig) -> None:
    """Refuse a data root that is the run folder, or a dataset folder (which ``kiln data prepare
    --force`` replaces) that is or holds it: what a command writes must never hold what another
    owns.

    Raises:
        ConfigError: the message names both paths and the fix.
    """
    folder = RunFolder(cfg.run_dir)
    if folder.url is not None:
        return
    run = folder.local.resolve()
    owned = [("data.root", Path(cfg.data.root))]
    owned += [(f"dataset {d.name!r}", cfg.dataset_dir(d.name)) for d in cfg.data.datasets]
    for what, path in owned:
        path = path.resolve()
        if path == run or (what != "data.root" and path in run.parents):
            raise ConfigError(
                f"{what} is {path}, which {'is' if path == run else 'holds'} the run folder "
                f"run_dir={cfg.run_dir!r}: preparing data there would mix the two (and `kiln "
                "data prepare --force` replaces a dataset's folder); give run_dir and data.root "
                "separate folders, e.g. runs/NAME and data/"
            )


def _matches(pattern: str) -> bool:
    p = Path(pattern)
    if p.exists():
        return True
    anchor = Path(p.anchor) if p.is_absolute() else Path(".")
    rel = str(p.relative_to(p.anchor)) if p.is_absolute() else pattern
    return any(anchor.glob(rel))


def check_device(train: TrainConfig, *, cuda_available: bool) -> None:
    """Refuse settings this machine cannot run (before any process starts).

    Raises:
        ConfigError: fp16 without a GPU (DeepSpeed's CPU accelerator has no fp16 support).
    """
    if train.precision == "fp16" and not cuda_available:
        raise ConfigError(
            "train.precision=fp16 needs a CUDA GPU (DeepSpeed's CPU accelerator has no fp16); "
            "use train.precision=bf16 or fp32 on CPU"
        )
