"""`glow-ext bench-dropin-flows`: each glow_ext.compat 1x1-conv drop-in against its original, at the
shapes the peer projects really run.

Cases: WaveGlow's Invertible1x1Conv at training batches (12, C, 2000) for its C = 8, 6, 4 groups and
at inference (1, 8, 2756); Glow-TTS's decoder ActNorm and InvConvNear (n_split 4) at (32, 160, 500)
with a mask of random valid lengths 300..500; RADTTS's Invertible1x1ConvLUS at (32, 160, 500);
nflows' LULinear and normflows' InvertibleAffine (LU and dense) on (512, C) tabular batches; and
normflows' Invertible1x1Conv (dense and LU) and nflows' OneByOneConvolution at Glow's level shapes.
The speech originals are not packaged: glow_ext.bench.anchor_speech holds them; normflows and
nflows are the installed projects.

Each drop-in loads the original's (randomly perturbed) state_dict, strict. Before timing, the
density-direction outputs and log-determinants, the sampling-direction outputs and the gradients
must agree in float32; a mismatch aborts the run. Three modes are timed, the two modules' six
callables round-robin in one process (glow_ext.bench.common.time_methods): "forward" (the density
direction with autograd recording, as in training), "fwd+bwd" (that pass and the gradients of the
input and parameters) and "inverse" (the sampling direction under no_grad). Glow-TTS's and
WaveGlow's inference call store_inverse / cache W⁻¹ first, so both modules here do too.

The machine's float32 GEMM rate and copy bandwidth are measured in the same run
(glow_ext.bench.roofline); each time is also given as a % of its roofline (see `work`).

Writes dropin-flows-<device>.json under --out. `--quick`: tiny shapes, for tests (never over full
results). On a machine shared with other work, `--threads 1` (see glow_ext.bench.dropin).
"""
import argparse
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from . import anchor_speech as speech
from . import dropin
from .common import BenchError, report_header, synchronizer, time_methods
from .dropin import ratio_band, start_run
from .roofline import floor_ms, measure_ceilings

FULL = dict(reps=15, min_time_ms=50, warmup=2, ceiling_reps=5)
QUICK = dict(reps=2, min_time_ms=1, warmup=1, ceiling_reps=1)
MODES = ("forward", "fwd+bwd", "inverse")
METHODS = ("original", "ours")
# float32, relative to the largest entry; the originals' float32 log-determinants carry round-off
# of up to ~1e-5 at Glow's level shapes (slogdet times H·W).
TOL = 1e-5
# Glow-TTS batches: valid lengths uniform in [MIN_VALID·T, T] (300..500 at T = 500).
MIN_VALID = 0.6


@dataclass
class Case:
    """One drop-in against its original at one shape. density(module, x, mask) -> (y, logdet) is
    the training direction, sample(module, y, mask) -> x the sampling one; mix_flops(shape) counts
    one pass of the channel mixing over the whole input."""
    peer: str
    layer: str
    setting: str
    shape: tuple
    make_original: Callable
    make_ours: Callable
    density: Callable
    sample: Callable
    mix_flops: Callable
    masked: bool = False


def _dense_mix(shape):
    """A C×C matrix applied at every position: 2·C² flops per position."""
    return 2 * shape[1] ** 2 * math.prod(shape) // shape[1]


def _grouped_mix(n_split):
    """Glow-TTS's n×n mix of channel groups: 2·n flops per element."""
    return lambda shape: 2 * n_split * math.prod(shape)


def _scale_shift(shape):
    return 2 * math.prod(shape)


