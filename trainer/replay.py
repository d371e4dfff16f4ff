"""Find the bad data of a step: recompute one optimizer step of a run, on one process, without
updating anything (``kiln replay RUN_DIR --step N``).

The weights before step ``N`` are those of the checkpoint of step ``N - 1`` (consolidated from any
layout: ZeRO 0-3 shards of any number of ranks, pipeline stages; :func:`trainer.inference.
load_run`). Replay needs exactly that checkpoint: replaying the steps between an older checkpoint
and ``N - 1`` would take optimizer updates, which one process cannot reproduce bit for bit for a
run sharded over several (ZeRO's partitioned reductions sum in another order), so an older one is
refused with the list of checkpoints the run has.

The sample order is a pure function of the global sample index (:mod:`trainer.loop`): step ``N``
(1-based) consumed the logical indices ``[(N - 1) G, N G)``, and micro-step ``m`` of data-parallel
rank ``r`` read ``(N - 1) G + m b n + r b + [0, b)`` (G global batch, b micro batch, n
data-parallel size, from the checkpoint's config and the world size the step ran on), mapped to
global indices past the samples the run's rollbacks excluded (the newest checkpoint's list,
:func:`trainer.data.dataset.skip_excluded`). Replay reads
the same rows through the same objective (span corruption draws from the global index), forwards
each micro-batch as training did (same shape, same dtype, training mode with autograd on; a T5
with ``dropout_rate`` > 0 drops other units than the run did, so its loss cannot match) and
computes

- per sample: the token-mean cross-entropy (nats per labelled token) of its row, its id
  (``dataset_idx * 2**40 + seq_idx``), dataset, row, shard and the EOS-delimited documents inside
  the row (the prepared data records no per-row document index: packing concatenates documents
  with EOS after each and cuts the stream into rows);
- the step loss as the loop logs it (:meth:`trainer.loop.Trainer._train_metrics` with
  ``train.log_every=1``): per micro-batch the token mean over the micro-batch
  (:func:`trainer.objectives.token_loss`), summed over the rank's micro-batches in fp32 and
  divided by ``gradient_accumulation_steps``; the ranks' values summed in float64 in rank order
  (the all-reduce) and divided by ``world_size`` (under the pipeline engine every stage of a
  replica holds its replica's loss). The forward runs with as many threads as a rank of the run
  had on its node (a CPU matmul's sums depend on them). On the layout and machine the run used
  this reproduces the logged value to its last digit (checked for ZeRO 0-3, the pipeline engine
  and both families); replayed elsewhere (another CPU, a GPU run on CPU) the last digits may
  differ.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trainer.objectives import IGNORE_INDEX, token_loss

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEXT_CHARS = 400  # of each document piece in the console report (--json has all of it)


@dataclass
class Document:
    """One EOS-delimited piece of a packed row: tokens ``[start, end)`` of the row (``seq_len +
    1`` tokens), its EOS excluded. ``starts_in_row`` / ``ends_in_row``: the document begins /
    ends inside this row (else it continues from the row before / into the row after)."""

    start: int
    end: int
    starts_in_row: bool
    ends_in_row: bool
    text: str | None = None


@dataclass
class SampleLoss:
    """One sample of the replayed step.

    Attributes:
        sample_id: ``dataset_idx * 2**40 + seq_idx`` (:mod:`trainer.data.dataset`).
        dataset: the dataset's name (``data.datasets[dataset_idx].name``).
        dataset_path: its prepared folder.
        sequence: the row's index in the dataset's train split.
        shard: the shard file holding the row, relative to ``dataset_path``.
        rank: the data-parallel rank that trained on it; ``micro_batch``: its micro-step.
        loss: mean cross-entropy over the row's labelled tokens, nats per token.
        tokens: labelled tokens of the row.
        documents: the row's EOS-delimited documents (texts only for the worst samples).
    """

    sample_id: int
    dataset: str
    dataset_path: str
    sequence: int
    shard: str
    rank: int
    micro_batch: int
    loss: float
    tokens: int
    documents: list[Document] = field(default_factory=list)


@dataclass
class StepReplay:
    """What :func:`replay_step` found.

    Attributes:
        run: the run folder (path or URL); ``step``: the replayed step (1-based).
        checkpoint: the checkpoint the weights came from (``step-{step - 1}``).
        layout: world_size, zero_stage, pipeline_stages, data_parallel_size, micro_batch_size,
            gradient_accumulation_steps, precision of the step as the run trained it.
        loss: the step loss aggregated as the loop logs it (module docstring).
        logged_loss: metrics.jsonl's ``loss`` of the step when that record is the step's alone
            (None otherwise: see ``logged_note``).
        samples: every sample of the step, by rank and micro-batch; ``worst``: the ``top``
            highest-loss ones, with their documents' text.
        health_events: the step's records in health.jsonl (the supervisor's events).
    """

    run: str
    step: int
    checkpoint: str
    layout: dict[str, Any]
    loss: float
    logged_loss: float | None
    logged_note: str
    samples: list[SampleLoss]
    worst: list[SampleLoss]
    health_events: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        """The replay as one JSON object (NaN and infinities as JSON's ``NaN`` / ``Infinity``,
        as metrics.jsonl writes them)."""
        return json.dumps(asdict(self))


def _complete_checkpoints(folder) -> list[int]:
    """Steps of the run's complete checkpoints (a ``trainer_state.json``: written last), sorted;
    read at the URL for a URL run."""
    from trainer.manifest import STATE_FILE

    if folder.store is not None:
        names = folder.store.listing("checkpoints")
        tags = {
            n.split("/")[0] for n in names if n.endswith(f"/{STATE_FILE}") and n.count("/") == 1
        }
    else:
        tags = {p.parent.name for p in folder.checkpoints.glob(f"step-*/{STATE_FILE}")}
    return sorted(int(t.removeprefix("step-")) for t in tags if t.removeprefix("step-").isdigit())


def _records(path: Path, key: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines log that have ``key`` (metrics.jsonl's training records:
    ``loss``), a torn last line skipped; none if there is no file."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if key in record:
            out.append(record)
    return out


def choose_checkpoint(run: str, step: int, steps: list[int], last_step: int | None) -> int:
    """The checkpoint step to replay ``step`` (1-based) from: ``step - 1``.

    Raises:
        ValueError: ``step`` < 1, beyond the steps the run trained (``last_step``), or the run
            has no checkpoint of ``step - 1`` (the message lists those it has and what to do).
    """
    if step < 1:
        raise ValueError(f"--step {step}: steps count from 1, as in metrics.jsonl")
    if last_step is not None and step > last_step:
        raise ValueError(
            f"--step {step} is beyond the run: {run} trained steps 1 to {last_step} "
            f"(metrics.jsonl); replay one of those"
        )
    from trainer.manifest import checkpoint_tag

    have = ", ".join(checkpoint_tag(s) for s in steps) or "none"
    if step == 1:
        raise ValueError(
            f"{run} keeps no weights of step 0 (a run saves after its steps; checkpoints: "
            f"{have}): replay step N+1 of a checkpoint of step N"
        )
    if step - 1 in steps:
        return step - 1
    before = [s for s in steps if s < step]
    if not before:
        raise ValueError(
            f"{run} has no checkpoint before step {step} (checkpoints: {have}); replay reads "
            f"the weights of step {step - 1}: replay step N+1 of a checkpoint of step N"
        )
    older = before[-1]
    raise ValueError(
        f"{run} has no checkpoint of step {step - 1}, the weights step {step} started from "
        f"(checkpoints: {have}). Replay does not re-train steps {older + 1} to {step - 1} from "
        f"{checkpoint_tag(older)}: one process cannot redo a sharded run's updates bit for "
        f"bit. Replay step N+1 of a checkpoint of step N (--step {older + 1}), or keep a "
        f"checkpoint every step around a step to inspect (checkpoint.save_every)"
    )


def step_indices(plan, step: int, micro: int, dp_rank: int) -> np.ndarray:
    """Logical sample indices ``(micro_batch_size,) int64`` of micro-step ``micro`` of step
    ``step`` (1-based) on data-parallel rank ``dp_rank`` (:mod:`trainer.loop`'s order); the
    global indices they read: ``TrainData.global_indices`` (the run's exclusions left out)."""
    start = (step - 1) * plan.global_batch_size
    start += (micro * plan.data_parallel_size + dp_rank) * plan.micro_batch_size
    return np.arange(start, start + plan.micro_batch_size, dtype=np.int64)


def documents(
    row: np.ndarray, eos_id: int, before: int | None, after: int | None
) -> list[Document]:
    """The EOS-delimited documents of a packed row.

    Args:
        row: (seq_len + 1,) token ids.
        eos_id: the tokenizer's EOS id (packing puts one after every document).
        before: the last token of the previous row of the split (None: first row).
        after: the first token of the next row (None: last row).
    """
    ends = np.flatnonzero(row == eos_id).tolist()
    out, start = [], 0
    for end in ends:
        if end > start:  # an EOS right after another (or at 0) closes no text here
            out.append(Document(start, end, start > 0 or before in (None, eos_id), True))
        start = end + 1
    if start < len(row):
        out.append(Document(start, len(row), start > 0 or before in (None, eos_id), False))
    if out and not out[-1].ends_in_row and after is None:
        out[-1].ends_in_row = True  # the split's last row: its stream ends here
    return out


def replay_step(run_dir: str | Path, step: int, *, top: int = 5) -> StepReplay:
    """Recompute step ``step`` (1-based) of the run in ``run_dir`` (a path or an fsspec URL,
    whose checkpoint and metrics.jsonl are downloaded into its local mirror) on this process,
    on CPU, changing nothing.

    Returns:
        a :class:`StepReplay`: the step loss as logged, every sample's loss and source, and the
        ``top`` worst samples with their documents' text.

    Raises:
        ValueError: a step before 1 or beyond the run, no checkpoint of ``step - 1`` (the message
            lists the run's checkpoints), prepared data or tokenizer that differ from the run's,
            ``top`` < 0.
        FileNotFoundError: the run folder, a checkpoint file or the prepared data is missing
            (the message says what to do).
    """
    from trainer import checkpoint
    from trainer.config import batch_plan, config_from_dict
    from trainer.data.dataset import MANIFEST_FILE, SAMPLE_ID_STRIDE, open_train_data
    from trainer.fingerprint import differences, run_fingerprint
    from trainer.inference import load_run
    from trainer.manifest import checkpoint_tag
    from trainer.objectives import build_objective
    from trainer.storage import RunFolder

    if top < 0:
        raise ValueError(f"--top {top}: give 0 or more samples to show")
    folder = RunFolder(run_dir)
    if folder.url is None and not folder.local.is_dir():
        raise FileNotFoundError(f"{folder.location} is not a run folder (it does not exist)")
    steps = _complete_checkpoints(folder)
    if folder.url is not None and steps:
        folder.store.download_file("metrics.jsonl")
        folder.store.download_file("health.jsonl")
    records = _records(folder.metrics_path, "loss")
    events = [e for e in _records(folder.local / "health.jsonl", "kind") if e["step"] == step]
    last = max((r["step"] for r in records), default=max(steps, default=None))
    start = choose_checkpoint(folder.location, step, steps, last)
    tag = checkpoint_tag(start)
    state = checkpoint.read_trainer_state(folder.checkpoint(start))  # downloads a URL's
    cfg = config_from_dict(state["config"])
    record = next((r for r in reversed(records) if r["step"] == step), None)
    # the step ran on the world the metrics name (a resume may change it), else the checkpoint's
    world_size = int((record or state).get("world_size", state["world_size"]))
    plan = batch_plan(cfg, world_size)
    for d in cfg.data.datasets:
        if not (cfg.dataset_dir(d.name) / MANIFEST_FILE).is_file():
            raise FileNotFoundError(
                f"replay reads the rows {folder.location} trained on from dataset {d.name!r} at "
                f"{cfg.dataset_dir(d.name)} (data.root={cfg.data.root} in {tag}'s config), which "
                f"is not prepared there; prepare it again from the same sources with the run's "
                f"config (`kiln data prepare {folder.location}/config.yaml`), or run replay from "
                f"the folder the run was started in if data.root is relative"
            )
    changed = [
        line
        for line in differences(state.get("fingerprint", {}), run_fingerprint(cfg))
        if line.startswith(("data.", "tokenizer."))
    ]
    if changed:
        raise ValueError(
            f"the prepared data or tokenizer differ from those {tag} of {folder.location} was "
            f"trained on ({'; '.join(changed)}); replay reads the run's own rows: prepare the "
            f"data as the run had it (data.root={cfg.data.root})"
        )
    model, tokenizer = load_run(run_dir, step=start)  # consolidated, fp32
    data = open_train_data(cfg, build_objective(cfg, tokenizer.sentinel_ids, tokenizer.eos_id))
    # The run's rollbacks left global indices out of the order (trainer.data.dataset.
    # skip_excluded). Exclusions only grow, and those of a rollback at step k move only the
    # indices of steps k and later, so the newest checkpoint's list maps every step as trained.
    newest = (
        state
        if start == max(steps)
        else checkpoint.read_trainer_state(folder.checkpoint(max(steps)))
    )
    data.exclude(newest.get("excluded_samples", []))
    # DeepSpeed trains a bf16 / fp16 module: the same rounding of the fp32 weights
    model = model.to(DTYPES[cfg.train.precision])

    # A CPU run's ranks split the node's cores (trainer.distributed.init_distributed) and a
    # matmul's sums depend on its threads: recompute with as many as a rank had.
    threads = torch.get_num_threads()
    per_node = state.get("hardware", {}).get("processes_per_node", 1)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
    try:
        samples, replica_losses = _forward_step(model, data, plan, step)
    finally:
        torch.set_num_threads(threads)
    # the all-reduce of the ranks' losses: every stage of a replica holds the replica's loss
    summed = torch.zeros(1, dtype=torch.float64)  # trainer.distributed.all_reduce_sum's fp64
    for rank in range(world_size):
        summed += replica_losses[_replica_of(rank, plan)]
    loss = summed.item() / world_size

    logged, note = _logged(record, records, step, cfg.train.log_every)
    worst = sorted(samples, key=lambda s: -s.loss if math.isfinite(s.loss) else -math.inf)[:top]
    eos = tokenizer.eos_id
    for s in samples:
        ds = data.datasets[s.sample_id // SAMPLE_ID_STRIDE]
        row = ds[s.sequence]
        before = int(ds[s.sequence - 1][-1]) if s.sequence > 0 else None
        after = int(ds[s.sequence + 1][0]) if s.sequence + 1 < len(ds) else None
        s.documents = documents(row, eos, before, after)
    for s in worst:
        row = data.datasets[s.sample_id // SAMPLE_ID_STRIDE][s.sequence]
        for doc in s.documents:
            doc.text = tokenizer.decode(row[doc.start : doc.end])
    layout = {
        "world_size": world_size,
        "zero_stage": cfg.parallel.zero_stage,
        "pipeline_stages": plan.pipeline_stages,
        "data_parallel_size": plan.data_parallel_size,
        "micro_batch_size": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "precision": cfg.train.precision,
    }
    return StepReplay(
        folder.location, step, tag, layout, loss, logged, note, samples, list(worst), events
    )


def _forward_step(model, data, plan, step: int) -> tuple[list[SampleLoss], list[torch.Tensor]]:
    """Forward step ``step``'s micro-batches of every data-parallel rank as the loop does.

    Returns:
        every sample's :class:`SampleLoss` (by rank and micro-batch) and each rank's mean
        micro-batch loss (a 0-d fp32 tensor, summed in the loop's order).
    """
    from trainer.data.dataset import SAMPLE_ID_STRIDE

    samples: list[SampleLoss] = []
    replica_losses: list[torch.Tensor] = []
    # In training mode with autograd on, as the loop: PyTorch may pick other kernels without
    # gradients (T5's masked attention on CPU differs in the last bit under no_grad). Each
    # micro-batch's graph is freed before the next; nothing is updated.
    model.train()
    with torch.enable_grad():
        for r in range(plan.data_parallel_size):
            total = torch.zeros(())
            for micro in range(plan.gradient_accumulation_steps):
                batch = data.batch(data.global_indices(step_indices(plan, step, micro, r)))
                logits = model(**batch.inputs)
                # exactly the loop's micro-batch loss
                total += token_loss(logits, batch.labels).detach()
                logits = logits.detach()
                nats = F.cross_entropy(
                    logits.float().flatten(0, 1), batch.labels.flatten(),
                    ignore_index=IGNORE_INDEX, reduction="none",
                ).view(batch.labels.shape)  # fmt: skip
                counts = (batch.labels != IGNORE_INDEX).sum(1)
                per_sample = nats.double().sum(1) / counts.clamp(min=1)
                for sid, loss, n in zip(
                    batch.sample_ids.tolist(), per_sample.tolist(), counts.tolist(), strict=True
                ):
                    d, seq = divmod(sid, SAMPLE_ID_STRIDE)
                    ds = data.datasets[d]
                    samples.append(
                        SampleLoss(
                            sid, ds.name, str(ds.path), seq, _shard_of(ds, seq), r, micro,
                            loss, n,
                        )
                    )  # fmt: skip
            replica_losses.append(total / plan.gradient_accumulation_steps)
    return samples, replica_losses


def _replica_of(rank: int, plan) -> int:
    """The data-parallel replica of global ``rank``: DeepSpeed's pipeline topology puts the
    pipe axis outermost (``PipeDataParallelTopology``: axes ``['pipe', 'data']``), so rank =
    stage * data_parallel_size + replica; without a pipeline it is the rank."""
    return rank % plan.data_parallel_size


def _shard_of(dataset, seq: int) -> str:
    shards = dataset.manifest["splits"]["train"]["shards"]
    ends = np.cumsum([s["sequences"] for s in shards])
    return shards[int(np.searchsorted(ends, seq, side="right"))]["file"]


def _logged(
    record: dict[str, Any] | None, records: list[dict[str, Any]], step: int, log_every: int
) -> tuple[float | None, str]:
    """metrics.jsonl's loss of ``step`` when its record covers that step alone, and a note."""
    if record is None:
        return None, f"metrics.jsonl has no record of step {step} (train.log_every={log_every})"
    earlier = [r["step"] for r in records if r["step"] < step]
    if log_every == 1 or step == 1 or (earlier and max(earlier) == step - 1):
        return float(record["loss"]), "metrics.jsonl"
    return None, (
        f"metrics.jsonl's loss at step {step} is the mean of the steps since the last logged one "
        f"(train.log_every={log_every}): not this step's alone"
    )


def format_report(r: StepReplay) -> str:
    """The replay as console text: the step loss against the logged one, then the worst
    samples with their source and text."""
    lay = r.layout
    layout = (
        f"ZeRO-{lay['zero_stage']}, {lay['world_size']} process"
        f"{'es' if lay['world_size'] > 1 else ''}"
        + (f", {lay['pipeline_stages']} pipeline stages" if lay["pipeline_stages"] > 1 else "")
        + f", micro batch {lay['micro_batch_size']} x {lay['gradient_accumulation_steps']} "
        f"accumulation x {lay['data_parallel_size']} data-parallel, {lay['precision']}"
    )
    lines = [f"replay of {r.run} step {r.step} from {r.checkpoint} ({layout})"]
    if r.logged_loss is None:
        lines.append(f"loss {r.loss!r} ({r.logged_note})")
    else:
        same = "equal" if r.loss == r.logged_loss else f"differs by {r.loss - r.logged_loss:.3g}"
        lines.append(f"loss {r.loss!r}, logged {r.logged_loss!r} ({same})")
    for e in r.health_events:
        lines.append(
            f"health.jsonl: {e['kind'].replace('_', ' ')} {e['value']:.6g} on ranks "
            f"{e['ranks']} (action {e['action']})"
        )
    losses = np.array([s.loss for s in r.samples])
    lines.append(
        f"{len(r.samples)} samples: per-sample loss min {np.min(losses):.4f} median "
        f"{np.median(losses):.4f} max {np.max(losses):.4f} (nats per token)"
    )
    if r.worst:
        lines.append(f"worst {len(r.worst)}:")
    for i, s in enumerate(r.worst, 1):
        lines.append(
            f"{i}. loss {s.loss:.4f} over {s.tokens} tokens, sample {s.sample_id}: {s.dataset} "
            f"row {s.sequence} ({s.dataset_path}/{s.shard}), rank {s.rank} micro-batch "
            f"{s.micro_batch}, {len(s.documents)} document(s)"
        )
        for doc in s.documents:
            where = (
                f"{'' if doc.starts_in_row else '... '}tokens {doc.start}-{doc.end}"
                f"{'' if doc.ends_in_row else ' ...'}"
            )
            text = doc.text or ""
            if len(text) > TEXT_CHARS:
                text = text[:TEXT_CHARS] + f"... ({len(text)} characters; --json has all)"
            lines.append(f"   [{where}] {text!r}")
    return "\n".join(lines)
