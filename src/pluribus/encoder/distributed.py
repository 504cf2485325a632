"""Data-parallel training across processes (``torchrun``): rank/world from the environment, gathers, grad sync.

The global micro-batch is split across ranks; embeddings are all-gathered *with gradients*
(``torch.distributed.nn.functional.all_gather``) so every rank computes the same InfoNCE over all in-batch
negatives. That gather's backward sums the W identical loss gradients, so each rank's parameter gradient is W
times its share; averaging gradients over ranks once per optimizer step (one flat all-reduce) then gives exactly
the one-process gradient. Two towers per step run through ``UserEncoder.embed``, not ``forward``, which is why
gradients are synchronised here rather than by the ``DistributedDataParallel`` wrapper's forward hooks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from pluribus.errors import ConfigError


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, or (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> tuple[int, int]:
    """Join the process group ``torchrun`` describes (WORLD_SIZE > 1): gloo on CPU, nccl on GPU; (rank, world)."""
    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or dist.is_initialized():
        return world()
    if "MASTER_ADDR" not in os.environ or "RANK" not in os.environ:
        raise ConfigError(f"WORLD_SIZE={size} but RANK/MASTER_ADDR are not set; launch with torchrun --nproc_per_node N")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return world()


def check_divisible(batch_size: int, size: int) -> None:
    """The global micro-batch must split evenly over the ranks (ConfigError otherwise)."""
    if batch_size % size:
        raise ConfigError(
            f"train.batch_size={batch_size} (the global micro-batch) is not divisible by the {size} ranks of this "
            f"launch; use a multiple of {size}"
        )


def shard(indices: Sequence[int], rank: int, size: int) -> list[int]:
    """This rank's contiguous slice of a global micro-batch (rank order = the one-process row order)."""
    per = len(indices) // size
    return list(indices[rank * per : (rank + 1) * per])


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Rows of every rank, concatenated in rank order, differentiable (identity in one process)."""
    rank, size = world()
    if size == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(list(all_gather(x)), dim=0)


def gather_padded(x: torch.Tensor) -> torch.Tensor:
    """``[b, L_rank]`` rows of every rank, right-padded with zeros to the longest L (no gradient)."""
    import torch.distributed as dist

    rank, size = world()
    if size == 1:
        return x
    length = torch.tensor([x.shape[1]], dtype=torch.long)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    padded = torch.nn.functional.pad(x.detach().cpu(), (0, int(length) - x.shape[1]))
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat(parts, dim=0)


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Average ``.grad`` over ranks in one flat all-reduce (no-op in one process)."""
    import torch.distributed as dist

    rank, size = world()
    if size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    import torch.distributed as dist

    if world()[1] > 1:
        dist.barrier()
