"""Checkpoint weights read tensor by tensor: consolidation and publishing at bounded memory.

:func:`open_checkpoint` reads only the *layout* of a checkpoint's files (``torch.load`` with
``map_location="meta"``: shapes, dtypes and each storage's byte offset in its file, no data)
and returns a :class:`CheckpointTensors`, whose :meth:`~CheckpointTensors.read` reads one
parameter's bytes from the files with plain file reads into one new tensor. No file is memory
mapped, so nothing but the tensor being converted counts towards the process's resident memory.

Layouts (the keys and values DeepSpeed's ``zero_to_fp32`` and a pipeline checkpoint's layer
files give, key for key: ``tests/test_consolidate.py``;
:func:`trainer.checkpoint.load_model_weights` reads through this module):

- ZeRO stage 0: ``mp_rank_00_model_states.pt`` holds the module's state dict; a tensor is one
  contiguous byte range of it.
- ZeRO stages 1 and 2: each rank's ``*_optim_states.pt`` holds, per parameter group, one flat
  fp32 partition (``single_partition_of_fp32_groups``); the rank partitions of a group, laid end
  to end, are the group's parameters in ``param_shapes`` order, each followed by its
  ``param_alignment_paddings`` entry (DeepSpeed ``zero_to_fp32._zero2_merge_trainable_params``).
- ZeRO stage 3: every parameter is cut into ``ceil(numel / world_size)`` elements per rank (the
  last rank zero-padded); rank r's ``fp32_flat_groups`` hold its pieces of all parameters in
  ``param_shapes`` order, across the groups laid end to end (DeepSpeed
  ``zero_to_fp32._zero3_merge_trainable_params``).
- Pipeline: the plain model's keys live in the per-layer ``layer_XX-model_states.pt`` files
  (:func:`trainer.pipeline.key_map`).

The writer side is :func:`write_safetensors`: the safetensors format (an 8-byte little-endian
header length, a JSON header, the raw tensor bytes; https://github.com/huggingface/safetensors,
``README.md`` "Format") written one tensor at a time, byte for byte what
``safetensors.torch.save_file`` writes for the same tensors.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

# safetensors dtype names (safetensors/src/tensor.rs, `Dtype`); their order there is the order
# the Rust writer sorts by (larger alignment first), then by name.
SAFETENSORS_DTYPES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
}
_DTYPE_ORDER = {name: i for i, name in enumerate(SAFETENSORS_DTYPES.values())}
_FROM_SAFETENSORS = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


# -- reading byte ranges of torch.save files ----------------------------------------------------


@dataclass(frozen=True)
class _Slice:
    """``numel`` elements of ``dtype`` at byte ``offset`` of ``file`` (contiguous)."""

    file: Path
    offset: int
    numel: int
    dtype: torch.dtype


def _slice_of(file: Path, meta: Tensor, start: int = 0, numel: int | None = None) -> _Slice:
    """The file bytes of elements ``[start, start + numel)`` of a contiguous meta tensor loaded
    from ``file`` with ``map_location="meta"`` (torch records each storage's offset in the file
    as ``_checkpoint_offset``)."""
    assert meta.is_contiguous(), "checkpoint tensors are saved contiguous"
    numel = meta.numel() - start if numel is None else numel
    base = meta.untyped_storage()._checkpoint_offset
    offset = base + (meta.storage_offset() + start) * meta.element_size()
    return _Slice(file, offset, numel, meta.dtype)


def _read_into(out: Tensor, slices: Iterable[_Slice]) -> Tensor:
    """Fill the flat contiguous ``out`` with the slices' elements, in order (one file read each,
    straight into ``out``'s memory when the dtypes agree)."""
    flat = out.view(-1)
    pos = 0
    for s in slices:
        if s.numel == 0:
            continue
        target = flat[pos : pos + s.numel]
        buf = target if s.dtype == out.dtype else torch.empty(s.numel, dtype=s.dtype)
        with open(s.file, "rb") as f:
            f.seek(s.offset)
            view = memoryview(buf.view(torch.uint8).numpy())
            if f.readinto(view) != len(view):
                raise ValueError(f"{s.file} ends before byte {s.offset + len(view)}: truncated")
        if buf is not target:
            target.copy_(buf)
        pos += s.numel
    assert pos == flat.numel(), f"read {pos} of {flat.numel()} elements"
    return out


def _load_meta(file: Path, *, weights_only: bool = True):
    """A torch.save file's objects with every tensor on the meta device (reads no tensor data)."""
    with contextlib.redirect_stdout(sys.stderr):
        return torch.load(file, map_location="meta", weights_only=weights_only)


# -- the checkpoint, tensor by tensor ---------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    shape: torch.Size
    dtype: torch.dtype  # as stored
    slices: tuple[_Slice, ...]


