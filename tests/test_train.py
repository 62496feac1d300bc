"""glow_ext.training and the train / sample / evaluate / ablate commands, on tiny models and few steps.

Most runs call glow_ext.__main__.main in-process; resume-after-kill, torchrun (DDP on gloo) and one
`python -m glow_ext` smoke test run in subprocesses with timeouts.
"""
import json
import errno
import io
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import repo_root
from glow_ext import training as gtrain
from glow_ext.models import LogitGlow
from glow_ext.training.errors import EXIT_INTERRUPTED
from glow_ext.__main__ import main

ROOT = Path(repo_root())
TINY = ["--K", "2", "--L", "2", "--hidden", "16", "--batch-size", "16", "--warmup", "2",
        "--lr", "2e-3", "--device", "cpu", "--log-every", "1", "--sample-every", "0",
        "--n-samples", "4"]
SUBPROCESS_TIMEOUT = 180


def read_metrics(run, split="train"):
    lines = (Path(run) / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if m["split"] == split]


def train_losses(run):
    return {m["step"]: m["loss"] for m in read_metrics(run)}


def env_for_subprocess():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(args, timeout=SUBPROCESS_TIMEOUT, **kwargs):
    return subprocess.run([sys.executable, "-m", "glow_ext", *args], cwd=ROOT, env=env_for_subprocess(),
                          capture_output=True, text=True, timeout=timeout, **kwargs)


# --------------------------------------------------------------------------------------------------
# A short run

def test_short_run_learns_and_writes_everything(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "40", "--eval-every", "20", "--sample-every", "20",
                 "--out", str(run)]) == 0
    err = capsys.readouterr().err
    assert "step 40/40" in err and "it/s" in err and "test bpd" in err
    losses = train_losses(run)
    assert sorted(losses) == list(range(1, 41))
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(36, 41)) / 5
    assert last < first - 0.15, (first, last)
    tests = read_metrics(run, "test")
    assert [m["step"] for m in tests] == [20, 40]
    for name in ("checkpoint.pt", "best.pt", "config.json", "summary.json", "samples/step_0000020.png",
                 "samples/step_0000040.png"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 40 and summary["best_test_bpd"] == min(m["bpd"] for m in tests)
    state = gtrain.load_checkpoint(run / "checkpoint.pt")
    assert state["step"] == 40 and "optimizer" in state and "scheduler" in state
    assert set(state["rng"]) >= {"torch", "numpy", "python", "cuda"}
    assert state["config"]["K"] == 2
    assert gtrain.load_checkpoint(run / "best.pt")["step"] == summary["best_step"]
    # The folder now holds a run: starting again without --resume or --force is refused.
    assert main(["train", *TINY, "--steps", "2", "--out", str(run)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_epochs_time_limit_and_ema(tmp_path):
    run = tmp_path / "run"
    summary = gtrain.train(dict(gtrain.DEFAULTS, K=1, L=2, hidden=8, batch_size=500, epochs=2,
                                eval_every=100, sample_every=0, log_every=1, ema=0.9, device="cpu",
                                out=str(run)))
    assert summary["step"] == 6  # 1500 // 500 = 3 steps per epoch
    summary = gtrain.train(dict(gtrain.DEFAULTS, K=1, L=2, hidden=8, steps=10_000, time_limit=1e-9,
                                eval_every=100, sample_every=0, device="cpu", out=str(run)), force=True)
    assert summary["step"] == 1 and summary["stopped_by"] == "time_limit"
    assert (run / "best.pt").is_file() and summary["final_test_bpd"] is not None


def test_reversible_run_gives_the_ordinary_losses(tmp_path):
    """--reversible (with the digits default coupling dropout, whose masks it replays) trains like
    the ordinary model: same losses up to float rounding."""
    common = ["train", *TINY, "--steps", "5", "--eval-every", "5"]
    assert main([*common, "--out", str(tmp_path / "ordinary")]) == 0
    assert main([*common, "--reversible", "--out", str(tmp_path / "reversible")]) == 0
    a, b = train_losses(tmp_path / "ordinary"), train_losses(tmp_path / "reversible")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])
    config = json.loads((tmp_path / "reversible" / "config.json").read_text())
    assert config["reversible"] is True and config["dropout"] > 0


@pytest.mark.compile
def test_compiled_run_gives_the_eager_losses(tmp_path, capsys):
    """--compile: the first step runs eagerly (ActNorm's init), the others through torch.compile of
    model + loss; the losses are eager's up to float32 rounding of the fused reductions. Dropout
    is off: compiled dropout draws other random numbers than eager."""
    common = ["train", *TINY, "--dropout", "0", "--steps", "3", "--eval-every", "3"]
    assert main([*common, "--out", str(tmp_path / "eager")]) == 0
    assert main([*common, "--compile", "--out", str(tmp_path / "compiled")]) == 0
    a, b = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])
    assert json.loads((tmp_path / "compiled" / "config.json").read_text())["compile"] is True
    capsys.readouterr()
    assert main([*common, "--compile", "--reversible", "--out", str(tmp_path / "both")]) == 2
    assert "--compile and --reversible" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Resume

