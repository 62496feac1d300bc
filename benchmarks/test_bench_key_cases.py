"""Key cases of glow_ext's benchmarks under pytest-benchmark, for regression tracking.

    pytest benchmarks --benchmark-only                       # time them
    pytest benchmarks --benchmark-only --benchmark-autosave  # keep the run in .benchmarks/
    pytest benchmarks --benchmark-only --benchmark-compare   # compare with the last saved run

The fused op against the naive layer (forward, forward+backward, inverse) at CIFAR-10's first level,
CelebA-HQ-256's deepest level (the factored path) and C = 512; the layer logdet at C = 512 by float32
and float64 slogdet and by the LU formula. The methods come from glow_ext.bench.methods and
glow_ext.bench.curves, and each problem is checked for agreement before its first timing. CPU, and
CUDA as well when a GPU is visible (every call then ends with a synchronize).
"""
import pytest
import torch

pytest.importorskip("pytest_benchmark")

from glow_ext.bench import curves as bench_suite  # noqa: E402
from glow_ext.bench import methods as opbench  # noqa: E402
from glow_ext.bench.common import synchronizer  # noqa: E402

SHAPES = ((64, 12, 16, 16), (4, 384, 4, 4), (16, 512, 4, 4))
LOGDET_C = 512
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def problem():
    """problem(kind, size, device): a checked Problem (kind "layer") or CurveProblem ("curve"), built
    once per module."""
    cache = {}

    def get(kind, size, device):
        key = (kind, size, device)
        if key not in cache:
            if kind == "layer":
                pb = opbench.Problem(size, device)
                opbench.check_problem(pb)
            else:
                pb = bench_suite.CurveProblem(size, device)
                bench_suite.check_curve_problem(pb)
            cache[key] = pb
        return cache[key]

    return get


def _run(benchmark, fn, device, grad_mode):
    sync = synchronizer(device)

    def call():
        fn()
        sync()

    with torch.set_grad_enabled(grad_mode):
        benchmark(call)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ("ours", "naive"))
@pytest.mark.parametrize("mode", opbench.MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layer(benchmark, problem, shape, mode, method, device):
    pb = problem("layer", shape, device)
    benchmark.group = f"layer {mode} {pb.label()} {device}"
    _run(benchmark, opbench.make_callable(pb, mode, method), device,
         grad_mode=(mode in opbench.TRAINING_MODES))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ("slogdet", "slogdet_f64", "lu"))
@pytest.mark.parametrize("mode", bench_suite.CURVE_MODES)
def test_logdet(benchmark, problem, mode, method, device):
    cp = problem("curve", LOGDET_C, device)
    benchmark.group = f"logdet {mode} C={LOGDET_C} {device}"
    _run(benchmark, bench_suite.curve_callable(cp, "logdet", method, mode), device,
         grad_mode=(mode == "fwd+bwd"))
