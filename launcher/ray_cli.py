"""``kiln ray``: start and stop a Ray cluster, submit a training job to it.

``up`` / ``down`` wrap Ray's cluster launcher (``ray.autoscaler.sdk``, what ``ray up -y`` /
``ray down -y`` run) on a cluster YAML such as ``configs/ray/aws.yaml``. ``submit`` validates the
config here, then submits a Ray job (the Jobs API of the cluster's dashboard, port 8265) whose
driver is :mod:`launcher.ray_driver`: Ray Data prepares what is missing, Ray Train trains.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from typing import Any

import click

from launcher import preflight
from launcher.preflight import user_errors
from trainer.config import KilnConfig
from trainer.health import FAULT_ENV
from trainer.storage import is_relative_path

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def prepare_on_ray(
    cfg: KilnConfig, *, force: bool, address: str | None, num_blocks: int | None
) -> list[dict[str, Any]]:
    """``kiln data prepare --ray``: connect to the cluster at ``address`` (default: RAY_ADDRESS,
    else one started on this machine, else a new local one) and prepare every dataset there."""
    import ray

    from launcher.ray_prepare import prepare_all_ray

    ray.init(address=address, log_to_driver=False)
    try:
        return prepare_all_ray(cfg, force=force, num_blocks=num_blocks)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    finally:
        ray.shutdown()


def train_tokenizer_on_ray_cluster(cfg: KilnConfig, *, address: str | None, num_blocks):
    """``kiln tokenizer train --ray``: sample the corpus on the cluster at ``address``, train
    here (:func:`launcher.ray_prepare.train_tokenizer_on_ray`)."""
    import ray

    from launcher.ray_prepare import train_tokenizer_on_ray

    ray.init(address=address, log_to_driver=False)
    try:
        return train_tokenizer_on_ray(cfg, num_blocks=num_blocks)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    finally:
        ray.shutdown()


@click.group("ray")
def ray_group() -> None:
    """Ray cluster: up, down, submit a training job."""


@ray_group.command("up")
@click.argument("cluster_yaml", type=click.Path(exists=True, dir_okay=False))
@click.option("--no-restart", is_flag=True, help="update the nodes without restarting Ray")
def up(cluster_yaml, no_restart):
    """Start or update the Ray cluster of CLUSTER_YAML (Ray's cluster launcher, `ray up -y`).

    The nodes get Kiln through the YAML's file_mounts and setup_commands. Then submit jobs
    through the dashboard: `ray dashboard CLUSTER_YAML` forwards it to http://127.0.0.1:8265.
    """
    from ray.autoscaler import sdk

    sdk.create_or_update_cluster(cluster_yaml, no_restart=no_restart)
    head = sdk.get_head_node_ip(cluster_yaml)
    click.echo(
        f"cluster up; head node {head}\n"
        f"  forward the dashboard:  ray dashboard {cluster_yaml}\n"
        f"  submit a run:           kiln ray submit CONFIG --address http://127.0.0.1:8265\n"
        f"  stop the cluster:       kiln ray down {cluster_yaml}"
    )


@ray_group.command("down")
@click.argument("cluster_yaml", type=click.Path(exists=True, dir_okay=False))
@click.option("--workers-only", is_flag=True, help="keep the head node")
def down(cluster_yaml, workers_only):
    """Stop the Ray cluster of CLUSTER_YAML and release its nodes (`ray down -y`)."""
    from ray.autoscaler import sdk

    sdk.teardown_cluster(cluster_yaml, workers_only=workers_only)
    click.echo(f"cluster of {cluster_yaml} is down")


@ray_group.command("submit", context_settings={"show_default": True})
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option(
    "--address",
    envvar="RAY_ADDRESS",
    required=True,
    help="the cluster's dashboard, e.g. http://127.0.0.1:8265 (or RAY_ADDRESS)",
)
@click.option(
    "--num-workers",
    help="ranks (one Ray worker each): N, or MIN-MAX to let Ray resize the group "
    "[default: launch.nproc_per_node x launch.nnodes]",
)
@click.option(
    "--gpus-per-worker",
    type=click.IntRange(0, 1),
    default=0,
    help="0: CPU workers (gloo); 1: one GPU per worker (NCCL)",
)
@click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True), default=1.0)
@click.option(
    "--max-failures", type=int, default=3, help="worker-group restarts before the job fails"
)
@click.option(
    "--resize-interval",
    type=click.FloatRange(min=0),
    default=60.0,
    help="with --num-workers MIN-MAX: seconds between Ray's checks for room for more workers",
)
@click.option(
    "--workdir",
    help="folder on the cluster's shared storage that relative config paths are resolved in",
)
@click.option(
    "--no-path-check",
    is_flag=True,
    help="the data sources exist only on the cluster: check them there, not here",
)
@click.option("--wait", is_flag=True, help="follow the job's logs to the end; fail if it fails")
@click.option("--accept-changes", is_flag=True, help=preflight.ACCEPT_CHANGES_HELP)
@click.option("--restart", is_flag=True, help=preflight.RESTART_HELP + " (by the job's driver)")
def submit(
    config,
    overrides,
    address,
    num_workers,
    gpus_per_worker,
    cpus_per_worker,
    max_failures,
    resize_interval,
    workdir,
    no_path_check,
    wait,
    accept_changes,
    restart,
):
    """Train CONFIG [OVERRIDES...] as a Ray job on the cluster at --address.

    The config is validated here first. On the cluster the job's driver prepares missing data
    with Ray Data, then Ray Train runs one DeepSpeed rank per worker and restarts the group from
    the newest checkpoint when a worker dies; when Ray drains a node before it goes (a
    preempted spot instance) the workers save a checkpoint at once. run_dir and data.root must
    be storage every node mounts at the same path, or (run_dir) an fsspec URL every node
    reaches.

    With --num-workers MIN-MAX the group is elastic: it starts with as many workers as the
    cluster has room for (at least MIN), grows when nodes join (checked every --resize-interval
    seconds) and goes on with fewer when a node is lost. Each resize restarts the group from the
    newest checkpoint on the new number of ranks: the global batch stays the same (gradient
    accumulation changes; every size in the range must divide it) and the sampler reshards the
    data, so no sample is skipped or repeated; steps since that checkpoint are trained again.
    """
    from launcher.ray_driver import parse_num_workers, worker_counts

    cfg = preflight.load(config, overrides)
    try:
        workers = parse_num_workers(
            num_workers or str(cfg.launch.nproc_per_node * cfg.launch.nnodes)
        )
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--num-workers") from None
    relative = _relative_paths(cfg)
    if relative and workdir is None:
        raise click.ClickException(
            f"relative paths {', '.join(relative)}: on a cluster they must name storage every "
            f"node mounts; give absolute paths or --workdir DIR (the folder they are relative to "
            f"on the cluster, e.g. ~/kiln where configs/ray/*.yaml install Kiln)"
        )
    with user_errors():
        preflight.check(
            cfg,
            worker_counts(workers),
            cuda_available=gpus_per_worker > 0,
            paths=not no_path_check,
            restart=restart,
        )

    from ray.job_submission import JobSubmissionClient

    count = "-".join(map(str, workers)) if isinstance(workers, tuple) else str(workers)
    entrypoint = [
        "python", "-m", "launcher.ray_driver",
        "--num-workers", count,
        "--gpus-per-worker", str(gpus_per_worker),
        "--cpus-per-worker", str(cpus_per_worker),
        "--max-failures", str(max_failures),
        "--resize-interval", str(resize_interval),
        *(["--accept-changes"] if accept_changes else []),
        *(["--restart"] if restart else []),
    ]  # fmt: skip
    if workdir is not None:
        entrypoint += ["--workdir", workdir]
    # a rehearsal of the health supervisor (trainer.health) reaches the job's workers too
    faults = {FAULT_ENV: os.environ[FAULT_ENV]} if os.environ.get(FAULT_ENV) else {}
    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise click.ClickException(
            f"cannot reach the Ray dashboard at {address} ({e}); start the cluster (`kiln ray up "
            f"CLUSTER_YAML` then `ray dashboard CLUSTER_YAML`, or `ray start --head`) and pass "
            f"its dashboard address, e.g. http://127.0.0.1:8265"
        ) from None
    job_id = client.submit_job(
        entrypoint=shlex.join(entrypoint),
        runtime_env={"env_vars": job_env_vars(cfg, faults)},
        metadata={"kiln_run_dir": cfg.run_dir, "kiln_config": str(config)},
    )
    click.echo(f"submitted Ray job {job_id} (run folder {cfg.run_dir} on the cluster)")
    click.echo(f"  follow:  ray job logs --address {address} --follow {job_id}")
    click.echo(f"  status:  ray job status --address {address} {job_id}")
    click.echo(f"  stop:    ray job stop --address {address} {job_id}")
    if not wait:
        return
    try:
        asyncio.run(_follow(client, job_id))
    except KeyboardInterrupt:
        raise click.ClickException(
            f"stopped following; Ray job {job_id} keeps running on the cluster (stop it with "
            f"`ray job stop --address {address} {job_id}`)"
        ) from None
    status = client.get_job_status(job_id)
    if str(status.value) != "SUCCEEDED":
        info = client.get_job_info(job_id)
        raise click.ClickException(f"Ray job {job_id} {status.value}: {info.message}")
    click.echo(f"Ray job {job_id} succeeded")


async def _follow(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        sys.stdout.write(lines)
        sys.stdout.flush()


def _relative_paths(cfg: KilnConfig) -> list[str]:
    paths = {"run_dir": cfg.run_dir, "data.root": cfg.data.root}
    if cfg.tokenizer.path is not None:
        paths["tokenizer.path"] = cfg.tokenizer.path
    for d in cfg.data.datasets:
        for i, s in enumerate(d.sources):
            paths[f"{d.name} sources[{i}].path"] = s.path
    return [f"{k}={v}" for k, v in paths.items() if is_relative_path(v)]


def job_env_vars(cfg: KilnConfig, extra: dict[str, str]) -> dict[str, str]:
    """The ``env_vars`` of a submitted job's runtime environment, which Ray sets in the job's
    driver and in every worker process it starts for the job: the resolved config (YAML),
    unbuffered output, glibc's allocator settings (:func:`launcher.local.malloc_environment`:
    Kiln's defaults, or the values this shell exports), and ``extra``."""
    from launcher.local import malloc_environment
    from launcher.ray_driver import CONFIG_ENV

    return {
        CONFIG_ENV: cfg.to_yaml(),
        "PYTHONUNBUFFERED": "1",
        **malloc_environment(),
        **extra,
    }
