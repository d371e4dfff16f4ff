"""Construction that matches the layout: initial weights are a function of (seed, parameter
name) alone, so a ZeRO-3 rank that materialises only its partitions and a pipeline stage that
builds only its layers hold, gathered, the one-process model's weights bit for bit (both
families); `model.init_from` into ZeRO-3 and into a pipeline reads only each rank's tensors or
slices from the safetensors shards and starts from the folder's exact weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import T5_SENTINELS
from distributed import run_distributed
from test_init_from import kiln_config, make_hf_folder

from model import build_model, spec
from model import init as model_init
from model.hf_checkpoint import HFWeightReader, load_hf_weights
from model.init import Fill, Normal, init_values, materialise, seed_source
from trainer.config import KilnConfig, batch_plan, load_config
from trainer.construct import build_for_layout
from trainer.engine import param_groups
from trainer.pipeline import key_map

FAMILIES = ("llama", "t5")
SEED = 11
LAYOUTS = {  # name -> (processes, overrides)
    "zero0-1proc": (1, ["parallel.zero_stage=0"]),
    "zero3-2proc": (2, ["parallel.zero_stage=3"]),
    "pipe2-2proc": (2, ["parallel.zero_stage=1", "parallel.pipeline_stages=2"]),
}


def run_config(family: str, *extra: str) -> KilnConfig:
    """The debug preset of ``family`` with the fixtures' 512-piece tokenizer (``vocab_size``
    512, the HF folders' too), micro batch 1, global batch 2."""
    overrides = ["model.name=debug", "tokenizer.vocab_size=512", f"train.seed={SEED}"]
    if family == "t5":
        overrides += ["model.model_type=t5", f"tokenizer.num_sentinels={T5_SENTINELS}"]
    overrides += ["train.micro_batch_size=1", "train.global_batch_size=2", *extra]
    return load_config(None, overrides)


# -- the values: a pure function of (seed, name, element range) --------------------------------
def test_any_range_of_a_parameter_draws_the_same_values(monkeypatch):
    monkeypatch.setattr(model_init, "INIT_BLOCK", 64)  # ranges across several blocks
    full = init_values(Normal(0.5), 3, "layers.0.mlp.up_proj.weight", 0, 1000)
    assert full.shape == (1000,) and full.dtype == torch.float32
    assert full.std().item() == pytest.approx(0.5, rel=0.1)
    for start, stop in [(0, 64), (10, 11), (63, 65), (100, 1000), (500, 500), (999, 1000)]:
        part = init_values(Normal(0.5), 3, "layers.0.mlp.up_proj.weight", start, stop)
        assert torch.equal(part, full[start:stop]), (start, stop)
    other_name = init_values(Normal(0.5), 3, "layers.1.mlp.up_proj.weight", 0, 1000)
    other_seed = init_values(Normal(0.5), 4, "layers.0.mlp.up_proj.weight", 0, 1000)
    assert not torch.equal(full, other_name) and not torch.equal(full, other_seed)
    assert torch.equal(init_values(Fill(1.0), 3, "norm.weight", 5, 9), torch.ones(4))
    with pytest.raises(ValueError, match="not a range"):
        init_values(Normal(1.0), 3, "x", 5, 4)


@pytest.mark.parametrize("family", FAMILIES)
def test_init_rules_cover_every_parameter_and_keep_the_distributions(family):
    """Every parameter has a rule; the rules are the ones the families documented before the
    draw moved to per-parameter generators (Llama: HF `_init_weights` with GPT-2's residual
    scaling; T5: Mesh TF's variance scaling), checked on the values drawn."""
    cfg = kiln_config(family)
    model = build_model(cfg, seed=SEED)
    for name, param in model.named_parameters():
        rule = model.init_rule(name)
        if isinstance(rule, Fill):
            assert name.endswith("norm.weight") and torch.equal(param, torch.ones_like(param))
        elif param.numel() >= 4096:
            assert param.std().item() == pytest.approx(rule.std, rel=0.1), name
    if family == "llama":
        r = cfg.initializer_range
        assert model.init_rule("layers.1.self_attn.q_proj.weight") == Normal(r)
        assert model.init_rule("layers.0.mlp.down_proj.weight") == Normal(r / 2)  # 2 layers
    else:
        assert model.init_rule("shared.weight") == Normal(cfg.initializer_factor)
        q = cfg.initializer_factor * (cfg.d_model * cfg.d_kv) ** -0.5
        assert model.init_rule("decoder.layers.1.cross_attn.q_proj.weight") == Normal(q)
    with pytest.raises(KeyError):
        model.init_rule("nothing.weight")


