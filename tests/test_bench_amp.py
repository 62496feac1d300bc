"""`glow-ext bench-amp` (glow_ext.bench.amp): a quick run reports every method with its spread,
ratios, goals, round-trip errors and agreement checks, renders its docs section, and refuses to put
quick results in the docs or to time a model whose autocast loss strays. No timing is asserted."""
import argparse
import json

import pytest
import torch

from glow_ext.bench import amp
from glow_ext.bench.common import BenchError
from glow_ext.models import Glow


def quick_args(tmp_path, **overrides):
    parser = argparse.ArgumentParser()
    amp.add_arguments(parser)
    args = parser.parse_args(["--quick", "--out", str(tmp_path)])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("amp")
    amp.run(quick_args(out), stream=open("/dev/null", "w"))
    return json.loads((out / "amp-cpu.json").read_text())


def test_quick_run_reports_every_method_ratio_and_round_trip(quick_report):
    (c,) = quick_report["configs"]
    assert quick_report["config"]["quick"] and quick_report["config"]["amp"] == "bf16"
    assert set(c["train_step"]) == set(amp.TRAIN_METHODS) and set(c["sample"]) == set(amp.SAMPLE_METHODS)
    for timing in (*c["train_step"].values(), *c["sample"].values()):
        assert timing["median_ms"] > 0 and timing["iqr_ms"] >= 0 and timing["n"] >= 2
    for kind, ratios in c["speedups"].items():
        for r in ratios.values():
            low, high = r["iqr_band"]
            assert low <= r["ratio"] <= high
    train = c["train_step"]
    expected = train["ours"]["median_ms"] / train["ours_amp"]["median_ms"]
    assert c["speedups"]["train"]["amp_vs_float32"]["ratio"] == pytest.approx(expected)
    assert c["goals"]["met"]["amp_vs_rosinality_amp"] == (
        c["speedups"]["train"]["amp_vs_rosinality_amp"]["ratio"] >= amp.GOALS["amp_vs_rosinality_amp"])
    assert set(c["round_trip"]) == {"float32", "bf16"}
    assert list(c["round_trip"]["bf16"]) == ["level 0 12x16x16", "level 1 24x8x8", "level 2 48x4x4",
                                             "whole model"]
    assert all(0 <= e < 1e-2 for errors in c["round_trip"].values() for e in errors.values())
    assert c["checks"]["amp_loss_vs_float32"] < amp.AMP_LOSS_TOL
    assert set(quick_report["ceilings"]["gemm_gflops"]) == {"float32", "bfloat16"}
    assert all(0 < f for f in c["roofline"].values())


def test_docs_section_is_rendered_from_the_json(quick_report, tmp_path):
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- bench:amp-cpu:begin -->\nold\n<!-- bench:amp-cpu:end -->\nrest\n")
    amp.update_docs(quick_report, tmp_path / "amp-cpu.json", page)
    text = page.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    (c,) = quick_report["configs"]
    ratio = c["speedups"]["train"]["amp_vs_float32"]["ratio"]
    assert f"{ratio:.2f}x" in text and "](amp-cpu.json)" in text
    for label in amp.LABELS.values():
        assert label in text


def test_update_readme_refuses_quick_results(tmp_path):
    with pytest.raises(BenchError, match="full results only"):
        amp.run(quick_args(tmp_path, update_readme=True), stream=open("/dev/null", "w"))


def test_round_trip_error_reflects_a_broken_inverse(monkeypatch):
    """The round-trip figure is measured, not assumed: an inverse that is off shows up in it."""
    from glow_ext.flow_layers import FlowStep

    torch.manual_seed(0)
    model = Glow(in_channels=3, image_size=8, K=1, L=2, hidden_channels=8)
    x = torch.rand(2, 3, 8, 8) - 0.5
    with torch.no_grad():
        model(x)
    exact = amp.round_trip_errors(model, x, "none", torch.device("cpu"))
    assert max(exact.values()) < 1e-5
    reverse = FlowStep.reverse
    monkeypatch.setattr(FlowStep, "reverse", lambda self, y: reverse(self, y) * 1.01)
    broken = amp.round_trip_errors(model, x, "none", torch.device("cpu"))
    assert min(broken.values()) > 1e-3
