"""Data-parallel training through torch.distributed, as torchrun describes it in the environment.

One process per device: NCCL between GPUs, gloo between CPU processes. `strategy=ddp` replicates the
model (DistributedDataParallel averages gradients); `strategy=fsdp` shards parameters, gradients and
optimizer state with FSDP2 (`fully_shard` on every block, then on the model). Without torchrun the run
is one process; `strategy=fsdp` then makes a one-process group so the same code path runs.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .config import STRATEGIES, RecipeError

__all__ = ["Ranks", "init_ranks", "wrap_model", "gradient_sync", "launch_torchrun"]



@dataclass
class Ranks:
    """This process's place in the job, and the collectives the engine needs (no-ops for one process)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False   # this run made the process group, so it tears it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def sum(self, values: list[float]) -> list[float]:
        """Sums over ranks of a few floats (one all-reduce)."""
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def mean(self, values: list[float]) -> list[float]:
        return [v / self.world_size for v in self.sum(values)]

    def broadcast(self, obj):
        """rank 0's `obj` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world_size == 1:
            return
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and self.grouped:
            dist.destroy_process_group()


def _device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def init_ranks(requested_device: str, strategy: str) -> Ranks:
    """Join the job torchrun started (RANK, WORLD_SIZE, LOCAL_RANK), or run as a single process."""
    if strategy not in STRATEGIES:
        raise RecipeError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(requested_device, local_rank)
    if device.type == "cuda":
        if device.index >= torch.cuda.device_count():
            raise RecipeError(f"process {local_rank} of this machine wants {device}, but only "
                             f"{torch.cuda.device_count()} GPU(s) are visible: start at most that many processes")
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), device)
    if world_size > 1:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        return Ranks(dist.get_rank(), world_size, device, owns_group=True)
    if strategy == "fsdp":  # FSDP2 needs a process group even for one process
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return Ranks(0, 1, device, owns_group=True)
    return Ranks(0, 1, device)


def wrap_model(model: nn.Module, strategy: str, ranks: Ranks) -> nn.Module:
    """The model as the strategy trains it: FSDP2-sharded per block, DDP-replicated, or as it is."""
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        return fully_shard(model)
    if ranks.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[ranks.device.index] if ranks.device.type == "cuda" else None)
    return model


def gradient_sync(model: nn.Module, enabled: bool):
    """A context for one micro-batch's backward: gradients are reduced over ranks only when `enabled` (the last
    micro-batch of a step), so accumulation costs one reduction per step."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and not enabled:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """`zoo train ... --nproc N`: the same command under `torchrun --nproc_per_node N` (one node)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "zoo",
           *argv]
    print("running: " + " ".join(cmd[2:]), flush=True)
    return subprocess.call(cmd)
