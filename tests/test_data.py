"""glow_ext.training.data: digits split, CIFAR-10 pickle batches, image folders, quantization, batching."""
import io
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch

from glow_ext.training import data as gdata


# --------------------------------------------------------------------------------------------------
# helpers: small datasets written into tmp_path

def write_cifar(folder, n_per_batch=6, seed=0, protocol=pickle.DEFAULT_PROTOCOL):
    """Five training batches and a test batch in the python-pickle format of CIFAR-10 (their MD5s
    are not the published ones: load them with trust_data_files or `register_md5`)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in gdata.CIFAR_TRAIN_FILES + (gdata.CIFAR_TEST_FILE,):
        images = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": images,
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(n_per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        batches[name] = (images, labels)
    return batches


def register_md5(monkeypatch, folder):
    """Make the batches in `folder` the 'published' ones, so they load without trust_data_files."""
    monkeypatch.setattr(gdata, "CIFAR_MD5", {name: gdata.file_md5(folder / name) for name in gdata.CIFAR_MD5})


def write_images(folder, specs):
    """specs: list of (relative path, (H, W), colour (r, g, b)) -> solid-colour images (PNG/JPEG by
    extension) with a white top-left pixel."""
    from PIL import Image

    for rel, (h, w), colour in specs:
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        array = np.empty((h, w, 3), dtype=np.uint8)
        array[...] = colour
        array[0, 0] = 255
        Image.fromarray(array).save(path)


# --------------------------------------------------------------------------------------------------
# quantization and dequantization

def test_quantize_keeps_top_bits():
    values = torch.arange(256, dtype=torch.uint8)
    for n_bits in range(1, 9):
        levels = gdata.quantize_uint8(values, n_bits)
        assert levels.dtype == torch.uint8
        assert int(levels.max()) == 2**n_bits - 1 and int(levels.min()) == 0
        assert torch.equal(levels, values // 2 ** (8 - n_bits))
    assert torch.equal(gdata.quantize_uint8(torch.tensor([0, 7, 8, 255], dtype=torch.uint8), 5),
                       torch.tensor([0, 0, 1, 31], dtype=torch.uint8))
    for bad in (0, 9, 2.5):
        with pytest.raises(ValueError, match="n_bits"):
            gdata.quantize_uint8(values, bad)


def test_dequantize_range_and_round_trip():
    levels = torch.randint(0, 17, (64, 1, 8, 8), dtype=torch.uint8)
    x = gdata.dequantize(levels, 17, generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and x.shape == levels.shape
    assert float(x.min()) >= -0.5 and float(x.max()) < 0.5
    # Each x lies in its level's bin of width 1/n_bins.
    assert torch.equal(gdata.to_levels(x, 17), levels)
    # The same generator seed gives the same noise; zero noise gives the bin's lower edge.
    x2 = gdata.dequantize(levels, 17, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    x0 = gdata.dequantize(levels, 17, noise=torch.zeros(levels.shape))
    assert torch.allclose(x0, levels.float() / 17 - 0.5)


def test_levels_to_uint8_display():
    levels = torch.tensor([0, 8, 16], dtype=torch.uint8)
    assert gdata.levels_to_uint8(levels, 17).tolist() == [0, 128, 255]


# --------------------------------------------------------------------------------------------------
# digits

def test_digits_split_matches_the_baselines():
    splits = gdata.load_splits("digits")
    assert len(splits.train) == 1500 and len(splits.test) == 297
    assert splits.n_bins == 17 and splits.image_shape == (1, 8, 8) and splits.n_classes == 10
    assert splits.train.levels.dtype == torch.uint8 and int(splits.train.levels.max()) == 16
    assert splits.train.labels.dtype == torch.int64
    # The split is numpy.random.default_rng(0).permutation(1797): first 1500 train, the rest test.
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(1797)
    expected = torch.from_numpy(digits.images[order[1500:]].astype(np.uint8)).unsqueeze(1)
    assert torch.equal(splits.test.levels, expected)
    assert torch.equal(splits.test.labels, torch.from_numpy(digits.target[order[1500:]]))
    # Deterministic: loading again gives identical tensors.
    again = gdata.load_splits("digits")
    assert torch.equal(again.train.levels, splits.train.levels)
    assert torch.equal(again.train.labels, splits.train.labels)
    # The per-pixel histogram of the training split (add-1/2 smoothing) scores 2.42 bpd on the test split.
    tr = splits.train.levels.reshape(1500, 64).numpy()
    te = splits.test.levels.reshape(297, 64).numpy()
    bits = 0.0
    for j in range(64):
        counts = np.bincount(tr[:, j], minlength=17) + 0.5
        bits -= np.log2(counts[te[:, j]] / counts.sum()).sum()
    assert abs(bits / te.size - 2.42) < 0.01


def test_digits_item_and_loader():
    splits = gdata.load_splits("digits")
    levels, label = splits.train[3]
    assert levels.shape == (1, 8, 8) and levels.dtype == torch.uint8 and label.dtype == torch.int64
    batch_levels, batch_labels = next(iter(gdata.make_loader(splits.train, 32, shuffle=True, seed=1)))
    assert batch_levels.shape == (32, 1, 8, 8) and batch_labels.shape == (32,)


def test_digits_rejects_options_that_do_not_apply():
    with pytest.raises(ValueError, match="n-bits"):
        gdata.load_splits("digits", n_bits=5)
    with pytest.raises(ValueError, match="8x8"):
        gdata.load_splits("digits", image_size=32)
    with pytest.raises(ValueError, match="unknown dataset"):
        gdata.load_splits("mnist")


# --------------------------------------------------------------------------------------------------
# batching

def test_batches_are_a_function_of_seed_and_step():
    a = gdata.global_batch_indices(100, 16, seed=3, step=7)
    b = gdata.global_batch_indices(100, 16, seed=3, step=7)
    c = gdata.global_batch_indices(100, 16, seed=4, step=7)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # One epoch (6 full batches of 16 out of 100) visits distinct examples.
    epoch = torch.cat([gdata.global_batch_indices(100, 16, 3, s) for s in range(6)])
    assert epoch.unique().numel() == 96
    # The next epoch is reshuffled.
    assert not torch.equal(gdata.global_batch_indices(100, 16, 3, 6), gdata.global_batch_indices(100, 16, 3, 0))


def test_rank_slices_cover_the_global_batch():
    dataset = gdata.LevelsDataset(torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1) % 17,
                                  torch.arange(40) % 4, 17, 4)
    single = next(gdata.iterate_batches(dataset, 8, seed=1, start_step=5))
    parts = [next(gdata.iterate_batches(dataset, 8, seed=1, start_step=5, rank=r, world_size=2))
             for r in range(2)]
    assert torch.equal(torch.cat([p[1] for p in parts]), single[1])
    assert torch.equal(torch.cat([p[2] for p in parts]), single[2])
    with pytest.raises(ValueError, match="divisible"):
        gdata.rank_slice(10, 0, 3)
    with pytest.raises(gdata.DataError, match="fewer than one batch"):
        gdata.steps_per_epoch(5, 8)


def test_dataset_validates_levels_and_labels():
    with pytest.raises(ValueError, match="uint8"):
        gdata.LevelsDataset(torch.zeros(2, 1, 4, 4), None, 17)
    with pytest.raises(ValueError, match="< n_bins"):
        gdata.LevelsDataset(torch.full((2, 1, 4, 4), 20, dtype=torch.uint8), None, 17)
    with pytest.raises(ValueError, match="labels must be in"):
        gdata.LevelsDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 5]), 17, 3)


# --------------------------------------------------------------------------------------------------
# CIFAR-10

@pytest.mark.parametrize("nested", [False, True])
def test_cifar_batches(tmp_path, nested, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    batches = write_cifar(folder)
    register_md5(monkeypatch, folder)
    splits = gdata.load_splits("cifar10", data_dir=tmp_path)
    assert len(splits.train) == 30 and len(splits.test) == 6
    assert splits.train.levels.shape == (30, 3, 32, 32) and splits.train.levels.dtype == torch.uint8
    assert splits.n_bins == 256 and splits.n_classes == 10
    images, labels = batches["data_batch_2"]
    # Row-major (3, 32, 32) channel planes, in batch order.
    assert torch.equal(splits.train.levels[6:12], torch.from_numpy(images.reshape(6, 3, 32, 32)))
    assert splits.train.labels[6:12].tolist() == labels
    assert splits.test.labels.tolist() == batches["test_batch"][1]
    five = gdata.load_splits("cifar10", data_dir=tmp_path, n_bits=5)
    assert five.n_bins == 32
    assert torch.equal(five.train.levels, splits.train.levels >> 3)


def test_cifar_missing_dir_and_files(tmp_path):
    with pytest.raises(gdata.DataError, match="does not exist"):
        gdata.load_splits("cifar10", data_dir=tmp_path / "nope")
    with pytest.raises(gdata.DataError, match="needs --data-dir"):
        gdata.load_splits("cifar10")
    with pytest.raises(gdata.DataError, match="no CIFAR-10 python batches"):
        gdata.load_splits("cifar10", data_dir=tmp_path)
    write_cifar(tmp_path)
    (tmp_path / "data_batch_4").unlink()
    with pytest.raises(gdata.DataError, match="lacks data_batch_4"):
        gdata.load_splits("cifar10", data_dir=tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_shape", "no_labels", "bad_labels"])
def test_cifar_corrupt_batch(tmp_path, damage):
    write_cifar(tmp_path)
    path = tmp_path / "data_batch_3"
    if damage == "garbage":
        path.write_bytes(b"this is not a pickle")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:
        batch = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}
        if damage == "wrong_shape":
            batch[b"data"] = np.zeros((4, 100), np.uint8)
        elif damage == "no_labels":
            del batch[b"labels"]
        else:
            batch[b"labels"] = [0, 1, 2, 10]
        path.write_bytes(pickle.dumps(batch))
    with pytest.raises(gdata.DataError, match="data_batch_3"):
        gdata.load_splits("cifar10", data_dir=tmp_path, trust_data_files=True)


def test_cifar_md5_mismatch_is_refused_before_reading(tmp_path):
    write_cifar(tmp_path)
    with pytest.raises(gdata.DataError, match=r"data_batch_1'? has MD5 [0-9a-f]{32}, not the published "
                       r"c99cafc152244af753f735de768cd75f.*--trust-data-files"):
        gdata.load_splits("cifar10", data_dir=tmp_path)
    with pytest.raises(gdata.DataError, match="not a standard CIFAR-10 batch name"):
        gdata.read_cifar_batch(tmp_path / "my_batch")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_custom_batches_load_with_the_opt_out(tmp_path, protocol):
    """Every pickle protocol's way of writing bytes and numpy arrays passes the restricted unpickler."""
    batches = write_cifar(tmp_path, protocol=protocol)
    splits = gdata.load_splits("cifar10", data_dir=tmp_path, trust_data_files=True)
    images, labels = batches["test_batch"]
    assert torch.equal(splits.test.levels, torch.from_numpy(images.reshape(-1, 3, 32, 32)))
    assert splits.test.labels.tolist() == labels


