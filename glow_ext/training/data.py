"""Datasets for training Glow: quantized images as integer levels, dequantized on the device.

Every dataset here is held in memory as `levels`, a uint8 tensor (N, C, H, W) with values in
0..n_bins-1, plus optional int64 class labels. The model sees dequantized values

    x = (level + u) / n_bins - 0.5,   u ~ U[0, 1)   (so x in [-0.5, 0.5)),

and its bits/dim is (-log p(x) + D·log n_bins) / (D·ln 2), D = C·H·W (`Glow.bits_per_dim`).

Sources:
  digits   scikit-learn's `load_digits` (8x8 grey, 17 levels 0..16), split 1500 train / 297 test by
           `numpy.random.default_rng(0).permutation(1797)`. On its test split a per-pixel
           histogram of the training split scores 2.42 bpd, a full-covariance Gaussian 2.94 and the
           uniform distribution 4.09. Embedded: needs no download.
  cifar10  the standard python-pickle batches (data_batch_1..5, test_batch) in --data-dir or in
           its `cifar-10-batches-py` folder. Loading never runs code from the files: each batch's
           MD5 must match the published one (opt out with trust_data_files for custom batches), and
           every batch is read by a restricted unpickler that builds only dicts, lists, bytes, str,
           numbers and numpy arrays.
  folder   any folder of images (PNG/JPEG/..., searched recursively), resized (shorter side) and
           centre-cropped to image_size, RGB or grey. Class labels from the first-level subfolders
           when every image sits in one; `train/` and `test/` subfolders, when both exist, give the
           split, otherwise a fixed random test fraction. A corrupt or truncated file, or one over
           PIL's Image.MAX_IMAGE_PIXELS (a decompression bomb), is an error naming the file.

n_bits quantization (cifar10, folder): n_bins = 2**n_bits and each 8-bit value keeps its top
n_bits (`value >> (8 - n_bits)`).
"""
from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

DATASETS = ("digits", "cifar10", "folder")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

DIGITS_N = 1797
DIGITS_TRAIN = 1500
DIGITS_LEVELS = 17
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"
# The MD5 of each standard batch of cifar-10-python.tar.gz (the digests torchvision checks).
CIFAR_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck")


class DataError(RuntimeError):
    """A dataset could not be found or read; the message says which file and why."""


class LevelsDataset(torch.utils.data.Dataset):
    """Quantized images in memory: item i is (levels[i] uint8 (C,H,W), label int64 (-1 if none))."""

    def __init__(self, levels: torch.Tensor, labels: Optional[torch.Tensor], n_bins: int,
                 n_classes: int = 0, class_names=None, name: str = ""):
        if levels.dtype != torch.uint8 or levels.dim() != 4:
            raise ValueError(f"levels must be a uint8 (N, C, H, W) tensor, got {levels.dtype} "
                             f"{tuple(levels.shape)}")
        if not 2 <= n_bins <= 256:
            raise ValueError(f"n_bins must be in 2..256, got {n_bins}")
        if levels.numel() and int(levels.max()) >= n_bins:
            raise ValueError(f"levels must be < n_bins = {n_bins}, got max {int(levels.max())}")
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.int64)
            if labels.shape != (levels.shape[0],):
                raise ValueError(f"labels must have shape ({levels.shape[0]},), got {tuple(labels.shape)}")
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= max(n_classes, 1)):
                raise ValueError(f"labels must be in 0..{n_classes - 1}, got "
                                 f"{int(labels.min())}..{int(labels.max())}")
        self.levels = levels.contiguous()
        self.labels = labels
        self.n_bins = int(n_bins)
        self.n_classes = int(n_classes) if labels is not None else 0
        self.class_names = list(class_names) if class_names is not None else None
        self.name = name

    def __len__(self) -> int:
        return self.levels.shape[0]

    def __getitem__(self, index):
        label = self.labels[index] if self.labels is not None else torch.tensor(-1)
        return self.levels[index], label

    @property
    def image_shape(self):
        return tuple(self.levels.shape[1:])

    def batch(self, indices: torch.Tensor):
        """(levels, labels or None) for a tensor of indices, without per-item Python overhead."""
        levels = self.levels[indices]
        labels = self.labels[indices] if self.labels is not None else None
        return levels, labels

    def __repr__(self) -> str:
        return (f"LevelsDataset({self.name!r}, n={len(self)}, shape={self.image_shape}, "
                f"n_bins={self.n_bins}, n_classes={self.n_classes})")


