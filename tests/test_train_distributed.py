"""Training through `kiln train` with 2 CPU processes (torchrun, gloo, DeepSpeed CPU accelerator):
ZeRO stages agree, resume is exact, resume on another number of processes neither skips nor
repeats a sample, and SIGTERM leaves a resumable checkpoint (in a URL run folder's mirror)."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, kiln_in_process, step_losses, step_sample_ids, train, train_config
from distributed import run_distributed, train_runs

from trainer.checkpoint import latest_checkpoint, read_trainer_state
from trainer.mirror import CACHE_ENV, URL_FILE, mirror_dir

# fp32, same seed, same data: the stages differ only in how gradients are reduced and the
# optimizer state is partitioned, so losses agree to float32 reduction-order noise.
STAGE_TOLERANCE = 2e-5


def continue_from(reference: Path, step: int, tmp_path: Path) -> Path:
    """A copy of ``reference``'s run folder cut back to its checkpoint at ``step``."""
    run = tmp_path / "run"
    tag = f"step-{step:08d}"
    shutil.copytree(reference / "checkpoints" / tag, run / "checkpoints" / tag)
    (run / "checkpoints" / "latest").write_text(tag)
    return run


def test_zero_stages_agree(zero_runs):
    losses = {stage: step_losses(run) for stage, run in zero_runs.items()}
    reference = torch.tensor([losses[0][s] for s in range(1, 6)])
    assert reference[-1] < reference[0]  # it learns
    for stage in (1, 2, 3):
        got = torch.tensor([losses[stage][s] for s in range(1, 6)])
        torch.testing.assert_close(got, reference, rtol=0, atol=STAGE_TOLERANCE)
    # the gradient norm before clipping: measured by the loop under ZeRO-0 (DeepSpeed keeps none
    # there), by DeepSpeed's optimizers under ZeRO 1-3; the same number either way
    norms = {stage: grad_norms(run) for stage, run in zero_runs.items()}
    assert all(math.isfinite(v) and v > 0 for v in norms[0].values())
    for stage in (1, 2, 3):
        for s in range(1, 7):
            assert norms[stage][s] == pytest.approx(norms[0][s], rel=1e-4), (stage, s)


def grad_norms(run: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["grad_norm"] for r in records if "grad_norm" in r}


RESUME_STAGES = (0, 2, 3)
ONE_PROCESS_STAGES = (1, 2, 3)


@pytest.fixture(scope="module")
def resumed(zero_runs, prepared_data, tmp_path_factory) -> dict[int, Path]:
    """`zero_runs` of stages 0, 2 and 3 cut back to step 3 and resumed on 2 processes
    (in-process, one worker start-up)."""
    configs = []
    for stage in RESUME_STAGES:
        tmp = tmp_path_factory.mktemp(f"resume{stage}")
        configs.append(train_config(tmp, prepared_data, parallel__zero_stage=stage))
        continue_from(zero_runs[stage], 3, tmp)
    runs = run_distributed(train_runs, 2, *configs)[0]
    return dict(zip(RESUME_STAGES, runs, strict=True))


@pytest.fixture(scope="module")
def resumed_on_one(zero_runs, prepared_data, tmp_path_factory) -> dict[int, Path]:
    """`zero_runs` of stages 1, 2 and 3 cut back to step 3 and resumed on 1 process: stages 1
    and 2 in-process, stage 3 through `kiln train --nproc 1`, the launch a user runs."""
    configs = {}
    for stage in ONE_PROCESS_STAGES:
        tmp = tmp_path_factory.mktemp(f"one{stage}")
        configs[stage] = train_config(tmp, prepared_data, parallel__zero_stage=stage)
        continue_from(zero_runs[stage], 3, tmp)
    runs = dict(zip((1, 2), run_distributed(train_runs, 1, configs[1], configs[2])[0], strict=True))
    runs[3] = train(configs[3], nproc=1)
    return runs


@pytest.mark.parametrize("stage", RESUME_STAGES)
def test_resume_is_exact(zero_runs, resumed, stage):
    reference, run = zero_runs[stage], resumed[stage]
    want, got = step_losses(reference), step_losses(run)
    assert sorted(got) == [4, 5, 6]
    for s in (4, 5, 6):
        assert got[s] == pytest.approx(want[s], abs=1e-6), (s, got[s], want[s])
    assert step_sample_ids(run) == {s: step_sample_ids(reference)[s] for s in (4, 5, 6)}


