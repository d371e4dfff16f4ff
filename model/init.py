"""Initial weights as a pure function of (seed, parameter name): any piece of any parameter can be
drawn alone, so a ZeRO-3 rank fills only its partition and a pipeline stage only its layers,
and gathered they equal the one-process model bit for bit, whatever the layout.

Parameter ``name`` (its key in the plain model's ``named_parameters()``, a tied weight under its
first name) is drawn in fp32 as its flattened elements, in blocks of :data:`INIT_BLOCK`
elements; block ``b`` comes from its own CPU ``torch.Generator`` seeded with
``sha256(f"{seed}/{name}/{b}")`` (:func:`block_seed`). Neither construction order, device nor
the partition a rank holds changes a value; a rank drawing elements ``[start, stop)`` draws only
the blocks that overlap them.

A model family says which distribution each parameter starts from (``init_rule(name)``, a
:class:`Normal` or :class:`Fill`) and gives fresh values of its non-persistent buffers
(``fresh_buffers()``, the RoPE tables); :func:`seed_source` turns that into a :data:`Source`,
and :func:`materialise` fills a model (or some of its modules) built on the meta device from
any source, one parameter at a time. ``model.hf_checkpoint.HFWeightReader`` is the other
source: the weights of a Hugging Face folder, read slice by slice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# Elements per generator block: 4 MiB of fp32, small against any parameter worth partitioning,
# large enough that seeding a generator per block costs nothing measurable.
INIT_BLOCK = 1 << 20

Source = Callable[[str, torch.Size, int, int], Tensor]
"""``(name, shape, start, stop) -> values``: elements ``[start, stop)`` of parameter ``name``
(its full shape ``shape``) flattened in row-major order, as a 1-D fp32 CPU tensor of
``stop - start`` elements."""


@dataclass(frozen=True)
class Normal:
    """Start from N(0, std²) (``std`` in the parameter's units)."""

    std: float


@dataclass(frozen=True)
class Fill:
    """Start with every element equal to ``value`` (norm weights: 1.0)."""

    value: float


InitRule = Normal | Fill


def block_seed(seed: int, name: str, block: int) -> int:
    """The generator seed of block ``block`` of parameter ``name`` under run seed ``seed``: the
    first 8 bytes of ``sha256(f"{seed}/{name}/{block}")`` as an int below 2**63 (Python's own
    ``hash`` of a string differs between processes)."""
    digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def init_values(rule: InitRule, seed: int, name: str, start: int, stop: int) -> Tensor:
    """Elements ``[start, stop)`` of parameter ``name``'s flattened initial value under ``rule``:
    a 1-D fp32 CPU tensor of ``stop - start`` elements; only the blocks of :data:`INIT_BLOCK`
    elements that overlap the range are drawn.

    Raises:
        ValueError: ``start > stop`` or ``start < 0``.
    """
    if not 0 <= start <= stop:
        raise ValueError(f"element range [{start}, {stop}) of {name!r} is not a range")
    if isinstance(rule, Fill):
        return torch.full((stop - start,), rule.value, dtype=torch.float32)
    out = torch.empty(stop - start, dtype=torch.float32)
    block = torch.empty(INIT_BLOCK, dtype=torch.float32)
    for b in range(start // INIT_BLOCK, -(-stop // INIT_BLOCK)):
        lo, hi = b * INIT_BLOCK, (b + 1) * INIT_BLOCK
        generator = torch.Generator(device="cpu").manual_seed(block_seed(seed, name, b))
        block.normal_(0.0, rule.std, generator=generator)
        a, z = max(lo, start), min(hi, stop)
        out[a - start : z - start] = block[a - lo : z - lo]
    return out


def seed_source(model: nn.Module, seed: int) -> Source:
    """The :data:`Source` of ``model``'s initial weights from ``seed``: ``model.init_rule(name)``
    drawn by :func:`init_values` (the model may be on the meta device)."""

    def source(name: str, shape: torch.Size, start: int, stop: int) -> Tensor:
        return init_values(model.init_rule(name), seed, name, start, stop)

    return source


def parameter_names(model: nn.Module) -> dict[int, str]:
    """``id(parameter) -> name`` over ``model.named_parameters()`` (a tied weight under its first
    name, the one every source knows it by)."""
    return {id(p): name for name, p in model.named_parameters()}


@torch.no_grad()
def fill_parameters(model: nn.Module, source: Source) -> None:
    """Copy ``source``'s values into every parameter of ``model`` (materialised, any device and
    dtype), one at a time: the peak beyond the model is one parameter in fp32."""
    for name, param in model.named_parameters():
        values = source(name, param.shape, 0, param.numel())
        param.copy_(values.view(param.shape))


@torch.no_grad()
def materialise(
    model: nn.Module,
    source: Source,
    *,
    device: torch.device | str = "cpu",
    modules: Iterable[nn.Module] | None = None,
) -> None:
    """Give the meta-device parameters and buffers of ``modules`` (default: ``[model]``) real
    storage on ``device`` in their dtype: parameters from ``source`` under their names in
    ``model``, non-persistent buffers from ``model.fresh_buffers()``. One parameter is
    allocated and filled at a time; what is not in ``modules`` stays on meta (no memory).

    ``modules`` may be modules of ``model`` or holders of them (a pipeline layer holding a
    block's children and the RoPE tables): tensors are found by identity, so a holder's are
    named as in ``model``, and a tensor held twice (a tied weight) stays one tensor.

    Raises:
        ValueError: a meta parameter in ``modules`` is not one of ``model``'s.
    """
    names = parameter_names(model)
    buffer_names = {id(b): name for name, b in model.named_buffers(remove_duplicate=False)}
    fresh: dict[str, Tensor] | None = None
    # id(meta parameter) -> (it, kept alive so that ids stay unique; its replacement)
    done: dict[int, tuple[Tensor, nn.Parameter]] = {}
    for module in [model] if modules is None else modules:
        for owner in module.modules():
            for key, param in list(owner._parameters.items()):
                if param is None or (param.device.type != "meta" and id(param) not in done):
                    continue
                if id(param) not in done:
                    if id(param) not in names:
                        raise ValueError(f"{type(owner).__name__}.{key} is not a model parameter")
                    name = names[id(param)]
                    values = source(name, param.shape, 0, param.numel()).view(param.shape)
                    new = torch.empty(param.shape, dtype=param.dtype, device=device)
                    new.copy_(values)
                    done[id(param)] = (param, nn.Parameter(new, requires_grad=param.requires_grad))
                owner._parameters[key] = done[id(param)][1]
            for key, buf in list(owner._buffers.items()):
                if buf is None or buf.device.type != "meta":
                    continue
                if fresh is None:
                    fresh = model.fresh_buffers()
                value = fresh[buffer_names[id(buf)]]
                owner._buffers[key] = value.to(device=device, dtype=buf.dtype)
