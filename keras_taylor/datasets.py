"""Fashion-MNIST loading that works with or without internet access.

`load_fashion_mnist` tries, in order:

1. `keras.datasets.fashion_mnist.load_data()`, but only when its cache files
   already exist or the download host answers within a couple of seconds, so
   that an offline machine never waits on a network timeout;
2. TensorFlow Datasets (`tfds.load("fashion_mnist", download=False)`), when the
   dataset was already prepared in the TFDS data directory;
3. the raw IDX files installed by the Debian/Ubuntu package
   `dataset-fashion-mnist` in `/usr/share/datasets/fashion-mnist/` (or any
   directory passed as `data_dir`), parsed directly with `gzip` and NumPy.

`fashion_mnist_datasets` wraps the arrays into `tf.data` pipelines.
"""

from __future__ import annotations

import gzip
import logging
import os
import socket
import threading

import numpy as np

logger = logging.getLogger("keras_taylor")

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"

SOURCES = ("auto", "keras", "tfds", "idx")

# The four files, in the order (train images, train labels, test images, test
# labels). The same names are used by keras.datasets, the original Zalando
# release and the Debian package.
_TRAIN_IMAGES = "train-images-idx3-ubyte"
_TRAIN_LABELS = "train-labels-idx1-ubyte"
_TEST_IMAGES = "t10k-images-idx3-ubyte"
_TEST_LABELS = "t10k-labels-idx1-ubyte"

_NUM_TRAIN = 60000
_NUM_TEST = 10000
_IMAGE_SHAPE = (28, 28)

# IDX magic numbers: two zero bytes, a type code (0x08 = unsigned byte) and the
# number of dimensions.
_MAGIC_LABELS = 0x00000801  # 2049
_MAGIC_IMAGES = 0x00000803  # 2051

# IDX type code -> big-endian NumPy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_KERAS_HOST = "storage.googleapis.com"
_NETWORK_TIMEOUT_S = 2.0

_HOW_TO_GET_DATA = (
    "To get Fashion-MNIST, either (a) run with internet access so that "
    "`keras.datasets.fashion_mnist.load_data()` (or TensorFlow Datasets) can "
    "download it, or (b) on Debian/Ubuntu run "
    "`apt-get install -y dataset-fashion-mnist`, which puts the IDX files in "
    f"{DEBIAN_DIR}/, or (c) pass `data_dir=` pointing to a directory that "
    f"holds {_TRAIN_IMAGES}, {_TRAIN_LABELS}, {_TEST_IMAGES} and "
    f"{_TEST_LABELS} (optionally with a .gz suffix)."
)


# --------------------------------------------------------------------------
# IDX parsing


def _read_bytes(path: str) -> bytes:
    """Reads a file, transparently decompressing it when it is gzipped."""
    with open(path, "rb") as f:
        head = f.read(2)
    if head == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (OSError, EOFError) as e:
            raise ValueError(
                "Expected a valid gzip-compressed IDX file. "
                f"Received: path={path!r}, which could not be decompressed "
                f"({e})."
            ) from e
    with open(path, "rb") as f:
        return f.read()


