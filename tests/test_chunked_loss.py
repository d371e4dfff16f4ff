"""The chunked loss (`train.loss_chunk_tokens`): `model.layers.linear_cross_entropy` gives the
plain head + `token_loss` value and gradients (hidden states and head weight, tied or not, with
ignored labels and chunks that do not divide the tokens), through both families' forwards and
the pipeline's last piece; training with it follows the plain run's losses on 1 process, under
ZeRO-3 and with 2 pipeline stages on 2 gloo processes, and resumes exactly."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import step_losses, t5_sections, train_config
from distributed import run_distributed, train_runs
from test_pipeline import LLAMA, T5, pipeline_layers, run_layers
from test_train_distributed import continue_from

from model import build_model
from model.layers import IGNORE_INDEX, linear_cross_entropy
from model.llama import LlamaConfig
from model.t5 import T5Config
from trainer.objectives import token_loss
from trainer.pipeline import layer_specs, pipeline_loss

# fp32: the chunked loss sums the same per-token terms in another order and computes the
# softmax gradient by hand (exp(logit - lse) - onehot) rather than through autograd's log_softmax
# backward; measured differences are <= 1 ulp of the loss and ~5e-8 on gradients of ~4e-2.
RTOL, ATOL = 1e-5, 1e-7
# Gradients backpropagated through a whole model carry that rounding through every layer, so an
# element's error scales with the tensor's largest element, not its own: measured up to 6.4e-7 x
# max|grad| (embedding, AMD EPYC; 0 on other CPUs). A wrong gradient is off by O(max|grad|).
GRAD_ATOL_OF_MAX = 1e-5


def assert_grads_close(got: dict, want: dict) -> None:
    for name, grad in want.items():
        atol = max(ATOL, GRAD_ATOL_OF_MAX * float(grad.abs().max()))
        torch.testing.assert_close(got[name], grad, rtol=RTOL, atol=atol, msg=name)


def plain_loss(h, weight, labels):
    return token_loss(F.linear(h, weight), labels)


@pytest.mark.parametrize("chunk", [1, 7, 16, 1000, 0])
def test_linear_cross_entropy_equals_the_plain_loss(chunk):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 11, 16, generator=gen, requires_grad=True)
    weight = torch.randn(101, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 101, (3, 11), generator=gen)
    labels[0, :4] = IGNORE_INDEX
    labels[2, -1] = IGNORE_INDEX
    want = plain_loss(h, weight, labels)
    got = linear_cross_entropy(h, weight, labels, chunk)
    assert got.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    for g, w in zip(
        torch.autograd.grad(got, [h, weight]), torch.autograd.grad(want, [h, weight]), strict=True
    ):
        torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL)


def test_linear_cross_entropy_in_bf16_follows_the_plain_loss():
    """bf16 operands: logits rounded to bf16 as the plain head's, softmax in fp32; the weight's
    gradient accumulates over the 5 chunks in bf16, rounded once per chunk (the plain path's is
    one bf16 matmul)."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(40, 32, generator=gen).bfloat16().requires_grad_()
    weight = torch.randn(257, 32, generator=gen).bfloat16().requires_grad_()
    labels = torch.randint(0, 257, (40,), generator=gen)
    want = plain_loss(h[None], weight, labels[None])
    got = linear_cross_entropy(h, weight, labels, 9)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(
        torch.autograd.grad(got, [h, weight]), torch.autograd.grad(want, [h, weight]), strict=True
    ):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_weights_gradient_is_the_only_vocabulary_sized_tensor_of_backward(dtype):
    """The backward accumulates the (V, D) gradient in place, chunk by chunk: besides it, no
    tensor of the weight's size is made (an fp32 accumulator of a bf16 weight and a product per
    chunk cost 5 times the bf16 gradient: measured with bench/loss_memory.py at V = 128256,
    D = 2048, 2048 tokens, 256-token chunks, the step's peak went from 0.89x the plain path's
    to 0.39x)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class WeightSized(TorchDispatchMode):
        def __init__(self, numel):
            super().__init__()
            self.numel, self.made = numel, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            given = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            for t in out if isinstance(out, tuple | list) else [out]:
                if not isinstance(t, torch.Tensor) or t.numel() < self.numel:
                    continue
                if t.untyped_storage().data_ptr() not in given:  # new memory: not a view
                    self.made.append((str(func), t.dtype))
            return out

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(40, 32, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(257, 32, generator=gen).to(dtype).requires_grad_()
    labels = torch.randint(0, 257, (40,), generator=gen)
    loss = linear_cross_entropy(h, weight, labels, 9)
    with WeightSized(weight.numel()) as mode:
        loss.backward()
    assert len(mode.made) == 1 and mode.made[0][1] == dtype, mode.made


def test_linear_cross_entropy_refuses_misaligned_labels():
    with pytest.raises(ValueError, match="do not match"):
        linear_cross_entropy(torch.zeros(2, 5, 4), torch.zeros(3, 4), torch.zeros(2, 4).long())


def model_case(family: str, tie: bool):
    gen = torch.Generator().manual_seed(0)
    B, S, T = 2, 12, 9
    if family == "llama":
        cfg = LlamaConfig(**LLAMA, tie_word_embeddings=tie)
        kwargs = {"input_ids": torch.randint(0, 64, (B, T), generator=gen)}
        pipe_inputs = kwargs["input_ids"]
    else:
        cfg = T5Config(**T5, tie_word_embeddings=tie)
        mask = torch.ones(B, S, dtype=torch.long)
        mask[1, 7:] = 0
        kwargs = {
            "input_ids": torch.randint(0, 64, (B, S), generator=gen),
            "attention_mask": mask,
            "decoder_input_ids": torch.randint(0, 64, (B, T), generator=gen),
        }
        pipe_inputs = (kwargs["input_ids"], mask, kwargs["decoder_input_ids"])
    labels = torch.randint(0, 64, (B, T), generator=gen)
    labels[1, 5:] = IGNORE_INDEX
    return build_model(cfg, seed=0).train(), kwargs, pipe_inputs, labels


def loss_and_grads(model, forward):
    params = dict(model.named_parameters())  # a tied head's weight once
    torch.manual_seed(1)  # T5's dropout draws the same masks
    loss = forward()
    return loss, dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", ["llama", "t5"])
def test_models_apply_the_chunked_loss_in_their_head(family, tie):
    """``model(..., labels=, loss_chunk_tokens=)`` is the plain logits' `token_loss`, with every
    parameter's gradient (T5's tied head rescales by d_model**-0.5 first, as in the logits);
    the pipeline's head with ``head_loss`` hands the same operands to `pipeline_loss` in
    training and returns the plain logits in evaluation."""
    model, kwargs, pipe_inputs, labels = model_case(family, tie)
    want, want_grads = loss_and_grads(model, lambda: token_loss(model(**kwargs), labels))
    got, got_grads = loss_and_grads(
        model, lambda: model(**kwargs, labels=labels, loss_chunk_tokens=5)
    )
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    assert_grads_close(got_grads, want_grads)

    layers = pipeline_layers(layer_specs(model, head_loss=True))
    loss_fn = pipeline_loss(token_loss, 5)
    piped, piped_grads = loss_and_grads(
        model, lambda: loss_fn(run_layers(layers, pipe_inputs), labels)
    )
    torch.testing.assert_close(piped, want, rtol=RTOL, atol=ATOL)
    assert_grads_close(piped_grads, want_grads)
    model.eval()
    for layer in layers:  # as PipelineModule.eval() does
        (layer.args[-1] if isinstance(layer, partial) else layer).eval()
    logits = run_layers(layers, pipe_inputs)
    assert torch.equal(logits, model(**kwargs))
    assert torch.equal(loss_fn(logits, labels), token_loss(logits, labels))


CHUNK = "48"  # tokens per chunk: micro-batches hold 2 x 64 tokens, so the last chunk is short
# Losses of runs whose gradients differ by fp32 rounding (RTOL above), after up to 5 AdamW steps
RUN_TOLERANCE = 2e-5


ZERO3 = dict(parallel__zero_stage=3, parallel__sub_group_size=2**20)  # as zero_runs[3]
PIPE = dict(parallel__zero_stage=1, parallel__pipeline_stages=2)  # as pipeline_runs' "-pipe"
MLP = dict(train__activation_checkpointing="mlp")
EVERY2 = dict(train__activation_checkpointing="full", train__activation_checkpointing_every=2)


@pytest.fixture(scope="module")
def chunked_runs(prepared_data, prepared_t5_data, tmp_path_factory) -> dict[str, Path]:
    """The runs of `pipeline_runs` and ZeRO-3's of `zero_runs`, with the chunked loss: on 1
    process ``llama-plain``, ``t5-plain``, ``llama-tied-plain``; on 2 ``zero3``, ``llama-pipe``,
    ``t5-pipe`` (one worker start-up per process count). The first two of the 2-process runs
    also checkpoint activations (mlp; full every 2nd block), exact recomputation, so that
    `test_resume_is_exact_with_the_options_on` resumes runs with both options on."""
    chunk = {"train__loss_chunk_tokens": CHUNK}
    tied = dict(model__tie_word_embeddings="true", train__max_steps=3, checkpoint__save_every=1000)
    layouts = {
        1: {
            "llama-plain": (prepared_data, dict(parallel__zero_stage=1)),
            "t5-plain": (prepared_t5_data, t5_sections(parallel__zero_stage=1)),
            "llama-tied-plain": (prepared_data, dict(parallel__zero_stage=1, **tied)),
        },
        2: {
            "zero3": (prepared_data, dict(parallel__zero_stage=3, parallel__sub_group_size=2**20)),
            "llama-pipe": (
                prepared_data,
                dict(parallel__zero_stage=1, parallel__pipeline_stages=2),
            ),
            "t5-pipe": (prepared_t5_data, t5_sections(**PIPE)),
        },
    }
    out = {}
    for nproc, runs in layouts.items():
        configs = [
            train_config(tmp_path_factory.mktemp(f"chunked-{name}"), data, **extra, **chunk)
            for name, (data, extra) in runs.items()
        ]
        out.update(zip(runs, run_distributed(train_runs, nproc, *configs)[0], strict=True))
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["llama-plain", "t5-plain", "llama-tied-plain", "zero3", "llama-pipe", "t5-pipe"]
)
def test_training_with_the_chunked_loss_follows_the_plain_loss(
    chunked_runs, pipeline_runs, zero_runs, name
):
    reference = zero_runs[3] if name == "zero3" else pipeline_runs[name]
    want, got = step_losses(reference), step_losses(chunked_runs[name])
    assert sorted(got) == sorted(want)
    for s in want:
        assert got[s] == pytest.approx(want[s], abs=RUN_TOLERANCE), (s, got[s], want[s])


@pytest.mark.slow
def test_resume_is_exact_with_the_options_on(chunked_runs, prepared_data, tmp_path_factory):
    """The ZeRO-3 and pipeline runs of `chunked_runs` (chunked loss and selective checkpointing
    on) cut back to their step-3 checkpoint and resumed on 2 processes with the same options
    repeat steps 4-6 exactly."""
    chunk = {"train__loss_chunk_tokens": CHUNK}
    cases = {"zero3": {**ZERO3, **MLP, **chunk}, "llama-pipe": {**PIPE, **EVERY2, **chunk}}
    configs = []
    for name, overrides in cases.items():
        tmp = tmp_path_factory.mktemp(f"resume-{name}")
        configs.append(train_config(tmp, prepared_data, **overrides))
        continue_from(chunked_runs[name], 3, tmp)
    runs = run_distributed(train_runs, 2, *configs)[0]
    for name, run in zip(cases, runs, strict=True):
        want, got = step_losses(chunked_runs[name]), step_losses(run)
        assert sorted(got) == [4, 5, 6], name
        for s in (4, 5, 6):
            assert got[s] == pytest.approx(want[s], abs=1e-6), (name, s, got[s], want[s])
