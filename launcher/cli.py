"""The ``kiln`` command line.

Every subcommand takes a config YAML and ``key=value`` overrides (``train.lr=3e-4``); the config
is resolved and validated here, before any process starts.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from pathlib import Path

import click

from launcher import preflight
from launcher.preflight import user_errors
from launcher.ray_cli import ray_group
from launcher.slurm import slurm
from trainer.config import check_paths
from trainer.errors import COLLECTED_ENV, describe_failures, read_failures
from trainer.watchdog import describe_hangs, hang_reports


class _RunDir(click.Path):
    """An existing run folder, or the fsspec URL of one (read through its local mirror)."""

    name = "run_dir"

    def convert(self, value, param, ctx):
        from trainer.storage import RunFolder

        if RunFolder(value).url is not None:  # checked when it is opened
            return value
        return super().convert(value, param, ctx)


RUN_DIR = _RunDir(file_okay=False, exists=True)
OVERRIDES_HELP = "KEY=VALUE overrides of the config, e.g. train.lr=3e-4 parallel.zero_stage=2"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kiln", message="kiln %(version)s")
def cli() -> None:
    """Kiln: pretrain Llama-style transformers from raw text with DeepSpeed."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")


@cli.command(context_settings={"show_default": True})
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--nproc", type=int, help="processes on this node (default launch.nproc_per_node)")
@click.option("--nnodes", type=int, help="nodes (default launch.nnodes)")
@click.option("--node-rank", type=int, default=0, help="this node's rank (multi-node by hand)")
@click.option("--master-addr", default="127.0.0.1", help="address of node 0 (multi-node)")
@click.option("--master-port", type=int, default=29500, help="rendezvous port on node 0")
@click.option("--dry-run", is_flag=True, help="print the plan (config, sizes, memory) and exit")
@click.option("--sample-prompt", default="The", help="prompt of the final sample ('' for none)")
@click.option("--accept-changes", is_flag=True, help=preflight.ACCEPT_CHANGES_HELP)
@click.option("--restart", is_flag=True, help=preflight.RESTART_HELP)
@click.option("--verbose", is_flag=True, help="show torchrun's and wandb's own output too")
def train(
    config, overrides, nproc, nnodes, node_rank, master_addr, master_port, dry_run, sample_prompt,
    accept_changes, restart, verbose,
):  # fmt: skip
    """Train (or resume) the run described by CONFIG [OVERRIDES...].

    Prepares what is missing first (tokenizer, then data), then starts one process per device
    with torchrun. On a run folder that already has a checkpoint, resumes from the newest
    complete one (whatever `checkpoints/latest` says); a resume whose model shape, data,
    tokenizer, seq_len, schedule or objective differ from the checkpoint's is refused unless
    --accept-changes. Training from step 0 in a folder that holds checkpoints takes --restart,
    which first moves the old run's files into restarted-<time>/ in the folder. SIGTERM /
    SIGUSR1 / Ctrl-C make the workers finish the step, save and exit.
    """
    extra = []
    if nproc is not None:
        extra.append(f"launch.nproc_per_node={nproc}")
    if nnodes is not None:
        extra.append(f"launch.nnodes={nnodes}")
    cfg = preflight.load(config, overrides, extra)
    world_size = cfg.launch.nproc_per_node * cfg.launch.nnodes
    with user_errors():
        if dry_run:
            cuda = None
        else:
            import torch

            cuda = torch.cuda.is_available()
        plan = preflight.check(cfg, [world_size], cuda_available=cuda, restart=restart)
        warnings = list(plan.warnings)
        if cuda is not None:  # the processes start on this machine: it is the node
            memory = [preflight.host_memory_warning(cfg, plan.batch, on_gpu=cuda)]
            if cuda:
                memory.append(preflight.device_memory_warning(cfg, plan.batch))
            warnings += [m for m in memory if m]
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    if dry_run:
        from launcher.report import plan_report

        with user_errors():
            resume = preflight.resume_plan(cfg, restart=restart)
            resume.check(accept_changes=True, batches=plan.batches)  # the report shows changes
            click.echo(plan_report(cfg, plan.batch, resume))
        return

    from launcher.local import run_workers, torchrun_command
    from trainer.manifest import checkpoint_tag
    from trainer.storage import RunFolder

    with user_errors():
        preflight.prepare(cfg)
        resume = preflight.check_resume(
            cfg, accept_changes=accept_changes, batches=plan.batches, restart=restart
        )
    # A URL run folder: the workers use a local mirror of it and upload (trainer.storage).
    folder = RunFolder(cfg.run_dir)
    run_dir = folder.prepare(cfg.to_yaml())
    if resume.tag is not None:
        click.echo(f"resuming {folder.location} from {resume.tag}")
    cmd = torchrun_command(
        run_dir / "config.yaml",
        nproc_per_node=cfg.launch.nproc_per_node,
        nnodes=cfg.launch.nnodes,
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=master_port,
    )
    if verbose:
        os.environ["KILN_VERBOSE"] = "1"  # read by launcher.torchrun and the training processes
    os.environ[COLLECTED_ENV] = "1"  # the ranks leave their failures to this process to show
    started = time.time() - 2  # the workers' clocks: this machine's, or NTP's on other nodes
    rc = run_workers(cmd)
    if rc != 0:
        if hangs := hang_reports(run_dir, since=started):  # the ranks' later errors follow it
            click.echo(f"Error: {describe_hangs(hangs)}", err=True)
        if failures := read_failures(run_dir / "logs", since=started):
            raise click.ClickException(describe_failures(failures))
        raise click.ClickException(f"training failed (torchrun exit code {rc}); see the log above")
    step = folder.latest_step()  # a finished URL run's workers deleted the mirror: the URL says
    if step is None or step < cfg.train.max_steps or node_rank != 0:
        return
    if sample_prompt:
        with folder.read_copy(step) as local:  # a URL's: a download that leaves no mirror
            text = _sample(local, sample_prompt, 200, 0.8, 50, None, 0, step)
        click.echo(f"\nsample from {checkpoint_tag(step)}:\n{text}")
    published = folder.published(step)
    if cfg.checkpoint.publish_at_end and published is not None:
        from trainer.publish import load_snippet

        lines = load_snippet(published, cfg.model.model_type)
        click.echo(f"\npublished in the transformers layout: {published}")
        click.echo("\n".join(f"  {line}" for line in lines))


