"""Pipeline parallelism: the cut's layers, applied in sequence, compute the plain model's logits
and gradients; through `kiln train` and its loop in-process (DeepSpeed's pipeline engine, gloo,
CPU): a 2-stage pipeline trains exactly as the plain model on the same batches and weights, for
both families; 2 stages x 2 data-parallel ranks (4 processes) train; pipeline checkpoints resume
exactly and consolidate into the plain model's weights; bad layouts are refused before any
process starts."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    T5_SENTINELS,
    kiln_in_process,
    step_losses,
    step_sample_ids,
    train,
    train_config,
)
from deepspeed.pipe import TiedLayerSpec
from distributed import RankError, run_distributed, train_runs
from safetensors.torch import load_file
from test_train_distributed import STAGE_TOLERANCE, continue_from

from model import build_model
from model.llama import LlamaConfig
from model.t5 import T5Config
from trainer.checkpoint import latest_checkpoint, load_model_weights
from trainer.config import ConfigError, batch_plan, load_config
from trainer.pipeline import key_map, layer_specs


def pipeline_layers(specs: list, device: str | None = None) -> list:
    """``specs``' layers as DeepSpeed's `PipelineModule` builds them on a stage holding them all:
    a tied module built once per key, a later use of it calling its ``forward_fn`` on it; then,
    as the `PipelineModule` does, moved to ``device`` (None: left where the model is)."""
    tied: dict[str, torch.nn.Module] = {}
    modules, layers = [], []
    for spec in specs:
        if not isinstance(spec, TiedLayerSpec):
            modules.append(spec.build())
            layers.append(modules[-1])
            continue
        if spec.key not in tied:
            tied[spec.key] = spec.build()
            modules.append(tied[spec.key])
        module = tied[spec.key]
        layers.append(module if spec.forward_fn is None else partial(spec.forward_fn, module))
    for module in modules if device else []:
        module.to(device)
    return layers


def run_layers(layers: list, inputs):
    """The layers applied in sequence; what goes between them is a tensor or a tuple whose
    floating tensors all carry gradients (DeepSpeed runs backward on each of them)."""
    x = inputs
    for layer in layers:
        x = layer(x)
        outs = x if isinstance(x, tuple) else (x,)
        assert all(t.requires_grad for t in outs if t is not None and t.is_floating_point())
    return x


LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
             initializer_range=0.2)  # fmt: skip
T5 = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
          num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
          dropout_rate=0.1)  # fmt: skip


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("case", ["llama", "t5-no-mask", "t5-padded"])
def test_pipeline_layers_compute_the_plain_forward(case, tie):
    """Logits and every parameter's gradient, in training mode (T5's dropout draws the same
    masks in the same order from the same seed), equal the plain model's."""
    gen = torch.Generator().manual_seed(0)
    B, S, T = 2, 12, 9
    if case == "llama":
        cfg = LlamaConfig(**LLAMA, tie_word_embeddings=tie)
        ids = torch.randint(0, 64, (B, T), generator=gen)
        kwargs, pipe_inputs = {"input_ids": ids}, ids
    else:
        cfg = T5Config(**T5, tie_word_embeddings=tie)
        ids = torch.randint(0, 64, (B, S), generator=gen)
        dec = torch.randint(0, 64, (B, T), generator=gen)
        mask = None
        if case == "t5-padded":
            mask = torch.ones(B, S, dtype=torch.long)
            mask[1, 7:] = 0
        kwargs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}
        pipe_inputs = (ids, mask, dec)
    labels = torch.randint(0, 64, (B, T), generator=gen)
    model = build_model(cfg, seed=0).train()
    params = dict(model.named_parameters())  # a tied head's weight once

    def logits_and_grads(forward):
        torch.manual_seed(1)
        logits = forward()
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        grads = torch.autograd.grad(loss, list(params.values()))
        return logits, dict(zip(params, grads, strict=True))

    want, want_grads = logits_and_grads(lambda: model(**kwargs))
    got, got_grads = logits_and_grads(
        lambda: run_layers(pipeline_layers(layer_specs(model)), pipe_inputs)
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for name in params:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_pipeline_layers_read_only_what_they_hold(tie):
    """A stage moves only its layers to its device, the rest of the plain model stays on the
    CPU: moved to the meta device, the layers still run (a piece reading any other tensor of
    the model, such as the model's own RoPE tables, would mix devices and fail)."""
    ids = torch.zeros(2, 5, dtype=torch.long, device="meta")
    for cfg, inputs in (
        (LlamaConfig(**LLAMA, tie_word_embeddings=tie), ids),
        (T5Config(**T5, tie_word_embeddings=tie), (ids, torch.ones_like(ids), ids[:, :3])),
    ):
        model = build_model(cfg, seed=0)
        logits = run_layers(pipeline_layers(layer_specs(model), "meta"), inputs)
        assert logits.device.type == "meta" and logits.shape[-1] == 64


# Same weights, same micro-batches, same accumulation order, fp32: the pipeline only moves the
# activations between processes, so the losses come out bit-identical here (0.0 measured); the
# bound leaves room for a different reduction order in another build.
PIPELINE_TOLERANCE = 1e-6


def t5(**sections):
    return dict(model__model_type="t5", tokenizer__num_sentinels=T5_SENTINELS, **sections)


@pytest.fixture
def runs(pipeline_runs) -> dict[str, Path]:
    return pipeline_runs


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_two_stages_train_as_the_plain_model(runs, family):
    plain, pipe = step_losses(runs[f"{family}-plain"]), step_losses(runs[f"{family}-pipe"])
    assert sorted(pipe) == [1, 2, 3, 4, 5, 6]
    assert pipe[6] < pipe[1]
    for s in range(1, 7):
        assert pipe[s] == pytest.approx(plain[s], abs=PIPELINE_TOLERANCE), (s, pipe[s], plain[s])
    assert step_sample_ids(runs[f"{family}-pipe"]) == step_sample_ids(runs[f"{family}-plain"])


# Weights after 6 AdamW steps. The decoder's pipeline computes exactly what the plain model does
# (measured: bit-identical weights). T5's shared embedding is used on both stages: its gradient
# is the encoder's part (stage 0) plus the decoder's (stage 1) summed by DeepSpeed's tied-weight
# all-reduce, in another order than autograd's accumulation in one process; Adam's 1/sqrt(v)
# magnifies that float32 rounding to ~1e-5 in a few weights (measured max 1e-5; most < 5e-7).
WEIGHT_TOLERANCE = {"llama": 0.0, "t5": 5e-5}


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_consolidated_pipeline_checkpoint_equals_the_plain_model(runs, family, tmp_path):
    pipe_ckpt = latest_checkpoint(runs[f"{family}-pipe"])
    assert (pipe_ckpt / "layer_00-model_states.pt").is_file()
    want = load_model_weights(latest_checkpoint(runs[f"{family}-plain"]))
    got = load_model_weights(pipe_ckpt)
    assert set(got) == set(want)
    atol = WEIGHT_TOLERANCE[family]
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=atol, msg=k)
    out = tmp_path / "model.safetensors"
    result = kiln_in_process(
        "checkpoint", "consolidate", str(runs[f"{family}-pipe"]), "--out", str(out)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(torch.equal(v, got[k]) for k, v in load_file(out).items())


def test_pipeline_resume_is_exact(runs, prepared_data, tmp_path):
    """The training loop in-process on 2 ranks (the pipeline's `kiln train` launch is the 2 x 2
    test's)."""
    reference = runs["llama-pipe"]
    config = train_config(
        tmp_path, prepared_data, parallel__zero_stage=1, parallel__pipeline_stages=2
    )
    run = continue_from(reference, 3, tmp_path)
    run_distributed(train_runs, 2, config)
    want, got = step_losses(reference), step_losses(run)
    assert sorted(got) == [4, 5, 6]
    for s in (4, 5, 6):
        assert got[s] == pytest.approx(want[s], abs=1e-6), (s, got[s], want[s])
    # another layout is refused with what to run instead
    refused = (config, "parallel.pipeline_stages=1", "train.max_steps=7")
    with pytest.raises(RankError) as e:
        run_distributed(train_runs, 1, refused)
    assert "resumes on the same layout: run with parallel.pipeline_stages=2" in str(e.value)


@pytest.mark.slow  # trains through `kiln train`
def test_two_stages_by_two_data_parallel_ranks(runs, prepared_data, tmp_path):
    """4 processes: 2 pipeline stages x 2 data-parallel replicas. The global batch is the same
    8 sequences, split over the replicas instead of accumulated, so losses agree with the plain
    run up to the reduction order."""
    config = train_config(
        tmp_path,
        prepared_data,
        parallel__zero_stage=1,
        parallel__pipeline_stages=2,
        train__max_steps=3,
        checkpoint__save_every=1000,
    )
    losses, plain = step_losses(train(config, nproc=4)), step_losses(runs["llama-plain"])
    assert sorted(losses) == [1, 2, 3]
    for s in (1, 2, 3):
        assert losses[s] == pytest.approx(plain[s], abs=STAGE_TOLERANCE), (s, losses[s])


def test_tied_head_across_stages(runs):
    """A tied decoder head lives on the last stage and shares the first stage's embedding
    (DeepSpeed all-reduces the tied weight's gradient): same losses as the plain tied model."""
    losses = {name: step_losses(runs[f"llama-tied-{name}"]) for name in ("plain", "pipe")}
    assert sorted(losses["pipe"]) == [1, 2, 3]
    for s in (1, 2, 3):
        assert losses["pipe"][s] == pytest.approx(losses["plain"][s], abs=PIPELINE_TOLERANCE)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["parallel.pipeline_stages=2", "parallel.zero_stage=2"], "cannot run with"),
        (["parallel.pipeline_stages=2", "parallel.zero_stage=3"], "ZeRO 3 without a pipeline"),
        (["parallel.pipeline_stages=3"], "exceeds the model's 2 transformer blocks"),
        (["parallel.pipeline_stages=2", "parallel.offload_optimizer=true"], "offload_optimizer"),
        (["model.model_type=t5", "parallel.pipeline_stages=5"], "model's 4 transformer blocks"),
    ],
)
def test_bad_pipeline_configs_are_refused(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, ["model.name=debug", *overrides])


