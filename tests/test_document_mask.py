"""Document-masked attention for packed rows (``data.document_mask``, ``data.reset_position_ids``).

A packed row of several documents gives each token the loss it has when its document runs alone
(decoder, with and without restarting positions; T5, encoder, decoder and cross-attention), and
not without the mask; the objectives derive the document ids from EOS; with the mask off nothing
changes (SDPA's causal path, T5's biases as before); the pipeline pieces, activation
checkpointing and compiled blocks compute the masked forward; and, training in-process on gloo,
ZeRO-3 and 2 pipeline stages on 2 processes follow the 1-process run, evaluate, resume exactly,
replay and publish.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import kiln_in_process, step_losses, t5_sections, train_config
from distributed import run_distributed, train_runs
from test_pipeline import LLAMA, T5, pipeline_layers, run_layers
from test_replay import _check_replay
from test_train_distributed import STAGE_TOLERANCE, continue_from

from model import build_model
from model.layers import IGNORE_INDEX, allowed_keys
from model.llama import LlamaConfig
from model.t5 import T5Config
from trainer.config import ConfigError, PrefixLMObjective, SpanCorruptionObjective, load_config
from trainer.engine import apply_activation_checkpointing
from trainer.objectives import (
    CausalLM,
    Seq2Seq,
    document_ids,
    document_positions,
    span_corruption,
    span_corruption_documents,
)
from trainer.pipeline import first_stage_inputs, layer_specs

EOS, PAD = 1, 0
SENTINELS = np.arange(63, 47, -1)  # <extra_id_0> ... of a 64-piece vocabulary
# fp32: a masked row and its documents alone sum the same terms with other zeros among them
ATOL = 1e-5


def per_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V), (B, T) -> (B, T) fp32 nats (0 where unlabelled)."""
    return F.cross_entropy(
        logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )


def packed_documents(lengths, seed=0) -> tuple[list[np.ndarray], np.ndarray]:
    """Documents of ``lengths`` tokens, each ending with EOS, and their packed row (1, R)."""
    rng = np.random.default_rng(seed)
    docs = [np.r_[rng.integers(4, 48, n - 1), EOS] for n in lengths]
    return docs, np.concatenate(docs)[None]


# -- the objectives' ids ---------------------------------------------------------------------
def test_document_ids_count_the_eos_before_each_token():
    tokens = np.array([[5, 6, EOS, 7, EOS, EOS, 8], [EOS, 5, 6, 7, 8, 9, 10]])
    assert document_ids(tokens, EOS).tolist() == [[0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]
    positions = document_positions(document_ids(tokens, EOS))
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 0], [0, 0, 1, 2, 3, 4, 5]]