class CheckpointTensors:
    """The plain model's weights of one checkpoint, readable one tensor at a time.

    Keys are Kiln's plain model keys in the order the checkpoint lists them (ZeRO 0: the module
    state dict; ZeRO 1-3: buffers, then ``param_shapes``, then shared parameters, as
    ``zero_to_fp32``; pipeline: the plain state dict's); a tied head is an alias of the
    embedding (:meth:`source`). Build with :func:`open_checkpoint`.
    """

    def __init__(self, ckpt: Path, entries: dict[str, _Entry], aliases: dict[str, str]) -> None:
        self.ckpt = ckpt
        self._entries = entries
        self._aliases = aliases  # key -> the key whose tensor it is (shared parameters)

    def names(self) -> list[str]:
        """Every key, in the checkpoint's order (see the class docstring)."""
        return list(self._order)

    @property
    def _order(self) -> Iterator[str]:
        yield from self._entries
        yield from (k for k in self._aliases if k not in self._entries)

    def source(self, key: str) -> str:
        """The key whose bytes hold ``key`` (itself, or the parameter it shares)."""
        return self._aliases.get(key, key)

    def shape(self, key: str) -> torch.Size:
        """The tensor's shape."""
        return self._entries[self.source(key)].shape

    def stored_dtype(self, key: str) -> torch.dtype:
        """The dtype the checkpoint holds ``key`` in (fp32 master weights under ZeRO 1-3)."""
        return self._entries[self.source(key)].dtype

    def numel(self) -> int:
        """Elements over all distinct tensors (a shared tensor counted once)."""
        return sum(e.shape.numel() for e in self._entries.values())

    def read(self, key: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """One tensor, read from the files into new CPU memory, as ``dtype``.

        Returns:
            a contiguous tensor of :meth:`shape`; floating tensors are cast to ``dtype``
            (default fp32, as DeepSpeed's ``zero_to_fp32`` gives them), others kept.

        Raises:
            KeyError: no such key.
            ValueError: a file is shorter than its own index says (truncated).
        """
        entry = self._entries[self.source(key)]
        out = torch.empty(entry.shape, dtype=entry.dtype)
        _read_into(out, entry.slices)
        return out.to(dtype) if out.is_floating_point() else out


def open_checkpoint(ckpt: Path) -> CheckpointTensors:
    """Index a complete checkpoint of any layout (ZeRO 0-3 of any number of ranks, pipeline
    stages) for :meth:`CheckpointTensors.read`; reads the files' pickled structure, no weights.

    Raises:
        FileNotFoundError: a file the layout needs is missing.
        ValueError: the files disagree with each other (element counts, rank counts).
    """
    from trainer.checkpoint import read_trainer_state

    ckpt = Path(ckpt)
    state = read_trainer_state(ckpt)
    if state.get("pipeline_stages", 1) > 1:
        from trainer.config import config_from_dict

        return _open_pipeline(ckpt, config_from_dict(state["config"]).derived.model)
    if state["zero_stage"] == 0:
        return _open_module_states(ckpt)
    return _open_zero(ckpt)


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a complete checkpoint")
    return path


def _open_module_states(ckpt: Path) -> CheckpointTensors:
    file = _require(ckpt / "mp_rank_00_model_states.pt")
    module = _load_meta(file)["module"]
    entries = {k: _Entry(v.shape, v.dtype, (_slice_of(file, v),)) for k, v in module.items()}
    return CheckpointTensors(ckpt, entries, {})


def _open_pipeline(ckpt: Path, cfg) -> CheckpointTensors:
    from trainer.pipeline import key_map

    layers: dict[int, tuple[Path, dict[str, Tensor]]] = {}
    entries: dict[str, _Entry] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple[int, str], str] = {}
    for plain, (idx, key) in key_map(cfg).items():
        if idx not in layers:
            files = sorted(ckpt.glob(f"layer_{idx:02d}-*model_states.pt"))
            if not files:
                raise FileNotFoundError(
                    f"{ckpt} has no layer_{idx:02d}-*model_states.pt: not a complete pipeline "
                    f"checkpoint of this model"
                )
            layers[idx] = (files[0], _load_meta(files[0]))
        if (idx, key) in first:  # a tied head: the embedding's tensor again
            aliases[plain] = first[(idx, key)]
            continue
        first[(idx, key)] = plain
        file, sd = layers[idx]
        t = sd[key]
        entries[plain] = _Entry(t.shape, t.dtype, (_slice_of(file, t),))
    return CheckpointTensors(ckpt, entries, aliases)


