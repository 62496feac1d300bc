"""`glow-ext bench-dropin-flows --quick`: runs end to end and writes the JSON fields that
docs/performance.md quotes (no timing assertions: the machine may be loaded)."""
import json

import pytest

pytest.importorskip("normflows")
pytest.importorskip("nflows")

import torch  # noqa: E402

from glow_ext.__main__ import main  # noqa: E402
from glow_ext.bench import dropin_flows  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("dropin-flows")
    assert main(["bench-dropin-flows", "--quick", "--out", str(out)]) == 0
    return json.loads((out / "dropin-flows-cpu.json").read_text())


def test_quick_mode_writes_every_case_with_its_agreement(report):
    assert report["config"]["quick"] and report["config"]["modes"] == list(dropin_flows.MODES)
    assert report["torch_version"] and report["glow_ext_version"] and report["build_info"]
    assert "module" not in report["build_info"]  # no machine paths in committed results
    assert report["ceilings"]["gemm_gflops"]["float32"] > 0 and report["ceilings"]["copy_gbps"] > 0
    cases = dropin_flows.all_cases()
    assert [(c["peer"], c["layer"], c["setting"]) for c in report["cases"]] == [
        (c.peer, c.layer, c.setting) for c in cases]
    for result, case in zip(report["cases"], cases):
        assert tuple(result["shape"]) == dropin_flows.quick_shape(case.shape)
        assert set(result["checks"]) == {"output", "logdet", "sample", "grads"}
        assert all(0 <= err <= dropin_flows.TOL for err in result["checks"].values()), result
        assert ("valid_fraction" in result) == case.masked


def test_ratios_and_rooflines_follow_from_the_recorded_medians(report):
    ceilings = report["ceilings"]
    for result in report["cases"]:
        timing = result["timing"]
        assert set(timing) == {f"{m} {mode}" for m in dropin_flows.METHODS
                               for mode in dropin_flows.MODES}
        for entry in timing.values():
            assert entry["n"] == dropin_flows.QUICK["reps"] and entry["median_ms"] > 0
            assert entry["iqr_ms"] >= 0
        for mode in dropin_flows.MODES:
            base, ours = timing[f"original {mode}"], timing[f"ours {mode}"]
            assert result["ratio"][mode] == pytest.approx(base["median_ms"] / ours["median_ms"])
            low, high = result["ratio_iqr_band"][mode]
            assert low <= result["ratio"][mode] <= high
            work = result["work"][mode]
            floor = max(work["flops"] / (ceilings["gemm_gflops"]["float32"] * 1e9),
                        work["bytes"] / (ceilings["copy_gbps"] * 1e9)) * 1e3
            for method in dropin_flows.METHODS:
                assert result["roofline_pct"][method][mode] == pytest.approx(
                    100 * floor / timing[f"{method} {mode}"]["median_ms"])


def test_quick_results_never_overwrite_full_ones(tmp_path, capsys):
    (tmp_path / "dropin-flows-cpu.json").write_text(json.dumps({"config": {"quick": False}}))
    assert main(["bench-dropin-flows", "--quick", "--out", str(tmp_path)]) == 2
    assert "would overwrite the full results" in capsys.readouterr().err


def test_a_disagreeing_dropin_aborts_before_timing():
    case = dropin_flows.all_cases()[0]
    modules, x, mask = dropin_flows.build(case, dropin_flows.quick_shape(case.shape), "cpu", 0)
    with torch.no_grad():
        next(modules["ours"].parameters()).add_(0.01)
    with pytest.raises(dropin_flows.BenchError, match="disagrees with the original"):
        dropin_flows.check_agreement(case, modules, x, mask)
