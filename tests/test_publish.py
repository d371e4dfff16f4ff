"""`kiln publish` and the publishing callback: from a ZeRO-3 run on 2 processes and from a
2-stage pipeline run of each family, the published folder loads offline with the `transformers`
Auto classes, reproduces Kiln's logits and tokens, generates what `kiln generate` generates, and
fine-tunes with the `transformers` `Trainer`; the streamed folder holds the files the whole model's
`save_pretrained` wrote and passes the whole-model check; a folder that fails its check is never
left behind; the Hub upload refuses early without a token and lists its files with --dry-run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import kiln, kiln_in_process, train_config
from distributed import run_distributed, train_runs
from safetensors.torch import load_file
from test_consolidate import whole_state_dict

from model import build_model
from model.generate import fill_in_spans
from model.tokenizer import Tokenizer
from trainer import publish as pub
from trainer.checkpoint import latest_checkpoint, read_trainer_state
from trainer.config import config_from_dict
from trainer.inference import load_run

PARITY_ATOL = 1e-4  # fp32, the bound
SOURCES = ["llama-zero3", "llama-pipe", "t5-zero3", "t5-pipe"]
ENGLISH = "ROMEO: But, soft! what light through yonder window breaks? It is the east."
KOREAN = "정말 재미있는 영화였어요! 배우들의 연기가 훌륭했습니다. 뷁 꿻"


def auto_class(family: str):
    return (
        transformers.AutoModelForCausalLM
        if family == "llama"
        else transformers.AutoModelForSeq2SeqLM
    )


@pytest.fixture(scope="module")
def run_dirs(zero_runs, t5_runs, pipeline_runs) -> dict[str, Path]:
    return {
        "llama-zero3": zero_runs[3],
        "llama-pipe": pipeline_runs["llama-pipe"],
        "t5-zero3": t5_runs[3],
        "t5-pipe": pipeline_runs["t5-pipe"],
    }


@pytest.fixture(scope="module")
def published(run_dirs, tmp_path_factory) -> dict[str, Path]:
    """Each source run published with the CLI, as a user would (in this process)."""
    out = {}
    for key, run in run_dirs.items():
        folder = tmp_path_factory.mktemp("hf") / key
        result = kiln_in_process(
            "publish", str(run), "--out", str(folder), "--license", "apache-2.0"
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        assert "load it with:" in result.stdout
        out[key] = folder
    return out


@pytest.mark.parametrize("key", SOURCES)
def test_published_folder_reproduces_the_model(published, run_dirs, key):
    family = key.split("-")[0]
    folder = published[key]
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md"} <= names
    assert {"tokenizer.model", "tokenizer_config.json"} <= names
    assert not list(folder.parent.glob(".tmp-*"))  # the staging folder was renamed

    ours, tok = load_run(run_dirs[key])
    theirs = auto_class(family).from_pretrained(folder, local_files_only=True).eval()
    assert theirs.config.model_type == family
    g = torch.Generator().manual_seed(1)
    x = torch.randint(4, tok.vocab_size, (3, 40), generator=g)
    with torch.no_grad():
        if family == "llama":
            want, got = ours(x), theirs(input_ids=x).logits
        else:
            y = torch.randint(4, tok.vocab_size, (3, 24), generator=g)
            mask = torch.ones_like(x)
            mask[1, 30:] = 0
            want = ours(x, y, mask)
            got = theirs(input_ids=x, attention_mask=mask, decoder_input_ids=y).logits
    assert (got - want).abs().max().item() <= PARITY_ATOL
    if family == "t5":  # T5 v1.1: untied head, written so transformers 4 also loads it untied
        assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False
        assert theirs.lm_head.weight.data_ptr() != theirs.shared.weight.data_ptr()


@pytest.mark.parametrize("key", ["llama-zero3", "t5-pipe"])
def test_published_tokenizer_encodes_like_kiln(published, run_dirs, key):
    family = key.split("-")[0]
    ours = Tokenizer.load(published[key] / "tokenizer.model")
    fast = transformers.AutoTokenizer.from_pretrained(published[key], local_files_only=True)
    # transformers 5's sentencepiece-backed ("slow") tokenizer class; AutoTokenizer ignores
    # use_fast=False there
    slow = transformers.SentencePieceBackend.from_pretrained(published[key], local_files_only=True)
    for text in (ENGLISH, KOREAN, f"{ENGLISH}\n\n  {KOREAN}  ", "def f(x):\n\treturn x  # 42\n"):
        ids = ours.encode(text)
        assert fast.encode(text, add_special_tokens=False) == ids
        assert slow.encode(text, add_special_tokens=False) == ids
        # what the model was trained on: bare documents (decoder), EOS-terminated inputs (T5)
        assert fast(text)["input_ids"] == (ids if family == "llama" else [*ids, ours.eos_id])
        assert fast.decode(ids) == text
    assert fast.pad_token_id == ours.pad_id and fast.eos_token_id == ours.eos_id
    if family == "t5":
        assert fast.convert_tokens_to_ids("<extra_id_0>") == ours.sentinel_ids[0]


@pytest.mark.parametrize("key", SOURCES)
def test_transformers_generate_equals_kiln_generate(published, run_dirs, key):
    family = key.split("-")[0]
    prompt = "ROMEO:" if family == "llama" else "ROMEO: <extra_id_0> the <extra_id_1>."
    result = kiln_in_process(
        "generate", str(run_dirs[key]), "--prompt", prompt, "--temperature", "0",
        "--max-new-tokens", "12",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    tok = transformers.AutoTokenizer.from_pretrained(published[key], local_files_only=True)
    model = auto_class(family).from_pretrained(published[key], local_files_only=True).eval()
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)[0].tolist()
    ours = Tokenizer.load(published[key] / "tokenizer.model")
    if family == "llama":
        new = out[ids.shape[1] :]
        text = prompt + ours.decode(new)
    else:
        new = out[1:]  # behind the decoder start id
        text = ours.decode(fill_in_spans(ids[0, :-1].tolist(), new, ours.sentinel_ids, 2))
    assert len(new) > 0
    assert result.stdout == text + "\n"  # click.echo's newline (the text may end in newlines)


def test_model_card_records_the_run(published, run_dirs):
    card = (published["llama-zero3"] / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\n")
    assert "pipeline_tag: text-generation" in card
    for expected in (
        "AutoModelForCausalLM.from_pretrained",
        "tokens seen",
        "ZeRO stage 3",
        "2 CPU processes",
        "shakespeare",
        "bits per byte",
        "Intended use and limitations",
        "parallel:",  # the resolved config
    ):
        assert expected in card, expected
    t5_card = (published["t5-pipe"] / "README.md").read_text()
    assert "2 pipeline stages" in t5_card and "AutoModelForSeq2SeqLM" in t5_card
    assert "span_corruption" in t5_card and "per target token" in t5_card


def whole_model_folder(run: Path, out: Path, dtype: str, max_shard_size: str = "5GB"):
    """What publishing wrote before it streamed, made here the simple way: the whole model
    loaded from the whole checkpoint files, converted (`hf_model`) and written with
    `save_pretrained`."""
    ckpt = latest_checkpoint(run)
    cfg = config_from_dict(read_trainer_state(ckpt)["config"]).derived.model
    ours = build_model(cfg, seed=0).eval()
    ours.load_state_dict(whole_state_dict(ckpt), strict=False)  # a tied head is listed once
    pub.hf_model(ours, pub.DTYPES[dtype]).save_pretrained(out, max_shard_size=max_shard_size)
    pub._fix_config_json(out, ours.config)
    return ours


def assert_same_weights_files(got: Path, want: Path, parameters: int) -> None:
    """The same weight files, config and generation config: each safetensors file byte for byte
    (the same tensors, names, dtypes and order), the same index."""
    weights = ("config.json", "generation_config.json", "model.safetensors.index.json")
    names = sorted(
        p.name for p in want.iterdir() if p.suffix == ".safetensors" or p.name in weights
    )
    assert names == sorted(p.name for p in got.iterdir() if p.name in names)
    for name in names:
        if name.endswith(".safetensors"):
            mine, theirs = load_file(got / name), load_file(want / name)
            assert list(mine) == list(theirs)
            assert all(
                torch.equal(mine[k], v) and mine[k].dtype == v.dtype for k, v in theirs.items()
            )
            assert (got / name).read_bytes() == (want / name).read_bytes(), name
            continue
        a, b = json.loads((got / name).read_text()), json.loads((want / name).read_text())
        if name == "model.safetensors.index.json":
            assert a["weight_map"] == b["weight_map"]
            assert a["metadata"]["total_size"] == b["metadata"]["total_size"]
            assert a["metadata"]["total_parameters"] == parameters
            continue
        assert a == b, name


def old_proof(folder: Path, ours, tok, dtype: str) -> float:
    """The check publishing made before it streamed, on whole models: the folder loaded with
    `from_pretrained` in fp32 against Kiln's model holding the rounded weights (and, below fp32,
    loaded as config.json says against Kiln's model in that dtype). Returns the fp32 max |diff|."""
    import copy

    cfg = ours.config
    batch = pub.check_batch(cfg, tok)
    rounded = copy.deepcopy(ours)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(pub.DTYPES[dtype]).float())
        reference = rounded(**batch).float()
        scale = max(1.0, reference.abs().max().item())
        loaded = pub.load_published(folder, cfg.model_type, torch.float32)
        diff = (loaded(**batch).logits[..., : cfg.vocab_size] - reference).abs().max().item()
        assert diff <= pub.FP32_TOLERANCE * scale
        if dtype != "fp32":
            loaded = pub.load_published(folder, cfg.model_type, "auto")
            assert loaded.dtype == pub.DTYPES[dtype]
            native = rounded.to(pub.DTYPES[dtype])(**batch).float()
            got = loaded(**batch).logits[..., : cfg.vocab_size].float()
            assert (got - native).abs().max().item() <= pub.DTYPE_TOLERANCE[dtype] * scale
    return diff


