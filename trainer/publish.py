"""Publish a checkpoint in the Hugging Face `transformers` layout, proven before it is written.

``kiln publish RUN_DIR --out DIR`` (and the :class:`trainer.callbacks.Publisher` callback):

1. **Index** the checkpoint of any layout (ZeRO 0-3 shards of any number of ranks, pipeline
   stages) on one CPU process without reading its weights
   (:func:`trainer.consolidate.open_checkpoint`).
2. **Convert** through the explicit key maps (the family's `hf` adapter) into the files
   ``save_pretrained`` of a `LlamaForCausalLM` / `T5ForConditionalGeneration` in the published
   dtype writes (:func:`write_weights`), one tensor in memory at a time, into a staging folder
   beside DIR: ``config.json``, ``model.safetensors`` (sharded with
   ``model.safetensors.index.json`` above ``max_shard_size``), ``generation_config.json``, the
   sentencepiece tokenizer in the form `AutoTokenizer` loads (`model.hf_tokenizer`), and a model
   card ``README.md``.
3. **Prove** it (:func:`prove`): run a fixed batch through the folder's model as the family's
   Auto class builds it from ``config.json`` (offline), each module's weights read from the
   folder for its forward only (:func:`hf_logits`), and through Kiln's model, piece by piece of
   its pipeline cut with each piece's weights read from the checkpoint (:func:`kiln_logits`);
   encode fixed English / Korean / code texts with the published tokenizer (fast, and
   sentencepiece-backed) and with Kiln's.
4. **Rename** the staging folder to DIR only when every check passed; a failed check deletes it
   and raises :class:`PublishError`, so nothing that looks complete is left behind.

Peak memory: the largest tensor (writing), or one pipeline piece's / one module's weights and
the batch's activations (proving), beside the process itself; never the model.

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
from torch import nn

from model.registry import family, spec
from trainer import mirror, storage
from trainer.consolidate import (
    CheckpointTensors,
    SafetensorsFolder,
    materialised,
    open_checkpoint,
    parameters_on_meta,
    write_safetensors,
)
from trainer.pipeline import PipeLayer

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


def hf_skeleton(cfg, dtype: torch.dtype):
    """The `transformers` model of ``cfg``'s family on the meta device, parameters in ``dtype``,
    tied as Kiln's model is and with Kiln's generation config: what :func:`hf_model` fills and
    what the streaming writer takes its names, shapes, sharding and config from (no memory)."""
    import transformers

    family = spec(cfg)
    with torch.device("meta"):
        out = getattr(transformers, family.hf_model_class)(family.hf.to_hf_config(cfg))
        head, embedding = out.get_output_embeddings(), out.get_input_embeddings()
        if not cfg.tie_word_embeddings and head.weight is embedding.weight:
            # transformers 5 ties a fresh T5's head to `shared`; T5 v1.1's head is its own.
            out.set_output_embeddings(nn.Linear(*reversed(head.weight.shape), bias=False))
    out = out.to(dtype)
    if cfg.tie_word_embeddings:
        out.tie_weights()
    out.generation_config = generation_config(cfg)
    return out.eval()


def hf_model(model, dtype: torch.dtype):
    """Kiln model -> the `transformers` model of its family holding the same weights in ``dtype``
    (fp32 shares the tensors; other dtypes are rounded copies, one per tensor, so aliases stay
    aliases). It holds the whole model: publishing streams instead (:func:`write_weights`), and
    tests compare the two."""
    cfg = model.config
    out = hf_skeleton(cfg, dtype)
    sd = spec(cfg).hf.to_hf_state_dict(model.state_dict(keep_vars=True), cfg)
    cast: dict[int, torch.Tensor] = {}  # one copy per tensor: aliases (T5's embed_tokens) stay tied
    sd = {k: cast.setdefault(id(v), v.detach().to(dtype)) for k, v in sd.items()}
    out.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        out.tie_weights()
    return out.eval()


def hf_key_sources(cfg, keys: list[str]) -> dict[str, str]:
    """Hugging Face key -> the Kiln key whose tensor it is, from the family's key map (applied to
    placeholders: the map renames tensors, it never computes them).

    Raises:
        ValueError: ``keys`` do not match ``cfg`` (the family's key map names them).
    """
    with torch.device("meta"):
        markers = {k: torch.empty(0) for k in keys}
    owner = {id(v): k for k, v in markers.items()}
    out = {}
    for hf_key, tensor in spec(cfg).hf.to_hf_state_dict(markers, cfg).items():
        assert id(tensor) in owner, f"the {cfg.model_type} key map computes {hf_key}"
        out[hf_key] = owner[id(tensor)]
    return out


def write_weights(
    weights: CheckpointTensors, cfg, folder: Path, dtype: torch.dtype, max_shard_size: str | int
) -> None:
    """Write ``config.json``, ``generation_config.json`` and the weights in ``dtype`` into
    ``folder`` as ``save_pretrained`` of :func:`hf_model` writes them (same files, names,
    sharding, index and tensors), holding one tensor at a time.

    Peak memory: the largest tensor, in fp32 and in ``dtype``. The shard plan is
    ``huggingface_hub.split_torch_state_dict_into_shards`` over the meta model's state dict with
    its tied aliases removed, as ``PreTrainedModel.save_pretrained`` plans it.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    skeleton = hf_skeleton(cfg, dtype)
    skeleton.config.dtype = str(dtype).split(".")[1]  # what save_pretrained records
    skeleton.config.architectures = [type(skeleton).__name__]
    skeleton.config.save_pretrained(folder)
    skeleton.generation_config.save_pretrained(folder)
    sources = hf_key_sources(cfg, weights_keys(cfg))
    state = remove_tied_weights_from_state_dict(skeleton.state_dict(), skeleton)
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )

    def produce(key: str) -> torch.Tensor:
        return weights.read(sources[key]).to(dtype)

    for file, keys in split.filename_to_tensors.items():
        layout = {k: (dtype, tuple(state[k].shape)) for k in keys}
        write_safetensors(folder / file, layout, produce, metadata={"format": "pt"})
    if split.is_sharded:
        index = {
            "metadata": {"total_parameters": skeleton.num_parameters(), **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        (folder / "model.safetensors.index.json").write_text(text)


def weights_keys(cfg) -> list[str]:
    """Every key of Kiln's state dict of ``cfg`` (a tied head included), in order."""
    with torch.device("meta"):
        model = spec(cfg).model_class(cfg)
    return list(model.state_dict())


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


def load_published(folder: Path, model_type: str, dtype: torch.dtype | str):
    """The folder loaded the way a user does (Auto class, offline), in ``dtype``: the whole model
    in memory (tests and small models; :func:`prove` streams)."""
    import transformers

    cls = getattr(transformers, family(model_type).hf_auto_class)
    return cls.from_pretrained(folder, dtype=dtype, local_files_only=True).eval()


def _first_inputs(cfg, batch: dict[str, torch.Tensor]):
    """The first pipeline piece's input: the model inputs in the spec's order (one: a tensor)."""
    inputs = tuple(batch[k] for k in spec(cfg).model_inputs)
    return inputs[0] if len(inputs) == 1 else inputs


def kiln_logits(
    weights: CheckpointTensors,
    cfg,
    batch: dict[str, torch.Tensor],
    *,
    rounding: torch.dtype,
    compute: torch.dtype,
) -> torch.Tensor:
    """Logits of Kiln's model on a :func:`check_batch`, computed piece by piece
    (``model.pipeline_pieces()``, the pipeline cut that equals the forward): each piece's
    weights are read from the checkpoint, rounded to ``rounding``, held in ``compute`` for the
    piece and dropped after it; buffers (RoPE tables) are cast to ``compute`` as ``.to(compute)``
    casts a model's. Peak memory: one piece's weights plus the activations.

    Returns:
        (2, T, V) fp32 logits.
    """
    with parameters_on_meta():
        model = spec(cfg).model_class(cfg).eval()
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_floating_point():
                module._buffers[name] = buf.to(compute)
    key_of: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        key_of.setdefault(id(param), name)
    x = _first_inputs(cfg, batch)
    with torch.no_grad():
        for piece in model.pipeline_pieces():
            holder = PipeLayer(piece)
            params = {
                m: {
                    n: weights.read(key_of[id(p)]).to(rounding).to(compute)
                    for n, p in m._parameters.items()
                    if p is not None
                }
                for m in holder.modules()
            }
            with materialised(params):
                x = piece.forward(holder, x)
            del params
    return x.float()


def hf_logits(
    folder: Path,
    model_type: str,
    batch: dict[str, torch.Tensor],
    vocab_size: int,
    dtype: torch.dtype | str,
) -> tuple[torch.Tensor | None, torch.dtype, list[str]]:
    """Logits of the published folder on a :func:`check_batch`, module by module.

    The model is what the family's Auto class builds from the folder's ``config.json`` (in
    ``dtype``; ``"auto"``: the dtype config.json records, as ``from_pretrained(dtype="auto")``),
    with its parameters on the meta device; a forward pre-hook gives each module its own
    parameters read from the folder's safetensors files (cast to the model's dtype) and a forward
    hook takes them back. A parameter the files lack is taken from the parameter it is tied to
    (``all_tied_weights_keys``, either direction), as ``from_pretrained`` ties it; both present,
    each keeps its own (``from_pretrained`` ties those only when equal, which computes alike).

    Returns:
        ((2, T, V) fp32 logits, or None when the folder cannot be loaded; the model's dtype;
        failures: weights missing or unused; with ``"auto"``, weights stored in another dtype
        than config.json records).
    """
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    auto = dtype == "auto"
    if auto:
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    cls = getattr(transformers, family(model_type).hf_auto_class)
    with parameters_on_meta():
        model = cls.from_config(config, dtype=dtype).eval()
    files = SafetensorsFolder(folder)
    names: dict[int, list[str]] = {}
    for qualified, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(qualified)
    partners: dict[str, set[str]] = {}
    for target, source in model.all_tied_weights_keys.items():
        partners.setdefault(target, set()).add(source)
        partners.setdefault(source, set()).add(target)
    failures: list[str] = []
    plan: dict[nn.Module, dict[str, str]] = {}  # module -> its parameter name -> file key
    for module in model.modules():
        own = [n for n, p in module._parameters.items() if p is not None]
        for name in own:
            candidates = [f"{q}.{name}" if q else name for q in names[id(module)]]
            tied = [t for c in candidates for t in sorted(partners.get(c, ()))]
            found = [k for k in (*candidates, *tied) if k in files.where]
            if not found:
                failures.append(f"the folder holds no weights for {candidates[0]}")
                continue
            plan.setdefault(module, {})[name] = found[0]
    used = {k for ps in plan.values() for k in ps.values()}
    unused = sorted(set(files.names()) - used)
    if unused:
        failures.append(f"the folder holds weights the model does not use: {unused[:5]}")
    stored = sorted({str(files.dtype(k)) for k in used} - {str(dtype)})
    if auto and stored:
        failures.append(f"the folder's weights are {stored}, the model loads as {dtype}")
    if failures:
        return None, dtype, failures

    def load(module, _args):
        real = {n: files.read(k).to(dtype) for n, k in plan[module].items()}
        module._kiln_meta = {n: module._parameters[n] for n in real}
        for n, t in real.items():
            module._parameters[n] = nn.Parameter(t, requires_grad=False)

    def unload(module, _args, _output):
        module._parameters.update(module.__dict__.pop("_kiln_meta"))

    hooks = []
    for module in plan:
        hooks.append(module.register_forward_pre_hook(load))
        hooks.append(module.register_forward_hook(unload))
    try:
        with torch.no_grad():
            logits = model(**batch).logits[..., :vocab_size].float()
    finally:
        for h in hooks:
            h.remove()
    return logits, dtype, []


def prove(
    folder: Path, weights: CheckpointTensors, cfg, tok, dtype: str
) -> tuple[float, float, float, list[str]]:
    """Check a written folder against the checkpoint's weights run through Kiln's model, and
    Kiln's tokenizer ``tok``, at bounded memory (:func:`kiln_logits` and :func:`hf_logits`
    hold one piece / one module's weights at a time).

    Logits: the published weights loaded in fp32 against Kiln's model holding the same rounded
    weights (fp32 arithmetic): :data:`FP32_TOLERANCE`; for bf16 / fp16, the folder loaded in
    the dtype its config.json records (which must be ``dtype``) against Kiln's model in that
    dtype: :data:`DTYPE_TOLERANCE`; both relative to max(1, max |reference logit|).

    Returns:
        (max |logit diff| in fp32, in the published dtype, max |reference logit|, failures):
        each failure is a sentence; an empty list means the folder is right.
    """
    from model.hf_tokenizer import tokenizer_mismatches

    torch_dtype = DTYPES[dtype]
    batch = check_batch(cfg, tok)
    reference = kiln_logits(weights, cfg, batch, rounding=torch_dtype, compute=torch.float32)
    scale = max(1.0, reference.abs().max().item())
    loaded, _, failures = hf_logits(folder, cfg.model_type, batch, cfg.vocab_size, torch.float32)
    diff32 = diff_native = float("nan")
    if loaded is not None:
        diff32 = diff_native = (loaded - reference).abs().max().item()
        if not diff32 <= FP32_TOLERANCE * scale:
            failures.append(
                f"logits of the published weights loaded in fp32 differ from Kiln's by "
                f"{diff32:.3g} (tolerance {FP32_TOLERANCE * scale:.3g})"
            )
    if loaded is not None and torch_dtype != torch.float32:
        loaded, auto, more = hf_logits(folder, cfg.model_type, batch, cfg.vocab_size, "auto")
        if auto != torch_dtype:
            more.append(f"the folder loads as {auto}, not {torch_dtype}")
        failures += more
        if loaded is not None and auto == torch_dtype:
            native = kiln_logits(weights, cfg, batch, rounding=torch_dtype, compute=torch_dtype)
            diff_native = (loaded - native).abs().max().item()
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
    from model.tokenizer import Tokenizer
    from trainer import checkpoint
    from trainer.config import config_from_dict
    from trainer.model_card import model_card

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
    out = Path(out)
    folder = storage.RunFolder(run_dir)
    check_out(out, folder.local, overwrite=overwrite)
    ckpt = folder.checkpoint(step)  # a URL's is downloaded into its mirror
    run_dir = ckpt.parent.parent
    state = checkpoint.read_trainer_state(ckpt)
    cfg = config_from_dict(state["config"]).derived.model
    tok = Tokenizer.load(ckpt / "tokenizer.model")
    weights = open_checkpoint(ckpt)
    parameters = _check_complete(weights, cfg)
    staging = _staging(out)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        write_weights(weights, cfg, staging, DTYPES[dtype], max_shard_size)
        _fix_config_json(staging, cfg)
        max_length = cfg.max_seq_len
        save_hf_tokenizer(
            tok,
            staging,
            model_type=cfg.model_type,
            model_max_length=max_length or state["config"]["data"]["seq_len"],
        )
        diff32, diff_native, scale, failures = prove(staging, weights, cfg, tok, dtype)
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
            parameters=parameters,
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


def _check_complete(weights: CheckpointTensors, cfg) -> int:
    """The parameter count of ``cfg``'s model, once every parameter is in the checkpoint.

    Raises:
        ValueError: the checkpoint lacks weights of the model (the first few named).
    """
    with torch.device("meta"):
        model = spec(cfg).model_class(cfg)
    named = dict(model.named_parameters())  # tied: listed once
    missing = sorted(set(named) - set(weights.names()))
    if missing:
        raise ValueError(f"{weights.ckpt} lacks weights for {missing[:5]}")
    return sum(p.numel() for p in named.values())


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
    lines += [f"  {name:<34} {mirror.format_size(size):>10}" for name, size in report.files.items()]
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
    download, folder = mirror.download_lines(folder)
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
