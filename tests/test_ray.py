"""Ray on a real local cluster (`ray start --head`, 2 CPUs): Ray Data preparation gives the local
path's shards byte for byte; a `kiln ray submit --wait` job trains the debug model on 2 Ray Train
workers with the losses of `kiln train --nproc 2`'s loop on 2 local processes; a worker killed
with SIGKILL, or one the hang watchdog ends, is restarted and the run resumes from its last
checkpoint (to the same losses, each step logged once)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import (
    REPO,
    SAMPLE,
    _source,
    kiln,
    kiln_in_process,
    step_losses,
    step_sample_ids,
    train_config,
)
from distributed import run_distributed, train_runs

from trainer import mirror
from trainer.checkpoint import latest_checkpoint, read_trainer_state
from trainer.config import load_config
from trainer.distributed import free_port

RAY = Path(sys.executable).with_name("ray")
CLUSTER_YAMLS = sorted((REPO / "configs" / "ray").glob("*.yaml"))


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A one-node Ray cluster with the dashboard (Jobs API), stopped at the end.

    `ray start --block` runs in a session of its own; killing its process group stops the
    cluster's processes without touching any other Ray on the machine."""
    temp = tmp_path_factory.mktemp("ray")
    names = (
        "port", "dashboard-port", "node-manager-port", "object-manager-port",
        "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "runtime-env-agent-port", "metrics-export-port",
    )  # fmt: skip
    chosen: list[int] = []
    while len(chosen) < len(names):  # free_port releases its port: two calls may get the same
        if (port := free_port()) not in chosen:
            chosen.append(port)
    ports = dict(zip(names, chosen, strict=True))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}"  # jobs run this venv's python
    env["RAY_DEDUP_LOGS"] = "0"
    # After a node is lost, Ray Train sizes the new group from a view of the cluster refreshed
    # every 20 s, so it may first retry the old size, waiting this long (default 60 s) for room
    # for it each time, until the view has the node dead. The wait is for the group's placement
    # group only (the workers' start-up is not in it), and a retry after it is not a failure
    # (`FailureConfig.controller_failure_limit`, unlimited).
    env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "5"
    # The GCS marks a lost node dead after 3 failed health checks 1 s apart (default 5 x 3 s),
    # so the next refresh of that view has it dead. A live node fails a check only by not
    # answering within health_check_timeout_ms (10 s, kept).
    env["RAY_health_check_period_ms"] = "1000"
    env["RAY_health_check_failure_threshold"] = "3"
    # how often Ray Train's watcher (and Kiln's PreemptionCheckpointer) look for draining nodes
    env["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "0.2"
    cmd = [str(RAY), "start", "--head", "--block", "--num-cpus=2", f"--temp-dir={temp}"]
    cmd += [f"--{k}={v}" for k, v in ports.items()]
    cmd += ["--dashboard-host=127.0.0.1", "--include-dashboard=true", "--disable-usage-stats"]
    log = open(temp / "ray-start.log", "w")  # noqa: SIM115 (open for the cluster's lifetime)
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        _wait_for_jobs_api(dashboard, proc, temp / "ray-start.log")
        yield {
            "address": f"127.0.0.1:{ports['port']}",
            "dashboard": dashboard,
            "env": env,
            "temp": temp,
        }
    finally:
        # SIGKILL at once: after SIGTERM the GCS and `ray start` itself outlive any short wait, so
        # the cluster ended by the SIGKILL anyway (Ray's workers die with their raylet).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


def _wait_for_jobs_api(dashboard: str, proc: subprocess.Popen, log: Path) -> None:
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            JobSubmissionClient(dashboard).list_jobs()
            return
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(1)


# -- data ---------------------------------------------------------------------------------------


def test_ray_tokenizer_equals_local(ray_cluster, tmp_path):
    """Ray tasks sample the lines of 5 blocks of documents; the merged sample, and so the trained
    tokenizer (with T5 sentinels), equals the local path's byte for byte."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE.read_text()[:120_000] + "\n\n   \n\n" + SAMPLE.read_text()[-3000:])
    shas, metas = {}, {}
    for mode in ("local", "ray"):
        args = [
            f"data.root={tmp_path / mode}",
            f"data.datasets=[{{name: s, sources: [{_source(corpus)}]}}]",
            "tokenizer.vocab_size=600",
            "tokenizer.num_sentinels=8",
            "tokenizer.input_sentence_size=500",  # fewer than the corpus lines: a real sample
        ]
        command = ["tokenizer", "train", "configs/sample.yaml", *args]
        if mode == "ray":  # a `kiln` process, as a user runs it; the local path in this one
            ray = ["--ray", "--address", ray_cluster["address"], "--num-blocks", "5"]
            result = kiln(*command, *ray)
        else:
            result = kiln_in_process(*command)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        folder = tmp_path / mode / "tokenizer"
        shas[mode] = _sha256(folder / "tokenizer.model")
        metas[mode] = json.loads((folder / "tokenizer_meta.json").read_text())
    assert shas["ray"] == shas["local"]
    assert metas["ray"]["sentences_seen"] == metas["local"]["sentences_seen"] > 500
    assert metas["ray"]["sentences_sampled"] == metas["local"]["sentences_sampled"] == 500


def _data_args(root: Path, corpus: Path, tokenizer: Path, *more: str) -> list[str]:
    sources = ", ".join([_source(corpus), *more])
    return [
        f"data.root={root}",
        "data.seq_len=32",
        "data.num_proc=1",
        "data.validation_fraction=0.1",
        "data.shard_tokens=2000",  # many shards, and shard boundaries inside blocks
        f"data.datasets=[{{name: shakespeare, sources: [{sources}]}}]",
        f"tokenizer.path={tokenizer}",
    ]


def test_ray_prepare_equals_local(ray_cluster, prepared_data, tmp_path):
    corpus = tmp_path / "corpus.txt"
    # 60 KB in paragraphs, some separated by lines of spaces; then json records with an empty
    # one, one without the text field and a malformed line, each counted at its place
    text = SAMPLE.read_text()
    corpus.write_text(text[:30_000] + "\n \n" + text[30_000:60_000] + "\n\n \t\n\n" + text[-2000:])
    records = tmp_path / "records.jsonl"
    lines = [json.dumps({"text": p}) for p in text[60_000:70_000].split("\n\n") if p.strip()]
    lines[3:3] = ['{"text": "  "}', '{"id": 1}', '{"text": "cut']
    records.write_text("\n".join(lines) + "\n")
    tokenizer = prepared_data / "tokenizer" / "tokenizer.model"
    manifests, checksums = {}, {}
    modes = [("local", []), ("ray3", ["--num-blocks", "3"]), ("ray7", ["--num-blocks", "7"])]
    for mode, extra in modes:
        root = tmp_path / mode
        config = tmp_path / f"{mode}.yaml"
        args = _data_args(root, corpus, tokenizer, f"{{path: {records}}}")
        config.write_text(load_config(None, args).to_yaml())
        args = ["data", "prepare", str(config)]
        if mode != "local":  # a `kiln` process, as a user runs it; the local path in this one
            args += ["--ray", "--address", ray_cluster["address"], *extra]
            result = kiln(*args)
        else:
            result = kiln_in_process(*args)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        man = json.loads((root / "shakespeare" / "manifest.json").read_text())
        manifests[mode] = man
        checksums[mode] = {
            f.relative_to(root / "shakespeare").as_posix(): _sha256(f)
            for f in sorted((root / "shakespeare").rglob("*.bin"))
        }
    local = manifests["local"]
    assert len(local["splits"]["train"]["shards"]) > 5
    assert local["skipped"] == {
        "empty": 1,
        "invalid_utf8": 0,
        "missing_field": 1,
        "malformed_json": 1,
    }
    for mode in ("ray3", "ray7"):
        assert manifests[mode] == local, mode
        assert checksums[mode] == checksums["local"], mode
    # the files' checksums are the manifest's
    listed = {s["file"]: s["sha256"] for sp in local["splits"].values() for s in sp["shards"]}
    assert checksums["local"] == listed


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- training -----------------------------------------------------------------------------------

STEPS, SAVE_EVERY = 30, 10


def _submit(config: Path, cluster: dict, *extra: str) -> list[str]:
    args = ["ray", "submit", str(config), "--address", cluster["dashboard"], "--num-workers", "2"]
    return [*args, "--wait", *extra]


@pytest.fixture(scope="module")
def local_reference(prepared_data, tmp_path_factory) -> Path:
    """The debug model trained uninterrupted by the training loop of `kiln train --nproc 2`,
    in-process on 2 gloo ranks of one thread each, as torchrun's ranks and 1-CPU Ray workers
    run (`OMP_NUM_THREADS=1`)."""
    tmp = tmp_path_factory.mktemp("local")
    config = train_config(
        tmp, prepared_data, train__max_steps=STEPS, checkpoint__save_every=SAVE_EVERY
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # the spawned ranks inherit it
        (run,) = run_distributed(train_runs, 2, config)[0]
    return run


def test_submit_trains_like_local(ray_cluster, prepared_data, local_reference, tmp_path):
    # The run folder is an fsspec URL (file:// here, s3:// on a cloud): the workers train in
    # local mirrors and upload to it, and Ray Train keeps its own state there too. (The killed-
    # worker test below uses a plain path.)
    run = tmp_path / "remote" / "run"
    config = train_config(
        tmp_path,
        prepared_data,
        run_dir=f"file://{run}",
        train__max_steps=STEPS,
        checkpoint__save_every=SAVE_EVERY,
        data__prefetch_steps=2,  # workers spawned from a Ray worker; the reference reads in-step
    )
    result = kiln(*_submit(config, ray_cluster))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    assert not mirror.mirror_dir(f"file://{run}").exists()  # the finished run deleted it
    assert "submitted Ray job raysubmit_" in out and "ray job logs" in out
    assert "Started training worker group of size 2" in out
    assert read_trainer_state(latest_checkpoint(run))["step"] == STEPS  # read at the URL itself
    assert (run / "ray").is_dir()
    want, got = step_losses(local_reference), step_losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == want  # same ranks, same gloo reductions, same threads: bitwise equal
    assert step_sample_ids(run) == step_sample_ids(local_reference)


def test_submit_refuses_a_bad_config_before_submitting(ray_cluster, prepared_data, tmp_path):
    config = train_config(tmp_path, prepared_data)  # global batch 8 = 2 x accumulation x ranks
    result = kiln_in_process(*_submit(config, ray_cluster), "train.micro_batch_size=3")
    assert result.returncode != 0
    assert "global_batch_size" in result.stderr and "submitted" not in result.stdout


def test_a_health_stop_ends_the_job_without_a_restart(ray_cluster, prepared_data, tmp_path):
    """health.on_spike=stop under Ray: the workers save and stop at the spike, and Ray does not
    restart the group (which would train on past the step the user asked to stop at); the job
    fails with the supervisor's message, once."""
    config = train_config(
        tmp_path,
        prepared_data,
        train__max_steps=STEPS,
        checkpoint__save_every=SAVE_EVERY,
        health__window=3,
        health__on_spike="stop",
    )
    result = kiln(
        *_submit(config, ray_cluster), extra_env={"KILN_FAULT": "spike@rank1:step5:x1000"}
    )
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-6000:]
    assert out.count("Started training worker group of size 2") == 1, out[-6000:]
    assert "training stopped at step 5: loss spike" in out, out[-6000:]
    assert "with health.on_spike=stop" in out and "(on ranks 0, 1)" in out, out[-6000:]
    assert read_trainer_state(latest_checkpoint(tmp_path / "run"))["step"] == 5
    assert "Traceback" not in out.split("Error:")[-1], out[-6000:]


