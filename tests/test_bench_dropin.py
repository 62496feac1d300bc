"""`glow-ext bench-dropin --quick`: runs end to end and writes the JSON fields the README quotes
(no timing assertions: the machine may be loaded)."""
import json

import pytest

from glow_ext.__main__ import main
from glow_ext.bench import dropin


def test_quick_mode_writes_the_json(tmp_path, capsys):
    assert main(["bench-dropin", "--quick", "--out", str(tmp_path)]) == 0
    assert "wrote" in capsys.readouterr().out
    report = json.loads((tmp_path / "dropin-cpu.json").read_text())
    assert report["config"]["quick"] and report["config"]["K"] == dropin.QUICK["K"]
    assert report["torch_version"] and report["build_info"]["cpu_kernels"]
    assert [a["anchor"] for a in report["anchors"]] == list(dropin.ANCHORS)
    for anchor in report["anchors"]:
        others = [m for m in anchor["methods"] if m != "original"]
        assert anchor["methods"][0] == "original" and len(others) == 2
        for method in anchor["methods"]:
            timing = anchor["timing"][method]
            assert timing["n"] == dropin.QUICK["reps"] and timing["median_ms"] > 0
            assert timing["iqr_ms"] >= 0
        for method in others:
            assert anchor["checks"][method]["loss"] <= dropin.LOSS_TOL
            assert anchor["checks"][method]["grads"] <= dropin.GRAD_TOL
            expected = anchor["timing"]["original"]["median_ms"] / anchor["timing"][method]["median_ms"]
            assert anchor["speedup"][method] == pytest.approx(expected)
            low, high = anchor["speedup_iqr_band"][method]
            assert low <= anchor["speedup"][method] <= high
            assert anchor["replaced_layers_share"][method] > 0
            assert anchor["layer_calls"][f"original layers {method} replaces"] > 0
            assert anchor["target_met"][method] == (anchor["speedup"][method] >= report["target_ratio"])


def test_quick_results_never_overwrite_full_ones(tmp_path, capsys):
    (tmp_path / "dropin-cpu.json").write_text(json.dumps({"config": {"quick": False}}))
    assert main(["bench-dropin", "--quick", "--out", str(tmp_path)]) == 2
    assert "would overwrite the full results" in capsys.readouterr().err


def test_a_disagreeing_dropin_aborts_before_timing(monkeypatch):
    models, x = dropin._build("rosinality", dropin.QUICK, "cpu", 0)
    with torch_no_grad():
        next(models["compat"][0].parameters()).add_(0.1)
    with pytest.raises(dropin.BenchError, match="disagrees with the original"):
        dropin.check_agreement(models, x)


def torch_no_grad():
    import torch

    return torch.no_grad()