@cli.group()
def tokenizer() -> None:
    """Tokenizer commands."""


@tokenizer.command("train")
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--ray", "use_ray", is_flag=True, help="sample the corpus with Ray Data tasks")
@click.option("--address", help="with --ray: Ray cluster address (default RAY_ADDRESS or local)")
@click.option("--num-blocks", type=int, help="with --ray: blocks of documents (default by size)")
def tokenizer_train(config, overrides, use_ray, address, num_blocks):
    """Train the sentencepiece tokenizer on a sample of the config's data sources.

    With --ray, Ray Data tasks sample the lines of blocks of documents and this process merges
    them: the same sample, hence the same tokenizer, as without it.
    """
    from trainer.data.prepare import train_tokenizer_from_config

    cfg = preflight.load(config, overrides)
    with user_errors():
        check_paths(cfg)
    if use_ray:
        from launcher.ray_cli import train_tokenizer_on_ray_cluster

        tok = train_tokenizer_on_ray_cluster(cfg, address=address, num_blocks=num_blocks)
    elif address is not None or num_blocks is not None:
        raise click.UsageError("--address and --num-blocks need --ray")
    else:
        with user_errors():
            tok = train_tokenizer_from_config(cfg)
    click.echo(f"wrote {cfg.tokenizer_path} ({tok.vocab_size} pieces, sha256 {tok.sha256[:12]})")


@cli.group()
def data() -> None:
    """Data commands."""


