"""Side concerns of the training loop as callbacks: console progress, metrics.jsonl, wandb,
checkpoints. Only rank 0 talks to the outside world; the checkpoint callback runs on every rank
(saving is collective)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer.health import HealthEvent
    from trainer.loop import Trainer


class Callback:
    """Hooks the loop calls; every method is optional."""

    # Seconds between calls of on_poll (None: never). Rank 0's clock decides, so that every rank
    # calls it at the same step.
    poll_interval: float | None = None

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float] | None) -> None:
        """After every optimizer step; ``metrics`` is set on logging steps only."""

    def on_poll(self, trainer: Trainer) -> None:
        """After the step's on_step_end, every ``poll_interval`` seconds or so (the smallest of
        the callbacks'), on every rank at the same step (so it may run a collective)."""

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...

    def on_health_event(self, trainer: Trainer, event: HealthEvent) -> None:
        """After a step the health supervisor found unhealthy (:mod:`trainer.health`), once per
        event, before the step's on_step_end, on every rank."""

    def on_rollback(self, trainer: Trainer) -> None:
        """After the health supervisor rolled the run back (:meth:`Trainer.roll_back
        <trainer.loop.Trainer.roll_back>`) to the checkpoint of ``trainer.step``, on every rank:
        the steps after it will be trained again."""

    def on_train_end(self, trainer: Trainer) -> None: ...


def verbose() -> bool:
    """Whether the user asked for every library's output (``kiln train --verbose`` sets
    ``KILN_VERBOSE=1`` for the training processes)."""
    return os.environ.get("KILN_VERBOSE", "") not in ("", "0")


class ConsoleProgress(Callback):
    """A tqdm status line with ETA on a terminal; where stderr is a file (a Slurm log, a pipe),
    one plain line per logged step instead (``train.log_every``). One printed line per
    evaluation."""

    def __init__(self, interactive: bool | None = None):
        """``interactive``: draw the tqdm bar (default: whether stderr is a terminal)."""
        self.interactive = sys.stderr.isatty() if interactive is None else interactive

    def on_train_start(self, trainer: Trainer) -> None:
        from tqdm import tqdm

        self.max_steps = trainer.cfg.train.max_steps
        self.bar = tqdm(
            disable=not self.interactive,
            total=trainer.cfg.train.max_steps,
            initial=trainer.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
        )

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float] | None) -> None:
        self.bar.update(1)
        if not metrics:
            return
        line = (
            f"loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
            f"gnorm {metrics['grad_norm']:.3f} {metrics['tokens_per_s']:,.0f} tok/s "
            f"MFU {100 * metrics['mfu']:.1f}% mem {metrics['memory_gb']:.2f}GB "
            f"data wait {metrics['data_wait_pct']:.1f}%"
        )
        if self.interactive:
            self.bar.set_postfix_str(line, refresh=False)
        else:
            print(f"step {trainer.step}/{self.max_steps}: {line}", file=sys.stderr, flush=True)

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.bar.write(
            f"step {trainer.step}: val_loss {metrics['val_loss']:.4f} "
            f"val_ppl {metrics['val_ppl']:.2f} val_bpb {metrics['val_bpb']:.4f}"
        )

    def on_rollback(self, trainer: Trainer) -> None:
        self.bar.n = trainer.step
        self.bar.refresh()

    def on_train_end(self, trainer: Trainer) -> None:
        self.bar.close()


def drop_records_after(path: Path, step: int) -> None:
    """Rewrite a JSON-lines log of ``{"step": ...}`` records for a run that starts at ``step``.

    A run that resumes from the checkpoint of ``step`` trains the later steps again (after a
    crash, a killed worker, a preemption), so their records are dropped, as is a line torn by a
    killed process; a run that starts at step 0 starts the log afresh. This keeps one record per
    step (and evaluation). The file is replaced atomically.
    """
    if not path.is_file():
        return
    text = path.read_text()
    kept = []
    for line in text.splitlines():
        try:
            if step > 0 and json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except json.JSONDecodeError:
            pass  # the torn last line of a killed process
    if "".join(kept) != text:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