@pytest.mark.parametrize("family", FAMILIES)
def test_materialising_part_of_a_meta_model_draws_the_whole_models_values(family):
    """A module materialised alone (what a pipeline stage does) holds the values the whole
    model has; the rest stays on the meta device."""
    cfg = kiln_config(family)
    whole = build_model(cfg, seed=SEED).state_dict()
    with torch.device("meta"):
        meta = spec(cfg).model_class(cfg)
    block = meta.blocks()[1]
    materialise(meta, seed_source(meta, SEED), modules=[block])
    prefix = "layers.1." if family == "llama" else "encoder.layers.1."
    for key, value in meta.state_dict().items():
        if key.startswith(prefix):
            assert torch.equal(value, whole[key]), key
        else:
            assert value.device.type == "meta", key


# -- layouts, on 1 and 2 processes -------------------------------------------------------------
def construct_on_rank(cases: list[tuple[str, str, list[str], str | None]]) -> dict[str, dict]:
    """Run in each rank: build every case's model with :func:`build_for_layout` and report, by
    case name, the plain-model weights this rank can see (ZeRO-3: gathered), the elements it
    holds, what its source read (init_from) and, under ZeRO-3, the element range of each
    parameter it holds."""
    import deepspeed
    import torch.distributed as dist

    from trainer import distributed

    world = distributed.init_distributed()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    out = {}
    for name, family, overrides, folder in cases:
        cfg = run_config(family, *overrides)
        plan = batch_plan(cfg, world.world_size)
        module, source = build_for_layout(cfg, plan, init_from=folder)
        held, weights, ranges = 0, {}, {}
        if plan.pipeline_stages > 1:
            plain: dict[tuple[int, str], str] = {}
            for k, slot in key_map(cfg.derived.model).items():
                plain.setdefault(slot, k)  # a tied head's slot is the embedding's
            for key, tensor in module.state_dict().items():
                if key.startswith("tied_modules."):  # tied_modules.<tie key>.<layer key>
                    idx = min(i for i, k in plain if k == key.split(".", 2)[2])
                    idx_key = (idx, key.split(".", 2)[2])
                else:
                    i, k = key.split(".", 1)
                    idx_key = (int(i), k)
                weights[plain[idx_key]] = tensor.clone()
            held = sum(p.numel() for p in module.parameters())
        elif cfg.parallel.zero_stage == 3:
            for pname, p in module.named_parameters():
                size, rank = p.ds_tensor.ds_numel, dist.get_rank(group=p.ds_process_group)
                ranges[pname] = (min(size * rank, p.ds_numel), min(size * (rank + 1), p.ds_numel))
                held += p.ds_tensor.numel() + p.data.numel()  # data: empty when partitioned
                with deepspeed.zero.GatheredParameters([p]):
                    weights[pname] = p.data.clone()
        else:
            weights = {k: v.clone() for k, v in module.named_parameters()}
            held = sum(p.numel() for p in module.parameters())
        reads = getattr(source, "reads", None)
        names = {id(p): n for n, p in module.named_parameters()}
        decayed = sorted(names[id(p)] for p in param_groups(module, 0.1)[0]["params"])
        out[name] = {
            "weights": weights,
            "held": held,
            "reads": reads,
            "ranges": ranges,
            "decayed": decayed,
        }
    return out


@pytest.fixture(scope="module")
def folders(prepared_data, prepared_t5_data, tmp_path_factory) -> dict[str, Path]:
    """HF folders of each family's debug model (seed 7, not the runs' seed), sharded fp32."""
    root = tmp_path_factory.mktemp("construct-hf")
    out = {}
    for family, data in (("llama", prepared_data), ("t5", prepared_t5_data)):
        out[family] = root / family
        make_hf_folder(out[family], family, data / "tokenizer" / "tokenizer.model", shard=True)
    return out


