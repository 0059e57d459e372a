"""Data-parallel setup under ``torchrun``: rank/world from the environment, gloo or nccl.

One process per device. Launch on one machine with ``torchrun --nproc_per_node N -m engine.cli
train ...``; across machines use torchrun's rendezvous (``--nnodes M --rdzv-backend c10d
--rdzv-endpoint HOST:PORT --rdzv-id RUN``). Without torchrun (no ``WORLD_SIZE``) the run is a
single process and no process group is created.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.errors import UserError


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job: rank, world size, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto", threads: int = 0) -> DistContext:
    """Read torchrun's environment, pick the device, join the process group when world > 1.

    ``device``: "auto" (CUDA when available), "cpu" or "cuda". gloo is used on CPU, nccl on
    CUDA. ``threads`` > 0 sets torch's intra-op CPU threads for this process.
    """
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("the preset asks for device 'cuda' but no CUDA device is available")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU (this machine has "
                            f"{torch.cuda.device_count()}); lower --nproc_per_node")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if threads > 0:
        torch.set_num_threads(threads)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(minutes=30),
                                **({"device_id": dev} if use_cuda else {}))
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Mean of each scalar over ranks (identity in a single process). Same keys on all ranks."""
    if not ctx.distributed or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    t /= ctx.world_size
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.distributed:
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_gather_tensor(t: torch.Tensor, ctx: DistContext) -> list[torch.Tensor]:
    """Each rank's copy of a same-shaped tensor, in rank order."""
    if not ctx.distributed:
        return [t]
    out = [torch.empty_like(t) for _ in range(ctx.world_size)]
    dist.all_gather(out, t.contiguous())
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
