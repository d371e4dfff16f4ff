"""The driver of a Kiln Ray job (``kiln ray submit``): prepare the data, then train with Ray Train.

It runs on the cluster as the job's entrypoint::

    python -m launcher.ray_driver --num-workers 4 --gpus-per-worker 1 --max-failures 3

and reads the resolved config from the ``KILN_CONFIG`` environment variable (YAML, set by
``kiln ray submit`` in the job's runtime environment) or from a file given with ``--config``.

1. Data: every dataset that is not prepared yet is tokenized and packed as Ray Data tasks
   (:mod:`launcher.ray_prepare`); the tokenizer is trained first when missing.
2. Training: Ray Train's ``TorchTrainer`` starts one worker per rank (``ScalingConfig``); Ray
   creates the process group (gloo on CPU, NCCL on GPU) and every worker runs
   :func:`trainer.main.train`, the function torchrun and srun run. Each rank reads its share of
   the prepared data through the deterministic sampler; checkpoints, ``metrics.jsonl`` and wandb
   go to ``run_dir``: storage every node mounts at the same path, or an fsspec URL every node
   can reach (``s3://...``; each node then works in a local mirror, :mod:`trainer.storage`).
3. Faults: ``FailureConfig(max_failures=K)``. When a worker dies Ray tears the group down and
   starts it again; ``train`` then resumes from the newest complete checkpoint in ``run_dir``
   (also on another number of workers when ``--num-workers MIN-MAX`` lets Ray resize the group:
   it grows when nodes join, checked every ``--resize-interval`` seconds, and goes on with fewer
   when one is lost; the sampler reshards and ZeRO states go through DeepSpeed's universal
   checkpoint). A node that Ray drains before it goes (a preempted spot instance) makes the
   workers save at once (:class:`PreemptionCheckpointer`), so the restart loses no steps.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from launcher import preflight
from trainer.callbacks import Callback
from trainer.config import KilnConfig, config_from_dict, load_config
from trainer.errors import (
    USER_ERRORS,
    TrainingDivergedError,
    describe_failures,
    read_failures,
    record_failure,
)
from trainer.storage import RunFolder, is_relative_path
from trainer.watchdog import describe_hangs, hang_reports

if TYPE_CHECKING:
    from trainer.loop import Trainer

CONFIG_ENV = "KILN_CONFIG"


def parse_num_workers(text: str) -> int | tuple[int, int]:
    """``"4"`` -> 4; ``"2-8"`` -> (2, 8), an elastic range for Ray Train.

    Raises:
        ValueError: not ``N`` or ``MIN-MAX`` with 1 <= MIN <= MAX.
    """
    parts = text.split("-")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) == 1 and nums[0] >= 1:
        return nums[0]
    if len(nums) == 2 and 1 <= nums[0] <= nums[1]:
        return nums[0] if nums[0] == nums[1] else (nums[0], nums[1])
    raise ValueError(f"{text!r} is not a worker count: give N (4) or a range MIN-MAX (2-8)")


def worker_counts(num_workers: int | tuple[int, int]) -> range:
    lo, hi = (num_workers, num_workers) if isinstance(num_workers, int) else num_workers
    return range(lo, hi + 1)


def absolute_paths(cfg: KilnConfig, base: Path) -> KilnConfig:
    """A copy of ``cfg`` whose relative paths (run_dir, data.root, tokenizer.path, source paths)
    are made absolute against ``base``, so that every worker agrees on them whatever its cwd."""
    tree = cfg.model_dump(mode="json")

    def fix(p: str) -> str:
        return str(base / os.path.expanduser(p)) if is_relative_path(p) else os.path.expanduser(p)

    tree["run_dir"] = fix(tree["run_dir"])
    tree["data"]["root"] = fix(tree["data"]["root"])
    if tree["tokenizer"]["path"] is not None:
        tree["tokenizer"]["path"] = fix(tree["tokenizer"]["path"])
    for d in tree["data"]["datasets"]:
        for s in d["sources"]:
            s["path"] = fix(s["path"])
    return config_from_dict(tree)


def train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker = one rank: :func:`trainer.main.train` on the process group Ray made.

    ``config["config"]`` is the resolved config as YAML.
    """
    import ray.train

    from trainer import main

    # Ray Train calls this in a worker thread: Trainer.install_signal_handlers then installs
    # nothing (signal.signal works only in the main thread); `ray job stop` ends the workers.
    # A node that is going away (a spot instance reclaimed, a drain) is announced through
    # ray.train.get_preemption_info (Ray Train V2; older Ray has none: nothing is polled).
    extra = [PreemptionCheckpointer()] if hasattr(ray.train, "get_preemption_info") else []
    cfg = config_from_dict(yaml.safe_load(config["config"]))
    try:
        main.train(cfg, extra_callbacks=extra)
    except Exception as e:  # recorded for the driver, which shows it once if Ray gives up
        rank = ray.train.get_context().get_world_rank()
        record_failure(e, rank=rank, log_dir=RunFolder(cfg.run_dir).local / "logs")
        if isinstance(e, TrainingDivergedError):
            # every rank stops at the same step (the supervisor's decision is collective) and
            # saved: a restart by Ray would train on past the step the user asked to stop at.
            # The workers end normally and the driver reports the record.
            return
        raise


