"""Fashion-MNIST loading: IDX parsing, validation, source selection, tf.data."""

import gzip
import logging
import os
import shutil

import numpy as np
import pytest

from keras_taylor import datasets as kd

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}


def write_idx(path, array, gz=False, magic=None):
    """Writes `array` as an IDX file (big-endian header), gzipped if `gz`."""
    array = np.asarray(array)
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    if magic is None:
        magic = (TYPE_CODES[np.dtype(dtype)] << 8) | array.ndim
    payload = magic.to_bytes(4, "big")
    payload += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload += array.astype(dtype).tobytes()
    path = str(path)
    if gz:
        with gzip.open(path, "wb", compresslevel=1) as f:
            f.write(payload)
    else:
        with open(path, "wb") as f:
            f.write(payload)
    return path


def fake_split(n):
    # Image i is filled with i % 256 (compresses fast, easy to check).
    x = np.broadcast_to((np.arange(n) % 256).astype(np.uint8)[:, None, None], (n, 28, 28))
    y = (np.arange(n) % 10).astype(np.uint8)
    return np.ascontiguousarray(x), y


def write_fake_dir(directory, gz=True, n_train=60000, n_test=10000):
    os.makedirs(directory, exist_ok=True)
    suffix = ".gz" if gz else ""
    x, y = fake_split(n_train)
    write_idx(os.path.join(directory, NAMES["train_images"] + suffix), x, gz=gz)
    write_idx(os.path.join(directory, NAMES["train_labels"] + suffix), y, gz=gz)
    x, y = fake_split(n_test)
    write_idx(os.path.join(directory, NAMES["test_images"] + suffix), x, gz=gz)
    write_idx(os.path.join(directory, NAMES["test_labels"] + suffix), y, gz=gz)
    return str(directory)


@pytest.fixture(scope="module")
def fake_dirs(tmp_path_factory):
    """Full-size synthetic Fashion-MNIST directories: gzipped and raw."""
    root = tmp_path_factory.mktemp("fmnist")
    return {
        "gz": write_fake_dir(root / "gz", gz=True),
        "raw": write_fake_dir(root / "raw", gz=False),
    }


# --------------------------------------------------------------------------
# IDX parser


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_read_idx_small_files(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, (5,), dtype=np.uint8)
    ip = write_idx(tmp_path / "img", images, gz=gz)
    lp = write_idx(tmp_path / "lbl", labels, gz=gz)

    x = kd.read_idx(ip, expected_magic=2051)
    y = kd.read_idx(lp, expected_magic=2049)
    assert x.dtype == np.uint8 and x.shape == (5, 28, 28)
    assert y.dtype == np.uint8 and y.shape == (5,)
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    x[0, 0, 0] = 1  # A writable copy, not a view of the file buffer.


@pytest.mark.parametrize("dtype", [">i4", ">f4"])
def test_read_idx_multibyte_big_endian(tmp_path, dtype):
    a = np.arange(-6, 6).reshape(3, 4).astype(dtype)
    out = kd.read_idx(write_idx(tmp_path / "a", a, gz=True))
    assert out.shape == (3, 4) and out.dtype.isnative
    np.testing.assert_array_equal(out, a.astype(out.dtype))


def test_read_idx_corrupt_magic_names_file(tmp_path):
    path = write_idx(tmp_path / "bad-images", np.zeros((2, 28, 28), np.uint8), magic=0x12345678)
    with pytest.raises(ValueError, match="bad-images"):
        kd.read_idx(path)
    # A valid labels file read where an images file is expected.
    path = write_idx(tmp_path / "labels", np.zeros((2,), np.uint8))
    with pytest.raises(ValueError, match=r"Expected IDX magic number 2051.*labels"):
        kd.read_idx(path, expected_magic=2051)


def test_read_idx_truncated(tmp_path):
    path = write_idx(tmp_path / "short", np.zeros((4, 28, 28), np.uint8))
    with open(path, "r+b") as f:
        f.truncate(16 + 3 * 28 * 28)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        kd.read_idx(path)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        kd.read_idx(tmp_path / "nope")


