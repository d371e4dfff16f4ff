"""Slurm launch: ``kiln slurm submit | status | cancel | logs``, and the commands the job runs.

``submit`` validates the config as ``kiln train`` does, prepares the tokenizer and data if they
are missing, writes the resolved config into the run folder, renders ``slurm/train.sbatch.j2``
(Jinja2) into ``<run_dir>/slurm/train.sbatch``, submits it with ``sbatch --parsable`` and records
the job in ``<run_dir>/slurm/job.json``. The job's log is ``<run_dir>/slurm/<job id>.out``
(appended to across requeues).

Inside the job (see the template), three hidden subcommands do the work that needs Python:

- ``kiln slurm progress CONFIG`` prints the step of the run's latest checkpoint (0 if none);
- ``kiln slurm node CONFIG ...`` runs on every node under ``srun``: one torchrun with c10d
  rendezvous on the first node, its stop signals forwarded to the ranks
  (:func:`launcher.local.run_workers`);
- ``kiln slurm after CONFIG ...`` decides, once srun has returned, whether the run finished,
  requeues itself (it was stopped by the pre-time-limit SIGUSR1, or its ranks hung, after making
  progress), or failed (:func:`after_run`).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import click
import jinja2

from launcher import preflight
from launcher.local import MALLOC_DEFAULTS
from launcher.preflight import user_errors
from trainer.config import KilnConfig
from trainer.errors import COLLECTED_ENV, describe_failures, read_failures
from trainer.storage import RunFolder
from trainer.watchdog import describe_hangs, hang_reports

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "slurm"
TEMPLATE = "train.sbatch.j2"
JOB_RECORD = "job.json"
MAX_SIGNAL_SECONDS = 65535  # Slurm's limit for --signal=...@TIME
# [days-]hours:minutes:seconds and the shorter forms sbatch --time accepts.
_TIME_FORMS = [
    re.compile(r"^(?P<m>\d+)$"),
    re.compile(r"^(?P<m>\d+):(?P<s>\d+)$"),
    re.compile(r"^(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)$"),
    re.compile(r"^(?P<d>\d+)-(?P<h>\d+)$"),
    re.compile(r"^(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+)$"),
    re.compile(r"^(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)$"),
]


def parse_time_limit(text: str) -> int | None:
    """Seconds in a Slurm ``--time`` value; None for ``UNLIMITED`` / ``INFINITE``.

    Accepts ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M`` and ``D-H:M:S`` (sbatch(1)).

    Raises:
        ValueError: the text is none of these forms.
    """
    if text.strip().upper() in ("UNLIMITED", "INFINITE"):
        return None
    for form in _TIME_FORMS:
        if match := form.match(text.strip()):
            parts = {k: int(v) for k, v in match.groupdict().items() if v is not None}
            return (
                parts.get("d", 0) * 86400
                + parts.get("h", 0) * 3600
                + parts.get("m", 0) * 60
                + parts.get("s", 0)
            )
    raise ValueError(
        f"--time {text!r} is not a Slurm time limit; use minutes, H:M:S or D-H:M:S "
        "(e.g. 90, 4:00:00, 2-00:00:00)"
    )


@dataclass(frozen=True)
class SlurmOptions:
    """What ``kiln slurm submit`` asks of Slurm; the names follow sbatch's options.

    ``nproc_per_node``: ranks per node, one per GPU; on CPU nodes (``gpus_per_node=0``) the number
    of CPU processes. ``signal_seconds``: SIGUSR1 reaches the job this many seconds before its
    time limit (Slurm may send it up to 60 s earlier), so the ranks can save and the job requeue.
    """

    nodes: int
    gpus_per_node: int
    nproc_per_node: int
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    env_setup: Path | None = None
    signal_seconds: int = 300
    job_name: str | None = None

    def validate(self) -> None:
        """Refuse options that cannot make a working job.

        Raises:
            ValueError: a non-positive count, ranks that do not match the GPUs, an unreadable
                environment set-up file, a malformed time limit, or a signal time outside
                Slurm's range or not before the time limit.
        """
        if self.nodes < 1:
            raise ValueError(f"--nodes {self.nodes}: a job needs at least one node")
        if self.gpus_per_node < 0:
            raise ValueError(f"--gpus-per-node {self.gpus_per_node} is negative; use 0 for CPU")
        if self.gpus_per_node > 0 and self.nproc_per_node != self.gpus_per_node:
            raise ValueError(
                f"--nproc-per-node {self.nproc_per_node} with --gpus-per-node "
                f"{self.gpus_per_node}: Kiln runs one rank per GPU; drop --nproc-per-node"
            )
        if self.nproc_per_node < 1:
            raise ValueError(f"--nproc-per-node {self.nproc_per_node} must be at least 1")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ValueError(f"--cpus-per-task {self.cpus_per_task} must be at least 1")
        if self.env_setup is not None and not self.env_setup.is_file():
            raise ValueError(f"--env-setup {self.env_setup} is not a file")
        if not 0 < self.signal_seconds <= MAX_SIGNAL_SECONDS:
            raise ValueError(
                f"--signal-seconds {self.signal_seconds} is outside Slurm's range "
                f"1-{MAX_SIGNAL_SECONDS}"
            )
        limit = parse_time_limit(self.time) if self.time is not None else None
        if limit is not None and self.signal_seconds >= limit:
            raise ValueError(
                f"--signal-seconds {self.signal_seconds} is not shorter than --time {self.time} "
                f"({limit} s): the job would be told to stop as it starts; lower "
                "--signal-seconds or raise --time"
            )
        for name in ("partition", "account", "qos", "constraint", "job_name"):
            value = getattr(self, name)
            if value is not None and (not value or any(c.isspace() for c in value)):
                raise ValueError(f"--{name.replace('_', '-')} {value!r} must be one word")


def render_script(
    cfg: KilnConfig,
    opts: SlurmOptions,
    *,
    workdir: Path,
    python: str,
) -> str:
    """The sbatch script of ``cfg`` under ``opts`` (``slurm/train.sbatch.j2`` rendered).

    Args:
        cfg: the resolved config; it is embedded in the script and rewritten into the run folder
            at every start of the job.
        workdir: the job's working directory (``--chdir``): relative paths of the config resolve
            against it, as they did where the job was submitted.
        python: the interpreter the job runs Kiln with (``KILN_PYTHON`` overrides it at run time).

    Raises:
        ValueError: invalid options (:meth:`SlurmOptions.validate`), or a space in the run folder
            or working directory path.
    """
    opts.validate()
    run_dir = (workdir / cfg.run_dir).resolve()
    for path in (workdir.resolve(), run_dir):
        if any(c.isspace() for c in str(path)):
            raise ValueError(
                f"{path} holds a space, which #SBATCH --chdir / --output cannot; use a run_dir "
                "and a working directory without spaces"
            )
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        autoescape=False,  # a shell script, not HTML; values are quoted with the `q` filter
    )
    env.filters["q"] = lambda value: shlex.quote(str(value))
    return env.get_template(TEMPLATE).render(
        job_name=opts.job_name or f"kiln-{run_dir.name}",
        nodes=opts.nodes,
        gpus_per_node=opts.gpus_per_node,
        nproc_per_node=opts.nproc_per_node,
        cpus_per_task=opts.cpus_per_task,
        partition=opts.partition,
        time=opts.time,
        account=opts.account,
        qos=opts.qos,
        constraint=opts.constraint,
        exclusive=opts.exclusive,
        signal_seconds=opts.signal_seconds,
        workdir=workdir.resolve(),
        log_pattern=run_dir / "slurm" / "%j.out",
        script_path=run_dir / "slurm" / "train.sbatch",
        run_dir=run_dir,
        python=shlex.quote(python),
        env_setup=opts.env_setup.read_text().rstrip("\n") if opts.env_setup else "",
        env_setup_path=opts.env_setup.resolve() if opts.env_setup else "",
        config_yaml=cfg.to_yaml(),
        collected_env=COLLECTED_ENV,
        malloc_defaults=MALLOC_DEFAULTS,
    )


def _latest_step_or_exit(run_dir: str) -> int:
    """Step of the run's latest complete checkpoint, 0 when it has none.

    Raises:
        click.ClickException: a URL mirror's ``latest`` names an incomplete checkpoint (see
            :meth:`trainer.storage.RunFolder.latest_checkpoint`).
    """
    try:
        return RunFolder(run_dir).latest_step() or 0
    except FileNotFoundError as e:
        raise click.ClickException(str(e)) from None


@dataclass(frozen=True)
class Outcome:
    """What the job does once its training step (srun) has returned."""

    action: Literal["finished", "requeue", "stopped", "failed"]
    message: str
    exit_code: int


def after_run(
    *,
    step: int,
    start_step: int,
    max_steps: int,
    signal: str,
    srun_exit_code: int,
    hang: str | None = None,
) -> Outcome:
    """Decide the end of one run of the job from the checkpoints and the signal it got.

    torchrun does not pass the ranks' exit codes through, so the run folder decides: the run is
    finished when its latest checkpoint is at ``max_steps``. A run stopped by SIGUSR1 (the
    pre-time-limit signal) requeues only if it saved a newer checkpoint than it started from, so
    a job that cannot make progress within its time limit does not requeue forever. SIGTERM
    (scheduler preemption, scancel) never requeues here: a preempting scheduler requeues the job
    itself (``--requeue``), and a cancelled job must stay cancelled. A run whose ranks the hang
    watchdog ended (:mod:`trainer.watchdog`) requeues by the same rule as SIGUSR1: only if it
    saved a newer checkpoint than it started from, so a hang that comes back before the next
    checkpoint (a broken node, a deadlock in the code) fails the job instead of requeueing it
    forever, while a passing one (a stuck link) costs one requeue per checkpoint interval.

    Args:
        step: the latest checkpoint's step now; ``start_step``: when this run began.
        signal: ``"USR1"``, ``"TERM"`` or ``"none"``, the stop signal the job shell got.
        srun_exit_code: srun's status, only reported (0 also for a clean signal stop).
        hang: what the hang watchdog reported in this run (:func:`trainer.watchdog.
            describe_hangs`), None when it did not fire.
    """
    if step >= max_steps:
        return Outcome("finished", f"finished at step {step} of {max_steps}", 0)
    if signal == "USR1":
        if step > start_step:
            return Outcome(
                "requeue",
                f"stopped at step {step} of {max_steps} before the time limit; requeueing to "
                "resume from that checkpoint",
                0,
            )
        return Outcome(
            "failed",
            f"got SIGUSR1 but no checkpoint newer than step {start_step} was saved, so a requeue "
            "would not progress; give the job a longer --time or a smaller --signal-seconds",
            1,
        )
    if signal == "TERM":
        return Outcome(
            "stopped",
            f"stopped by SIGTERM at step {step} of {max_steps} (preemption requeues the job, "
            "scancel ends it); `kiln slurm submit` the same config again to resume",
            0,
        )
    if hang is not None:
        if step > start_step:
            return Outcome(
                "requeue",
                f"{hang}; requeueing to resume from the checkpoint of step {step} of {max_steps}",
                0,
            )
        return Outcome(
            "failed",
            f"{hang}; not requeued: no checkpoint newer than step {start_step} was saved since "
            "this run of the job started, so it could hang at the same place again; fix the "
            "cause (or raise health.step_timeout if the steps are that slow) and `kiln slurm "
            "submit` the same config again to resume",
            srun_exit_code or 1,
        )
    return Outcome(
        "failed",
        f"training stopped at step {step} of {max_steps} without a stop signal (srun exit code "
        f"{srun_exit_code}); see the ranks' errors above",
        srun_exit_code or 1,
    )


# -- job records ---------------------------------------------------------------------------------


def job_record_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "slurm" / JOB_RECORD


def read_job_record(run_dir: str | Path) -> dict:
    """The record ``kiln slurm submit`` wrote for the run's latest job.

    Raises:
        click.ClickException: the run folder has no recorded job.
    """
    path = job_record_path(run_dir)
    if not path.is_file():
        raise click.ClickException(
            f"{path} does not exist: no job was submitted for {run_dir} with `kiln slurm submit`"
        )
    return json.loads(path.read_text())


def _slurm_command(*cmd: str) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise click.ClickException(
            f"`{cmd[0]}` is not on PATH: run this on a Slurm login node (or load Slurm's module)"
        )
    return subprocess.run(cmd, capture_output=True, text=True)


def job_state(job_id: str) -> str | None:
    """The job's state as squeue reports it (``PENDING``, ``RUNNING``, ...), None once it left
    the queue."""
    out = _slurm_command("squeue", "-h", "-j", job_id, "-o", "%T")
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def sbatch(script: Path) -> str:
    """Submit ``script`` and return the job id.

    Raises:
        click.ClickException: sbatch refused the job (its message is quoted).
    """
    out = _slurm_command("sbatch", "--parsable", str(script))
    if out.returncode != 0:
        raise click.ClickException(f"sbatch refused {script}:\n{out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]  # "ID" or "ID;CLUSTER"


# -- the CLI -------------------------------------------------------------------------------------


@click.group()
def slurm() -> None:
    """Run training as a Slurm job: submit, status, cancel, logs."""


@slurm.command(context_settings={"show_default": True})
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--nodes", type=int, required=True, help="nodes of the job")
@click.option("--gpus-per-node", type=int, required=True, help="GPUs per node (0: CPU nodes)")
@click.option(
    "--nproc-per-node",
    type=int,
    help="CPU processes per node when --gpus-per-node 0 (default launch.nproc_per_node)",
)
@click.option("--cpus-per-task", type=int, help="CPUs for each node's launcher and its ranks")
@click.option("--partition", help="Slurm partition")
@click.option("--time", help="time limit (minutes, H:M:S or D-H:M:S)")
@click.option("--account", help="account to charge")
@click.option("--qos", help="quality of service")
@click.option("--constraint", help="node features, e.g. 'a100|h100'")
@click.option("--exclusive", is_flag=True, help="whole nodes only")
@click.option(
    "--env-setup",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="bash snippet that prepares the environment (modules, venv, container); copied in",
)
@click.option(
    "--signal-seconds",
    type=int,
    default=300,
    help="SIGUSR1 this long before the time limit: the ranks save, the job requeues",
)
@click.option("--job-name", help="job name (default kiln-<run folder name>)")
@click.option("--dry-run", is_flag=True, help="print the job script (config included); no submit")
@click.option("--accept-changes", is_flag=True, help=preflight.ACCEPT_CHANGES_HELP)
@click.option("--restart", is_flag=True, help=preflight.RESTART_HELP)
def submit(config, overrides, dry_run, accept_changes, restart, **options):
    """Submit the run of CONFIG [OVERRIDES...] as a Slurm job of N nodes.

    Validates the config first, prepares a missing tokenizer and data on this machine, writes the
    resolved config and the job script into the run folder and submits it. The job resumes from
    the run's latest checkpoint, checkpoints and requeues itself before its time limit, and stops
    requeueing once train.max_steps is reached.
    """
    gpus, nproc = options["gpus_per_node"], options.pop("nproc_per_node")
    extra = [f"launch.nnodes={options['nodes']}"]
    if gpus > 0 and nproc is None:
        nproc = gpus
    if nproc is not None:
        extra.append(f"launch.nproc_per_node={nproc}")
    cfg = preflight.load(config, overrides, extra)
    if RunFolder(cfg.run_dir).url is not None:
        raise click.ClickException(
            f"run_dir={cfg.run_dir!r} is a URL; a Slurm job keeps its script, log and job record "
            "in the run folder, so give a path on the cluster's shared filesystem (URL run "
            "folders work with `kiln train` and `kiln ray submit`)"
        )
    opts = SlurmOptions(nproc_per_node=cfg.launch.nproc_per_node, **options)
    # Without an environment set-up the job runs the interpreter that runs this command (shared
    # filesystem); with one, the `python` that the set-up puts on PATH.
    python = "python" if opts.env_setup else sys.executable
    with user_errors():
        opts.validate()
        plan = preflight.check(
            cfg, [opts.nodes * opts.nproc_per_node], cuda_available=gpus > 0, restart=restart
        )
        script = render_script(cfg, opts, workdir=Path.cwd(), python=python)
    for warning in plan.warnings:
        click.echo(f"warning: {warning}", err=True)
    if gpus > 0 and opts.cpus_per_task is None:
        click.echo(
            "warning: no --cpus-per-task; where Slurm binds tasks to their CPUs, the "
            f"{opts.nproc_per_node} ranks of a node share 1 CPU (data loading, host work)",
            err=True,
        )
    if dry_run:
        click.echo(script, nl=False)
        return

    if shutil.which("sbatch") is None:
        raise click.ClickException(
            "`sbatch` is not on PATH: submit from a Slurm login node (or load Slurm's module); "
            "--dry-run prints the script without Slurm"
        )
    run_dir = Path(cfg.run_dir)
    if job_record_path(run_dir).is_file():
        previous = read_job_record(run_dir)["job_id"]
        if (state := job_state(previous)) is not None:
            raise click.ClickException(
                f"job {previous} of {run_dir} is still {state}; two jobs would write the same "
                f"checkpoints: wait for it or `kiln slurm cancel {run_dir}` first"
            )
    with user_errors():
        preflight.prepare(cfg)
        preflight.check_resume(
            cfg, accept_changes=accept_changes, batches=plan.batches, restart=restart
        )
    if (step := _latest_step_or_exit(cfg.run_dir)) >= cfg.train.max_steps:
        click.echo(
            f"warning: {run_dir} is already at step {step} >= train.max_steps="
            f"{cfg.train.max_steps}; the job will train nothing (raise train.max_steps, or "
            "--restart to train again from step 0)",
            err=True,
        )
    (run_dir / "slurm").mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    script_path = run_dir / "slurm" / "train.sbatch"
    script_path.write_text(script)
    job_id = sbatch(script_path)
    log = (run_dir / "slurm" / f"{job_id}.out").resolve()
    record = {
        "job_id": job_id,
        "script": str(script_path.resolve()),
        "log": str(log),
        "nodes": opts.nodes,
        "gpus_per_node": opts.gpus_per_node,
        "nproc_per_node": opts.nproc_per_node,
        "submitted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    job_record_path(run_dir).write_text(json.dumps(record, indent=2) + "\n")
    click.echo(f"submitted job {job_id} for {run_dir}")
    click.echo(f"log:    {log}")
    click.echo(f"script: {script_path.resolve()}")
    click.echo(f"follow: kiln slurm logs {run_dir} --follow")


@slurm.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
def status(run_dir):
    """State of RUN_DIR's job (squeue) and the run's progress (latest checkpoint)."""
    from trainer.config import load_config

    record = read_job_record(run_dir)
    job_id = record["job_id"]
    out = _slurm_command("squeue", "-j", job_id, "-o", "%.12i %.10T %.10M %.10l %.6D %R")
    if out.returncode == 0 and len(out.stdout.splitlines()) > 1:
        click.echo(out.stdout.rstrip())
    else:
        click.echo(f"job {job_id} is no longer in the queue (finished, failed or cancelled)")
        acct = _slurm_command("sacct", "-X", "-j", job_id, "-o", "JobID,State,ExitCode,Elapsed")
        if acct.returncode == 0 and acct.stdout.strip():
            click.echo(acct.stdout.rstrip())
    config = Path(run_dir) / "config.yaml"
    if config.is_file():
        cfg = load_config(config)
        step = _latest_step_or_exit(cfg.run_dir)
        click.echo(f"progress: step {step} of {cfg.train.max_steps} (checkpoints)")
    click.echo(f"log: {record['log']}")


@slurm.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
def cancel(run_dir):
    """Cancel RUN_DIR's job (scancel).

    Slurm sends SIGTERM first: the ranks finish their step and save if they manage before the
    site's KillWait runs out. Submit the same config again to resume.
    """
    job_id = read_job_record(run_dir)["job_id"]
    out = _slurm_command("scancel", job_id)
    if out.returncode != 0:
        raise click.ClickException(f"scancel {job_id} failed: {out.stderr.strip()}")
    click.echo(f"cancelled job {job_id}")


@slurm.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("-f", "--follow", is_flag=True, help="keep printing as the log grows (tail -f)")
def logs(run_dir, follow):
    """Print the log of RUN_DIR's job (all its requeued runs, in order)."""
    log = Path(read_job_record(run_dir)["log"])
    if follow:
        os.execvp("tail", ["tail", "-n", "+1", "-F", str(log)])
    if not log.is_file():
        raise click.ClickException(f"{log} does not exist yet: the job has not started")
    click.echo(log.read_text(errors="replace"), nl=False)