def test_killed_worker_is_restarted_and_the_run_resumes(
    ray_cluster, prepared_data, local_reference, tmp_path
):
    """A SIGKILLed worker: Ray restarts the group, which resumes from the newest checkpoint.
    wandb (offline) runs on rank 0 and the restarted group logs to the same wandb run."""
    config = train_config(
        tmp_path,
        prepared_data,
        train__max_steps=STEPS,
        checkpoint__save_every=SAVE_EVERY,
        tracking__wandb_mode="offline",
    )
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "launcher.cli", *_submit(config, ray_cluster)]
    log = tmp_path / "submit.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        try:
            # kill a worker once a checkpoint exists and some steps after it are logged
            deadline = time.time() + 300
            while not _logged_steps(run) or max(_logged_steps(run)) < SAVE_EVERY + 2:
                assert proc.poll() is None, log.read_text()[-5000:]
                assert time.time() < deadline, "the run did not get past the first checkpoint"
                time.sleep(0.05)
            workers = _train_workers(ray_cluster)
            assert len(workers) == 2
            os.kill(workers[0].pid, signal.SIGKILL)
            killed_at = max(_logged_steps(run))
            resume_from = read_trainer_state(latest_checkpoint(run))["step"]
            proc.wait(timeout=400)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert proc.returncode == 0, text[-6000:]
    assert SAVE_EVERY <= resume_from < killed_at < STEPS, (resume_from, killed_at)
    # Ray started a new group of workers after the kill, and the run went on from a checkpoint
    assert text.count("Started training worker group of size 2") == 2, text[-6000:]
    killed = {w.actor_id for w in workers}
    job = workers[0].job_id
    restarted = [
        a
        for a in _train_workers(ray_cluster, alive=False)
        if a.job_id == job and a.actor_id not in killed
    ]
    assert len(restarted) == 2, restarted
    # every step once, losses and data as in the uninterrupted local run
    steps = [
        json.loads(line)["step"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert steps == list(range(1, STEPS + 1))
    want, got = step_losses(local_reference), step_losses(run)
    for s in range(1, STEPS + 1):
        assert got[s] == pytest.approx(want[s], abs=1e-6), (s, got[s], want[s])
    assert step_sample_ids(run) == step_sample_ids(local_reference)
    state = read_trainer_state(latest_checkpoint(run))
    assert state["step"] == STEPS
    # one wandb session per group start, all under the run id the checkpoints keep
    sessions = sorted((run / "wandb").glob("offline-run-*"))
    assert len(sessions) == 2, sessions
    assert all((s / f"run-{state['wandb_run_id']}.wandb").is_file() for s in sessions)


def test_a_hung_worker_is_restarted_and_the_run_finishes(ray_cluster, prepared_data, tmp_path):
    """Rank 1 sleeps in step 5 with a 3 s step timeout: the workers dump their stacks and are
    killed (SIGALRM), Ray Train restarts the group, which resumes from the step-3 checkpoint
    without the fault (it fired once in this run folder) and finishes, every step logged once."""
    from trainer.watchdog import hang_reports

    steps = 8
    config = train_config(
        tmp_path, prepared_data, train__max_steps=steps, health__step_timeout=3
    )  # checkpoints every 3 steps
    run = tmp_path / "run"
    result = kiln(*_submit(config, ray_cluster), extra_env={"KILN_FAULT": "sleep@rank1:step5:s600"})
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    assert out.count("Started training worker group of size 2") == 2, out[-6000:]
    reports = hang_reports(run)
    assert "rank1.txt" in {p.name[-9:] for p in reports}, reports
    rank1 = next(p for p in reports if p.name.endswith("rank1.txt")).read_text()
    assert "in apply" in rank1 and "in train_step" in rank1, rank1  # the fault's sleep
    assert read_trainer_state(latest_checkpoint(run))["step"] == steps
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, steps + 1))
    (fired,) = (run / "faults.jsonl").read_text().splitlines()
    assert json.loads(fired)["fault"] == "sleep@rank1:step5:s600"


