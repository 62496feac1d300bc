"""The configuration of a training run: defaults (global and per dataset), the `glow-ext train`
arguments, how a resumed run merges them with its checkpoint's, and validation."""
from __future__ import annotations

from typing import Optional

from . import data as gdata
from .errors import TrainingError

# Defaults: DEFAULTS, overridden per dataset by DATASET_DEFAULTS[dataset]. The image datasets get
# the paper's CIFAR-10 model (K=32, L=3, width 512, affine, learned 1x1 conv, Adam 1e-3 with
# warm-up). The digits default is chosen so that `glow-ext train` reaches a test bpd below 2.0 on
# the scikit-learn digits in a few minutes on 2 CPU cores (benchmarks/results/train-digits/
# summary.json): the data is tiny (1500 images), so the model is small, regularised with dropout
# in the coupling networks, fed through RealNVP's logit preprocessing (digits pixels pile up at 0
# and 16: the edges of the box), trained with a cosine schedule and selected by held-out bpd.
DEFAULTS = dict(
    dataset="digits", data_dir=None, image_size=None, n_bits=None, channels=3, test_fraction=0.1,
    K=32, L=3, hidden=512, coupling="affine", permutation="invconv_lu", actnorm_scale=1.0,
    learn_top=True, conditional=False, n_classes=None, class_weight=0.0, logit_alpha=0.0,
    steps=100_000, epochs=None, batch_size=64, lr=1e-3, warmup=1000, lr_decay="cosine",
    min_lr_ratio=0.0, weight_decay=0.0, grad_clip=50.0, optimizer="adam", ema=0.0, dropout=0.0,
    eval_every=1000, sample_every=5000, checkpoint_every=None, log_every=100, eval_batch_size=512,
    n_samples=64, temperature=0.7, seed=0, out=None, device="auto", amp="none",
    time_limit=None, reversible=False, compile=False, trust_data_files=False,
)
DATASET_DEFAULTS = {
    "digits": dict(K=8, L=3, hidden=64, dropout=0.2, logit_alpha=0.002, steps=3000, lr=2e-3,
                   warmup=200, eval_every=100, sample_every=500, log_every=100),
    "cifar10": dict(),
    "folder": dict(),
}


def defaults_for(dataset: Optional[str]) -> dict:
    """DEFAULTS with the dataset's own defaults on top (and `out` = runs/<dataset>)."""
    dataset = dataset or DEFAULTS["dataset"]
    return dict(DEFAULTS, dataset=dataset, out=f"runs/{dataset}", **DATASET_DEFAULTS.get(dataset, {}))


# Settings that define the model, the data or the optimisation: fixed once a run has started.
FIXED_ON_RESUME = (
    "dataset", "image_size", "n_bits", "channels", "test_fraction", "K", "L", "hidden", "coupling",
    "permutation", "actnorm_scale", "learn_top", "conditional", "n_classes", "class_weight",
    "batch_size", "lr", "warmup", "lr_decay", "min_lr_ratio", "weight_decay", "grad_clip",
    "optimizer", "ema", "dropout", "logit_alpha", "seed",
)
# Settings of one invocation, not inherited by --resume.
PER_INVOCATION = ("time_limit",)
OPTIMIZERS = ("adam", "adamw", "adamax", "sgd")
LR_DECAYS = ("none", "cosine")
AMP_MODES = ("none", "bf16", "fp16")


# --------------------------------------------------------------------------------------------------
# Command-line arguments (every default is None, so that a resumed run can tell what was given)


