"""Where this process stands in torch.distributed, and the collectives fastmix's parts share.

Every function works without a process group too: one rank of a world of one."""
import torch
import torch.distributed as dist


def rank_and_world():
    """(rank, world size) of this process: (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def world_size():
    return rank_and_world()[1]


def all_reduce_sum(tensor):
    """The sum of `tensor` over the ranks, as a new tensor (`tensor` itself is left as it is)."""
    if world_size() == 1:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor


def all_gather_stacked(tensor):
    """(world, *shape): every rank's `tensor`, on every rank."""
    world = world_size()
    if world == 1:
        return tensor[None].clone()
    if dist.get_backend() == "nccl":  # CUDA tensors only (a window restored from a checkpoint is on the CPU)
        tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)
