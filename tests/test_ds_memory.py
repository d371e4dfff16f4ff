"""DeepSpeed's memory settings (derived, overridable, reaching the engine), NVMe offload's
pre-flight and config rules, and the planner counting DeepSpeed's buffers and host memory."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from launcher.cli import cli
from launcher.preflight import check_nvme_offload, device_memory_warning, host_memory_warning
from launcher.report import plan_report
from tests.distributed import run_distributed
from trainer.config import ConfigError, batch_plan, load_config
from trainer.engine import deepspeed_config
from trainer.estimate import ds_memory_settings, memory_estimate, model_shape

NVME = [
    "parallel.zero_stage=3",
    "parallel.offload_params=true",
    "parallel.offload_optimizer=true",
    "parallel.offload_device=nvme",
]


def cfg_with(*overrides):
    return load_config(None, ["tokenizer.vocab_size=512", *overrides])


def aio_buildable() -> bool:
    from deepspeed.ops.op_builder import AsyncIOBuilder

    return AsyncIOBuilder().is_compatible(verbose=False)


def test_derived_settings_follow_the_model_and_reach_deepspeeds_config():
    cfg = cfg_with("model.name=125m", "parallel.zero_stage=3")
    shape = model_shape(cfg)
    assert shape.d_model == 768
    assert shape.largest_tensor == 2048 * 768  # an MLP weight: the 512 x 768 table is smaller
    zero = deepspeed_config(cfg, batch_plan(cfg, 2), on_gpu=False)["zero_optimization"]
    window = 2 * shape.block_parameters  # two blocks outweigh the 512 x 768 table
    assert zero["reduce_bucket_size"] == 768**2
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 768**2)
    assert zero["stage3_param_persistence_threshold"] == 10 * 768
    assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == window
    assert zero["sub_group_size"] == shape.block_parameters
    assert 10e6 < window < 20e6  # a 125m block is ~7M parameters: far below DeepSpeed's 1e9
    zero2 = deepspeed_config(cfg_with("parallel.zero_stage=2"), batch_plan(cfg, 2), on_gpu=False)
    keys = set(zero2["zero_optimization"])
    assert {"reduce_bucket_size", "allgather_bucket_size"} <= keys
    assert not any(k.startswith("stage3_") for k in keys)  # DeepSpeed ignores them below 3


def test_an_override_wins_over_the_derived_setting():
    cfg = cfg_with(
        "parallel.zero_stage=3",
        "parallel.stage3_max_live_parameters=123456",
        "parallel.reduce_bucket_size=5000",
    )
    settings = ds_memory_settings(cfg)
    assert settings.given == ("reduce_bucket_size", "stage3_max_live_parameters")
    zero = deepspeed_config(cfg, batch_plan(cfg, 2), on_gpu=False)["zero_optimization"]
    assert zero["stage3_max_live_parameters"] == 123456 and zero["reduce_bucket_size"] == 5000
    assert (
        zero["stage3_max_reuse_distance"]
        == ds_memory_settings(cfg_with()).stage3_max_reuse_distance
    )
    with pytest.raises(ConfigError, match="reduce_bucket_size"):
        cfg_with("parallel.reduce_bucket_size=0")


def _engine_settings(overrides):
    from model import build_model
    from trainer.engine import build_engine

    cfg = cfg_with(*overrides)
    engine = build_engine(cfg, build_model(cfg.derived.model, seed=0), batch_plan(cfg, 1))
    return {
        "reduce_bucket_size": engine.optimizer.reduce_bucket_size,
        "prefetch": engine.zero_prefetch_bucket_size(),
        "max_live": engine.zero_max_live_parameters(),
        "persistence": engine.zero_param_persistence_threshold(),
        "sub_group_size": engine.zero_sub_group_size(),
    }


def test_the_settings_reach_deepspeeds_zero3_optimizer():
    overrides = ["parallel.zero_stage=3", "parallel.stage3_max_live_parameters=777777"]
    (got,) = run_distributed(_engine_settings, 1, overrides)
    want = ds_memory_settings(cfg_with(*overrides))
    assert got == {
        "reduce_bucket_size": want.reduce_bucket_size,
        "prefetch": want.stage3_prefetch_bucket_size,
        "max_live": 777777,
        "persistence": want.stage3_param_persistence_threshold,
        "sub_group_size": want.sub_group_size,
    }


def test_old_offload_booleans_keep_offloading_to_host_memory():
    cfg = cfg_with("parallel.zero_stage=3", "parallel.offload_optimizer=true")
    zero = deepspeed_config(cfg, batch_plan(cfg, 2), on_gpu=True)["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert "offload_param" not in zero


def test_nvme_offload_reaches_deepspeed_with_its_path():
    cfg = cfg_with(*NVME, "parallel.nvme_path=/local/nvme")
    ds = deepspeed_config(cfg, batch_plan(cfg, 2), on_gpu=True)
    zero = ds["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "nvme"
    assert zero["offload_optimizer"]["nvme_path"] == "/local/nvme"
    assert zero["offload_param"]["device"] == "nvme"
    assert zero["offload_param"]["buffer_size"] >= model_shape(cfg).largest_tensor
    assert "aio" in ds


def test_the_largest_tensor_is_the_models_largest_parameter():
    """DeepSpeed refuses an NVMe parameter buffer smaller than a parameter; with a small
    vocabulary the largest is an MLP weight, not the embedding table."""
    import torch

    from model.registry import spec

    for overrides in (["model.name=125m"], ["model.model_type=t5", "model.name=small"]):
        cfg = cfg_with(*overrides)
        m = cfg.derived.model
        with torch.device("meta"):
            model = spec(m).model_class(m)
        largest = max(p.numel() for p in model.parameters())
        shape = model_shape(cfg)
        assert shape.largest_tensor == largest > m.vocab_size * shape.d_model  # the table


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (NVME, "needs parallel.nvme_path"),
        (
            ["parallel.offload_device=nvme", "parallel.nvme_path=/x"],
            "offloads nothing: set parallel.offload_params=true",
        ),
        (
            [
                "parallel.zero_stage=2",
                "parallel.offload_optimizer=true",
                "parallel.offload_device=nvme",
                "parallel.nvme_path=/x",
            ],
            "needs parallel.zero_stage=3",
        ),
        (["parallel.nvme_path=/x"], "does nothing with parallel.offload_device=cpu"),
        (["parallel.offload_device=disk"], "offload_device='disk' is not allowed"),
    ],
)
def test_nvme_config_rules(overrides, says):
    with pytest.raises(ConfigError, match=says):
        cfg_with(*overrides)


def test_nvme_refused_where_deepspeeds_aio_op_cannot_be_built(tmp_path):
    cfg = cfg_with(*NVME, f"parallel.nvme_path={tmp_path}")
    if aio_buildable():  # this machine has libaio-dev: the real check lets it through
        check_nvme_offload(cfg)
    else:
        with pytest.raises(ConfigError, match="apt-get install libaio-dev"):
            check_nvme_offload(cfg)
    check_nvme_offload(cfg_with())  # nothing to check without NVMe offload

    class Unbuildable:
        def is_compatible(self, verbose=False):
            return False

    with pytest.raises(ConfigError, match="offload_device=nvme needs DeepSpeed's async I/O"):
        check_nvme_offload(cfg, Unbuildable())


@pytest.mark.skipif(aio_buildable(), reason="libaio-dev is installed: nvme is not refused here")
def test_kiln_train_refuses_nvme_before_any_process_starts(tmp_path):
    config = tmp_path / "nvme.yaml"
    config.write_text(f"data:\n  datasets: [{{name: d, sources: [{{path: {__file__}}}]}}]\n")
    args = ["train", str(config), *NVME, f"parallel.nvme_path={tmp_path}"]
    result = CliRunner().invoke(cli, [*args, f"run_dir={tmp_path / 'run'}", "--nproc", "2"])
    assert result.exit_code == 1
    assert "libaio-dev" in result.output
    assert not (tmp_path / "run").exists()


def test_the_estimate_counts_deepspeeds_buffers():
    base = ["model.name=125m", "parallel.zero_stage=3", "data.seq_len=128"]
    cfg = cfg_with(*base)
    plan = batch_plan(cfg, 2)
    est = memory_estimate(cfg, plan)
    shape, settings = model_shape(cfg), ds_memory_settings(cfg)
    gathered = settings.stage3_max_live_parameters + shape.largest_tensor
    step_copy = settings.sub_group_size  # fp32 gradient copy of one optimizer sub-group
    persistent = 3 * shape.num_blocks * shape.d_model
    full_grad = shape.largest_tensor  # autograd's gradient of the gathered table, unreduced
    want = 4 * (settings.reduce_bucket_size + gathered + persistent + full_grad)
    assert est.buffers == pytest.approx(want)
    # the optimizer step comes after backward freed the activations and gathered parameters
    step = 4 * (settings.reduce_bucket_size + persistent + step_copy)  # fused AdamW: in place
    assert est.step_buffers == pytest.approx(step)
    assert est.total == pytest.approx(
        est.parameters + est.gradients + est.optimizer_states + max(est.activations + want, step)
    )
    bigger = memory_estimate(cfg_with(*base, "parallel.reduce_bucket_size=100000000"), plan)
    assert bigger.buffers - est.buffers == pytest.approx(4 * (1e8 - settings.reduce_bucket_size))
    # DeepSpeed's own defaults would plan 5e8-element buckets and 1e9 live parameters
    defaults = cfg_with(
        *base,
        "parallel.reduce_bucket_size=500000000",
        "parallel.stage3_max_live_parameters=1000000000",
    )
    assert memory_estimate(defaults, plan).buffers > 2 * 2**30 > est.buffers


def test_zero0_plans_the_all_reduce_bucket_only_across_data_parallel_ranks():
    """Over one data-parallel rank Kiln turns DeepSpeed's gradient all-reduce off (tested in
    test_pipeline.py), so ZeRO-0 plans its bucket, the flattened gradients, only with more."""
    cfg = cfg_with("model.name=125m", "parallel.zero_stage=0")
    psi = model_shape(cfg).parameters
    assert memory_estimate(cfg, batch_plan(cfg, 1)).buffers == 0
    assert memory_estimate(cfg, batch_plan(cfg, 2)).buffers == pytest.approx(4 * psi)
    pipe = cfg_with("model.name=125m", "parallel.zero_stage=0", "parallel.pipeline_stages=2")
    assert memory_estimate(pipe, batch_plan(pipe, 2)).buffers == 0


def test_the_estimate_counts_host_memory_per_node():
    gpu = cfg_with("model.name=125m", "parallel.zero_stage=3", "launch.nproc_per_node=8")
    plan = batch_plan(gpu, 8)
    on_device = memory_estimate(gpu, plan, on_gpu=True)
    assert on_device.ranks_per_node == 8 and on_device.host_offload == 0
    assert on_device.host_per_node == pytest.approx(8 * on_device.host_per_rank)
    offload = cfg_with(
        "model.name=125m",
        "parallel.zero_stage=3",
        "parallel.offload_optimizer=true",
        "parallel.offload_params=true",
    )
    est = memory_estimate(offload, plan, on_gpu=True)
    psi = model_shape(offload).parameters
    assert est.optimizer_states == est.parameters == est.gradients == 0  # all on the host
    # moments, the fp32 master (a copy in fp32 training too), fp32 grads, weights
    assert est.host_offload == pytest.approx((8 + 4 + 4 + 4) * psi / 8)
    assert est.host_per_rank > on_device.host_per_rank
    nvme = memory_estimate(cfg_with(*NVME, "parallel.nvme_path=/x"), batch_plan(gpu, 2))
    assert nvme.host_offload == 0 and nvme.nvme > 0 and nvme.host_swap > 0
    # zero.Init swaps the partitions out through 5 parameter buffers (measured on a 1-block
    # 1b-wide model: 1.82 GiB at construction against 0.98 planned before they were counted)
    nvme_cfg = cfg_with(*NVME, "parallel.nvme_path=/x")
    settings, shape = ds_memory_settings(nvme_cfg), model_shape(nvme_cfg)
    e = 4 if nvme_cfg.train.precision == "fp32" else 2
    swap_buffers = 5 * settings.param_swap_buffer_size * e
    assert nvme.construction == swap_buffers + 4 * shape.largest_tensor
    assert nvme.engine_build >= nvme.host_swap


def test_a_plan_larger_than_the_node_is_warned_about():
    """`kiln train` warns before starting when the planned host memory of the node (its ranks
    and their data workers) exceeds the machine's, and names the way out."""
    cfg = cfg_with("model.name=1b", "parallel.zero_stage=3", "data.seq_len=128")
    plan = batch_plan(cfg, 2)
    need = memory_estimate(cfg, plan).host_per_node
    assert host_memory_warning(cfg, plan, on_gpu=False, node_bytes=int(need) + 1) is None
    text = host_memory_warning(cfg, plan, on_gpu=False, node_bytes=int(need) - 2**30)
    assert f"needs {need / 2**30:.1f} GiB of host memory" in text
    assert "killed for memory" in text and "--dry-run" in text and "offload_device=nvme" in text