@data.command("prepare")
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--force", is_flag=True, help="re-prepare datasets that are already prepared")
@click.option("--ray", "use_ray", is_flag=True, help="tokenize and pack as Ray Data tasks")
@click.option("--address", help="with --ray: Ray cluster address (default RAY_ADDRESS or local)")
@click.option("--num-blocks", type=int, help="with --ray: blocks per dataset (default by size)")
def data_prepare(config, overrides, force, use_ray, address, num_blocks):
    """Tokenize, pack and shard every dataset of the config (training the tokenizer if missing).

    With --ray the work runs as Ray Data tasks over the cluster (data.root must be storage every
    node mounts at the same path); the shards are the same as without it.
    """
    from trainer.data.prepare import prepare_all

    cfg = preflight.load(config, overrides)
    with user_errors():
        check_paths(cfg)
    if use_ray:
        from launcher.ray_cli import prepare_on_ray

        manifests = prepare_on_ray(cfg, force=force, address=address, num_blocks=num_blocks)
    else:
        if address is not None or num_blocks is not None:
            raise click.UsageError("--address and --num-blocks need --ray")
        with user_errors():
            manifests = prepare_all(cfg, force=force)
    for manifest in manifests:
        t = manifest["splits"]["train"]
        click.echo(f"{manifest['name']}: {t['sequences']} train sequences, {t['tokens']} tokens")


@cli.command()
@click.argument("run_dir", type=RUN_DIR)
@click.option("--prompt", required=True, help="text to continue")
@click.option("--max-new-tokens", type=int, default=200, show_default=True)
@click.option("--temperature", type=float, default=0.8, show_default=True, help="0 = greedy")
@click.option("--top-k", type=int, default=None, help="keep the k most likely tokens")
@click.option("--top-p", type=float, default=None, help="nucleus sampling threshold")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--step", type=int, default=None, help="checkpoint step (default: latest)")
def generate(run_dir, prompt, max_new_tokens, temperature, top_k, top_p, seed, step):
    """Continue PROMPT with the model of RUN_DIR's latest checkpoint.

    For an encoder-decoder (T5) run, PROMPT is the encoder input: write the spans to fill as
    sentinels, e.g. "ROMEO: <extra_id_0> is the <extra_id_1>."; the input is printed with the
    generated spans in place. A prompt without sentinels prints the decoder's continuation.
    """
    click.echo(_sample(run_dir, prompt, max_new_tokens, temperature, top_k, top_p, seed, step))


def _sample(run_dir, prompt, max_new_tokens, temperature, top_k, top_p, seed, step=None) -> str:
    from model import spec
    from trainer.inference import load_run

    sampling = dict(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
    )
    try:
        model, tok = load_run(run_dir, step=step)
        return spec(model.config).complete(model, tok, prompt, **sampling)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None


@cli.command()
@click.argument("run_dir", type=RUN_DIR)
@click.option("--step", type=int, required=True, help="the step to recompute (1-based)")
@click.option("--top", type=click.IntRange(min=0), default=5, show_default=True,
              help="worst samples to show with their text")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of text")
def replay(run_dir, step, top, as_json):
    """Recompute step N (--step) of RUN_DIR on this process, changing nothing, to find bad data.

    Loads the checkpoint of step N-1 (any layout: ZeRO 0-3 shards, pipeline stages), reads the
    step's samples as the run did, and prints the step loss next to the one metrics.jsonl
    logged (equal on the run's layout and machine), the spread of the per-sample losses, and the
    worst --top samples with their id, dataset, row and the text of the documents in them;
    --json gives every sample. RUN_DIR may be a URL (its checkpoint is downloaded into the local
    mirror). A step whose checkpoint N-1 was not kept is refused with the list of checkpoints
    there are.
    """
    from trainer.replay import format_report, replay_step

    with user_errors():
        result = replay_step(run_dir, step, top=top)
    click.echo(result.to_json() if as_json else format_report(result))


@cli.group("checkpoint")
def checkpoint_group() -> None:
    """Checkpoint commands."""