def test_causal_lm_batch_carries_documents_and_positions():
    _, row = packed_documents([3, 4, 2])
    rows = np.concatenate([row, [[9]]], axis=1)  # R + 1 tokens: the last is a label only
    plain = CausalLM()(rows, None, 0)
    assert set(plain.inputs) == {"input_ids"}
    masked = CausalLM(document_mask=True, eos_id=EOS)(rows, None, 0)
    assert set(masked.inputs) == {"input_ids", "document_ids"}
    assert masked.inputs["document_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, 2]]
    reset = CausalLM(document_mask=True, reset_position_ids=True, eos_id=EOS)(rows, None, 0)
    assert reset.inputs["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1]]
    assert torch.equal(reset.labels, plain.labels)
    with pytest.raises(ValueError, match="eos_id"):
        CausalLM(document_mask=True)
    with pytest.raises(ValueError, match="document_mask"):
        CausalLM(reset_position_ids=True, eos_id=EOS)


def test_span_corruption_documents_follow_their_spans():
    """A span that starts in document 0 and runs into document 1 belongs to document 0 with its
    sentinel; the encoder's kept tokens keep theirs; the EOS appended goes with the last span."""
    tokens = np.array([10, 11, EOS, 12, 13, 14, EOS, 15, 16, 17])
    docs = document_ids(tokens, EOS)  # 0 0 0 1 1 1 1 2 2 2
    noise = np.array([0, 1, 1, 1, 0, 0, 0, 0, 1, 1], dtype=bool)
    inputs, targets = span_corruption(tokens, noise, SENTINELS, EOS)
    enc, dec = span_corruption_documents(docs, noise)
    assert inputs.tolist() == [10, 63, 13, 14, EOS, 15, 62, EOS]
    assert enc.tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    assert targets.tolist() == [63, 11, EOS, 12, 62, 16, 17, EOS]
    assert dec.tolist() == [0, 0, 0, 0, 2, 2, 2, 2]


def seq2seq(objectives, raw_length, document_mask=True) -> Seq2Seq:
    return Seq2Seq(
        objectives, raw_length=raw_length, sentinel_ids=SENTINELS, eos_id=EOS, pad_id=PAD,
        decoder_start_id=PAD, seed=3, document_mask=document_mask,
    )  # fmt: skip


@pytest.mark.parametrize("objective", ["span_corruption", "prefix_lm"])
def test_seq2seq_batch_restarts_the_decoder_per_document(objective):
    """Each document's targets are decoded behind the start id, as alone; documents of padding
    are -1; without the mask the batch is the one it always was."""
    o = SpanCorruptionObjective() if objective == "span_corruption" else PrefixLMObjective()
    _, row = packed_documents([9, 12, 7, 12], seed=1)
    rows = np.repeat(np.concatenate([row, [[5]]], axis=1), 3, axis=0)
    masked = seq2seq([o], 40)(rows, np.arange(3), 0)
    plain = seq2seq([o], 40, document_mask=False)(rows, np.arange(3), 0)
    assert set(masked.inputs) - set(plain.inputs) == {"document_ids", "decoder_document_ids"}
    assert torch.equal(masked.labels, plain.labels)
    for k in ("input_ids", "attention_mask"):
        assert torch.equal(masked.inputs[k], plain.inputs[k])
    enc_docs, dec_docs = masked.inputs["document_ids"], masked.inputs["decoder_document_ids"]
    assert torch.equal(enc_docs < 0, masked.inputs["attention_mask"] == 0)
    assert torch.equal(dec_docs < 0, masked.labels == IGNORE_INDEX)
    for b in range(3):
        labels, dec = masked.labels[b], masked.inputs["decoder_input_ids"][b]
        for d in dec_docs[b].unique().tolist():
            if d < 0:
                continue
            targets = labels[dec_docs[b] == d]
            assert dec[dec_docs[b] == d].tolist() == [PAD, *targets[:-1].tolist()]
            assert (enc_docs[b] == d).any()  # every target document has encoder tokens
    if objective == "prefix_lm":  # the targets are one span: one document
        assert all(len(dec_docs[b][dec_docs[b] >= 0].unique()) == 1 for b in range(3))
    else:
        assert max(len(dec_docs[b][dec_docs[b] >= 0].unique()) for b in range(3)) > 1


# -- the models: a packed row equals its documents alone ------------------------------------------
LLAMA_32 = {**LLAMA, "max_position_embeddings": 32}


@pytest.mark.parametrize("reset", [False, True], ids=["rope", "reset-positions"])
def test_decoder_packed_row_equals_documents_alone(reset):
    """Every position whose target is in its own document (all but each EOS's) has the loss
    of its document run alone; RoPE depends on offsets only, so restarting the positions gives
    the same within rounding. Without the mask the later documents' losses differ."""
    model = build_model(LlamaConfig(**LLAMA_32), seed=0).eval()
    docs, row = packed_documents([6, 10, 7, 5])
    rows = np.concatenate([row, [[9]]], axis=1)
    batch = CausalLM(document_mask=True, reset_position_ids=reset, eos_id=EOS)(rows, None, 0)
    with torch.no_grad():
        packed = per_token_loss(model(**batch.inputs), batch.labels)[0]
        unmasked = per_token_loss(model(input_ids=batch.inputs["input_ids"]), batch.labels)[0]
    start = 0
    for doc in docs:
        alone = CausalLM()(np.r_[doc, 9][None], None, 0)
        with torch.no_grad():
            want = per_token_loss(model(**alone.inputs), alone.labels)[0]
        n = len(doc) - 1  # the EOS's target is the next document's first token
        torch.testing.assert_close(packed[start : start + n], want[:n], rtol=0, atol=ATOL)
        if start:
            assert (unmasked[start : start + n] - want[:n]).abs().max() > 1e-2
        start += len(doc)


def t5_packed_case(objective, seed=1):
    """A packed batch of 2 rows of 4 documents from `Seq2Seq` with the document mask."""
    o = SpanCorruptionObjective() if objective == "span_corruption" else PrefixLMObjective()
    rows = np.concatenate(
        [
            np.concatenate([packed_documents([9, 12, 7, 12], seed=seed + b)[1], [[5]]], axis=1)
            for b in range(2)
        ]
    )
    return seq2seq([o], 40)(rows, np.arange(2), 0)


def test_t5_packed_row_equals_documents_alone():
    """Each document's encoder tokens and targets, cut from a span-corrupted packed batch (its
    decoder inputs restart behind the start id) and run alone, give each target the loss it has
    in the packed batch: encoder attention within the document (with the row's padding), the
    decoder's causal attention within it, cross-attention to its encoder tokens, relative
    positions from its own offsets. Without the masks the losses differ."""
    model = build_model(T5Config(**T5), seed=0).eval()
    batch = t5_packed_case("span_corruption")
    inputs = dict(batch.inputs)
    inputs["attention_mask"][1, -3:] = 0  # padding the rows do not have, to mask with them
    inputs["document_ids"][1, -3:] = -1
    with torch.no_grad():
        packed = per_token_loss(model(**inputs), batch.labels)
        plain = {k: inputs[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}
        unmasked = per_token_loss(model(**plain), batch.labels)
    compared = 0
    for b in range(2):
        enc_docs, dec_docs = inputs["document_ids"][b], inputs["decoder_document_ids"][b]
        for d in dec_docs[dec_docs >= 0].unique().tolist():
            enc = enc_docs == d
            dec = dec_docs == d
            alone = {
                "input_ids": inputs["input_ids"][b][enc][None],
                "decoder_input_ids": inputs["decoder_input_ids"][b][dec][None],
            }
            with torch.no_grad():
                want = per_token_loss(model(**alone), batch.labels[b][dec][None])[0]
            torch.testing.assert_close(packed[b][dec], want, rtol=0, atol=ATOL)
            compared += int(dec.sum())
            if d > dec_docs[0]:
                assert (unmasked[b][dec] - want).abs().max() > 1e-2
    assert compared == int((batch.labels != IGNORE_INDEX).sum())


def test_t5_masks_are_the_relative_bias_with_documents_and_padding():
    """The encoder's self-attention bias is the relative bias plus padding, with other
    documents' keys at the most negative value; the decoder's also masks the future;
    cross-attention sees only the query's document."""
    model = build_model(T5Config(**T5), seed=0).eval()
    docs = torch.tensor([[0, 0, 1, 1, 1, -1]])
    pad = torch.tensor([[1, 1, 1, 1, 1, 0]])
    from model.t5.model import memory_bias, padding_bias

    lowest = torch.finfo(torch.float32).min
    with torch.no_grad():
        enc = model.encoder.position_bias(6, padding_bias(pad, torch.float32), 0, docs)
        dec = model.decoder.position_bias(6, None, 0, docs)
        rel_enc = model.encoder.relative_attention_bias(6, 6)
        rel_dec = model.decoder.relative_attention_bias(6, 6)
    same = docs[0][:, None] == docs[0][None, :]
    want_enc = torch.where(same, rel_enc[0] + padding_bias(pad, torch.float32)[0], lowest)
    torch.testing.assert_close(enc[0], want_enc, rtol=0, atol=0)
    want_dec = torch.where(same & torch.ones(6, 6, dtype=torch.bool).tril(), rel_dec[0], lowest)
    torch.testing.assert_close(dec[0], want_dec, rtol=0, atol=0)
    cross = memory_bias(pad, torch.zeros(1, 6, 4), torch.float32, docs, torch.tensor([[1, 0]]))
    assert cross.shape == (1, 1, 2, 6)
    assert (
        (cross[0, 0] == 0) == torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]]).bool()
    ).all()