def test_a_plan_larger_than_the_gpu_is_warned_about():
    """On a GPU node `kiln train` also compares a rank's planned device memory with the GPU's:
    the 13b preset on 8 GPUs under ZeRO-1 does not fit an 80 GB card; under ZeRO-3 it does."""
    node = [
        "model.name=13b",
        "train.precision=bf16",
        "data.seq_len=2048",
        "launch.nproc_per_node=8",
        "train.micro_batch_size=1",
        "train.global_batch_size=8",
    ]
    h100 = 80 * 10**9
    zero1 = cfg_with(*node, "parallel.zero_stage=1")
    need = memory_estimate(zero1, batch_plan(zero1, 8), on_gpu=True).total
    text = device_memory_warning(zero1, batch_plan(zero1, 8), device_bytes=h100)
    assert need > h100 and f"needs {need / 2**30:.1f} GiB of GPU memory per rank" in text
    assert "run out of memory" in text and "parallel.zero_stage" in text
    zero3 = cfg_with(*node, "parallel.zero_stage=3")
    assert device_memory_warning(zero3, batch_plan(zero3, 8), device_bytes=h100) is None


def test_dry_run_report_shows_buffers_settings_and_host_memory():
    cfg = cfg_with("model.name=125m", "parallel.zero_stage=3", "parallel.sub_group_size=1000")
    text = plan_report(cfg, batch_plan(cfg, 2))
    assert "DeepSpeed buffers:" in text
    assert "host memory per node" in text
    assert "engine build:" in text
    assert "sub_group_size=1,000 (set)" in text
    assert f"reduce_bucket_size={768**2:,} (derived)" in text


