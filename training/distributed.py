"""Data parallelism over the processes torchrun starts: the process group, each rank's seed, the DDP wrapper, and
the few collective steps the loop needs (averaged metrics, every rank's RNG in rank 0's checkpoint)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Ranks:
    """This process's place among the data-parallel ones (rank 0 of 1 when torchrun did not start it)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the checkpoints, the loss log, the final weights and the progress bar."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    def seed(self, seed: int) -> int:
        """The seed of this rank's draws (crops, noise, timesteps): rank 0 keeps the config's, so a one-process
        run draws exactly what it drew before data parallelism existed."""
        return seed + self.rank


def init_ranks() -> Ranks:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR/PORT in the environment):
    NCCL on CUDA, gloo on the CPU. Without torchrun, one rank and no process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Ranks()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size())


def require_one_process(recipe: str) -> None:
    """Refuse a torchrun launch of a recipe that has no data parallelism (each rank would write the same files)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"the {recipe} recipe runs on one process; start it without torchrun")


def train_device(name: str) -> torch.device:
    """'cpu', or for 'cuda' the GPU torchrun gave this process (LOCAL_RANK), which becomes the current one."""
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked, but torch sees no CUDA GPU")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def data_parallel(ranks: Ranks, module: nn.Module) -> nn.Module:
    """The module as the training step should call it: wrapped in DistributedDataParallel across ranks (which
    starts every rank from rank 0's weights and averages gradients during backward), else itself."""
    if not ranks.parallel:
        return module
    device = next(module.parameters()).device
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def replicate(ranks: Ranks, module: nn.Module) -> None:
    """Give every rank rank 0's weights: for a module trained outside DDP (the discriminator heads)."""
    if ranks.parallel:
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def average_gradients(ranks: Ranks, params: list[nn.Parameter]) -> None:
    """Average the gradients of a module trained outside DDP over the ranks, in one all-reduce."""
    if not ranks.parallel:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= ranks.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def mean_metrics(ranks: Ranks, metrics: dict[str, float]) -> dict[str, float]:
    """A step's logged scalars averaged over the ranks (rank 0 logs them; every rank gets the same means)."""
    if not ranks.parallel or not metrics:
        return metrics
    values = torch.tensor(list(metrics.values()), dtype=torch.float64)
    dist.all_reduce(values)
    return dict(zip(metrics, (values / ranks.world_size).tolist(), strict=True))


def gather_to_main(ranks: Ranks, value: Any) -> list[Any] | None:
    """Every rank's `value`, in rank order, on rank 0 (None elsewhere); [value] with one rank."""
    if not ranks.parallel:
        return [value]
    gathered: list[Any] | None = [None] * ranks.world_size if ranks.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def barrier(ranks: Ranks) -> None:
    if ranks.parallel:
        dist.barrier()