def test_cifar_numpy1_module_names_pass_the_restricted_unpickler(tmp_path):
    """The real batches name numpy.core.multiarray (numpy 1.x); protocol 2 spells globals as text."""
    images = np.random.default_rng(1).integers(0, 256, size=(3, 3072), dtype=np.uint8)
    raw = pickle.dumps({b"data": images, b"labels": [1, 2, 3]}, protocol=2)
    assert b"cnumpy._core.multiarray\n" in raw
    path = tmp_path / "data_batch_1"
    path.write_bytes(raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))
    x, y = gdata.read_cifar_batch(path, trust_data_files=True)
    assert torch.equal(x, torch.from_numpy(images.reshape(3, 3, 32, 32))) and y.tolist() == [1, 2, 3]


class _CreatesMarker:
    """A pickle payload: unpickling it with plain pickle creates the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _crafted_batch(marker, where):
    images = np.zeros((2, 3072), np.uint8)
    if where == "top":
        return _CreatesMarker(marker)
    if where == "labels":
        return {b"data": images, b"labels": [0, _CreatesMarker(marker)]}
    return {b"data": np.array([_CreatesMarker(marker)], dtype=object), b"labels": [0]}  # in an array


@pytest.mark.parametrize("where", ["top", "labels", "object_array"])
@pytest.mark.parametrize("trust", [False, True])
def test_cifar_crafted_pickle_never_runs_its_payload(tmp_path, monkeypatch, where, trust):
    """Refused by its MD5 (the other batches pass theirs) or, with the opt-out, by the restricted
    unpickler; either way the payload does not run."""
    write_cifar(tmp_path)
    register_md5(monkeypatch, tmp_path)
    marker = tmp_path / "payload_ran"
    crafted = pickle.dumps(_crafted_batch(marker, where))
    pickle.loads(crafted)  # the payload is real: plain pickle runs it
    assert marker.exists()
    marker.unlink()
    (tmp_path / "data_batch_2").write_bytes(crafted)
    expected = r"data_batch_2.*global io\.open.*refusing" if trust else r"data_batch_2.*MD5"
    with pytest.raises(gdata.DataError, match=expected):
        gdata.load_splits("cifar10", data_dir=tmp_path, trust_data_files=trust)
    assert not marker.exists()


def test_restricted_unpickler_refuses_codecs_beyond_latin1():
    payload = b"c_codecs\nencode\n(Vabc\nVrot13\ntR."
    assert pickle.loads(payload) == "nop"  # plain pickle runs any codec
    with pytest.raises(gdata.UnsafePickleError, match="rot13"):
        gdata.RestrictedUnpickler(io.BytesIO(payload)).load()


# --------------------------------------------------------------------------------------------------
# A folder of images

def test_image_folder_with_classes(tmp_path):
    specs = []
    for k, name in enumerate(["cats", "dogs"]):
        for i in range(5):
            ext = "png" if i % 2 else "jpg"
            specs.append((f"{name}/sub/img{i}.{ext}", (20 + 4 * i, 16 + 2 * i), (40 * k + 30, 100, 200)))
    write_images(tmp_path, specs)
    splits = gdata.load_splits("folder", data_dir=tmp_path, image_size=8, test_fraction=0.2)
    assert len(splits.train) == 8 and len(splits.test) == 2
    assert splits.train.levels.shape == (8, 3, 8, 8) and splits.train.levels.dtype == torch.uint8
    assert splits.n_classes == 2 and splits.train.class_names == ["cats", "dogs"]
    everything = torch.cat([splits.train.levels, splits.test.levels])
    labels = torch.cat([splits.train.labels, splits.test.labels])
    assert sorted(labels.tolist()) == [0] * 5 + [1] * 5
    # Solid colours survive resizing and centre cropping (JPEG within a few levels); the class sets
    # the red channel. Centre pixel, away from the white corner.
    red = everything[:, 0, 4, 4].int()
    expected = torch.where(labels == 0, 30, 70)
    assert (red - expected).abs().max() <= 6
    assert (everything[:, 2, 4, 4].int() - 200).abs().max() <= 6
    # n_bits quantization and grey conversion.
    four = gdata.load_splits("folder", data_dir=tmp_path, image_size=8, n_bits=4, channels=1,
                             test_fraction=0.2)
    assert four.n_bins == 16 and four.image_shape == (1, 8, 8) and int(four.train.levels.max()) <= 15
    # Deterministic split.
    again = gdata.load_splits("folder", data_dir=tmp_path, image_size=8, test_fraction=0.2)
    assert torch.equal(again.test.levels, splits.test.levels)


def test_image_folder_train_test_subfolders_and_no_labels(tmp_path):
    write_images(tmp_path, [("train/a.png", (8, 8), (0, 0, 0)), ("train/b.jpeg", (9, 12), (10, 10, 10)),
                            ("test/c.png", (8, 8), (255, 255, 255))])
    splits = gdata.load_splits("folder", data_dir=tmp_path, image_size=4)
    assert len(splits.train) == 2 and len(splits.test) == 1
    assert splits.train.labels is None and splits.n_classes == 0
    assert splits.train[0][1].item() == -1


def test_image_folder_errors(tmp_path):
    with pytest.raises(gdata.DataError, match="does not exist"):
        gdata.load_splits("folder", data_dir=tmp_path / "missing")
    with pytest.raises(gdata.DataError, match="no images"):
        gdata.load_splits("folder", data_dir=tmp_path)
    write_images(tmp_path, [(f"x{i}.png", (8, 8), (1, 2, 3)) for i in range(4)])
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(gdata.DataError, match="broken.jpg"):
        gdata.load_splits("folder", data_dir=tmp_path, image_size=8)


def _png_header_only(width, height):
    """A PNG whose header declares width x height grey pixels, with almost no pixel data."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [10_000, 20_000])  # PIL warns above 89.5 Mpixel, raises above twice that