class PreemptionCheckpointer(Callback):
    """Saves a checkpoint as soon as Ray Train reports that a node of the group is being
    preempted (drained before it is taken away), then lets training go on.

    When the node goes, its workers die and Ray restarts the group (``FailureConfig.
    max_preemption_failures``, unlimited by default), which resumes from this checkpoint instead
    of the last periodic one. ``ray.train.get_preemption_info`` is a collective over the
    workers, hence :meth:`on_poll`: every rank asks at the same step, every
    ``RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S`` seconds (the interval at which Ray's watcher looks
    for draining nodes, 5 s by default).
    """

    def __init__(self):
        self.poll_interval = float(os.environ.get("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", 5.0))
        self.saved = False

    def on_poll(self, trainer: Trainer) -> None:
        import ray.train

        info = ray.train.get_preemption_info()
        if info is None or self.saved:
            return
        self.saved = True  # once per group: a restarted group gets a new callback
        if trainer.world.is_main:
            deadline = (
                f"{info.deadline_ms / 1000 - time.time():.0f} s"
                if info.deadline_ms
                else "no deadline given"
            )
            print(
                f"node(s) {', '.join(info.preempted_node_ids)} (ranks {info.preempted_ranks}) "
                f"are being preempted ({deadline}): saving step {trainer.step} now",
                flush=True,
            )
        if trainer.saved_step != trainer.step:
            trainer.save()