def test_stage_count_must_divide_the_world():
    cfg = load_config(None, ["parallel.pipeline_stages=2", "train.micro_batch_size=1"])
    assert batch_plan(cfg, 4).data_parallel_size == 2
    with pytest.raises(ConfigError, match="does not divide the 3 processes"):
        batch_plan(cfg, 3)
    layout = ["parallel.pipeline_stages=2", "parallel.zero_stage=1", "--nproc", "3"]
    result = kiln_in_process("train", "configs/sample.yaml", *layout, "--dry-run")
    assert result.returncode != 0 and "does not divide the 3 processes" in result.stderr


@pytest.mark.parametrize("tie", [False, True])
def test_key_map_covers_every_weight(tie):
    from model import spec

    for cfg in (
        LlamaConfig(vocab_size=64, tie_word_embeddings=tie),
        T5Config(vocab_size=64, tie_word_embeddings=tie),
    ):
        with torch.device("meta"):
            keys = set(spec(cfg).model_class(cfg).state_dict())
        mapping = key_map(cfg)
        assert set(mapping) == keys
        targets = list(mapping.values())
        assert len(set(targets)) == len(targets) - int(tie)  # only a tied head shares a slot


@pytest.mark.parametrize("tie", [False, True])
def test_layer_files_keep_their_layout(tie):
    """The keys of each `layer_XX-model_states.pt` as pipeline checkpoints have always had them
    (a tied head is saved with the embedding in layer 0), so older checkpoints consolidate."""
    cfg = LlamaConfig(vocab_size=64, num_hidden_layers=3, tie_word_embeddings=tie)
    got = key_map(cfg)
    assert got["embed_tokens.weight"] == (0, "embed_tokens.weight")
    assert got["layers.1.self_attn.q_proj.weight"] == (2, "self_attn.q_proj.weight")
    assert got["layers.2.mlp.down_proj.weight"] == (3, "mlp.down_proj.weight")
    assert got["norm.weight"] == (4, "norm.weight")
    assert got["lm_head.weight"] == ((0, "embed_tokens.weight") if tie else (5, "lm_head.weight"))
    cfg = T5Config(vocab_size=64, num_layers=2, num_decoder_layers=3, tie_word_embeddings=tie)
    got, bias = key_map(cfg), "relative_attention_bias.embedding.weight"
    assert got["shared.weight"] == (0, "shared.weight")
    assert got[f"encoder.{bias}"] == (1, bias)
    assert got["encoder.layers.1.mlp.up_proj.weight"] == (3, "mlp.up_proj.weight")
    assert got["encoder.final_layer_norm.weight"] == (4, "final_layer_norm.weight")
    assert got[f"decoder.{bias}"] == (6, bias)  # layer 5 is the decoder's use of `shared`
    assert got["decoder.layers.0.cross_attn.k_proj.weight"] == (7, "cross_attn.k_proj.weight")
    assert got["decoder.final_layer_norm.weight"] == (10, "final_layer_norm.weight")
    assert got["lm_head.weight"] == ((0, "shared.weight") if tie else (11, "lm_head.weight"))