@pytest.mark.parametrize("stage", ONE_PROCESS_STAGES)
def test_resume_on_one_process(zero_runs, resumed_on_one, stage):
    """A 2-process ZeRO checkpoint resumes on 1 process through the universal format; the global
    batch stays 8 (accumulation goes 2 -> 4) and every sample is seen exactly once."""
    reference, run = zero_runs[stage], resumed_on_one[stage]
    assert (run / "checkpoints" / "step-00000003-universal").is_dir()
    want, got = step_losses(reference), step_losses(run)
    # The first resumed step sees the restored weights exactly. ZeRO-3's universal loader does not
    # restore the optimizer state as exactly as stages 1-2 (measured: 4e-5 after one update,
    # 3e-3 after two), so later steps are held to a looser bound there.
    assert got[4] == pytest.approx(want[4], abs=STAGE_TOLERANCE)
    later = STAGE_TOLERANCE if stage < 3 else 1e-2
    for s in (5, 6):
        assert got[s] == pytest.approx(want[s], abs=later), (s, got[s], want[s])
    ids = step_sample_ids(run)
    assert ids == {s: step_sample_ids(reference)[s] for s in (4, 5, 6)}
    before = step_sample_ids(reference)
    seen = [i for s in (1, 2, 3) for i in before[s]] + [i for s in (4, 5, 6) for i in ids[s]]
    assert len(seen) == len(set(seen)) == 6 * 8


@pytest.mark.slow
def test_sigterm_saves_and_resumes(prepared_data, tmp_path, monkeypatch):
    """SIGTERM makes both ranks save and stop; the run resumes to its end. The run folder is a
    file:// URL, so this is also the test of its mirror: a stopped run keeps it, a finished one
    deletes it after both ranks uploaded their files, but for the offline wandb runs."""
    remote = tmp_path / "remote" / "run"
    url = f"file://{remote}"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))  # the subprocesses' too
    mirror = mirror_dir(url)
    config = train_config(
        tmp_path,
        prepared_data,
        run_dir=url,
        train__max_steps=400,
        checkpoint__save_every=1000,
        tracking__wandb_mode="offline",
    )
    cmd = [sys.executable, "-m", "launcher.cli", "train", str(config), "--nproc", "2"]
    proc = subprocess.Popen(
        [*cmd, "--sample-prompt", ""], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(step_losses_or_empty(mirror)) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode()[-3000:]
    ckpt = latest_checkpoint(remote)
    assert ckpt is not None, "no checkpoint after SIGTERM"
    stopped_at = read_trainer_state(ckpt)["step"]
    assert 3 <= stopped_at < 400
    assert latest_checkpoint(mirror).name == ckpt.name  # the stopped run kept its mirror
    # the run resumes from there to the end (its training loop in-process on 2 ranks)
    run_distributed(train_runs, 2, (config, f"train.max_steps={stopped_at + 2}"))
    assert read_trainer_state(latest_checkpoint(remote))["step"] == stopped_at + 2
    assert max(step_losses(remote)) == stopped_at + 2
    for rank in (0, 1):  # each rank uploaded its last records before the mirror was deleted
        lines = (remote / "sample_ids" / f"rank{rank}.jsonl").read_text().splitlines()
        assert json.loads(lines[-1])["step"] == stopped_at + 2
    assert sorted(p.name for p in mirror.iterdir()) == [URL_FILE, "wandb"]
    # wandb (offline) resumed the same run: both sessions log under the id the checkpoint keeps
    run_id = read_trainer_state(latest_checkpoint(remote))["wandb_run_id"]
    sessions = sorted((mirror / "wandb").glob("offline-run-*"))
    assert len(sessions) == 2
    assert all(s.name.endswith(run_id) for s in sessions)
    assert all((s / f"run-{run_id}.wandb").is_file() for s in sessions)


@pytest.mark.parametrize("stage", [0, 3])
def test_generate_from_checkpoint(zero_runs, stage):
    """`kiln generate` consolidates the checkpoint (ZeRO-3 shards too) and continues a prompt."""
    args = ["generate", str(zero_runs[stage]), "--prompt", "ROMEO:", "--max-new-tokens", "12"]
    greedy = [kiln_in_process(*args, "--temperature", "0") for _ in range(2)]
    assert greedy[0].returncode == 0, greedy[0].stderr[-3000:]
    assert greedy[0].stdout.startswith("ROMEO:")
    # text after the prompt and before print's newline (a model trained 6 steps may continue
    # with newlines only: its greedy tokens depend on the initial weights, not on generate)
    assert len(greedy[0].stdout) > len("ROMEO:\n")
    assert greedy[0].stdout == greedy[1].stdout


def step_losses_or_empty(run: Path) -> dict[int, float]:
    return step_losses(run) if (run / "metrics.jsonl").is_file() else {}