@pytest.mark.parametrize(
    "overrides",
    [
        ["parallel.zero_stage=1"],
        ["parallel.zero_stage=2", "parallel.offload_optimizer=true"],
        ["parallel.zero_stage=3", "parallel.offload_params=true"],
        [*NVME, "parallel.nvme_path=/local/nvme"],
    ],
)
def test_deepspeed_parses_the_zero_section(overrides):
    """DeepSpeed's own config model (unknown keys forbidden) reads back what Kiln wrote."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    cfg = cfg_with("model.name=125m", *overrides)
    zero = deepspeed_config(cfg, batch_plan(cfg, 2), on_gpu=False)["zero_optimization"]
    parsed = DeepSpeedZeroConfig(**zero)
    settings = ds_memory_settings(cfg)
    assert parsed.reduce_bucket_size == settings.reduce_bucket_size
    if cfg.parallel.zero_stage == 3:
        assert parsed.max_live_parameters == settings.stage3_max_live_parameters
        assert parsed.prefetch_bucket_size == settings.stage3_prefetch_bucket_size
        assert parsed.param_persistence_threshold == settings.stage3_param_persistence_threshold
        assert parsed.sub_group_size == settings.sub_group_size
    else:
        assert parsed.allgather_bucket_size == settings.allgather_bucket_size
    if cfg.parallel.offload_device == "nvme":
        assert parsed.offload_param.buffer_size == settings.param_swap_buffer_size
        assert parsed.offload_param.max_in_cpu == settings.stage3_max_live_parameters
        assert str(parsed.offload_optimizer.nvme_path) == "/local/nvme"


SMALL = ["model.name=debug", "model.hidden_size=256", "model.intermediate_size=704"]


def _held_after_initialize(overrides):
    """Build the engine on this rank as trainer.main does; return the bytes of the distinct
    storages DeepSpeed's ZeRO optimizer holds (flat weights, fp32 master partitions, gradient
    partitions), of its flat weights alone, and of the largest tensor it gathered whole while
    it built (``all_gather_into_tensor``'s output)."""
    import deepspeed
    import deepspeed.comm

    from trainer import distributed
    from trainer.construct import build_for_layout
    from trainer.engine import build_engine

    world = distributed.init_distributed()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    cfg = cfg_with(*overrides)
    plan = batch_plan(cfg, world.world_size)
    model, _ = build_for_layout(cfg, plan)
    gathered, all_gather = [0], deepspeed.comm.all_gather_into_tensor

    def recording(output, *args, **kwargs):
        gathered.append(output.numel() * output.element_size())
        return all_gather(output, *args, **kwargs)

    deepspeed.comm.all_gather_into_tensor = recording
    try:
        opt = build_engine(cfg, model, plan).optimizer
    finally:
        deepspeed.comm.all_gather_into_tensor = all_gather
    if cfg.parallel.zero_stage == 3:
        flat = [opt.lp_param_buffer]
        tensors = [*flat, opt.grad_partitions_flat_buffer, *opt.fp32_partitioned_groups_flat]
    else:
        flat = list(opt.bit16_groups_flat)
        tensors = [*flat, *opt.single_partition_of_fp32_groups]

    def nbytes(ts):
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts}
        return sum(storages.values())

    return nbytes(tensors), nbytes(flat), max(gathered)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_the_engine_build_estimate_counts_what_deepspeed_allocates(stage):
    """``deepspeed.initialize`` on 2 CPU ranks (fp32): ZeRO-3 keeps the flat weight partition
    and the fp32 gradient partitions (the master shares the weights) and, while it registers
    the gradient hooks, gathers each parameter whole (the largest: the embedding table, which
    gloo stages in a second full-size buffer); ZeRO-1 concatenates the whole model into a flat
    copy while the weights still exist, then keeps the flat weights and its fp32 master
    partition. The planner's engine_build is at least what it holds after, its ZeRO-3 peak adds
    twice the largest gathered tensor, and its ZeRO-1 peak is the model twice."""
    overrides = [*SMALL, f"parallel.zero_stage={stage}"]
    (held, flat, gathered), _ = run_distributed(_held_after_initialize, 2, overrides)
    cfg = cfg_with(*overrides)
    est = memory_estimate(cfg, batch_plan(cfg, 2))
    assert est.engine_build >= held
    if stage == 3:
        assert gathered == 4 * model_shape(cfg).largest_tensor  # fp32; here an MLP weight
        assert est.engine_build == pytest.approx(held + 2 * gathered, rel=0.02)
    else:
        assert est.engine_build == pytest.approx(2 * flat, rel=0.02)
    assert est.host_per_rank >= est.runtime + est.engine_build


