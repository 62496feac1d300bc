"""`glow-ext bench-ops` and what it shares with `glow-ext bench`'s level-shape part: the roofline's
work counting and floor on hand-computed examples, the folded baseline against the reference in
float64, and the quick mode's JSON fields and tables (no timing assertions)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import glow_ext
from glow_ext import reference
from glow_ext.bench import methods as opbench, report as bench_report, roofline
from glow_ext.bench.common import report_header

from conftest import repo_root

# --------------------------------------------------------------------------------------------------
# Roofline math


def test_reports_record_version_and_build_but_no_path():
    header = report_header("cpu")
    assert header["glow_ext_version"] == glow_ext.__version__
    assert header["build_info"]["cpu_kernels"] == glow_ext.build_info()["cpu_kernels"]
    assert os.path.dirname(os.path.abspath(glow_ext.__file__)) not in json.dumps(header)


def test_layer_work_counts_the_folded_path_by_hand():
    # N, C, H, W = 2, 3, 4, 5: P = 40 pixels; one channel mix is 2·C²·P = 720 flops.
    shape = (2, 3, 4, 5)
    image, params, grads = 3 * 40 * 4, (2 * 9 + 9) * 4 + 8 * 3, (2 * 9 + 9) * 4  # 480, 132, 108 bytes
    forward = roofline.layer_work(shape, "forward")
    # mix + assembly 2·27/3 + folding 4·9; x read, y written, parameters read.
    assert forward == {"flops": 720 + 18 + 36, "bytes": 2 * image + params, "path": "folded"}
    backward = roofline.layer_work(shape, "backward")
    # two mixes + chain rule 2·27 + 4·9; grad_y and x read, grad_x written, parameters and grads.
    assert backward["flops"] == 2 * 720 + 54 + 36 and backward["bytes"] == 3 * image + params + grads
    both = roofline.layer_work(shape, "fwd+bwd")
    assert both["flops"] == 774 + 1530 and both["bytes"] == 1092 + 1680
    inverse = roofline.layer_work(shape, "inverse")
    assert inverse["flops"] == 720 + 36 + 36  # W⁻¹: 4·27/3
    assert roofline.layer_work(shape, "inverse fwd+bwd")["flops"] == 792 + 1530
    assert roofline.layer_work(shape, "forward", itemsize=8)["bytes"] == 2 * 960 + 27 * 8 + 24


def test_layer_work_has_no_cubic_term_on_the_factored_path():
    # C = 200 > 192 with 4 pixels: the triangular factors are applied to the pixels, W never formed.
    work = roofline.layer_work((1, 200, 2, 2), "fwd+bwd")
    assert work["path"] == "factored" and work["flops"] == 3 * 2 * 200 * 200 * 4
    assert roofline.layer_work((1, 200, 16, 16), "forward")["path"] == "folded"
    assert roofline.layer_work((1, 192, 1, 1), "forward")["path"] == "folded"


def test_floor_and_roofline_percentage_by_hand():
    ceilings = {"gemm_gflops": {"float32": 1.0, "float64": 0.5}, "copy_gbps": 2.0}
    # 774 flops at 1 GFLOP/s = 774 ns; 1092 bytes at 2 GB/s = 546 ns: compute bound.
    assert roofline.floor_ms(774, 1092, ceilings) == pytest.approx(7.74e-4)
    assert roofline.floor_ms(774, 1092, ceilings, torch.float64) == pytest.approx(1.548e-3)
    assert roofline.floor_ms(100, 1092, ceilings) == pytest.approx(5.46e-4)  # memory bound
    assert roofline.roofline_pct(1.548e-3, 774, 1092, ceilings) == pytest.approx(50.0)


def test_shape_roofline_gives_every_mode_its_own_floor():
    ceilings = {"gemm_gflops": {"float32": 1.0, "float64": 0.5}, "copy_gbps": 2.0}
    ms = {"forward": 1e-3, "fwd+bwd": 4e-3, "inverse": 2e-3, "inverse fwd+bwd": 5e-3, "backward": 3e-3}
    roof = opbench.shape_roofline((2, 3, 4, 5), ms, ceilings)
    assert set(roof) == set(ms) and all(roof[m]["ms"] == ms[m] for m in ms)
    assert roof["forward"]["pct"] == pytest.approx(100 * 7.74e-4 / 1e-3)
    # backward: 1530 flops (1.53 µs) against 1680 bytes (0.84 µs) -> compute bound.
    assert roof["backward"]["floor_ms"] == pytest.approx(1.53e-3)
    assert roof["backward"]["pct"] == pytest.approx(100 * 1.53e-3 / 3e-3)
    assert roof["fwd+bwd"]["path"] == "folded" and roof["forward"]["copy_gbps"] == 2.0
    # A copy of x that runs from cache at 4 GB/s halves the memory side (1092 bytes: 273 ns).
    cached = opbench.shape_roofline((2, 3, 4, 5), ms, dict(ceilings, gemm_gflops={"float32": 10.0}),
                                    clone_gbps=4.0)
    assert cached["forward"]["copy_gbps"] == 4.0 and cached["forward"]["floor_ms"] == pytest.approx(2.73e-4)


def test_ratio_summary_counts_shapes_below_one():
    ratios = {label: {mode: {b: value for b in opbench.BASELINES} for mode in opbench.MODES}
              for label, value in (("1x4x2x2", 0.5), ("1x4x4x4", 2.0), ("1x8x2x2", 4.0))}
    summary = opbench.ratio_summary(ratios)["fwd+bwd"]["folded"]
    assert summary["geomean"] == pytest.approx(4 ** (1 / 3)) and summary["shapes_below_1x"] == 1
    assert summary["n_shapes"] == 3 and summary["worst_shape"] == "1x4x2x2"


# --------------------------------------------------------------------------------------------------
# The baselines


@pytest.mark.parametrize("method", ("folded", "folded_perm"))
@pytest.mark.parametrize("shape", [(3, 12, 4, 5), (2, 40, 3, 3)], ids=lambda s: "x".join(map(str, s)))
def test_folded_baselines_agree_with_the_reference_in_float64(shape, method):
    forward, inverse = opbench.FORWARD[method], opbench.INVERSE[method]
    pb = opbench.Problem(shape, "cpu", dtype=torch.float64)
    theta = pb.lu_theta()
    params = (pb.bias, pb.logs, pb.perm, pb.lower, pb.upper, pb.log_s, pb.sign_s)
    y, logdet = forward(pb, pb.x, *theta)
    y_ref, logdet_ref = reference.actnorm_invconv_lu(pb.x, *params)
    assert opbench.rel_err(y, y_ref) < 1e-13
    assert float(logdet) == pytest.approx(float(logdet_ref), rel=1e-13)
    x = inverse(pb, y_ref, *theta)
    assert opbench.rel_err(x, reference.actnorm_invconv_lu_inverse(y_ref, *params)) < 1e-12

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_(True) for t in (pb.x,) + theta]
        out, ld = fn(leaves)
        ((out * pb.g).sum() + ld).backward()
        return [t.grad for t in leaves]

    ours = grads(lambda v: forward(pb, *v))
    ref = grads(lambda v: reference.actnorm_invconv_lu(v[0], v[1], v[2], pb.perm, v[3], v[4], v[5],
                                                        pb.sign_s))
    for a, b in zip(ours, ref):
        assert opbench.rel_err(a, b) < 1e-12


def test_check_problem_covers_the_inverse_in_training(monkeypatch):
    pb = opbench.Problem((2, 12, 4, 4), "cpu")
    errors = opbench.check_problem(pb)
    for method in opbench.BASELINES:
        assert f"inverse_grad.{method}.y" in errors and f"inverse_grad.{method}.bias" in errors
    assert "inverse_grad.folded.lower" in errors and "inverse_grad.naive.weight" not in errors

    def wrong_bias_gradient(pb, y, bias, logs, weight):  # the right values, a wrong d/d(bias)
        return opbench.naive_inverse(pb, y, bias, logs, weight) + (bias - bias.detach()).view(1, -1, 1, 1)

    monkeypatch.setitem(opbench.INVERSE, "naive", wrong_bias_gradient)
    with pytest.raises(opbench.AgreementError, match="inverse_grad.naive.bias"):
        opbench.check_problem(pb)


# --------------------------------------------------------------------------------------------------
# --quick, end to end through the command line


def _bench_ops(args, timeout=300):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="268435456", MALLOC_TRIM_THRESHOLD_="536870912")
    return subprocess.run([sys.executable, "-m", "glow_ext", "bench-ops"] + args, cwd=repo_root(), env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_quick_mode_writes_roofline_summary_and_training_modes(tmp_path):
    out = tmp_path / "ops.json"
    result = _bench_ops(["--quick", "--out", str(out)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ceilings: GEMM" in result.stdout and "inverse fwd+bwd" in result.stdout
    assert "shapes where ours < 1.0x" in result.stdout
    report = json.loads(out.read_text())
    ceilings = report["ceilings"]
    assert ceilings["gemm_gflops"]["float32"] > 0 and ceilings["gemm_gflops"]["float64"] > 0
    assert ceilings["copy_gbps"] > 0
    assert set(report["results"]) == {"64x12x16x16", "16x512x4x4"}
    for label, results in report["results"].items():
        roof = results["roofline"]
        assert set(roof) == set(opbench.MODES) | {"backward"}
        for mode in opbench.MODES:
            assert roof[mode]["floor_ms"] > 0 and math.isfinite(roof[mode]["pct"]) and roof[mode]["pct"] > 0
            assert all(r > 0 for r in report["ratios"][label][mode].values())
        assert roof["forward"]["path"] == ("factored" if label == "16x512x4x4" else "folded")
        assert "inverse_grad.naive.y" in report["checks"][label]["errors"]
        assert results["fwd+bwd"]["ours_backward"]["median_ms"] == roof["backward"]["ms"]
    summary = report["ratio_summary"]
    for mode in opbench.MODES:
        for b in opbench.BASELINES:
            per_shape = [report["ratios"][label][mode][b] for label in report["ratios"]]
            assert summary[mode][b]["n_shapes"] == 2
            assert summary[mode][b]["shapes_below_1x"] == sum(r < 1.0 for r in per_shape)
            assert summary[mode][b]["geomean"] == pytest.approx(report["geomeans"][mode][b])
    goals = report["targets"]
    assert summary["fwd+bwd"]["folded"]["geomean"] in [g["value"] for g in goals]
    for goal in goals:
        assert goal["op"] in (">=", "<="), goal
        met = goal["value"] >= goal["threshold"] if goal["op"] == ">=" else goal["value"] <= goal["threshold"]
        assert goal["passed"] == met, goal
    assert report["targets_passed"] == all(g["passed"] for g in goals)

    rendered = _bench_ops(["--render-only", "--out", str(out)])
    assert rendered.returncode == 0, rendered.stderr
    assert "| 64,12,16,16 |" in rendered.stdout and "% roofline" in rendered.stdout
    assert "inverse fwd+bwd ms" in rendered.stdout and "< 1x)" in rendered.stdout
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:ops-cpu:begin -->\n<!-- bench:ops-cpu:end -->\n")
    refused = _bench_ops(["--render-only", "--update-readme", "--out", str(out), "--readme", str(readme)])
    assert refused.returncode != 0 and "full results only" in refused.stderr
    # The same report, marked as a full run, fills the README's section.
    full = dict(report, config=dict(report["config"], quick=False))
    (tmp_path / "full.json").write_text(json.dumps(full))
    bench_report.update_readme(readme, "ops-cpu", bench_report.ops_markdown(full, "full.json"))
    assert "| 16,512,4,4 |" in readme.read_text() and "Ceilings measured in this run" in readme.read_text()


def test_rendering_a_report_from_before_the_roofline_says_to_re_run(tmp_path):
    old = {"config": {"quick": False}, "device": "cpu", "results": {}, "ratios": {}}
    with pytest.raises(ValueError, match="predates the roofline.*glow-ext bench-ops"):
        bench_report.require_roofline(old, tmp_path / "ops-cpu.json", "glow-ext bench-ops")
    bench_report.require_roofline(dict(old, ceilings={}), tmp_path / "ops-cpu.json", "glow-ext bench-ops")