class JsonlLogger(Callback):
    """Appends one JSON object per logged step / evaluation to ``<run_dir>/metrics.jsonl``;
    on (re)start drops the records of steps after the one the run starts from."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_start(self, trainer: Trainer) -> None:
        drop_records_after(self.path, trainer.step)

    on_rollback = on_train_start  # the steps rolled back from are trained again

    def _write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float] | None) -> None:
        if metrics:
            self._write({"step": trainer.step, "time": time.time(), **metrics})

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self._write({"step": trainer.step, "time": time.time(), **metrics})


def wandb_mode(configured: str | None) -> str:
    """online when configured or when an API key is available, else offline."""
    if configured is not None:
        return configured
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "online":
        return "online"
    return "offline"


def health_alert(event: HealthEvent, run_dir: str) -> tuple[str, str]:
    """The title (under wandb's 64 characters) and text of the alert of a health event."""
    kind = event.kind.replace("_", " ")
    title = f"Kiln: {kind} at step {event.step}"[:63]
    threshold = f" (threshold {event.threshold:.6g})" if event.threshold is not None else ""
    done = {
        "warn": "training goes on",
        "skip_step": "the update of this step was skipped; training goes on",
        "rollback": f"the run went back to step {event.rollback_to}'s checkpoint and goes on "
        "without this step's samples",
        "stop": "the run saved and stopped",
    }[event.action]
    text = (
        f"Run {run_dir}, step {event.step}: {kind} {event.value:.6g}{threshold} on ranks "
        f"{event.ranks}; action {event.action}: {done}. The event and its sample ids are in "
        f"health.jsonl; `kiln replay {run_dir} --step {event.step}` shows the step's samples."
    )
    return title, text


STEP_METRIC = "trainer/step"


class WandbLogger(Callback):
    """Logs to wandb with the resolved config; resumes the same run id when the run resumes.

    Every record carries the optimizer step as the metric ``trainer/step``, which every other
    metric is plotted against (``define_metric``), and is logged without wandb's own ``step``:
    wandb drops a record whose ``step`` is below one it has seen, and a run that resumes from a
    checkpoint older than its last logged step, or rolls back (``health.on_*: rollback``),
    trains those steps again. Their new records are kept beside the first ones, at the same
    ``trainer/step`` (as Hugging Face's Trainer does with ``train/global_step``).
    """

    def __init__(self, trainer: Trainer):
        import wandb

        from trainer.storage import RunFolder

        cfg = trainer.cfg
        self.wandb = wandb
        self.run = wandb.init(
            project=cfg.tracking.project,
            entity=cfg.tracking.entity,
            name=cfg.tracking.run_name or Path(cfg.run_dir).name,
            id=trainer.wandb_run_id,
            resume="allow",
            dir=str(RunFolder(cfg.run_dir).local.resolve()),  # a URL run's local mirror
            mode=wandb_mode(cfg.tracking.wandb_mode),
            config=cfg.model_dump(mode="json"),
            # No run-history wall at the end; `kiln train --verbose` (KILN_VERBOSE=1) shows it.
            settings=wandb.Settings(quiet=not verbose()),
        )
        self.run.define_metric(STEP_METRIC)
        self.run.define_metric("*", step_metric=STEP_METRIC)
        self._events: list[HealthEvent] = []  # of the current step, logged at its end
        self._skipped = 0

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float] | None) -> None:
        # The step's health events first, by step: a gradient-norm event names the step before
        # (trainer.health).
        for event in sorted(self._events, key=lambda e: e.step):
            self._log_health_event(event, trainer.cfg.run_dir)
        self._events.clear()
        if metrics:
            self.run.log(
                {STEP_METRIC: trainer.step, **{f"train/{k}": v for k, v in metrics.items()}}
            )

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.run.log({STEP_METRIC: trainer.step, **metrics})

    def on_health_event(self, trainer: Trainer, event: HealthEvent) -> None:
        """Kept for the end of the step (:meth:`_log_health_event`)."""
        self._events.append(event)

    def _log_health_event(self, event: HealthEvent, run_dir: str) -> None:
        """The metrics ``health/<kind>`` (the value) and ``health/<kind>_threshold`` at the
        event's step, and ``health/skipped_steps`` (the updates this launch skipped); then a
        ``wandb.alert`` naming the step, kind, value, threshold, ranks and action, level ``WARN``
        when the run goes on (``warn``, ``skip_step``, ``rollback``) and ``ERROR`` when it
        stops. Online, W&B sends the alert by email or Slack as the user's settings say; an
        offline run keeps it in its ``.wandb`` file with the metrics (``wandb leet inspect``
        reads them)."""
        record = {STEP_METRIC: event.step, f"health/{event.kind}": event.value}
        if event.threshold is not None:
            record[f"health/{event.kind}_threshold"] = event.threshold
        if event.action in ("skip_step", "stop"):
            self._skipped += 1
            record["health/skipped_steps"] = self._skipped
        self.run.log(record)
        title, text = health_alert(event, run_dir)
        level = (
            self.wandb.AlertLevel.ERROR if event.action == "stop" else self.wandb.AlertLevel.WARN
        )
        self.run.alert(title=title, text=text, level=level)

    def on_train_end(self, trainer: Trainer) -> None:
        self.run.finish()


