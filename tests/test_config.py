"""Config resolution, validation and the dry-run plan; every bad config is refused before any
process starts, with the field, the value and the fix in the message."""

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from launcher.cli import cli
from model.registry import get_preset
from trainer.config import ConfigError, batch_plan, check_device, check_paths, load_config
from trainer.estimate import memory_estimate

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.fixture
def yaml_file(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text("some text\n")
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(
        f"""
model: {{name: debug, num_hidden_layers: 3}}
tokenizer: {{vocab_size: 500}}
data:
  root: {tmp_path / "data"}
  seq_len: 64
  datasets: [{{name: c, sources: [{{path: {src}}}]}}]
train: {{micro_batch_size: 2, lr: 1.0e-3}}
"""
    )
    return cfg


def test_precedence_preset_yaml_cli(yaml_file):
    cfg = load_config(yaml_file, ["train.lr=5e-4", "model.hidden_size=128"])
    debug = get_preset("debug")
    assert cfg.model.intermediate_size == debug.intermediate_size  # preset
    assert cfg.model.num_hidden_layers == 3  # YAML over preset
    assert cfg.model.hidden_size == 128  # CLI over preset
    assert cfg.train.lr == 5e-4  # CLI over YAML
    assert cfg.train.micro_batch_size == 2  # YAML over default
    assert cfg.derived.model.vocab_size == 512  # derived: 500 padded to a multiple of 64
    assert cfg.model.vocab_size is None  # ... and not written into the user's section


def test_derived_values_stay_out_of_the_users_sections(yaml_file, tmp_path):
    """The config round-trips as written: derived values (padded vocab, sentinels, the default
    objective) come from `cfg.derived`, and a dumped config loads back equal, deriving the same."""
    for overrides, derived in [
        ([], (512, 0, ("causal_lm",))),
        (["model.model_type=t5"], (512, 100, ("span_corruption",))),
        (["model.vocab_size=640", "tokenizer.num_sentinels=3"], (640, 3, ("causal_lm",))),
    ]:
        t5 = "model.model_type=t5" in overrides
        if t5:  # the T5 preset has no num_hidden_layers: a file without it
            text = yaml_file.read_text().replace("debug, num_hidden_layers: 3", "debug")
            (tmp_path / "t5.yaml").write_text(text)
        cfg = load_config(tmp_path / "t5.yaml" if t5 else yaml_file, overrides)
        d = cfg.derived
        assert (d.model.vocab_size, d.num_sentinels, tuple(o.type for o in d.objectives)) == derived
        dumped = yaml.safe_load(cfg.to_yaml())
        given = {o.split("=")[0]: o.split("=")[1] for o in overrides}
        assert dumped["model"]["vocab_size"] == (640 if "model.vocab_size" in given else None)
        assert dumped["tokenizer"]["num_sentinels"] == (
            3 if given.get("tokenizer.num_sentinels") else None
        )
        assert dumped["objective"]["mixture"] is None
        again = tmp_path / "again.yaml"
        again.write_text(cfg.to_yaml())
        reloaded = load_config(again)
        assert reloaded == cfg and reloaded.derived == d


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.foo=1", "train.foo: unknown key; check the spelling"),
        ("modle.name=debug", "modle: unknown key; did you mean 'model'?"),
        ("train.lrr=1", "train.lrr: unknown key; did you mean 'lr'?"),
        ("model.hiden_size=64", "model.llama.hiden_size: unknown key; did you mean 'hidden_size'?"),
        (
            "data.datasets=[{name: c, sources: [{pth: x}]}]",
            "pth: unknown key; did you mean 'path'?",
        ),
        ("train.micro_batch_size=abc", "train.micro_batch_size='abc'"),
        ("train.lr=fast", "train.lr='fast'"),
        ("train.micro_batch_size=0", "train.micro_batch_size=0"),
        ("model.hidden_size=-8", "hidden_size"),
        ("data.seq_len=0", "data.seq_len=0"),
        ("model.num_key_value_heads=3", "num_key_value_heads"),
        ("model.vocab_size=256", "raise model.vocab_size"),
        ("parallel.zero_stage=4", "zero_stage=4 is not allowed: Input should be 0, 1, 2 or 3"),
        ("parallel.offload_params=true", "needs parallel.zero_stage=3"),
        ("data.seq_len=4096", "max_position_embeddings"),
        ("model.name=huge", "not a llama preset"),
        ("train.precision=fp8", "train.precision='fp8'"),
    ],
)
def test_bad_config_is_refused_with_field_and_value(yaml_file, override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(yaml_file, [override])
    assert expected in str(e.value)


def test_batch_arithmetic(yaml_file):
    cfg = load_config(yaml_file, ["train.global_batch_size=16"])
    plan = batch_plan(cfg, world_size=2)
    assert (plan.micro_batch_size, plan.gradient_accumulation_steps) == (2, 4)
    assert plan.global_batch_size == 16 and plan.tokens_per_step == 16 * 64
    # the global batch is the invariant: one process accumulates twice as much
    assert batch_plan(cfg, world_size=1).gradient_accumulation_steps == 8
    with pytest.raises(ConfigError, match=r"global_batch_size=10 is not divisible .* = 4"):
        batch_plan(load_config(yaml_file, ["train.global_batch_size=10"]), world_size=2)
    with pytest.raises(ConfigError, match="disagrees"):
        batch_plan(
            load_config(
                yaml_file, ["train.global_batch_size=16", "train.gradient_accumulation_steps=2"]
            ),
            world_size=2,
        )


def test_missing_data_path(yaml_file, tmp_path):
    cfg = load_config(
        yaml_file, [f"data.datasets=[{{name: x, sources: [{{path: {tmp_path}/no.txt}}]}}]"]
    )
    with pytest.raises(ConfigError, match=r"sources\[0\].path=.*no.txt.* matches no file"):
        check_paths(cfg)


def test_memory_estimate_follows_zero_stages(yaml_file):
    estimates = []
    for stage in range(4):
        cfg = load_config(yaml_file, [f"parallel.zero_stage={stage}"])
        estimates.append(memory_estimate(cfg, batch_plan(cfg, world_size=4)))
    psi = cfg.derived.model.num_parameters()
    assert estimates[0].optimizer_states == 8 * psi  # fp32 Adam moments
    # ZeRO 1-2 also keep an fp32 master copy of the rank's partition (DeepSpeed clones it)
    assert estimates[1].optimizer_states == (8 + 4) * psi / 4
    assert estimates[1].gradients == 4 * psi and estimates[2].gradients == 4 * psi / 4
    assert estimates[2].parameters == 4 * psi and estimates[3].parameters == 4 * psi / 4
    states = [e.parameters + e.gradients + e.optimizer_states for e in estimates]
    assert states == sorted(states, reverse=True)  # (buffers can outweigh it on a tiny model)


def test_cli_refuses_bad_config_before_launch(yaml_file):
    result = CliRunner().invoke(cli, ["train", str(yaml_file), "train.micro_batch_size=0"])
    assert result.exit_code != 0
    assert "train.micro_batch_size=0" in result.output
    assert "torchrun" not in result.output


def test_fp16_needs_a_gpu(yaml_file):
    cfg = load_config(yaml_file, ["train.precision=fp16"])
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        check_device(cfg.train, cuda_available=False)
    check_device(cfg.train, cuda_available=True)
    check_device(load_config(yaml_file, ["train.precision=bf16"]).train, cuda_available=False)


def test_dry_run_prints_plan(yaml_file):
    result = CliRunner().invoke(
        cli, ["train", str(yaml_file), "--nproc", "2", "train.global_batch_size=8", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    cfg = load_config(yaml_file)
    assert f"{cfg.derived.model.num_parameters():,}" in result.output
    assert "2 x 2 x 2 = 8 sequences" in result.output
    assert "tokens_per_step:       512" in result.output
    for part in ("parameters:", "gradients:", "optimizer states:", "activations:"):
        assert part in result.output


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_in_configs_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(path)
    batch_plan(cfg, cfg.launch.nproc_per_node * cfg.launch.nnodes)
    if "gpu" not in path.name:  # GPU examples name a corpus the user supplies
        check_paths(cfg)


def test_preflight_warns_of_a_warmup_longer_than_the_run_and_emulated_bf16(
    yaml_file, tmp_path, monkeypatch
):
    from launcher import preflight

    def warnings(*overrides, cuda=True):
        return preflight.check(
            load_config(yaml_file, list(overrides)), [1], cuda_available=cuda, paths=False
        ).warnings

    assert warnings() == ()
    (warmup,) = warnings("train.max_steps=50", "train.warmup_steps=50")
    assert "warmup_steps=50 is not shorter than train.max_steps=50" in warmup
    no_bf16, bf16 = tmp_path / "old", tmp_path / "new"
    no_bf16.write_text("flags\t\t: fpu avx2 avx512f\n")
    bf16.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert not preflight.cpu_has_native_bf16(no_bf16) and preflight.cpu_has_native_bf16(bf16)
    monkeypatch.setattr(preflight, "cpu_has_native_bf16", lambda: False)
    (emulated,) = warnings("train.precision=bf16", cuda=False)
    assert "bf16 on a CPU without native bf16" in emulated and "precision=fp32" in emulated
    assert warnings("train.precision=bf16", cuda=True) == ()
    monkeypatch.setattr(preflight, "cpu_has_native_bf16", lambda: True)
    assert warnings("train.precision=bf16", cuda=False) == ()


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("kiln ")


def test_datasheet_peaks_match_the_most_specific_gpu_name():
    """MFU's denominator: an H100 PCIe is not an SXM (756 vs 989 TFLOP/s bf16), an L40S not an
    L4, an A10G not an A10; an unknown GPU has no datasheet figure (it is measured)."""
    from trainer.estimate import datasheet_peak_flops

    names = {
        "NVIDIA H100 PCIe": 756e12,
        "NVIDIA H100 80GB HBM3": 989e12,
        "NVIDIA H200": 989e12,
        "NVIDIA L40S": 362e12,
        "NVIDIA L4": 121e12,
        "NVIDIA A10G": 70e12,
        "NVIDIA A10": 125e12,
    }
    assert {n: datasheet_peak_flops(n, "bf16") for n in names} == names
    assert datasheet_peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
    assert datasheet_peak_flops("Tesla V100-SXM2-16GB", "bf16") is None