def _open_zero(ckpt: Path) -> CheckpointTensors:
    """ZeRO 1-3: the fp32 master partitions of every rank (DeepSpeed's ``zero_to_fp32`` layout,
    see the module docstring), with the module-states file for names, shapes and sharing."""
    model_files = sorted(ckpt.glob("*model_states.pt"))
    if not model_files:
        raise FileNotFoundError(f"{ckpt} holds no *model_states.pt: not a complete checkpoint")
    model_states = _load_meta(model_files[0])
    optim_files = sorted(ckpt.glob("*_optim_states.pt"), key=_rank_of)
    if not optim_files:
        raise FileNotFoundError(f"{ckpt} holds no *_optim_states.pt: not a ZeRO checkpoint")
    # DeepSpeed pickles its own objects (ZeroStageEnum, loss scaler) beside the tensors: these are
    # the run's own files, read as DeepSpeed's zero_to_fp32 reads them.
    optim = [_load_meta(f, weights_only=False)["optimizer_state_dict"] for f in optim_files]
    stage = int(optim[0]["zero_stage"])
    world = optim[0]["partition_count"]
    world = max(world) if isinstance(world, list) else int(world)
    if world != len(optim_files):
        raise ValueError(
            f"{ckpt} holds {len(optim_files)} *_optim_states.pt but was written by {world} "
            f"ranks: not a complete checkpoint"
        )
    frozen = model_states.get("frozen_param_shapes")
    assert not frozen, f"Kiln trains every parameter; {ckpt} has frozen ones: {list(frozen)}"
    groups = [list(group.items()) for group in model_states["param_shapes"]]
    if stage <= 2:
        flats = [
            [(f, t) for t in o["single_partition_of_fp32_groups"]]
            for f, o in zip(optim_files, optim, strict=True)
        ]
        entries = _zero12_entries(groups, flats, optim[0].get("param_alignment_paddings"), world)
    else:
        flats = [
            [(f, t) for t in o["fp32_flat_groups"]] for f, o in zip(optim_files, optim, strict=True)
        ]
        entries = _zero3_entries(groups, flats, world)
    buffers = set(model_states.get("buffer_names") or ())
    buffer_entries = {
        k: _Entry(v.shape, v.dtype, (_slice_of(model_files[0], v),))
        for k, v in model_states["module"].items()
        if k in buffers
    }
    aliases = {
        alias: source
        for alias, source in model_states["shared_params"].items()
        if source in entries or source in buffer_entries
    }
    return CheckpointTensors(ckpt, {**buffer_entries, **entries}, aliases)


def _rank_of(path: Path) -> int:
    # zero_pp_rank_R_mp_rank_00_optim_states.pt (or bf16_zero_pp_rank_R...)
    parts = path.name.split("_")
    return int(parts[parts.index("rank") + 1])


def _zero12_entries(groups, flats, paddings, world: int) -> dict[str, _Entry]:
    entries = {}
    for g, shapes in enumerate(groups):
        parts = [flats[r][g] for r in range(world)]  # (file, meta flat partition) per rank
        total = sum(t.numel() for _, t in parts)
        offset = 0
        for i, (name, shape) in enumerate(shapes):
            shape = torch.Size(shape)
            entries[name] = _Entry(shape, torch.float32, tuple(_span(parts, offset, shape.numel())))
            offset += shape.numel() + (paddings[g][i] if paddings is not None else 0)
        align = 2 * world  # zero_to_fp32's check: both ends align to 2 x world size
        if align * math.ceil(offset / align) != align * math.ceil(total / align):
            raise ValueError(f"ZeRO group {g}: parameters take {offset} of {total} elements")
    return entries


def _zero3_entries(groups, flats, world: int) -> dict[str, _Entry]:
    entries = {}
    offset = 0
    for shapes in groups:
        for name, shape in shapes:
            shape = torch.Size(shape)
            per_rank = math.ceil(shape.numel() / world)
            slices: list[_Slice] = []
            left = shape.numel()
            for r in range(world):
                take = min(per_rank, left)
                slices += _span(flats[r], offset, take)
                left -= take
            entries[name] = _Entry(shape, torch.float32, tuple(slices))
            offset += per_rank
    available = sum(t.numel() for _, t in flats[0])
    if offset != available:
        raise ValueError(
            f"ZeRO-3 partitions hold {available} elements per rank; the parameters take {offset}"
        )
    return entries


def _span(parts: list[tuple[Path, Tensor]], start: int, numel: int) -> list[_Slice]:
    """Slices covering elements ``[start, start + numel)`` of ``parts`` laid end to end."""
    out = []
    base = 0
    for file, t in parts:
        lo, hi = max(start, base), min(start + numel, base + t.numel())
        if lo < hi:
            out.append(_slice_of(file, t, lo - base, hi - lo))
        base += t.numel()
    if sum(s.numel for s in out) != numel:
        raise ValueError(f"elements [{start}, {start + numel}) run past the partitions ({base})")
    return out


# -- safetensors, one tensor at a time --------------------------------------------------------


