"""The training loop: `train(config)` runs or resumes a run, phase by phase (set-up, resume, run
folder, then steps with evaluation, samples and checkpoints, then the summary).

What a run writes in its run folder (`--out`):
  config.json        the resolved configuration
  metrics.jsonl      one JSON object per line: train entries (step, loss, bpd, lr, grad_norm, it/s)
                     every --log-every steps and test entries (test bpd) every --eval-every steps
  checkpoint.pt      the latest state (model, optimizer, scheduler, step, RNG states, EMA, config),
                     written atomically every --checkpoint-every steps and at the end; --resume
                     continues from it
  best.pt            the model with the lowest test bpd so far (held-out selection)
  samples/           sample grids (PNG) every --sample-every steps
  summary.json       best and final test bpd, steps, wall time

Determinism and resume: the order of the training data is a function of (seed, epoch) and the
dequantization noise of step s a function of (seed, s), drawn for the whole global batch, so a
resumed run computes exactly the losses the uninterrupted run would have, and a run on R
processes (each taking its 1/R slice of every global batch) matches a one-process run.

Data-parallel training: launched by torchrun (WORLD_SIZE > 1), it uses gloo on the CPU and nccl on
GPUs; gradients are averaged by DistributedDataParallel, ActNorm's data-dependent initialisation
all-reduces its statistics (glow_ext.nn), and only rank 0 writes files or prints.

A non-finite loss or gradient norm stops the run before the update is applied, with
TrainingDiverged (exit status 3 from the command line); the last checkpoint written stays as it was.

SIGTERM or SIGINT (glow_ext.training.preemption) stops the run after the step in progress (an
evaluation between two of its batches), with a checkpoint at the step reached and
TrainingInterrupted (exit status 75); what that step still had to do (evaluation, samples) is done
first on resume. A write that fails (disk full, I/O error) stops the run with RunFileError naming
the file and the errno; the files written before stay whole (glow_ext.training.checkpoint).
"""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..models import CompiledAfterInit
from . import data as gdata
from .checkpoint import (CHECKPOINT_FORMAT, MetricsLog, atomic_save, atomic_write_text,
                         load_checkpoint, rng_state, set_rng_state, truncate_metrics, write_error)
from .config import FIXED_ON_RESUME, defaults_for, total_steps, validate_config
from .distributed import (DistContext, autocast_context, check_amp, grad_scaler, log, resolve_device,
                          setup_distributed)
from .errors import CheckpointError, TrainingDiverged, TrainingError, TrainingInterrupted
from .evaluation import class_cycle, evaluate_bpd, write_sample_grid
from .objective import (Objective, add_coupling_dropout, build_model, load_ema_state, lr_lambda,
                        make_ema, make_optimizer, noise, step_noise_seed)
from .preemption import StopRequest, resume_command