def test_resume_gives_the_uninterrupted_losses(tmp_path):
    common = [*TINY, "--lr-decay", "cosine", "--steps", "8", "--eval-every", "3"]
    assert main(["train", *common, "--out", str(tmp_path / "full")]) == 0
    # A run stopped by its time limit after step 1, then resumed to step 8 (the limit is not inherited).
    assert main(["train", *TINY, "--lr-decay", "cosine", "--steps", "8", "--eval-every", "3",
                 "--out", str(tmp_path / "split"), "--time-limit", "1e-9"]) == 0
    assert gtrain.load_checkpoint(tmp_path / "split" / "checkpoint.pt")["step"] == 1
    assert main(["train", "--resume", "--out", str(tmp_path / "split"), "--steps", "8"]) == 0
    full, split = train_losses(tmp_path / "full"), train_losses(tmp_path / "split")
    assert sorted(split) == list(range(1, 9))
    for s in range(1, 9):
        assert split[s] == full[s], (s, split[s], full[s])
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def wait_for_checkpoint(proc, run, min_step):
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while time.monotonic() < deadline:
        ckpt = run / "checkpoint.pt"
        if ckpt.exists() and gtrain.load_checkpoint(ckpt)["step"] >= min_step:
            return
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.2)
    pytest.fail(f"the run wrote no checkpoint at step >= {min_step} in time")


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_resume_after_kill_continues_with_the_same_next_loss(tmp_path, sig):
    """SIGKILL: the run dies at once and resumes from its last periodic checkpoint. SIGTERM and
    SIGINT: it stops after the step in progress, writes its checkpoint at that step, prints the
    command that resumes it and exits with EXIT_INTERRUPTED. Either way, resuming computes the loss
    the uninterrupted run computes."""
    run = tmp_path / "killed"
    args = [*TINY, "--lr-decay", "none", "--steps", "100000", "--checkpoint-every", "3",
            "--eval-every", "100000", "--time-limit", "150", "--out", str(run)]
    proc = subprocess.Popen([sys.executable, "-m", "glow_ext", "train", *args], cwd=ROOT,
                            env=env_for_subprocess(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for_checkpoint(proc, run, 6)
        os.killpg(proc.pid, getattr(signal, sig))
        proc.wait(timeout=60)
        stderr = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stderr.close()
    step = gtrain.load_checkpoint(run / "checkpoint.pt")["step"]
    before = train_losses(run)
    logged_next = before.get(step + 1)  # what the killed process computed after its checkpoint
    if sig != "SIGKILL":
        assert proc.returncode == EXIT_INTERRUPTED, stderr[-3000:]
        # The checkpoint is at the last step it logged, not at the last periodic checkpoint.
        assert max(before) == step and sorted(before) == list(range(1, step + 1))
        resume_line = [line for line in stderr.splitlines() if "Resume with:" in line]
        assert len(resume_line) == 1, stderr[-3000:]
        assert f"stopped by {sig} at step {step}" in resume_line[0]
        assert resume_line[0].endswith(f"Resume with: glow-ext train --resume --out {shlex.quote(str(run))}")

    result = run_cli(["train", "--resume", "--out", str(run), "--steps", str(step + 1),
                      "--time-limit", "1000"])
    assert result.returncode == 0, result.stderr
    after = train_losses(run)
    assert max(after) == step + 1
    resumed = after[step + 1]
    if logged_next is not None:
        assert resumed == logged_next, (resumed, logged_next)
    # And the uninterrupted run from scratch reaches the same loss at that step.
    fresh = tmp_path / "fresh"
    fresh_args = [a if a != str(run) else str(fresh) for a in args]
    fresh_args[fresh_args.index("--steps") + 1] = str(step + 1)
    # In a subprocess like the others: bitwise equality needs the same thread count (1).
    result = run_cli(["train", *fresh_args])
    assert result.returncode == 0, result.stderr
    assert train_losses(fresh)[step + 1] == resumed


def test_a_stop_signal_abandons_the_evaluation_and_resume_redoes_it(tmp_path, monkeypatch, capsys):
    """SIGTERM while the test set is being evaluated: the evaluation stops between two batches,
    the checkpoint notes it as pending, and the resumed run evaluates that step first, as the
    uninterrupted run did."""
    from glow_ext.training import evaluation

    original = evaluation.gdata.dequantize
    batches = {"n": 0}

    def dequantize_then_signal(levels, n_bins, **kwargs):
        if levels.shape[0] == 32:  # an evaluation batch (--eval-batch-size 32)
            batches["n"] += 1
            if batches["n"] == 2:
                signal.raise_signal(signal.SIGTERM)
        return original(levels, n_bins, **kwargs)

    args = [*TINY, "--steps", "6", "--eval-every", "3", "--eval-batch-size", "32"]
    monkeypatch.setattr(evaluation.gdata, "dequantize", dequantize_then_signal)
    assert main(["train", *args, "--out", str(tmp_path / "split")]) == EXIT_INTERRUPTED
    monkeypatch.setattr(evaluation.gdata, "dequantize", original)
    assert "stopped by SIGTERM at step 3" in capsys.readouterr().err
    state = gtrain.load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert state["step"] == 3 and state["pending"] == {"eval": True, "samples": False}
    assert batches["n"] == 2 and read_metrics(tmp_path / "split", "test") == []

    assert main(["train", "--resume", "--out", str(tmp_path / "split")]) == 0
    assert main(["train", *args, "--out", str(tmp_path / "full")]) == 0
    split, full = read_metrics(tmp_path / "split", "test"), read_metrics(tmp_path / "full", "test")
    assert [m["step"] for m in split] == [m["step"] for m in full] == [3, 6]
    assert [m["bpd"] for m in split] == [m["bpd"] for m in full]


def descendants_with_rank(pid, rank):
    """The pid of the process under `pid` (torchrun) whose environment has RANK=rank."""
    children = [pid]
    found = []
    while children:
        parent = children.pop()
        try:
            kids = [int(k) for k in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]
        except OSError:
            continue
        children.extend(kids)
        for kid in kids:
            try:
                environ = Path(f"/proc/{kid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                found.append(kid)
    return found


def test_torchrun_ranks_stop_together_on_a_signal_to_one(tmp_path):
    """SIGTERM to rank 1 only: rank 0 learns of it through the step's all-reduce, both stop after
    the same step, rank 0 writes the one checkpoint, and the run resumed on two processes gives the
    losses of an uninterrupted one-process run."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists() or not Path("/proc/self/task").exists():
        pytest.skip("needs torchrun next to this python and Linux's /proc")
    run = tmp_path / "two"
    args = ["train", *TINY, "--lr-decay", "none", "--optimizer", "sgd", "--lr", "0.02",
            "--dropout", "0", "--eval-every", "100000", "--checkpoint-every", "3"]
    proc = subprocess.Popen([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "glow_ext",
                             *args, "--steps", "100000", "--time-limit", "150", "--out", str(run)],
                            cwd=ROOT, env=env_for_subprocess(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for_checkpoint(proc, run, 3)
        rank1 = descendants_with_rank(proc.pid, 1)
        assert len(rank1) == 1, rank1
        os.kill(rank1[0], signal.SIGTERM)
        proc.wait(timeout=SUBPROCESS_TIMEOUT)
        stderr = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stderr.close()
    assert "stopped by a stop signal received by another process" in stderr, stderr[-4000:]
    assert stderr.count("Resume with: torchrun --nproc_per_node 2 -m glow_ext train --resume") == 1
    step = gtrain.load_checkpoint(run / "checkpoint.pt")["step"]
    assert sorted(train_losses(run)) == list(range(1, step + 1))

    two = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "glow_ext",
                          "train", "--resume", "--out", str(run), "--steps", str(step + 2)], cwd=ROOT,
                         env=env_for_subprocess(), capture_output=True, text=True,
                         timeout=SUBPROCESS_TIMEOUT)
    assert two.returncode == 0, two.stderr[-4000:]
    one = run_cli([*args, "--steps", str(step + 2), "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    l1, l2 = train_losses(tmp_path / "one"), train_losses(run)
    assert sorted(l1) == sorted(l2) == list(range(1, step + 3))
    for s in l1:
        assert abs(l1[s] - l2[s]) <= 1e-5, (s, l1[s], l2[s])


# Written by the trainer before it moved to glow_ext.training and to AveragedModel for the EMA
# (digits, K=1 L=2 hidden 8, batch 16, --ema 0.9, 4 of 4 steps; EMA state {"decay", "updates",
# "shadow"}). That trainer, resumed from it with --steps 7, logged these losses and test bpd (the
# test bpd is the EMA's).
OLD_EMA_CHECKPOINT = ROOT / "tests" / "fixtures" / "ema-v1-checkpoint.pt"
OLD_RESUMED_LOSSES = {5: 3.191826820373535, 6: 3.2070200443267822, 7: 3.2153220176696777}
OLD_RESUMED_TEST_BPD = 3.1711027349285805
# Since these were logged the coupling networks run channels-last on the CPU and Adam is fused: both
# round differently in float32 (step 5 came out 1.2e-5 relative off), so "as before" is within 1e-4.
OLD_RESUMED_RTOL = 1e-4


def test_a_checkpoint_with_the_old_ema_format_loads_and_resumes_as_before(tmp_path):
    from glow_ext.training.objective import load_ema_state, make_ema

    state = gtrain.load_checkpoint(OLD_EMA_CHECKPOINT)
    assert set(state["ema"]) == {"decay", "updates", "shadow"} and state["ema"]["updates"] == 4
    model, _ = gtrain.model_from_checkpoint(state)
    ema = make_ema(model, state["config"]["ema"])
    load_ema_state(ema, state["ema"], model)
    assert int(ema.n_averaged) == 4
    for name, p in ema.module.named_parameters():
        assert torch.equal(p, state["ema"]["shadow"][name]), name
    assert any(not torch.equal(p, state["model"][name]) for name, p in ema.module.named_parameters())

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(OLD_EMA_CHECKPOINT.read_bytes())
    assert main(["train", "--resume", "--out", str(run), "--steps", "7"]) == 0
    losses = train_losses(run)
    assert sorted(losses) == [5, 6, 7]
    for step, expected in OLD_RESUMED_LOSSES.items():
        assert abs(losses[step] - expected) <= OLD_RESUMED_RTOL * expected, (step, losses[step], expected)
    test = read_metrics(run, "test")
    assert [m["step"] for m in test] == [7]
    assert abs(test[0]["bpd"] - OLD_RESUMED_TEST_BPD) <= OLD_RESUMED_RTOL * OLD_RESUMED_TEST_BPD, test[0]["bpd"]
    # What it writes now is AveragedModel's state, and that resumes too.
    assert "n_averaged" in gtrain.load_checkpoint(run / "checkpoint.pt")["ema"]
    assert main(["train", "--resume", "--out", str(run), "--steps", "8"]) == 0


def test_resume_refuses_a_changed_model(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "2", "--out", str(run)]) == 0
    assert main(["train", "--resume", "--out", str(run), "--K", "3"]) == 2
    assert "cannot change --K" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(tmp_path / "empty")]) == 2
    assert "does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Failures

def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    calls = {"n": 0}
    original = gtrain.Objective.forward

    def poisoned(self, x, y=None):
        loss, bpd = original(self, x, y)
        calls["n"] += 1
        if calls["n"] == 7:
            loss = loss * float("nan")
        return loss, bpd

    monkeypatch.setattr(gtrain.Objective, "forward", poisoned)
    code = main(["train", *TINY, "--steps", "20", "--checkpoint-every", "5", "--eval-every", "100",
                 "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 3
    assert "diverged at step 7" in err and "last good checkpoint" in err
    state = gtrain.load_checkpoint(run / "checkpoint.pt")
    assert state["step"] == 5
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert max(train_losses(run)) == 6


class FailingWrites:
    """Simulates a disk fault in the Nth write of a run file: after `after` good writes of the file
    named `name`, the next one fails with OSError(code) at `stage` (write: half the bytes reach the
    disk first; fsync; replace)."""

    def __init__(self, monkeypatch, name, stage, code, after):
        from glow_ext.training import checkpoint

        self.name, self.stage, self.code, self.left = name, stage, code, after
        self.failed = False
        real_fsync, real_replace, real_write = os.fsync, os.replace, os.write
        test = self

        class HalfWrittenFile(io.FileIO):
            def write(self, data):
                super().write(bytes(data)[: len(data) // 2])
                raise OSError(test.code, os.strerror(test.code))

        def fsync(fd):
            if test.hit("fsync", os.readlink(f"/proc/self/fd/{fd}")):
                raise OSError(code, os.strerror(code))
            return real_fsync(fd)

        def replace(src, dst):
            if test.hit("replace", str(dst)):
                raise OSError(code, os.strerror(code))
            return real_replace(src, dst)

        def write(fd, data):
            if test.hit("append", os.readlink(f"/proc/self/fd/{fd}")):
                real_write(fd, bytes(data)[: len(data) // 2])
                raise OSError(code, os.strerror(code))
            return real_write(fd, data)

        def open_for_checkpoint(path, mode="r", *args, **kwargs):
            if mode == "wb" and test.hit("write", str(path)):
                return HalfWrittenFile(path, mode)
            return open(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(checkpoint, "open", open_for_checkpoint, raising=False)

    def hit(self, stage, path):
        """Whether this call (at `stage`, on `path`) is the one to fail."""
        base = Path(path).name
        if stage != self.stage or self.failed or not (base == self.name or
                                                      base.startswith(f".{self.name}.tmp")):
            return False
        if self.left > 0:
            self.left -= 1
            return False
        self.failed = True
        return True


def all_lines_parse(path):
    return all(isinstance(json.loads(line), dict) for line in Path(path).read_text().splitlines())


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="finds file names through /proc")
@pytest.mark.parametrize("name,stage,code", [
    ("checkpoint.pt", "write", errno.ENOSPC), ("checkpoint.pt", "fsync", errno.EIO),
    ("checkpoint.pt", "replace", errno.ENOSPC), ("best.pt", "write", errno.ENOSPC),
    ("metrics.jsonl", "append", errno.ENOSPC),
])
def test_a_failing_write_keeps_the_previous_files_and_stops_with_a_clear_error(
        tmp_path, monkeypatch, capsys, name, stage, code):
    run = tmp_path / "run"
    args = [*TINY, "--steps", "12", "--checkpoint-every", "2", "--eval-every", "2"]
    # checkpoint.pt: the write at step 6 fails (those at steps 2 and 4 went through); best.pt: the
    # third improvement's; metrics.jsonl: the fifth record's (train at step 4: before it come the
    # train records of steps 1-3 and the test record of step 2).
    faults = FailingWrites(monkeypatch, name, stage, code, after=4 if name == "metrics.jsonl" else 2)
    assert main(["train", *args, "--out", str(run)]) == 2
    assert faults.failed
    err = capsys.readouterr().err
    assert name in err and errno.errorcode[code] in err and "Traceback" not in err, err
    monkeypatch.undo()
    # The files written before are whole: the checkpoints load, every metrics line parses.
    step = gtrain.load_checkpoint(run / "checkpoint.pt")["step"]
    assert step == {"checkpoint.pt": 4, "metrics.jsonl": 2}.get(name, step)
    gtrain.load_checkpoint(run / "best.pt")
    assert all_lines_parse(run / "metrics.jsonl")
    assert not [f.name for f in run.iterdir() if ".tmp" in f.name]
    # And the run resumes from its checkpoint.
    assert main(["train", "--resume", "--out", str(run)]) == 0
    assert sorted(train_losses(run)) == list(range(1, 13)) and all_lines_parse(run / "metrics.jsonl")


def test_resume_drops_a_torn_last_metrics_line(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "4", "--eval-every", "2", "--out", str(run)]) == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"split": "train", "step": 5, "loss": 3.1')  # a kill in the middle of a write
    assert main(["train", "--resume", "--out", str(run), "--steps", "6"]) == 0
    assert all_lines_parse(run / "metrics.jsonl")
    assert sorted(train_losses(run)) == list(range(1, 7))


def test_huge_learning_rate_diverges_cleanly(tmp_path):
    with pytest.raises(gtrain.TrainingDiverged, match="diverged"):
        gtrain.train(dict(gtrain.DEFAULTS, K=2, L=2, hidden=16, steps=200, lr=1e4, warmup=0,
                          grad_clip=0.0, eval_every=1000, sample_every=0, log_every=1000,
                          device="cpu", out=str(tmp_path / "run")))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not_a_checkpoint"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys, damage):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "2", "--out", str(run)]) == 0
    ckpt = run / "checkpoint.pt"
    if damage == "garbage":
        ckpt.write_bytes(b"\x00garbage" * 100)
    elif damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    else:
        torch.save({"weights": torch.zeros(3)}, ckpt)
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint" in err and str(ckpt) in err and "Traceback" not in err
    for command in (["evaluate"], ["sample", "--out", str(tmp_path / "s.png")]):
        assert main([*command, "--checkpoint", str(ckpt), "--device", "cpu"]) == 2
        assert str(ckpt) in capsys.readouterr().err


def test_missing_data_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "nope"), "--device",
                 "cpu", "--out", str(tmp_path / "run")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--dataset", "folder", "--device", "cpu", "--out", str(tmp_path / "run")]) == 2
    assert "--data-dir" in capsys.readouterr().err


def test_labels_out_of_range_are_a_clear_error(tmp_path, capsys):
    assert main(["train", *TINY, "--conditional", "--n-classes", "5", "--steps", "2",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "out of range" in err and "--n-classes 5" in err
    run = tmp_path / "cond"
    assert main(["train", *TINY, "--conditional", "--class-weight", "0.01", "--steps", "3",
                 "--out", str(run)]) == 0
    assert main(["sample", "--checkpoint", str(run / "best.pt"), "--label", "12", "--device", "cpu",
                 "--out", str(tmp_path / "s.png")]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(run / "best.pt"), "--label", "3", "--n", "4",
                 "--device", "cpu", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").is_file()


# --------------------------------------------------------------------------------------------------
# sample and evaluate

def test_sample_and_evaluate_commands(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "10", "--eval-every", "10", "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    grid = tmp_path / "grid.png"
    result = run_cli(["sample", "--checkpoint", str(run / "best.pt"), "--n", "16", "--temperature",
                      "0.7", "--device", "cpu", "--out", str(grid)])
    assert result.returncode == 0, result.stderr
    from PIL import Image

    with Image.open(grid) as image:
        assert image.format == "PNG" and image.size[0] > 8
    result = run_cli(["evaluate", "--checkpoint", str(run / "checkpoint.pt"), "--device", "cpu"])
    assert result.returncode == 0, result.stderr
    assert "test bpd" in result.stderr
    evaluated = json.loads(result.stdout.strip().splitlines()[-1])
    assert evaluated["split"] == "test" and evaluated["n_images"] == 297 and evaluated["step"] == 10
    assert abs(evaluated["bpd"] - summary["final_test_bpd"]) < 1e-6


def test_unconditional_sample_refuses_a_label(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "2", "--out", str(run)]) == 0
    assert main(["sample", "--checkpoint", str(run / "best.pt"), "--label", "1", "--device", "cpu",
                 "--out", str(tmp_path / "s.png")]) == 2
    assert "class-conditional" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# DDP on gloo

@pytest.mark.parametrize("two_rank_flags", [[], ["--reversible"]], ids=["standard", "reversible"])
def test_torchrun_two_ranks_match_one(tmp_path, two_rank_flags):
    """Also: a reversible model under DDP trains like the ordinary one-process model."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this python")
    # SGD: its update is linear in the gradient, so the two runs differ only by float rounding
    # (Adam's first steps turn gradients that are zero up to rounding, e.g. ActNorm biases right
    # after the data-dependent init, into ±lr updates, which would hide a real mismatch).
    # No dropout: its masks come from each process's own random stream.
    args = ["train", *TINY, "--steps", "3", "--eval-every", "3", "--lr-decay", "none",
            "--optimizer", "sgd", "--lr", "0.02", "--dropout", "0"]
    one = run_cli([*args, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "glow_ext",
                          *args, *two_rank_flags, "--out", str(tmp_path / "two")], cwd=ROOT,
                         env=env_for_subprocess(),
                         capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert two.returncode == 0, two.stderr[-4000:]
    assert "x 2 processes" in two.stderr
    # Only rank 0 logs: one progress line per step.
    assert two.stderr.count("step 3/3") == 1
    l1, l2 = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(l1) == sorted(l2) == [1, 2, 3]
    for s in l1:
        assert abs(l1[s] - l2[s]) <= 1e-5, (s, l1[s], l2[s])
    t1, t2 = read_metrics(tmp_path / "one", "test"), read_metrics(tmp_path / "two", "test")
    assert abs(t1[-1]["bpd"] - t2[-1]["bpd"]) <= 1e-5
    p1 = gtrain.load_checkpoint(tmp_path / "one" / "checkpoint.pt")["model"]
    p2 = gtrain.load_checkpoint(tmp_path / "two" / "checkpoint.pt")["model"]
    assert p1.keys() == p2.keys()
    for k in p1:
        if p1[k].is_floating_point():
            assert torch.allclose(p1[k], p2[k], rtol=0, atol=1e-5), (k, (p1[k] - p2[k]).abs().max())
        else:
            assert torch.equal(p1[k], p2[k]), k
    # The comparison is sensitive: training moved the coupling weights far more than 1e-5.
    torch.manual_seed(0)
    init = gtrain.build_model(dict(gtrain.defaults_for("digits"), K=2, L=2, hidden=16),
                              (1, 8, 8)).state_dict()
    moved = max((p1[k] - init[k]).abs().max().item() for k in p1 if ".coupling." in k)
    assert moved > 1e-3, moved


# --------------------------------------------------------------------------------------------------
# ablate

def test_ablation_writes_table_json_and_plot(tmp_path):
    from glow_ext.training import ablation as cli

    out = tmp_path / "ablation"
    result = cli.run_ablation(out, seeds=(0, 1), steps=4, K=1, L=2, hidden=8, batch_size=32,
                              warmup=1, eval_every=2, log=lambda *a, **k: None)
    assert len(result["runs"]) == 6
    assert set(result["per_permutation"]) == {"reverse", "shuffle", "invconv_lu"}
    assert result["paper_ordering"]["best"]["holds"] in (True, False)
    table = (out / "ablation.md").read_text()
    assert "| reverse |" in table and "learned 1x1 conv" in table and "paper's ordering" in table
    assert json.loads((out / "ablation.json").read_text())["setup"]["steps"] == 4
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_python_dash_m_help_lists_the_commands():
    result = run_cli(["--help"], timeout=60)
    assert result.returncode == 0
    for command in ("train", "sample", "evaluate", "ablate", "info", "bench-ops"):
        assert command in result.stdout


# --------------------------------------------------------------------------------------------------
# The logit preprocessing

def test_logit_preprocessing_is_an_exact_change_of_variables():
    torch.manual_seed(0)
    glow = gtrain.build_model(dict(gtrain.defaults_for("digits"), K=1, L=2, hidden=8, logit_alpha=0.0),
                              (1, 8, 8))
    wrapped = LogitGlow(glow, 0.05).double()
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64) - 0.5
    wrapped.train()
    wrapped(x)  # ActNorm init
    wrapped.eval()
    u, logdet = wrapped.to_logit(x)
    assert torch.allclose(wrapped.from_logit(u), x, atol=1e-12)
    # log|du/dx| from autograd (the map is elementwise, so the Jacobian is diagonal).
    xg = x.clone().requires_grad_(True)
    (du_dx,) = torch.autograd.grad(wrapped.to_logit(xg)[0].sum(), xg)
    assert torch.allclose(logdet, du_dx.log().flatten(1).sum(1), atol=1e-9)
    with torch.no_grad():
        expected = glow.log_prob(u) + logdet
        assert torch.allclose(wrapped.log_prob(x), expected, atol=1e-9)
        d = 64
        bpd = (-expected + d * torch.log(torch.tensor(17.0, dtype=torch.float64))) / (d * torch.log(torch.tensor(2.0, dtype=torch.float64)))
        assert torch.allclose(wrapped.bits_per_dim(x, 17), bpd, atol=1e-9)
        assert torch.allclose(wrapped.decode(wrapped.encode(x)), x, atol=1e-6)
        samples = wrapped.sample(4, temperature=0.7)
        # sigmoid's range maps to (-0.5 - a/(1-2a), 0.5 + a/(1-2a)); to_levels clamps the overhang.
        assert samples.shape == (4, 1, 8, 8) and torch.isfinite(samples).all()
        assert samples.abs().max() < 0.5 + 0.05 / 0.9


# --------------------------------------------------------------------------------------------------
# The other datasets end to end

def test_train_on_cifar_batches_and_an_image_folder(tmp_path, monkeypatch):
    from test_data import register_md5, write_cifar, write_images

    write_cifar(tmp_path / "cifar", n_per_batch=4)
    register_md5(monkeypatch, tmp_path / "cifar")
    small = ["--K", "1", "--L", "2", "--hidden", "8", "--batch-size", "8", "--steps", "2",
             "--eval-every", "2", "--device", "cpu", "--n-samples", "4"]
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "cifar"), "--n-bits", "5",
                 *small, "--out", str(tmp_path / "c")]) == 0
    state = gtrain.load_checkpoint(tmp_path / "c" / "checkpoint.pt")
    assert state["image_shape"] == [3, 32, 32] and state["n_bins"] == 32
    assert state["config"]["dropout"] == 0.0 and state["config"]["logit_alpha"] == 0.0  # paper defaults
    write_images(tmp_path / "imgs", [(f"{c}/{i}.{'png' if i % 2 else 'jpg'}", (12, 10), (60 * k, 90, 30))
                                      for k, c in enumerate(["a", "b", "c"]) for i in range(6)])
    assert main(["train", "--dataset", "folder", "--data-dir", str(tmp_path / "imgs"), "--image-size", "8",
                 "--channels", "1", "--conditional", *small, "--out", str(tmp_path / "f")]) == 0
    state = gtrain.load_checkpoint(tmp_path / "f" / "best.pt")
    assert state["image_shape"] == [1, 8, 8] and state["n_classes"] == 3
    assert (tmp_path / "f" / "samples" / "step_0000002.png").is_file()