def add_train_arguments(parser) -> None:
    d = defaults_for("digits")
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", choices=gdata.DATASETS, help=f"default {d['dataset']}")
    g.add_argument("--data-dir", help="cifar10: the python batches (or their cifar-10-batches-py "
                   "parent); folder: a folder of images (class subfolders give labels)")
    g.add_argument("--image-size", type=int, help="folder: resize + centre-crop to this (default 32)")
    g.add_argument("--n-bits", type=int, help="cifar10/folder: keep the top n bits (default 8)")
    g.add_argument("--channels", type=int, choices=(1, 3), help="folder: 3 = RGB (default), 1 = grey")
    g.add_argument("--test-fraction", type=float,
                   help="folder without train/ and test/ subfolders: held-out fraction (default 0.1)")
    g.add_argument("--trust-data-files", action="store_true", default=None,
                   help="cifar10: read batches whose MD5 is not the published one (custom batches; "
                   "they are still read by the restricted unpickler, which runs no code)")
    g = parser.add_argument_group(
        "model", "defaults: the digits model below; cifar10 and folder default to the paper's "
        "CIFAR-10 model (K=32, L=3, hidden 512, no dropout, no logit preprocessing, warm-up 1000, "
        "lr 1e-3, 100000 steps)")
    g.add_argument("--K", type=int, help=f"flow steps per level (default {d['K']})")
    g.add_argument("--L", type=int, help=f"levels (default {d['L']})")
    g.add_argument("--hidden", type=int, help=f"coupling network width (default {d['hidden']})")
    g.add_argument("--coupling", choices=("affine", "additive"), help=f"default {d['coupling']}")
    g.add_argument("--permutation", choices=("invconv_lu", "invconv", "shuffle", "reverse"),
                   help=f"default {d['permutation']}")
    g.add_argument("--actnorm-scale", type=float, help="ActNorm init scale (default 1.0)")
    g.add_argument("--no-learn-top", dest="learn_top", action="store_const", const=False,
                   help="a fixed N(0, I) top prior instead of the learned one")
    g.add_argument("--conditional", action="store_const", const=True,
                   help="class-conditional prior (labels from the dataset)")
    g.add_argument("--n-classes", type=int, help="number of classes for --conditional (default: the "
                   "dataset's); every label must be below it")
    g.add_argument("--class-weight", type=float, help="weight of a class-prediction head's "
                   "cross-entropy (needs --conditional; default 0 = no head)")
    g.add_argument("--logit-alpha", type=float, help="RealNVP's logit preprocessing before the flow, "
                   "x -> logit(a + (1-2a)(x+0.5)), its log-Jacobian counted in the density, so bits/dim "
                   f"stay exact; 0 = off (default {d['logit_alpha']})")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help=f"optimizer steps (default {d['steps']})")
    g.add_argument("--epochs", type=float, help="train for this many epochs instead of --steps")
    g.add_argument("--batch-size", type=int, help="global batch size, split over torchrun processes "
                   f"(default {d['batch_size']})")
    g.add_argument("--lr", type=float, help=f"peak learning rate (default {d['lr']})")
    g.add_argument("--warmup", type=int, help=f"linear warm-up steps (default {d['warmup']})")
    g.add_argument("--lr-decay", choices=LR_DECAYS, help=f"after warm-up (default {d['lr_decay']})")
    g.add_argument("--min-lr-ratio", type=float, help="cosine decay ends at lr x this (default 0)")
    g.add_argument("--weight-decay", type=float, help="on convolution/linear weights (default 0)")
    g.add_argument("--grad-clip", type=float, help=f"max gradient norm, 0 = off (default {d['grad_clip']})")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help=f"default {d['optimizer']}")
    g.add_argument("--ema", type=float, help="evaluate, sample and select an exponential moving "
                   "average of the weights with this decay (e.g. 0.999; default 0 = off)")
    g.add_argument("--dropout", type=float, help="dropout rate after the ReLUs of the coupling "
                   f"networks, in training only (default {d['dropout']})")
    g.add_argument("--seed", type=int, help="model init, data order and noise (default 0)")
    g = parser.add_argument_group("run")
    g.add_argument("--out", help="run folder (default runs/DATASET)")
    g.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                   help="continue a run: from CHECKPOINT, or from OUT/checkpoint.pt")
    g.add_argument("--force", action="store_true", help="start afresh in a run folder that "
                   "already holds a checkpoint (it is overwritten)")
    g.add_argument("--device", help="auto (default: cuda if available), cpu, cuda, cuda:N")
    g.add_argument("--amp", choices=AMP_MODES,
                   help="mixed precision: the coupling and prior networks run under autocast in "
                   "bfloat16 (bf16: CPU or CUDA) or float16 (fp16: CUDA only, with a loss scaler); "
                   "the flow, log-determinants, loss and optimizer stay float32 and test bpd is "
                   "always computed in float32 (default none)")
    g.add_argument("--reversible", action="store_const", const=True,
                   help="reversible backprop: recompute each flow step's input from its output in "
                   "the backward pass instead of storing activations (memory flat in K, ~4/3 the "
                   "compute, same gradients); kept by --resume")
    g.add_argument("--compile", action="store_const", const=True,
                   help="run the model and loss under torch.compile(fullgraph=True) from the second "
                   "step on (the first initialises ActNorm eagerly); evaluation and sampling stay "
                   "eager. Pays off on long runs: compiling takes tens of seconds to minutes on a "
                   "CPU. Not with --reversible (reversible backprop runs eagerly); kept by --resume")
    g.add_argument("--time-limit", type=float, help="stop cleanly after this many seconds")
    g.add_argument("--eval-every", type=int, help=f"test bpd every N steps (default {d['eval_every']})")
    g.add_argument("--sample-every", type=int, help=f"sample grid every N steps, 0 = only at the end "
                   f"(default {d['sample_every']})")
    g.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (default: --eval-every)")
    g.add_argument("--log-every", type=int, help=f"progress line every N steps (default {d['log_every']})")
    g.add_argument("--eval-batch-size", type=int, help=f"default {d['eval_batch_size']}")
    g.add_argument("--n-samples", type=int, help=f"images per sample grid (default {d['n_samples']})")
    g.add_argument("--temperature", type=float, help=f"sampling temperature (default {d['temperature']})")