class HealthLog(Callback):
    """Rank 0 appends each health event (:class:`trainer.health.HealthEvent`: step, kind, value,
    threshold, ranks, sample ids, action) as one JSON line to ``<run_dir>/health.jsonl`` and
    prints one console line; on (re)start drops the records of steps after the one the run
    starts from."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_start(self, trainer: Trainer) -> None:
        drop_records_after(self.path, trainer.step)

    def on_health_event(self, trainer: Trainer, event: HealthEvent) -> None:
        event.sample_ids = trainer.step_sample_ids(event.step, event.ranks)
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": time.time(), **event.record()}) + "\n")
        threshold = f" > threshold {event.threshold:.6g}" if event.threshold is not None else ""
        done = {
            "warn": "training goes on",
            "skip_step": "the update was skipped",
            "rollback": f"rolled back to step {event.rollback_to}",
            "stop": "stopping",
        }[event.action]
        print(
            f"health: step {event.step}: {event.kind.replace('_', ' ')} {event.value:.6g}"
            f"{threshold} on ranks {event.ranks}; {done} (health.jsonl)",
            file=sys.stderr,
            flush=True,
        )


class Checkpointer(Callback):
    """Saves every ``checkpoint.save_every`` steps, at the last step and when a stop signal came."""

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float] | None) -> None:
        every = trainer.cfg.checkpoint.save_every
        if (
            trainer.step % every == 0
            or trainer.step == trainer.cfg.train.max_steps
            or trainer.stopping
        ):
            trainer.save()


class SampleIdLogger(Callback):
    """Every rank appends the sample ids it trained on to ``<run_dir>/sample_ids/rank<r>.jsonl``
    (``train.log_sample_ids``): the record that proves a resume neither skips nor repeats data."""

    def __init__(self, run_dir: Path, rank: int):
        self.path = run_dir / "sample_ids" / f"rank{rank}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def on_train_start(self, trainer: Trainer) -> None:
        drop_records_after(self.path, trainer.step)

    on_rollback = on_train_start  # the steps rolled back from are trained again

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float] | None) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": trainer.step, "ids": trainer.last_sample_ids.tolist()}))
            f.write("\n")


class Publisher(Callback):
    """Rank 0 publishes checkpoints in the `transformers` layout into ``<run_dir>/hf/step-N``:
    every ``checkpoint.publish_every`` steps (right after the Checkpointer saved that step) and,
    with ``checkpoint.publish_at_end``, the final step after its evaluation. Each publish runs in
    a background CPU process (``python -m trainer.publish``, log in ``hf/step-N.log``) so training
    goes on; :meth:`wait` collects them once training is over."""

    def __init__(
        self, run_dir: Path, every: int | None, at_end: bool, dtype: str, source: str | None = None
    ):
        self.run_dir, self.every, self.at_end, self.dtype = run_dir, every, at_end, dtype
        # what the publish reads: the run folder, or its URL when run_dir is the URL's local
        # mirror (the publish then fetches the shards other nodes uploaded)
        self.source = source or str(run_dir)
        self.started: list[tuple[int, Path, Any]] = []

    def _start(self, step: int) -> None:
        from trainer.checkpoint import tag_for
        from trainer.publish import start_publish

        if any(s == step for s, _, _ in self.started):  # one publish per step and launch
            return
        out = self.run_dir / "hf" / tag_for(step)
        self.started.append((step, out, start_publish(self.source, step, out, self.dtype)))

    def on_train_start(self, trainer: Trainer) -> None:
        """Start again the publishes an earlier launch of the run was due to make but did not
        finish (it was stopped or killed while they ran): each complete checkpoint still kept
        at a publishing step whose ``hf/step-N`` folder does not exist (a publish writes it by
        one rename, so it exists only complete)."""
        from trainer.manifest import STATE_FILE

        for ckpt in sorted(self.run_dir.glob("checkpoints/step-*")):
            if ckpt.name.endswith("-universal") or not (ckpt / STATE_FILE).is_file():
                continue
            step = int(ckpt.name.removeprefix("step-"))
            end = step == trainer.cfg.train.max_steps
            due = (self.every and step % self.every == 0) or (self.at_end and end)
            if due and step <= trainer.step and not (self.run_dir / "hf" / ckpt.name).is_dir():
                self._start(step)

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float] | None) -> None:
        step = trainer.step
        if self.every and step % self.every == 0 and step < trainer.cfg.train.max_steps:
            self._start(step)  # the final step is published by on_train_end, after its eval

    def on_train_end(self, trainer: Trainer) -> None:
        step = trainer.step
        if step == trainer.cfg.train.max_steps and (
            self.at_end or (self.every and step % self.every == 0)
        ):
            self._start(step)

    def outputs(self) -> list[Path]:
        """The folders (and their logs) of the publishes started, written or not."""
        return [p for _, out, _ in self.started for p in (out, out.with_name(out.name + ".log"))]

    def wait(self) -> bool:
        """Wait for every publish started; print where each went. Returns whether all passed."""
        ok = True
        for step, out, proc in self.started:
            if proc.wait() == 0:
                print(f"published step {step} to {out}")
                continue
            ok = False
            print(
                f"publishing step {step} failed (exit {proc.returncode}; see {out}.log); the "
                f"checkpoint is intact: retry with `kiln publish {self.source} --step {step} "
                f"--out {out}`"
            )
        return ok
