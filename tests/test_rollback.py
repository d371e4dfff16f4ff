"""The health supervisor's ``rollback`` action (trainer/health.py, trainer/loop.py): the data
order with excluded samples, the config rules, and the real loop on 2 gloo ranks rolling back in
its running processes, resuming after a rollback on 1 process, and hitting the rollback cap."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import step_losses, step_sample_ids, t5_sections, train_config
from distributed import run_distributed, train_in_process, train_runs

from trainer.callbacks import Callback
from trainer.checkpoint import latest_checkpoint, read_trainer_state, tag_for
from trainer.config import batch_plan, load_config
from trainer.data.dataset import SAMPLE_ID_STRIDE, open_train_data, skip_excluded
from trainer.engine import lr_lambda
from trainer.errors import ConfigError, TrainingDivergedError
from trainer.loop import Trainer
from trainer.model_card import _training_rows
from trainer.replay import replay_step


# -- the data order with exclusions (fast) ------------------------------------------------------
def test_skip_excluded_is_the_order_without_the_excluded_indices():
    rng = np.random.default_rng(0)
    for _ in range(20):
        excluded = np.unique(rng.integers(0, 300, size=int(rng.integers(0, 60))))
        kept = np.setdiff1d(np.arange(400), excluded)
        logical = rng.permutation(len(kept) - 10)  # any order, as ranks ask for them
        got = skip_excluded(logical, excluded)
        np.testing.assert_array_equal(got, kept[logical])
        assert got.dtype == np.int64
    # no exclusions: the identity; an exclusion at 0 and a run of them
    np.testing.assert_array_equal(skip_excluded([0, 5], np.zeros(0, np.int64)), [0, 5])
    np.testing.assert_array_equal(skip_excluded(np.arange(4), np.array([0, 2, 3, 4])), [1, 5, 6, 7])


def _indexer(cfg, world_size: int, dp_rank: int, data) -> Trainer:
    """A Trainer with only what `micro_batch_indices` reads (plan, rank, data)."""
    trainer = Trainer.__new__(Trainer)
    trainer.plan, trainer.dp_rank, trainer.data = batch_plan(cfg, world_size), dp_rank, data
    return trainer


def _step_indices(cfg, world_size: int, step: int, data) -> list[int]:
    """The global indices all ranks read at ``step`` (0-based), over ranks and micro-steps."""
    out = []
    for r in range(world_size):
        t = _indexer(cfg, world_size, r, data)
        for m in range(t.plan.gradient_accumulation_steps):
            out += t.micro_batch_indices(step, m).tolist()
    return out


def test_exclusions_keep_the_order_exact_on_any_number_of_processes(prepared_data, tmp_path):
    """With samples excluded, steps 0-9 on 1, 2 or 4 processes (and 0-4 on 2 then 5-9 on 1, a
    resume on another layout) read the first 80 non-excluded global indices, each once; the
    sampler maps them to the same sample ids whichever layout reads them."""
    cfg = load_config(train_config(tmp_path, prepared_data, train__global_batch_size=8))
    data = open_train_data(cfg)
    data.exclude([42, 40, 41])
    data.exclude([17, 41, 3])  # added to the others; repeats are one exclusion
    np.testing.assert_array_equal(data.excluded, [3, 17, 40, 41, 42])
    want = np.setdiff1d(np.arange(200), data.excluded)[:80].tolist()
    layouts = {n: [i for s in range(10) for i in _step_indices(cfg, n, s, data)] for n in (1, 2, 4)}
    layouts["2 then 1"] = [
        i for s in range(10) for i in _step_indices(cfg, 2 if s < 5 else 1, s, data)
    ]
    for name, got in layouts.items():
        assert sorted(got) == want, name
    # a pure function: a fresh TrainData with the same exclusions names the same samples
    again = open_train_data(cfg)
    again.exclude([3, 17, 40, 41, 42])
    d, s = again.sampler(again.global_indices(np.arange(80)))
    d0, s0 = data.sampler(np.asarray(want))
    np.testing.assert_array_equal(d * SAMPLE_ID_STRIDE + s, d0 * SAMPLE_ID_STRIDE + s0)
    with pytest.raises(ValueError, match=">= 0"):
        data.exclude([-1])


# -- config (fast) --------------------------------------------------------------------------------
def test_rollback_config_fields_and_refusals():
    h = load_config(
        None,
        [
            "health.on_spike=rollback",
            "health.on_nonfinite=rollback",
            "health.rollback_lr_scale=0.5",
            "health.rollback_cooldown_steps=10",
            "checkpoint.save_every=100",
        ],
    ).health
    assert (h.on_spike, h.on_nonfinite, h.rollback_lr_scale, h.rollback_cooldown_steps) == (
        "rollback",
        "rollback",
        0.5,
        10,
    )
    assert (h.max_rollbacks, h.rollback_window) == (3, 1000) and h.rolls_back
    # no checkpoint before the last step: nothing to roll back to
    with pytest.raises(ConfigError, match=r"health.on_spike=rollback goes back to the newest"):
        load_config(None, ["health.on_spike=rollback", "train.max_steps=50"])
    with pytest.raises(ConfigError, match="pipeline_stages=2"):
        load_config(
            None,
            [
                "health.on_nonfinite=rollback",
                "checkpoint.save_every=10",
                "parallel.pipeline_stages=2",
                "parallel.zero_stage=1",
            ],
        )
    with pytest.raises(ConfigError, match="rollback_lr_scale"):
        load_config(None, ["health.rollback_lr_scale=1.5"])
    # rollback off: the same settings are fine
    load_config(None, ["health.enabled=false", "health.on_spike=rollback"])


def test_model_card_shows_rollbacks_and_excluded_samples():
    cfg = load_config(None, [])
    state = {
        "step": 10,
        "tokens_seen": 5120,
        "global_batch_size": 8,
        "world_size": 2,
        "zero_stage": 0,
        "rollbacks": [{"step": 6, "to_step": 4}, {"step": 9, "to_step": 8}],
        "excluded_samples": [40, 41, 42, 43, 64, 66],
    }
    rows = dict(_training_rows(cfg, state))
    assert rows["rollbacks"] == "2 (step 6 to step 4, step 9 to step 8)"
    assert rows["excluded samples"].startswith("6 global sample indices")
    assert rows["excluded samples"].endswith(": 40-43, 64, 66")
    del state["rollbacks"], state["excluded_samples"]  # a run that never rolled back
    assert "rollbacks" not in dict(_training_rows(cfg, state))


# -- the real loop on 2 gloo ranks --------------------------------------------------------------
class _SigtermAfterRollback(Callback):
    """Sends this process SIGTERM at the end of ``step`` once the run has rolled back (the
    signal handler the loop installed takes it, as it would Slurm's)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, metrics) -> None:
        if trainer.rollbacks and trainer.step == self.step and trainer.world.is_main:
            os.kill(os.getpid(), signal.SIGTERM)


def _rollback_worker(*runs: tuple[str, Path, int | None, Path | None]) -> list[tuple[str, str]]:
    """On each rank: train each ``(KILN_FAULT, config, sigterm_step, fresh_from)`` in turn
    (``fresh_from``: start from that earlier run's step-4 checkpoint with its final exclusions,
    :func:`_resumed_with_exclusions`); ``("done", run_dir)`` or ``("stopped", message)`` per
    run."""
    import torch.distributed as dist

    from trainer import main

    train = main.train
    out = []
    for fault, config, sigterm_step, fresh_from in runs:
        if fresh_from is not None:
            if dist.get_rank() == 0:
                _resumed_with_exclusions(fresh_from, 4, config.parent)
            dist.barrier()
        os.environ["KILN_FAULT"] = fault
        if sigterm_step is not None:
            main.train = lambda cfg, extra=(), s=sigterm_step: train(
                cfg, [*extra, _SigtermAfterRollback(s)]
            )
        try:
            out.append(("done", str(train_in_process(config))))
        except TrainingDivergedError as e:
            out.append(("stopped", str(e)))
        finally:
            del os.environ["KILN_FAULT"]
            main.train = train
    return out


# name: (family, sections, KILN_FAULT, SIGTERM after this step once rolled back)
ROLLBACK_RUNS = {
    # rank 0's loss x1000 at step 6: back to step 4, step 6's 8 samples left out, steps 5-6 at
    # half the scheduled rate
    "llama-zero0": (
        "llama",
        {"health__rollback_lr_scale": 0.5, "health__rollback_cooldown_steps": 2},
        "spike@rank0:step6:x1000",
        None,
    ),
    "t5-zero3": ("t5", {"parallel__zero_stage": 3}, "spike@rank1:step6:x1000", None),
    # the same rollback, then SIGTERM: both ranks stop and save at step 6
    "sigterm": ("llama", {}, "spike@rank0:step6:x1000", 5),
    # a NaN at step 1, before the first checkpoint: skipped instead; then three divergences
    # after the step-4 checkpoint (a spike, a NaN, a spike) with at most 2 rollbacks in 10
    # steps: the third ends the run
    "cap": (
        "llama",
        {
            "checkpoint__save_every": 4,
            "health__on_nonfinite": "rollback",
            "health__max_rollbacks": 2,
            "health__rollback_window": 10,
        },
        "nan@rank0:step1,spike@rank0:step5:x1000,nan@rank1:step6,spike@rank0:step7:x1000",
        None,
    ),
}


def _config(name: str, tmp: Path, prepared_data: Path, prepared_t5_data: Path) -> Path:
    family, sections, _, _ = ROLLBACK_RUNS[name]
    data = prepared_t5_data if family == "t5" else prepared_data
    sections = {
        "train__max_steps": 8,
        "train__eval_samples": 2,
        "checkpoint__save_every": 2,
        "checkpoint__keep_last": 10,
        "health__window": 3,
        "health__on_spike": "rollback",
        **sections,
    }
    return train_config(tmp, data, **(t5_sections(**sections) if family == "t5" else sections))


@pytest.fixture(scope="module")
def rollback_runs(prepared_data, prepared_t5_data, tmp_path_factory) -> dict[str, tuple[str, str]]:
    """Each run of ROLLBACK_RUNS on 2 ranks, then (``fresh-<name>``) the rolled-back runs of
    llama-zero0 and t5-zero3 started afresh from the checkpoint they rolled back to (step 4),
    with their exclusions, without faults; in one worker start-up."""
    runs, names = [], [*ROLLBACK_RUNS, "fresh-llama-zero0", "fresh-t5-zero3"]
    for name in names:
        source = name.removeprefix("fresh-")
        tmp = tmp_path_factory.mktemp(name)
        config = _config(source, tmp, prepared_data, prepared_t5_data)
        _, _, fault, sigterm_step = ROLLBACK_RUNS[source]
        if name == source:
            runs.append((fault, config, sigterm_step, None))
        else:  # the source's run folder: its config's tmp_path / "run"
            runs.append(("", config, None, runs[names.index(source)][1].parent / "run"))
    results = run_distributed(_rollback_worker, 2, *runs)[0]
    return dict(zip(names, results, strict=True))


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "health.jsonl").read_text().splitlines()]


