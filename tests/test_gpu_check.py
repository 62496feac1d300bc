"""benchmarks/gpu_check.sh through its dry run: the same steps, budget, caps, summary and tarball as on
the GPU machine, with stand-ins for the GPU commands. What the device tool brings back from $OUT is
at most 8 files, at most 2 folders deep, with plain names, each at most 16 MiB: the output must fit,
and a GPU run must report a failure of the build or of the CUDA tests in its exit status only."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from conftest import repo_root

SCRIPT = Path(repo_root()) / "benchmarks" / "gpu_check.sh"
STEPS = ["detect", "build", "info", "tests", "memcheck", "racecheck", "bench_ops", "e2e", "e2e_compiled",
         "tests_rest", "suite", "reversible", "inverse_cache"]
OUTPUTS = {"summary.txt", "ops-cuda.json", "e2e-cuda.json", "gpu-check-logs.tar.gz"}
MAX_FILE_BYTES = 16 * 2**20
PLAIN_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def _env(out, collect, **knobs):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k != "OUT"}
    env.update(OUT=str(out), PYTHON=sys.executable, GPU_CHECK_DRY_COLLECT="1" if collect else "0")
    env.update({f"GPU_CHECK_{k}": str(v) for k, v in knobs.items()})
    return env


def dry_run(out, collect=False, **knobs):
    """The dry run into out; knobs are GPU_CHECK_<name> settings."""
    return subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=_env(out, collect, **knobs),
                          capture_output=True, text=True, timeout=600)


def steps_of(summary):
    """{step: (rc, note)} from summary.txt's step table."""
    lines = summary.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["step", "rc"])
    table = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        name, rc, _secs, _limit, *note = line.split(None, 4)
        table[name] = (rc, note[0] if note else "")
    return table


def assert_fits(out):
    """The device tool's limits, checked here independently of the script's own check."""
    paths = list(out.rglob("*"))
    files = [p for p in paths if p.is_file()]
    assert len(files) <= 8, files
    for path in paths:
        rel = path.relative_to(out)
        assert all(PLAIN_NAME.match(part) for part in rel.parts), rel
        assert not path.is_symlink(), rel
        assert len(rel.parts) - (1 if path.is_file() else 0) <= 2, rel
    assert all(p.stat().st_size <= MAX_FILE_BYTES for p in files)


def tarball_members(out):
    with tarfile.open(out / "gpu-check-logs.tar.gz") as tar:
        return {m.name: m for m in tar.getmembers() if m.isfile()}


def tarball_text(out, name):
    with tarfile.open(out / "gpu-check-logs.tar.gz") as tar:
        return tar.extractfile(name).read().decode(errors="replace")


def test_script_is_valid_bash_and_clean_under_shellcheck():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_dry_run_writes_what_the_gpu_run_would_and_it_fits(tmp_path):
    """Every step in order, the pytest selections collected for real: the CUDA kernel tests without
    compile or bigmem tests, and small sanitizer selections from the kernel test files."""
    result = dry_run(tmp_path, collect=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert {p.name for p in tmp_path.iterdir()} == OUTPUTS
    assert_fits(tmp_path)

    summary = (tmp_path / "summary.txt").read_text()
    steps = steps_of(summary)
    assert list(steps) == STEPS
    assert steps["detect"][0] == "1" and "building" in steps["detect"][1]  # no prebuilt module here
    assert all(rc == "0" for name, (rc, _) in steps.items() if name != "detect"), steps
    assert "output limits: fits" in summary and summary.rstrip().endswith(
        "OVERALL: OK (CUDA kernels, build_info and the CUDA tests passed; later steps never decide this)")
    assert "memcheck: ========= ERROR SUMMARY: 0 errors" in summary
    assert "bench_ops:\n  summary: over 8 shapes" in summary and "\ne2e: cifar10" in summary
    counts = {step: int(re.search(rf"^{step}: (\d+) passed", summary, re.M).group(1))
              for step in ("tests", "tests_rest", "memcheck", "racecheck")}
    assert counts["tests"] > 100 and 0 < counts["racecheck"] < counts["memcheck"] < 150, counts
    for name in ("ops-cuda.json", "e2e-cuda.json"):
        assert json.loads((tmp_path / name).read_text())["stand_in"]

    members = tarball_members(tmp_path)
    assert {f"logs/{step}.log" for step in STEPS} <= set(members)
    assert {"summary.txt", "results/ops-cuda.json", "results/e2e/e2e-cuda.json", "results/tests-junit.xml",
            "results/suite/layers-cuda.json", "results/reversible/reversible-cuda.json"} <= set(members)
    selected = re.findall(r"^(tests/\S+\.py::.*)$", tarball_text(tmp_path, "logs/tests.log"), re.M)
    assert len(selected) == counts["tests"]
    assert any(t.startswith("tests/test_ops.py::test_forward_matches_reference_and_dense_float64[")
               for t in selected)
    assert any(t.startswith("tests/test_coupling_op.py::") for t in selected)
    assert not [t for t in selected if "compile" in t or "beyond_int32" in t]
    rest_log = tarball_text(tmp_path, "logs/tests_rest.log")
    assert "test_cuda_beyond_int32_indexing" in rest_log and "test_torch_compile_fullgraph_matches_eager" in rest_log
    memcheck_log = tarball_text(tmp_path, "logs/memcheck.log")
    tested_files = set(re.findall(r"^(tests/\w+\.py)::", memcheck_log, re.M))
    assert tested_files <= {"tests/test_ops.py", "tests/test_coupling_op.py", "tests/test_cuda_kernels.py"}
    assert "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in memcheck_log and "gradcheck]" not in memcheck_log