def test_image_folder_refuses_decompression_bombs(tmp_path, side):
    from PIL import Image

    assert side * side > Image.MAX_IMAGE_PIXELS
    write_images(tmp_path, [(f"x{i}.png", (8, 8), (1, 2, 3)) for i in range(4)])
    (tmp_path / "bomb.png").write_bytes(_png_header_only(side, side))
    with pytest.raises(gdata.DataError, match="bomb.png.*decompression bomb"):
        gdata.load_splits("folder", data_dir=tmp_path, image_size=8)


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_image_folder_refuses_truncated_images(tmp_path, ext):
    from PIL import Image

    write_images(tmp_path, [(f"x{i}.png", (8, 8), (1, 2, 3)) for i in range(4)])
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    path = tmp_path / f"cut.{ext}"
    Image.fromarray(noise).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(gdata.DataError, match=f"cut.{ext}.*truncated"):
        gdata.load_splits("folder", data_dir=tmp_path, image_size=8)


def test_save_image_grid(tmp_path):
    from PIL import Image

    levels = torch.randint(0, 17, (10, 1, 8, 8), dtype=torch.uint8)
    gdata.save_image_grid(levels, 17, tmp_path / "g.png", scale=2)
    with Image.open(tmp_path / "g.png") as image:
        assert image.mode == "L" and image.size == (2 * (4 * 9 + 1), 2 * (3 * 9 + 1))
    rgb = torch.randint(0, 256, (4, 3, 6, 6), dtype=torch.uint8)
    gdata.save_image_grid(rgb, 256, tmp_path / "c.png")
    with Image.open(tmp_path / "c.png") as image:
        assert image.mode == "RGB"
        assert np.array_equal(np.asarray(image)[1:7, 1:7].transpose(2, 0, 1), rgb[0].numpy())