# --------------------------------------------------------------------------
# load_fashion_mnist with data_dir


@pytest.mark.parametrize("kind", ["gz", "raw"])
def test_load_from_data_dir(fake_dirs, kind, caplog):
    with caplog.at_level(logging.INFO, logger="keras_taylor"):
        (x_train, y_train), (x_test, y_test) = kd.load_fashion_mnist(
            data_dir=fake_dirs[kind], source="idx"
        )
    assert x_train.shape == (60000, 28, 28) and x_train.dtype == np.uint8
    assert y_train.shape == (60000,) and y_train.dtype == np.uint8
    assert x_test.shape == (10000, 28, 28) and y_test.shape == (10000,)
    assert x_train[300, 5, 5] == 300 % 256 and y_test[13] == 3
    assert any("IDX files in" in r.getMessage() for r in caplog.records)


def test_data_dir_is_tried_first_in_auto_mode(fake_dirs, monkeypatch):
    def boom():
        raise AssertionError("keras/tfds must not be tried before data_dir")

    monkeypatch.setattr(kd, "_load_from_keras", boom)
    monkeypatch.setattr(kd, "_load_from_tfds", boom)
    (x_train, _), _ = kd.load_fashion_mnist(data_dir=fake_dirs["raw"])
    assert x_train.shape == (60000, 28, 28)


def test_corrupt_file_in_data_dir_names_file(fake_dirs, tmp_path):
    d = tmp_path / "corrupt"
    shutil.copytree(fake_dirs["raw"], d)
    write_idx(d / NAMES["test_labels"], np.zeros((10000,), np.uint8), magic=0x00000803)
    with pytest.raises(ValueError, match=NAMES["test_labels"]):
        kd.load_fashion_mnist(data_dir=str(d), source="idx")


def test_wrong_count_in_data_dir_names_file(fake_dirs, tmp_path):
    d = tmp_path / "short"
    shutil.copytree(fake_dirs["raw"], d)
    write_idx(d / NAMES["test_images"], np.zeros((9999, 28, 28), np.uint8))
    with pytest.raises(ValueError, match=rf"Expected 10000 images.*{NAMES['test_images']}"):
        kd.load_fashion_mnist(data_dir=str(d), source="idx")


