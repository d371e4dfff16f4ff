"""Process-group set-up that works the same under torchrun, srun, the deepspeed launcher, a Ray
worker or a bare ``python`` (a world of one).

On machines without CUDA, DeepSpeed's CPU accelerator and the gloo backend are selected; this
must happen before ``deepspeed`` is first imported, so call :func:`select_accelerator` early.
"""

from __future__ import annotations

import os
import platform
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def select_accelerator() -> str:
    """Pick DeepSpeed's accelerator: CUDA when a GPU is visible, else CPU. Returns it."""
    if "DS_ACCELERATOR" not in os.environ:
        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    return os.environ["DS_ACCELERATOR"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> World:
    """Join (or create) the default process group from the launcher's environment variables.

    Reads ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE`` as torchrun sets them;
    with none set it starts a world of one on a free local port. Uses NCCL on CUDA, gloo on CPU.
    """
    accelerator = select_accelerator()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if accelerator == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # Share the cores between the processes of this node instead of oversubscribing them.
        threads = max(1, (os.cpu_count() or 1) // local_world_size)
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(threads)
        # DeepSpeed's comm backend compiles its shared-memory collectives on the CPU accelerator
        # when it starts (~45 s on 2 cores, again in every new environment); they serve only its
        # inference all-reduce, training goes through torch.distributed (gloo): skip the build.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(
            dist_backend="nccl" if accelerator == "cuda" else "gloo", verbose=False
        )
    return World(rank, local_rank, world_size, local_world_size, device)


def hardware(world: World) -> dict[str, str | int]:
    """What the run trains on, for the record (trainer state, model card): the accelerator
    (``cuda`` | ``cpu``), a readable device description, processes and processes per node."""
    if world.device.type == "cuda":
        name = f"{world.world_size} x {torch.cuda.get_device_name(world.device)}"
    else:
        name = f"{world.world_size} CPU processes ({platform.processor() or platform.machine()})"
    nodes = max(1, world.world_size // world.local_world_size)
    return {
        "accelerator": world.device.type,
        "device_name": f"{name} on {nodes} node{'s' if nodes > 1 else ''}",
        "processes": world.world_size,
        "processes_per_node": world.local_world_size,
    }


def all_reduce_sum(values: list[float] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum a small vector over all ranks (fp64 so token and byte counts stay exact)."""
    t = torch.as_tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` (any picklable value) on every rank; ``obj`` itself without a group."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def close() -> None:
    """Tear the process group down (a 2-process gloo run that skips this can crash at exit)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
