#!/usr/bin/env python3
"""Float32 error of the fused ActNorm + LU 1x1 op against a float64 reference, next to plain
float32 PyTorch in the "folded" form (glow_ext.bench.methods.folded_forward), at C = 12..1024.

Per C, on 16 x C x 8 x 8 inputs with the LU factors of a perturbed random rotation
(glow_ext.bench.methods.Problem): the forward output's error max|Δ| / max|y|; the gradient error,
the largest ‖Δ‖ / ‖g‖ over dL/dx and the five parameter gradients, of forward + backward with
loss (y·g).sum() + logdet; the same through the inverse op (loss (x·g).sum()), where the float32
reference is glow_ext.reference's inverse under autograd.

    python benchmarks/accuracy_fused_op.py [--out FILE.json]     (about a minute)
"""
import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if (HERE.parent / "glow_ext" / "__init__.py").is_file():
    sys.path.insert(0, str(HERE.parent))

from glow_ext import reference  # noqa: E402
from glow_ext.bench import methods as mb  # noqa: E402

CHANNELS = (12, 24, 48, 96, 192, 384, 512, 1024)


def forward_and_grads(fn, pb, dtype):
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (pb.x,) + pb.lu_theta()]
    y, logdet = fn(pb, *leaves)
    ((y * pb.g.to(dtype)).sum() + logdet).backward()
    return y.detach(), [t.grad for t in leaves]


def inverse_grads(fn, pb, y, dtype):
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (y,) + pb.lu_theta()]
    (fn(pb, *leaves) * pb.g.to(dtype)).sum().backward()
    return [t.grad for t in leaves]


def worst_grad_error(grads, exact):
    return max(float((g.double() - e).norm() / e.norm()) for g, e in zip(grads, exact))


def reference_forward(pb, x, bias, logs, lower, upper, log_s):
    return reference.actnorm_invconv_lu(x, bias, logs, pb.perm, lower, upper, log_s, pb.sign_s.to(x.dtype))


def reference_inverse(pb, y, bias, logs, lower, upper, log_s):
    return reference.actnorm_invconv_lu_inverse(y, bias, logs, pb.perm, lower, upper, log_s,
                                                pb.sign_s.to(y.dtype))


def measure(c):
    pb = mb.Problem((16, c, 8, 8), "cpu", seed=0)
    y64, exact = forward_and_grads(reference_forward, pb, torch.float64)
    row = {}
    for name, fn in (("ours", mb.ours_forward), ("folded", mb.folded_forward)):
        y, grads = forward_and_grads(fn, pb, torch.float32)
        row[f"{name}_forward"] = float((y.double() - y64).abs().max() / y64.abs().max())
        row[f"{name}_grad"] = worst_grad_error(grads, exact)
    y = y64.float()
    exact_inv = inverse_grads(reference_inverse, pb, y, torch.float64)
    row["ours_inverse_grad"] = worst_grad_error(inverse_grads(mb.ours_inverse, pb, y, torch.float32), exact_inv)
    row["reference_inverse_grad"] = worst_grad_error(
        inverse_grads(reference_inverse, pb, y, torch.float32), exact_inv)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    print(f"{'C':>5} {'forward: ours':>14} {'folded':>9} {'grad: ours':>11} {'folded':>9} {'ratio':>6}"
          f" {'inverse grad: ours':>19} {'f32 reference':>14}")
    results = {}
    for c in CHANNELS:
        r = results[c] = measure(c)
        print(f"{c:5d} {r['ours_forward']:14.2e} {r['folded_forward']:9.2e} {r['ours_grad']:11.2e} "
              f"{r['folded_grad']:9.2e} {r['ours_grad'] / r['folded_grad']:6.2f} "
              f"{r['ours_inverse_grad']:19.2e} {r['reference_inverse_grad']:14.2e}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