@checkpoint_group.command("consolidate")
@click.argument("run_dir", type=RUN_DIR)
@click.option("--step", type=int, default=None, help="checkpoint step (default: latest)")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="a .safetensors file")
@click.option("--overwrite", is_flag=True, help="replace an existing --out file")
def checkpoint_consolidate(run_dir, step, out, overwrite):
    """Write the plain model's fp32 state dict of a checkpoint from any layout (ZeRO 0-3 shards,
    pipeline stages) to one safetensors file, in one CPU process holding one tensor at a time.
    Keys are those of `LlamaForCausalLM` / `T5ForConditionalGeneration` (the family's `hf`
    adapter maps them to Hugging Face's). The file is written under a temporary name and renamed
    when complete."""
    from trainer.consolidate import consolidate
    from trainer.storage import RunFolder

    out_path = Path(out)
    if out_path.suffix != ".safetensors":
        raise click.UsageError(f"--out {out} must name a .safetensors file")
    if out_path.resolve().is_relative_to(RunFolder(run_dir).local.resolve() / "checkpoints"):
        raise click.UsageError(f"--out {out} is inside the run's checkpoints; write it elsewhere")
    if out_path.exists() and not overwrite:
        raise click.UsageError(f"--out {out} exists; choose another --out or pass --overwrite")
    partial = out_path.with_name(f".tmp-{out_path.name}")
    try:
        ckpt = RunFolder(run_dir).checkpoint(step)
        tensors, n = consolidate(ckpt, partial)  # one tensor in memory at a time
    except (FileNotFoundError, ValueError) as e:
        partial.unlink(missing_ok=True)
        raise click.ClickException(str(e)) from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, out_path)
    click.echo(f"wrote {out}: {tensors} tensors, {n:,} parameters from {ckpt}")


@cli.command(context_settings={"show_default": True})
@click.argument("run_dir", type=RUN_DIR)
@click.option("--out", type=click.Path(file_okay=False), required=True, help="folder to write")
@click.option("--step", type=int, default=None, help="checkpoint step (default: latest)")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32")
@click.option("--max-shard-size", default="5GB", help="safetensors files are cut above this")
@click.option("--license", "license_", default=None, help="model card licence id [other]")
@click.option("--overwrite", is_flag=True, help="replace an existing --out folder")
@click.option("--push-to-hub", "repo_id", default=None, help="upload to this Hub repo (user/name)")
@click.option("--private", is_flag=True, help="with --push-to-hub: create the repo private")
@click.option("--revision", default=None, help="with --push-to-hub: branch to upload to [main]")
@click.option("--dry-run", is_flag=True, help="with --push-to-hub: list the upload, send nothing")
def publish(
    run_dir, out, step, dtype, max_shard_size, license_, overwrite, repo_id, private, revision,
    dry_run,
):  # fmt: skip
    """Publish RUN_DIR's checkpoint in the Hugging Face transformers layout into --out.

    Consolidates any layout (ZeRO 0-3 shards, pipeline stages) on this one CPU process, writes
    config.json, model.safetensors (sharded with an index above --max-shard-size),
    generation_config.json, the tokenizer (tokenizer.model and tokenizer.json) and a model card
    README.md, then loads the folder back with transformers and compares its logits and token
    ids with Kiln's model. Only a folder that passes appears at --out; otherwise the command
    fails and leaves nothing there. --push-to-hub uploads it with huggingface_hub (needs HF_TOKEN
    or `hf auth login`).
    """
    from trainer import publish as pub

    if not repo_id and (private or revision or dry_run):
        raise click.UsageError("--private, --revision and --dry-run need --push-to-hub")
    if repo_id and not dry_run:
        try:
            pub.require_hub_token()  # before minutes of consolidation
        except pub.PublishError as e:
            raise click.ClickException(str(e)) from None
    try:
        report = pub.publish(
            run_dir,  # a path or a URL (downloaded into its local mirror)
            out,
            step=step,
            dtype=dtype,
            max_shard_size=max_shard_size,
            license=license_,
            overwrite=overwrite,
            hub_repo=repo_id,
        )
    except (FileNotFoundError, FileExistsError, ValueError, pub.PublishError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(pub.describe(report))
    if not repo_id:
        return
    where = f"{repo_id}@{revision or 'main'}" + (" (private)" if private else "")
    if dry_run:
        plan = pub.upload_plan(Path(out))
        total = sum(size for _, size in plan)
        click.echo(
            f"\n--dry-run: would upload {len(plan)} files ({total / 2**20:.2f} MiB) to {where}:"
        )
        for name, size in plan:
            click.echo(f"  {name:<40} {size:>14,} bytes")
        if pub.hub_token() is None:
            click.echo("no Hub token is configured: set HF_TOKEN or run `hf auth login` first")
        return
    url = pub.push_to_hub(
        Path(out), repo_id, private=private, revision=revision,
        message=f"Kiln: {Path(run_dir).name} step {report.step}",
    )  # fmt: skip
    click.echo(f"uploaded to {where}: {url}")


@cli.command()
def presets() -> None:
    """List the model presets of every family with their sizes."""
    from model.registry import FAMILIES

    for family in FAMILIES.values():
        click.echo(
            f"{family.model_type} ({family.description}, model.model_type={family.model_type})"
        )
        click.echo(f"{'name':<8} {'layers':>7} {'width':>6} {'heads':>6} {'params*':>10}")
        for name, preset in family.presets.items():
            m = preset().model_copy(update={"vocab_size": 32000})
            layers, width, heads = family.shape_row(m)
            click.echo(
                f"{name:<8} {layers:>7} {width:>6} {heads:>6} {m.num_parameters() / 1e6:>9.1f}M"
            )
        click.echo()
    click.echo("* with a 32000-piece vocabulary; a decoder's heads: query/key-value")


_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class _Duration(click.ParamType):
    """A duration such as 30m, 12h, 7d (s, m, h, d, w) or 0, as seconds."""

    name = "duration"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw]?)", value.strip())
        if match is None or (match[2] == "" and float(match[1]) != 0):
            self.fail(f"{value!r} is no duration such as 30m, 12h, 7d or 0", param, ctx)
        return float(match[1]) * _SECONDS[match[2]]