# -- run inside the job ------------------------------------------------------------------------


@slurm.command(hidden=True)
@click.argument("config", type=click.Path(dir_okay=False, exists=True))
def progress(config):
    """Print the step of the run's latest checkpoint (0 if none)."""
    click.echo(_latest_step_or_exit(preflight.load(config).run_dir))


@slurm.command(hidden=True)
@click.argument("config", type=click.Path(dir_okay=False, exists=True))
@click.option("--nproc-per-node", type=int, required=True)
@click.option("--nnodes", type=int, envvar="SLURM_JOB_NUM_NODES", required=True)
@click.option("--node-rank", type=int, envvar="SLURM_NODEID", default=0)
@click.option("--master-addr", required=True)
@click.option("--master-port", type=int, required=True)
def node(config, nproc_per_node, nnodes, node_rank, master_addr, master_port):
    """One node's launcher (started by srun): torchrun with c10d rendezvous at MASTER_ADDR.

    Exits with torchrun's status: 0 also when a forwarded SIGUSR1 / SIGTERM stopped the ranks
    after their checkpoint.
    """
    from launcher.local import run_workers, torchrun_command

    # Slurm delivers a step's signals to every process of the step, torchrun included. torchrun
    # must leave the stop signals to the ranks (which get them from Slurm and from run_workers,
    # save and exit 0) and wait for them: SIGUSR1 would kill it, and on SIGTERM it kills the
    # ranks after a grace period (torchrun's --signals_to_handle, set through its environment
    # variable so that older torch versions, which lack the option, still start).
    # Ignored dispositions survive exec; the ranks install their own handlers when they start.
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    os.environ["PET_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"
    cmd = torchrun_command(
        Path(config),
        nproc_per_node=nproc_per_node,
        nnodes=nnodes,
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=master_port,
    )
    sys.exit(run_workers(cmd))


@slurm.command(hidden=True)
@click.argument("config", type=click.Path(dir_okay=False, exists=True))
@click.option("--start-step", type=int, required=True)
@click.option("--signal", "signal_name", type=click.Choice(["USR1", "TERM", "none"]), required=True)
@click.option("--srun-exit-code", type=int, required=True)
@click.option("--started", type=float, default=0.0, help="when srun started (Unix seconds)")
def after(config, start_step, signal_name, srun_exit_code, started):
    """Finish, requeue or fail the job once srun returned (see :func:`after_run`); a failed
    run's ranks' errors are shown once, from their records in the run folder."""
    cfg = preflight.load(config)
    run_dir = RunFolder(cfg.run_dir).local
    if failures := read_failures(run_dir / "logs", since=started - 2):
        click.echo(describe_failures(failures), err=True)
    hangs = hang_reports(run_dir, since=started - 2)
    outcome = after_run(
        step=_latest_step_or_exit(cfg.run_dir),
        start_step=start_step,
        max_steps=cfg.train.max_steps,
        signal=signal_name,
        srun_exit_code=srun_exit_code,
        hang=describe_hangs(hangs) if hangs else None,
    )
    click.echo(f"kiln: {outcome.message}")
    if outcome.action == "requeue":
        job_id = os.environ.get("SLURM_JOB_ID")
        if job_id is None:
            raise click.ClickException("SLURM_JOB_ID is not set: not inside a Slurm job")
        sys.stdout.flush()
        out = _slurm_command("scontrol", "requeue", job_id)
        if out.returncode != 0:
            raise click.ClickException(
                f"scontrol requeue {job_id} failed ({out.stderr.strip()}); submit the same "
                "config again to resume"
            )
    sys.exit(outcome.exit_code)
