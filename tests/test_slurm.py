"""`kiln slurm` on a real two-node Slurm cluster on this host (tests/slurm_cluster.py): a 2-node
job trains exactly like `kiln train`'s loop on 2 local processes; the pre-time-limit signal makes
the job checkpoint, requeue itself and finish with every step logged once; SIGTERM (preemption,
scancel) makes it checkpoint and stop without requeueing; `--dry-run` prints a script sbatch
accepts; status / cancel / logs wrap the recorded job. Plus unit tests of the option checks, the
rendered script and the end-of-job decision."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import kiln, kiln_in_process, step_losses, step_sample_ids, train_config
from slurm_cluster import LocalSlurm, missing_binaries

from launcher.slurm import SlurmOptions, after_run, parse_time_limit, render_script
from trainer.config import load_config

MISSING = missing_binaries()
needs_slurm = pytest.mark.skipif(
    bool(MISSING),
    reason=f"Slurm binaries missing ({', '.join(MISSING)}): apt-get install slurm-wlm munge",
)
CPU_JOB = ["--nodes", "2", "--gpus-per-node", "0", "--nproc-per-node", "1", "--cpus-per-task", "1"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two slurmd nodes (n1, n2) and a slurmctld on this host; SLURM_CONF points at them."""
    slurm = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(slurm.conf)
    try:
        yield slurm
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        slurm.stop()


def submit(config: Path, *extra: str) -> str:
    result = kiln("slurm", "submit", str(config), *CPU_JOB, *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"submitted job (\d+)", result.stdout)
    assert match, result.stdout
    return match.group(1)


def job_info(cluster: LocalSlurm, job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (jobs stay there MinJobAge = 600 s after they end)."""
    out = cluster.run("scontrol", "show", "job", "-o", job_id).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def wait_for_end(cluster: LocalSlurm, job_id: str, log: Path, timeout: float = 420) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(cluster, job_id)
        if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            return info
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {info['JobState']} after {timeout} s:\n" + tail(log))


def wait_for_steps(run_dir: Path, steps: int, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").is_file() and len(logged_steps(run_dir)) >= steps:
            return
        time.sleep(0.2)
    raise AssertionError(f"the job logged no {steps} steps in {timeout} s:\n" + tail(log))


def tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.is_file() else f"({log} missing)"


def logged_steps(run_dir: Path) -> Counter:
    """How many times each training step was logged in metrics.jsonl."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return Counter(r["step"] for r in map(json.loads, lines) if "loss" in r)


# -- integration: real Slurm -------------------------------------------------------------------


@needs_slurm
@pytest.mark.slow
def test_two_node_job_matches_local_run(cluster, prepared_data, zero_runs, tmp_path):
    """The same 6 steps as a 2-node Slurm job (one rank per node) and as `kiln train`'s loop on 2
    local processes (`zero_runs`: the same config, ZeRO 0 being the default)."""
    slurm_config = train_config(tmp_path, prepared_data)
    assert load_config(slurm_config).parallel.zero_stage == 0
    job_id = submit(slurm_config)
    slurm_run = slurm_config.parent / "run"
    log = slurm_run / "slurm" / f"{job_id}.out"
    assert json.loads((slurm_run / "slurm" / "job.json").read_text())["job_id"] == job_id

    info = wait_for_end(cluster, job_id, log)
    assert info["JobState"] == "COMPLETED", tail(log)
    assert info["NodeList"] == "n[1-2]"
    assert "kiln: finished at step 6 of 6" in tail(log)

    want, got = step_losses(zero_runs[0]), step_losses(slurm_run)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    for s in want:
        assert got[s] == pytest.approx(want[s], abs=1e-6), (s, got[s], want[s])
    assert step_sample_ids(slurm_run) == step_sample_ids(zero_runs[0])

    status = kiln_in_process("slurm", "status", str(slurm_run))
    assert status.returncode == 0, status.stderr
    assert "progress: step 6 of 6" in status.stdout
    logs = kiln_in_process("slurm", "logs", str(slurm_run))
    assert "kiln: finished at step 6 of 6" in logs.stdout


@needs_slurm
@pytest.mark.slow
def test_a_failure_in_the_ranks_is_shown_once_in_the_job_log(cluster, prepared_data, tmp_path):
    """Token ids beyond the vocabulary in an unchecked shard make both ranks (one per node) fail
    in the embedding: the job fails, and its log shows the error once, from the ranks' records
    (`kiln slurm after`), naming the ranks and the traceback file; the ranks print none of
    their own."""
    import shutil

    import numpy as np

    data = tmp_path / "data"
    shutil.copytree(prepared_data, data, ignore=shutil.ignore_patterns(".cache"))
    for shard in (data / "shakespeare" / "train").glob("shard-*.bin"):
        ids = np.memmap(shard, dtype=np.uint16, mode="r+")
        ids[:] = 60_000  # the vocabulary has 512 pieces
        ids.flush()
    config = train_config(tmp_path, data, data__verify_checksums="false", train__max_steps=2)
    job_id = submit(config)
    log = tmp_path / "run" / "slurm" / f"{job_id}.out"
    info = wait_for_end(cluster, job_id, log)
    text = tail(log, 100_000)
    assert info["JobState"] == "FAILED", text
    shown = re.findall(r"IndexError on (ranks? [0-9, ]+): index out of range", text)
    assert len(shown) == 1 and shown[0] in ("ranks 0, 1", "rank 0", "rank 1"), text
    assert text.count("index out of range") == 1, text
    assert re.search(r"full traceback: \S+/run/logs/rank-[01]\.traceback\.txt", text), text
    assert "kiln: training stopped at step 0 of 2 without a stop signal" in text


@needs_slurm
@pytest.mark.slow
def test_pre_timeout_signal_checkpoints_requeues_and_completes(cluster, prepared_data, tmp_path):
    """USR1 to the job shell (what --signal=B:USR1@T sends before the time limit) mid-run: the
    ranks save, the job requeues itself, resumes from that checkpoint and finishes; every step is
    logged exactly once."""
    max_steps = 80
    config = train_config(
        tmp_path, prepared_data, train__max_steps=max_steps, checkpoint__save_every=1000
    )
    run = config.parent / "run"
    job_id = submit(config, "--time", "30", "--signal-seconds", "120")
    log = run / "slurm" / f"{job_id}.out"
    wait_for_steps(run, 3, log)
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)

    info = wait_for_end(cluster, job_id, log)
    text = tail(log, 100_000)
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert info["Restarts"] == "1", text[-4000:]
    stops = re.findall(r"kiln: stopped at step (\d+) of \d+ before the time limit; requeue", text)
    assert len(stops) == 1, text[-4000:]
    stopped_at = int(stops[0])
    assert 3 <= stopped_at < max_steps
    restart = (
        rf"kiln: job {job_id} restart 1: 2 node\(s\) x 1 rank\(s\), .* from step {stopped_at}\n"
    )
    assert re.search(restart, text), text[-4000:]
    assert f"kiln: finished at step {max_steps} of {max_steps}" in text
    # the only checkpoints are the one the signal asked for and the final one
    tags = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert tags == [f"step-{stopped_at:08d}", f"step-{max_steps:08d}"]
    steps = logged_steps(run)
    assert sorted(steps) == list(range(1, max_steps + 1))
    assert set(steps.values()) == {1}, {s: n for s, n in steps.items() if n != 1}


