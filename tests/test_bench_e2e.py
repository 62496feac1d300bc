"""The end-to-end benchmark (glow_ext.bench.e2e): its agreement checks catch a wrong model, and a
quick run reports every method with its spread, roofline fraction and speed-up, renders and plots.
No timing is asserted."""
import math

import pytest
import torch

from glow_ext.bench import anchor_rosinality as ros
from glow_ext.bench import e2e, report
from glow_ext.bench.common import BenchError
from glow_ext.models import Glow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _initialised_pair(K=1, L=2, hidden=8, size=8):
    torch.manual_seed(0)
    ours = Glow(in_channels=3, image_size=size, K=K, L=L, hidden_channels=hidden)
    rosinality = ros.RosinalityGlow(3, K, L, hidden)
    x = torch.rand(4, 3, size, size) - 0.5
    with torch.no_grad():
        ours(x)  # ActNorm init
    return ours, rosinality, x


def test_rosinality_check_agrees_and_catches_a_wrong_weight_mapping(monkeypatch):
    ours, rosinality, x = _initialised_pair()
    before = {k: v.clone() for k, v in rosinality.state_dict().items()}
    assert e2e.check_rosinality(ours, rosinality, x, seed=0)["rosinality_bits_per_dim"] < e2e.ROSINALITY_TOL
    # The timed model is left as it was built.
    assert all(torch.equal(before[k], v) for k, v in rosinality.state_dict().items())

    mapping = e2e.rosinality_state_from_ours

    def unswapped_coupling_outputs(source, target):
        """The mapping without the reordering of (shift, logit) into (log_s, t)."""
        state = mapping(source, target)
        for key, value in state.items():
            if ".coupling.net.4." in key and not key.endswith("weight"):
                dim = 1 if key.endswith("scale") else 0
                half = value.shape[dim] // 2
                state[key] = torch.cat([value.narrow(dim, half, half), value.narrow(dim, 0, half)], dim)
        return state

    monkeypatch.setattr(e2e, "rosinality_state_from_ours", unswapped_coupling_outputs)
    with pytest.raises(BenchError, match="rosinality_bits_per_dim"):
        e2e.check_rosinality(ours, rosinality, x, seed=0)


def test_compiled_check_catches_a_different_loss():
    ours, _, x = _initialised_pair()
    with pytest.raises(BenchError, match="compiled_loss"):
        e2e.check_compiled(ours, lambda x: 1.01 * e2e._bpd_loss(ours, x), x)


class _Silent:
    def task(self, what):
        pass


@pytest.mark.compile
def test_quick_run_reports_every_method(tmp_path):
    torch._dynamo.reset()
    body = e2e.run_e2e("cpu", e2e.QUICK_CONFIGS, (2, 1.0, 1), seed=0, progress=_Silent())
    (c,) = body["configs"]
    assert set(c["train_step"]) == set(e2e.TRAIN_METHODS) and set(c["sample"]) == set(e2e.SAMPLE_METHODS)
    assert max(v for k, v in c["checks"].items() if k != "shared_parameters") < e2e.TOL
    assert c["speedup_vs_rosinality"]["train"]["rosinality"] == 1.0
    for m in e2e.TRAIN_METHODS:
        t = c["train_step"][m]
        assert t["median_ms"] > 0 and t["iqr_ms"] >= 0 and t["n"] == 2
        assert c["roofline"][m]["gflop"] > 0 and 0 < c["roofline"][m]["fraction"] and math.isfinite(
            c["roofline"][m]["fraction"])
    # Our step counts the same convolutions as rosinality's, less its 1x1 convs (our ops are not
    # counted by the flop counter), so never more.
    assert c["roofline"]["ours"]["gflop"] <= c["roofline"]["rosinality"]["gflop"]
    for kind in ("train", "sample"):
        conv = c["convolutions_alone"][kind]
        timing = c["train_step" if kind == "train" else "sample"]["ours"]
        assert 0 < conv["median_ms"] < 5 * timing["median_ms"] and conv["bound_vs_rosinality"] > 0

    full = {"device": "cpu", "date": "2026-12-01T00:00:00+00:00", "config": {"quick": True},
            "machine": {"cpu_model": "Test CPU", "torch_num_threads": 2}, **body}
    lines = "\n".join(report.e2e_markdown(full, ""))
    for label in e2e.METHOD_LABELS.values():
        assert f"| K=2 L=3 width 16 batch 4 | {label} |" in lines
    assert "Convolutions alone" in lines
    assert report.part_digest("e2e", full).startswith("e2e: cifar10 K2 w16 b4: train img/s ours")
    try:
        path = report.plot_e2e(full, tmp_path / "e2e.png")
    except ImportError:
        pytest.skip("matplotlib is not installed")
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_eager_only_run_leaves_the_compiled_method_out(tmp_path):
    """compile_backend None (`glow-ext bench --e2e-compile none`): no torch.compile, no ours_compiled
    row, and the report renders without it."""
    config = dict(e2e.QUICK_CONFIGS[0], compile_backend=None)
    body = e2e.run_e2e("cpu", [config], (2, 1.0, 1), seed=0, progress=_Silent())
    (c,) = body["configs"]
    assert c["compile_s"] is None and "compiled_loss" not in c["checks"]
    assert set(c["train_step"]) == set(e2e.TRAIN_METHODS) - {"ours_compiled"}
    assert set(c["sample"]) == set(e2e.SAMPLE_METHODS)

    full = {"device": "cpu", "date": "2026-12-01T00:00:00+00:00", "config": {"quick": True},
            "machine": {"cpu_model": "Test CPU", "torch_num_threads": 2}, **body}
    lines = "\n".join(report.e2e_markdown(full, ""))
    assert f"| {e2e.METHOD_LABELS['ours_compiled']} | — | — | — | — |" in lines
    assert "Compile time" not in lines
    digest = report.part_digest("e2e", full)
    assert "ours_compiled" not in digest and "naive" in digest
    try:
        path = report.plot_e2e(full, tmp_path / "e2e.png")
    except ImportError:
        pytest.skip("matplotlib is not installed")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
