"""Batches prepared ahead in DataLoader workers (trainer/data/prefetch.py, data.prefetch_steps):
the same batches as the synchronous path in the same order, across jumps (resume, rollback) and
exclusions; worker errors raised as the synchronous path raises them; and, in the real loop on 2
gloo ranks for both families and a 2-stage pipeline, the same sample ids and losses with
prefetching on and off, across evaluation, a rollback and a resume, with the data-wait metric."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from conftest import step_losses, step_sample_ids, t5_sections, train_config
from distributed import run_distributed

from trainer.config import batch_plan, load_config
from trainer.data.dataset import open_train_data
from trainer.data.prefetch import Prefetcher, micro_batch

HANG_S = 120  # a request that takes longer than this hangs


def _data(tmp_path: Path, data_root: Path, family: str):
    """The TrainData, plan (2 data-parallel ranks, 2 micro-batches of 2 per step) and config of
    the debug preset of ``family`` over the prepared shakespeare data."""
    from model.tokenizer import Tokenizer
    from trainer.objectives import build_objective

    sections = t5_sections() if family == "t5" else {}
    cfg = load_config(train_config(tmp_path, data_root, train__max_steps=20, **sections))
    tokenizer = Tokenizer.load(cfg.tokenizer_path)
    data = open_train_data(cfg, build_objective(cfg, tokenizer.sentinel_ids))
    return data, batch_plan(cfg, 2), cfg


def _same(got, want) -> None:
    assert sorted(got.inputs) == sorted(want.inputs)
    for k in want.inputs:
        torch.testing.assert_close(got.inputs[k], want.inputs[k], rtol=0, atol=0)
    torch.testing.assert_close(got.labels, want.labels, rtol=0, atol=0)
    np.testing.assert_array_equal(got.sample_ids, want.sample_ids)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_prefetched_batches_are_the_synchronous_ones(
    family, prepared_data, prepared_t5_data, tmp_path
):
    """Steps in order, then a jump back (a rollback), an exclusion (its exclusions), a jump
    ahead (a resume) and a request inside a step: every batch equals the synchronous path's
    with the exclusions of the moment, the workers restart at each break of the order and only
    then, and the global torch RNG (the model's dropout) is not drawn from."""
    data, plan, _ = _data(tmp_path, prepared_t5_data if family == "t5" else prepared_data, family)
    prefetcher = Prefetcher(data, plan, 1, prefetch_steps=2, max_steps=20)
    rng = torch.get_rng_state()
    requests = [(s, m) for s in range(4) for m in range(2)]
    requests += [(1, 0), (1, 1), "exclude", (2, 0), (2, 1), (9, 0), (9, 1), (10, 1), (11, 0)]
    starts = []
    with ThreadPoolExecutor(1) as pool:
        for request in requests:
            if request == "exclude":
                data.exclude(np.arange(20, 28))  # all of step 2's (global batch 8) and more
                continue
            got = pool.submit(prefetcher.get, *request).result(timeout=HANG_S)
            _same(got, micro_batch(data, plan, 1, *request))
            starts.append(prefetcher.starts)
    prefetcher.close()
    # restarts: the first request, the jump back, the exclusion, the jump ahead, mid-step
    assert starts == [1] * 8 + [2, 2, 3, 3, 4, 4, 5, 5]
    assert torch.equal(torch.get_rng_state(), rng)
    # the exclusion moved step 2 past the excluded global indices
    ids = set(micro_batch(data, plan, 0, 2, 0).sample_ids.tolist())
    d, s = data.sampler(np.arange(20, 28))
    assert not ids & set((d * 2**40 + s).tolist())


def test_prefetch_off_reads_in_the_training_process(prepared_data, tmp_path):
    data, plan, _ = _data(tmp_path, prepared_data, "llama")
    prefetcher = Prefetcher(data, plan, 0, prefetch_steps=0, max_steps=20)
    prefetcher.start(0)
    _same(prefetcher.get(3, 1), micro_batch(data, plan, 0, 3, 1))
    assert prefetcher.starts == 0


def test_a_damaged_shard_raises_the_synchronous_error(prepared_data, tmp_path):
    """A shard cut short after the dataset was opened: the worker's read raises the error the
    synchronous read raises (same type, same message), within a bounded time."""
    root = tmp_path / "data"
    shutil.copytree(prepared_data, root)
    data, plan, _ = _data(tmp_path, root, "llama")
    (shard,) = data.datasets[0].shards()
    with open(shard[0], "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    with pytest.raises(ValueError, match="damaged or changed while in use") as sync:
        micro_batch(data, plan, 0, 0, 0)
    prefetcher = Prefetcher(data, plan, 0, prefetch_steps=2, max_steps=20)
    with ThreadPoolExecutor(1) as pool, pytest.raises(ValueError) as prefetched:
        pool.submit(prefetcher.get, 0, 0).result(timeout=HANG_S)
    assert str(prefetched.value) == str(sync.value)
    assert "data prefetch worker making step 1, micro-batch 0" in prefetched.value.__notes__[0]
    assert prefetcher._iter is None  # the workers were stopped


def test_workers_outlive_the_stop_signal_sent_to_the_whole_job_step(prepared_data, tmp_path):
    """Slurm's ``scancel --signal=TERM`` (and ``--signal=USR1@N``) reaches every process of the
    step, the data workers included, while the training process finishes its step and saves: the
    workers keep serving the order (a worker that died of the signal would make the training
    process raise in the middle of the stop, one rank alone, and the job hang), and close() still
    ends them."""
    data, plan, _ = _data(tmp_path, prepared_data, "llama")
    prefetcher = Prefetcher(data, plan, 0, prefetch_steps=2, max_steps=20, workers=2)
    with ThreadPoolExecutor(1) as pool:
        _same(
            pool.submit(prefetcher.get, 0, 0).result(timeout=HANG_S),
            micro_batch(data, plan, 0, 0, 0),
        )
        workers = multiprocessing.active_children()
        assert len(workers) == 2
        for sig in ("TERM", "USR1"):  # from another process, as slurmstepd sends them
            subprocess.run(["kill", f"-{sig}", *(str(w.pid) for w in workers)], check=True)
        time.sleep(1.0)  # the signals land; the DataLoader checks on its workers at each get
        for step, micro in [(0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0)]:
            got = pool.submit(prefetcher.get, step, micro).result(timeout=HANG_S)
            _same(got, micro_batch(data, plan, 0, step, micro))
        assert all(w.is_alive() for w in workers)
    prefetcher.close()
    for worker in workers:
        worker.join(timeout=HANG_S)
    assert not any(w.is_alive() for w in workers)


def test_workers_do_not_keep_the_training_process_memory(prepared_data, tmp_path):
    """The workers are fresh processes, not forks of the training process: a fork would keep the
    pages of every tensor the training process writes after it (its parameters, optimizer
    states and swap buffers, at every step) as the child's private copy, doubling the process
    (bench/memory.py: a rank of 7 GiB under NVMe offload with a forked worker of 6.1 GiB was
    killed for memory). Here the training process writes 768 MiB after the workers started;
    each worker's unique memory stays far below it."""
    data, plan, _ = _data(tmp_path, prepared_data, "llama")
    state = torch.zeros(192 * 2**20)  # 768 MiB, as the weights and optimizer states
    prefetcher = Prefetcher(data, plan, 0, prefetch_steps=2, max_steps=20)
    with ThreadPoolExecutor(1) as pool:
        pool.submit(prefetcher.get, 0, 0).result(timeout=HANG_S)
        state.add_(1.0)  # an optimizer step
        (worker,) = multiprocessing.active_children()
        unique = psutil.Process(worker.pid).memory_full_info().uss
    prefetcher.close()
    assert unique < 384 * 2**20, f"a worker holds {unique / 2**20:.0f} MiB of its own"


# A training process that ends without closing its Prefetcher: it exits (multiprocessing ends the
# workers with a SIGTERM at interpreter exit), or it is killed (the orphaned workers end).
_UNCLOSED = """
import multiprocessing, os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_prefetch import _data
from trainer.data.prefetch import Prefetcher
data, plan, _ = _data(Path({tmp!r}), Path({data!r}), "llama")
prefetcher = Prefetcher(data, plan, 0, prefetch_steps=2, max_steps=20, workers=2)
prefetcher.get(0, 0)
print(*(w.pid for w in multiprocessing.active_children()), flush=True)
if {end!r} == "killed":
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("end", ["exits", "killed"])
def test_workers_end_with_a_training_process_that_did_not_close_them(end, prepared_data, tmp_path):
    code = _UNCLOSED.format(
        tests=str(Path(__file__).parent), tmp=str(tmp_path), data=str(prepared_data), end=end
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_S
    )
    assert proc.returncode == (0 if end == "exits" else -signal.SIGKILL), proc.stderr
    pids = [int(pid) for pid in proc.stdout.split()]
    assert len(pids) == 2

    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 10  # the orphans' watch wakes every second
    while any(running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(running(pid) for pid in pids)


def test_prefetch_config_fields():
    d = load_config(None, ["data.prefetch_steps=0", "data.prefetch_workers=2"]).data
    assert (d.prefetch_steps, d.prefetch_workers) == (0, 2)
    assert load_config(None, []).data.prefetch_steps == 2
    with pytest.raises(ValueError, match="prefetch_steps"):
        load_config(None, ["data.prefetch_steps=-1"])


# -- the real loop on 2 gloo ranks ----------------------------------------------------------------
def _loop_worker(*runs: tuple[str, Path, Path | None, float]) -> list[str]:
    """On each rank: train each ``(KILN_FAULT, config, fresh_from, slow_batch_s)`` in turn
    (``fresh_from``: start from that earlier run's step-4 checkpoint with its final exclusions;
    ``slow_batch_s``: every batch read sleeps this long first, in whichever process reads it).
    Returns the run folders."""
    import os
    import time

    import torch.distributed as dist
    from distributed import train_in_process
    from test_rollback import _resumed_with_exclusions

    from trainer.data.dataset import TrainData

    batch = TrainData.batch
    out = []
    for fault, config, fresh_from, slow_batch_s in runs:
        if fresh_from is not None:
            if dist.get_rank() == 0:
                _resumed_with_exclusions(fresh_from, 4, config.parent)
            dist.barrier()
        os.environ["KILN_FAULT"] = fault
        if slow_batch_s:
            TrainData.batch = lambda self, g, s=slow_batch_s: (time.sleep(s), batch(self, g))[1]
        try:
            out.append(str(train_in_process(config)))
        finally:
            del os.environ["KILN_FAULT"]
            TrainData.batch = batch
    return out


# name: (family, prefetch_steps, KILN_FAULT, the run resumed at its step 4 (or None), extra)
SPIKE = "spike@rank0:step6:x1000"  # a rollback from step 6 to the step-4 checkpoint
PIPELINE = {"parallel__pipeline_stages": 2, "parallel__zero_stage": 1}
LOOP_RUNS = {
    "llama-off": ("llama", 0, SPIKE, None, {}),
    "llama-on": ("llama", 2, SPIKE, None, {}),
    "llama-resumed": ("llama", 2, "", "llama-on", {}),
    "t5-off": ("t5", 0, SPIKE, None, {}),
    "t5-on": ("t5", 2, SPIKE, None, {}),
    "t5-resumed": ("t5", 2, "", "t5-on", {}),
    "llama-slow": ("llama", 0, "", None, {}),  # every batch read 0.1 s slower
    # last: a DeepSpeed engine built after a pipeline engine in the same process fails
    "pipe-off": ("llama", 0, "", None, PIPELINE),
    "pipe-on": ("llama", 2, "", None, PIPELINE),
    "pipe-resumed": ("llama", 2, "", "pipe-on", PIPELINE),
}
SLOW_BATCH_S = 0.1


@pytest.fixture(scope="module")
def loop_runs(prepared_data, prepared_t5_data, tmp_path_factory) -> dict[str, Path]:
    """Each run of LOOP_RUNS on 2 ranks (ZeRO-0 but the pipeline's ZeRO-1; 8 steps of global
    batch 8, checkpoints every 2 steps, evaluation every 3; rollback on a loss spike but with the
    pipeline), in one worker start-up."""
    runs = []
    for name, (family, prefetch, fault, source, extra) in LOOP_RUNS.items():
        sections = {
            "train__max_steps": 8,
            "train__eval_every": 3,
            "train__eval_samples": 4,
            "checkpoint__save_every": 2,
            "checkpoint__keep_last": 10,
            "data__prefetch_steps": prefetch,
            **extra,
        }
        if not extra:  # the pipeline engine cannot skip an update, so it cannot roll back
            sections.update(health__window=3, health__on_spike="rollback")
        data = prepared_t5_data if family == "t5" else prepared_data
        config = train_config(
            tmp_path_factory.mktemp(name),
            data,
            **(t5_sections(**sections) if family == "t5" else sections),
        )
        fresh_from = (
            None if source is None else Path(runs[list(LOOP_RUNS).index(source)][1].parent / "run")
        )
        slow = SLOW_BATCH_S if name == "llama-slow" else 0.0
        runs.append((fault, config, fresh_from, slow))
    folders = run_distributed(_loop_worker, 2, *runs)[0]
    return {name: Path(f) for name, f in zip(LOOP_RUNS, folders, strict=True)}


def _records(run: Path, key: str) -> dict[int, dict]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            out[record["step"]] = record
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "t5", "pipe"])
def test_prefetch_keeps_the_order_and_the_losses(loop_runs, family):
    """Prefetching on and off: the same sample ids and the same losses (training and
    validation) at every step, through a rollback (steps 5-6 trained again after going back to
    step 4, step 6's samples left out; not on the pipeline); and a run resumed at step 4 with
    prefetching on continues as the uninterrupted one."""
    off, on, resumed = (loop_runs[f"{family}-{k}"] for k in ("off", "on", "resumed"))
    ids = step_sample_ids(on)
    assert sorted(ids) == list(range(1, 9))
    assert ids == step_sample_ids(off)
    assert step_losses(on) == step_losses(off)  # the same arithmetic on the same batches
    assert _records(on, "val_loss").keys() == {0, 3, 6, 8}
    assert {s: r["val_loss"] for s, r in _records(on, "val_loss").items()} == {
        s: r["val_loss"] for s, r in _records(off, "val_loss").items()
    }
    rolled = family != "pipe"
    for run in (on, off):
        events = (run / "health.jsonl").read_text().splitlines() if rolled else []
        assert [json.loads(e)["rollback_to"] for e in events] == ([4] if rolled else [])
    # resumed at step 4 (with the rollback's exclusions): steps 5-8 as the uninterrupted run's
    got, want = step_losses(resumed), step_losses(on)
    assert sorted(got) == [5, 6, 7, 8]
    for s in got:
        assert got[s] == pytest.approx(want[s], abs=1e-6), (s, got[s], want[s])
    assert step_sample_ids(resumed) == {s: ids[s] for s in (5, 6, 7, 8)}


@pytest.mark.slow
def test_data_wait_metric(loop_runs):
    """data_wait_s / data_wait_pct at every logged step, within [0, 100] %; a run whose batch
    reads are 0.1 s slower waits about 0.2 s more per step (2 micro-batches per rank)."""
    for name, run in loop_runs.items():
        for step, r in _records(run, "loss").items():
            assert 0 <= r["data_wait_pct"] <= 100 and r["data_wait_s"] >= 0, (name, step, r)
    slow = _records(loop_runs["llama-slow"], "loss")
    fast = _records(loop_runs["llama-off"], "loss")
    assert min(r["data_wait_s"] for r in slow.values()) >= 2 * SLOW_BATCH_S
    assert max(r["data_wait_s"] for r in fast.values()) < SLOW_BATCH_S
    assert min(r["data_wait_pct"] for r in slow.values()) > max(
        r["data_wait_pct"] for r in fast.values()
    )