# -- the planner's view of the stages --------------------------------------------------------------
PARTITIONS = [
    ["model.name=debug", "parallel.pipeline_partition=parameters"],
    ["model.name=debug", "model.tie_word_embeddings=false", "parallel.pipeline_partition=blocks"],
    ["model.model_type=t5", "model.name=debug", "parallel.pipeline_partition=parameters"],
    ["model.model_type=t5", "model.name=debug", "parallel.pipeline_partition=uniform"],
]


def _stage_held(overrides: list[str]) -> tuple[int, int, int]:
    """This rank's pipeline stage as trainer.main builds it: (stage id, distinct parameter
    elements it holds, transformer blocks among its layers)."""
    import deepspeed

    from trainer import distributed
    from trainer.construct import build_for_layout
    from trainer.pipeline import PipeBlock

    world = distributed.init_distributed()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    cfg = load_config(None, [*overrides, "parallel.pipeline_stages=2"])
    module, _ = build_for_layout(cfg, batch_plan(cfg, world.world_size))
    held = {id(p): p.numel() for p in module.parameters()}
    blocks = sum(isinstance(m, PipeBlock) for m in module.modules())
    return module.stage_id, sum(held.values()), blocks


@pytest.mark.slow
@pytest.mark.parametrize("overrides", PARTITIONS, ids=["llama", "llama-blocks", "t5", "t5-uniform"])
def test_stage_shapes_are_the_stages_deepspeed_builds(overrides):
    """The planner's stages (trainer.pipeline.stage_shapes, computed on the meta device) hold the
    parameters and blocks of the stages DeepSpeed's PipelineModule builds on 2 processes, for
    each partition method; T5's decoder stage holds more than its encoder stage (cross-attention)
    and the estimate is that stage's."""
    from trainer.estimate import memory_estimate
    from trainer.pipeline import stage_shapes

    cfg = load_config(None, [*overrides, "parallel.pipeline_stages=2"])
    shapes = stage_shapes(cfg)
    built = sorted(run_distributed(_stage_held, 2, overrides))
    assert [(s.parameters, len(s.blocks)) for s in shapes] == [b[1:] for b in built]
    assert [s.has_head for s in shapes] == [False, True]
    assert sorted(i for s in shapes for i in s.blocks) == list(range(cfg.derived.model.num_blocks))
    est = memory_estimate(cfg, batch_plan(cfg, 2))
    worst = max(range(2), key=lambda s: shapes[s].parameters)
    if cfg.derived.model.model_type == "t5" and "uniform" not in overrides[-1]:
        assert shapes[1].parameters > shapes[0].parameters
        assert est.stage == worst == 1
    assert est.parameters == 4 * shapes[est.stage].parameters  # fp32, ZeRO-0