def _speech_cases():
    from ..compat import glow_tts, radtts, waveglow

    def call(module, x, mask):
        return module(x)

    def tts(module, x, mask):
        return module(x, mask)

    def tts_reverse(module, y, mask):
        return module(y, mask, reverse=True)[0]

    cases = [Case("WaveGlow", "Invertible1x1Conv", "training", (12, c, 2000),
                  lambda c=c: speech.RefWaveGlowConv(c), lambda c=c: waveglow.Invertible1x1Conv(c),
                  call, lambda m, y, mask: m(y, reverse=True), _dense_mix)
             for c in (8, 6, 4)]
    cases.append(Case("WaveGlow", "Invertible1x1Conv", "inference", (1, 8, 2756),
                      lambda: speech.RefWaveGlowConv(8), lambda: waveglow.Invertible1x1Conv(8),
                      call, lambda m, y, mask: m(y, reverse=True), _dense_mix))
    cases += [
        Case("Glow-TTS", "ActNorm", "decoder", (32, 160, 500), lambda: speech.RefActNorm(160),
             lambda: glow_tts.ActNorm(160), tts, tts_reverse, _scale_shift, masked=True),
        Case("Glow-TTS", "InvConvNear", "decoder, n_split 4", (32, 160, 500),
             lambda: speech.RefInvConvNear(160, 4), lambda: glow_tts.InvConvNear(160, 4),
             tts, tts_reverse, _grouped_mix(4), masked=True),
        Case("RADTTS", "Invertible1x1ConvLUS", "decoder", (32, 160, 500),
             lambda: speech.RefLUS(160), lambda: radtts.Invertible1x1ConvLUS(160),
             call, lambda m, y, mask: m(y, inverse=True), _dense_mix),
    ]
    return cases


def _density_cases():
    try:
        import normflows
        from nflows import transforms as nflows_transforms
    except ImportError as error:
        raise BenchError(f"the normflows and nflows cases need both installed ({error})") from None
    from ..compat import nflows as our_nflows
    from ..compat import normflows as our_normflows

    # normflows' density direction is inverse(), nflows' forward(); both return (output, logdet).
    def normflows_density(m, x, mask):
        return m.inverse(x)

    def normflows_sample(m, y, mask):
        return m.forward(y)[0]

    def nflows_density(m, x, mask):
        return m.forward(x)

    def nflows_sample(m, y, mask):
        return m.inverse(y)[0]

    def normflows_case(layer, original, ours, use_lu, setting, shape):
        return Case("normflows", f"{layer} ({'LU' if use_lu else 'dense'})", setting, shape,
                    lambda: original(shape[1], use_lu=use_lu),
                    lambda: ours(shape[1], use_lu=use_lu),
                    normflows_density, normflows_sample, _dense_mix)

    def nflows_case(layer, original, ours, setting, shape):
        return Case("nflows", layer, setting, shape, lambda: original(shape[1]),
                    lambda: ours(shape[1]), nflows_density, nflows_sample, _dense_mix)

    cases = []
    for c in (8, 16, 64):
        shape = (512, c)
        cases.append(nflows_case("LULinear", nflows_transforms.LULinear, our_nflows.LULinear,
                                 "tabular", shape))
        for use_lu in (True, False):
            cases.append(normflows_case("InvertibleAffine", normflows.flows.InvertibleAffine,
                                        our_normflows.InvertibleAffine, use_lu, "tabular", shape))
    for shape in ((64, 12, 16, 16), (64, 48, 8, 8), (64, 96, 4, 4)):
        for use_lu in (False, True):
            cases.append(normflows_case("Invertible1x1Conv", normflows.flows.Invertible1x1Conv,
                                        our_normflows.Invertible1x1Conv, use_lu, "Glow level",
                                        shape))
        cases.append(nflows_case("OneByOneConvolution", nflows_transforms.OneByOneConvolution,
                                 our_nflows.OneByOneConvolution, "Glow level", shape))
    return cases


def all_cases():
    return _speech_cases() + _density_cases()


def quick_shape(shape):
    """Batch 2, every dimension after the channels at most 8: the same code paths, tiny work."""
    return (2, shape[1], *(min(d, 8) for d in shape[2:]))


@torch.no_grad()
def _perturb(module, channels, gen):
    """Random noise on every parameter (matrix-like ones scaled by 1/sqrt(C)), so that identity or
    rotation inits hide no mapping error."""
    for param in module.parameters():
        scale = 0.1 / math.sqrt(channels) if param.numel() > channels else 0.1
        param.add_(scale * torch.randn(param.shape, generator=gen).to(param))


def _mask(shape, gen):
    """(N, 1, T) float mask of valid lengths uniform in [MIN_VALID·T, T], the first one T."""
    n, _, t = shape
    lengths = torch.randint(math.ceil(MIN_VALID * t), t + 1, (n,), generator=gen)
    lengths[0] = t
    return (torch.arange(t).view(1, -1) < lengths.view(-1, 1)).float().unsqueeze(1)


