"""Publish a checkpoint in the Hugging Face `transformers` layout, proven before it is written.

``kiln publish RUN_DIR --out DIR`` (and the :class:`trainer.callbacks.Publisher` callback):

1. **Consolidate** the fp32 weights of any layout (ZeRO 0-3 shards of any number of ranks,
   pipeline stages) on one CPU process (:func:`trainer.checkpoint.load_model_weights`).
2. **Convert** through the explicit key maps (the family spec's `hf` adapter) into a
   `LlamaForCausalLM` / `T5ForConditionalGeneration`, cast to the published dtype and write it
   with `save_pretrained` into a staging folder beside DIR: ``config.json``,
   ``model.safetensors`` (sharded with ``model.safetensors.index.json`` above
   ``max_shard_size``), ``generation_config.json``, the sentencepiece tokenizer in the form
   `AutoTokenizer` loads (`model.hf_tokenizer`), and a model card ``README.md``.
3. **Prove** it: load the staging folder back with `transformers` (offline, Auto classes), run a
   fixed batch through it and through Kiln's model, and encode fixed English / Korean / code
   texts with the published tokenizer (fast, and sentencepiece-backed) and with Kiln's.
4. **Rename** the staging folder to DIR only when every check passed; a failed check deletes it
   and raises :class:`PublishError`, so nothing that looks complete is left behind.

Logit tolerances (max |difference| / max(1, max |reference logit|)): the weights as published,
loaded in fp32, against Kiln's model holding the same rounded weights: 1e-4 (fp32 arithmetic,
a few ulps per layer); the model loaded in its published dtype against Kiln's in that dtype:
:data:`DTYPE_TOLERANCE`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.registry import family, spec
from trainer import storage

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Relative tolerance of the logits computed in the published dtype (Kiln's vs transformers'
# kernels, both in that dtype): a few units of the dtype's epsilon (bf16 2^-8, fp16 2^-11) after
# the rounding of every layer.
DTYPE_TOLERANCE = {"fp32": 1e-4, "bf16": 6e-2, "fp16": 1e-2}
FP32_TOLERANCE = 1e-4
# What the tokenizer check encodes: English, Korean (rare syllables fall back to bytes), code.
CHECK_TEXTS = (
    "ROMEO: But, soft! what light through yonder window breaks?\nIt is the east.",
    "  Leading spaces, digits 2026 and 3.14159, tabs\tand trailing spaces  ",
    "정말 재미있는 영화였어요! 배우들의 연기가 훌륭했습니다. 뷁",
    "def area(r):\n    return 3.14159 * r ** 2  # 넓이\n",
)
_TORCHRUN_ENV = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
    "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
)  # fmt: skip


class PublishError(RuntimeError):
    """The published folder failed a check (or could not be written); nothing was left at the
    output path."""


@dataclass
class PublishReport:
    """What :func:`publish` wrote and measured."""

    out: Path
    model_type: str  # llama | t5
    checkpoint: Path
    step: int
    dtype: str
    files: dict[str, int]  # file name -> bytes
    parameters: int
    max_logit_diff_fp32: float  # the published weights loaded in fp32, vs Kiln's model
    max_logit_diff_native: float  # both models in the published dtype
    logit_scale: float  # max |reference logit| of the check batch
    tokenizer_texts: int
    notes: list[str] = field(default_factory=list)


# -- the conversion ---------------------------------------------------------------------------


def hf_model(model, dtype: torch.dtype):
    """Kiln model -> the `transformers` model of its family holding the same weights in ``dtype``
    (fp32 shares the tensors; other dtypes are rounded copies)."""
    import transformers
    from torch import nn

    cfg = model.config
    family = spec(cfg)
    sd = family.hf.to_hf_state_dict(model.state_dict(), cfg)
    with torch.device("meta"):
        out = getattr(transformers, family.hf_model_class)(family.hf.to_hf_config(cfg))
        head, embedding = out.get_output_embeddings(), out.get_input_embeddings()
        if not cfg.tie_word_embeddings and head.weight is embedding.weight:
            # transformers 5 ties a fresh T5's head to `shared`; T5 v1.1's head is its own.
            out.set_output_embeddings(nn.Linear(*reversed(head.weight.shape), bias=False))
    out.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        out.tie_weights()
    out.generation_config = generation_config(cfg)
    return out.eval()


def generation_config(cfg):
    """Greedy decoding with Kiln's special ids (T5: decoding starts from the pad id)."""
    from transformers import GenerationConfig

    return GenerationConfig(**spec(cfg).generation_config(cfg))


