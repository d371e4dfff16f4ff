"""`kiln replay` (trainer/replay.py) recomputes a logged step of real runs, and the health events
of a real run reach its offline wandb run (metrics and alerts). The fast tests share one 1-process
run of the decoder with an injected spike and NaN; the slow ones replay the session's 2-process
ZeRO, T5 and pipeline runs (tests/conftest.py)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import kiln_in_process, step_losses, train_config
from distributed import run_distributed, train_in_process

from trainer.callbacks import STEP_METRIC
from trainer.manifest import checkpoint_tag
from trainer.replay import replay_step

FAULT = "spike@rank0:step5:x1000,nan@rank0:step6"


def _train_with_fault(fault: str, config: Path) -> Path:
    os.environ["KILN_FAULT"] = fault
    try:
        return train_in_process(config)
    finally:
        del os.environ["KILN_FAULT"]


@pytest.fixture(scope="module")
def faulted_run(prepared_data, tmp_path_factory) -> Path:
    """7 steps of the debug decoder on 1 process (micro batch 2 x 4 accumulation), wandb
    offline, spike statistic over 3 steps: rank 0's loss x1000 at step 5 (``warn``) and NaN at
    step 6 (``skip_step``); checkpoints at steps 2, 4, 6 and 7."""
    config = train_config(
        tmp_path_factory.mktemp("faulted"),
        prepared_data,
        train__max_steps=7,
        train__eval_samples=2,
        checkpoint__save_every=2,
        health__window=3,
        tracking__wandb_mode="offline",
    )
    (run,) = run_distributed(_train_with_fault, 1, FAULT, config)
    return run


def _sample_ids(run: Path, step: int) -> dict[int, list[int]]:
    """The ids each rank logged for ``step`` (sample_ids/rank<r>.jsonl)."""
    out = {}
    for f in sorted((run / "sample_ids").glob("rank*.jsonl")):
        rank = int(f.stem.removeprefix("rank"))
        for line in f.read_text().splitlines():
            record = json.loads(line)
            if record["step"] == step:
                out[rank] = record["ids"]
    return out


def _check_replay(run: Path, step: int, ranks: list[int]) -> None:
    """Replay ``step``: the logged loss to the last digit, the logged sample ids of each
    data-parallel rank in ``ranks`` (the ranks that log them), and per-sample losses whose
    token-weighted mean is the step's loss."""
    r = replay_step(run, step, top=3)
    assert r.checkpoint == checkpoint_tag(step - 1)
    assert r.loss == step_losses(run)[step] == r.logged_loss  # as metrics.jsonl prints it
    logged = _sample_ids(run, step)
    for dp_rank, rank in enumerate(ranks):
        assert [s.sample_id for s in r.samples if s.rank == dp_rank] == logged[rank]
    per_replica = len(r.samples) // r.layout["data_parallel_size"]
    micro = r.layout["micro_batch_size"]
    means = []  # the loop's aggregate, recomputed from the per-sample losses (float64)
    for start in range(0, len(r.samples), per_replica):
        replica = r.samples[start : start + per_replica]
        micros = [replica[i : i + micro] for i in range(0, per_replica, micro)]
        means.append(
            sum(sum(s.loss * s.tokens for s in m) / sum(s.tokens for s in m) for m in micros)
            / len(micros)
        )
    assert sum(means) / len(means) == pytest.approx(r.loss, rel=1e-6)
    assert [s.loss for s in r.worst] == sorted((s.loss for s in r.samples), reverse=True)[:3]
    for s in r.worst:
        assert s.dataset == "shakespeare" and s.shard.startswith("train/shard-")
        assert s.documents and all(d.text is not None for d in s.documents)


def test_replay_reproduces_logged_steps_of_one_process(faulted_run):
    for step in (3, 7):  # checkpoints 2 and 6 (step 6's update was skipped)
        _check_replay(faulted_run, step, ranks=[0])


def test_replay_documents_are_the_rows_eos_pieces(faulted_run, prepared_data):
    from model.tokenizer import Tokenizer
    from trainer.data.dataset import PackedDataset

    r = replay_step(faulted_run, 3, top=8)
    tok = Tokenizer.load(prepared_data / "tokenizer" / "tokenizer.model")
    rows = PackedDataset(prepared_data / "shakespeare")
    for s in r.worst:
        row = rows[s.sequence]
        assert "".join(tok.decode(row[d.start : d.end]) for d in s.documents) == tok.decode(row)
        pieces = [d.end for d in s.documents if d.end < len(row)]
        assert all(row[e] == tok.eos_id for e in pieces)  # each piece ends at an EOS
        assert s.documents[0].starts_in_row == (rows[s.sequence - 1][-1] == tok.eos_id)


