"""Continuing pretraining from a Hugging Face folder (`model.init_from`): the architecture comes
from its config.json, the tokenizer from its tokenizer.model, the start weights from its
safetensors (single or sharded, fp32 or bf16); a resumed run takes its checkpoint instead.

The folders are made here from Kiln's own debug presets, through `transformers` and
`save_pretrained`, as a published run would be."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from conftest import T5_SENTINELS, kiln, train_config
from distributed import run_distributed, train_runs
from safetensors.torch import save_file
from torch import nn

from model import build_model, get_preset
from model.hf_checkpoint import load_hf_weights
from model.llama import hf
from model.registry import ModelConfig
from model.t5 import hf as hf_t5
from trainer.checkpoint import latest_checkpoint, load_model_weights
from trainer.config import ConfigError, config_from_dict, load_config
from trainer.data.prepare import load_or_train_tokenizer

VOCAB = 512  # the fixtures' tokenizers: 512 pieces, a multiple of 64, so model.vocab_size = 512


def kiln_config(family: str) -> ModelConfig:
    return get_preset("debug", family).model_copy(update={"vocab_size": VOCAB})


def make_hf_folder(
    folder: Path, family: str, tokenizer: Path, *, seed: int = 7, dtype=torch.float32, shard=False
) -> dict[str, torch.Tensor]:
    """Save Kiln's debug ``family`` model (initialised from ``seed``) as transformers does, with
    ``tokenizer`` beside it; returns the HF model's state dict mapped back to our keys, fp32."""
    cfg = kiln_config(family)
    ours = build_model(cfg, seed=seed).state_dict()
    if family == "llama":
        model = transformers.LlamaForCausalLM(hf.to_hf_config(cfg))
        model.load_state_dict(hf.to_hf_state_dict(ours, cfg))
    else:
        model = transformers.T5ForConditionalGeneration(hf_t5.to_hf_config(cfg))
        # transformers 5 ties a fresh T5's head to `shared`; T5 v1.1 has its own
        model.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        model.load_state_dict(hf_t5.to_hf_state_dict(ours, cfg))
    model = model.to(dtype)
    model.save_pretrained(folder, max_shard_size="100KB" if shard else "1GB")
    shutil.copy(tokenizer, folder / "tokenizer.model")
    mapped = hf if family == "llama" else hf_t5
    return mapped.from_hf_state_dict({k: v.float() for k, v in model.state_dict().items()}, cfg)