# -- the mask off is the path it always was ---------------------------------------------------
def test_mask_off_keeps_the_causal_kernel_path(monkeypatch):
    """Without document ids the decoder calls SDPA with ``is_causal`` and no mask tensor, and a
    row of one document gives the unmasked forward's losses (within rounding: another kernel
    path); T5's biases without documents are the relative bias (+ padding; the decoder's future
    at the most negative value), bitwise."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("is_causal", False), kwargs.get("attn_mask")))
        return sdpa(*args, **kwargs)

    model = build_model(LlamaConfig(**LLAMA_32), seed=0).eval()
    ids = torch.randint(4, 64, (2, 20), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        plain = model(input_ids=ids)
        assert calls == [(True, None)] * 2
        one_document = model(input_ids=ids, document_ids=torch.zeros_like(ids))
    assert all(mask is not None and not causal for causal, mask in calls[2:])
    torch.testing.assert_close(one_document, plain, rtol=0, atol=1e-5)
    assert allowed_keys(4, 4, causal=False) is None

    t5 = build_model(T5Config(**T5), seed=0).eval()
    with torch.no_grad():
        rel = t5.decoder.relative_attention_bias(5, 5)
        future = torch.ones(5, 5, dtype=torch.bool).triu(1)
        want = rel.masked_fill(future, torch.finfo(rel.dtype).min)
        assert torch.equal(t5.decoder.position_bias(5), want)
        assert torch.equal(t5.encoder.position_bias(5), t5.encoder.relative_attention_bias(5, 5))


def test_t5_refuses_one_side_of_the_document_ids():
    model = build_model(T5Config(**T5), seed=0).eval()
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="decoder_document_ids"):
        model(ids, ids, document_ids=torch.zeros_like(ids))


# -- pipeline pieces, activation checkpointing, compiled blocks ---------------------------------
def masked_case(family: str):
    """A model in training mode, its masked inputs from the objective, and the labels."""
    if family == "llama":
        model = build_model(LlamaConfig(**LLAMA_32), seed=0)
        _, row = packed_documents([6, 10, 7, 5])
        rows = np.concatenate([np.repeat(row, 2, axis=0), [[9], [8]]], axis=1)
        batch = CausalLM(document_mask=True, reset_position_ids=True, eos_id=EOS)(rows, None, 0)
    else:
        model = build_model(T5Config(**T5), seed=0)
        batch = t5_packed_case("span_corruption")
    return model.train(), batch.inputs, batch.labels


def loss_and_grads(model, forward, labels):
    params = dict(model.named_parameters())
    torch.manual_seed(1)  # T5's dropout draws the same masks
    loss = F.cross_entropy(forward().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    return loss, dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_pipeline_pieces_compute_the_masked_forward(family):
    """The ids travel through the pieces (`first_stage_inputs` orders them): logits and every
    gradient equal the plain model's, bitwise."""
    model, inputs, labels = masked_case(family)
    want, want_grads = loss_and_grads(model, lambda: model(**inputs), labels)
    layers = pipeline_layers(layer_specs(model))
    pipe_inputs = first_stage_inputs(model.config, inputs)
    got, got_grads = loss_and_grads(model, lambda: run_layers(layers, pipe_inputs), labels)
    assert torch.equal(got, want)
    for name, grad in want_grads.items():
        assert torch.equal(got_grads[name], grad), name
    model.eval()
    for layer in layers:  # as PipelineModule.eval() does
        (layer.args[-1] if isinstance(layer, partial) else layer).eval()
    x = pipe_inputs
    with torch.no_grad():
        for layer in layers:
            x = layer(x)
        assert torch.equal(x, model(**inputs))