@needs_slurm
@pytest.mark.slow
def test_a_hung_rank_requeues_the_job_which_resumes_and_finishes(cluster, prepared_data, tmp_path):
    """Rank 1 (on node n2) sleeps in step 4 with a 3 s step timeout: both ranks dump their stacks
    and are killed, the job requeues itself (it saved step 3 since it started), resumes from
    step 3 without the fault (it fired once in this run folder) and finishes with a complete
    final checkpoint and every step logged once."""
    from trainer.checkpoint import latest_checkpoint, read_trainer_state
    from trainer.watchdog import hang_reports

    config = train_config(tmp_path, prepared_data, health__step_timeout=3)
    run = config.parent / "run"
    result = kiln(
        "slurm", "submit", str(config), *CPU_JOB,
        extra_env={"KILN_FAULT": "sleep@rank1:step4:s600"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = re.search(r"submitted job (\d+)", result.stdout).group(1)
    log = run / "slurm" / f"{job_id}.out"
    info = wait_for_end(cluster, job_id, log)
    text = tail(log, 100_000)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), text[-4000:]
    requeued = re.findall(
        r"kiln: ranks 0, 1 made no progress for 3 s \(health\.step_timeout\): the hang watchdog "
        r"ended them; their Python stacks are in (.*); requeueing to resume from the checkpoint "
        r"of step 3 of 6",
        text,
    )
    assert len(requeued) == 1, text[-4000:]
    assert rf"kiln: job {job_id} restart 1: 2 node(s) x 1 rank(s)" in text
    assert re.search(r"restart 1: .* from step 3\n", text), text[-4000:]
    assert "kiln: finished at step 6 of 6" in text
    reports = hang_reports(run)
    assert [p.name[-9:] for p in reports] == ["rank0.txt", "rank1.txt"]
    assert requeued[0] == ", ".join(str(p) for p in reports)
    assert "in apply" in reports[1].read_text()  # rank 1 in the fault's sleep
    ckpt = latest_checkpoint(run)
    assert ckpt.name == "step-00000006" and read_trainer_state(ckpt)["step"] == 6
    steps = logged_steps(run)
    assert sorted(steps) == [1, 2, 3, 4, 5, 6] and set(steps.values()) == {1}, steps


@needs_slurm
def test_dry_run_is_a_script_sbatch_accepts(cluster, prepared_data, tmp_path):
    config = train_config(tmp_path, prepared_data)
    result = kiln_in_process(
        "slurm", "submit", str(config), *CPU_JOB, "--time", "10:00", "--dry-run"
    )
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "run").exists()  # nothing written, nothing submitted
    test = cluster.run("sbatch", "--test-only", input=result.stdout, check=False)
    assert test.returncode == 0, test.stderr
    assert "to start at" in test.stderr
    assert cluster.run("squeue", "-h").stdout.strip() == ""