def train(config: dict, resume: Optional[str] = None, force: bool = False) -> dict:
    """Runs (or resumes) training; returns the summary dict (also written to OUT/summary.json on
    rank 0). Raises TrainingError / CheckpointError / TrainingDiverged / DataError."""
    checkpoint = None
    config = dict(config)
    if not config.get("out"):
        config["out"] = f"runs/{config['dataset']}"
    out = Path(config["out"])
    if resume:
        path = out / "checkpoint.pt" if resume == "auto" else Path(resume)
        checkpoint = load_checkpoint(path)
        saved = dict(defaults_for(checkpoint["config"].get("dataset")), **checkpoint["config"])
        fixed = {k: saved.get(k) for k in FIXED_ON_RESUME}
        changed = {k: (fixed[k], config[k]) for k in FIXED_ON_RESUME if config.get(k) != fixed[k]}
        if changed:
            raise TrainingError("the configuration differs from the checkpoint's in " + ", ".join(
                f"{k} ({a!r} -> {b!r})" for k, (a, b) in changed.items()))
    validate_config(config)
    ctx = setup_distributed(config["device"])
    try:
        summary = Trainer(config, ctx, out).run(checkpoint, force)
        if ctx.active:
            # Every rank waits for rank 0's last writes: a gloo group torn down while a peer is
            # still working aborts the process ("terminate called without an active exception").
            torch.distributed.barrier()
        return summary
    finally:
        if ctx.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class Trainer:
    """One run in one process: its data, model, optimizer and progress (step, best test bpd)."""

    def __init__(self, config: dict, ctx: DistContext, out: Path):
        self.config, self.ctx, self.out = config, ctx, out
        self.step = 0
        self.skipped_steps = 0  # float16 updates the loss scaler skipped (overflowing gradients)
        self.best = {"bpd": math.inf, "step": None}
        self.last_eval_step = self.last_test_bpd = None
        self.metrics = None
        # What a run stopped by a signal had still to do at its last step: done first on resume.
        self.pending = {"eval": False, "samples": False}
        self.stop_request = StopRequest()

    def run(self, checkpoint: Optional[dict], force: bool) -> dict:
        self.set_up(checkpoint, force)
        if checkpoint is not None:
            self.resume(checkpoint)
        self.wrap_objective()
        self.open_run_folder(resumed=checkpoint is not None)
        try:
            with self.stop_request:
                stop_reason = self.loop()
        finally:
            if self.metrics is not None:
                self.metrics.close()
        return self.finish(stop_reason)

    # ---- set-up ----------------------------------------------------------------------------------
    def set_up(self, checkpoint: Optional[dict], force: bool) -> None:
        config, ctx, out = self.config, self.ctx, self.out
        self.device = resolve_device(config["device"], ctx)
        check_amp(config["amp"], self.device)
        if checkpoint is None and (out / "checkpoint.pt").exists() and not force:
            raise TrainingError(f"{str(out)!r} already holds a run (checkpoint.pt): pass --resume to "
                                f"continue it, --force to start afresh, or another --out")
        torch.manual_seed(config["seed"])
        np.random.seed(config["seed"] % (2**32))
        random.seed(config["seed"])
        self.load_data()
        self.model = build_model(config, self.image_shape, self.n_classes).to(self.device)
        add_coupling_dropout(self.model, config["dropout"])
        self.optimizer = make_optimizer(config, self.model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(config, self.steps_total))
        self.ema = make_ema(self.model, config["ema"]) if config["ema"] > 0 else None
        self.scaler = grad_scaler(config["amp"], self.device)

    def load_data(self) -> None:
        config, ctx = self.config, self.ctx
        splits = gdata.load_splits(config["dataset"], config["data_dir"], config["image_size"],
                                   config["n_bits"], config["channels"], config["test_fraction"],
                                   trust_data_files=config.get("trust_data_files", False))
        self.train_set, self.test_set = splits.train, splits.test
        self.n_bins, self.image_shape = splits.n_bins, splits.image_shape
        self.n_classes = 0
        if config["conditional"]:
            if self.train_set.labels is None:
                raise TrainingError(f"--conditional needs labels, but {self.train_set.name} has none "
                                    f"(a folder dataset takes labels from class subfolders)")
            self.n_classes = n_classes = config["n_classes"] or self.train_set.n_classes
            for split in (self.train_set, self.test_set):
                if split.labels is not None and len(split) and int(split.labels.max()) >= n_classes:
                    raise TrainingError(
                        f"labels of {split.name} go up to {int(split.labels.max())}, out of range for "
                        f"--n-classes {n_classes} (labels must be in 0..{n_classes - 1})")
        self.batch_size = config["batch_size"]
        if self.batch_size % ctx.world_size:
            raise TrainingError(f"--batch-size {self.batch_size} is not divisible by the "
                                f"{ctx.world_size} processes")
        self.part = gdata.rank_slice(self.batch_size, ctx.rank, ctx.world_size)
        self.n_train = len(self.train_set)
        self.steps_per_epoch = gdata.steps_per_epoch(self.n_train, self.batch_size)
        self.steps_total = total_steps(config, self.n_train)

    def resume(self, checkpoint: dict) -> None:
        if checkpoint.get("kind") != "last" or "optimizer" not in checkpoint:
            raise CheckpointError("this checkpoint holds only model weights (best.pt); resume from "
                                  "the run's checkpoint.pt")
        try:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            if self.ema is not None:
                load_ema_state(self.ema, checkpoint["ema"], self.model)
            if self.scaler is not None and checkpoint.get("scaler"):
                self.scaler.load_state_dict(checkpoint["scaler"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"the checkpoint does not fit this run's model/optimizer: {e}") from e
        self.step = int(checkpoint["step"])
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))
        self.best = dict(checkpoint.get("best", self.best))
        self.last_test_bpd = checkpoint.get("last_test_bpd")
        self.pending = dict(self.pending, **checkpoint.get("pending", {}))
        set_rng_state(checkpoint["rng"])
        # Settings that may change on resume (e.g. more --steps) take effect from here on.
        self.scheduler.lr_lambdas[0] = lr_lambda(self.config, self.steps_total)

    def wrap_objective(self) -> None:
        self.objective = Objective(self.model, self.n_bins, self.config["class_weight"])
        if self.config.get("compile"):
            self.objective = CompiledAfterInit(self.objective)
        if self.ctx.active:
            from torch.nn.parallel import DistributedDataParallel

            self.objective = DistributedDataParallel(
                self.objective, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.n_params = sum(p.numel() for p in self.params)

    def open_run_folder(self, resumed: bool) -> None:
        out = self.out
        metrics_path = out / "metrics.jsonl"
        if self.ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "samples").mkdir(exist_ok=True)
            if not resumed:
                for name in ("metrics.jsonl", "checkpoint.pt", "best.pt", "summary.json"):
                    if (out / name).exists():
                        (out / name).unlink()
            else:
                truncate_metrics(metrics_path, self.step)
            atomic_write_text(out / "config.json",
                              json.dumps(self.config, indent=2, sort_keys=True) + "\n")
            self.metrics = MetricsLog(metrics_path)

    # ---- the loop --------------------------------------------------------------------------------
    def loop(self) -> str:
        """Steps until --steps (or the time limit); returns why it stopped."""
        config, ctx = self.config, self.ctx
        ckpt_every = config["checkpoint_every"] or config["eval_every"]
        self.announce()
        self.t_start = time.perf_counter()
        self.t_log, self.step_log, self.sums = self.t_start, self.step, [0.0, 0.0, 0]
        stop_reason = "steps"
        self.model.train()
        self.catch_up()
        while self.step < self.steps_total:
            loss_value, bpd_value, grad_norm, stop_flag, signal_flag = self.train_step()
            self.after_step(loss_value, bpd_value, grad_norm)
            eval_due = self.step % config["eval_every"] == 0
            samples_due = bool(config["sample_every"]) and self.step % config["sample_every"] == 0
            if signal_flag > 0:
                self.interrupt(eval_due, samples_due)
            if eval_due and self.evaluate() is None:
                self.interrupt(True, samples_due)
            if samples_due:
                self.write_samples()
            if stop_flag > 0:
                stop_reason = "time_limit"
                log(ctx, f"time limit of {config['time_limit']:g} s reached at step {self.step}: "
                         f"stopping")
                break
            if self.step % ckpt_every == 0:
                self.save_checkpoint()
        final_samples = not (config["sample_every"] and self.step % config["sample_every"] == 0)
        if self.last_eval_step != self.step and self.step > 0 and self.evaluate() is None:
            self.interrupt(True, final_samples)
        if final_samples and self.step > 0:
            self.write_samples()
        self.save_checkpoint()
        return stop_reason

    def catch_up(self) -> None:
        """The evaluation and samples that a run stopped by a signal left pending at its step."""
        if self.pending["eval"] and self.evaluate() is None:
            self.interrupt(True, self.pending["samples"])
        if self.pending["samples"]:
            self.write_samples()
        self.pending = {"eval": False, "samples": False}

    def interrupt(self, eval_pending: bool, samples_pending: bool) -> None:
        """Stops for SIGTERM/SIGINT: the checkpoint at the step reached (noting what of that step
        is still to do), then TrainingInterrupted with the command that resumes the run."""
        self.pending = {"eval": eval_pending, "samples": samples_pending}
        self.save_checkpoint()
        if self.ctx.active:
            torch.distributed.barrier()  # the checkpoint is written before any process leaves
        command = resume_command(self.out, self.ctx.world_size)
        message = (f"stopped by {self.stop_request.describe()} at step {self.step}; checkpoint "
                   f"{str(self.out / 'checkpoint.pt')!r} written. Resume with: {command}")
        log(self.ctx, f"glow-ext train: {message}")
        raise TrainingInterrupted(message, self.step, command)

    def announce(self) -> None:
        config, ctx = self.config, self.ctx
        log(ctx, f"glow_ext train: {self.train_set.name} ({self.n_train} train, {len(self.test_set)} "
                 f"test, {'x'.join(map(str, self.image_shape))}, {self.n_bins} levels) on "
                 f"{self.device}{f' x {ctx.world_size} processes' if ctx.active else ''}; Glow "
                 f"K={config['K']} L={config['L']} hidden={config['hidden']} {config['coupling']} "
                 f"{config['permutation']}{' conditional' if self.n_classes else ''}"
                 f"{' reversible' if config['reversible'] else ''}{' compiled' if config.get('compile') else ''}: {self.n_params:,} parameters; "
                 f"steps {self.step} -> {self.steps_total} ({self.steps_per_epoch} per epoch), batch "
                 f"{self.batch_size}, {config['optimizer']} lr {config['lr']}")

    def train_step(self):
        """One optimizer step on the next global batch: (loss, bpd, gradient norm, time flag,
        signal flag), the first two averaged over the processes, the time flag set when rank 0 ran
        past the time limit, the signal flag when any process was asked to stop."""
        config, ctx, device, step = self.config, self.ctx, self.device, self.step
        idx = gdata.global_batch_indices(self.n_train, self.batch_size, config["seed"], step)
        levels, labels = self.train_set.batch(idx[self.part])
        levels = levels.to(device, non_blocking=True)
        step_noise = noise((self.batch_size,) + tuple(self.image_shape),
                           step_noise_seed(config["seed"], step), device)[self.part]
        x = gdata.dequantize(levels, self.n_bins, noise=step_noise)
        y = labels.to(device, non_blocking=True) if self.n_classes else None

        self.optimizer.zero_grad(set_to_none=True)
        with autocast_context(config["amp"], device):
            loss, bpd = self.objective(x, y)
        scaler = self.scaler
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.params, config["grad_clip"] if config["grad_clip"] > 0 else math.inf)
        time_limit = config["time_limit"]
        over_time = time_limit is not None and time.perf_counter() - self.t_start >= time_limit
        flags = torch.tensor([float(over_time and ctx.is_main), float(self.stop_request.requested)],
                             dtype=torch.float64, device=loss.device)
        stats = torch.cat([loss.detach().double().view(1), bpd.double().view(1), flags])
        if ctx.active:
            torch.distributed.all_reduce(stats)
            stats[:2] /= ctx.world_size
        loss_value, bpd_value, stop_flag, signal_flag = stats.tolist()
        grad_norm = float(grad_norm)
        # With the float16 loss scaler, an overflowing gradient is how the scale finds its level:
        # scaler.step skips that update and lowers the scale. Only a non-finite loss is divergence.
        scaled_overflow = scaler is not None and math.isfinite(loss_value)
        if not (math.isfinite(loss_value) and (math.isfinite(grad_norm) or scaled_overflow)):
            last = self.out / "checkpoint.pt"
            kept = (f"the last good checkpoint, {str(last)!r}, was kept unchanged"
                    if last.exists() else "no checkpoint had been written yet")
            raise TrainingDiverged(
                f"training diverged at step {step + 1}: loss {loss_value}, gradient norm "
                f"{grad_norm}; the update was not applied and {kept}. Lower --lr, lengthen "
                f"--warmup or set --grad-clip.")
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
            if not math.isfinite(grad_norm):
                self.skipped_steps += 1
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return loss_value, bpd_value, grad_norm, stop_flag, signal_flag

    def after_step(self, loss_value: float, bpd_value: float, grad_norm: float) -> None:
        """Accumulates the step's loss; every --log-every steps a metrics record and a line."""
        config, step = self.config, self.step
        self.sums = [self.sums[0] + loss_value, self.sums[1] + bpd_value, self.sums[2] + 1]
        if not (step % config["log_every"] == 0 or step == self.steps_total or step == 1):
            return
        loss_sum, bpd_sum, n_sum = self.sums
        now = time.perf_counter()
        its = (step - self.step_log) / max(now - self.t_log, 1e-9)
        spe = self.steps_per_epoch
        record = {"split": "train", "step": step, "epoch": step / spe, "loss": loss_value,
                  "bpd": bpd_value, "loss_avg": loss_sum / n_sum, "bpd_avg": bpd_sum / n_sum,
                  "lr": self.optimizer.param_groups[0]["lr"],
                  "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
                  "it_per_s": its, "img_per_s": its * self.batch_size, "elapsed_s": now - self.t_start}
        if self.scaler is not None:
            record.update(loss_scale=self.scaler.get_scale(), skipped_steps=self.skipped_steps)
        self.write_metrics(record)
        log(self.ctx, f"step {step}/{self.steps_total} ep {step / spe:.1f} loss {loss_sum / n_sum:.4f} "
                      f"bpd {bpd_sum / n_sum:.4f} lr {record['lr']:.2e} |g| {grad_norm:.2f} "
                      f"{its:.1f} it/s {its * self.batch_size:.0f} img/s")
        self.t_log, self.step_log, self.sums = now, step, [0.0, 0.0, 0]

    def write_metrics(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(record)

    # ---- evaluation, samples, checkpoints --------------------------------------------------------
    def averaged(self):
        """What is evaluated, sampled and selected: the EMA of the weights once it has an update,
        else the model."""
        if self.ema is not None and self.ema.n_averaged > 0:
            return self.ema.module
        return self.model

    def evaluate(self) -> Optional[float]:
        """Test bpd at this step (None: abandoned for a stop signal)."""
        config, step = self.config, self.step
        model = self.averaged()
        # Always without autocast: the test bpd that selects best.pt is that of the float32 model.
        bpd = evaluate_bpd(model, self.test_set, self.device, config["eval_batch_size"],
                           config["conditional"], "none", self.ctx,
                           stop=lambda: self.stop_request.requested)
        if bpd is None:
            return None
        improved = bpd < self.best["bpd"]
        if improved:
            self.best.update(bpd=bpd, step=step)
            if self.ctx.is_main:
                atomic_save(self.checkpoint_state("best", model), self.out / "best.pt")
        self.last_eval_step, self.last_test_bpd = step, bpd
        self.write_metrics({"split": "test", "step": step, "epoch": step / self.steps_per_epoch,
                            "bpd": bpd, "best_bpd": self.best["bpd"], "best_step": self.best["step"],
                            "elapsed_s": time.perf_counter() - self.t_start})
        log(self.ctx, f"  test bpd {bpd:.4f} at step {step}" + (
            "  (best)" if improved else f"  (best {self.best['bpd']:.4f} at step {self.best['step']})"))
        return bpd

    def write_samples(self) -> None:
        if not self.ctx.is_main:
            return
        config = self.config
        labels = class_cycle(config["n_samples"], self.n_classes) if self.n_classes else None
        path = self.out / "samples" / f"step_{self.step:07d}.png"
        try:
            write_sample_grid(self.averaged(), path, config["n_samples"], self.n_bins,
                              config["temperature"], seed=config["seed"], labels=labels,
                              amp=config["amp"])
        except OSError as e:
            raise write_error(path, e) from e

    def checkpoint_state(self, kind: str, model=None) -> dict:
        """kind "last": everything --resume needs; "best": the weights of `model` (the averaged
        model when there is an EMA) and what describes them."""
        state = {"format": CHECKPOINT_FORMAT, "kind": kind, "config": self.config, "step": self.step,
                 "image_shape": list(self.image_shape), "n_bins": self.n_bins,
                 "n_classes": self.n_classes, "best": self.best, "last_test_bpd": self.last_test_bpd,
                 "pending": self.pending,
                 "world_size": self.ctx.world_size, "torch_version": str(torch.__version__)}
        if kind == "best":
            state["model"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            state.update(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                         scheduler=self.scheduler.state_dict(), rng=rng_state(),
                         ema=self.ema.state_dict() if self.ema is not None else None,
                         scaler=self.scaler.state_dict() if self.scaler is not None else None,
                         skipped_steps=self.skipped_steps)
        return state

    def save_checkpoint(self) -> None:
        if self.ctx.is_main:
            atomic_save(self.checkpoint_state("last"), self.out / "checkpoint.pt")

    def finish(self, stop_reason: str) -> dict:
        wall = time.perf_counter() - self.t_start
        summary = {"step": self.step, "steps_total": self.steps_total, "stopped_by": stop_reason,
                   "best_test_bpd": self.best["bpd"], "best_step": self.best["step"],
                   "final_test_bpd": self.last_test_bpd, "wall_s": wall,
                   "n_params": self.n_params, "world_size": self.ctx.world_size,
                   "amp": self.config["amp"], "skipped_steps": self.skipped_steps,
                   "device": str(self.device), "out": str(self.out)}
        if self.ctx.is_main:
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        log(self.ctx, f"done: {self.step} steps in {wall:.1f} s; best test bpd {self.best['bpd']:.4f} "
                      f"at step {self.best['step']}, final {self.last_test_bpd}; run folder "
                      f"{str(self.out)!r}")
        return summary