@pytest.fixture(scope="module")
def folders(prepared_data, prepared_t5_data, tmp_path_factory) -> dict[str, Path]:
    """HF folders: {llama, t5} x {sharded fp32, single bf16}, keyed "llama-sharded" etc."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for family, data in (("llama", prepared_data), ("t5", prepared_t5_data)):
        tok = data / "tokenizer" / "tokenizer.model"
        out[f"{family}-sharded"] = root / f"{family}-sharded"
        make_hf_folder(out[f"{family}-sharded"], family, tok, shard=True)
        out[f"{family}-bf16"] = root / f"{family}-bf16"
        make_hf_folder(out[f"{family}-bf16"], family, tok, dtype=torch.bfloat16)
    return out


def overrides(folder: Path, data_root: Path, *extra: str) -> list[str]:
    return [
        f"model.init_from={folder}",
        f"data.root={data_root}",
        "data.seq_len=64",
        f"data.datasets=[{{name: shakespeare, sources: [{{path: {data_root}/shakespeare.txt}}]}}]",
        *extra,
    ]


# -- weights -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("kind", ["sharded", "bf16"])
def test_load_hf_weights_equals_the_hf_model(family, kind, prepared_data, tmp_path):
    folder = tmp_path / "hf"
    tok = prepared_data / "tokenizer" / "tokenizer.model"
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    expected = make_hf_folder(folder, family, tok, dtype=dtype, shard=kind == "sharded")
    if kind == "sharded":
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 2
    else:
        assert (folder / "model.safetensors").is_file()
    cfg = kiln_config(family)
    got = load_hf_weights(folder, cfg)
    assert got.keys() == expected.keys()
    for k, v in got.items():
        assert v.dtype == torch.float32, k
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0, msg=k)
    if kind == "sharded":  # fp32: the Kiln model the folder was made from, exactly
        ours = build_model(cfg, seed=7).state_dict()
        for k, v in ours.items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)
    model = build_model(cfg, seed=0)
    model.load_state_dict(got, strict=True)


def test_load_hf_weights_names_missing_and_unexpected_keys(folders, tmp_path):
    src = folders["llama-bf16"]
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    sd = load_hf_weights(src, kiln_config("llama"))
    hf_sd = hf.to_hf_state_dict(sd, kiln_config("llama"))
    del hf_sd["model.norm.weight"]
    hf_sd["model.extra.weight"] = torch.zeros(2)
    save_file({k: v.contiguous() for k, v in hf_sd.items()}, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \['model.norm.weight'\].*model.extra"):
        load_hf_weights(broken, kiln_config("llama"))


# -- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "t5"])
def test_config_takes_the_architecture_from_config_json(family, folders, prepared_data):
    folder = folders[f"{family}-sharded"]
    cfg = load_config(None, overrides(folder, prepared_data))
    want = kiln_config(family)
    assert cfg.model.model_type == family  # not given: the folder's
    arch = {"name", "init_from"}
    assert cfg.model.model_dump(exclude=arch) == want.model_dump(exclude=arch)
    assert cfg.model.name == "custom"
    assert cfg.model.init_from == str(folder)
    assert cfg.tokenizer.vocab_size == VOCAB  # the folder's tokenizer, not the 32000 default
    assert cfg.tokenizer.num_sentinels == (T5_SENTINELS if family == "t5" else 0)
    assert cfg.tokenizer.path is None  # copied into <data.root>/tokenizer/ by data prepare
    # repeating a field with the folder's value is fine; so is a preset with the same shape,
    # and a training setting the weights do not fix
    extra = ["model.name=debug", f"model.model_type={family}", f"model.vocab_size={VOCAB}"]
    extra.append("model.hidden_size=64" if family == "llama" else "model.dropout_rate=0.1")
    again = load_config(None, overrides(folder, prepared_data, *extra))
    assert again.model.name == "debug"
    # the resolved config (config.yaml, a checkpoint's) loads again, also once the folder is gone
    assert config_from_dict(cfg.model_dump(mode="json")) == cfg
    moved = folder.with_name(folder.name + "-moved")
    folder.rename(moved)
    try:
        assert config_from_dict(cfg.model_dump(mode="json")) == cfg
        with pytest.raises(ConfigError, match="is not a folder"):
            load_config(None, overrides(folder, prepared_data))  # a fresh config needs it
    finally:
        moved.rename(folder)


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["model.hidden_size=128"], r"model.hidden_size=128 conflicts with hidden_size=64 in .*"),
        (["model.name=tiny"], r"model.name='tiny' \(a preset\) sets hidden_size=256 conflicts"),
        (["model.model_type=t5"], r"holds a 'llama' model .* but model.model_type='t5'"),
        (["tokenizer.vocab_size=1024"], r"tokenizer.vocab_size=1024 but .* has 512"),
        (["tokenizer.path=/nonexistent/tok.model"], r"tokenizer.path=.* does not exist"),
    ],
)
def test_config_conflicts_are_refused(extra, expected, folders, prepared_data):
    folder = folders["llama-sharded"]
    with pytest.raises(ConfigError, match=expected) as e:
        load_config(None, overrides(folder, prepared_data, *extra))
    if "conflicts" in expected:
        assert str(folder / "config.json") in str(e.value)


def test_config_refuses_folders_it_cannot_use(folders, prepared_data, tmp_path):
    def refused(folder: Path, match: str) -> None:
        with pytest.raises(ConfigError, match=match):
            load_config(None, overrides(folder, prepared_data))

    refused(tmp_path / "missing", "is not a folder")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "holds no config.json")
    src = folders["llama-bf16"]

    def variant(name: str, **config) -> Path:
        folder = tmp_path / name
        shutil.copytree(src, folder)
        raw = json.loads((src / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**raw, **config}))
        return folder

    refused(variant("bert", model_type="bert"), r"model_type='bert'; Kiln continues pretraining")
    refused(variant("bias", attention_bias=True), "attention_bias=True is not supported")
    no_weights = variant("no-weights")
    (no_weights / "model.safetensors").unlink()
    refused(no_weights, "holds no model.safetensors or model.safetensors.index.json")
    no_tok = variant("no-tokenizer")
    (no_tok / "tokenizer.model").unlink()
    refused(no_tok, "holds no tokenizer.model .* set tokenizer.path")
    tok = prepared_data / "tokenizer" / "tokenizer.model"
    assert load_config(None, overrides(no_tok, prepared_data, f"tokenizer.path={tok}"))


def test_data_prepare_copies_the_tokenizer_and_refuses_another(folders, prepared_data, tmp_path):
    folder = folders["t5-bf16"]
    cfg = load_config(None, overrides(folder, tmp_path / "fresh"))
    tok = load_or_train_tokenizer(cfg)  # copied, not trained
    assert cfg.tokenizer_path == tmp_path / "fresh" / "tokenizer" / "tokenizer.model"
    assert cfg.tokenizer_path.read_bytes() == (folder / "tokenizer.model").read_bytes()
    meta = json.loads(cfg.tokenizer_path.with_name("tokenizer_meta.json").read_text())
    assert meta["sha256"] == tok.sha256 and meta["vocab_size"] == VOCAB
    assert meta["num_sentinels"] == T5_SENTINELS
    assert meta["copied_from"] == str(folder / "tokenizer.model")
    # a data root that holds another tokenizer (the decoder's, without sentinels)
    other = load_config(None, overrides(folder, prepared_data))
    with pytest.raises(ValueError, match=r"is not the tokenizer of model\.init_from"):
        load_or_train_tokenizer(other)


# -- kiln train --------------------------------------------------------------------------------
def start_weights_equal(run: Path, folder: Path, model_cfg: ModelConfig) -> None:
    """The weights after one step at lr 1e-12 (below fp32 resolution) are the folder's."""
    weights = load_model_weights(latest_checkpoint(run))
    want = load_hf_weights(folder, model_cfg)
    assert weights.keys() <= want.keys() and len(weights) >= len(want) - 1  # tied head once
    for k, v in weights.items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-9, msg=k)


def one_step(tmp: Path, data_root: Path, folder: Path, **sections) -> Path:
    return train_config(
        tmp,
        data_root,
        model__init_from=folder,
        train__max_steps=1,
        train__lr=1e-12,
        train__min_lr=0,
        train__log_sample_ids="false",
        checkpoint__save_every=1,
        **sections,
    )


@pytest.mark.slow
def test_kiln_train_starts_from_the_folder_and_resume_ignores_it(
    folders, prepared_data, tmp_path, capfd
):
    """Llama, sharded fp32, 1 process, ZeRO 0, a fresh data root: the tokenizer is copied (not
    trained) and the data prepared with it; then a resume with init_from pointing at a folder
    whose weights cannot load still runs: the checkpoint wins (the resume in-process: the
    launch is the first run's)."""
    folder = folders["llama-sharded"]
    root = tmp_path / "data"
    root.mkdir()
    shutil.copy(prepared_data / "shakespeare.txt", root)
    config = one_step(tmp_path, root, folder, data__num_proc=1)
    result = kiln("train", str(config), "--nproc", "1", "--sample-prompt", "")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert f"initialised the model from the Hugging Face checkpoint {folder}" in result.stdout
    assert "training a" not in result.stderr  # no tokenizer training
    sha = hashlib.sha256((folder / "tokenizer.model").read_bytes()).hexdigest()
    manifest = json.loads((root / "shakespeare" / "manifest.json").read_text())
    assert manifest["tokenizer"]["sha256"] == sha
    run = tmp_path / "run"
    ckpt = latest_checkpoint(run)
    assert hashlib.sha256((ckpt / "tokenizer.model").read_bytes()).hexdigest() == sha
    assert (ckpt / "tokenizer_meta.json").is_file()
    start_weights_equal(run, folder, kiln_config("llama"))

    broken = tmp_path / "broken"
    shutil.copytree(folders["llama-bf16"], broken)
    save_file({"model.norm.weight": torch.ones(64)}, broken / "model.safetensors")
    capfd.readouterr()
    run_distributed(train_runs, 1, (config, f"model.init_from={broken}", "train.max_steps=2"))
    # the rank's output: it inherits this process's file descriptors
    assert "initialised the model" not in capfd.readouterr().out
    assert latest_checkpoint(run).name == "step-00000002"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    logged = [r["step"] for r in map(json.loads, lines) if "loss" in r]
    assert logged == [1, 2]  # step 1 not again: it went on from the checkpoint


@pytest.mark.slow
def test_kiln_train_t5_zero3_two_processes_starts_from_a_bf16_folder(
    folders, prepared_t5_data, tmp_path, capfd
):
    """The training loop of `kiln train`, in-process on 2 ranks (the launch is tested above)."""
    folder = folders["t5-bf16"]
    config = one_step(
        tmp_path, prepared_t5_data, folder, model__model_type="t5", parallel__zero_stage=3
    )
    capfd.readouterr()
    run_distributed(train_runs, 2, config)
    # the ranks' output: they inherit this process's (captured) file descriptors
    assert capfd.readouterr().out.count("initialised the model from") == 1  # rank 0 only
    start_weights_equal(tmp_path / "run", folder, kiln_config("t5"))
