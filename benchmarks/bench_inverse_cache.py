#!/usr/bin/env python3
"""Sampling with the cached inverse maps of the LU 1x1 convolutions against the per-call inverse op.

`Glow.sample` runs under no_grad, so every fused step inverts through `InvConv2dLU.inverse_map`
(computed once per parameter version) and the `channel_map` kernel. The baseline is the same model
and noise with `InvConv2dLU.reverse` patched to call `actnorm_invconv_lu_inverse`, which rebuilds
the inverse from the LU factors on every call. Samples are checked equal before timing.

    python benchmarks/bench_inverse_cache.py [--device cpu|cuda] [--reps 15] [--out DIR]

Writes inverse-cache-<device>.json.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if (HERE.parent / "glow_ext" / "__init__.py").is_file():
    sys.path.insert(0, str(HERE.parent))

from glow_ext import nn as gnn  # noqa: E402
from glow_ext import ops  # noqa: E402
from glow_ext.bench.common import report_header  # noqa: E402
from glow_ext.models import Glow  # noqa: E402

CASES = (
    ("digits default: 1x8x8, K=8, L=3, width 64", dict(in_channels=1, image_size=8, K=8, L=3,
                                                        hidden_channels=64), 64),
    ("3x32x32, K=32, L=3, width 64", dict(in_channels=3, image_size=32, K=32, L=3,
                                           hidden_channels=64), 16),
    ("3x32x32, K=32, L=3, width 64", dict(in_channels=3, image_size=32, K=32, L=3,
                                           hidden_channels=64), 1),
)
AGREEMENT_TOL = 1e-5


def per_call_inverse(layer, y):
    return ops.actnorm_invconv_lu_inverse(y, *layer._params())


def median_ms(fn, reps, sync):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), 1e3 * min(times), 1e3 * max(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    rows = []
    for name, config, n in CASES:
        torch.manual_seed(0)
        model = Glow(**config).to(device)
        with torch.no_grad():  # data-dependent ActNorm init, then sampling mode
            model(torch.rand(8, config["in_channels"], config["image_size"], config["image_size"],
                             device=device) - 0.5)
        model.eval()

        def sample():
            torch.manual_seed(1)
            return model.sample(n, temperature=0.7)

        cached_samples = sample()
        cached = median_ms(sample, args.reps, sync)
        original = gnn.InvConv2dLU.reverse
        gnn.InvConv2dLU.reverse = per_call_inverse
        try:
            per_call_samples = sample()
            per_call = median_ms(sample, args.reps, sync)
        finally:
            gnn.InvConv2dLU.reverse = original
        diff = ((cached_samples - per_call_samples).abs().max()
                / per_call_samples.abs().max()).item()
        if diff > AGREEMENT_TOL:
            raise SystemExit(f"{name}: cached and per-call samples differ by {diff:.2e}")
        row = dict(case=name, n=n, cached_ms=cached, per_call_ms=per_call,
                   speedup=per_call[0] / cached[0], max_rel_diff=diff)
        rows.append(row)
        print(f"{name}, {n} samples: cached {cached[0]:.2f} ms, per-call inverse op "
              f"{per_call[0]:.2f} ms -> {row['speedup']:.2f}x (samples differ by {diff:.1e})",
              flush=True)
    result = dict(benchmark="inverse-cache", **report_header(device), reps=args.reps, timings="[median, min, max] ms of Glow.sample", rows=rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"inverse-cache-{args.device}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