def config_from_args(args, base: Optional[dict] = None) -> dict:
    """The dataset's defaults, then `base` (a checkpoint's config), then the arguments given on the
    command line (those fixed once a run has started must match `base`)."""
    given = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None}
    if base:
        config = defaults_for(base.get("dataset"))
        config.update({k: v for k, v in base.items() if k in DEFAULTS and k not in PER_INVOCATION})
        saved = dict(config)
        changed = [k for k in FIXED_ON_RESUME if k in given and given[k] != saved.get(k)]
        if changed:
            raise TrainingError(
                "cannot change " + ", ".join(f"--{k.replace('_', '-')} ({saved.get(k)!r} -> {given[k]!r})"
                                             for k in changed) + " when resuming a run")
    else:
        config = defaults_for(given.get("dataset"))
    config.update(given)
    return config


def validate_config(c: dict) -> None:
    def positive(name, allow_none=False):
        v = c[name]
        if v is None and allow_none:
            return
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise TrainingError(f"--{name.replace('_', '-')} must be positive, got {v!r}")

    for name in ("K", "L", "hidden", "batch_size", "lr", "eval_every", "log_every", "eval_batch_size",
                 "n_samples"):
        positive(name)
    for name in ("steps", "epochs", "time_limit", "checkpoint_every", "n_classes"):
        positive(name, allow_none=True)
    for name in ("warmup", "sample_every"):
        if c[name] < 0:
            raise TrainingError(f"--{name.replace('_', '-')} must be >= 0, got {c[name]}")
    if not 0 <= c["logit_alpha"] < 0.5:
        raise TrainingError(f"--logit-alpha must be in [0, 0.5), got {c['logit_alpha']}")
    for name in ("weight_decay", "grad_clip", "class_weight", "min_lr_ratio", "temperature"):
        if not c[name] >= 0:
            raise TrainingError(f"--{name.replace('_', '-')} must be >= 0, got {c[name]}")
    if not 0 <= c["dropout"] < 1:
        raise TrainingError(f"--dropout must be in [0, 1), got {c['dropout']}")
    if not 0 <= c["ema"] < 1:
        raise TrainingError(f"--ema must be in [0, 1), got {c['ema']}")
    if c["optimizer"] not in OPTIMIZERS:
        raise TrainingError(f"unknown optimizer {c['optimizer']!r}; choose from {OPTIMIZERS}")
    if c["lr_decay"] not in LR_DECAYS:
        raise TrainingError(f"unknown --lr-decay {c['lr_decay']!r}; choose from {LR_DECAYS}")
    if c["amp"] not in AMP_MODES:
        raise TrainingError(f"unknown --amp {c['amp']!r}; choose from {AMP_MODES}")
    if c.get("compile") and c.get("reversible"):
        raise TrainingError("--compile and --reversible do not combine: reversible backprop runs "
                            "eagerly (drop one of them)")
    if c["class_weight"] > 0 and not c["conditional"]:
        raise TrainingError("--class-weight needs --conditional (the class head predicts the label)")
    if c["n_classes"] is not None and not c["conditional"]:
        raise TrainingError("--n-classes is for --conditional training")


def total_steps(config: dict, n_train: int) -> int:
    if config["epochs"] is not None:
        return max(1, int(round(config["epochs"] * gdata.steps_per_epoch(n_train, config["batch_size"]))))
    return int(config["steps"])