def build(case, shape, device, seed):
    """{method: module} (ours holding the original's perturbed weights), the input and the mask."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    original = case.make_original()
    _perturb(original, shape[1], gen)
    ours = case.make_ours()
    ours.load_state_dict(original.state_dict(), strict=True)
    x = torch.randn(shape, generator=gen).to(device)
    mask = _mask(shape, gen).to(device) if case.masked else None
    modules = {"original": original.to(device).train(), "ours": ours.to(device).train()}
    for module in modules.values():
        if hasattr(module, "store_inverse"):
            module.store_inverse()
    return modules, x, mask


def _rel_err(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def _grads(module, case, x, mask, seed_grad):
    x = x.detach().requires_grad_()
    y, logdet = case.density(module, x, mask)
    params = [p for _, p in sorted(module.named_parameters()) if p.requires_grad]
    return torch.autograd.grad((y, logdet), [x] + params, (seed_grad, torch.ones_like(logdet)))


def check_agreement(case, modules, x, mask):
    """Relative errors of ours against the original; raises BenchError above the tolerances."""
    original, ours = modules["original"], modules["ours"]
    with torch.no_grad():
        y_ref, logdet_ref = case.density(original, x, mask)
        y, logdet = case.density(ours, x, mask)
        sample_ref, sample = case.sample(original, y_ref, mask), case.sample(ours, y_ref, mask)
    if logdet.shape != logdet_ref.shape:
        raise BenchError(f"{_label(case)}: logdet shape {tuple(logdet.shape)}, the original's "
                         f"{tuple(logdet_ref.shape)}")
    seed_grad = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1)).to(x.device)
    grads = _grads(ours, case, x, mask, seed_grad)
    grads_ref = _grads(original, case, x, mask, seed_grad)
    checks = {"output": _rel_err(y, y_ref), "logdet": _rel_err(logdet, logdet_ref),
              "sample": _rel_err(sample, sample_ref),
              "grads": max(_rel_err(g, r) for g, r in zip(grads, grads_ref))}
    if len(grads) != len(grads_ref) or not all(err <= TOL for err in checks.values()):
        raise BenchError(f"{_label(case)}: the drop-in disagrees with the original: {checks}")
    return checks


def _label(case):
    return f"{case.peer} {case.layer} ({case.setting})"


def _callables(case, modules, x, mask):
    """{"<method> <mode>": fn} for the round-robin."""
    x = x.detach().requires_grad_()
    with torch.no_grad():
        y = case.density(modules["original"], x, mask)[0]
    seed_grad = torch.randn_like(y)
    callables = {}
    for method, module in modules.items():
        params = [p for p in module.parameters() if p.requires_grad]

        def train_step(module=module, params=params):
            y, logdet = case.density(module, x, mask)
            torch.autograd.grad((y, logdet), [x] + params, (seed_grad, torch.ones_like(logdet)))

        def sample(module=module):
            with torch.no_grad():
                case.sample(module, y, mask)
        callables[f"{method} forward"] = lambda module=module: case.density(module, x, mask)
        callables[f"{method} fwd+bwd"] = train_step
        callables[f"{method} inverse"] = sample
    return callables


def work(case, shape):
    """{mode: {"flops", "bytes"}}: the least work of each mode. A pass mixes channels once
    (mix_flops) and reads its input and writes its output; fwd+bwd adds the input gradient and the
    weight gradient (two more mixes) and reads the output gradient and the input again and writes
    the input gradient. float32; the parameters and the mask (at most 1/C of an image) left out."""
    flops, image = case.mix_flops(shape), 4 * math.prod(shape)
    return {"forward": {"flops": flops, "bytes": 2 * image},
            "fwd+bwd": {"flops": 3 * flops, "bytes": 5 * image},
            "inverse": {"flops": flops, "bytes": 2 * image}}


def run_case(case, cfg, device, seed, ceilings):
    shape = quick_shape(case.shape) if cfg["quick"] else case.shape
    modules, x, mask = build(case, shape, device, seed)
    checks = check_agreement(case, modules, x, mask)
    timing = time_methods(_callables(case, modules, x, mask), synchronizer(device), cfg["reps"],
                          cfg["min_time_ms"] / 1e3, cfg["warmup"], grad_mode=True)
    case_work = work(case, shape)
    result = {"peer": case.peer, "layer": case.layer, "setting": case.setting, "shape": list(shape),
              "masked": case.masked, "checks": checks, "timing": timing, "work": case_work,
              "ratio": {}, "ratio_iqr_band": {}, "roofline_pct": {m: {} for m in METHODS}}
    if case.masked:
        result["valid_fraction"] = mask.mean().item()
    for mode in MODES:
        base, ours = timing[f"original {mode}"], timing[f"ours {mode}"]
        result["ratio"][mode] = base["median_ms"] / ours["median_ms"]
        result["ratio_iqr_band"][mode] = ratio_band(base, ours)
        floor = floor_ms(case_work[mode]["flops"], case_work[mode]["bytes"], ceilings)
        for method in METHODS:
            median = timing[f"{method} {mode}"]["median_ms"]
            result["roofline_pct"][method][mode] = 100 * floor / median
    return result


def digest(result):
    parts = []
    for mode in MODES:
        t = result["timing"]
        low, high = result["ratio_iqr_band"][mode]
        parts.append(f"{mode} {t[f'original {mode}']['median_ms']:.3f} -> "
                     f"{t[f'ours {mode}']['median_ms']:.3f} ms {result['ratio'][mode]:.2f}x "
                     f"[{low:.2f}, {high:.2f}]")
    return (f"{result['peer']} {result['layer']} {result['setting']} {tuple(result['shape'])}: "
            + "; ".join(parts))


def run(args, stream=None):
    stream = stream or sys.stdout
    cfg = dict(QUICK if args.quick else FULL, quick=args.quick)
    device, path = start_run(args, "dropin-flows", cfg, stream)
    started, load_before = time.perf_counter(), os.getloadavg()
    ceilings = measure_ceilings(device, reps=cfg["ceiling_reps"],
                                min_time_s=cfg["min_time_ms"] / 1e3, warmup=cfg["warmup"],
                                dtypes=(torch.float32,))
    print(f"  ceilings: GEMM {ceilings['gemm_gflops']['float32']:.0f} GFLOP/s float32, copy "
          f"{ceilings['copy_gbps']:.1f} GB/s", file=stream, flush=True)
    results = []
    with warnings.catch_warnings():
        # normflows and nflows call deprecated torch functions (torch.lu, torch.triangular_solve).
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        for case in all_cases():
            results.append(run_case(case, cfg, device, args.seed, ceilings))
            print("  " + digest(results[-1]), file=stream, flush=True)
    report = {"benchmark": "glow-ext bench-dropin-flows", **report_header(device),
              "config": dict(cfg, dtype="float32", modes=list(MODES), tol=TOL,
                             wall_s=time.perf_counter() - started),
              "ceilings": ceilings, "cases": results, "notes": NOTES}
    dropin.write_report(report, path, load_before, stream)
    return report


NOTES = {
    "modes": "forward: the density (training) direction with autograd recording; fwd+bwd: that "
             "and the gradients of the input and the parameters; inverse: the sampling direction "
             "under no_grad, after store_inverse() where the layer has it",
    "ratio": "original median time / ours median time, per mode (>1: the drop-in is faster)",
    "ratio_iqr_band": "the same ratio with each median moved by half its IQR the unfavourable and "
                      "the favourable way",
    "roofline_pct": "the least time of the mode's work (`work`: flops at the measured float32 GEMM "
                    "rate or bytes at the measured copy bandwidth, whichever is longer) / the "
                    "median time, in percent",
    "checks": "max |ours − original| / max |original| before timing: density outputs, "
              "log-determinants, sampling outputs, and (the largest over tensors) the gradients "
              "of the input and every parameter",
}


def add_arguments(parser):
    dropin.add_arguments(parser, FULL, "tiny shapes for tests")


def run_command(args):
    return dropin.run_command(args, run, "bench-dropin-flows")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="glow-ext bench-dropin-flows",
                                     description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