def _step_gradient_bytes(overrides):
    """One ZeRO-1 step on this rank: the bytes of the fp32 gradient DeepSpeed hands the
    optimizer, and whether they are a storage of their own (not the parameters' gradients)."""
    import deepspeed
    import torch

    from trainer import distributed
    from trainer.construct import build_for_layout
    from trainer.engine import build_engine

    world = distributed.init_distributed()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    cfg = cfg_with(*overrides)
    plan = batch_plan(cfg, world.world_size)
    model, _ = build_for_layout(cfg, plan)
    engine = build_engine(cfg, model, plan)
    opt, seen = engine.optimizer, []
    inner = opt._optimizer_step

    def recording(group):
        grad = opt.single_partition_of_fp32_groups[group].grad
        own = {
            p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None
        }
        storage = grad.untyped_storage()
        seen.append((storage.nbytes(), storage.data_ptr() not in own))
        return inner(group)

    opt._optimizer_step = recording
    ids = torch.randint(0, 512, (1, 16))
    logits = engine(ids)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
    engine.backward(loss)
    engine.step()
    return seen


@pytest.mark.slow
def test_the_zero1_step_buffers_count_the_flat_gradient_partition():
    """``stage_1_and_2.step`` flattens the rank's gradient partition into a new fp32 tensor
    for the optimizer while the gradients still exist: the plan's step buffers hold it."""
    overrides = [*SMALL, "parallel.zero_stage=1"]
    seen, _ = run_distributed(_step_gradient_bytes, 2, overrides)
    cfg = cfg_with(*overrides)
    est = memory_estimate(cfg, batch_plan(cfg, 2))
    flat = sum(nbytes for nbytes, _ in seen)
    assert all(own for _, own in seen) and flat >= 4 * model_shape(cfg).parameters / 2 * 0.99
    assert est.step_buffers >= flat


def test_the_dry_run_says_when_zero_partitions_nothing():
    pipe = ["model.name=125m", "parallel.pipeline_stages=2", "train.gradient_accumulation_steps=2"]
    zero1 = cfg_with(*pipe, "parallel.zero_stage=1")
    text = plan_report(zero1, batch_plan(zero1, 2), on_gpu=False)
    assert "ZeRO stage 1 with 1 data-parallel rank partitions nothing and costs" in text
    zero0 = cfg_with(*pipe, "parallel.zero_stage=0")
    assert "partitions nothing" not in plan_report(zero0, batch_plan(zero0, 2), on_gpu=False)