@dataclass
class DataSplits:
    train: LevelsDataset
    test: LevelsDataset

    @property
    def n_bins(self) -> int:
        return self.train.n_bins

    @property
    def image_shape(self):
        return self.train.image_shape

    @property
    def n_classes(self) -> int:
        return self.train.n_classes


# --------------------------------------------------------------------------------------------------
# Quantization and dequantization

def quantize_uint8(values: np.ndarray | torch.Tensor, n_bits: int) -> torch.Tensor:
    """8-bit values -> levels 0..2**n_bits-1 (the top n_bits of each value), as uint8."""
    check_n_bits(n_bits)
    values = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values)
    if values.dtype != torch.uint8:
        raise ValueError(f"expected uint8 values, got {values.dtype}")
    return values >> (8 - n_bits) if n_bits < 8 else values.clone()


def check_n_bits(n_bits: int) -> None:
    if not isinstance(n_bits, (int, np.integer)) or not 1 <= n_bits <= 8:
        raise ValueError(f"n_bits must be an integer in 1..8, got {n_bits!r}")


def dequantize(levels: torch.Tensor, n_bins: int, generator: Optional[torch.Generator] = None,
               noise: Optional[torch.Tensor] = None, dtype=torch.float32) -> torch.Tensor:
    """x = (level + u) / n_bins - 0.5 with u ~ U[0, 1) (from `generator`, or the given `noise`),
    on the device of `levels` (move the uint8 levels first: 4x less to copy than floats)."""
    x = levels.to(dtype)
    if noise is None:
        noise = torch.rand(levels.shape, generator=generator, device=levels.device, dtype=dtype)
    return (x + noise) / n_bins - 0.5


