"""Statistics averaged over torch.distributed ranks, so that data-parallel replicas agree."""
import torch


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over the ranks of the default process group (a copy), or `tensor`
    itself outside torch.distributed. Every replica then initialises ActNorm identically."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor
