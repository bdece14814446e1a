"""Multi-process helpers for DDP under torchrun: rank/world, process group, reductions."""

from __future__ import annotations

import os

import torch

from scaler.errors import ScalerError


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed(device_name: str) -> None:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ScalerError("--distributed needs torchrun (RANK/WORLD_SIZE unset); see the README")
    if not torch.distributed.is_initialized():
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def reduce_stats(stepper, world: int) -> tuple[float, float]:
    """Mean training loss and accuracy (%) of the epoch over all ranks."""
    stats = torch.stack(
        [
            stepper.loss_sum,
            stepper.correct,
            torch.tensor(float(stepper.seen), dtype=torch.float64, device=stepper.loss_sum.device),
        ]
    )
    if world > 1:
        torch.distributed.all_reduce(stats)
    loss, correct, seen = stats.tolist()
    return loss / max(seen, 1), 100.0 * correct / max(seen, 1)


def gather_generator_states(gen: torch.Generator, world: int):
    """Every rank's attack-generator state (a list under DDP) so a resume restores each."""
    if world == 1:
        return gen.get_state()
    out = [None] * world
    torch.distributed.all_gather_object(out, gen.get_state())
    return out