def read_idx(path: str, expected_magic: int | None = None) -> np.ndarray:
    """Reads one IDX file (gzipped or raw) into a NumPy array.

    The IDX format is a 4-byte big-endian magic number (two zero bytes, a type
    code, the number of dimensions), one big-endian uint32 per dimension, then
    the data in row-major order.

    Args:
        path: path to the file. Gzip compression is detected from the content,
            not the file name.
        expected_magic: when given, the magic number the file must carry
            (2051 for image files, 2049 for label files).

    Returns:
        An array with the file's shape and dtype (uint8 for MNIST-style files).

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: if the file is not a valid IDX file, carries a different
            magic number than `expected_magic`, or its size does not match
            the dimensions in its header.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Expected an IDX file. Received: path={path!r}, which does not "
            "exist."
        )
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(
            "Expected an IDX file with a 4-byte magic number. "
            f"Received: path={path!r} with only {len(data)} bytes."
        )
    magic = int.from_bytes(data[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(
            f"Expected IDX magic number {expected_magic} (0x{expected_magic:08x}) "
            f"in {path!r}. Received: {magic} (0x{magic:08x}). The file is "
            "corrupt or is not the expected IDX file."
        )
    type_code, ndim = data[2], data[3]
    if data[0] != 0 or data[1] != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            "Expected an IDX magic number (0x0000, a type code in "
            f"{sorted(hex(c) for c in _IDX_DTYPES)}, ndim >= 1) in {path!r}. "
            f"Received: 0x{magic:08x}. The file is corrupt or is not an IDX "
            "file."
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"Expected an IDX header of {header} bytes in {path!r}. "
            f"Received: a file of {len(data)} bytes."
        )
    shape = tuple(
        int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    dtype = _IDX_DTYPES[type_code]
    expected_bytes = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected_bytes:
        raise ValueError(
            f"Expected {expected_bytes} bytes in {path!r} for an IDX array of "
            f"shape {shape} and dtype {dtype.name}. Received: {len(data)} "
            "bytes. The file is truncated or corrupt."
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    # Native byte order, writable copy.
    return array.astype(dtype.newbyteorder("="), copy=True)


def _find_file(directory: str, name: str) -> str | None:
    for candidate in (name + ".gz", name):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


def _load_idx_split(
    directory: str, images_name: str, labels_name: str, count: int
) -> tuple[np.ndarray, np.ndarray]:
    images_path = _find_file(directory, images_name)
    labels_path = _find_file(directory, labels_name)
    for name, path in ((images_name, images_path), (labels_name, labels_path)):
        if path is None:
            raise FileNotFoundError(
                f"Expected {name} or {name}.gz in {directory!r}. Received: "
                f"no such file. {_HOW_TO_GET_DATA}"
            )
    x = read_idx(images_path, expected_magic=_MAGIC_IMAGES)
    y = read_idx(labels_path, expected_magic=_MAGIC_LABELS)
    if x.shape != (count, *_IMAGE_SHAPE):
        raise ValueError(
            f"Expected {count} images of shape {_IMAGE_SHAPE} in "
            f"{images_path!r}. Received: an array of shape {x.shape}. The file "
            "is corrupt or is not the Fashion-MNIST file."
        )
    if y.shape != (count,):
        raise ValueError(
            f"Expected {count} labels in {labels_path!r}. Received: an array "
            f"of shape {y.shape}. The file is corrupt or is not the "
            "Fashion-MNIST file."
        )
    if y.size and int(y.max()) >= len(CLASS_NAMES):
        raise ValueError(
            f"Expected labels in [0, {len(CLASS_NAMES) - 1}] in "
            f"{labels_path!r}. Received: a maximum label of {int(y.max())}."
        )
    return x, y


def _idx_files_present(directory: str) -> bool:
    return all(
        _find_file(directory, name) is not None
        for name in (_TRAIN_IMAGES, _TRAIN_LABELS, _TEST_IMAGES, _TEST_LABELS)
    )


def _load_from_idx(directory: str) -> tuple:
    """Loads the four IDX files from `directory`, validating them."""
    x_train, y_train = _load_idx_split(
        directory, _TRAIN_IMAGES, _TRAIN_LABELS, _NUM_TRAIN
    )
    x_test, y_test = _load_idx_split(directory, _TEST_IMAGES, _TEST_LABELS, _NUM_TEST)
    return (x_train, y_train), (x_test, y_test)


# --------------------------------------------------------------------------
# keras.datasets


def _keras_cache_dir() -> str:
    """The directory `keras.datasets.fashion_mnist` reads its files from.

    Mirrors `keras.utils.get_file`: `$KERAS_HOME` or `~/.keras` (`/tmp/.keras`
    when the home directory is not writable), then `datasets/fashion-mnist`.
    """
    if "KERAS_HOME" in os.environ:
        base = os.environ["KERAS_HOME"]
    else:
        home = os.path.expanduser("~")
        if not os.access(home, os.W_OK):
            home = "/tmp"
        base = os.path.join(home, ".keras")
    base = os.path.expanduser(base)
    if not os.access(base, os.W_OK):
        base = os.path.join("/tmp", ".keras")
    return os.path.join(base, "datasets", "fashion-mnist")


def _keras_cache_present() -> bool:
    cache = _keras_cache_dir()
    return all(
        os.path.isfile(os.path.join(cache, name + ".gz"))
        for name in (_TRAIN_IMAGES, _TRAIN_LABELS, _TEST_IMAGES, _TEST_LABELS)
    )


def _host_reachable(
    host: str = _KERAS_HOST, port: int = 443, timeout: float = _NETWORK_TIMEOUT_S
) -> bool:
    """Whether a TCP connection to `host` opens within `timeout` seconds.

    The check runs in a daemon thread so that a slow DNS lookup (which
    `socket` timeouts do not cover) cannot block the caller either.
    """
    result = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result)


def _load_from_keras() -> tuple | None:
    if _keras_cache_present():
        logger.debug("Found the keras.datasets cache in %s.", _keras_cache_dir())
    elif _host_reachable():
        logger.debug("%s is reachable; keras.datasets may download.", _KERAS_HOST)
    else:
        logger.debug(
            "Skipping keras.datasets: no cache in %s and %s is unreachable.",
            _keras_cache_dir(),
            _KERAS_HOST,
        )
        return None
    import keras

    try:
        return keras.datasets.fashion_mnist.load_data()
    except Exception as e:  # Network errors come in many types.
        logger.debug("keras.datasets.fashion_mnist.load_data() failed: %s", e)
        return None


# --------------------------------------------------------------------------
# TensorFlow Datasets


def _tfds_data_dir() -> str:
    return os.path.expanduser(
        os.environ.get("TFDS_DATA_DIR", os.path.join("~", "tensorflow_datasets"))
    )


def _load_from_tfds() -> tuple | None:
    root = _tfds_data_dir()
    if not os.path.isdir(os.path.join(root, "fashion_mnist")):
        # Checked before importing tfds, which is slow and logs warnings about
        # missing folders.
        logger.debug("Skipping TFDS: no prepared fashion_mnist in %s.", root)
        return None
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        logger.debug("Skipping TFDS: tensorflow_datasets is not installed.")
        return None
    try:
        if not tfds.builder("fashion_mnist", data_dir=root).is_prepared():
            logger.debug("Skipping TFDS: fashion_mnist is not prepared in %s.", root)
            return None
        (x_train, y_train), (x_test, y_test) = tfds.as_numpy(
            tfds.load(
                "fashion_mnist",
                split=["train", "test"],
                batch_size=-1,
                as_supervised=True,
                data_dir=root,
                download=False,
            )
        )
    except Exception as e:
        logger.debug("TFDS could not load fashion_mnist from %s: %s", root, e)
        return None
    return (
        (np.asarray(x_train).reshape(-1, *_IMAGE_SHAPE), np.asarray(y_train)),
        (np.asarray(x_test).reshape(-1, *_IMAGE_SHAPE), np.asarray(y_test)),
    )


# --------------------------------------------------------------------------
# Public API


def _normalize(data: tuple) -> tuple:
    (x_train, y_train), (x_test, y_test) = data
    return (
        (np.asarray(x_train, np.uint8), np.asarray(y_train, np.uint8)),
        (np.asarray(x_test, np.uint8), np.asarray(y_test, np.uint8)),
    )


def load_fashion_mnist(data_dir: str | None = None, source: str = "auto") -> tuple:
    """Loads Fashion-MNIST as NumPy arrays, offline when possible.

    With `source="auto"` the sources are tried in order: `keras.datasets`
    (only when its cache exists or the download host answers within ~2 s),
    an already-prepared TensorFlow Datasets copy (never downloaded here), and
    the IDX files of the Debian package `dataset-fashion-mnist`. When
    `data_dir` is given explicitly, that directory is tried first.

    Args:
        data_dir: directory holding the four IDX files
            (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
            `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each gzipped
            with a `.gz` suffix or raw). Defaults to
            `/usr/share/datasets/fashion-mnist`.
        source: one of `"auto"`, `"keras"`, `"tfds"`, `"idx"`. Anything but
            `"auto"` forces that single source.

    Returns:
        `((x_train, y_train), (x_test, y_test))`: `x_*` uint8 arrays of shape
        `(N, 28, 28)`, `y_*` uint8 arrays of shape `(N,)` with values in 0..9;
        N is 60000 for train and 10000 for test.

    Raises:
        ValueError: if `source` is not a known source, or an IDX file is
            corrupt (the message names the file).
        FileNotFoundError: if no source could provide the data. The message
            explains how to get it.
    """
    if source not in SOURCES:
        raise ValueError(
            f"Expected `source` to be one of {SOURCES}. Received: source={source!r}"
        )
    idx_dir = os.fspath(data_dir) if data_dir is not None else DEBIAN_DIR

    def from_idx():
        if not _idx_files_present(idx_dir):
            logger.debug("Skipping IDX files: not all four are in %s.", idx_dir)
            return None
        return _load_from_idx(idx_dir)

    loaders = {"keras": _load_from_keras, "tfds": _load_from_tfds, "idx": from_idx}
    if source != "auto":
        order = [source]
    elif data_dir is not None:
        order = ["idx", "keras", "tfds"]
    else:
        order = ["keras", "tfds", "idx"]

    for name in order:
        data = loaders[name]()
        if data is not None:
            where = {
                "keras": f"keras.datasets ({_keras_cache_dir()})",
                "tfds": f"TensorFlow Datasets ({_tfds_data_dir()})",
                "idx": f"IDX files in {idx_dir}",
            }[name]
            logger.info("Loaded Fashion-MNIST from %s.", where)
            return _normalize(data)

    raise FileNotFoundError(
        f"Could not load Fashion-MNIST (tried source(s): {', '.join(order)}; "
        f"IDX directory: {idx_dir}). {_HOW_TO_GET_DATA}"
    )


def as_float_images(x) -> np.ndarray:
    """Converts uint8 images to float32 in [0, 1] with a trailing channel axis.

    Args:
        x: array-like of shape `(N, 28, 28)` (or `(N, H, W)`), values 0..255.

    Returns:
        A float32 array of shape `(N, H, W, 1)` with values in [0, 1].

    Raises:
        ValueError: if `x` is not 3-dimensional.
    """
    x = np.asarray(x)
    if x.ndim != 3:
        raise ValueError(
            "Expected images of shape (N, height, width). "
            f"Received: an array of shape {x.shape}."
        )
    return (x.astype(np.float32) / np.float32(255.0))[..., np.newaxis]


def fashion_mnist_datasets(
    batch_size: int = 128,
    train_subset: int | None = None,
    data_dir: str | None = None,
    seed: int = 0,
) -> tuple:
    """Builds `tf.data` pipelines for Fashion-MNIST.

    Images are float32 `(batch, 28, 28, 1)` in [0, 1]; labels are int32
    `(batch,)`.

    Args:
        batch_size: examples per batch (the last batch may be smaller).
        train_subset: when given, keep only this many training examples: the
            first `train_subset` of a permutation seeded with `seed`.
        data_dir: passed to `load_fashion_mnist`.
        seed: seed of the subset permutation and of the training shuffle.

    Returns:
        `(train_ds, test_ds)`: the training set shuffled (reshuffled each
        epoch, deterministically given `seed`), both batched and prefetched.

    Raises:
        ValueError: if `batch_size` or `train_subset` is not a positive int
            (`train_subset` at most 60000).
        FileNotFoundError: if the data cannot be loaded (see
            `load_fashion_mnist`).
    """
    import tensorflow as tf

    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or batch_size < 1
    ):
        raise ValueError(
            "Expected `batch_size` to be a positive int. "
            f"Received: batch_size={batch_size!r}"
        )
    if train_subset is not None and (
        isinstance(train_subset, bool)
        or not isinstance(train_subset, (int, np.integer))
        or not 1 <= train_subset <= _NUM_TRAIN
    ):
        raise ValueError(
            f"Expected `train_subset` to be None or an int in [1, {_NUM_TRAIN}]. "
            f"Received: train_subset={train_subset!r}"
        )

    (x_train, y_train), (x_test, y_test) = load_fashion_mnist(data_dir=data_dir)
    if train_subset is not None:
        keep = np.random.default_rng(seed).permutation(len(x_train))[:train_subset]
        x_train, y_train = x_train[keep], y_train[keep]

    def to_float(x, y):
        x = tf.cast(x, tf.float32)[..., tf.newaxis] / 255.0
        return x, tf.cast(y, tf.int32)

    # Slices stay uint8 (4x smaller than float32); conversion happens per batch.
    train_ds = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train))
        .shuffle(len(x_train), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
        .map(to_float, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )
    test_ds = (
        tf.data.Dataset.from_tensor_slices((x_test, y_test))
        .batch(batch_size)
        .map(to_float, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )
    return train_ds, test_ds
