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
   manifest (``data.verify_checksums``);
4. :func:`resume_plan` says whether the run starts, resumes (from which checkpoint) or is
   finished, and what differs from the settings its newest checkpoint was trained with
   (:mod:`trainer.fingerprint`); :meth:`Resume.check` refuses a difference the user did not
   accept with ``--accept-changes``.

Each rule lives in one function of :mod:`trainer.config` or :mod:`trainer.objectives`; this
module only orders them. :func:`user_errors` turns the errors they raise into one clear CLI
message without a traceback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
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
from trainer.errors import USER_ERRORS
from trainer.fingerprint import differences, run_fingerprint
from trainer.storage import RunFolder

logger = logging.getLogger(__name__)

ACCEPT_CHANGES_HELP = (
    "resume although the model shape, data, tokenizer, seq_len, schedule or objective differ "
    "from those the newest checkpoint was trained with"
)
RESTART_HELP = (
    "train from step 0 in a run folder that holds checkpoints: its checkpoints, metrics, logs "
    "and published folders are first moved into restarted-<time>/ inside it (nothing is deleted)"
)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a user's mistake (:data:`trainer.errors.USER_ERRORS`: :class:`ConfigError` and the
    other errors Kiln's checks raise with the fix in their message) into a
    :class:`click.ClickException`: one message, exit code 1, no traceback."""
    try:
        yield
    except USER_ERRORS as e:
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
    restart: bool = False,
) -> RunPlan:
    """Every check the config allows before anything is prepared or started.

    Args:
        cfg: the resolved config (from :func:`load`).
        world_sizes: the numbers of processes the run may train on.
        cuda_available: whether the training processes get CUDA GPUs; None skips the device
            check (``--dry-run`` on a machine other than the cluster's).
        paths: check data sources and the run folder URL from here (False when the paths
            name storage of a cluster this machine does not mount).
        restart: the run is to start over (``--restart``), which needs a run folder path.

    Raises:
        ConfigError: a batch plan that does not divide, a missing source of an unprepared
            dataset, a URL no installed filesystem opens, a precision the device lacks, a
            restart of a URL run folder, NVMe offload where DeepSpeed's async I/O op cannot be
            built (:func:`check_nvme_offload`).

    The returned warnings include ``train.compile`` where torch.compile's backend cannot
    compile on the run's device (:func:`trainer.compile.compile_unavailable`): the run then
    trains eagerly.
    """
    batches = {n: batch_plan(cfg, n) for n in world_sizes}
    if restart and RunFolder(cfg.run_dir).url is not None:
        raise ConfigError(
            f"--restart works on a run folder path; run_dir={cfg.run_dir!r} is a URL, whose "
            "files an object store cannot move: give another run_dir to start over"
        )
    if paths:
        check_paths(cfg)
    if cuda_available is not None:
        check_device(cfg.train, cuda_available=cuda_available)
        check_nvme_offload(cfg)
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
    if t.compile and cuda_available is not None:
        from trainer.compile import compile_unavailable

        reason = compile_unavailable("cuda" if cuda_available else "cpu")
        if reason is not None:
            warnings.append(reason)
    return RunPlan(batches, tuple(warnings))


def host_memory_warning(
    cfg: KilnConfig, plan: BatchPlan, *, on_gpu: bool, node_bytes: int | None = None
) -> str | None:
    """A warning when the planned host memory of one node (:func:`trainer.estimate.
    memory_estimate`'s ``host_per_node``: the node's ranks and their data workers) exceeds
    ``node_bytes`` (None: this machine's physical memory, ``os.sysconf``); None when it fits.
    A warning, not a refusal: the plan is an estimate (measured within 0.94-1.04x of real runs,
    bench/memory.py) and the node may be another machine's size."""
    import os

    from trainer.estimate import memory_estimate

    if node_bytes is None:
        node_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    need = memory_estimate(cfg, plan, on_gpu=on_gpu).host_per_node
    return _over_plan(
        need,
        node_bytes,
        "of host memory on this node and it has",
        "the run will likely be killed for memory",
        "fewer processes per node, a higher parallel.zero_stage, parallel.offload_device=nvme "
        "or data.prefetch_steps=0",
    )


def device_memory_warning(
    cfg: KilnConfig, plan: BatchPlan, *, device_bytes: int | None = None
) -> str | None:
    """A warning when the planned device memory of one rank on a GPU (:func:`trainer.estimate.
    memory_estimate`'s ``total``: model states, activations and DeepSpeed's buffers at the peak
    of a step) exceeds ``device_bytes`` (None: the total memory of this machine's first CUDA
    device, ``torch.cuda.get_device_properties``); None when it fits. The plan leaves out the
    CUDA context and the caching allocator's fragmentation (a few hundred MiB to a few GiB), so
    a plan just under the device's size can still run out; a warning, not a refusal, as for
    :func:`host_memory_warning`."""
    from trainer.estimate import memory_estimate

    if device_bytes is None:
        import torch

        device_bytes = torch.cuda.get_device_properties(0).total_memory
    need = memory_estimate(cfg, plan, on_gpu=True).total
    return _over_plan(
        need,
        device_bytes,
        "of GPU memory per rank and the GPU has",
        "the first step will likely run out of memory",
        "a higher parallel.zero_stage, parallel.offload_optimizer / offload_params, "
        "train.activation_checkpointing, a smaller train.micro_batch_size or "
        "train.loss_chunk_tokens",
    )


def _over_plan(need: float, have: int, of: str, outcome: str, remedies: str) -> str | None:
    """The warning of :func:`host_memory_warning` / :func:`device_memory_warning` when ``need``
    bytes exceed ``have``; None when they fit."""
    if need <= have:
        return None
    gib = 2**30
    return (
        f"the plan needs {need / gib:.1f} GiB {of} {have / gib:.1f} GiB: {outcome}. "
        f"`kiln train --dry-run` shows where it goes; {remedies} lower it"
    )


def check_nvme_offload(cfg: KilnConfig, builder: Any = None) -> None:
    """Refuse ``parallel.offload_device=nvme`` where DeepSpeed's async I/O op cannot be built
    (it swaps ZeRO-Infinity's tensors to ``parallel.nvme_path`` with libaio), before any process
    starts rather than in every rank's engine build.

    Args:
        cfg: the resolved config; nothing is checked unless it offloads to NVMe.
        builder: the op builder to ask (default DeepSpeed's ``AsyncIOBuilder()``), whose
            ``is_compatible()`` compiles a libaio probe with this machine's compiler.

    Raises:
        ConfigError: the op cannot be built here; the message says what to install.
    """
    if cfg.parallel.offload_device != "nvme":
        return
    if builder is None:
        from deepspeed.ops.op_builder import AsyncIOBuilder

        builder = AsyncIOBuilder()
    if not builder.is_compatible(verbose=False):
        raise ConfigError(
            "parallel.offload_device=nvme needs DeepSpeed's async I/O op (async_io), which "
            "cannot be built on this machine: libaio's headers and library are missing. "
            "Install them (Debian/Ubuntu: apt-get install libaio-dev; RHEL/Rocky: dnf install "
            "libaio-devel) and a C++ compiler, or use parallel.offload_device=cpu"
        )


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


@dataclass(frozen=True)
class Resume:
    """Where a run folder's run stands before a launch.

    Attributes:
        location: the run folder (a path or a URL).
        tag: the newest complete checkpoint (``step-N``), None when the run starts from step 0.
        step: its step (0 when the run starts).
        max_steps: ``train.max_steps`` of the new config.
        changes: the settings that differ from the checkpoint's fingerprint, one
            ``name: old -> new`` line each (:func:`trainer.fingerprint.differences`).
        notes: why the checkpoint is not what ``checkpoints/latest`` names, if it is not
            (:meth:`trainer.storage.RunFolder.scan`).
    """

    location: str
    tag: str | None
    step: int
    max_steps: int
    changes: tuple[str, ...]
    notes: tuple[str, ...]
    state: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def finished(self) -> bool:
        return self.step >= self.max_steps

    def describe(self) -> str:
        """One line: ``starts at step 0``, ``resumes from step-N`` or ``is finished``."""
        if self.tag is None:
            notes = "".join(f"\n  {n}" for n in self.notes)
            return f"{self.location}: starts at step 0 of {self.max_steps}" + notes
        if self.finished:
            return (
                f"{self.location}: finished ({self.tag}, train.max_steps={self.max_steps}); "
                "raise train.max_steps to train on, or pass --restart to train again from step 0"
            )
        notes = "".join(f"\n  {n}" for n in self.notes)
        return (
            f"{self.location}: resumes from {self.tag} (step {self.step} of {self.max_steps})"
            + notes
        )

    def check(self, accept_changes: bool, batches: dict[int, BatchPlan] | None = None) -> None:
        """Refuse to resume on settings other than those the checkpoint was trained with, or on
        a layout it cannot continue on.

        Args:
            accept_changes: resume although :attr:`changes` is not empty.
            batches: the batch plan of each world size the run may take; each must continue
                the checkpoint exactly: the same global batch (the data order is a function
                of the samples consumed) and, for a pipeline checkpoint, the same stages on the
                same number of processes (:func:`trainer.checkpoint.check_pipeline_layout`).

        Raises:
            ConfigError: :attr:`changes` is not empty and ``accept_changes`` is False (the
                message lists them and the ways on), or a layout the checkpoint cannot resume
                on (the message names the setting that would).
        """
        if self.changes and not accept_changes:
            lines = "".join(f"\n  {c}" for c in self.changes)
            raise ConfigError(
                f"{self.location} holds a run at {self.tag} trained with other settings than "
                f"this config's:{lines}\nResume with the settings it was trained with (its "
                f"config is checkpoints/{self.tag}/config.yaml in the run folder), pass "
                "--accept-changes to continue this run with the new settings knowingly, "
                "--restart to train from step 0 in this folder, or give another run_dir"
            )
        if self.state is None or not batches:
            return
        from trainer.checkpoint import check_pipeline_layout  # deepspeed: a heavy import

        saved = self.state
        for world_size, plan in sorted(batches.items()):
            consumed = int(saved.get("consumed_samples", self.step * plan.global_batch_size))
            if consumed != self.step * plan.global_batch_size:
                raise ConfigError(
                    f"{self.location}: {self.tag} consumed {consumed} samples in {self.step} "
                    f"steps, which a global batch of {plan.global_batch_size} cannot continue "
                    f"exactly; resume with train.global_batch_size="
                    f"{saved.get('global_batch_size', consumed // max(self.step, 1))}"
                )
            try:
                check_pipeline_layout(saved, plan.pipeline_stages, world_size)
            except ValueError as e:
                raise ConfigError(f"{self.location}: {e}") from None


def resume_plan(cfg: KilnConfig, *, restart: bool = False) -> Resume:
    """Where the run of ``cfg`` stands: its newest complete checkpoint (for a URL, the one the
    URL's ``latest`` names) and what differs from its fingerprint. Reads the tokenizer and the
    manifests as they are now: call it after :func:`prepare` for a complete comparison. With
    ``restart`` (``--dry-run --restart``), what a restart would do: start at step 0, after
    moving the run's history aside (nothing is moved here).

    Raises:
        FileExistsError: the run folder holds checkpoints, none of them complete
            (:meth:`trainer.storage.RunFolder.resume_from`).
        ValueError: ``restart`` on a URL run folder.
    """
    folder = RunFolder(cfg.run_dir)
    if restart:
        if folder.url is not None:
            folder.set_aside()  # raises: a URL cannot be restarted in place
        names = ", ".join(p.name for p in folder.history())
        notes = (f"--restart first moves {names} into restarted-<time>/",) if names else ()
        return Resume(folder.location, None, 0, cfg.train.max_steps, (), notes)
    if folder.url is None:
        tag, notes = folder.resume_from()  # sizes; the workers check the checksums too
    else:
        tag, notes = folder.latest_tag(), []
    max_steps = cfg.train.max_steps
    if tag is None:
        return Resume(folder.location, None, 0, max_steps, (), ())
    state = folder.latest_state(tag)
    saved = state.get("fingerprint")  # checkpoints before fingerprints have none
    changes = differences(saved, run_fingerprint(cfg)) if saved else []
    step = int(state["step"])
    return Resume(folder.location, tag, step, max_steps, tuple(changes), tuple(notes), state)


def check_resume(
    cfg: KilnConfig,
    *,
    accept_changes: bool,
    batches: dict[int, BatchPlan] | None = None,
    restart: bool = False,
) -> Resume:
    """:func:`resume_plan` refused unless its changes are accepted and the run's layout can
    continue its checkpoint (:meth:`Resume.check`); accepted changes are logged as warnings.
    With ``restart``, the run folder's history is first moved aside
    (:meth:`trainer.storage.RunFolder.set_aside`) and the run starts at step 0. Call it after
    :func:`prepare`.

    Args:
        batches: :attr:`RunPlan.batches` (from :func:`check`); None skips the layout checks.

    Raises:
        ConfigError: the run would resume on changed settings without ``accept_changes``, or
            on a global batch or pipeline layout its checkpoint cannot continue on.
        ValueError: ``restart`` on a URL run folder.
    """
    if restart:
        folder = RunFolder(cfg.run_dir)
        if (aside := folder.set_aside()) is not None:
            logger.warning("--restart: moved the run's history into %s", aside)
    resume = resume_plan(cfg)
    resume.check(accept_changes, batches)
    for change in resume.changes:
        logger.warning("warning: resuming %s with a changed setting: %s", resume.tag, change)
    return resume


__all__ = [
    "ACCEPT_CHANGES_HELP",
    "RESTART_HELP",
    "ConfigError",
    "Resume",
    "RunPlan",
    "check",
    "check_nvme_offload",
    "check_resume",
    "load",
    "prepare",
    "resume_plan",
    "user_errors",
]