def _resumed_with_exclusions(run: Path, step: int, tmp: Path) -> Path:
    """A new run folder holding ``run``'s checkpoint of ``step`` with the exclusions, rollbacks
    and cool-down of ``run``'s final state, as a fresh run resuming there would have them."""
    final = read_trainer_state(run / "checkpoints" / tag_for(8))
    new = tmp / "run"
    ckpt = new / "checkpoints" / tag_for(step)
    shutil.copytree(run / "checkpoints" / tag_for(step), ckpt)
    (new / "checkpoints" / "latest").write_text(ckpt.name)
    state = read_trainer_state(ckpt)
    keys = ("excluded_samples", "rollbacks", "lr_cooldown_until")
    state.update({k: final[k] for k in keys})
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    return new


def _ids(data, global_indices) -> list[int]:
    d, s = data.sampler(np.asarray(global_indices, dtype=np.int64))
    return (d * SAMPLE_ID_STRIDE + s).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-zero0", "t5-zero3"])
def test_rollback_goes_back_excludes_the_step_and_matches_a_fresh_resume(rollback_runs, name):
    status, run = rollback_runs[name]
    fresh_status, fresh = rollback_runs[f"fresh-{name}"]
    assert status == fresh_status == "done", (run, fresh)
    run, fresh = Path(run), Path(fresh)
    (event,) = [e for e in _events(run) if e["action"] == "rollback"]
    assert (event["step"], event["kind"], event["rollback_to"]) == (6, "loss_spike", 4)
    final = read_trainer_state(run / "checkpoints" / tag_for(8))
    assert final["step"] == 8  # it finished unattended
    assert final["excluded_samples"] == list(range(40, 48))  # step 6's global indices
    assert final["rollbacks"] == [{"step": 6, "to_step": 4}]
    # every checkpoint saved after the rollback keeps the exclusions; the one before has none
    assert (
        read_trainer_state(run / "checkpoints" / tag_for(6))["excluded_samples"]
        == final["excluded_samples"]
    )
    assert read_trainer_state(run / "checkpoints" / tag_for(4))["excluded_samples"] == []
    # the losses after the rollback are those of a fresh run resumed there with the exclusions
    got, want = step_losses(run), step_losses(fresh)
    assert sorted(got) == list(range(1, 9)) and sorted(want) == [5, 6, 7, 8]
    for s in (5, 6, 7, 8):
        assert got[s] == pytest.approx(want[s], abs=1e-6), (s, got[s], want[s])
    # one sample-id record per step; step 6 now reads the 8 samples after the excluded ones
    cfg = load_config(run / "config.yaml")
    data = open_train_data(cfg)
    ids = step_sample_ids(run)
    assert ids == {**step_sample_ids(fresh), **{s: ids[s] for s in range(1, 5)}}
    assert ids[6] == sorted(_ids(data, range(48, 56)))
    excluded = set(_ids(data, range(40, 48)))
    assert set(event["sample_ids"]) <= excluded  # the spiking rank's samples of step 6
    assert not excluded & {i for s in ids for i in ids[s]}
    # kiln replay reads the order with the run's exclusions: step 7 (after the rollback) from
    # the checkpoint of step 6, to the logged loss's last digit
    r = replay_step(run, 7, top=1)
    assert r.loss == got[7] == r.logged_loss
    assert sorted(s.sample_id for s in r.samples) == ids[7]