@pytest.mark.parametrize("mode", ["full", "attention"])
@pytest.mark.parametrize("family", ["llama", "t5"])
def test_activation_checkpointing_recomputes_the_masked_blocks(family, mode):
    model, inputs, labels = masked_case(family)
    want, want_grads = loss_and_grads(model, lambda: model(**inputs), labels)
    apply_activation_checkpointing(model, mode)
    got, got_grads = loss_and_grads(model, lambda: model(**inputs), labels)
    assert torch.equal(got, want)
    for name, grad in want_grads.items():
        assert torch.equal(got_grads[name], grad), name


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "t5"])
def test_compiled_blocks_take_the_masks(family):
    """Blocks compiled as ``train.compile`` does (after activation checkpointing) give the eager
    loss and gradients within fp32 rounding (Inductor reorders the elementwise maths), without
    dropout (T5's)."""
    from trainer.compile import apply_compile, compile_unavailable

    if compile_unavailable("cpu"):
        pytest.skip(compile_unavailable("cpu"))
    model, inputs, labels = masked_case(family)
    model.eval()  # no dropout: Inductor draws its own random numbers
    want, want_grads = loss_and_grads(model, lambda: model(**inputs), labels)
    apply_activation_checkpointing(model, "full", 2)
    assert apply_compile(model, "cpu")
    got, got_grads = loss_and_grads(model, lambda: model(**inputs), labels)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


# -- config, dry-run --------------------------------------------------------------------------
def test_reset_position_ids_needs_the_document_mask():
    with pytest.raises(ConfigError, match=r"data\.reset_position_ids=true.*data\.document_mask"):
        load_config(None, ["data.reset_position_ids=true"])
    cfg = load_config(None, ["data.reset_position_ids=true", "data.document_mask=true"])
    assert cfg.data.reset_position_ids and cfg.data.document_mask
    with pytest.raises(ConfigError, match="relative"):
        load_config(
            None,
            ["model.model_type=t5", "data.document_mask=true", "data.reset_position_ids=true"],
        )


def test_dry_run_names_the_document_mask(prepared_data, tmp_path):
    config = train_config(tmp_path, prepared_data)
    off = kiln_in_process("train", str(config), "--dry-run")
    on = kiln_in_process(
        "train", str(config), "--dry-run", "data.document_mask=true", "data.reset_position_ids=true"
    )
    assert off.returncode == 0 and on.returncode == 0, off.stdout + on.stdout + on.stderr
    assert "attention across document boundaries (data.document_mask=false)" in off.stdout
    assert "attention within each document (data.document_mask=true)" in on.stdout
    assert "positions restart per document" in on.stdout


# -- training on gloo ranks -----------------------------------------------------------------------
MASK = dict(data__document_mask="true")
RESET = dict(data__document_mask="true", data__reset_position_ids="true")
EVAL = dict(train__eval_every=3)
ZERO3 = dict(parallel__zero_stage=3, parallel__sub_group_size=2**20)
PIPE = dict(parallel__zero_stage=1, parallel__pipeline_stages=2)
OPTIONS = dict(train__activation_checkpointing="attention", train__loss_chunk_tokens=48)


@pytest.fixture(scope="module")
def masked_runs(prepared_data, prepared_t5_data, tmp_path_factory) -> dict[str, Path]:
    """6 steps with the document mask, checkpoints at 3 and 6, evaluation at 3 and 6: on 1
    process ``llama-plain`` (positions reset), ``llama-unmasked`` (the same without the mask)
    and ``t5-plain``; on 2, ``zero3`` (ZeRO-3 with attention checkpointing and the chunked
    loss), ``llama-pipe`` (2 stages) and ``t5-pipe``."""
    layouts = {
        1: {
            "llama-plain": (prepared_data, dict(parallel__zero_stage=1, **RESET)),
            "llama-unmasked": (prepared_data, dict(parallel__zero_stage=1)),
            "t5-plain": (prepared_t5_data, t5_sections(parallel__zero_stage=1, **MASK)),
        },
        2: {
            "zero3": (prepared_data, dict(**ZERO3, **OPTIONS, **RESET)),
            "llama-pipe": (prepared_data, dict(**PIPE, **RESET)),
            "t5-pipe": (prepared_t5_data, t5_sections(**PIPE, **MASK)),
        },
    }
    out = {}
    for nproc, runs in layouts.items():
        configs = [
            train_config(tmp_path_factory.mktemp(f"docmask-{name}"), data, **extra, **EVAL)
            for name, (data, extra) in runs.items()
        ]
        out.update(zip(runs, run_distributed(train_runs, nproc, *configs)[0], strict=True))
    return out