def test_replay_of_a_faulted_step_names_its_events(faulted_run):
    """Step 5's logged loss is rank 0's x1000; the replay computes the data's own loss and
    lists the step's records of health.jsonl."""
    r = replay_step(faulted_run, 5, top=1)
    assert r.loss * 1000 == pytest.approx(r.logged_loss, rel=1e-5)
    assert [(e["kind"], e["action"]) for e in r.health_events] == [
        ("loss_spike", "warn"),
        ("grad_norm_spike", "warn"),
    ]


def test_replay_cli_text_and_json(faulted_run):
    text = kiln_in_process("replay", str(faulted_run), "--step", "3", "--top", "2")
    assert text.returncode == 0, text.stderr
    loss = step_losses(faulted_run)[3]
    assert f"loss {loss!r}, logged {loss!r} (equal)" in text.stdout
    assert "worst 2:" in text.stdout and "shakespeare row" in text.stdout
    out = kiln_in_process("replay", str(faulted_run), "--step", "3", "--json")
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["loss"] == loss and len(record["worst"]) == 5 and len(record["samples"]) == 8
    assert record["layout"]["gradient_accumulation_steps"] == 4


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ("0", "--step 0: steps count from 1"),
        ("1", "keeps no weights of step 0"),
        ("2", "has no checkpoint before step 2 (checkpoints: step-00000002, step-00000004"),
        ("4", "no checkpoint of step 3, the weights step 4 started from"),
        ("8", "--step 8 is beyond the run: {run} trained steps 1 to 7"),
    ],
)
def test_replay_refuses_steps_it_cannot_replay(faulted_run, step, message):
    result = kiln_in_process("replay", str(faulted_run), "--step", step)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: ") and "Traceback" not in result.stderr
    assert message.format(run=faulted_run) in result.stderr