@pytest.mark.slow
def test_rollback_cools_the_learning_rate_down(rollback_runs):
    run = Path(rollback_runs["llama-zero0"][1])
    train = load_config(run / "config.yaml").train
    rates = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "lr" in record:
            rates[record["step"]] = record["lr"]
    scheduled = {s: train.lr * lr_lambda(train)(s - 1) for s in range(1, 9)}
    # steps 5 and 6 after the rollback to step 4 at half the rate, the others at the schedule's
    assert rates == pytest.approx(
        {s: r * (0.5 if s in (5, 6) else 1) for s, r in scheduled.items()}
    )
    # the training record of a card published from this run names the rollback
    rows = dict(
        _training_rows(
            load_config(run / "config.yaml"), read_trainer_state(run / "checkpoints" / tag_for(8))
        )
    )
    assert rows["rollbacks"] == "1 (step 6 to step 4)"
    assert rows["excluded samples"].endswith(": 40-47")


@pytest.mark.slow
def test_rollback_then_sigterm_then_resume_on_one_process(rollback_runs):
    """Rolled back at step 6, stopped by SIGTERM after step 6, resumed on 1 process to step 8:
    the run trained every sample of the uninterrupted schedule but step 6's once, and none of
    step 6's."""
    status, run = rollback_runs["sigterm"]
    assert status == "done", run
    run = Path(run)
    stopped = read_trainer_state(latest_checkpoint(run))
    assert stopped["step"] == 6 and stopped["excluded_samples"] == list(range(40, 48))
    config = run.parent / "config.yaml"
    run_distributed(train_runs, 1, config)
    assert read_trainer_state(run / "checkpoints" / tag_for(8))["step"] == 8
    ids = step_sample_ids(run)
    assert sorted(ids) == list(range(1, 9))
    trained = sorted(i for s in ids for i in ids[s])
    data = open_train_data(load_config(config))
    schedule = _ids(data, range(72))  # the uninterrupted order, 8 steps and the excluded 8
    excluded = _ids(data, range(40, 48))
    assert trained == sorted(i for g, i in enumerate(schedule) if not 40 <= g < 48)
    assert not set(excluded) & set(trained)


@pytest.mark.slow
def test_repeated_divergence_hits_the_rollback_cap(rollback_runs):
    status, message = rollback_runs["cap"]
    assert status == "stopped", message
    assert "training keeps diverging: step 7: loss spike" in message
    assert "step 5 (rolled back to step 4); step 6 (rolled back to step 4)" in message
    assert "health.max_rollbacks=2 is reached" in message
    run = Path(message.split("the events and their sample ids are in ")[1].split("health.jsonl")[0])
    events = [(e["step"], e["kind"], e["action"], e["rollback_to"]) for e in _events(run)]
    assert events == [
        (1, "nonfinite_loss", "skip_step", None),
        (5, "loss_spike", "rollback", 4),
        (6, "nonfinite_loss", "rollback", 4),
        (7, "loss_spike", "stop", None),
    ]
    state = read_trainer_state(run / "checkpoints" / tag_for(7))  # saved, as `stop` saves
    # step 5's first samples, then step 6's of the second pass (which read 40-47 as step 5)
    assert state["excluded_samples"] == [*range(32, 40), *range(48, 56)]
    assert sorted(step_losses(run)) == [1, 2, 3, 4, 5, 6, 7]
