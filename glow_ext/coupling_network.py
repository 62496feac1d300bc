"""The coupling layers' network, and its prepacked oneDNN path for inference on the CPU."""
import torch
from torch import nn

from .cache_invalidation import CachesDerivedTensors, cache_filled, cache_key

# oneDNN's fused inference convolutions (the ops Inductor's CPU freezing uses): CouplingNN's no-grad path.
_ONEDNN_INFERENCE = (torch.backends.mkldnn.is_available()
                     and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
                     and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight"))


class ZeroConv2d(nn.Module):
    """3x3 convolution (zero padding), zero-initialised, output scaled by exp(logscale_factor·logs)
    with a learned per-channel `logs` (the paper's zero-init last layer): starts as exactly 0."""

    def __init__(self, in_channels: int, out_channels: int, logscale_factor: float = 3.0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(out_channels))
        self.logscale_factor = logscale_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(self.conv(x))

    def scale(self, conv_out: torch.Tensor) -> torch.Tensor:
        """The learned per-channel output scale, applied to the convolution's output in its dtype
        (under autocast the network's output stays in reduced precision; the layer it feeds
        widens it)."""
        return conv_out * (self.logs * self.logscale_factor).exp().to(conv_out.dtype).view(1, -1, 1, 1)


class CouplingNN(CachesDerivedTensors, nn.Module):
    """The coupling network: 3x3 conv -> ReLU -> 1x1 conv -> ReLU -> ZeroConv2d (no ActNorm inside).

    The first two convolutions start from N(0, 0.05²) weights and zero biases; the last is zero, so
    the network's output starts at exactly 0. Without autograd on the CPU it runs oneDNN's inference
    convolutions on cached weights (see `_runs_prepacked`); `prepacked_inference = False` on an
    instance keeps it on the plain modules. An optimizer step, load_state_dict or a move to another
    device or dtype invalidates the cached weights (see glow_ext.cache_invalidation);
    `clear_cache()` drops them."""

    prepacked_inference = True
    _cache_attributes = ("_prepacked",)

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 512):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, hidden_channels, 1),
            nn.ReLU(),
            ZeroConv2d(hidden_channels, out_channels),
        )
        self.out_channels = out_channels
        for conv in (self.net[0], self.net[2]):
            nn.init.normal_(conv.weight, 0.0, 0.05)
            nn.init.zeros_(conv.bias)
        self._prepacked = None  # (key, weights) of the oneDNN inference path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] == 0 or x.shape[3] == 0:
            # conv2d refuses a 0-pixel-high or -wide input (padded, it is smaller than the kernel).
            return x.new_zeros((x.shape[0], self.out_channels, x.shape[2], x.shape[3]))
        if x.device.type == "cpu":
            # Channels-last (NHWC) is oneDNN's native layout: a whole training step, the layout
            # conversions included, runs faster than on NCHW data.
            x = x.contiguous(memory_format=torch.channels_last)
            if self._runs_prepacked(x):
                return self._forward_prepacked(x)
        return self.net(x)

    def _convs(self):
        return self.net[0], self.net[2], self.net[4].conv

    def _runs_prepacked(self, x: torch.Tensor) -> bool:
        """Without autograd (sampling, evaluation, reversible backprop's forward pass), float32 on
        the CPU: oneDNN's inference convolutions, with ReLU fused into the first two and the
        weights reordered once per parameter version and input shape instead of at every call.
        Sampling 16 CIFAR-10-sized images runs 1.17x faster at K=8, width 128 and 1.14x at K=32,
        width 512 (benchmarks/results/e2e-cpu.json, sample: ours against ours_unpacked). Hooks
        (the trainer's coupling dropout) need the modules called one by one, autocast its
        bfloat16 convolutions, and a network whose layers were swapped (another activation) its
        own layers, so they keep the plain path."""
        return (self.prepacked_inference and not torch.is_grad_enabled() and _ONEDNN_INFERENCE
                and torch.backends.mkldnn.enabled
                and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
                and not torch.compiler.is_compiling() and self._is_as_built()
                and all(conv.weight.dtype == torch.float32 for conv in self._convs())
                and not any(m._forward_hooks or m._forward_pre_hooks for m in self.net.modules())
                and not (nn.modules.module._global_forward_hooks
                         or nn.modules.module._global_forward_pre_hooks))

    def _is_as_built(self) -> bool:
        return ([type(m) for m in self.net] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU, ZeroConv2d]
                and type(self.net[4].conv) is nn.Conv2d
                and all(conv.padding_mode == "zeros" for conv in self._convs()))

    def _forward_prepacked(self, x: torch.Tensor) -> torch.Tensor:
        convs = self._convs()
        key = (tuple(x.shape), cache_key(self.parameters()))
        if self._prepacked is None or self._prepacked[0] != key:
            weights, size = [], list(x.shape)
            for conv in convs:
                weights.append(torch.ops.mkldnn._reorder_convolution_weight(
                    conv.weight, list(conv.padding), list(conv.stride), list(conv.dilation),
                    conv.groups, size))
                size = [size[0], conv.out_channels, size[2], size[3]]
            self._prepacked = (key, weights)
            cache_filled()
        h = x
        for conv, weight, post_op in zip(convs, self._prepacked[1], ("relu", "relu", "none")):
            h = torch.ops.mkldnn._convolution_pointwise(
                h, weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation),
                conv.groups, post_op, [], "")
        return self.net[4].scale(h)
