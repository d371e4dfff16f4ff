"""Checkpoints read tensor by tensor (`trainer.consolidate`): the reader gives what DeepSpeed's
`zero_to_fp32` and the pipeline consolidation give, for every layout; `kiln checkpoint
consolidate` writes the file `save_file` wrote from the whole state dict, byte for byte; the
streaming publisher writes what `save_pretrained` writes and computes the logits the whole
models compute, holding one tensor (writer), one pipeline piece (Kiln) or one module
(transformers) at a time."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from conftest import kiln_in_process
from safetensors.torch import load_file, save_file

from model import build_model
from model.registry import family
from trainer import consolidate as cons
from trainer import publish as pub
from trainer.checkpoint import latest_checkpoint, load_model_weights, read_trainer_state
from trainer.config import config_from_dict
from trainer.pipeline import key_map


def whole_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's fp32 state dict the way Kiln read it before it streamed, the whole files
    loaded: the module of ``mp_rank_00_model_states.pt`` (ZeRO 0), DeepSpeed's
    ``zero_to_fp32`` (ZeRO 1-3), the layer files through the pipeline key map (pipeline)."""
    state = read_trainer_state(ckpt)
    if state.get("pipeline_stages", 1) > 1:
        cfg = config_from_dict(state["config"]).derived.model
        layers: dict[int, dict[str, torch.Tensor]] = {}
        out = {}
        for plain, (idx, key) in key_map(cfg).items():
            if idx not in layers:
                (file,) = ckpt.glob(f"layer_{idx:02d}-*model_states.pt")
                layers[idx] = torch.load(file, map_location="cpu", weights_only=True)
            out[plain] = layers[idx][key].float()
        return out
    if state["zero_stage"] == 0:
        states = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=True)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


def test_write_safetensors_is_save_file_byte_for_byte(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.weight": torch.randn(3, 5, generator=g),
        "a.weight": torch.randn(7, generator=g).bfloat16(),
        "c.half": torch.randn(2, 2, generator=g).half(),
        "ids": torch.arange(6).reshape(2, 3),
        "empty": torch.zeros(0, 4),
        "z": torch.randn(1, generator=g),
    }
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    layout = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    made = []

    def produce(name):
        made.append(name)
        return tensors[name]

    size = cons.write_safetensors(tmp_path / "mine.safetensors", layout, produce, {"format": "pt"})
    assert (tmp_path / "mine.safetensors").read_bytes() == (
        tmp_path / "ref.safetensors"
    ).read_bytes()
    assert size == (tmp_path / "mine.safetensors").stat().st_size
    assert sorted(made) == sorted(tensors)  # each produced once
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "mine.safetensors").read_bytes())
    folder = cons.SafetensorsFolder(tmp_path)
    for name, t in tensors.items():
        assert folder.dtype(name) == t.dtype and torch.equal(folder.read(name), t)
    with pytest.raises(ValueError, match="the header says"):
        cons.write_safetensors(tmp_path / "bad.safetensors", layout, lambda n: tensors["z"])


class LiveBytes:
    """The most bytes of tensors returned by the wrapped readers alive at once (a storage lives
    on in the parameters made from it)."""

    def __init__(self) -> None:
        self.live = self.peak = 0

    def wrap(self, read):
        def tracked(*args, **kwargs):
            t = read(*args, **kwargs)
            self.live += t.nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(t.untyped_storage(), self._free, t.nbytes)
            return t

        return tracked

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes


def module_checkpoint(model, folder: Path) -> cons.CheckpointTensors:
    """``model`` saved as a ZeRO-0 checkpoint's module states, opened for reading."""
    folder.mkdir()
    torch.save({"module": model.state_dict()}, folder / "mp_rank_00_model_states.pt")
    return cons._open_module_states(folder)


CASES = [
    ("llama", False, "fp32"),
    ("llama", True, "bf16"),
    ("t5", False, "fp32"),
    ("t5", False, "bf16"),
    ("t5", True, "fp32"),
]


@pytest.mark.parametrize(("model_type", "tied", "dtype"), CASES)
def test_streaming_publish_is_save_pretrained_and_the_whole_models_logits(
    model_type, tied, dtype, tmp_path, monkeypatch
):
    s = family(model_type)
    cfg = s.preset("debug").model_copy(update={"vocab_size": 512, "tie_word_embeddings": tied})
    model = build_model(cfg, seed=0).eval()
    weights = module_checkpoint(model, tmp_path / "ckpt")
    torch_dtype = pub.DTYPES[dtype]
    live = LiveBytes()
    monkeypatch.setattr(cons.CheckpointTensors, "read", live.wrap(cons.CheckpointTensors.read))
    monkeypatch.setattr(cons.SafetensorsFolder, "read", live.wrap(cons.SafetensorsFolder.read))
    largest = max(p.nbytes for p in model.parameters())

    # the files: those save_pretrained writes from the whole model, byte for byte
    ref, out = tmp_path / "ref", tmp_path / "out"
    pub.hf_model(model, torch_dtype).save_pretrained(ref, max_shard_size="100KB")
    out.mkdir()
    pub.write_weights(weights, cfg, out, torch_dtype, "100KB")
    assert 0 < live.peak <= largest  # one tensor at a time
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
    for f in sorted(ref.iterdir()):
        if f.suffix == ".safetensors":
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name
            continue
        want, got = json.loads(f.read_text()), json.loads((out / f.name).read_text())
        if f.name == "model.safetensors.index.json":
            assert got["weight_map"] == want["weight_map"]
            assert got["metadata"]["total_size"] == want["metadata"]["total_size"]
            # save_pretrained counts the whole model's Parameter objects: hf_model's T5 holds
            # `shared` three times (assign=True); the published model has it once
            n = sum(p.numel() for p in model.parameters())
            assert got["metadata"]["total_parameters"] == n
            continue
        assert got == want, f.name
    assert len(list(out.glob("*.safetensors"))) > 1  # sharded

    # the proof's logits: those of the whole models, one piece / one module at a time
    tok_ids = torch.Generator().manual_seed(0)
    batch = s.check_batch(cfg, lambda n: torch.randint(4, 512, (2, n), generator=tok_ids))
    blocks = [sum(p.nbytes for p in b.parameters()) for b in model.blocks()]
    live.peak = 0
    ours = pub.kiln_logits(weights, cfg, batch, rounding=torch.float32, compute=torch.float32)
    assert 0 < live.peak <= max(largest, max(blocks))  # one piece's weights at a time
    with torch.no_grad():
        torch.testing.assert_close(ours, model(**batch), rtol=0, atol=1e-6)
    pub._fix_config_json(out, cfg)
    for load_dtype in (torch.float32, "auto"):
        live.peak = 0
        theirs, got_dtype, failures = pub.hf_logits(out, model_type, batch, 512, load_dtype)
        assert failures == [] and 0 < live.peak <= largest  # one module's weights at a time
        whole = pub.load_published(out, model_type, load_dtype)
        assert got_dtype == whole.dtype == (torch_dtype if load_dtype == "auto" else torch.float32)
        with torch.no_grad():
            want = whole(**batch).logits.float()
        torch.testing.assert_close(theirs, want, rtol=0, atol=1e-6)
    rounded = pub.kiln_logits(weights, cfg, batch, rounding=torch_dtype, compute=torch.float32)
    theirs, _, _ = pub.hf_logits(out, model_type, batch, 512, torch.float32)
    assert (rounded - theirs).abs().max().item() <= pub.FP32_TOLERANCE


def test_proof_names_missing_and_unused_weights(tmp_path):
    cfg = family("llama").preset("debug").model_copy(update={"vocab_size": 512})
    model = build_model(cfg, seed=0).eval()
    out = tmp_path / "out"
    pub.hf_model(model, torch.float32).save_pretrained(out)
    sd = load_file(out / "model.safetensors")
    sd["model.layers.0.extra.weight"] = sd.pop("model.layers.0.mlp.up_proj.weight")
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    batch = {"input_ids": torch.randint(4, 512, (2, 8))}
    logits, _, failures = pub.hf_logits(out, "llama", batch, 512, torch.float32)
    assert logits is None
    assert any("no weights for model.layers.0.mlp.up_proj.weight" in f for f in failures)
    assert any("does not use: ['model.layers.0.extra.weight']" in f for f in failures)


# -- real checkpoints of every layout (slow fixtures) --------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(zero_runs, t5_runs, pipeline_runs) -> dict[str, Path]:
    out = {f"llama-zero{s}": latest_checkpoint(run) for s, run in zero_runs.items()}
    out.update({f"t5-zero{s}": latest_checkpoint(t5_runs[s]) for s in (0, 3)})
    out.update({k: latest_checkpoint(pipeline_runs[k]) for k in ("llama-pipe", "t5-pipe")})
    return out


LAYOUTS = [
    *(f"llama-zero{s}" for s in (0, 1, 2, 3)),
    "t5-zero0",
    "t5-zero3",
    "llama-pipe",
    "t5-pipe",
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reader_and_consolidate_equal_the_whole_state_dict(checkpoints, layout, tmp_path):
    ckpt = checkpoints[layout]
    want = whole_state_dict(ckpt)
    weights = cons.open_checkpoint(ckpt)
    assert weights.names() == list(want)
    for key, tensor in want.items():
        got = weights.read(key)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), key
    loaded = load_model_weights(ckpt)  # the reader's tensors, a shared one read once
    assert list(loaded) == list(want)
    assert all(torch.equal(loaded[k], v) for k, v in want.items())
    for key in want:
        assert loaded[key] is loaded[weights.source(key)]
    # `kiln checkpoint consolidate`: the file save_file wrote from the whole state dict
    seen: set[int] = set()
    whole = {}
    for k, v in want.items():
        whole[k] = v.clone() if v.data_ptr() in seen else v
        seen.add(v.data_ptr())
    save_file(whole, tmp_path / "ref.safetensors", metadata={"checkpoint": str(ckpt)})
    out = tmp_path / "model.safetensors"
    result = kiln_in_process(
        "checkpoint", "consolidate", str(ckpt.parent.parent), "--out", str(out)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_a_truncated_shard_is_an_error(checkpoints, tmp_path):
    import shutil

    ckpt = shutil.copytree(checkpoints["llama-zero3"], tmp_path / "step")
    weights = cons.open_checkpoint(ckpt)
    last = weights.names()[-1]
    for f in ckpt.glob("*optim_states.pt"):
        f.write_bytes(f.read_bytes()[:4096])
    with pytest.raises(ValueError, match="truncated"):
        weights.read(last)