@pytest.fixture(scope="module")
def built(folders) -> dict[str, dict]:
    """Every case of both families, from the seed and from the HF folder: the 1-process layouts
    in this process, the 2-process ones in one `run_distributed` start-up. Keys:
    ``{family}/{layout}/{seed|hf}/rank{r}``."""
    by_procs: dict[int, list] = {1: [], 2: []}
    for family in FAMILIES:
        for layout, (procs, overrides) in LAYOUTS.items():
            for start, folder in (("seed", None), ("hf", str(folders[family]))):
                by_procs[procs].append((f"{family}/{layout}/{start}", family, overrides, folder))
    out = {}
    for procs, cases in by_procs.items():
        for rank, result in enumerate(run_distributed(construct_on_rank, procs, cases)):
            out.update({f"{case}/rank{rank}": r for case, r in result.items()})
    return out


@pytest.mark.slow  # the `built` fixture: ~35 s of 1- and 2-process start-ups
@pytest.mark.parametrize("family", FAMILIES)
def test_every_layout_starts_from_the_one_process_models_weights(built, family):
    """ZeRO-0 on one process, ZeRO-3 on two (gathered), a 2-stage pipeline (the two stages'
    layers together): the same weights, bit for bit, as `build_model` in one process."""
    want = build_model(kiln_config(family), seed=SEED)
    want = {k: v for k, v in want.named_parameters()}  # a tied weight once
    got = {layout: built[f"{family}/{layout}/seed/rank0"]["weights"] for layout in LAYOUTS}
    for layout in ("zero0-1proc", "zero3-2proc"):
        assert got[layout].keys() == want.keys(), layout
    # ZeRO-3: both ranks gather the same tensors
    got["zero3-2proc-rank1"] = built[f"{family}/zero3-2proc/seed/rank1"]["weights"]
    stages = [built[f"{family}/pipe2-2proc/seed/rank{r}"]["weights"] for r in (0, 1)]
    assert stages[0].keys().isdisjoint(stages[1].keys())  # each layer on one stage
    got["pipe2-2proc"] = {**stages[0], **stages[1]}
    assert want.keys() <= got["pipe2-2proc"].keys()  # (+ a tied head's own key)
    for layout, weights in got.items():
        for key, value in want.items():
            torch.testing.assert_close(weights[key], value, rtol=0, atol=0, msg=(layout, key))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_weight_decay_groups_do_not_depend_on_the_layout(built, family):
    """AdamW decays the same matrices whether a parameter is whole or a ZeRO-3 partition (whose
    ``data`` is an empty 1-D tensor)."""
    want = sorted(n for n, p in build_model(kiln_config(family), seed=0).named_parameters())
    want = [n for n in want if not n.endswith("norm.weight")]
    for layout in ("zero0-1proc", "zero3-2proc"):
        for rank in range(LAYOUTS[layout][0]):
            assert built[f"{family}/{layout}/seed/rank{rank}"]["decayed"] == want, layout


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_each_rank_holds_only_its_share(built, family):
    total = kiln_config(family).num_parameters()
    one = built[f"{family}/zero0-1proc/seed/rank0"]["held"]
    assert one == total
    for r in (0, 1):
        zero3 = built[f"{family}/zero3-2proc/seed/rank{r}"]["held"]
        # half of every parameter, each rounded up to DeepSpeed's alignment
        assert total / 2 <= zero3 < total / 2 + 64 * 100, (r, zero3, total)
    stages = [built[f"{family}/pipe2-2proc/seed/rank{r}"]["held"] for r in (0, 1)]
    assert all(0 < s < total for s in stages)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_init_from_starts_every_layout_from_the_folders_weights(built, folders, family):
    cfg = kiln_config(family)
    want = load_hf_weights(folders[family], cfg)
    for layout in LAYOUTS:
        for rank in range(LAYOUTS[layout][0]):
            got = built[f"{family}/{layout}/hf/rank{rank}"]["weights"]
            for key, value in got.items():
                torch.testing.assert_close(value, want[key], rtol=0, atol=0, msg=(layout, key))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_init_from_under_zero3_reads_only_each_ranks_partition(built, folders, family):
    """Each rank reads, of each tensor, the whole rows around its partition's element range and
    nothing else; the two ranks' partitions cover every tensor."""
    cfg = kiln_config(family)
    hf_key = dict(spec(cfg).hf.key_pairs(cfg))
    shapes = {k: v.shape for k, v in load_hf_weights(folders[family], cfg).items()}
    covered: dict[str, list[tuple[int, int]]] = {}
    for rank in (0, 1):
        case = built[f"{family}/zero3-2proc/hf/rank{rank}"]
        want = []
        for name, (start, stop) in case["ranges"].items():
            covered.setdefault(name, []).append((start, stop))
            if start == stop:
                continue  # the padding rank of a tiny tensor reads nothing
            row = shapes[name][1:].numel()
            want.append((hf_key[name], start // row * row, -(-stop // row) * row))
        assert sorted(case["reads"]) == sorted(want), rank
        read = sum(b - a for _, a, b in case["reads"])
        assert read < 0.6 * cfg.num_parameters(), (rank, read)
    for name, parts in covered.items():
        assert sorted(parts)[0][0] == 0 and sorted(parts)[-1][1] == shapes[name].numel(), name
        assert sorted(parts)[0][1] == sorted(parts)[1][0], name  # contiguous, no overlap


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_init_from_into_a_pipeline_reads_only_each_stages_tensors(built, folders, family):
    cfg = kiln_config(family)
    hf_key = dict(spec(cfg).hf.key_pairs(cfg))
    shapes = {k: v.shape for k, v in load_hf_weights(folders[family], cfg).items()}
    seen = []
    for rank in (0, 1):
        case = built[f"{family}/pipe2-2proc/hf/rank{rank}"]
        held = {hf_key[k] for k in case["weights"]}
        read = [k for k, _, _ in case["reads"]]
        assert len(read) == len(set(read))  # each tensor once
        assert set(read) <= held and len(read) >= len(held) - 1  # (a tied head is the embedding)
        whole = {hf_key[k]: shapes[k].numel() for k in case["weights"]}
        assert all(a == 0 and b == whole[k] for k, a, b in case["reads"])  # whole tensors
        seen.append(set(read))
    assert seen[0].isdisjoint(seen[1])
    assert len(seen[0] | seen[1]) == len({id(p) for p in build_model(cfg, seed=0).parameters()})


def test_the_reader_refuses_a_folder_of_another_shape(folders):
    cfg = kiln_config("llama").model_copy(update={"intermediate_size": 64})
    reader = HFWeightReader(folders["llama"], cfg)
    with pytest.raises(ValueError, match=r"mlp.up_proj.weight in .* has shape \(176, 64\)"):
        reader("layers.0.mlp.up_proj.weight", torch.Size([64, 64]), 0, 64 * 64)
    with pytest.raises(ValueError, match="missing keys"):
        HFWeightReader(folders["llama"], cfg.model_copy(update={"num_hidden_layers": 3}))


def _aio_buildable() -> bool:
    from deepspeed.ops.op_builder import AsyncIOBuilder

    return AsyncIOBuilder().is_compatible(verbose=False)


def nvme_weights_on_rank(nvme_path: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Build the wide debug model under ZeRO-3 with parameters offloaded to NVMe; return the
    gathered weights and the parameters whose partitions live in swap files."""
    import deepspeed
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    from trainer import distributed

    world = distributed.init_distributed()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    cfg = run_config("llama", *NVME_WIDE, f"parallel.nvme_path={nvme_path}")
    module, _ = build_for_layout(cfg, batch_plan(cfg, world.world_size))
    on_nvme = [
        n
        for n, p in module.named_parameters()
        if p.ds_tensor.final_location == OffloadDeviceEnum.nvme
    ]
    weights = {}
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            weights[name] = p.data.clone()
    return weights, on_nvme


# d_model 1024: the embedding's and the attention's partitions reach aio's 1 MB and are swapped
NVME_WIDE = (
    "model.hidden_size=1024",
    "parallel.zero_stage=3",
    "parallel.offload_params=true",
    "parallel.offload_optimizer=true",
    "parallel.offload_device=nvme",
)


@pytest.mark.slow
@pytest.mark.skipif(not _aio_buildable(), reason="DeepSpeed's async_io op needs libaio-dev")
def test_zero3_with_nvme_offload_starts_from_the_seeds_weights(tmp_path):
    """Partitions that zero.Init swaps to NVMe are filled too (swapped in, written, swapped
    out): gathered, the weights are the one-process model's bit for bit."""
    ranks = run_distributed(nvme_weights_on_rank, 2, str(tmp_path / "nvme"))
    cfg = run_config("llama", *NVME_WIDE, f"parallel.nvme_path={tmp_path}")
    want = build_model(cfg.derived.model, seed=SEED)
    for weights, on_nvme in ranks:
        assert "embed_tokens.weight" in on_nvme
        for key, value in want.named_parameters():
            torch.testing.assert_close(weights[key], value, rtol=0, atol=0, msg=key)
