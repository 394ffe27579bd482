"""torch.distributed set-up for stage two: one process per GPU under `torchrun` (gloo on CPU, NCCL on GPU).

Without torchrun's environment the same code runs as a single process, so `pipeline train` is one
command whether it runs on a laptop or on 32 GPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.errors import UsageError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def local_device(setting: str, key: str) -> torch.device:
    """A device setting (auto, cpu, cuda, cuda:N) of one process: auto = the GPU if there is one. A GPU asked
    for where none is visible is a usage error naming the key, not a CUDA traceback later."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"{key}: {setting!r}, but no CUDA GPU is visible here (torch.cuda.is_available() is "
                         "False); use auto or cpu")
    return torch.device(setting)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun job if there is one; pick this rank's device (its own GPU, or the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    local_device(device, "train.device")  # a GPU asked for where there is none: say so before anything starts
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device(f"cuda:{local_rank}") if use_cuda and device in ("auto", "cuda") else torch.device(
        device if device != "auto" else "cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":  # device_id: NCCL connects now, so a broken fabric fails here, not mid-step
            dist.init_process_group(backend="nccl", device_id=dev)
        else:
            dist.init_process_group(backend="gloo")
        _CPU_GROUP.append(dist.new_group(backend="gloo"))  # small host-side agreements, no GPU sync
    return DistInfo(rank, world, local_rank, dev)


_CPU_GROUP: list = []  # a gloo group beside NCCL, created with the job


def any_rank(values: list[int], info: DistInfo) -> list[int]:
    """The maximum of each value over the ranks, on the CPU (a stop request, a checkpoint that is due):
    every rank then takes the same decision at the same step, and no GPU stream is waited for."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.int64)  # [n] on the host
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CPU_GROUP[0] if _CPU_GROUP else None)
    return t.tolist()


def all_mean(values: list[float], info: DistInfo) -> list[float]:
    """Mean of each value over the ranks (for logging; a no-op on one process)."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)  # [n]
    dist.all_reduce(t)
    return (t / info.world_size).tolist()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def params_in_sync(model: torch.nn.Module, info: DistInfo) -> bool:
    """True if every rank holds the same parameters (DDP's promise, checked at the end of a run)."""
    if not info.enabled:
        return True
    local = torch.stack([p.detach().double().sum() for p in model.parameters()])  # [P]
    lo, hi = local.clone(), local.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
