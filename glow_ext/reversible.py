"""Reversible backprop through a sequence of Glow flow steps (`Glow(..., reversible=True)`).

The forward pass runs the steps without recording a graph and keeps only the output of the
sequence. The backward pass walks the steps from the top down: each step's input is reconstructed
from its output with the inverse kernels, the step's graph is rebuilt from that input, and the
gradient is pushed through that one step. Activation memory is therefore that of one step, not of K.

Per step in the backward pass the coupling network runs once: its input (the passive half) passes
through the coupling unchanged, so a single pass both inverts the coupling and rebuilds its graph
(`_Coupling.rebuild`). ActNorm and the 1x1 convolution are inverted by their inverse ops and rerun
forward. A training step then costs about 4 network passes instead of 3.

Randomness: when any module of the steps may draw random numbers in training (a dropout module, or
a forward hook, which is how glow_ext.training adds coupling dropout), the RNG state of the input's
device is saved before each step and restored for its recomputation, so dropout masks match. These
states are saved for backward like any tensor and show in memory measurements (5 kB per step for
the CPU generator). Autocast is re-entered with the forward pass's settings.
"""
from typing import List, Sequence

import torch
from torch import nn

from .nn import FlowStep

__all__ = ["reversible_steps", "saved_tensor_bytes"]


def _uses_randomness(steps: Sequence[nn.Module]) -> bool:
    for step in steps:
        if not step.training:
            continue
        for module in step.modules():
            if (isinstance(module, nn.modules.dropout._DropoutNd) or module._forward_hooks
                    or module._forward_pre_hooks):
                return True
    return False


def _get_rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _grads(outputs, inputs, grad_outputs):
    """torch.autograd.grad over the outputs that are part of a graph; None for unused inputs."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
    return torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs],
                               allow_unused=True)


def _accumulate(total: List, index: List[int], grads) -> None:
    for i, g in zip(index, grads):
        if g is not None:
            total[i] = g if total[i] is None else total[i] + g


class _ReversibleSteps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, steps, param_index, *params):
        ctx.steps, ctx.param_index = steps, param_index
        ctx.device = x.device
        ctx.autocast = (torch.is_autocast_enabled(x.device.type),
                        torch.get_autocast_dtype(x.device.type))
        rng_states = []
        save_rng = _uses_randomness(steps)
        h, logdet = x, x.new_zeros(x.shape[0])
        for step in steps:
            if save_rng:
                rng_states.append(_get_rng_state(x.device))
            h, step_logdet = step(h)
            logdet = logdet + step_logdet
        ctx.save_for_backward(h, *rng_states)
        ctx.n_params = len(params)
        return h, logdet

    @staticmethod
    def backward(ctx, grad_h, grad_logdet):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "glow_ext: a reversible Glow does not support double backward (create_graph=True); "
                "build the model with reversible=False for higher-order gradients")
        h, *rng_states = ctx.saved_tensors
        if grad_h is None:
            grad_h = torch.zeros_like(h)
        if grad_logdet is None:
            grad_logdet = h.new_zeros(h.shape[0])
        param_grads = [None] * ctx.n_params
        enabled, dtype = ctx.autocast
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=bool(rng_states)), \
                torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled), \
                torch.enable_grad():
            for k in reversed(range(len(ctx.steps))):
                step, index = ctx.steps[k], ctx.param_index[k]
                if rng_states:
                    _set_rng_state(rng_states[k], ctx.device)
                h, grad_h = _step_backward(step, h, grad_h, grad_logdet, index, param_grads)
        return (grad_h, None, None, *param_grads)


def _step_backward(step: FlowStep, y, grad_y, grad_logdet, index, param_grads):
    """Reconstructs the step's input from its output y and backpropagates through the step alone.
    Returns (input, gradient of the input); adds the parameters' gradients to param_grads."""
    coupling = step.coupling
    coupling_params = [p for p in coupling.parameters() if p.requires_grad]
    in_coupling = {id(p) for p in coupling_params}
    other_params = [p for p in step.parameters() if p.requires_grad and id(p) not in in_coupling]
    grad_y_a, grad_y_b = grad_y[:, :coupling.passive], grad_y[:, coupling.passive:]

    u_a, u_b, y_b, logdet = coupling.rebuild(y)
    grads = _grads([y_b, logdet], [u_a, u_b, *coupling_params], [grad_y_b, grad_logdet])
    grad_u_a = grad_y_a if grads[0] is None else grads[0] + grad_y_a
    grad_u = torch.cat([grad_u_a, grads[1]], dim=1)
    _accumulate(param_grads, [index[id(p)] for p in coupling_params], grads[2:])

    with torch.no_grad():
        x = step.unpermute_and_denormalize(torch.cat([u_a, u_b], dim=1))
    x = x.detach().requires_grad_()
    u, logdet = step.normalize_and_permute(x)
    grads = _grads([u, logdet], [x, *other_params], [grad_u, grad_logdet])
    _accumulate(param_grads, [index[id(p)] for p in other_params], grads[1:])
    grad_x = grads[0] if grads[0] is not None else torch.zeros_like(x)
    return x.detach(), grad_x


def reversible_steps(steps: Sequence[FlowStep], x: torch.Tensor):
    """(y, logdet (N,)) of the flow steps applied in order, with reversible backprop: only y is
    kept for the backward pass. Every step must be a FlowStep with initialised ActNorm."""
    params, param_index = [], []
    seen = {}
    for step in steps:
        if not isinstance(step, FlowStep):
            raise TypeError(f"reversible backprop needs FlowStep layers, got {type(step).__name__}")
        index = {}
        for p in step.parameters():
            if p.requires_grad:
                if id(p) not in seen:
                    seen[id(p)] = len(params)
                    params.append(p)
                index[id(p)] = seen[id(p)]
        param_index.append(index)
    return _ReversibleSteps.apply(x, list(steps), param_index, *params)


def saved_tensor_bytes(fn, *args, exclude=(), **kwargs):
    """(result of fn(*args, **kwargs), bytes of the storages of every tensor autograd saved for
    backward during the call): a deterministic measure of activation memory. A storage is counted
    once however many views of it are saved; storages of the tensors in `exclude` (e.g. the
    model's parameters, which autograd saves like any input) are not counted. The storages are held
    until the call returns, so no address is reused meanwhile."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn(*args, **kwargs)
    return result, sum(storage.nbytes() for storage in storages.values())