def _age(seconds: float) -> str:
    for unit, scale in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= scale:
            return f"{seconds / scale:.1f}{unit}"
    return f"{max(seconds, 0):.0f}s"


@cli.group()
def cache() -> None:
    """This node's mirrors of run folders at URLs ($KILN_CACHE/runs).

    A run that trains to its end deletes its mirrors; a stopped or crashed run keeps them for
    its resume, and `kiln generate / publish / checkpoint consolidate URL` download into them.
    """


@cache.command("list")
def cache_list() -> None:
    """List the mirrors: size, time since anything in them last changed, URL, folder."""
    from trainer import mirror

    mirrors = mirror.list_mirrors()
    click.echo(f"mirrors in {mirror.mirrors_root()}: {len(mirrors)}")
    if mirrors:
        now = time.time()
        click.echo(f"{'size':>10}  {'age':>6}  url (folder)")
    for m in mirrors:
        size, age = mirror.format_size(m.size), _age(now - m.modified)
        click.echo(f"{size:>10}  {age:>6}  {m.url or '?'} ({m.path.name})")


@cache.command("clean", context_settings={"show_default": True})
@click.option(
    "--older-than",
    type=_Duration(),
    default="7d",
    help="remove mirrors in which nothing changed for this long (30m, 12h, 7d; 0: all)",
)
@click.option("--dry-run", is_flag=True, help="print what would be removed, remove nothing")
def cache_clean(older_than: float, dry_run: bool) -> None:
    """Remove the mirrors not modified for longer than --older-than.

    The mirror of a run in progress changes at every save at least (node 0's at every logged
    step), so one longer than the time between saves keeps it. A stopped run resumes from the
    URL without its mirror (it downloads the checkpoint again). An offline wandb folder that a
    finished run kept in its mirror goes with it.
    """
    from trainer import mirror

    now, freed = time.time(), 0
    stale = mirror.stale_mirrors(older_than, now)
    for m in stale:
        freed += m.size if dry_run else mirror.remove_mirror(m.path)
        click.echo(
            f"{'would remove' if dry_run else 'removed'} {m.path} ({m.url or '?'}, "
            f"{mirror.format_size(m.size)}, last modified {_age(now - m.modified)} ago)"
        )
    click.echo(
        f"{'would free' if dry_run else 'freed'} {freed:,} bytes "
        f"({mirror.format_size(freed)}); mirrors {'to remove' if dry_run else 'removed'}: "
        f"{len(stale)}"
    )


cli.add_command(slurm)
cli.add_command(ray_group)


def main() -> None:
    cli(prog_name="kiln")


if __name__ == "__main__":
    sys.exit(main())
