"""`glow-ext bench-reversible --quick`: runs end to end and writes sane results."""
import json

import pytest

from glow_ext.__main__ import main


def test_quick_mode_writes_json_markdown_and_plot(tmp_path, capsys):
    assert main(["bench-reversible", "--quick", "--out", str(tmp_path)]) == 0
    assert "[4/4] K=4 reversible" in capsys.readouterr().out
    result = json.loads((tmp_path / "reversible-cpu.json").read_text())
    assert result["quick"] and result["config"]["ks"] == [2, 4]
    runs = {(r["K"], r["reversible"]): r for r in result["runs"]}
    assert runs[2, True]["saved_bytes"] == runs[4, True]["saved_bytes"]
    assert runs[2, False]["saved_bytes"] < runs[4, False]["saved_bytes"]
    assert runs[4, False]["saved_bytes"] > 3 * runs[4, True]["saved_bytes"]
    for run in result["runs"]:
        assert run["step_ms_min"] <= run["step_ms_median"] <= run["step_ms_max"]
    for check in result["agreement"]:
        assert check["grad_norm_rel_max"] <= 1e-3 and check["reconstruction_max_rel"] <= 1e-4
    assert result["targets"]["reversible_saved_bytes_flat_in_K"]
    assert "| 4 |" in (tmp_path / "reversible-cpu.md").read_text()
    assert (tmp_path / "reversible-cpu.png").read_bytes()[:4] == b"\x89PNG"


def test_quick_results_never_reach_the_readme(tmp_path):
    with pytest.raises(SystemExit, match="--update-readme takes full results"):
        main(["bench-reversible", "--quick", "--update-readme", "--out", str(tmp_path)])