def val_losses(run: Path) -> dict[int, float]:
    import json

    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "val_loss" in rec:
            out[rec["step"]] = rec["val_loss"]
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,reference",
    [("zero3", "llama-plain"), ("llama-pipe", "llama-plain"), ("t5-pipe", "t5-plain")],
)
def test_two_process_layouts_follow_the_one_process_run(masked_runs, name, reference):
    want, got = step_losses(masked_runs[reference]), step_losses(masked_runs[name])
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    assert want[6] < want[1]  # it learns
    for s in want:
        assert got[s] == pytest.approx(want[s], abs=STAGE_TOLERANCE), (s, got[s], want[s])
    want_val, got_val = val_losses(masked_runs[reference]), val_losses(masked_runs[name])
    assert sorted(got_val) == sorted(want_val) and {3, 6} <= set(want_val)
    for s in want_val:
        assert got_val[s] == pytest.approx(want_val[s], abs=STAGE_TOLERANCE), s


@pytest.mark.slow
def test_the_mask_changes_training(masked_runs):
    """Same seed and rows (each holds several paragraphs of the test text): every step's loss
    differs from the unmasked run's by more than the layouts' rounding (STAGE_TOLERANCE), by
    1e-3 or more after a few steps (the debug model at initialisation barely uses context)."""
    masked = step_losses(masked_runs["llama-plain"])
    unmasked = step_losses(masked_runs["llama-unmasked"])
    diffs = [abs(masked[s] - unmasked[s]) for s in masked]
    assert min(diffs) > STAGE_TOLERANCE and max(diffs) > 1e-3, diffs


@pytest.mark.slow
def test_resume_with_the_document_mask_is_exact(masked_runs, prepared_data, tmp_path_factory):
    """The ZeRO-3 and pipeline runs cut back to their step-3 checkpoint and resumed on 2
    processes repeat steps 4-6 exactly."""
    cases = {"zero3": {**ZERO3, **OPTIONS, **RESET}, "llama-pipe": {**PIPE, **RESET}}
    configs = []
    for name, overrides in cases.items():
        tmp = tmp_path_factory.mktemp(f"docmask-resume-{name}")
        configs.append(train_config(tmp, prepared_data, **overrides, **EVAL))
        continue_from(masked_runs[name], 3, tmp)
    runs = run_distributed(train_runs, 2, *configs)[0]
    for name, run in zip(cases, runs, strict=True):
        want, got = step_losses(masked_runs[name]), step_losses(run)
        assert sorted(got) == [4, 5, 6], name
        for s in (4, 5, 6):
            assert got[s] == pytest.approx(want[s], abs=1e-6), (name, s, got[s], want[s])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-plain", "t5-plain", "llama-pipe"])
def test_replay_uses_the_runs_masks(masked_runs, name):
    """`kiln replay` recomputes step 4 to the logged loss's last digit (with the masks: the
    unmasked forward would not). The ZeRO-3 run is left out: it trains with the chunked loss,
    which replay's plain loss matches to rounding only."""
    _check_replay(masked_runs[name], 4, ranks=[0])


@pytest.mark.slow
def test_publish_of_a_masked_run_records_it(masked_runs, tmp_path):
    """The published model has no mask (its logits check runs unmasked); the card says how the
    model was trained."""
    result = kiln_in_process("publish", str(masked_runs["llama-plain"]), "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    card = (tmp_path / "README.md").read_text()
    assert "attention within each document (data.document_mask=true)" in card
    assert "positions restart per document" in card
