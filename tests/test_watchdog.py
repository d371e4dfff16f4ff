"""The hang watchdog (trainer/watchdog.py) and the `sleep` fault (trainer/health.py): the timer
dumps the stacks and kills a process whose step makes no progress, and leaves alone the first
step's allowance, evaluation, saves, loads and a closed watchdog (each in a fresh process, since
a firing timer ends it); hang reports; and `kiln train` on 2 processes with a rank that hangs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO, kiln, train_config

from trainer.health import FAULT_RECORD, FaultInjector, parse_faults
from trainer.watchdog import FIRST_STEP_FACTOR, describe_hangs, hang_reports, kill_grace


# -- the sleep fault ------------------------------------------------------------------------------
def test_parse_sleep_faults():
    faults = parse_faults("sleep@rank1:step4:s600, nan@rank0:step2")
    assert [(f.kind, f.rank, f.step, f.seconds) for f in faults] == [
        ("sleep", 1, 4, 600.0),
        ("nan", 0, 2, 0.0),
    ]
    assert [str(f) for f in faults] == ["sleep@rank1:step4:s600", "nan@rank0:step2"]
    assert str(parse_faults("spike@rank0:step5:x1000")[0]) == "spike@rank0:step5:x1000"
    for bad in ("sleep@rank1:step4", "sleep@rank1:step4:x600", "spike@rank0:step5:s3",
                "sleep@rank1:step4:s-1", "sleep@rank1:step4:sabc"):  # fmt: skip
        with pytest.raises(ValueError, match="sleep@rankR:stepS:sSECONDS"):
            parse_faults(bad)


def test_sleep_fault_fires_once_per_run_folder(tmp_path, monkeypatch):
    """The rank sleeps at its step, once: not again at the step's next micro-batch, nor in a
    later launch (a new injector) that trains the step again; nan/spike fire every time."""
    import torch

    slept = []
    monkeypatch.setattr("trainer.health.time.sleep", slept.append)
    record = tmp_path / FAULT_RECORD
    text = "sleep@rank1:step4:s600,nan@rank1:step4"
    for _launch in range(2):
        injector = FaultInjector(1, text, record=record)
        for step in (3, 4, 4):  # step 4 twice: two micro-batches
            loss = injector.apply(torch.tensor(2.0), step)
            assert torch.isnan(loss) == (step == 4)
    assert slept == [600.0]
    (line,) = record.read_text().splitlines()
    assert json.loads(line)["fault"] == "sleep@rank1:step4:s600"
    assert not FaultInjector(0, text, record=record)  # rank 0 has none
    unrecorded = []
    monkeypatch.setattr("trainer.health.time.sleep", unrecorded.append)
    FaultInjector(1, text).apply(torch.tensor(2.0), 4)  # no record: once per process
    assert unrecorded == [600.0]


# -- the timer, in fresh processes ----------------------------------------------------------------
# A stand-in for the Trainer whose methods sleep as told: the watchdog wraps them as it wraps the
# real loop's.
_SCRIPT = textwrap.dedent(
    """
    import sys, time, json
    from pathlib import Path
    from trainer import watchdog

    hangs, timeout, plan = Path(sys.argv[1]), float(sys.argv[2]), json.loads(sys.argv[3])
    if len(sys.argv) > 4:
        watchdog.kill_grace = lambda t: float(sys.argv[4])

    class Trainer:
        step = 0
        def train_step(self, seconds):
            time.sleep(seconds)
            self.step += 1
        def evaluate(self, seconds): time.sleep(seconds)
        def save(self, seconds): time.sleep(seconds)
        def load(self, seconds): time.sleep(seconds)
        def fail(self, seconds): raise RuntimeError("fit raised")

    trainer = Trainer()
    dog = watchdog.HangWatchdog(timeout, hangs, rank=0, world_size=1)
    dog.on_train_start(trainer)
    for name, seconds in plan:
        if name == "close":
            dog.close()
            time.sleep(seconds)
            continue
        print(name, seconds, flush=True)
        try:
            getattr(trainer, name)(seconds)
        except RuntimeError:
            dog.close()
    dog.close()
    print("done", flush=True)
    """
)


def _run_plan(tmp_path: Path, timeout: float, plan: list, grace: float | None = None):
    args = [sys.executable, "-c", _SCRIPT, str(tmp_path / "hangs"), str(timeout), json.dumps(plan)]
    if grace is not None:
        args.append(str(grace))
    start = time.monotonic()
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    return result, time.monotonic() - start


def test_a_step_without_progress_dumps_the_stacks_then_kills_the_process(tmp_path):
    """The second step sleeps past the timeout: the report gets the stacks of every thread (the
    sleeping frame included) at the timeout, and SIGALRM ends the process kill_grace later."""
    timeout = 0.5
    plan = [["train_step", 0.0], ["train_step", 30.0]]
    result, elapsed = _run_plan(tmp_path, timeout, plan)
    assert result.returncode == -signal.SIGALRM, result.stdout + result.stderr
    assert "done" not in result.stdout
    assert timeout + kill_grace(timeout) <= elapsed < 20
    (report,) = hang_reports(tmp_path)
    text = report.read_text()
    assert re.match(r"\d{8}T\d{6}Z-rank0\.txt$", report.name)
    assert text.startswith("kiln hang watchdog: rank 0 of 1 on ")
    assert "Timeout (0:00:00.500000)!" in text
    assert re.search(r'File "<string>", line \d+ in train_step', text), text
    assert describe_hangs([report]).startswith("rank 0 made no progress for 0.5 s")


def test_the_first_step_evaluation_saves_loads_and_a_closed_watchdog_are_not_timed(tmp_path):
    """With a 0.4 s timeout (grace 0.2 s): the first step may take FIRST_STEP_FACTOR x 0.4 s;
    evaluation, save and load take 1 s each and reset the clock; a closed watchdog (after fit
    raised, or at the end) leaves the process alone. Nothing is dumped, the report is deleted."""
    assert FIRST_STEP_FACTOR * 0.4 > 0.9
    plan = [
        ["train_step", 0.9],  # the first step's allowance
        ["evaluate", 1.0], ["train_step", 0.1], ["save", 1.0], ["load", 1.0],
        ["train_step", 0.1], ["fail", 0.0], ["train_step", 1.0],  # fit raised: closed
    ]  # fmt: skip
    result, _ = _run_plan(tmp_path, 0.4, plan, grace=0.2)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.endswith("done\n")
    assert list((tmp_path / "hangs").iterdir()) == []
    # the same plan with a step that overruns: this one is timed
    result, _ = _run_plan(tmp_path, 0.4, [["train_step", 0.0], ["train_step", 1.0]], grace=0.2)
    assert result.returncode == -signal.SIGALRM, result.stdout + result.stderr


def test_a_process_that_handles_sigalrm_is_refused(tmp_path):
    """A SIGALRM handler (Python runs it only between bytecodes of the main thread) could not end
    a rank stuck in a collective: the watchdog refuses to start, saying how to go on."""
    from types import SimpleNamespace

    from trainer.errors import ConfigError
    from trainer.watchdog import HangWatchdog

    previous = signal.signal(signal.SIGALRM, lambda *_: None)
    try:
        with pytest.raises(ConfigError, match=r"set health\.step_timeout=0 to train without"):
            HangWatchdog(5.0, tmp_path / "hangs", 0, 1).on_train_start(SimpleNamespace(step=0))
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert not (tmp_path / "hangs").exists()


def test_hang_reports_are_the_dumps_since_a_time(tmp_path):
    hangs = tmp_path / "hangs"
    hangs.mkdir()
    header = "kiln hang watchdog: rank {} of 2 ..., health.step_timeout 5 s (first step 3x).\n"
    old = hangs / "20260101T000000Z-rank0.txt"
    old.write_text(header.format(0) + "Timeout (0:00:05)!\nThread 0x1 (most recent call first):\n")
    os.utime(old, (100.0, 100.0))
    for rank in (1, 0):
        path = hangs / f"20260102T000000Z-rank{rank}.txt"
        path.write_text(header.format(rank) + "Timeout (0:00:05)!\n")
    (hangs / "20260102T000000Z-rank2.txt").write_text(header.format(2))  # no dump: killed else
    assert [p.name for p in hang_reports(tmp_path)] == [
        "20260101T000000Z-rank0.txt", "20260102T000000Z-rank0.txt", "20260102T000000Z-rank1.txt",
    ]  # fmt: skip
    recent = hang_reports(tmp_path, since=1000.0)
    assert [p.name for p in recent] == ["20260102T000000Z-rank0.txt", "20260102T000000Z-rank1.txt"]
    assert describe_hangs(recent).startswith(
        "ranks 0, 1 made no progress for 5 s (health.step_timeout): the hang watchdog ended them"
    )
    assert hang_reports(tmp_path / "elsewhere") == []


def test_step_timeout_is_validated():
    from trainer.config import load_config
    from trainer.errors import ConfigError

    assert load_config(None, []).health.step_timeout == 1800
    assert load_config(None, ["health.step_timeout=0"]).health.step_timeout == 0
    assert load_config(None, ["health.step_timeout=null"]).health.step_timeout is None
    with pytest.raises(ConfigError, match=r"health\.step_timeout=-1"):
        load_config(None, ["health.step_timeout=-1"])


# -- the real loop on 2 processes -----------------------------------------------------------------
@pytest.mark.slow
def test_a_rank_that_hangs_ends_the_run_with_a_stack_per_rank(prepared_data, tmp_path):
    """`kiln train --nproc 2` with rank 1 asleep in step 4 and a 3 s step timeout: both ranks
    dump their stacks (rank 1 in the fault's sleep, rank 0 waiting for it in a collective of
    the step) and are killed; the command fails within the timeout plus a margin, naming the
    hang; the run keeps its step-3 checkpoint to resume from."""
    timeout = 3.0
    config = train_config(tmp_path, prepared_data, health__step_timeout=timeout)
    run = tmp_path / "run"
    result = kiln(
        "train", str(config), "--nproc", "2", "--sample-prompt", "",
        extra_env={"KILN_FAULT": "sleep@rank1:step4:s600"}, timeout=300,
    )  # fmt: skip
    ended = time.time()
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-4000:]
    (fired,) = [json.loads(line) for line in (run / FAULT_RECORD).read_text().splitlines()]
    assert fired["fault"] == "sleep@rank1:step4:s600"
    # from the sleep to the command's end: the timeout, the kill grace, torchrun's reaction
    killed = timeout + kill_grace(timeout)
    assert killed <= ended - fired["time"] < killed + 15
    reports = hang_reports(run)
    assert [int(p.name[-5]) for p in reports] == [0, 1], out[-4000:]
    rank0, rank1 = (p.read_text() for p in reports)
    assert re.search(r"in _first_firing|in apply", rank1) and "in train_step" in rank1, rank1
    assert "time.sleep" not in rank0 and "in train_step" in rank0, rank0
    assert re.search(r"in (all_reduce|allreduce|_agree|backward|wait)", rank0), rank0
    assert "signal SIGALRM" in out, out[-4000:]
    assert "made no progress for 3 s (health.step_timeout)" in out, out[-4000:]
    assert (run / "checkpoints" / "step-00000003").is_dir()
