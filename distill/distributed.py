"""Processes of one run under torchrun / accelerate launch: who this process is (``Dist``), the
process group (gloo on CPU, NCCL on GPU), FSDP2 sharding, and the few collectives the recipe needs.
One process (``Dist()``) is the default; every helper is a no-op there."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(device: str) -> Dist:
    """torchrun / accelerate launch set WORLD_SIZE, RANK, LOCAL_RANK; one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = "nccl" if device == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    return Dist(torch.distributed.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


def close(dist: Dist) -> None:
    if dist.world > 1:
        torch.distributed.destroy_process_group()


def shard_fsdp(model) -> None:
    """FSDP2: every decoder block is its own unit (gathered just in time, resharded after), then the root
    (embeddings, final norm, lm_head). Frozen parameters are sharded too; they just get no gradient."""
    from torch.distributed.fsdp import fully_shard

    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)


def is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def wrap_ddp(student, dist: Dist, device: str):
    """What the training forward runs: the student itself, or its DDP replica wrapper (several processes,
    not FSDP: an FSDP-sharded student is its own wrapper)."""
    if dist.world > 1 and not is_fsdp(student):
        return torch.nn.parallel.DistributedDataParallel(student,
                                                         device_ids=[dist.local_rank] if device == "cuda" else None)
    return student


def full_state(model, opt=None):
    """Full (unsharded) model and optimizer state dicts of an FSDP model on rank 0, CPU ({} elsewhere).
    A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=o), (get_optimizer_state_dict(model, opt, options=o) if opt else None)


def agree_on_stop(stopped: str, dist: Dist) -> str:
    """Rank 0 decides early stopping; every rank must leave the loop at the same step."""
    if dist.world == 1:
        return stopped
    flag = torch.tensor([1 if stopped else 0], device=_comm_device())
    torch.distributed.broadcast(flag, 0)
    return stopped or ("early stop (rank 0)" if int(flag) else "")


def sum_over_ranks(values: list[float], dist: Dist) -> list[float]:
    """Element-wise sum of ``values`` over all processes (float64; a collective when world > 1)."""
    if dist.world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    torch.distributed.all_reduce(t)
    return [float(v) for v in t.cpu()]


def _comm_device() -> str:
    """NCCL moves CUDA tensors only; gloo CPU ones."""
    return "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