@pytest.mark.parametrize("key", SOURCES)
def test_streaming_publish_writes_the_whole_models_files(published, run_dirs, key, tmp_path):
    """The streamed folder (ZeRO-3 on 2 ranks, a 2-stage pipeline; both families) holds the
    files publishing wrote from the whole model, and passes the whole-model proof."""
    ours = whole_model_folder(run_dirs[key], tmp_path / "whole", "fp32")
    n = sum(p.numel() for p in ours.parameters())
    assert_same_weights_files(published[key], tmp_path / "whole", n)
    tok = Tokenizer.load(published[key] / "tokenizer.model")
    assert old_proof(published[key], ours, tok, "fp32") <= PARITY_ATOL


@pytest.mark.parametrize(("key", "dtype"), [("llama-zero3", "bf16"), ("t5-pipe", "fp16")])
def test_sharded_publish_below_fp32(run_dirs, key, dtype, tmp_path):
    out = tmp_path / dtype
    report = pub.publish(run_dirs[key], out, dtype=dtype, max_shard_size="200KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert report.max_logit_diff_fp32 <= PARITY_ATOL
    ours = whole_model_folder(run_dirs[key], tmp_path / "whole", dtype, "200KB")
    assert_same_weights_files(out, tmp_path / "whole", report.parameters)
    tok = Tokenizer.load(out / "tokenizer.model")
    diff = old_proof(out, ours, tok, dtype)
    assert report.max_logit_diff_fp32 == pytest.approx(diff, abs=1e-5)
    family = key.split("-")[0]
    model = auto_class(family).from_pretrained(out, local_files_only=True)
    assert model.dtype == pub.DTYPES[dtype]


def test_a_folder_that_fails_its_check_is_not_left(run_dirs, tmp_path, monkeypatch):
    from model.llama import hf

    real = hf.to_hf_state_dict

    def swapped(sd, cfg):  # a key-map bug: the gate and up projections of layer 0 exchanged
        out = dict(real(sd, cfg))
        gate, up = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"
        out[gate], out[up] = out[up], out[gate]
        return out

    monkeypatch.setattr(hf, "to_hf_state_dict", swapped)
    out = tmp_path / "broken"
    with pytest.raises(pub.PublishError, match="logits"):
        pub.publish(run_dirs["llama-zero3"], out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_push_to_hub_needs_a_token_and_dry_run_lists_the_upload(run_dirs, tmp_path):
    env = {"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf-home")}  # no token anywhere
    out = tmp_path / "hub"
    result = kiln(
        "publish", str(run_dirs["llama-zero3"]), "--out", str(out),
        "--push-to-hub", "someone/kiln-test", extra_env=env,
    )  # fmt: skip
    assert result.returncode != 0
    assert "HF_TOKEN" in result.stderr and "hf auth login" in result.stderr
    assert not out.exists()  # refused before any work
    result = kiln(
        "publish", str(run_dirs["llama-zero3"]), "--out", str(out),
        "--push-to-hub", "someone/kiln-test", "--revision", "step-6", "--dry-run", extra_env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "would upload" in result.stdout and "someone/kiln-test@step-6" in result.stdout
    for name in ("config.json", "model.safetensors", "tokenizer.model", "README.md"):
        assert name in result.stdout
    assert "no Hub token is configured" in result.stdout


@pytest.mark.slow
def test_publishing_callback(prepared_data, tmp_path):
    config = train_config(
        tmp_path, prepared_data, checkpoint__publish_every=3, checkpoint__publish_at_end="true"
    )
    (run,) = run_distributed(train_runs, 1, config)[0]
    for step in (3, 6):
        folder = run / "hf" / f"step-{step:08d}"
        assert (folder / "README.md").is_file(), (run / "hf" / f"{folder.name}.log").read_text()
        assert f"for {step} steps" in (folder / "README.md").read_text()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        run / "hf" / "step-00000006", local_files_only=True
    )
    ours, _ = load_run(run)
    x = torch.arange(4, 36).reshape(1, 32)
    with torch.no_grad():
        assert (model(input_ids=x).logits - ours(x)).abs().max().item() <= PARITY_ATOL


# -- downstream fine-tuning, as a user does it --------------------------------------------------


def _finetune(model, tok, dataset, collator, tmp_path) -> tuple[float, float]:
    """A few steps of the `transformers` Trainer; (loss before, loss after) on the same data."""
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "ft"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        max_steps=12,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=dataset,
        data_collator=collator,
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    return before, trainer.evaluate()["eval_loss"]


NAMES = ["ROMEO", "JULIET", "HAMLET", "OPHELIA", "MACBETH", "BANQUO", "PORTIA", "OTHELLO"]


def test_finetune_published_decoder_with_transformers_trainer(published, tmp_path):
    import datasets

    folder = published["llama-zero3"]
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    # a small supervised task: name the speaker of a line in lower case
    rows = [{"text": f"Speaker: {n}\nName: {n.lower()}{tok.eos_token}"} for n in NAMES]
    data = datasets.Dataset.from_list(rows * 4).map(
        lambda r: tok(r["text"]), remove_columns=["text"]
    )
    collator = transformers.DataCollatorForLanguageModeling(tok, mlm=False)
    before, after = _finetune(model, tok, data, collator, tmp_path)
    assert after < 0.7 * before, (before, after)


def test_finetune_published_t5_with_transformers_trainer(published, tmp_path):
    import datasets

    folder = published["t5-zero3"]
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(folder, local_files_only=True)
    # a small text-to-text task: lower-case a speaker's name
    rows = [{"source": f"lower: {n}", "target": n.lower()} for n in NAMES]

    def encode(r):
        return tok(r["source"], text_target=r["target"])

    data = datasets.Dataset.from_list(rows * 4).map(encode, remove_columns=["source", "target"])
    collator = transformers.DataCollatorForSeq2Seq(tok, model=model)
    before, after = _finetune(model, tok, data, collator, tmp_path)
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize(
    ("parallel", "says"),
    [
        ({}, "2 processes, ZeRO stage 3"),
        (
            {"offload_optimizer": True},
            "2 processes, ZeRO stage 3, optimizer states offloaded to CPU memory",
        ),
        (
            {"offload_optimizer": True, "offload_params": True, "offload_device": "nvme",
             "nvme_path": "/local/nvme"},
            "2 processes, ZeRO stage 3, optimizer states and parameters offloaded to NVMe",
        ),
    ],
)  # fmt: skip
def test_model_card_names_where_the_run_offloaded(parallel, says):
    from trainer.config import load_config
    from trainer.model_card import _training_rows

    overrides = ["parallel.zero_stage=3", *(f"parallel.{k}={v}" for k, v in parallel.items())]
    cfg = load_config(None, overrides)
    state = {"world_size": 2, "zero_stage": 3, "step": 1, "tokens_seen": 8, "global_batch_size": 2}
    layout = dict(_training_rows(cfg, state))["parallel layout"]
    assert layout == says, layout
    assert ("offloaded" in layout) == bool(parallel), layout
