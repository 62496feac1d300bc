"""glow_ext.train and the train / sample / evaluate / ablate commands, on tiny models and few steps.

Most runs call glow_ext.__main__.main in-process; resume-after-kill, torchrun (DDP on gloo) and one
`python -m glow_ext` smoke test run in subprocesses with timeouts.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import repo_root
from glow_ext import train as gtrain
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


def test_resume_after_kill_continues_with_the_same_next_loss(tmp_path):
    run = tmp_path / "killed"
    args = [*TINY, "--lr-decay", "none", "--steps", "100000", "--checkpoint-every", "3",
            "--eval-every", "100000", "--time-limit", "150", "--out", str(run)]
    proc = subprocess.Popen([sys.executable, "-m", "glow_ext", "train", *args], cwd=ROOT,
                            env=env_for_subprocess(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        while time.monotonic() < deadline:
            ckpt = run / "checkpoint.pt"
            if ckpt.exists() and gtrain.load_checkpoint(ckpt)["step"] >= 6:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.2)
        else:
            pytest.fail("the run wrote no checkpoint at step >= 6 in time")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stderr.close()
    step = gtrain.load_checkpoint(run / "checkpoint.pt")["step"]
    before = train_losses(run)
    logged_next = before.get(step + 1)  # what the killed process computed after its checkpoint

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


def test_bf16_on_cpu_is_refused(tmp_path, capsys):
    assert main(["train", *TINY, "--amp", "bf16", "--out", str(tmp_path / "run")]) == 2
    assert "--amp bf16 needs --device cuda" in capsys.readouterr().err


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
    from glow_ext import cli

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
    wrapped = gtrain.LogitGlow(glow, 0.05).double()
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
