"""Process-group plumbing: single process by default, DDP when launched by torchrun."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from blip import factory


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def setup(device: str | None = None) -> torch.device:
    """Join the process group when torchrun set RANK/WORLD_SIZE (gloo on CPU, nccl on CUDA) and
    return this process's device."""
    dev = factory.default_device(device)  # CUDA when present; checks that an asked-for device exists
    use_cuda = dev.type == "cuda"
    local = int(os.environ.get("LOCAL_RANK", 0))
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not is_dist():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return torch.device("cuda", local) if use_cuda and dev.index is None else dev


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


def barrier() -> None:
    if is_dist():
        dist.barrier()


@torch.no_grad()
def gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` from every rank along dim 0 (no gradient), rank order."""
    if not is_dist():
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        parts = [torch.empty_like(t) for _ in range(world_size())]
        dist.all_gather(parts, t.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads):
        g = torch.stack(grads)
        dist.all_reduce(g)  # every rank's loss depends on this rank's slice
        return g[rank()]


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Like `gather`, but gradients flow back to each rank's own slice."""
    if not is_dist():
        return t
    return torch.cat(_GatherWithGrad.apply(t))


def mean_across(values: dict[str, float], device) -> dict[str, float]:
    """Average scalar logs over ranks."""
    if not is_dist() or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / world_size()).tolist()))


def any_across(flag: bool, device) -> bool:
    """True when any rank says so (used to stop uneven iterable streams together)."""
    if not is_dist():
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t)
    return bool(t.item())


def all_objects(obj) -> list:
    """`obj` from every rank (rank order)."""
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank src's picklable object on every rank (itself without a process group)."""
    if not is_dist():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]
