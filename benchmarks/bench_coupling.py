#!/usr/bin/env python3
"""The fused affine coupling op against the plain PyTorch formulation it replaced in AffineCoupling.

Two measurements, the methods interleaved within one process (medians, with the interquartile range):
  elementwise  the coupling's arithmetic alone, forward and forward+backward, at the coupling shapes
               of a Glow with K=8, L=3, width 128, batch 16 on 3x32x32 images (x_b a channel slice,
               as in the layer);
  step         forward + bits/dim loss + backward of that whole Glow, one model and one batch, its
               AffineCoupling switched between the op and the plain formulation (same weights, same
               loss: checked before timing). The optimizer step does not involve the coupling.

    python benchmarks/bench_coupling.py [--reps 41] [--out benchmarks/results]

Writes coupling-cpu-<threads>threads.json.
"""
import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
if (HERE.parent / "glow_ext" / "__init__.py").is_file():
    sys.path.insert(0, str(HERE.parent))

import glow_ext  # noqa: E402
from glow_ext import coupling_ops  # noqa: E402
from glow_ext.bench.common import build_description  # noqa: E402
from glow_ext.models import Glow  # noqa: E402
from glow_ext.nn import AffineCoupling  # noqa: E402

BATCH, IMAGE, K, L, WIDTH = 16, 32, 8, 3, 128
# x_b of each level's couplings: (C_active, H) with C = 12, 24, 48 channels after each squeeze.
LEVELS = [(6, 16), (12, 8), (24, 4)]


def plain_coupling(x_b, h):
    """The formulation AffineCoupling used before the op (glow_ext 0.1.0)."""
    c = x_b.shape[1]
    log_scale = F.logsigmoid(h[:, c:] + 2.0)
    return (x_b + h[:, :c]) * log_scale.exp(), log_scale.flatten(1).sum(1)


def plain_coupling_inverse(y_b, h):
    c = y_b.shape[1]
    return y_b * (-F.logsigmoid(h[:, c:] + 2.0)).exp() - h[:, :c]


def summary(times):
    q = statistics.quantiles(times, n=4)
    return {"median_ms": statistics.median(times) * 1e3, "q1_ms": q[0] * 1e3, "q3_ms": q[2] * 1e3}


def interleaved(fns, reps, inner):
    """{name: summary} of `inner` calls per measurement, the methods alternating."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm up
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner)
    return {name: summary(t) for name, t in times.items()}


def elementwise(reps):
    rows = []
    for c, size in LEVELS:
        u = torch.randn(BATCH, 2 * c, size, size)
        h = torch.randn(BATCH, 2 * c, size, size)
        x_b = u[:, c:]
        grad_y, grad_logdet = torch.randn(BATCH, c, size, size), torch.randn(BATCH)
        x_leaf, h_leaf = x_b.detach().requires_grad_(), h.detach().requires_grad_()

        def fwd_bwd(fn):
            y_b, logdet = fn(x_leaf, h_leaf)
            torch.autograd.backward([y_b, logdet], [grad_y, grad_logdet])
            x_leaf.grad = h_leaf.grad = None

        for name, fns in (
                ("forward", {"op": lambda: coupling_ops.affine_coupling(x_b, h),
                             "plain": lambda: plain_coupling(x_b, h)}),
                ("forward+backward", {"op": lambda: fwd_bwd(coupling_ops.affine_coupling),
                                      "plain": lambda: fwd_bwd(plain_coupling)}),
                ("inverse", {"op": lambda: coupling_ops.affine_coupling_inverse(x_b, h),
                             "plain": lambda: plain_coupling_inverse(x_b, h)})):
            result = interleaved(fns, reps, inner=20)
            rows.append({"x_b": [BATCH, c, size, size], "pass": name, **result,
                         "speedup": result["plain"]["median_ms"] / result["op"]["median_ms"]})
            print(f"  x_b {BATCH}x{c}x{size}x{size} {name:17s} op {result['op']['median_ms']:.4f} ms, "
                  f"plain {result['plain']['median_ms']:.4f} ms: {rows[-1]['speedup']:.2f}x", flush=True)
    return rows


def use_plain(enabled):
    if enabled:
        AffineCoupling._transform = lambda self, x_b, h: plain_coupling(x_b, h)
        AffineCoupling._untransform = lambda self, y_b, h: plain_coupling_inverse(y_b, h)
    else:
        for name in ("_transform", "_untransform"):
            setattr(AffineCoupling, name, ORIGINAL[name])


ORIGINAL = {name: getattr(AffineCoupling, name) for name in ("_transform", "_untransform")}


def glow_step(reps):
    torch.manual_seed(0)
    model = Glow(3, IMAGE, K=K, L=L, hidden_channels=WIDTH)
    x = torch.rand(BATCH, 3, IMAGE, IMAGE) - 0.5
    with torch.no_grad():
        model(x)  # data-dependent ActNorm initialisation
    for module in model.modules():  # a trained-looking network: non-zero shifts and scales
        if isinstance(module, AffineCoupling):
            torch.nn.init.normal_(module.nn.net[-1].conv.weight, 0.0, 0.01)

    def step(plain):
        use_plain(plain)
        model.zero_grad(set_to_none=True)
        loss = model.bits_per_dim(x, 256).mean()
        loss.backward()
        use_plain(False)
        return loss.detach()

    losses = {"op": step(False)}
    grads_op = [p.grad.clone() for p in model.parameters()]
    losses["plain"] = step(True)
    worst = max(((a - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30)).item()
                for a, p in zip(grads_op, model.parameters()))
    assert torch.allclose(losses["op"], losses["plain"], rtol=1e-5), losses
    assert worst < 1e-3, f"gradients differ by {worst:.2e} (max relative)"
    result = interleaved({"op": lambda: step(False), "plain": lambda: step(True)}, reps, inner=1)
    speedup = result["plain"]["median_ms"] / result["op"]["median_ms"]
    print(f"  Glow K={K} L={L} width {WIDTH} batch {BATCH} fwd+loss+bwd: op "
          f"{result['op']['median_ms']:.1f} ms, plain {result['plain']['median_ms']:.1f} ms: "
          f"{speedup:.3f}x (loss {losses['op'].item():.6f} vs {losses['plain'].item():.6f}, "
          f"gradients within {worst:.1e})", flush=True)
    return {"model": {"K": K, "L": L, "hidden_channels": WIDTH, "batch": BATCH, "image": [3, IMAGE, IMAGE]},
            **result, "speedup": speedup, "loss_op": losses["op"].item(),
            "loss_plain": losses["plain"].item(), "max_rel_grad_difference": worst}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=41)
    parser.add_argument("--step-reps", type=int, default=21)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not coupling_ops.kernels_available():
        sys.exit("the compiled coupling kernels are not available: nothing to measure")
    header = {"torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(),
              "glow_ext_version": glow_ext.__version__, "build": build_description(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    print("elementwise part of the coupling (medians):", flush=True)
    rows = elementwise(args.reps)
    print("whole training step:", flush=True)
    step = glow_step(args.step_reps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"coupling-cpu-{torch.get_num_threads()}threads.json"
    path.write_text(json.dumps({**header, "elementwise": rows, "glow_step": step}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