def test_a_job_ray_gives_up_on_after_a_hang_names_the_hang(ray_cluster, prepared_data, tmp_path):
    """With no restarts left (--max-failures 0) a hang ends the job; its driver says which rank
    hung and where the stacks are, as `kiln train` does, instead of Ray's traceback alone."""
    config = train_config(tmp_path, prepared_data, train__max_steps=4, health__step_timeout=3)
    result = kiln(
        *_submit(config, ray_cluster, "--max-failures", "0"),
        extra_env={"KILN_FAULT": "sleep@rank1:step2:s600"},
    )
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-6000:]
    assert "Error: rank" in out and "hang watchdog ended" in out, out[-6000:]
    assert "rank1.txt" in out, out[-6000:]


def _logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            steps.append(json.loads(line)["step"])
    return steps


def _train_workers(cluster: dict, alive: bool = True) -> list:
    from ray.util.state import list_actors

    filters = [("class_name", "=", "RayTrainWorker")]
    if alive:
        filters.append(("state", "=", "ALIVE"))
    return list_actors(address=cluster["dashboard"], filters=filters, limit=1000)


def test_elastic_group_grows_when_a_node_joins_and_shrinks_when_one_is_preempted(
    ray_cluster, prepared_data, local_reference, tmp_path
):
    """`--num-workers 1-2` with 2 CPUs per worker: the head node (2 CPUs) has room for one.

    The run starts on 1 rank. A second node joins: Ray grows the group to 2, which resumes from
    the newest checkpoint on 2 ranks (ZeRO-2: through a universal checkpoint). That node is then
    preempted: drained with a deadline (`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`,
    what Ray's autoscaler does when a cloud reclaims a spot node), so the workers save a
    checkpoint at once; then it goes (its processes SIGKILLed) and the group goes on with 1 rank
    from that checkpoint. The test pauses the workers (SIGSTOP) while the cluster changes, else
    the tiny model would finish first. Every step is logged once, with the data of the
    uninterrupted 2-process run and its losses to reduction-order noise."""
    steps, save_every = STEPS, SAVE_EVERY
    config = train_config(
        tmp_path,
        prepared_data,
        train__max_steps=steps,
        checkpoint__save_every=save_every,
        checkpoint__keep_last=2,
        parallel__zero_stage=2,
    )
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "launcher.cli", "ray", "submit", str(config)]
    cmd += ["--address", ray_cluster["dashboard"], "--num-workers", "1-2", "--wait"]
    cmd += ["--cpus-per-worker", "2", "--resize-interval", "1", "--max-failures", "5"]
    log = tmp_path / "submit.log"
    stopped: list[int] = []
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(log, "w"))
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        stack.callback(lambda: proc.poll() is None and proc.kill())
        stack.callback(lambda: [_signal(pid, signal.SIGCONT) for pid in stopped])

        def wait_for(what: str, ready, timeout: float = 300):
            deadline = time.time() + timeout
            while not (found := ready()):
                assert proc.poll() is None, f"{what}:\n" + log.read_text()[-6000:]
                assert time.time() < deadline, f"timed out waiting for {what}"
                time.sleep(0.02)
            return found

        def pause(workers) -> None:
            for w in workers:
                _signal(w.pid, signal.SIGSTOP)
                stopped.append(w.pid)

        def resume(workers) -> None:
            for w in workers:
                _signal(w.pid, signal.SIGCONT)

        # 1 rank; pause it at its first checkpoint
        wait_for("a checkpoint of 1 rank", lambda: _latest_world_size(run) == 1)
        first = wait_for("the worker", lambda: _train_workers(ray_cluster))
        pause(first)
        # a node joins: Ray resizes the group to 2 and it resumes on 2 ranks
        node = stack.enter_context(_extra_node(ray_cluster, num_cpus=2))
        wait_for("the resize", lambda: "from 1 -> 2 workers" in log.read_text())
        resume(first)
        wait_for("a step of 2 ranks", lambda: 2 in _logged_world_sizes(run))
        workers = wait_for("2 workers", lambda: len(w := _train_workers(ray_cluster)) == 2 and w)
        pause(workers)
        before = _latest_step(run)
        # the node is to be preempted: the workers save at once
        drain = [str(RAY), "drain-node", f"--address={ray_cluster['address']}"]
        drain += [f"--node-id={node.node_id}", "--reason=DRAIN_NODE_REASON_PREEMPTION"]
        drain += ["--reason-message=spot reclaim (test)", "--deadline-remaining-seconds=300"]
        subprocess.run(drain, env=ray_cluster["env"], check=True, capture_output=True)
        resume(workers)
        wait_for("the preemption checkpoint", lambda: _latest_step(run) != before)
        pause(workers)
        # the node goes: its processes die; the survivor fails, and the group of 1 resumes
        on_node = [w for w in workers if w.node_id == node.node_id]
        assert len(on_node) == 1, (workers, node.node_id)
        os.killpg(node.pid, signal.SIGKILL)
        _signal(on_node[0].pid, signal.SIGKILL)
        resume(workers)
        proc.wait(timeout=400)
    text = log.read_text()
    assert proc.returncode == 0, text[-6000:]
    saved = _preemption_save(text)
    assert saved is not None, text[-6000:]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    sizes = [r["world_size"] for r in records]
    # 1 rank, then 2 from a periodic checkpoint on, then 1 again from the preemption checkpoint
    changes = [s for s in range(1, steps) if sizes[s] != sizes[s - 1]]
    assert sizes[0] == 1 and [sizes[c] for c in changes] == [2, 1], sizes
    assert changes[0] % save_every == 0 and changes[1] == saved, (changes, saved)
    want, got = step_losses(local_reference), step_losses(run)
    for s in range(1, steps + 1):
        assert got[s] == pytest.approx(want[s], abs=2e-5), (s, got[s], want[s])
    assert step_sample_ids(run) == step_sample_ids(local_reference)
    assert "resuming" in text and "through a universal checkpoint" in text


@contextlib.contextmanager
def _extra_node(cluster: dict, num_cpus: int):
    """A second Ray node on this host joined to ``cluster`` (`ray start --address`), in its own
    session; yields its process (``.pid`` leads the session, ``.node_id``)."""
    from ray.util.state import list_nodes

    def alive() -> set[str]:
        nodes = list_nodes(address=cluster["dashboard"], filters=[("state", "=", "ALIVE")])
        return {n.node_id for n in nodes}

    before = alive()
    ports = ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port"]
    ports += ["dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port"]
    cmd = [str(RAY), "start", f"--address={cluster['address']}", "--block"]
    cmd += [f"--num-cpus={num_cpus}", *(f"--{p}={free_port()}" for p in ports)]
    out = open(cluster["temp"] / "extra-node.log", "a")  # noqa: SIM115 (the node's lifetime)
    proc = subprocess.Popen(
        cmd, env=cluster["env"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.time() + 120
        while not (new := alive() - before):
            assert proc.poll() is None, (cluster["temp"] / "extra-node.log").read_text()
            assert time.time() < deadline, "the node did not join"
            time.sleep(0.5)
        (proc.node_id,) = new
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        out.close()


def _latest_step(run: Path) -> int | None:
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        ckpt = latest_checkpoint(run)
        return read_trainer_state(ckpt)["step"] if ckpt is not None else None
    return None


def _logged_world_sizes(run: Path) -> set[int]:
    path = run / "metrics.jsonl"
    sizes = set()
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError, KeyError):
            sizes.add(json.loads(line)["world_size"])
    return sizes


def _preemption_save(log: str) -> int | None:
    found = re.search(r"are being preempted \(.*\): saving step (\d+) now", log)
    return int(found[1]) if found else None


def _latest_world_size(run: Path) -> int | None:
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        ckpt = latest_checkpoint(run)
        return read_trainer_state(ckpt)["world_size"] if ckpt is not None else None
    return None


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


# -- cluster launcher YAMLs ---------------------------------------------------------------------


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_is_valid_for_rays_launcher(path):
    """What `ray up` does before it starts a node: fill the provider's defaults, validate against
    Ray's schema. Kiln is copied to and installed on every node."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(config)
    assert config["file_mounts"] == {"~/kiln": "."}
    assert "cd ~/kiln && ./setup.sh" in config["setup_commands"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert all(c.startswith("source ~/kiln/.venv/bin/activate") for c in config[key])
    workers = [t for t in config["available_node_types"].values() if t["max_workers"] > 0]
    assert sum(t["min_workers"] for t in workers) >= 2


def test_cluster_yamls_exist():
    assert {p.name for p in CLUSTER_YAMLS} >= {"onprem.yaml", "aws.yaml"}


# -- submit-side checks (no cluster needed) -----------------------------------------------------


def test_num_workers_is_a_count_or_an_elastic_range():
    from launcher.ray_driver import parse_num_workers

    assert parse_num_workers("4") == 4
    assert parse_num_workers("2-8") == (2, 8)
    assert parse_num_workers("3-3") == 3
    for bad in ("0", "8-2", "two", "1-2-3", ""):
        with pytest.raises(ValueError, match="is not a worker count"):
            parse_num_workers(bad)


def test_every_size_of_an_elastic_range_must_divide_the_batch(prepared_data, tmp_path):
    from launcher import preflight
    from launcher.ray_driver import worker_counts
    from trainer.config import ConfigError

    def check_batches(cfg, workers):
        return preflight.check(cfg, worker_counts(workers), cuda_available=False)

    cfg = load_config(train_config(tmp_path, prepared_data))  # global 8, micro 2
    assert set(check_batches(cfg, (1, 2)).batches) == {1, 2}
    assert check_batches(cfg, 4).batch.gradient_accumulation_steps == 1
    with pytest.raises(ConfigError, match="data_parallel_size=3"):
        check_batches(cfg, (2, 4))


def test_the_jobs_driver_shows_a_config_error_as_one_message(prepared_data, tmp_path, capsys):
    """A config that cannot run on the cluster (the driver's pre-flight: 3 workers do not divide
    a global batch of 8) ends the driver with one message in the job's log, no traceback,
    before Ray is started."""
    import ray

    from launcher import ray_driver

    config = train_config(tmp_path, prepared_data)
    with pytest.raises(SystemExit) as exit_:
        ray_driver.main(["--config", str(config), "--num-workers", "3"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1
    assert err.startswith("Error: ") and "global_batch_size=8 is not divisible" in err, err
    assert "Traceback" not in err
    assert not ray.is_initialized()


def test_relative_paths_are_resolved_in_the_workdir(tmp_path):
    from launcher.ray_driver import absolute_paths

    cfg = load_config(
        None,
        [
            "run_dir=runs/x",
            "data.root=/shared/data",
            "data.datasets=[{name: a, sources: [{path: corpus/*.txt}, {path: /abs/b.txt}]}]",
        ],
    )
    fixed = absolute_paths(cfg, tmp_path)
    assert fixed.run_dir == str(tmp_path / "runs/x")
    assert fixed.data.root == "/shared/data"
    assert [s.path for s in fixed.data.datasets[0].sources] == [
        str(tmp_path / "corpus/*.txt"),
        "/abs/b.txt",
    ]
    assert fixed.model_dump(exclude={"run_dir", "data"}) == cfg.model_dump(
        exclude={"run_dir", "data"}
    )


def test_submit_refuses_relative_paths_without_a_workdir(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(load_config(None, ["run_dir=runs/x"]).to_yaml())
    result = kiln_in_process("ray", "submit", str(config), "--address", "http://127.0.0.1:1")
    assert result.returncode != 0
    assert "relative paths run_dir=runs/x" in result.stderr and "--workdir" in result.stderr