def to_levels(x: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Inverse of `dequantize` (up to the noise): x in [-0.5, 0.5) -> integer levels, clamped."""
    return torch.floor((x.float() + 0.5) * n_bins).clamp_(0, n_bins - 1).to(torch.uint8)


def levels_to_uint8(levels: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Levels -> 0..255 pixel values for display (level 0 -> 0, level n_bins-1 -> 255)."""
    return torch.round(levels.float() * (255.0 / (n_bins - 1))).clamp_(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------------------------------
# Batching: the data order is a function of (seed, epoch), so a resumed run sees the same batches

def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the n training examples in `epoch`, the same in every process and on resume."""
    generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63))
    return torch.randperm(n, generator=generator)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full global batches per epoch (the incomplete last batch is dropped)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if n < batch_size:
        raise DataError(f"the training set has {n} examples, fewer than one batch of {batch_size}")
    return n // batch_size


def global_batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Indices of the global batch of training step `step` (0-based): batch step % spe of epoch
    step // spe."""
    spe = steps_per_epoch(n, batch_size)
    epoch, k = divmod(int(step), spe)
    return epoch_permutation(n, seed, epoch)[k * batch_size:(k + 1) * batch_size]


def rank_slice(batch_size: int, rank: int, world_size: int) -> slice:
    """The contiguous part of a global batch that `rank` processes (equal parts)."""
    if batch_size % world_size:
        raise ValueError(f"the global batch size {batch_size} must be divisible by the number of "
                         f"processes {world_size}")
    part = batch_size // world_size
    return slice(rank * part, (rank + 1) * part)


def iterate_batches(dataset: LevelsDataset, batch_size: int, seed: int = 0, start_step: int = 0,
                    rank: int = 0, world_size: int = 1) -> Iterator[tuple]:
    """Endless training batches from `start_step` on: (step, levels, labels) for this rank's slice
    of each global batch (a DistributedSampler that also works for a single process)."""
    part = rank_slice(batch_size, rank, world_size)
    step = int(start_step)
    while True:
        indices = global_batch_indices(len(dataset), batch_size, seed, step)[part]
        levels, labels = dataset.batch(indices)
        yield step, levels, labels
        step += 1


def make_loader(dataset: LevelsDataset, batch_size: int, shuffle: bool = False, seed: int = 0,
                epoch: int = 0, drop_last: bool = False, **kwargs) -> torch.utils.data.DataLoader:
    """A torch DataLoader over `dataset` yielding (levels uint8, labels int64 (-1: none)); with
    shuffle, the order is epoch_permutation(seed, epoch)."""
    sampler = epoch_permutation(len(dataset), seed, epoch).tolist() if shuffle else None
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                       drop_last=drop_last, **kwargs)


# --------------------------------------------------------------------------------------------------
# digits

def load_digits_splits() -> DataSplits:
    """scikit-learn digits: 1797 8x8 grey images with 17 levels; 1500 train / 297 test."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataError('the digits dataset needs scikit-learn: pip install "glow_ext[train]"') from e
    digits = load_digits()
    images = np.asarray(digits.images)
    if images.shape != (DIGITS_N, 8, 8):
        raise DataError(f"unexpected scikit-learn digits shape {images.shape}")
    levels = torch.from_numpy(np.rint(images).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(np.asarray(digits.target, dtype=np.int64))
    order = torch.from_numpy(np.random.default_rng(0).permutation(DIGITS_N))
    train, test = order[:DIGITS_TRAIN], order[DIGITS_TRAIN:]
    names = [str(i) for i in range(10)]
    return DataSplits(
        LevelsDataset(levels[train], labels[train], DIGITS_LEVELS, 10, names, "digits/train"),
        LevelsDataset(levels[test], labels[test], DIGITS_LEVELS, 10, names, "digits/test"))


# --------------------------------------------------------------------------------------------------
# CIFAR-10

def find_cifar_dir(data_dir) -> Path:
    """The folder holding data_batch_1..5 and test_batch: data_dir or data_dir/cifar-10-batches-py."""
    if data_dir is None:
        raise DataError("cifar10 needs --data-dir: a folder with the python batches "
                        "(data_batch_1..5, test_batch) or the cifar-10-batches-py folder inside it")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data directory {str(root)!r} does not exist")
    for candidate in (root, root / "cifar-10-batches-py"):
        if (candidate / CIFAR_TEST_FILE).exists() or (candidate / CIFAR_TRAIN_FILES[0]).exists():
            missing = [f for f in CIFAR_TRAIN_FILES + (CIFAR_TEST_FILE,) if not (candidate / f).is_file()]
            if missing:
                raise DataError(f"CIFAR-10 folder {str(candidate)!r} lacks {', '.join(missing)}")
            return candidate
    raise DataError(f"no CIFAR-10 python batches in {str(root)!r} (expected data_batch_1..5 and "
                    f"test_batch there or in {str(root / 'cifar-10-batches-py')!r})")


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global that a CIFAR-10 batch does not need (it could run code)."""


def _latin1_bytes(text, encoding):
    """`_codecs.encode` as pickle protocols < 3 use it for bytes, limited to that one use."""
    if encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"the pickle asks for _codecs.encode with encoding {encoding!r}; "
                                f"only latin1 (bytes) is allowed")
    return text.encode("latin1")


def _allowed_pickle_globals() -> dict:
    """(module, name) -> object: all a pickled dict of lists, bytes and numpy arrays needs, under the
    module names numpy 1.x and 2.x write."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # older numpy has no numpy._core
        from numpy.core import multiarray, numeric
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): _latin1_bytes}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only dicts, lists, tuples, bytes, str, numbers and numpy arrays: every other global
    (the way a pickle runs code: os.system, eval, any class's __reduce__) raises UnsafePickleError
    before it is looked up, so a crafted file cannot run anything."""

    def find_class(self, module, name):
        allowed = _allowed_pickle_globals()
        if (module, name) not in allowed:
            raise UnsafePickleError(f"the pickle asks for the global {module}.{name}, which a "
                                    f"CIFAR-10 batch does not need; refusing to load it")
        return allowed[(module, name)]