def test_empty_data_dir_raises_helpful_error(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        kd.load_fashion_mnist(data_dir=str(tmp_path), source="idx")
    msg = str(info.value)
    assert "apt-get install -y dataset-fashion-mnist" in msg
    assert "/usr/share/datasets/fashion-mnist" in msg
    assert "internet" in msg and "data_dir" in msg


def test_unknown_source():
    with pytest.raises(ValueError, match="Received: source='mnist'"):
        kd.load_fashion_mnist(source="mnist")


# --------------------------------------------------------------------------
# keras.datasets / TFDS gating (no network needed)


def test_keras_skipped_without_cache_or_network(tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr(kd, "_keras_cache_dir", lambda: str(tmp_path / "empty"))
    monkeypatch.setattr(kd, "_host_reachable", lambda *a, **k: False)
    import keras

    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", lambda: called.append(1))
    with pytest.raises(FileNotFoundError, match="apt-get"):
        kd.load_fashion_mnist(source="keras")
    assert not called


def test_keras_used_when_cache_present(tmp_path, monkeypatch):
    cache = tmp_path / "fashion-mnist"
    cache.mkdir()
    for name in NAMES.values():
        (cache / (name + ".gz")).write_bytes(b"")
    monkeypatch.setattr(kd, "_keras_cache_dir", lambda: str(cache))
    monkeypatch.setattr(kd, "_host_reachable", lambda *a, **k: False)
    fake = (fake_split(3), fake_split(2))
    import keras

    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", lambda: fake)
    (x_train, y_train), (x_test, _) = kd.load_fashion_mnist(source="keras")
    assert x_train.shape == (3, 28, 28) and x_test.shape == (2, 28, 28)
    assert y_train.dtype == np.uint8


def test_keras_failure_falls_through(tmp_path, monkeypatch):
    monkeypatch.setattr(kd, "_keras_cache_dir", lambda: str(tmp_path))
    monkeypatch.setattr(kd, "_host_reachable", lambda *a, **k: True)
    import keras

    def offline():
        raise OSError("network unreachable")

    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", offline)
    with pytest.raises(FileNotFoundError):
        kd.load_fashion_mnist(source="keras")


def test_host_reachable_is_quick_for_unroutable_address():
    import time

    start = time.monotonic()
    assert not kd._host_reachable("192.0.2.1", 443, timeout=0.5)  # TEST-NET-1
    assert time.monotonic() - start < 2.0


def test_tfds_not_prepared(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        kd.load_fashion_mnist(source="tfds")


# --------------------------------------------------------------------------
# Conversion and tf.data


def test_as_float_images():
    x = np.array([[[0, 255], [51, 102]]], np.uint8)
    out = kd.as_float_images(x)
    assert out.shape == (1, 2, 2, 1) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, :, 0], [[0, 1], [0.2, 0.4]], rtol=1e-6)
    with pytest.raises(ValueError, match="Received: an array of shape"):
        kd.as_float_images(np.zeros((2, 28, 28, 1), np.uint8))


def test_class_names():
    assert len(kd.CLASS_NAMES) == 10
    assert kd.CLASS_NAMES[0] == "T-shirt/top" and kd.CLASS_NAMES[9] == "Ankle boot"


def test_fashion_mnist_datasets_subset(fake_dirs):
    import tensorflow as tf

    train_ds, test_ds = kd.fashion_mnist_datasets(
        batch_size=64, train_subset=256, data_dir=fake_dirs["gz"], seed=1
    )
    batches = list(train_ds)
    assert len(batches) == 4
    for x, y in batches:
        assert tuple(x.shape) == (64, 28, 28, 1) and x.dtype == tf.float32
        assert tuple(y.shape) == (64,) and y.dtype == tf.int32
        assert 0.0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 1.0
    # Same seed -> same subset; the subset is 256 distinct training examples.
    first = np.sort(np.concatenate([x[:, 0, 0, 0].numpy() for x, _ in batches]))
    again, _ = kd.fashion_mnist_datasets(
        batch_size=64, train_subset=256, data_dir=fake_dirs["gz"], seed=1
    )
    np.testing.assert_array_equal(
        first, np.sort(np.concatenate([x[:, 0, 0, 0].numpy() for x, _ in again]))
    )
    x, y = next(iter(test_ds))
    assert tuple(x.shape) == (64, 28, 28, 1)


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"train_subset": 0}, {"train_subset": 60001}])
def test_fashion_mnist_datasets_bad_args(kwargs):
    with pytest.raises(ValueError, match="Received:"):
        kd.fashion_mnist_datasets(**kwargs)


# --------------------------------------------------------------------------
# Real data (Debian package dataset-fashion-mnist)


@pytest.mark.slow
def test_real_debian_files():
    if not os.path.isdir(DEBIAN_DIR):
        pytest.skip(f"{DEBIAN_DIR} is absent (apt-get install -y dataset-fashion-mnist)")
    (x_train, y_train), (x_test, y_test) = kd.load_fashion_mnist(source="idx")
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert x_train.dtype == np.uint8 and x_test.dtype == np.uint8
    assert y_train.shape == (60000,) and y_test.shape == (10000,)
    assert y_train.min() == 0 and y_train.max() == 9
    assert y_test.min() == 0 and y_test.max() == 9
    np.testing.assert_array_equal(np.bincount(y_train, minlength=10), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(y_test, minlength=10), [1000] * 10)
    assert x_train.max() == 255 and 50 < x_train.mean() < 100
