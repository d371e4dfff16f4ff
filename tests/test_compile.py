"""``train.compile``: each transformer block compiled with torch.compile (trainer/compile.py).

Compiled training gives the eager run's losses (decoder and T5, one process; ZeRO-3 and the
pipeline on 2 gloo processes in the slow set), leaves checkpoint and published keys as they are,
resumes exactly, and trains eagerly with a one-line warning where Inductor has no C++ compiler.

Compile time: Inductor compiles one block per family and grad mode (~30 s per family on 2 cores
with an empty cache, ~2 s from its on-disk cache), so the compiled runs share one worker process;
the tests that train are `slow` (the one-process fixture: ~100 CPU seconds, 4 min wall on a
loaded 2-core machine).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    kiln,
    kiln_in_process,
    step_losses,
    step_sample_ids,
    t5_sections,
    train_config,
)
from distributed import run_distributed, train_in_process
from safetensors import safe_open

# Losses of compiled and eager blocks differ by fp32 rounding only (Inductor fuses and reorders
# the elementwise maths). Measured over these 4 steps: 0 for the decoder (1 process, ZeRO-3 and
# the pipeline on 2), 1.4e-6 for T5; 3.5e-5 for T5 in a 4-step loop at lr 1e-3 on random tokens.
LOSS_ATOL = 1e-4
STEPS = 4


def train_counting_graphs(*configs: Path) -> list[tuple[Path, int]]:
    """Train each config in turn in this worker (:func:`distributed.train_in_process`); returns
    each run folder with the number of graphs Dynamo compiled during it (0: nothing compiled)."""
    from torch._dynamo.utils import counters

    out = []
    for config in configs:
        before = counters["stats"]["unique_graphs"]
        run = train_in_process(config)
        out.append((run, counters["stats"]["unique_graphs"] - before))
    return out


def continue_from(reference: Path, step: int, tmp_path: Path) -> None:
    """Make ``tmp_path/run`` a copy of ``reference``'s run folder cut back to its checkpoint at
    ``step``."""
    tag = f"step-{step:08d}"
    run = tmp_path / "run"
    shutil.copytree(reference / "checkpoints" / tag, run / "checkpoints" / tag)
    (run / "checkpoints" / "latest").write_text(tag)


@pytest.fixture(scope="module")
def runs(prepared_data, prepared_t5_data, tmp_path_factory) -> dict[str, Path]:
    """4 steps (checkpoints at 2 and 4) of each family, eager and compiled, on one process; and
    the compiled decoder cut back to step 2 and resumed with compile on."""
    common = dict(train__max_steps=STEPS, checkpoint__save_every=2, train__global_batch_size=2)
    keys = {
        "llama-eager": (prepared_data, {}),
        "llama-compiled": (prepared_data, {"train__compile": "true"}),
        "t5-eager": (prepared_t5_data, t5_sections()),
        "t5-compiled": (prepared_t5_data, t5_sections(train__compile="true")),
    }
    configs = {
        key: train_config(tmp_path_factory.mktemp(key), data, **common, **extra)
        for key, (data, extra) in keys.items()
    }
    done = run_distributed(train_counting_graphs, 1, *configs.values())[0]
    tmp = tmp_path_factory.mktemp("llama-resumed")
    config = train_config(tmp, prepared_data, **common, train__compile="true")
    continue_from(done[1][0], 2, tmp)
    done += run_distributed(train_counting_graphs, 1, config)[0]
    keys = [*configs, "llama-resumed"]
    for key, (_, graphs) in zip(keys, done, strict=True):
        assert (graphs > 0) == ("eager" not in key), (key, graphs)  # compile happened, or not
    return {key: run for key, (run, _) in zip(keys, done, strict=True)}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "t5"])
def test_compiled_losses_equal_eager(runs, family):
    eager, compiled = step_losses(runs[f"{family}-eager"]), step_losses(runs[f"{family}-compiled"])
    assert sorted(compiled) == list(range(1, STEPS + 1))
    want = torch.tensor([eager[s] for s in sorted(eager)])
    got = torch.tensor([compiled[s] for s in sorted(compiled)])
    assert want[-1] < want[0]  # it learns
    torch.testing.assert_close(got, want, rtol=0, atol=LOSS_ATOL)


def model_keys(run: Path) -> list[str]:
    ckpt = run / "checkpoints" / f"step-{STEPS:08d}"
    (states,) = ckpt.rglob("mp_rank_00_model_states.pt")
    return list(torch.load(states, map_location="cpu", weights_only=False)["module"])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "t5"])
def test_checkpoint_keys_are_the_eager_models(runs, family):
    keys = model_keys(runs[f"{family}-compiled"])
    assert not [k for k in keys if "_orig_mod" in k]
    assert keys == model_keys(runs[f"{family}-eager"])


def published_keys(folder: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118
    return shapes


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "t5"])
def test_publish_of_a_compiled_run_is_unchanged(runs, family, tmp_path):
    """`kiln publish` of a compiled run passes its own logits check against our model and writes
    the same tensors (names and shapes) and config.json as the eager run's."""
    folders = {}
    for kind in ("eager", "compiled"):
        folders[kind] = tmp_path / kind
        result = kiln_in_process(
            "publish", str(runs[f"{family}-{kind}"]), "--out", str(tmp_path / kind)
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert published_keys(folders["compiled"]) == published_keys(folders["eager"])
    config = (folders["compiled"] / "config.json").read_text()
    assert config == (folders["eager"] / "config.json").read_text()


@pytest.mark.slow
def test_resume_with_compile_is_exact(runs):
    reference, resumed = runs["llama-compiled"], runs["llama-resumed"]
    want, got = step_losses(reference), step_losses(resumed)
    assert sorted(got) == [3, 4]
    for s in (3, 4):
        assert got[s] == pytest.approx(want[s], abs=1e-6), (s, got[s], want[s])
    assert step_sample_ids(resumed) == {s: step_sample_ids(reference)[s] for s in (3, 4)}


# Every fast-path option at once: compiled blocks and loss, document mask with positions reset
# per document, the chunked loss, attention-only recomputation in every other block, batches made
# ahead in a worker (data.prefetch_steps).
ALL_OPTIONS = dict(
    data__document_mask="true",
    data__reset_position_ids="true",
    data__prefetch_steps=2,
    train__loss_chunk_tokens=48,
    train__activation_checkpointing="attention",
    train__activation_checkpointing_every=2,
)


@pytest.fixture(scope="module")
def all_options_runs(prepared_data, tmp_path_factory) -> dict[str, Path]:
    """4 steps of the decoder on one process with every option (checkpoints at 2 and 4), eager
    and compiled; and the compiled run cut back to step 2 and resumed."""
    common = dict(train__max_steps=STEPS, checkpoint__save_every=2, **ALL_OPTIONS)
    eager = train_config(tmp_path_factory.mktemp("all-eager"), prepared_data, **common)
    compiled = train_config(
        tmp_path_factory.mktemp("all-compiled"), prepared_data, **common, train__compile="true"
    )
    (done,) = run_distributed(train_counting_graphs, 1, eager, compiled)
    tmp = tmp_path_factory.mktemp("all-resumed")
    resumed = train_config(tmp, prepared_data, **common, train__compile="true")
    continue_from(done[1][0], 2, tmp)
    (more,) = run_distributed(train_counting_graphs, 1, resumed)
    done += more
    assert [graphs > 0 for _, graphs in done] == [False, True, True]
    return {key: run for key, (run, _) in zip(["eager", "compiled", "resumed"], done, strict=True)}


@pytest.mark.slow
def test_every_option_on_compiled_equals_eager_and_resumes_exactly(all_options_runs):
    """With every fast-path option on, compiled losses equal eager ones (fp32 rounding) and a
    resume from step 2 repeats steps 3-4 exactly, on the same samples."""
    eager, compiled = (step_losses(all_options_runs[k]) for k in ("eager", "compiled"))
    assert sorted(compiled) == list(range(1, STEPS + 1))
    for s in compiled:
        assert compiled[s] == pytest.approx(eager[s], abs=LOSS_ATOL), (s, compiled[s], eager[s])
    resumed = all_options_runs["resumed"]
    got = step_losses(resumed)
    assert sorted(got) == [3, 4]
    for s in (3, 4):
        assert got[s] == pytest.approx(compiled[s], abs=1e-6), (s, got[s], compiled[s])
    reference = step_sample_ids(all_options_runs["compiled"])
    assert step_sample_ids(resumed) == {s: reference[s] for s in (3, 4)}


def test_blocks_are_compiled_in_place():
    """Each block's call goes through its compiled wrapper; names and the model's own forward
    are untouched."""
    from model import build_model
    from trainer.compile import apply_compile
    from trainer.config import load_config

    cfg = load_config(None, ["model.model_type=t5", "model.name=debug", "tokenizer.vocab_size=512"])
    model = build_model(cfg.derived.model, seed=0)
    keys = list(model.state_dict())
    assert apply_compile(model, "cpu")
    blocks = model.blocks()
    assert len(blocks) == cfg.derived.model.num_layers + cfg.derived.model.num_decoder_layers
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert model._compiled_call_impl is None
    assert list(model.state_dict()) == keys


NO_COMPILER = "/nonexistent/g++"


def test_no_cpp_compiler_falls_back_to_eager(monkeypatch):
    """Where Inductor finds no C++ compiler (its ``cpp.cxx`` search list, which ``$CXX`` sets,
    names a missing one), the pre-flight warns in one line and the blocks stay eager."""
    import torch._inductor.config as inductor

    from launcher import preflight
    from model import build_model
    from trainer.compile import apply_compile
    from trainer.config import load_config

    monkeypatch.setenv("CXX", NO_COMPILER)
    cfg = load_config(None, ["model.name=debug", "train.compile=true"])
    with inductor.patch({"cpp.cxx": (None, NO_COMPILER)}):  # what CXX sets at import
        plan = preflight.check(cfg, [1], cuda_available=False, paths=False)
        model = build_model(cfg.derived.model, seed=0)
        assert not apply_compile(model, "cpu")
    (warning,) = [w for w in plan.warnings if "train.compile" in w]
    assert "\n" not in warning
    assert "C++ compiler" in warning and NO_COMPILER in warning
    assert "apt-get install g++" in warning and "train.compile=false" in warning
    assert all(b._compiled_call_impl is None for b in model.blocks())
    monkeypatch.undo()  # the compiler found: no warning
    plan = preflight.check(cfg, [1], cuda_available=False, paths=False)
    assert not [w for w in plan.warnings if "train.compile" in w]


@pytest.mark.slow
def test_kiln_train_without_cpp_compiler_trains_eagerly(prepared_data, tmp_path):
    """`kiln train` with ``CXX`` naming no compiler: one warning line, and the run trains."""
    config = train_config(
        tmp_path, prepared_data, train__compile="true", train__max_steps=2, checkpoint__save_every=2
    )
    result = kiln(
        "train", str(config), "--nproc", "1", "--sample-prompt", "", extra_env={"CXX": NO_COMPILER}
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "warning: train.compile=true needs a C++ compiler" in result.stderr
    assert sorted(step_losses(tmp_path / "run")) == [1, 2]


@pytest.fixture(scope="module")
def two_process_runs(prepared_data, tmp_path_factory) -> dict[str, Path]:
    """4 steps of the decoder on 2 gloo processes, eager and compiled, under ZeRO-3 with
    activation checkpointing and with 2 pipeline stages (ZeRO-1, 4 micro-batches per step).

    The pipeline runs without activation checkpointing: on main, `build_engine` applies
    `apply_activation_checkpointing` to the `PipelineModule` that `build_for_layout` made, which
    has no ``blocks()`` (AttributeError), with or without compile."""
    layouts = {
        "zero3": dict(parallel__zero_stage=3, train__activation_checkpointing="true"),
        "pipe": dict(parallel__zero_stage=1, parallel__pipeline_stages=2),
    }
    configs = {}
    for layout, extra in layouts.items():
        for kind in ("eager", "compiled"):
            configs[f"{layout}-{kind}"] = train_config(
                tmp_path_factory.mktemp(f"{layout}-{kind}"),
                prepared_data,
                train__max_steps=STEPS,
                train__compile=str(kind == "compiled").lower(),
                checkpoint__save_every=1000,
                **extra,
            )
    done = run_distributed(train_counting_graphs, 2, *configs.values(), timeout=900)[0]
    for key, (_, graphs) in zip(configs, done, strict=True):
        assert (graphs > 0) == key.endswith("compiled"), (key, graphs)  # compile happened, or not
    return {key: run for key, (run, _) in zip(configs, done, strict=True)}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["zero3", "pipe"])
def test_compiled_equals_eager_on_two_processes(two_process_runs, layout):
    eager = step_losses(two_process_runs[f"{layout}-eager"])
    compiled = step_losses(two_process_runs[f"{layout}-compiled"])
    assert sorted(compiled) == sorted(eager) == list(range(1, STEPS + 1))
    want = torch.tensor([eager[s] for s in sorted(eager)])
    got = torch.tensor([compiled[s] for s in sorted(compiled)])
    torch.testing.assert_close(got, want, rtol=0, atol=LOSS_ATOL)


GPU_BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


def test_gpu_bench_without_cuda_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = subprocess.run(
        [sys.executable, str(GPU_BENCH)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert result.stderr.startswith("Error: bench/gpu.py measures CUDA GPUs")
    assert "Traceback" not in result.stderr


@pytest.mark.gpu
def test_gpu_bench_measures_compile_off_and_on(tmp_path):
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(GPU_BENCH), "--presets", "debug,t5:debug", "--steps", "2"]
    result = subprocess.run(
        [*cmd, "--warmup", "1", "--json", str(out)], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["preset"], r["compile"]) for r in rows] == [
        ("debug", False),
        ("debug", True),
        ("t5:debug", False),
        ("t5:debug", True),
    ]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["peak_memory_gib"] > 0, r
        assert r["sdpa"] in ("flash", "memory-efficient", "cudnn", "math"), r