def safetensors_header(
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None
) -> tuple[bytes, list[str]]:
    """The header bytes (length prefix included) of a safetensors file of ``tensors`` (name ->
    (dtype, shape)) and the order their data follows it in: by dtype (larger first, as the
    Rust writer's ``Dtype`` order), then by name; the JSON padded with spaces to 8 bytes."""
    order = sorted(tensors, key=lambda k: (-_DTYPE_ORDER[SAFETENSORS_DTYPES[tensors[k][0]]], k))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    pos = 0
    for name in order:
        dtype, shape = tensors[name]
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [pos, pos + nbytes],
        }
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, order


def write_safetensors(
    path: Path,
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], Tensor],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write a safetensors file holding one tensor at a time in memory.

    Args:
        tensors: name -> (dtype, shape) of every tensor the file holds.
        produce: name -> the tensor (CPU, that dtype and shape); called once per name, in the
            file's order, and dropped once written.
        metadata: the header's ``__metadata__`` (``{"format": "pt"}`` for transformers).

    Returns:
        the file's size in bytes.

    Raises:
        ValueError: ``produce`` returned a tensor of another dtype or shape.
    """
    head, order = safetensors_header(tensors, metadata)
    with open(path, "wb") as f:
        f.write(head)
        for name in order:
            t = produce(name)
            dtype, shape = tensors[name]
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(
                    f"{name}: got {t.dtype} {tuple(t.shape)}, the header says {dtype} {shape}"
                )
            f.write(memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy()))
            del t
        return f.tell()


class SafetensorsFolder:
    """Tensors of a folder's safetensors files (``model.safetensors`` or the shards of
    ``model.safetensors.index.json``), read one at a time with plain file reads (no mapping).

    Raises:
        FileNotFoundError: no weights file, or a shard the index names is missing.
        ValueError: a header is not valid safetensors.
    """

    def __init__(self, folder: Path) -> None:
        from model.hf_checkpoint import weight_files

        files = weight_files(folder)
        if not files:
            raise FileNotFoundError(f"{folder} holds no model.safetensors (or index)")
        self.where: dict[str, tuple[Path, int, str, list[int]]] = {}
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{file} (named by the index) is missing")
            with open(file, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, _ = info["data_offsets"]
                self.where[name] = (file, 8 + n + begin, info["dtype"], info["shape"])

    def names(self) -> list[str]:
        """Every tensor name over all files."""
        return list(self.where)

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of ``name``."""
        return _FROM_SAFETENSORS[self.where[name][2]]

    def read(self, name: str) -> Tensor:
        """One tensor as stored (dtype and shape), in new CPU memory."""
        file, offset, dtype, shape = self.where[name]
        out = torch.empty(shape, dtype=_FROM_SAFETENSORS[dtype])
        return _read_into(out, [_Slice(file, offset, out.numel(), out.dtype)])


def consolidate(ckpt: Path, out: Path) -> tuple[int, int]:
    """``kiln checkpoint consolidate``: the plain model's fp32 state dict of a checkpoint of any
    layout written to one safetensors file, one tensor in memory at a time. The file is byte for
    byte ``safetensors.torch.save_file`` of the whole state dict (a tied head stored as its own
    copy, as safetensors holds no shared tensors), with the metadata
    ``{"checkpoint": str(ckpt)}``.

    Returns:
        (tensors written, elements over them).

    Raises:
        FileNotFoundError, ValueError: as :func:`open_checkpoint`.
    """
    weights = open_checkpoint(ckpt)
    layout = {}
    for key in weights.names():
        stored = weights.stored_dtype(key)
        dtype = torch.float32 if stored.is_floating_point else stored  # as read() gives it
        layout[key] = (dtype, tuple(weights.shape(key)))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(out, layout, weights.read, metadata={"checkpoint": str(ckpt)})
    return len(layout), sum(math.prod(shape) for _, shape in layout.values())


# -- models whose parameters stay on the meta device --------------------------------------------


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within it, every parameter a module registers moves to the meta device while buffers stay
    where they are made (as accelerate's ``init_empty_weights(include_buffers=False)``): a model
    built here holds its computed buffers (RoPE tables) and no weights."""
    register = nn.Module.register_parameter

    def to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = to_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


@contextlib.contextmanager
def materialised(params: dict[nn.Module, dict[str, Tensor]]) -> Iterator[None]:
    """Give modules real parameters for the duration: ``params`` maps a module to its own
    parameters (name -> tensor); the meta parameters are put back afterwards, so the tensors
    are freed when the caller drops them."""
    saved = {m: {n: m._parameters[n] for n in ps} for m, ps in params.items()}
    try:
        for module, ps in params.items():
            for name, tensor in ps.items():
                module._parameters[name] = nn.Parameter(tensor, requires_grad=False)
        yield
    finally:
        for module, ps in saved.items():
            module._parameters.update(ps)