def run(
    cfg: KilnConfig,
    *,
    num_workers: int | tuple[int, int],
    gpus_per_worker: float = 0,
    cpus_per_worker: float = 1,
    max_failures: int = 3,
    resize_interval: float = 60.0,
    num_blocks: int | None = None,
    accept_changes: bool = False,
    restart: bool = False,
) -> int:
    """Prepare the data (Ray Data) and train (Ray Train) on the cluster this process is in.

    Args:
        num_workers: ranks, or (min, max) for an elastic group.
        gpus_per_worker: 0 trains on CPU (gloo), 1 gives each rank a GPU (NCCL).
        cpus_per_worker: CPUs Ray reserves per worker (also its torch threads).
        max_failures: worker-group restarts Ray makes before it gives up (-1: no limit).
        resize_interval: an elastic group's seconds between checks for room for more workers
            (``ScalingConfig.elastic_resize_monitor_interval_s``).
        num_blocks: Ray Data blocks per dataset (see :func:`launcher.ray_prepare.prepare_all_ray`).
        accept_changes: resume although the settings differ from the newest checkpoint's
            (:func:`launcher.preflight.check_resume`).
        restart: train from step 0, after moving the run folder's history aside
            (:meth:`trainer.storage.RunFolder.set_aside`).

    Returns:
        the step of the newest checkpoint at the end.

    Raises:
        ray.train.TrainingFailedError: the workers failed more than ``max_failures`` times.
        TrainingDivergedError: the health supervisor stopped the run (``health.on_*: stop``);
            its message is the ranks' records.
        ConfigError: a batch that does not divide, a data source that matches nothing, a
            resume on changed settings not accepted.
        ValueError, FileNotFoundError: the data cannot be prepared (the message says why).
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from launcher.ray_prepare import prepare_all_ray

    plan = preflight.check(
        cfg, worker_counts(num_workers), cuda_available=gpus_per_worker > 0, restart=restart
    )
    if not ray.is_initialized():
        ray.init()
    preflight.prepare(cfg, lambda c: prepare_all_ray(c, num_blocks=num_blocks))
    preflight.check_resume(
        cfg, accept_changes=accept_changes, batches=plan.batches, restart=restart
    )
    # A URL run folder: every worker node uses a local mirror of it and uploads to it.
    folder = RunFolder(cfg.run_dir)
    folder.prepare(cfg.to_yaml())
    if (tag := folder.latest_tag()) is not None:
        print(f"resuming {folder.location} from {tag}", flush=True)
    use_gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    elastic = {"elastic_resize_monitor_interval_s": resize_interval}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_yaml()},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            **(elastic if isinstance(num_workers, tuple) else {}),
        ),
        run_config=RunConfig(
            **folder.ray_storage(),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    started = time.time() - 2
    trainer.fit()  # raises TrainingFailedError past max_failures
    failures = read_failures(folder.local / "logs", since=started)
    if stopped := [f for f in failures if f["type"] == TrainingDivergedError.__name__]:
        raise TrainingDivergedError(describe_failures(stopped))  # the supervisor's stop
    step = folder.latest_step() or 0  # a finished run's workers deleted a URL's mirror
    print(f"training ended at step {step} of {cfg.train.max_steps}; run folder {cfg.run_dir}")
    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Driver of a Kiln Ray job (see `kiln ray submit`): prepare data, train."
    )
    parser.add_argument("--config", help=f"config YAML (default: the {CONFIG_ENV} variable)")
    parser.add_argument("--num-workers", required=True, help="ranks: N, or MIN-MAX (elastic)")
    parser.add_argument("--gpus-per-worker", type=float, default=0)
    parser.add_argument("--cpus-per-worker", type=float, default=1)
    parser.add_argument("--max-failures", type=int, default=3)
    parser.add_argument("--resize-interval", type=float, default=60.0)
    parser.add_argument("--num-blocks", type=int)
    parser.add_argument("--workdir", help="relative config paths are resolved against this")
    parser.add_argument("--accept-changes", action="store_true", help=preflight.ACCEPT_CHANGES_HELP)
    parser.add_argument("--restart", action="store_true", help=preflight.RESTART_HELP)
    args = parser.parse_args(argv)
    if args.config is None and CONFIG_ENV not in os.environ:
        parser.error(f"give --config FILE or set {CONFIG_ENV} to the config YAML")
    from ray.train import TrainingFailedError

    started = time.time() - 2  # the failure records of this job's workers, not older ones
    cfg = None
    try:
        if args.config is not None:
            cfg = load_config(args.config)
        else:
            cfg = config_from_dict(yaml.safe_load(os.environ[CONFIG_ENV]))
        base = Path(os.path.expanduser(args.workdir)) if args.workdir else Path.cwd()
        cfg = absolute_paths(cfg, base)
        step = run(
            cfg,
            num_workers=parse_num_workers(args.num_workers),
            gpus_per_worker=args.gpus_per_worker,
            cpus_per_worker=args.cpus_per_worker,
            max_failures=args.max_failures,
            resize_interval=args.resize_interval,
            num_blocks=args.num_blocks,
            accept_changes=args.accept_changes,
            restart=args.restart,
        )
    except USER_ERRORS as e:  # a mistake in the config or the data: its message, no traceback
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(1)
    except TrainingFailedError:  # each rank's failure once, from its record (train_worker)
        local = RunFolder(cfg.run_dir).local
        failures = read_failures(local / "logs", since=started)
        hangs = hang_reports(local, since=started)  # the watchdog's kills leave no record
        if not failures and not hangs:
            raise
        if hangs:
            print(f"Error: {describe_hangs(hangs)}", file=sys.stderr)
        if failures:
            print(describe_failures(failures), file=sys.stderr)
        sys.exit(1)
    if step < cfg.train.max_steps:
        print(f"the run stopped before train.max_steps={cfg.train.max_steps}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