def _gradient_all_reduces(stages: int, all_reduce: bool | None) -> tuple[int, list[float]]:
    """Two ZeRO-0 steps of the debug decoder on this rank (``stages`` pipeline stages, one
    data-parallel rank) through the engine `trainer.engine.build_engine` gives; ``all_reduce``
    None leaves DeepSpeed's gradient all-reduce as Kiln sets it, True turns it back on. Returns
    how often DeepSpeed flattened the gradients for the all-reduce and the step losses."""
    import deepspeed

    from trainer import distributed
    from trainer.construct import build_for_layout
    from trainer.engine import build_engine
    from trainer.objectives import token_loss
    from trainer.pipeline import first_stage_inputs

    world = distributed.init_distributed()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    overrides = ["model.name=debug", "tokenizer.vocab_size=512", "parallel.zero_stage=0"]
    overrides += ["data.seq_len=16", "train.micro_batch_size=1", "train.global_batch_size=2"]
    cfg = load_config(None, [*overrides, f"parallel.pipeline_stages={stages}"])
    plan = batch_plan(cfg, world.world_size)
    model, _ = build_for_layout(cfg, plan)
    engine = build_engine(cfg, model, plan)
    if all_reduce:
        engine.pipeline_enable_backward_allreduce = engine.enable_backward_allreduce = True
    calls, flatten = [], engine.buffered_allreduce_fallback
    engine.buffered_allreduce_fallback = lambda *a, **k: calls.append(1) or flatten(*a, **k)
    ids = torch.randint(0, 512, (4, 2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(2):
        micro = [ids[2 * step + m] for m in range(2)]
        if stages > 1:
            pipe_inputs = [first_stage_inputs(cfg.derived.model, {"input_ids": x}) for x in micro]
            engine.train_batch(iter(list(zip(pipe_inputs, micro, strict=True))))
            losses.append(engine.dp_group_loss.item())
            continue
        total = 0.0
        for x in micro:
            loss = token_loss(engine(input_ids=x), x)
            engine.backward(loss)
            engine.step()
            total += loss.item() / 2
        losses.append(total)
    return len(calls), losses


@pytest.mark.slow
@pytest.mark.parametrize("stages", [1, 2], ids=["one-process", "two-stages"])
def test_one_data_parallel_rank_skips_deepspeeds_gradient_all_reduce(stages):
    """ZeRO-0 over one data-parallel rank (one process, or a pipeline of one rank per stage):
    DeepSpeed would flatten every gradient into an all-reduce bucket and copy it back at each
    step (4 bytes a parameter in fp32, for nothing); Kiln turns that off, and the losses are
    those of the run with it on, bit for bit."""
    (skipped, losses), *_ = run_distributed(_gradient_all_reduces, stages, stages, None)
    (done, reference), *_ = run_distributed(_gradient_all_reduces, stages, stages, True)
    assert done > 0 and skipped == 0
    assert losses == reference and losses[1] != losses[0]