@needs_slurm
@pytest.mark.slow
def test_sigterm_stops_without_requeue_then_resubmit_resumes_and_cancel(
    cluster, prepared_data, tmp_path
):
    """SIGTERM to the job shell (preemption and scancel send it first): the shell passes it to the
    training step through scancel, never to srun (which would SIGKILL the step); the ranks save and
    the job ends without requeueing itself. A second submit is refused while the first job runs and
    resumes from the checkpoint afterwards; `kiln slurm cancel` cancels it."""
    # with batches made ahead: the step's signal reaches the data workers too
    config = train_config(tmp_path, prepared_data, train__max_steps=100_000, data__prefetch_steps=2)
    run = config.parent / "run"
    job_id = submit(config)
    log = run / "slurm" / f"{job_id}.out"
    status = kiln_in_process("slurm", "status", str(run))
    assert re.search(rf"\b{job_id}\b.*(PENDING|RUNNING)", status.stdout), status.stdout
    again = kiln_in_process("slurm", "submit", str(config), *CPU_JOB)
    assert again.returncode != 0
    assert f"job {job_id} of {run} is still" in again.stderr
    wait_for_steps(run, 3, log)
    cluster.run("scancel", "--signal=TERM", "--batch", job_id)
    info = wait_for_end(cluster, job_id, log)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "0"), tail(log)
    stopped = re.findall(r"kiln: stopped by SIGTERM at step (\d+) of 100000", tail(log))
    assert len(stopped) == 1, tail(log)
    assert (run / "checkpoints" / f"step-{int(stopped[0]):08d}").is_dir()
    assert "forcing job termination" not in tail(log)
    assert "no longer in the queue" in kiln_in_process("slurm", "status", str(run)).stdout

    second = submit(config)
    second_log = run / "slurm" / f"{second}.out"
    deadline = time.time() + 120
    while time.time() < deadline and "from step" not in tail(second_log):
        time.sleep(0.5)
    assert f"from step {stopped[0]}" in tail(second_log)
    cancel = kiln_in_process("slurm", "cancel", str(run))
    assert cancel.returncode == 0, cancel.stderr
    assert wait_for_end(cluster, second, second_log, timeout=120)["JobState"] == "CANCELLED"


# -- unit: options, script, decisions ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 5400), ("5:30", 330), ("4:00:00", 14400), ("2-12", 216000), ("1-0:30", 88200),
     ("1-00:00:10", 86410), ("UNLIMITED", None)],
)  # fmt: skip
def test_parse_time_limit(text, seconds):
    assert parse_time_limit(text) == seconds


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"nodes": 0}, "at least one node"),
        ({"gpus_per_node": 8, "nproc_per_node": 4}, "one rank per GPU"),
        ({"time": "4 hours"}, "not a Slurm time limit"),
        ({"time": "5", "signal_seconds": 300}, "not shorter than --time 5"),
        ({"signal_seconds": 70000}, "outside Slurm's range"),
        ({"partition": "gpu a100"}, "must be one word"),
        ({"env_setup": Path("/nonexistent/env.sh")}, "is not a file"),
    ],
)
def test_options_refused(changes, message):
    opts = {"nodes": 4, "gpus_per_node": 8, "nproc_per_node": 8, **changes}
    with pytest.raises(ValueError, match=message):
        SlurmOptions(**opts).validate()


