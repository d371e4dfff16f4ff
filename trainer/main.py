"""Entry point of one training process: parse the config, set up distributed, build, fit, close.

It runs the same under torchrun, srun, the deepspeed launcher or a Ray worker::

    torchrun --nproc_per_node 2 -m trainer.main runs/demo/config.yaml

Data and tokenizer must be prepared before (``kiln train`` does it before it launches).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections.abc import Sequence

import torch

from trainer import checkpoint, distributed
from trainer.callbacks import (
    Callback,
    Checkpointer,
    ConsoleProgress,
    HealthLog,
    JsonlLogger,
    Publisher,
    SampleIdLogger,
    WandbLogger,
)
from trainer.config import KilnConfig, batch_plan, load_config
from trainer.errors import COLLECTED_ENV, describe_failures, record_failure
from trainer.health import FAULT_RECORD
from trainer.storage import RunFolder
from trainer.watchdog import HANGS_DIR, HangWatchdog


def train(cfg: KilnConfig, extra_callbacks: Sequence[Callback] = ()) -> None:
    """Train (or resume) the run described by ``cfg`` in this process, one rank of the world.

    ``extra_callbacks`` (a launcher's, e.g. Ray's preemption check) run after Kiln's own on
    every rank.
    """
    world = distributed.init_distributed()
    from model.tokenizer import Tokenizer
    from trainer.construct import build_for_layout
    from trainer.data.dataset import open_train_data
    from trainer.engine import build_engine
    from trainer.estimate import peak_flops
    from trainer.loop import Trainer
    from trainer.objectives import build_objective, check_tokenizer

    plan = batch_plan(cfg, world.world_size)
    random.seed(cfg.train.seed + world.rank)
    torch.manual_seed(cfg.train.seed + world.rank)

    # A run folder at a URL is worked on in a local mirror on every node (trainer.storage): its
    # first process fetches what the URL's `latest` names, so the resume below reads local files.
    folder = RunFolder(cfg.run_dir)
    run_dir = folder.local
    node_main = folder.node_main(world.rank, world.local_rank)
    folder.start(
        cfg.to_yaml(),
        node_main=node_main,
        barrier=distributed.barrier,
        checksums=cfg.checkpoint.verify_checksums,
    )
    if folder.url is None:  # rank 0 checks the files (checksums: once, not on every rank)
        checksums = cfg.checkpoint.verify_checksums
        scanned = folder.resume_from(checksums=checksums) if world.is_main else None
        tag, notes = distributed.broadcast_object(scanned)
        ckpt = None if tag is None else folder.checkpoints / tag
    else:  # what the URL's `latest` names, fetched into the mirror by start()
        ckpt, notes = folder.latest_checkpoint(), []
    if world.is_main and ckpt is not None:
        print(f"resuming from {ckpt.name}" + "".join(f"\n  {n}" for n in notes))
    universal = False
    if node_main:
        folder.remove_partial()
    if ckpt is not None:
        state = checkpoint.read_trainer_state(ckpt)
        checkpoint.check_pipeline_layout(state, plan.pipeline_stages, world.world_size)
        cfg = checkpoint.keep_sub_groups(cfg, state)  # ZeRO-3's optimizer state is per sub-group
        if checkpoint.needs_universal(
            state, cfg.parallel.zero_stage, world.world_size, cfg.parallel.sub_group_size
        ):
            if node_main:  # every node converts its own copy when the mirrors are per node
                if world.is_main:
                    print(
                        f"resuming {ckpt.name} (ZeRO-{state['zero_stage']}, "
                        f"{state['world_size']} ranks) on {world.world_size} ranks through a "
                        f"universal checkpoint"
                    )
                checkpoint.convert_to_universal(ckpt)
            distributed.barrier()
            ckpt, universal = ckpt.with_name(ckpt.name + "-universal"), True

    tokenizer = Tokenizer.load(cfg.tokenizer_path)
    check_tokenizer(cfg, tokenizer)
    data = open_train_data(cfg, build_objective(cfg, tokenizer.sentinel_ids, tokenizer.eos_id))
    # Each rank builds and fills only what the layout gives it: its ZeRO-3 partitions, its
    # pipeline stage's layers (trainer.construct), from the seed or from the slices of
    # model.init_from it holds; a resumed run takes its checkpoint's weights instead.
    init_from = cfg.model.init_from if ckpt is None else None
    model, _ = build_for_layout(cfg, plan, init_from=init_from)
    if init_from is not None and world.is_main:
        print(f"initialised the model from the Hugging Face checkpoint {init_from}")
    engine = build_engine(cfg, model, plan, load_universal=universal)
    meta = cfg.tokenizer_path.with_name("tokenizer_meta.json")
    trainer = Trainer(
        cfg,
        engine,
        plan,
        world,
        data,
        token_bytes=tokenizer.token_bytes(),
        peak_flops=cfg.train.peak_flops or peak_flops(world.device, cfg.train.precision),
        extra_files=(folder.config_path, cfg.tokenizer_path, meta),
    )
    if ckpt is not None:
        trainer.load(ckpt)
    trainer.faults.record = run_dir / FAULT_RECORD  # a sleep fault fires once per run folder
    callbacks: list[Callback] = []
    if cfg.train.log_sample_ids and getattr(engine, "stage_id", 0) == 0:  # one stage per replica
        callbacks.append(SampleIdLogger(run_dir, world.rank))
    if world.is_main:
        callbacks += [ConsoleProgress(), JsonlLogger(folder.metrics_path)]
        callbacks.append(HealthLog(run_dir / "health.jsonl"))
        if cfg.tracking.wandb_mode != "disabled":
            callbacks.append(WandbLogger(trainer))
    callbacks.append(Checkpointer())  # metrics of a step are logged before it is saved
    publisher = None
    c = cfg.checkpoint
    if world.is_main and (c.publish_every or c.publish_at_end):
        publisher = Publisher(
            run_dir, c.publish_every, c.publish_at_end, c.publish_dtype, source=cfg.run_dir
        )
        callbacks.append(publisher)  # after the Checkpointer: it publishes what was just saved
    watchdog = None
    if cfg.health.step_timeout:  # every rank times its own steps (trainer.watchdog)
        hangs = run_dir / HANGS_DIR
        watchdog = HangWatchdog(cfg.health.step_timeout, hangs, world.rank, world.world_size)
        callbacks.append(watchdog)
    trainer.callbacks = [*callbacks, *extra_callbacks]
    trainer.install_signal_handlers()
    try:
        trainer.fit()
        folder.push_run_files(world.rank)  # the records after the last save (final evaluation)
    finally:
        if watchdog is not None:  # fit may have raised: its timer must not end the process
            watchdog.close()
        # Its barrier is the last time the ranks wait for each other: past it every rank of
        # this node has uploaded its files and is done with the node's mirror.
        distributed.close()
    if world.is_main and trainer.stopping:
        print(f"stopped by signal at step {trainer.step}; resume with the same command")
    published = True
    if publisher is not None:
        published = publisher.wait()  # outside the process group: the other ranks go on
    if publisher is not None:  # rank 0: the hf/ folders and their logs
        folder.upload(publisher.outputs())
    # A finished URL run is all at the URL now and its mirror only takes disk space; a run
    # stopped by a signal keeps it for its resume, a failed publish for its retry. The node's
    # first process deletes it, past the barrier above and its own uploads; rank 0, the only
    # rank that publishes, is node 0's first process.
    finished = not trainer.stopping and trainer.step >= cfg.train.max_steps
    if node_main and finished and published:
        kept = folder.finish()
        if world.is_main and kept is not None:
            print(f"kept the offline wandb runs in {kept} (`wandb sync` them)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One Kiln training process (see `kiln train`).")
    parser.add_argument("config", help="resolved config YAML (written by `kiln train`)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    try:
        train(cfg)
    except Exception as e:  # recorded for the launcher, which shows each failure once
        rank = int(os.environ.get("RANK", 0))
        record = record_failure(e, rank=rank, log_dir=RunFolder(cfg.run_dir).local / "logs")
        if os.environ.get(COLLECTED_ENV) != "1" or not record["recorded"]:
            print(describe_failures([record]), file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)
    # The run is saved and the process group destroyed by now. The interpreter's teardown of
    # DeepSpeed's and gloo's C++ threads sometimes aborts a finished multi-process run
    # ("terminate called without an active exception", exit -6 on one rank, about one CI run in
    # five here), which torchrun reports as a failure: leave without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
