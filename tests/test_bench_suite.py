"""The benchmark suite (`glow-ext bench`, glow_ext.bench.suite / report): its --quick mode end to
end, the slope fit, the level shapes, that its agreement checks catch a wrong method, and the README
section it owns."""
import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from glow_ext.bench import curves as bench_curves, report as bench_report, suite as bench_suite
from glow_ext.models import Glow

from conftest import repo_root

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------
# Slope fit


def test_fit_power_law_recovers_the_exponent_of_each_regime():
    channels = [8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    # Flat (launch overhead) below 64, cubic above, with +-3% multiplicative jitter.
    jitter = [1.03, 0.97, 1.01, 0.98, 1.02, 0.99, 1.03, 0.97, 1.0]
    times = [max(0.01, 2e-9 * c ** 3) * j for c, j in zip(channels, jitter)]
    fit = bench_curves.fit_power_law(channels, times, min_c=256)
    assert fit["n_points"] == 4 and fit["min_c"] == 256
    assert abs(fit["slope"] - 3.0) < 0.05
    assert fit["prefactor_ms"] == pytest.approx(2e-9, rel=0.2)
    flat = bench_curves.fit_power_law(channels, [0.006 * j for j in jitter], min_c=256)
    assert abs(flat["slope"]) < 0.05
    exact = bench_curves.fit_power_law([256, 512, 1024], [5 * c ** 1.5 for c in (256, 512, 1024)], 256)
    assert exact["slope"] == pytest.approx(1.5, abs=1e-12)
    assert exact["prefactor_ms"] == pytest.approx(5.0, rel=1e-9)


def test_fit_power_law_needs_two_points():
    fit = bench_curves.fit_power_law([8, 16, 512], [1.0, 2.0, 3.0], min_c=256)
    assert fit["n_points"] == 1 and math.isnan(fit["slope"])


# --------------------------------------------------------------------------------------------------
# What is measured


def test_glow_level_shapes_follow_squeeze_and_split():
    assert bench_suite.glow_level_shapes(32, 3, 64) == [(64, 12, 16, 16), (64, 24, 8, 8), (64, 48, 4, 4)]
    assert bench_suite.glow_level_shapes(64, 4, 32) == [
        (32, 12, 32, 32), (32, 24, 16, 16), (32, 48, 8, 8), (32, 96, 4, 4)]
    assert [s[1:] for s in bench_suite.glow_level_shapes(256, 6, 4)] == [
        (12, 128, 128), (24, 64, 64), (48, 32, 32), (96, 16, 16), (192, 8, 8), (384, 4, 4)]


def test_cost_curve_channels_are_powers_of_two_and_glows_12_times_2_to_the_k():
    channels = bench_curves.LOGDET_CHANNELS
    assert channels[0] == 8 and channels[-1] == 2048 and list(channels) == sorted(set(channels))
    assert {12, 24, 48, 96, 192, 384, 768, 1536} <= set(channels)
    assert {2 ** k for k in range(3, 12)} <= set(channels)


def test_curve_check_catches_a_wrong_method(monkeypatch):
    cp = bench_curves.CurveProblem(16, "cpu")
    errors = bench_curves.check_curve_problem(cp)
    assert max(errors.values()) < bench_curves.CURVE_TOL
    assert {"logdet.lu", "logdet.slogdet_f64", "inverse.ours_op", "inverse.triangular"} <= set(errors)
    wrong_logdet = (lambda cp, logs, log_s: bench_curves.logdet_lu(cp, logs, 2 * log_s), ("logs", "log_s"))
    monkeypatch.setitem(bench_curves.CURVES["logdet"], "lu", wrong_logdet)
    with pytest.raises(bench_suite.BenchError, match="logdet.lu"):
        bench_curves.check_curve_problem(cp)


def test_e2e_check_catches_models_with_different_weights():
    def glow(permutation):
        torch.manual_seed(0)
        return Glow(in_channels=3, image_size=8, K=1, L=2, hidden_channels=8, permutation=permutation)

    lu, naive = glow("invconv_lu"), glow("invconv")
    x = torch.rand(4, 3, 8, 8) - 0.5
    with torch.no_grad():
        lu(x)  # ActNorm init
        naive(x)
        # Same seed, same random draws: the two start as one model until a weight differs.
        naive.levels[0].steps[0].permute.weight.mul_(1.1)
    with pytest.raises(bench_suite.BenchError, match="bits_per_dim"):
        bench_suite.check_glow_pair(lu, naive, x, seed=0)
    naive.load_state_dict(bench_suite.naive_state_from_lu(lu, naive))
    errors = bench_suite.check_glow_pair(lu, naive, x, seed=0)
    assert errors["bits_per_dim"] < 1e-5 and errors["shared_parameters"] > 0


# --------------------------------------------------------------------------------------------------
# README section


def test_replace_marked_section_touches_only_the_marked_lines():
    text = "# t\nintro\n<!-- bench:cpu:begin -->\nold\n<!-- bench:cpu:end -->\nrest\n"
    new = bench_report.replace_marked_section(text, "cpu", "| new |\n")
    assert new == "# t\nintro\n<!-- bench:cpu:begin -->\n| new |\n<!-- bench:cpu:end -->\nrest\n"
    with pytest.raises(ValueError, match="bench:cuda:begin"):
        bench_report.replace_marked_section(text, "cuda", "x")


def test_readme_has_the_marked_sections():
    # The generated benchmark tables live in docs/performance.md (README.md is the front page).
    with open(os.path.join(repo_root(), "docs", "performance.md")) as f:
        text = f.read()
    for device in ("cpu", "cuda", "ops-cpu", "ops-cuda", "reversible-cpu", "reversible-cuda"):
        begin, end = bench_report.markers(device)
        assert 0 <= text.find(begin) < text.find(end)


# --------------------------------------------------------------------------------------------------
# --quick, end to end through the command line


def _bench(args, timeout=300):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="268435456", MALLOC_TRIM_THRESHOLD_="536870912")
    return subprocess.run([sys.executable, "-m", "glow_ext", "bench"] + args, cwd=repo_root(), env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.compile
def test_quick_mode_writes_sane_results(tmp_path):
    result = _bench(["--quick", "--out", str(tmp_path)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[  1/" in result.stdout and "logdet: fitted exponent" in result.stdout  # progress, digest

    reports = {part: json.loads((tmp_path / f"{part}-cpu.json").read_text()) for part in bench_suite.PARTS}
    for report in reports.values():
        assert report["config"]["quick"] is True and report["device"] == "cpu"
        assert report["torch_version"] == torch.__version__ and report["machine"]["cpu_count"] >= 1

    curves = reports["logdet"]
    channels = [str(c) for c in curves["channels"]]
    assert sorted(curves["checks"]) == sorted(channels)
    for curve, methods in bench_curves.CURVES.items():
        for mode in bench_curves.CURVE_MODES:
            for method in methods:
                per_c = curves["times"][curve][mode][method]
                assert sorted(per_c) == sorted(channels)
                assert all(v["median_ms"] > 0 and v["iqr_ms"] >= 0 for v in per_c.values())
                assert math.isfinite(curves["fits"][curve][mode][method]["slope"])

    inverse_training = curves["inverse_training"]
    assert sorted(inverse_training["naive_op_over_ours_op"]) == sorted(channels)
    assert set(inverse_training["channels_below_1x"]) <= set(curves["channels"])
    assert "grad.inverse.naive_op.y" in curves["checks"][channels[0]]

    layers_report = reports["layers"]
    layers = layers_report["models"]["cifar10"]
    assert len(layers["per_shape"]) == 3
    for s in layers["per_shape"].values():
        assert max(s["checks"].values()) < 1e-4 and "inverse_grad.folded.log_s" in s["checks"]
        for mode in ("forward", "fwd+bwd", "inverse", "inverse fwd+bwd"):
            assert all(r > 0 and math.isfinite(r) for r in s["ratios"][mode].values())
            roof = s["results"]["roofline"][mode]
            assert roof["flops"] > 0 and roof["floor_ms"] > 0 and math.isfinite(roof["pct"])
        assert "backward" in s["results"]["roofline"]
    ceilings = layers_report["ceilings"]
    assert ceilings["gemm_gflops"]["float32"] > 0 and ceilings["copy_gbps"] > 0
    summary_all = layers_report["ratio_summary_all"]
    assert summary_all["inverse fwd+bwd"]["naive"]["n_shapes"] == 3
    # The summary over shapes, recomputed from the per-shape ratios of the same report.
    folded = [s["ratios"]["fwd+bwd"]["folded"] for m in layers_report["models"].values()
              for s in m["per_shape"].values()]
    assert summary_all["fwd+bwd"]["folded"]["shapes_below_1x"] == sum(r < 1.0 for r in folded)
    assert summary_all["fwd+bwd"]["folded"]["worst"] == min(folded)
    geomean = math.prod(folded) ** (1 / len(folded))
    assert summary_all["fwd+bwd"]["folded"]["geomean"] == pytest.approx(geomean)
    goals = layers_report["targets"]
    assert summary_all["fwd+bwd"]["folded"]["geomean"] in [g["value"] for g in goals]
    for goal in goals:
        assert goal["op"] in (">=", "<="), goal
        met = goal["value"] >= goal["threshold"] if goal["op"] == ">=" else goal["value"] <= goal["threshold"]
        assert goal["passed"] == met, goal

    (e2e,) = reports["e2e"]["configs"]
    assert e2e["checks"]["bits_per_dim"] < bench_suite.E2E_TOL
    assert e2e["images_per_s"]["train"]["ours"] > 0 and e2e["images_per_s"]["sample"]["naive"] > 0
    assert all(v > 0 for v in e2e["memory"]["saved_for_backward_bytes"].values())

    for png in ("logdet-cpu.png", "layers-cpu.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_SIGNATURE
    summary = (tmp_path / "SUMMARY-cpu.md").read_text()
    assert "| logdet | ours: H·W·(Σ logs + Σ log_s) |" in summary and "| **cifar10** | geomean |" in summary
    assert "| **all 3** | geomean |" in summary and "inverse fwd+bwd ms" in summary
    assert "% roofline" in summary and "Ceilings measured in this run" in summary
    assert all(goal["target"] in summary for goal in goals)
    assert "The inverse in training" in summary
    assert "K=2 L=3 width 16 batch 4" in summary and "](logdet-cpu.png)" in summary

    # The CUDA-only fields render too (no GPU here: the quick CPU reports, relabelled and extended).
    _fake_cuda_reports(reports, tmp_path / "cuda")
    bench_report.render(tmp_path / "cuda", "cuda")
    cuda_summary = (tmp_path / "cuda" / "SUMMARY-cuda.md").read_text()
    assert "GB/s: ours / copy" in cuda_summary and "Host-sync check" in cuda_summary
    assert "peak step MB" in cuda_summary and "Host synchronisation in a training step" in cuda_summary

    # Quick results never reach the README, and a quick run never overwrites full results.
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:cpu:begin -->\n<!-- bench:cpu:end -->\n")
    refused = _bench(["--render-only", "--update-readme", "--out", str(tmp_path), "--readme", str(readme)])
    assert refused.returncode == 2 and "full results only" in refused.stderr
    assert readme.read_text() == "<!-- bench:cpu:begin -->\n<!-- bench:cpu:end -->\n"


def _fake_cuda_reports(reports, out_dir):
    out_dir.mkdir()
    for part, report in reports.items():
        report = json.loads(json.dumps(report))
        report["device"] = "cuda"
        report["machine"].update(gpu_name="Test GPU", cuda_runtime="12.x")
        if part == "layers":
            report["cuda"] = {
                "bandwidth": {"shape": [128, 48, 64, 64], "ours_forward_gbps": 900.0, "copy_gbps": 1000.0,
                              "fraction_of_copy": 0.9},
                "sync_check": {"16x12x16x16": {"forward": {"passed": True}}}, "sync_check_passed": True}
        if part == "e2e":
            for c in report["configs"]:
                c["memory"]["cuda_peak_step_bytes"] = {"ours": 2**20, "naive": 2**21}
                c["host_sync_free"] = {"ours": {"train_step": True, "first_sync": None},
                                       "naive": {"train_step": False, "first_sync": "slogdet"}}
        (out_dir / f"{part}-cuda.json").write_text(json.dumps(report))


def test_quick_mode_refuses_to_overwrite_full_results(tmp_path):
    (tmp_path / "e2e-cpu.json").write_text(json.dumps({"config": {"quick": False}}))
    with pytest.raises(bench_suite.BenchError, match="full results"):
        bench_suite._refuse_to_overwrite_full_results(tmp_path, ("e2e",), "cpu")
    bench_suite._refuse_to_overwrite_full_results(tmp_path, ("logdet",), "cpu")


def test_bench_is_a_command():
    from glow_ext.__main__ import COMMANDS

    assert "bench" in [name for name, *_ in COMMANDS]


def test_e2e_size_and_compile_options_replace_the_configs():
    parser = argparse.ArgumentParser()
    bench_suite.add_arguments(parser)
    args = parser.parse_args(["--parts", "e2e", "--e2e-size", "8,3,128,16", "--e2e-compile", "none"])
    (config,) = bench_suite.e2e_configs(bench_suite.E2E_CONFIGS["cuda"], args.e2e_size, args.e2e_compile)
    assert (config["K"], config["L"], config["hidden"], config["batch"]) == (8, 3, 128, 16)
    assert config["compile_backend"] is None and config["name"] == "cifar10 K8 L3 w128 b16"
    configs = bench_suite.e2e_configs(bench_suite.QUICK_E2E_CONFIGS, None, "inductor")
    assert [c["compile_backend"] for c in configs] == ["inductor"] and configs[0]["K"] == 2
    assert bench_suite.e2e_configs(bench_suite.QUICK_E2E_CONFIGS) == bench_suite.QUICK_E2E_CONFIGS
    with pytest.raises(SystemExit):
        parser.parse_args(["--e2e-size", "8,3,128"])


def test_custom_e2e_runs_need_their_own_out_folder():
    result = _bench(["--parts", "e2e", "--e2e-compile", "none"])
    assert result.returncode == 2 and "need an --out of their own" in result.stderr
