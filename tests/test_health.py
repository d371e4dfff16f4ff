"""The training-health supervisor (trainer/health.py): detection rules, fault injection, and the
real loop on 2 gloo ranks skipping, recording and stopping on injected faults."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import t5_sections, train_config
from distributed import run_distributed, train_in_process

from trainer.checkpoint import read_trainer_state, tag_for
from trainer.config import load_config
from trainer.engine import lr_lambda
from trainer.errors import ConfigError, TrainingDivergedError
from trainer.health import (
    FaultInjector,
    Supervisor,
    parse_faults,
    robust_threshold,
)


# -- rules (fast) ---------------------------------------------------------------------------------
def test_parse_faults():
    assert [(f.kind, f.rank, f.step, f.factor) for f in parse_faults("nan@rank1:step4")] == [
        ("nan", 1, 4, 1.0)
    ]
    faults = parse_faults("nan@rank0:step2, spike@rank1:step5:x1000")
    assert [(f.kind, f.rank, f.step, f.factor) for f in faults] == [
        ("nan", 0, 2, 1.0),
        ("spike", 1, 5, 1000.0),
    ]
    assert parse_faults("") == []
    for bad in ("nan@1:4", "spike@rank0:step3", "nan@rank0:step3:x2", "drop@rank0:step1"):
        with pytest.raises(ValueError, match="KILN_FAULT"):
            parse_faults(bad)


def test_fault_injector_applies_only_to_its_rank_and_step():
    loss = torch.tensor(2.0)
    injector = FaultInjector(1, "nan@rank1:step4,spike@rank1:step5:x10,nan@rank0:step6")
    assert torch.isnan(injector.apply(loss, 4))
    assert injector.apply(loss, 5).item() == 20.0
    assert injector.apply(loss, 6).item() == 2.0  # rank 0's
    assert not FaultInjector(0, "nan@rank1:step4")
    assert not FaultInjector(0, "")


def test_robust_threshold_is_median_plus_k_scaled_mad():
    values = [1.0, 2.0, 3.0, 4.0, 100.0]  # median 3, |x - 3| = 2 1 0 1 97: MAD 1
    assert robust_threshold(values, 6.0) == pytest.approx(3 + 6 * 1.4826)
    # a flat window: the MAD floor (1e-3 of the median) keeps rounding noise below it
    assert robust_threshold([2.0] * 4, 6.0) == pytest.approx(2 + 6 * 1.4826 * 2e-3)


def _supervisor(**health) -> Supervisor:
    overrides = [f"health.{k}={v}" for k, v in {"window": 3, **health}.items()]
    return Supervisor(load_config(None, overrides).health, world_size=2)


def test_supervisor_nonfinite_loss_names_the_rank_and_keeps_the_window():
    s = _supervisor()
    assert s.decide(1, [2.0, 2.1], [True, True], None) == ("none", [])
    action, events = s.decide(2, [2.0, math.nan], [True, True], None)
    assert action == "skip_step"
    (event,) = events
    assert (event.step, event.kind, event.ranks, event.action) == (2, "nonfinite_loss", [1], action)
    assert list(s.losses) == [2.05]  # the skipped step's loss stays out of the statistic


def test_supervisor_loss_spike_after_a_full_window():
    s = _supervisor(on_spike="stop")
    for step, loss in enumerate([3.0, 2.9, 2.8], start=1):
        assert s.decide(step, [loss, loss], [True, True], None)[0] == "none"
    action, (event,) = s.decide(4, [2.7, 9.0], [True, True], None)
    assert (action, event.kind, event.ranks) == ("stop", "loss_spike", [1])
    assert event.value == pytest.approx(5.85)
    assert event.threshold == pytest.approx(2.9 + 6 * 1.4826 * 0.1)
    assert s.decide(5, [2.7, 2.7], [True, True], None)[0] == "none"  # a lower loss is fine


def test_supervisor_grad_norm_is_checked_one_step_late():
    s = _supervisor(on_grad_norm_spike="stop", on_nonfinite="warn")
    for step in range(1, 5):
        assert s.decide(step, [2.0, 2.0], [True, True], 1.0 + step / 100)[0] == "none"
    action, (event,) = s.decide(5, [2.0, 2.0], [True, True], 50.0)
    assert (action, event.step, event.kind, event.ranks) == ("stop", 4, "grad_norm_spike", [0, 1])
    action, (event,) = s.decide(6, [2.0, 2.0], [True, True], math.inf)
    assert (action, event.kind) == ("stop", "nonfinite_grad_norm")


def test_supervisor_pipeline_losses_come_from_the_last_stages():
    s = _supervisor()
    action, (event,) = s.decide(1, [0.0, math.inf], [False, True], None)
    assert (action, event.ranks) == ("skip_step", [1])
    assert s.decide(2, [0.0, 2.0], [False, True], None) == ("none", [])
    assert list(s.losses) == [2.0]


def test_supervisor_state_round_trip():
    s = _supervisor()
    for step in range(1, 6):
        s.decide(step, [float(step)] * 2, [True] * 2, 0.5 * step)
    restored = _supervisor()
    restored.load_state(json.loads(json.dumps(s.state())))
    assert (
        restored.state() == s.state() == {"losses": [3.0, 4.0, 5.0], "grad_norms": [1.5, 2.0, 2.5]}
    )
    assert restored.decide(6, [9.0, 9.0], [True] * 2, None) == s.decide(
        6, [9.0, 9.0], [True] * 2, None
    )


def test_supervisor_disabled_decides_nothing():
    assert _supervisor(enabled="false").decide(1, [math.nan] * 2, [True] * 2, None) == ("none", [])


def test_health_config_refuses_an_unskippable_grad_norm():
    with pytest.raises(ConfigError, match="on_grad_norm_spike"):
        load_config(None, ["health.on_grad_norm_spike=skip_step"])
    cfg = load_config(None, []).health
    assert (cfg.enabled, cfg.on_nonfinite, cfg.on_spike) == (True, "skip_step", "warn")


# -- the real loop on 2 gloo ranks -------------------------------------------------------------
def _train_with_faults(*runs: tuple[str, Path]) -> list[tuple[str, str]]:
    """On each rank: train each ``(KILN_FAULT, config)`` in turn; ``("done", run_dir)`` or
    ``("stopped", message)`` per run."""
    out = []
    for fault, config in runs:
        os.environ["KILN_FAULT"] = fault
        try:
            out.append(("done", str(train_in_process(config))))
        except TrainingDivergedError as e:
            out.append(("stopped", str(e)))
        finally:
            del os.environ["KILN_FAULT"]
    return out


def _tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside a loaded checkpoint object, by its path of keys."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list | tuple):
        items = enumerate(obj)
    else:  # numbers, strings, configs: no tensors
        return {}
    out = {}
    for k, v in items:
        out.update(_tensors(v, f"{prefix}/{k}"))
    return out


def _checkpoint_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """All tensors (parameters, optimizer state, fp32 partitions) of a DeepSpeed checkpoint."""
    out = {}
    files = sorted(ckpt.rglob("*.pt"))
    assert files, f"no checkpoint files in {ckpt}"
    for f in files:
        loaded = torch.load(f, map_location="cpu", weights_only=False)
        out.update(_tensors(loaded, f.name))
    return out


def _assert_bitwise_equal(a: Path, b: Path) -> None:
    ta, tb = _checkpoint_tensors(a), _checkpoint_tensors(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{a.name} and {b.name} differ in {different[:5]}"


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "health.jsonl").read_text().splitlines()]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run) if "loss" in r}


SKIP_LAYOUTS = {
    "llama-zero0": ("llama", {"parallel__zero_stage": 0}),
    "llama-zero3": ("llama", {"parallel__zero_stage": 3}),
    "t5-zero0": ("t5", {"parallel__zero_stage": 0}),
    "t5-zero3": ("t5", {"parallel__zero_stage": 3}),
    # the other optimizer classes the skip goes through: ZeRO-2's (ZeRO-1's, as the pipeline's),
    # bf16 under ZeRO-0 (FP16_UnfusedOptimizer) and ZeRO-1 (DeepSpeedZeroOptimizer in bf16)
    "llama-zero2": ("llama", {"parallel__zero_stage": 2}),
    "llama-bf16-zero0": ("llama", {"parallel__zero_stage": 0, "train__precision": "bf16"}),
    "llama-bf16-zero1": ("llama", {"parallel__zero_stage": 1, "train__precision": "bf16"}),
    # last: a plain engine built after a pipeline engine in the same process finds no mpu
    "llama-pipe": ("llama", {"parallel__zero_stage": 1, "parallel__pipeline_stages": 2}),
    "llama-pipe-bf16-zero0": (  # BF16_Optimizer
        "llama",
        {"parallel__zero_stage": 0, "parallel__pipeline_stages": 2, "train__precision": "bf16"},
    ),
}


@pytest.fixture(scope="module")
def skip_runs(prepared_data, prepared_t5_data, tmp_path_factory) -> dict[str, Path]:
    """7 steps of each layout in SKIP_LAYOUTS on 2 ranks: rank 1's loss NaN at step 4 and x1000
    at step 6, ``health.on_nonfinite=skip_step``, ``on_spike=skip_step`` over a window of 3,
    a checkpoint at every step (one worker start-up for them all)."""
    configs = []
    for name, (family, sections) in SKIP_LAYOUTS.items():
        data = prepared_data if family == "llama" else prepared_t5_data
        extra = t5_sections(**sections) if family == "t5" else sections
        config = train_config(
            tmp_path_factory.mktemp(name),
            data,
            train__max_steps=7,
            train__eval_samples=2,
            checkpoint__save_every=1,
            checkpoint__keep_last=10,
            health__window=3,
            health__on_spike="skip_step",
            **extra,
        )
        configs.append(("nan@rank1:step4,spike@rank1:step6:x1000", config))
    results = run_distributed(_train_with_faults, 2, *configs)[0]
    assert [status for status, _ in results] == ["done"] * len(configs), results
    return {name: Path(run) for name, (_, run) in zip(SKIP_LAYOUTS, results, strict=True)}


@pytest.mark.slow
@pytest.mark.parametrize("layout", SKIP_LAYOUTS)
def test_skip_step_leaves_parameters_and_optimizer_bitwise(skip_runs, layout):
    """A NaN on one rank (non-finite gradients) and a spike (finite ones, which DeepSpeed would
    apply): every rank skips both updates."""
    run = skip_runs[layout]
    ckpts = {s: run / "checkpoints" / tag_for(s) for s in range(1, 8)}
    # parameters and optimizer state after steps 4 and 6 are those after 3 and 5, bit for bit
    _assert_bitwise_equal(ckpts[3], ckpts[4])
    _assert_bitwise_equal(ckpts[5], ckpts[6])
    for before, after in ((2, 3), (4, 5), (6, 7)):  # and the other steps did update them
        with pytest.raises(AssertionError, match="differ"):
            _assert_bitwise_equal(ckpts[before], ckpts[after])
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 8))  # the run finished
    applied = (1, 2, 3, 5, 7)
    assert math.isnan(losses[4]) and all(math.isfinite(losses[s]) for s in applied)
    assert losses[6] > 100 * losses[5]
    # the spike statistic's window, saved for a resume, holds the last applied steps' losses
    window = read_trainer_state(ckpts[7])["health"]["losses"]
    assert window == pytest.approx([losses[s] for s in (3, 5, 7)], rel=1e-5)
    nan_event, spike_event = _events(run)
    assert (nan_event["step"], nan_event["kind"], nan_event["ranks"], nan_event["action"]) == (
        4,
        "nonfinite_loss",
        [1],
        "skip_step",
    )
    assert nan_event["threshold"] is None and math.isnan(nan_event["value"])
    assert (spike_event["step"], spike_event["kind"], spike_event["action"]) == (
        6,
        "loss_spike",
        "skip_step",
    )
    assert spike_event["value"] == pytest.approx(losses[6], rel=1e-5)
    assert spike_event["threshold"] < 2 * max(losses[s] for s in (2, 3, 5))
    # rank 1's samples of step 4 (its replica's, under the pipeline), as it logged them
    replica = 0 if "pipe" in layout else 1
    logged = [
        json.loads(line)
        for line in (run / "sample_ids" / f"rank{replica}.jsonl").read_text().splitlines()
    ]
    assert nan_event["sample_ids"] == next(r["ids"] for r in logged if r["step"] == 4)
    # the learning-rate schedule kept its pace: each step used the rate of its step number
    train = load_config(run / "config.yaml").train
    rates = {r["step"]: r["lr"] for r in _records(run) if "lr" in r}
    assert rates == pytest.approx({s: train.lr * lr_lambda(train)(s - 1) for s in range(1, 8)})


@pytest.fixture(scope="module")
def spike_runs(prepared_data, tmp_path_factory) -> dict[str, tuple[str, str]]:
    """The decoder under ZeRO 0 on 2 ranks, window 3, rank 0's loss x1000 at step 5: with
    ``on_spike=warn`` (7 steps) and with ``on_spike=stop``."""
    runs = {}
    for action in ("warn", "stop"):
        config = train_config(
            tmp_path_factory.mktemp(f"spike-{action}"),
            prepared_data,
            train__max_steps=7,
            train__eval_samples=2,
            checkpoint__save_every=1000,
            health__window=3,
            health__on_spike=action,
        )
        runs[action] = ("spike@rank0:step5:x1000", config)
    results = run_distributed(_train_with_faults, 2, *runs.values())[0]
    return dict(zip(runs, results, strict=True))


@pytest.mark.slow
def test_spike_with_warn_is_recorded_and_training_goes_on(spike_runs):
    status, run = spike_runs["warn"]
    assert status == "done"
    run = Path(run)
    # the loss at step 5, and its gradient norm, known after the update, at step 6's check
    event, norm_event = _events(run)
    assert (event["step"], event["kind"], event["ranks"], event["action"]) == (
        5,
        "loss_spike",
        [0],
        "warn",
    )
    assert (norm_event["step"], norm_event["kind"], norm_event["action"]) == (
        5,
        "grad_norm_spike",
        "warn",
    )
    norms = {r["step"]: r["grad_norm"] for r in _records(run) if "grad_norm" in r}
    assert norm_event["value"] == pytest.approx(norms[5], rel=1e-5)
    assert norm_event["threshold"] < norms[5]
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 8))
    assert event["value"] == pytest.approx(losses[5], rel=1e-6)
    assert event["value"] > event["threshold"] > max(losses[s] for s in (2, 3, 4))
    assert len(event["sample_ids"]) == 4  # rank 0's 2 micro-batches of 2


@pytest.mark.slow
def test_spike_with_stop_saves_reports_and_fails(spike_runs):
    status, message = spike_runs["stop"]
    assert status == "stopped"
    assert "training stopped at step 5: loss spike" in message
    assert "health.on_spike=stop" in message
    run = Path(message.split("the events are in ")[1].split("health.jsonl")[0])
    (event,) = _events(run)
    assert (event["step"], event["kind"], event["action"]) == (5, "loss_spike", "stop")
    assert sorted(_losses(run)) == [1, 2, 3, 4, 5]  # nothing trained after it
    assert read_trainer_state(run / "checkpoints" / tag_for(5))["step"] == 5


def test_skip_step_is_refused_for_an_optimizer_it_does_not_know():
    from trainer.health import check_skip_supported

    class Engine:
        optimizer = type("MyOptimizer", (), {})()

    with pytest.raises(ConfigError, match=r"health.on_spike cannot skip an update of"):
        check_skip_supported(Engine(), "health.on_spike")


def test_stop_is_shown_as_a_user_error():
    from trainer.errors import USER_ERRORS

    assert issubclass(TrainingDivergedError, USER_ERRORS)


@pytest.mark.slow
def test_kiln_train_stop_exits_non_zero_with_one_message(prepared_data, tmp_path):
    """`kiln train` with ``health.on_nonfinite=stop``: the run saves, the launcher shows the
    report once (no traceback) and exits 1; health.jsonl names the step."""
    from conftest import kiln

    config = train_config(
        tmp_path,
        prepared_data,
        train__max_steps=4,
        train__eval_samples=2,
        checkpoint__save_every=1000,
        health__on_nonfinite="stop",
    )
    result = kiln(
        "train", str(config), "--nproc", "1", "--sample-prompt", "",
        extra_env={"KILN_FAULT": "nan@rank0:step2"},
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    assert output.count("training stopped at step 2: nonfinite loss") == 1, output
    run = tmp_path / "run"
    (event,) = _events(run)
    assert (event["step"], event["kind"], event["action"]) == (2, "nonfinite_loss", "stop")
    assert read_trainer_state(run / "checkpoints" / tag_for(2))["step"] == 2