def test_a_step_past_its_cap_times_out_and_later_steps_still_run(tmp_path):
    result = dry_run(tmp_path, CAP_BENCH_OPS=2, DRY_SLEEP_BENCH_OPS=60, GRACE_S=1, MIN_STEP_S=1,
                     DRY_RC_E2E=2)
    assert result.returncode == 0, result.stdout[-3000:]
    steps = steps_of((tmp_path / "summary.txt").read_text())
    assert steps["bench_ops"] == ("124", "TIMED OUT")
    assert steps["e2e"][0] == "2" and steps["inverse_cache"][0] == "0"
    assert not (tmp_path / "ops-cuda.json").exists() and (tmp_path / "e2e-cuda.json").exists()
    assert "# rc=124" in tarball_text(tmp_path, "logs/bench_ops.log")
    assert_fits(tmp_path)


def test_steps_the_budget_cannot_hold_are_skipped(tmp_path):
    """memcheck runs into the end of a 6 s budget; every later step is skipped, the check is green."""
    result = dry_run(tmp_path, BUDGET_S=6, GRACE_S=1, MIN_STEP_S=1, DRY_SLEEP_MEMCHECK=60)
    assert result.returncode == 0, result.stdout[-3000:]
    steps = steps_of((tmp_path / "summary.txt").read_text())
    assert all(steps[name][0] == "0" for name in ("build", "info", "tests"))
    assert steps["memcheck"][0] == "124"
    for name in STEPS[STEPS.index("racecheck"):]:
        assert steps[name][0] == "-" and "of the budget left" in steps[name][1], (name, steps[name])
    assert {"logs/memcheck.log", "logs/tests.log"} <= set(tarball_members(tmp_path))
    assert_fits(tmp_path)


def test_failed_cuda_tests_fail_the_check_and_the_benchmarks_still_run(tmp_path):
    result = dry_run(tmp_path, DRY_RC_TESTS=1)
    assert result.returncode == 1
    summary = (tmp_path / "summary.txt").read_text()
    assert steps_of(summary)["bench_ops"][0] == "0"
    assert summary.rstrip().endswith("OVERALL: FAILED (CUDA tests rc=1)")


def test_a_failed_build_skips_every_gpu_step(tmp_path):
    result = dry_run(tmp_path, DRY_RC_BUILD=1)
    assert result.returncode == 1
    steps = steps_of((tmp_path / "summary.txt").read_text())
    assert steps["build"][0] == "1"
    for name in STEPS[STEPS.index("info"):]:
        assert steps[name][0] == "-" and "no CUDA kernels" in steps[name][1], (name, steps[name])
    assert "logs/build.log" in tarball_members(tmp_path)
    assert_fits(tmp_path)


def test_a_prebuilt_module_saves_the_build(tmp_path):
    result = dry_run(tmp_path, DRY_PREBUILT=1)
    assert result.returncode == 0, result.stdout[-3000:]
    steps = steps_of((tmp_path / "summary.txt").read_text())
    assert steps["detect"] == ("0", "a prebuilt module with CUDA kernels loads: no build")
    assert steps["build"] == ("-", "skipped: the prebuilt module is used")
    assert steps["tests"][0] == "0"


def test_logs_too_large_for_the_tarball_lose_their_middles(tmp_path):
    limit = 400_000
    result = dry_run(tmp_path, MAX_FILE_BYTES=limit, DRY_LOG_BYTES_TESTS=3_000_000)
    assert result.returncode == 0, result.stdout[-3000:]
    assert (tmp_path / "gpu-check-logs.tar.gz").stat().st_size <= limit
    summary = (tmp_path / "summary.txt").read_text()
    assert "middles cut from: tests.log" in summary
    tests_log = tarball_text(tmp_path, "logs/tests.log")
    assert tests_log.startswith("$ bash ") and "bytes from the middle of this log" in tests_log
    assert tests_log.rstrip().splitlines()[-1].startswith("# rc=0")


def test_output_that_breaks_the_limits_fails_the_dry_run(tmp_path):
    for name in ("a", "b", "c", "d", "e"):
        (tmp_path / name).write_text("x")
    (tmp_path / "one" / "two" / "three").mkdir(parents=True)
    (tmp_path / "bad name").write_text("x")
    result = dry_run(tmp_path)
    assert result.returncode == 3
    summary = (tmp_path / "summary.txt").read_text()
    limits = next(line for line in summary.splitlines() if line.startswith("output limits: DOES NOT FIT: "))
    for problem in ("folder too deep 'one/two/three'", "name 'bad name'", "too many files", "10 files (at most 8)"):
        assert problem in limits


def test_a_stopped_check_packs_what_it_has(tmp_path):
    """The device tool may stop the check (SIGTERM): the running step is killed, summary and tarball
    are still written."""
    proc = subprocess.Popen(["bash", str(SCRIPT), "--dry-run"], env=_env(tmp_path, False, DRY_SLEEP_TESTS=60),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if re.match(r"\[ *\d+s\] info ", line):
                break
        time.sleep(1)  # the tests stand-in is starting
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143
    summary = (tmp_path / "summary.txt").read_text()
    steps = steps_of(summary)
    assert steps["tests"] == ("143", "INTERRUPTED (the check was stopped)")
    assert steps["memcheck"] == ("-", "not reached (the check was stopped)")
    assert "the check was stopped early" in summary.splitlines()[-1]
    assert "logs/tests.log" in tarball_members(tmp_path)
    assert_fits(tmp_path)
