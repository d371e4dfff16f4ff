"""The one pre-flight of a run: everything that can be checked before any process starts.

Every launcher (``kiln train``, ``kiln slurm submit``, ``kiln ray submit`` and the Ray job's
driver) calls these functions and nothing else to decide whether a run can start:

1. :func:`load` resolves the config (preset < YAML < overrides) and applies the config's own
   rules (:mod:`trainer.config`);
2. :func:`check` makes the batch plan for every world size the run may take, and checks the
   paths (data sources or prepared datasets, a run folder URL) and the device;
3. :func:`prepare` trains the tokenizer and prepares the data where they are missing (locally,
   or with the Ray path's preparation), which checks that the tokenizer fits the model and the
   objective (:func:`trainer.objectives.check_tokenizer`), then hashes every shard against its
   manifest (``data.verify_checksums``).

Each rule lives in one function of :mod:`trainer.config` or :mod:`trainer.objectives`; this
module only orders them. :func:`user_errors` turns the errors they raise into one clear CLI
message without a traceback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from trainer.config import (
    BatchPlan,
    ConfigError,
    KilnConfig,
    batch_plan,
    check_device,
    check_paths,
    load_config,
)
from trainer.data.dataset import verify_shards

logger = logging.getLogger(__name__)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a user's mistake (:class:`ConfigError` and the other ``ValueError``s and
    ``FileNotFoundError``s that Kiln's checks raise with the fix in their message) into a
    :class:`click.ClickException`: one message, exit code 1, no traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None


def load(config: str | Path | None, overrides: Sequence[str] = (), extra: Iterable[str] = ()):
    """The resolved, validated config of ``config`` with ``overrides`` (the user's) and
    ``extra`` (the launcher's own, such as ``launch.nnodes=2``), later ones winning.

    Raises:
        click.ClickException: the file is missing or the config breaks a rule (the message
            names the field, the value and the fix).
    """
    with user_errors():
        return load_config(config, [*overrides, *extra])


@dataclass(frozen=True)
class RunPlan:
    """What the pre-flight found: the batch plan of each world size the run may take (one for a
    fixed world, several for an elastic Ray group) and the warnings to show the user."""

    batches: dict[int, BatchPlan]
    warnings: tuple[str, ...]

    @property
    def batch(self) -> BatchPlan:
        """The plan at the largest world size (the one ``--dry-run`` reports)."""
        return self.batches[max(self.batches)]


def check(
    cfg: KilnConfig,
    world_sizes: Iterable[int],
    *,
    cuda_available: bool | None,
    paths: bool = True,
) -> RunPlan:
    """Every check the config allows before anything is prepared or started.

    Args:
        cfg: the resolved config (from :func:`load`).
        world_sizes: the numbers of processes the run may train on.
        cuda_available: whether the training processes get CUDA GPUs; None skips the device
            check (``--dry-run`` on a machine other than the cluster's).
        paths: check data sources and the run folder URL from here (False when the paths
            name storage of a cluster this machine does not mount).

    Raises:
        ConfigError: a batch plan that does not divide, a missing source of an unprepared
            dataset, a URL no installed filesystem opens, a precision the device lacks.
    """
    batches = {n: batch_plan(cfg, n) for n in world_sizes}
    if paths:
        check_paths(cfg)
    if cuda_available is not None:
        check_device(cfg.train, cuda_available=cuda_available)
    warnings = []
    if min(b.data_parallel_size for b in batches.values()) == 1 and cfg.parallel.zero_stage > 0:
        warnings.append(
            f"parallel.zero_stage={cfg.parallel.zero_stage} partitions nothing on one "
            "data-parallel process and only adds copies; parallel.zero_stage=0 is faster"
        )
    t = cfg.train
    if t.warmup_steps >= t.max_steps:
        warnings.append(
            f"train.warmup_steps={t.warmup_steps} is not shorter than train.max_steps="
            f"{t.max_steps}: the learning rate never reaches train.lr={t.lr:g}; lower "
            f"warmup_steps (a few percent of the run is usual)"
        )
    if t.precision == "bf16" and cuda_available is False and not cpu_has_native_bf16():
        warnings.append(
            "train.precision=bf16 on a CPU without native bf16 (no avx512_bf16 or amx_bf16) is "
            "emulated, several times slower than fp32; use train.precision=fp32 on this machine"
        )
    return RunPlan(batches, tuple(warnings))


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes bf16 natively (the ``avx512_bf16`` or ``amx_bf16`` flag of
    Linux's ``/proc/cpuinfo``); True where the file is missing (no evidence either way)."""
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        return True
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def prepare(cfg: KilnConfig, prepare_data: Callable[[KilnConfig], Any] | None = None) -> None:
    """Train the tokenizer and prepare the datasets that are missing, and check that the
    tokenizer fits the run.

    Args:
        cfg: the resolved config.
        prepare_data: the preparation to run (default :func:`trainer.data.prepare.prepare_all`;
            the Ray job passes its Ray Data version, which writes the same shards).

    Raises:
        ValueError, FileNotFoundError: the data cannot be prepared, the tokenizer does not fit,
            or a shard differs from its manifest (the message says why and what to do).
    """
    if prepare_data is None:
        from trainer.data.prepare import prepare_all as prepare_data  # datasets: heavy import
    prepare_data(cfg)
    if cfg.data.verify_checksums:
        started = time.perf_counter()
        shards, size = verify_shards([cfg.dataset_dir(d.name) for d in cfg.data.datasets])
        logger.info(
            "verified %d shards (%.2f GiB) against their manifests in %.1f s "
            "(data.verify_checksums=false skips it)",
            shards,
            size / 2**30,
            time.perf_counter() - started,
        )


__all__ = ["ConfigError", "RunPlan", "check", "load", "prepare", "user_errors"]
