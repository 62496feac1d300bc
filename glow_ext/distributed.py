"""Statistics reduced over torch.distributed ranks, so that data-parallel replicas agree."""
import torch


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over the ranks of the default process group (a copy), or `tensor`
    itself outside torch.distributed. Masked statistics reduce sums and counts, so that ranks
    with different numbers of valid positions weigh by those numbers."""
    if _distributed():
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over the ranks of the default process group (a copy), or `tensor`
    itself outside torch.distributed. Every replica then initialises ActNorm identically."""
    if _distributed():
        return all_reduce_sum(tensor) / torch.distributed.get_world_size()
    return tensor
