"""Regional compilation: ``torch.compile`` applied to each transformer block, not the whole model.

Every block of a family has the same code and shapes, so Dynamo traces one block once and every
other block reuses the compiled graph (its parameters are graph inputs): compile time is that of
one block, whatever the depth, and the embedding, the head and DeepSpeed's engine stay eager.
This is torchtitan's ``apply_compile`` (``torchtitan/models/llama3/infra/parallelize.py``) and
the "regional compilation" recipe of the PyTorch tutorials. The training loss of the plain head
is compiled on its own (:func:`compile_loss`, used by :class:`trainer.loop.Trainer`).

Each block is compiled in place with :meth:`torch.nn.Module.compile`, which keeps the module
object and compiles its ``__call__``: parameter names, state-dict keys, checkpoints and the
Hugging Face key map are those of the eager model (``torch.compile(module)`` would instead wrap
it in an ``OptimizedModule`` whose keys gain ``_orig_mod.``). It is applied after activation
checkpointing, so a checkpointed block's recomputation is traced into the compiled graph too
(``torch.utils.checkpoint`` without reentrance is traced by Dynamo).

Graphs may break (``fullgraph=False``, where torchtitan asks for ``fullgraph=True``): under
ZeRO-3 DeepSpeed's parameter fetch and release hooks run around every submodule and are marked
``torch.compiler.disable``, so Dynamo compiles the maths between them and calls the hooks eagerly.

Shapes are static (``dynamic=False``): a training step always has the same (micro batch, seq_len),
so one graph serves the whole run; validation (no grad, maybe another micro batch) compiles one
more. Inductor, the default backend, generates C++/OpenMP kernels on a CPU, which needs a C++
compiler, and Triton kernels on a GPU; :func:`compile_unavailable` says before the run when it
cannot, and the run then trains eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)


def compile_unavailable(device: torch.device | str) -> str | None:
    """Why ``train.compile`` cannot compile on ``device`` here, or None when it can.

    CPU: Inductor compiles its kernels with the C++ compiler ``$CXX`` (default ``g++``), found as
    Inductor itself looks it up (``torch._inductor.cpp_builder.get_cpp_compiler``). CUDA: Inductor
    needs Triton (``torch.utils._triton.has_triton``).

    Returns:
        A one-line message naming what is missing, what to install and the way out
        (``train.compile=false``); None where the backend has what it needs.
    """
    device = torch.device(device)
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if has_triton():
            return None
        return (
            "train.compile=true needs Triton for torch.compile's inductor backend on a GPU and "
            "it is not installed (pip install triton); training eagerly, set train.compile=false "
            "to silence this"
        )
    from torch._inductor import exc
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        import os

        cxx = os.environ.get("CXX", "g++")
        return (
            f"train.compile=true needs a C++ compiler for torch.compile's inductor backend on a "
            f"CPU and {cxx!r} (the CXX variable, default g++) was not found; training eagerly. "
            f"Install one (Debian/Ubuntu: apt-get install g++) or point CXX at it, or set "
            f"train.compile=false to silence this"
        )
    return None


def compile_loss(loss: Callable[..., torch.Tensor], device: torch.device | str) -> Callable:
    """``loss`` (a function of the logits and labels, :func:`trainer.objectives.token_loss`)
    compiled with static shapes, or ``loss`` itself where the backend cannot compile on ``device``
    (:func:`compile_unavailable`; :func:`apply_compile` has already said so).

    Compiled, the cross-entropy's log-softmax, label gather and mean run as one pass over the
    (tokens x V) fp32 logits forward and one backward, where eager PyTorch writes the
    log-probabilities and a zero-filled gradient before scattering into it: fewer passes over
    the logits and one (tokens x V) buffer less. torchtitan compiles its loss beside the blocks
    in the same way (``compile.components = ["model", "loss"]``,
    ``torchtitan/components/loss.py``).
    """
    if compile_unavailable(device) is not None:
        return loss
    return torch.compile(loss, dynamic=False)


def compiled_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules :func:`apply_compile` compiles: ``model.blocks()`` of a plain Kiln model
    (Llama ``DecoderLayer``; T5 encoder and decoder ``T5Block``), or a DeepSpeed
    ``PipelineModule``'s block layers (`trainer.pipeline.PipeBlock`, each one block and the
    slicing of its inputs)."""
    from trainer.pipeline import PipeBlock

    if hasattr(model, "blocks"):
        return list(model.blocks())
    return [m for m in model.modules() if isinstance(m, PipeBlock)]


def apply_compile(model: nn.Module, device: torch.device | str) -> bool:
    """Compile each transformer block of ``model`` in place (``module.compile(dynamic=False)``,
    the inductor backend); the rest of the model stays eager.

    Call it after activation checkpointing is applied and before DeepSpeed wraps the model. The
    compilation itself happens at a block's first call (Dynamo traces lazily): ~30 s for the
    debug presets on a 2-core CPU with an empty Inductor cache (``TORCHINDUCTOR_CACHE_DIR``,
    default ``/tmp/torchinductor_$USER``), ~2 s with a warm one.

    Args:
        model: a plain Kiln model (``blocks()``) or a ``PipelineModule`` of one.
        device: where the blocks run (picks the backend's requirement to check).

    Returns:
        True when the blocks were compiled; False when the backend cannot compile here
        (:func:`compile_unavailable`; its message is logged as a warning) and ``model`` is left
        eager.
    """
    reason = compile_unavailable(device)
    if reason is not None:
        logger.warning(reason)
        return False
    blocks = compiled_blocks(model)
    assert blocks, f"{type(model).__name__} has no transformer blocks to compile"
    for block in blocks:
        block.compile(dynamic=False)
    return True