def test_submit_refuses_a_config_that_cannot_run(prepared_data, tmp_path):
    """3 nodes x 1 rank cannot split a global batch of 8: refused before anything is written."""
    config = train_config(tmp_path, prepared_data)
    args = ["--nodes", "3", "--gpus-per-node", "0", "--nproc-per-node", "1"]
    result = kiln_in_process("slurm", "submit", str(config), *args)
    assert result.returncode != 0
    assert "train.global_batch_size=8 is not divisible" in result.stderr
    assert not (tmp_path / "run").exists()


def _script_for(tmp_path: Path, **options) -> tuple[str, object]:
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "train.max_steps=7"])
    opts = SlurmOptions(**{"nodes": 4, "gpus_per_node": 8, "nproc_per_node": 8, **options})
    return render_script(cfg, opts, workdir=tmp_path, python="/opt/venv/bin/python"), cfg


def test_rendered_script_for_4_nodes_of_8_gpus(tmp_path):
    env = tmp_path / "env.sh"
    env.write_text("module load cuda/12.4\nsource /opt/venv/bin/activate\n")
    script, cfg = _script_for(
        tmp_path, cpus_per_task=64, partition="gpu", time="2-00:00:00", account="proj",
        qos="high", constraint="h100", exclusive=True, env_setup=env, signal_seconds=600,
    )  # fmt: skip
    directives = re.findall(r"^#SBATCH (\S+)$", script, flags=re.MULTILINE)
    run = tmp_path / "run"
    assert directives == [
        "--job-name=kiln-run", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8",
        "--cpus-per-task=64", "--partition=gpu", "--time=2-00:00:00", "--account=proj",
        "--qos=high", "--constraint=h100", "--exclusive", f"--chdir={tmp_path}",
        f"--output={run}/slurm/%j.out", "--open-mode=append", "--requeue",
        "--signal=B:USR1@600",
    ]  # fmt: skip
    assert "module load cuda/12.4\nsource /opt/venv/bin/activate\n" in script
    assert "KILN_PYTHON=${KILN_PYTHON:-/opt/venv/bin/python}" in script
    assert "NPROC_PER_NODE=${KILN_NPROC_PER_NODE:-8}" in script
    assert "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}" in script
    assert "export KILN_COLLECTS_FAILURES=1" in script  # the ranks leave it to `slurm after`
    embedded = re.search(r"<<'KILN_CONFIG_EOF'\n(.*?)^KILN_CONFIG_EOF$", script, re.S | re.M)
    assert yaml.safe_load(embedded.group(1)) == cfg.model_dump(mode="json")
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_rendered_script_for_cpu_nodes_has_no_gpu_settings(tmp_path):
    script, _ = _script_for(tmp_path, gpus_per_node=0, nproc_per_node=2)
    assert "--gpus-per-node" not in script
    assert "NCCL_DEBUG" not in script
    for absent in ("--partition", "--time", "--account", "--qos", "--constraint", "--exclusive"):
        assert f"#SBATCH {absent}" not in script
    assert "#SBATCH --signal=B:USR1@300" in script
    assert "environment set-up, copied from" not in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


@pytest.mark.parametrize(
    ("kwargs", "action", "exit_code"),
    [
        ({"step": 7, "start_step": 3, "signal": "none"}, "finished", 0),
        ({"step": 7, "start_step": 3, "signal": "USR1"}, "finished", 0),  # stopped at the end
        ({"step": 5, "start_step": 3, "signal": "USR1"}, "requeue", 0),
        ({"step": 3, "start_step": 3, "signal": "USR1"}, "failed", 1),  # no progress: no loop
        ({"step": 5, "start_step": 3, "signal": "TERM"}, "stopped", 0),
        ({"step": 5, "start_step": 3, "signal": "none", "srun_exit_code": 9}, "failed", 9),
        # the hang watchdog ended the ranks: requeue only after progress
        ({"step": 5, "start_step": 3, "signal": "none", "hang": "ranks 0, 1 ..."}, "requeue", 0),
        ({"step": 3, "start_step": 3, "signal": "none", "hang": "rank 1 ..."}, "failed", 1),
        ({"step": 7, "start_step": 3, "signal": "none", "hang": "rank 1 ..."}, "finished", 0),
    ],
)
def test_end_of_job_decision(kwargs, action, exit_code):
    outcome = after_run(max_steps=7, **{"srun_exit_code": 0, **kwargs})
    assert (outcome.action, outcome.exit_code) == (action, exit_code)