def _fix_config_json(folder: Path, cfg) -> None:
    """``tie_word_embeddings`` as the model is: transformers 5 writes ``true`` for every T5 (the
    v1.1 flag lives in ``scale_decoder_outputs``); an untied T5 v1.1 says false, as Google's own
    configs do, so transformers 4 also loads it untied."""
    path = folder / "config.json"
    hf_cfg = json.loads(path.read_text())
    if hf_cfg.get("tie_word_embeddings") == cfg.tie_word_embeddings:
        return
    hf_cfg["tie_word_embeddings"] = cfg.tie_word_embeddings
    path.write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")


# -- the proof ----------------------------------------------------------------------------------


def check_batch(cfg, tok, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed batch of 2 for the logits check: row 0 the check texts' ids, row 1 random ids.
    Llama: ``input_ids (2, T)``; T5: also ``attention_mask (2, S)`` (row 1 padded after 20
    tokens) and ``decoder_input_ids (2, 16)`` starting with the decoder start id."""
    g = torch.Generator().manual_seed(seed)
    text_ids = tok.encode(" ".join(CHECK_TEXTS))

    def rows(length: int) -> torch.Tensor:
        first = torch.tensor(text_ids[:length], dtype=torch.long)
        if len(first) < length:
            fill = torch.randint(4, tok.vocab_size, (length - len(first),), generator=g)
            first = torch.cat([first, fill])
        return torch.stack([first, torch.randint(4, tok.vocab_size, (length,), generator=g)])

    return spec(cfg).check_batch(cfg, rows)


def kiln_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of Kiln's model on a :func:`check_batch`: (2, T, V) fp32."""
    with torch.no_grad():
        return model(**batch).float()


def hf_logits(model, batch: dict[str, torch.Tensor], vocab_size: int) -> torch.Tensor:
    """Logits of a `transformers` model on a :func:`check_batch`: (2, T, V) fp32."""
    with torch.no_grad():
        return model(**batch).logits[..., :vocab_size].float()


def load_published(folder: Path, model_type: str, dtype: torch.dtype | str):
    """The folder loaded the way a user does (Auto class, offline), in ``dtype``."""
    import transformers

    cls = getattr(transformers, family(model_type).hf_auto_class)
    return cls.from_pretrained(folder, dtype=dtype, local_files_only=True).eval()


def _rounded(model, dtype: torch.dtype):
    """Kiln's model with its weights rounded to ``dtype`` and computed in fp32 (a copy)."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.copy_(p.to(dtype).float())
    return out


def prove(folder: Path, model, tok, dtype: str) -> tuple[float, float, float, list[str]]:
    """Check a written folder against Kiln's ``model`` and tokenizer ``tok``.

    Returns:
        (max |logit diff| in fp32, in the published dtype, max |reference logit|, failures):
        each failure is a sentence; an empty list means the folder is right.
    """
    from model.hf_tokenizer import tokenizer_mismatches

    cfg = model.config
    torch_dtype = DTYPES[dtype]
    batch = check_batch(cfg, tok)
    failures: list[str] = []
    rounded = _rounded(model, torch_dtype)
    reference = kiln_logits(rounded, batch)
    scale = max(1.0, reference.abs().max().item())
    loaded = load_published(folder, cfg.model_type, torch.float32)
    diff32 = (hf_logits(loaded, batch, cfg.vocab_size) - reference).abs().max().item()
    del loaded
    if not diff32 <= FP32_TOLERANCE * scale:
        failures.append(
            f"logits of the published weights loaded in fp32 differ from Kiln's by {diff32:.3g} "
            f"(tolerance {FP32_TOLERANCE * scale:.3g})"
        )
    diff_native = diff32
    if torch_dtype != torch.float32:
        loaded = load_published(folder, cfg.model_type, "auto")
        if loaded.dtype != torch_dtype:
            failures.append(f"the folder loads as {loaded.dtype}, not {torch_dtype}")
        native = kiln_logits(rounded.to(torch_dtype), batch)  # in place: reference is done
        diff_native = (hf_logits(loaded, batch, cfg.vocab_size) - native).abs().max().item()
        if not diff_native <= DTYPE_TOLERANCE[dtype] * scale:
            failures.append(
                f"logits in {dtype} differ from Kiln's in {dtype} by {diff_native:.3g} "
                f"(tolerance {DTYPE_TOLERANCE[dtype] * scale:.3g})"
            )
    failures += tokenizer_mismatches(folder, tok, CHECK_TEXTS, model_type=cfg.model_type)
    return diff32, diff_native, scale, failures


# -- the command --------------------------------------------------------------------------------


def _staging(out: Path) -> Path:
    return out.with_name(f".tmp-{out.name}")


def publish(
    run_dir: str | Path,
    out: str | Path,
    *,
    step: int | None = None,
    dtype: str = "fp32",
    max_shard_size: str | int = "5GB",
    license: str | None = None,
    overwrite: bool = False,
    hub_repo: str | None = None,
) -> PublishReport:
    """Publish the checkpoint of ``run_dir`` (latest, or ``step``) into ``out``.

    ``run_dir`` may be an fsspec URL: the checkpoint is downloaded into its local mirror first
    (also the shards other nodes wrote, when the mirror is a training node's).

    Args:
        dtype: ``fp32``, ``bf16`` or ``fp16``: the dtype of the written weights.
        max_shard_size: safetensors files are cut above this size (``"5GB"`` or bytes) and
            indexed by ``model.safetensors.index.json``.
        license: the model card's ``license`` (a Hub licence id such as ``apache-2.0``);
            default ``other``.
        overwrite: replace an existing ``out`` (only once the new folder passed its checks).
        hub_repo: the Hub repository it will be uploaded to: the card's code loads from there
            instead of from ``out``.

    Raises:
        FileNotFoundError: the run has no (such) complete checkpoint.
        FileExistsError: ``out`` exists and ``overwrite`` is false.
        PublishError: a check failed; the staging folder is deleted and ``out`` untouched.
    """
    from model.hf_tokenizer import save_hf_tokenizer
    from trainer import checkpoint
    from trainer.inference import load_run
    from trainer.model_card import model_card

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
    out = Path(out)
    folder = storage.RunFolder(run_dir)
    check_out(out, folder.local, overwrite=overwrite)
    ckpt = folder.checkpoint(step)  # a URL's is downloaded into its mirror
    run_dir = ckpt.parent.parent
    state = checkpoint.read_trainer_state(ckpt)
    model, tok = load_run(run_dir, step=state["step"])
    cfg = model.config
    staging = _staging(out)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        hf = hf_model(model, DTYPES[dtype])
        hf.save_pretrained(staging, max_shard_size=max_shard_size)
        del hf
        _fix_config_json(staging, cfg)
        max_length = cfg.max_seq_len
        save_hf_tokenizer(
            tok,
            staging,
            model_type=cfg.model_type,
            model_max_length=max_length or state["config"]["data"]["seq_len"],
        )
        diff32, diff_native, scale, failures = prove(staging, model, tok, dtype)
        if failures:
            raise PublishError(
                f"refusing to publish {ckpt}: the written folder does not reproduce Kiln's model:"
                + "".join(f"\n  - {f}" for f in failures)
            )
        report = PublishReport(
            out=out,
            model_type=cfg.model_type,
            checkpoint=ckpt,
            step=state["step"],
            dtype=dtype,
            files={},
            parameters=sum(p.numel() for p in model.parameters()),
            max_logit_diff_fp32=diff32,
            max_logit_diff_native=diff_native,
            logit_scale=scale,
            tokenizer_texts=len(CHECK_TEXTS),
        )
        card = model_card(
            Path(run_dir), state, report, tok, license=license, location=hub_repo or str(out)
        )
        (staging / "README.md").write_text(card)
        report.files = {p.name: p.stat().st_size for p in sorted(staging.iterdir())}
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _replace(staging, out)
    return report


def check_out(out: Path, run_dir: Path, *, overwrite: bool) -> None:
    """Refuse an ``out`` that publishing could not replace without destroying what it does not
    own: the run folder itself or a folder holding it, and, with ``overwrite``, any existing
    folder other than a flat Hugging Face folder (``config.json`` and files only: a run folder
    or a data root holds folders, so it is never one).

    Raises:
        FileExistsError: ``out`` exists (non-empty) and ``overwrite`` is false, or it is not a
            folder this command may replace; the message names another ``--out``.
    """
    out_abs, run_abs = out.resolve(), run_dir.resolve()
    if out_abs == run_abs or out_abs in run_abs.parents:
        raise FileExistsError(
            f"--out {out} is the run folder {run_dir} or holds it; publishing would replace the "
            f"run's checkpoints: choose a folder outside it or inside it (default "
            f"{run_dir / 'hf'}/step-N)"
        )
    if out.is_file():
        raise FileExistsError(f"--out {out} is a file; name a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{out} exists; choose another --out or pass --overwrite")
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    if folders or not (out / "config.json").is_file():
        raise FileExistsError(
            f"--overwrite replaces only a published Hugging Face folder (config.json and files), "
            f"but {out} holds {'folders ' + str(folders[:5]) if folders else 'no config.json'}; "
            f"choose another --out"
        )


def _replace(staging: Path, out: Path) -> None:
    """Move the finished staging folder to ``out``; an old ``out`` is removed only afterwards."""
    old = out.with_name(f".old-{out.name}")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


# -- the Hub ------------------------------------------------------------------------------------


def hub_token() -> str | None:
    """The Hugging Face token `huggingface_hub` would use (``HF_TOKEN`` or ``hf auth login``)."""
    from huggingface_hub import get_token

    return get_token()


def require_hub_token() -> None:
    """Raises PublishError, saying how to configure one, when no Hub token is configured."""
    if hub_token() is None:
        raise PublishError(
            "--push-to-hub needs a Hugging Face token with write access: set HF_TOKEN or run "
            "`hf auth login` (nothing was published; --dry-run lists what would be uploaded)"
        )


def upload_plan(folder: Path) -> list[tuple[str, int]]:
    """(path relative to ``folder``, bytes) of every file an upload sends, sorted."""
    return sorted(
        (str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file()
    )


def push_to_hub(
    folder: Path, repo_id: str, *, private: bool, revision: str | None, message: str
) -> str:
    """Upload ``folder`` to the Hub repository ``repo_id`` (created if missing, ``private`` as
    asked) on branch ``revision`` (created from main if missing; None: main). Returns the commit
    URL. Network and permission errors come from `huggingface_hub` unchanged."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    commit = api.upload_folder(
        folder_path=folder, repo_id=repo_id, revision=revision, commit_message=message
    )
    return str(commit.commit_url)


# -- publishing from a training run -------------------------------------------------------------


def publish_command(run_dir: str | Path, step: int, out: Path, dtype: str) -> list[str]:
    """The command that publishes ``step`` of a run in its own process."""
    return [
        sys.executable, "-m", "trainer.publish", str(run_dir),
        "--step", str(step), "--out", str(out), "--dtype", dtype, "--overwrite",
    ]  # fmt: skip


def start_publish(run_dir: str | Path, step: int, out: Path, dtype: str) -> subprocess.Popen:
    """Publish in a background CPU process (training goes on); its output goes to
    ``<out>.log``. The torchrun variables are removed so it does not join the training world."""
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_ENV}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(out.with_name(out.name + ".log"), "w")  # noqa: SIM115 (owned by the process)
    return subprocess.Popen(
        publish_command(run_dir, step, out, dtype),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def describe(report: PublishReport) -> str:
    """A few lines for the console: files, sizes, the checks."""
    lines = [f"published step {report.step} of {report.checkpoint} to {report.out}:"]
    lines += [
        f"  {name:<34} {storage.format_size(size):>10}" for name, size in report.files.items()
    ]
    lines.append(
        f"checked: logits max |diff| {report.max_logit_diff_fp32:.2e} (fp32)"
        + (
            f", {report.max_logit_diff_native:.2e} ({report.dtype})"
            if report.dtype != "fp32"
            else ""
        )
        + f" over logits up to {report.logit_scale:.1f}; tokenizer (fast and sentencepiece) "
        f"equal to Kiln's on {report.tokenizer_texts} texts"
    )
    lines += [
        "load it with:",
        *(f"  {line}" for line in load_snippet(report.out, report.model_type)),
    ]
    return "\n".join(lines)


def load_snippet(folder: Path | str, model_type: str) -> list[str]:
    """The three lines of Python that load a published folder; for an fsspec URL
    (``s3://.../hf/step-N``) three more before them copy it into the current folder first
    (transformers reads local folders and the Hub only)."""

    auto = family(model_type).hf_auto_class
    download, folder = storage.download_lines(folder)
    return [
        *download,
        f"from transformers import {auto}, AutoTokenizer",
        f'tokenizer = AutoTokenizer.from_pretrained("{folder}")',
        f'model = {auto}.from_pretrained("{folder}")',
    ]


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m trainer.publish``: what the training run's publisher starts (``kiln publish``
    is the user's command)."""
    parser = argparse.ArgumentParser(description="Publish a Kiln checkpoint (see `kiln publish`).")
    parser.add_argument("run_dir")
    parser.add_argument("--step", type=int)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    report = publish(
        args.run_dir, args.out, step=args.step, dtype=args.dtype, overwrite=args.overwrite
    )
    print(describe(report))


if __name__ == "__main__":
    main()