def test_replay_refuses_missing_data_and_folder(faulted_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(faulted_run, copy, ignore=shutil.ignore_patterns("wandb"))
    state_file = copy / "checkpoints" / checkpoint_tag(2) / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["config"]["data"]["root"] = str(tmp_path / "moved")
    state_file.write_text(json.dumps(state))
    result = kiln_in_process("replay", str(copy), "--step", "3")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"at {tmp_path / 'moved' / 'shakespeare'}" in result.stderr
    assert "is not prepared there" in result.stderr
    missing = kiln_in_process("replay", str(tmp_path / "nowhere"), "--step", "4")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_replay_of_a_url_run(faulted_run, tmp_path, cache):
    remote = tmp_path / "remote"
    shutil.copytree(faulted_run, remote, ignore=shutil.ignore_patterns("wandb"))
    r = replay_step(f"file://{remote}", 7, top=1)
    assert r.loss == step_losses(faulted_run)[7] == r.logged_loss


def wandb_records(run: Path) -> list[dict]:
    """The records of the run's offline wandb file(s), read back with wandb's own reader."""
    records = []
    for run_file in sorted((run / "wandb").glob("offline-run-*/run-*.wandb")):
        inspect = subprocess.run(
            [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_file)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if inspect.returncode != 0:  # older wandb: no python -m entry for leet
            inspect = subprocess.run(
                [Path(sys.executable).with_name("wandb"), "leet", "inspect", "--json", run_file],
                capture_output=True,
                text=True,
                timeout=120,
            )
        assert inspect.returncode == 0, inspect.stderr
        records += [json.loads(line) for line in inspect.stdout.splitlines()]
    assert records, f"no offline wandb run in {run}"
    return records


def wandb_history(records: list[dict]) -> list[tuple[int, dict]]:
    """The history records in logged order, as (``trainer/step``, metrics without it)."""
    out = []
    for r in records:
        if r["type"] == "history":
            item = dict(r["history"]["item"])
            out.append((int(item.pop(STEP_METRIC)), item))
    return out


def test_wandb_offline_run_records_health_metrics_and_alerts(faulted_run):
    """The spike (warn) and the NaN (skip_step) land in the offline run's .wandb file as
    metrics at their steps and as alerts, read back with wandb's own reader."""
    records = wandb_records(faulted_run)
    history = {}
    for step, item in wandb_history(records):
        history.setdefault(step, {}).update(item)
    events = [json.loads(line) for line in (faulted_run / "health.jsonl").read_text().splitlines()]
    spike = next(e for e in events if e["kind"] == "loss_spike")
    assert spike["step"] == 5 and spike["action"] == "warn"
    assert history[5]["health/loss_spike"] == pytest.approx(spike["value"])
    assert history[5]["health/loss_spike_threshold"] == pytest.approx(spike["threshold"])
    assert history[5]["train/loss"] == pytest.approx(spike["value"])
    norm = next(e for e in events if e["kind"] == "grad_norm_spike")  # found at step 6's check
    assert norm["step"] == 5 and history[5]["health/grad_norm_spike"] == pytest.approx(
        norm["value"]
    )
    nan = history[6]["health/nonfinite_loss"]
    assert nan == "NaN" or math.isnan(nan)
    assert history[6]["health/skipped_steps"] == 1
    alerts = [r["alert"] for r in records if r["type"] == "alert"]
    assert [(a["title"], a["level"]) for a in alerts] == [
        ("Kiln: loss spike at step 5", "WARN"),
        ("Kiln: grad norm spike at step 5", "WARN"),
        ("Kiln: nonfinite loss at step 6", "WARN"),
    ]
    assert "action skip_step" in alerts[2]["text"] and "ranks [0]" in alerts[2]["text"]
    assert f"kiln replay {faulted_run} --step 6" in alerts[2]["text"]


@pytest.mark.slow
def test_wandb_keeps_the_steps_a_rollback_trains_again(prepared_data, tmp_path):
    """A loss spike at step 5 rolls back to step 3's checkpoint (a WARN alert; the alert's
    text once raised KeyError for a rollback and ended the run); steps 4 and 5 are trained
    again (step 5 on other samples). wandb keeps both passes, in order, each record at its
    ``trainer/step``, with the losses of metrics.jsonl (wandb's own ``step`` would drop the
    records below the last)."""
    config = train_config(
        tmp_path,
        prepared_data,
        train__max_steps=6,
        checkpoint__save_every=3,
        health__window=3,
        health__on_spike="rollback",
        tracking__wandb_mode="offline",
    )
    (run,) = run_distributed(_train_with_fault, 1, "spike@rank0:step5:x1000", config)
    (event,) = [json.loads(line) for line in (run / "health.jsonl").read_text().splitlines()]
    assert (event["step"], event["action"]) == (5, "rollback")
    records = wandb_records(run)
    (alert,) = [r["alert"] for r in records if r["type"] == "alert"]
    assert (alert["title"], alert["level"]) == ("Kiln: loss spike at step 5", "WARN")
    assert "went back to step 3's checkpoint" in alert["text"]
    history = wandb_history(records)
    losses = [(step, item["train/loss"]) for step, item in history if "train/loss" in item]
    # the spiked step is not applied: its loss is the health record, between the two passes
    assert [step for step, _ in losses] == [1, 2, 3, 4, 4, 5, 6]
    (spike,) = [i for i, (step, item) in enumerate(history) if "health/loss_spike" in item]
    assert history[spike][0] == 5
    assert [step for step, item in history[spike + 1 :] if "train/loss" in item] == [4, 5, 6]
    assert losses[4][1] == losses[3][1]  # step 4's samples and weights again
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    retrained = {r["step"]: r["loss"] for r in logged if "loss" in r}  # the last pass per step
    for step, loss in losses[4:]:
        assert loss == pytest.approx(retrained[step])


# -- the session's multi-process runs (slow: they train them) ------------------------------------
@pytest.mark.parametrize("stage", [0, 3])
def test_replay_of_two_process_zero_runs(zero_runs, stage):
    _check_replay(zero_runs[stage], 4, ranks=[0, 1])


@pytest.mark.parametrize("stage", [0, 3])
def test_replay_of_two_process_t5_runs(t5_runs, stage):
    _check_replay(t5_runs[stage], 4, ranks=[0, 1])


@pytest.mark.parametrize("run", ["llama-pipe", "t5-pipe", "t5-plain"])
def test_replay_of_pipeline_runs(pipeline_runs, run):
    """2 pipeline stages on 2 processes (one replica: rank 0, the first stage, logs its ids);
    and T5 on 1 process."""
    _check_replay(pipeline_runs[run], 4, ranks=[0])