def file_md5(path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_cifar_md5(path) -> None:
    """Raise DataError unless `path` is a standard CIFAR-10 batch with its published MD5."""
    path = Path(path)
    expected = CIFAR_MD5.get(path.name)
    opt_out = "pass trust_data_files=True (glow-ext train --trust-data-files) to read custom batches"
    if expected is None:
        raise DataError(f"{str(path)!r} is not a standard CIFAR-10 batch name "
                        f"({', '.join(CIFAR_MD5)}), so it has no known MD5; {opt_out}")
    actual = file_md5(path)
    if actual != expected:
        raise DataError(f"CIFAR-10 batch {str(path)!r} has MD5 {actual}, not the published {expected} "
                        f"of {path.name}: the file is damaged or not the original; re-download "
                        f"cifar-10-python.tar.gz, or {opt_out}")


def read_cifar_batch(path, trust_data_files: bool = False) -> tuple:
    """One python-pickle batch -> (uint8 (N, 3, 32, 32), int64 labels (N,)). The file's MD5 must be
    the published one unless `trust_data_files`; either way it is read by RestrictedUnpickler."""
    path = Path(path)
    if not trust_data_files:
        verify_cifar_md5(path)
    try:
        with open(path, "rb") as f:
            batch = RestrictedUnpickler(f, encoding="bytes").load()
    except Exception as e:
        raise DataError(f"cannot read CIFAR-10 batch {str(path)!r}: {type(e).__name__}: {e}") from e
    if not isinstance(batch, dict):
        raise DataError(f"CIFAR-10 batch {str(path)!r} is not a dict but {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"CIFAR-10 batch {str(path)!r} lacks 'data' or 'labels' (keys: {sorted(batch)})")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"CIFAR-10 batch {str(path)!r}: 'data' must be uint8 (N, 3072), got "
                        f"{data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise DataError(f"CIFAR-10 batch {str(path)!r}: {labels.shape[0] if labels.ndim else 0} labels "
                        f"for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"CIFAR-10 batch {str(path)!r}: labels outside 0..9")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels)


def load_cifar10_splits(data_dir, n_bits: int = 8, trust_data_files: bool = False) -> DataSplits:
    check_n_bits(n_bits)
    folder = find_cifar_dir(data_dir)
    parts = [read_cifar_batch(folder / f, trust_data_files) for f in CIFAR_TRAIN_FILES]
    train_x = torch.cat([p[0] for p in parts])
    train_y = torch.cat([p[1] for p in parts])
    test_x, test_y = read_cifar_batch(folder / CIFAR_TEST_FILE, trust_data_files)
    n_bins = 2**n_bits
    return DataSplits(
        LevelsDataset(quantize_uint8(train_x, n_bits), train_y, n_bins, 10, CIFAR_CLASSES, "cifar10/train"),
        LevelsDataset(quantize_uint8(test_x, n_bits), test_y, n_bins, 10, CIFAR_CLASSES, "cifar10/test"))


# --------------------------------------------------------------------------------------------------
# A folder of images

def list_images(root) -> list:
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_image(path, image_size: int, channels: int = 3) -> np.ndarray:
    """One image file -> uint8 (channels, S, S): shorter side resized to S, centre crop. Refuses
    images over Image.MAX_IMAGE_PIXELS (PIL only warns up to twice that) and truncated files."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                image = image.convert("RGB" if channels == 3 else "L")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"image {str(path)!r} is refused as a possible decompression bomb: {e}") from e
    except Exception as e:
        raise DataError(f"cannot read image {str(path)!r}: {type(e).__name__}: {e}") from e
    w, h = image.size
    scale = image_size / min(w, h)
    new_w, new_h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC if scale > 1 else Image.LANCZOS)
    left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return np.ascontiguousarray(array)


def _folder_labels(root: Path, files: list):
    """Class names and labels from the first-level subfolders, or (None, None) when any image
    sits directly in root."""
    parts = [f.relative_to(root).parts for f in files]
    if any(len(p) < 2 for p in parts):
        return None, None
    names = sorted({p[0] for p in parts})
    index = {name: i for i, name in enumerate(names)}
    return names, torch.tensor([index[p[0]] for p in parts], dtype=torch.int64)


def _load_folder(root: Path, image_size: int, channels: int, n_bits: int, class_names=None):
    files = list_images(root)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {str(root)!r}")
    names, labels = _folder_labels(root, files)
    if class_names is not None and names is not None:
        # Test split: label by the training split's class names.
        unknown = sorted(set(names) - set(class_names))
        if unknown:
            raise DataError(f"{str(root)!r} has classes not in the training split: {unknown}")
        index = {name: i for i, name in enumerate(class_names)}
        labels = torch.tensor([index[f.relative_to(root).parts[0]] for f in files], dtype=torch.int64)
        names = class_names
    images = torch.from_numpy(np.stack([load_image(f, image_size, channels) for f in files]))
    return quantize_uint8(images, n_bits), labels, names


def load_folder_splits(data_dir, image_size: int = 32, channels: int = 3, n_bits: int = 8,
                       test_fraction: float = 0.1, seed: int = 0) -> DataSplits:
    check_n_bits(n_bits)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if data_dir is None:
        raise DataError("the folder dataset needs --data-dir, a folder of images")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data directory {str(root)!r} does not exist")
    n_bins = 2**n_bits
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_x, train_y, names = _load_folder(root / "train", image_size, channels, n_bits)
        test_x, test_y, _ = _load_folder(root / "test", image_size, channels, n_bits, names)
        if (train_y is None) != (test_y is None):
            train_y = test_y = names = None
    else:
        levels, labels, names = _load_folder(root, image_size, channels, n_bits)
        n = levels.shape[0]
        n_test = int(round(n * test_fraction))
        if n_test < 1 or n_test >= n:
            raise DataError(f"{n} images in {str(root)!r}: too few for a train/test split with "
                            f"test fraction {test_fraction}")
        order = torch.from_numpy(np.random.default_rng(seed).permutation(n))
        train, test = order[:n - n_test], order[n - n_test:]
        train_x, test_x = levels[train], levels[test]
        train_y = labels[train] if labels is not None else None
        test_y = labels[test] if labels is not None else None
    n_classes = len(names) if names is not None else 0
    return DataSplits(
        LevelsDataset(train_x, train_y, n_bins, n_classes, names, f"folder:{root}/train"),
        LevelsDataset(test_x, test_y, n_bins, n_classes, names, f"folder:{root}/test"))


# --------------------------------------------------------------------------------------------------

def load_splits(dataset: str = "digits", data_dir=None, image_size: Optional[int] = None,
                n_bits: Optional[int] = None, channels: int = 3, test_fraction: float = 0.1,
                trust_data_files: bool = False) -> DataSplits:
    """Train and test splits of `dataset` (digits | cifar10 | folder). `trust_data_files` skips the
    MD5 check of the CIFAR-10 batches (for custom batches; they are still read without running code)."""
    if dataset == "digits":
        if n_bits is not None:
            raise ValueError("digits has 17 levels (0..16); --n-bits does not apply to it")
        if image_size not in (None, 8):
            raise ValueError(f"digits images are 8x8; --image-size {image_size} does not apply")
        return load_digits_splits()
    if dataset == "cifar10":
        if image_size not in (None, 32):
            raise ValueError(f"CIFAR-10 images are 32x32; --image-size {image_size} does not apply")
        return load_cifar10_splits(data_dir, 8 if n_bits is None else n_bits, trust_data_files)
    if dataset == "folder":
        return load_folder_splits(data_dir, 32 if image_size is None else image_size, channels,
                                  8 if n_bits is None else n_bits, test_fraction)
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def save_image_grid(levels: torch.Tensor, n_bins: int, path, nrow: Optional[int] = None,
                    scale: int = 1) -> None:
    """Write a grid of images given as levels (N, C, H, W) to a PNG (atomically), with a 1-pixel
    border; `scale` enlarges each pixel (nearest neighbour) so small images stay visible."""
    from PIL import Image

    levels = levels.detach().cpu()
    n, c, h, w = levels.shape
    nrow = nrow or max(1, int(np.ceil(np.sqrt(n))))
    ncol = int(np.ceil(n / nrow))
    pixels = levels_to_uint8(levels, n_bins).numpy()
    pad = 1
    grid = np.full((c, ncol * (h + pad) + pad, nrow * (w + pad) + pad), 255 // 2, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
        grid[:, y0:y0 + h, x0:x0 + w] = pixels[i]
    grid = grid.transpose(1, 2, 0)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    image = Image.fromarray(np.ascontiguousarray(grid[..., 0] if c == 1 else grid))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
