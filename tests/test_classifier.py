"""LeNet-5 classifier and FID-like score: Fréchet distance vs independent references, features,
training accuracy, sanity ordering of the score, save/load.

References are computed independently of `gsae_jax.classifier`: the Fréchet distance through a
symmetric eigendecomposition (`numpy.linalg.eigh`) instead of `scipy.linalg.sqrtm`, closed forms
for Gaussians, and the network's layers applied directly through Linen. One small classifier,
trained once per module on a 1 000-image slice of mnist5k, serves the network-level tests.
"""

import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsae_jax import classifier, data

# ----------------------------------------------------------------------------------------------
# Fixtures.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist():
  return data.load_dataset("mnist5k")


@pytest.fixture(scope="module")
def small_model(mnist):
  """A classifier trained for 400 steps of 16 on 1 000 training images, no shifts (≈ 10 s on
  a shared 2-core machine, compilation included), and its accuracy on the 1 000 test images."""
  # Every 4th training image: 100 per class (the split is sorted by label, 400 per class).
  x, y = mnist.train_images[::4], mnist.train_labels[::4]
  params = classifier.train_classifier(
    jax.random.key(0), x, y, steps=400, batch_size=16, max_shift=0
  )
  return params, classifier.accuracy(params, mnist.test_images, mnist.test_labels)


@pytest.fixture(scope="module")
def untrained():
  """Initial parameters: enough for input checks and file round trips (no training)."""
  return jax.jit(classifier.init_classifier)(jax.random.key(0))  # one compile, not one per op


# ----------------------------------------------------------------------------------------------
# Fréchet distance against independent references.
# ----------------------------------------------------------------------------------------------


def _psd_sqrt(s):
  """Square root of a symmetric PSD matrix by eigendecomposition (round-off negatives → 0)."""
  w, v = np.linalg.eigh(s)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _frechet_eigh(a, b):
  """‖μa − μb‖² + tr Σa + tr Σb − 2 tr((Σb^½ Σa Σb^½)^½), all through `eigh` in float64.

  (Σa Σb)^½ and (Σb^½ Σa Σb^½)^½ are similar matrices, hence have the same trace; the latter is
  symmetric PSD, so its square root needs only a symmetric eigendecomposition.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  mu_a, mu_b = a.mean(0), b.mean(0)
  ca = (a - mu_a).T @ (a - mu_a) / (len(a) - 1)
  cb = (b - mu_b).T @ (b - mu_b) / (len(b) - 1)
  root_b = _psd_sqrt(cb)
  cross = np.trace(_psd_sqrt(root_b @ ca @ root_b))
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(ca) + np.trace(cb) - 2 * cross)


def _correlated(rng, n, k, scale=1.0, shift=0.0):
  mix = rng.normal(size=(k, k)) * scale
  return rng.normal(size=(n, k)) @ mix + shift


def test_frechet_matches_eigh_reference():
  rng = np.random.default_rng(0)
  for k, n, m in [(5, 400, 300), (84, 500, 700), (1, 50, 60)]:
    a = _correlated(rng, n, k)
    b = _correlated(rng, m, k, scale=1.5, shift=0.3)
    # sqrtm (Schur) and eigh differ only by float64 round-off of O(k · ‖Σ‖ · 1e-16).
    np.testing.assert_allclose(
      classifier.frechet_distance(a, b), _frechet_eigh(a, b), rtol=1e-8, atol=1e-9
    )


def test_frechet_singular_covariance_matches_reference():
  """Dead ReLU units give all-zero feature columns, hence singular covariances."""
  rng = np.random.default_rng(1)
  a, b = np.abs(_correlated(rng, 300, 6)), np.abs(_correlated(rng, 200, 6, shift=0.5))
  a[:, 2] = 0.0
  b[:, 2] = 0.0
  b[:, 4] = 1.0  # constant in one set only
  value = classifier.frechet_distance(a, b)
  np.testing.assert_allclose(value, _frechet_eigh(a, b), rtol=1e-7, atol=1e-8)


def test_frechet_one_dimensional_closed_form():
  """k = 1: d² = (μa − μb)² + (σa − σb)² with the (n − 1) sample standard deviations."""
  rng = np.random.default_rng(2)
  a, b = rng.normal(1.0, 2.0, size=(40, 1)), rng.normal(-0.5, 0.5, size=(70, 1))
  want = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
  np.testing.assert_allclose(classifier.frechet_distance(a, b), want, rtol=1e-10)


def test_frechet_large_samples_match_analytic_gaussian_value():
  """N(μ1, diag σ1²) vs N(μ2, diag σ2²): d² = ‖μ1 − μ2‖² + Σ_i (σ1i − σ2i)²."""
  rng = np.random.default_rng(3)
  mu1, mu2 = np.array([0.0, 1.0, -1.0, 2.0]), np.array([1.0, 1.0, 0.5, 0.0])
  s1, s2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([2.0, 1.0, 0.5, 3.0])
  n = 200_000
  a = mu1 + s1 * rng.normal(size=(n, 4))
  b = mu2 + s2 * rng.normal(size=(n, 4))
  want = np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2)  # 7.25 + 6 = 13.25
  # Sampling error: the mean terms move by ~2·|Δμ|·σ/√n ≈ 0.03, the covariance terms by less;
  # 1 % of 13.25 is ≈ 4 standard errors.
  np.testing.assert_allclose(classifier.frechet_distance(a, b), want, rtol=0.01)


def test_frechet_identical_translated_and_symmetric():
  rng = np.random.default_rng(4)
  a = _correlated(rng, 500, 10, scale=3.0)
  b = _correlated(rng, 300, 10, shift=1.0)
  trace = np.trace(np.cov(a, rowvar=False))  # the scale of the terms that cancel (≈ 10³)
  # Identical sets: tr(2Σ − 2(Σ²)^½) cancels to round-off, ≤ 1e-9 relative to tr Σ.
  assert abs(classifier.frechet_distance(a, a)) <= 1e-9 * trace
  # A translated copy has the same covariance: d² = ‖c‖² exactly, up to round-off.
  c = np.linspace(-1.0, 1.0, 10)
  np.testing.assert_allclose(classifier.frechet_distance(a, a + c), c @ c, rtol=1e-9)
  np.testing.assert_allclose(
    classifier.frechet_distance(a, b), classifier.frechet_distance(b, a), rtol=1e-9
  )
  assert classifier.frechet_distance(a, b) > 0


@pytest.mark.parametrize(
  "a, b, match",
  [
    (np.zeros(10), np.zeros((10, 1)), r"feats_a must be a \[n, k\]"),
    (np.zeros((10, 0)), np.zeros((10, 0)), r"k ≥ 1"),
    (np.zeros((1, 3)), np.zeros((10, 3)), r"feats_a needs n ≥ 2"),
    (np.zeros((10, 3)), np.zeros((1, 3)), r"feats_b needs n ≥ 2"),
    (np.zeros((10, 3)), np.zeros((10, 4)), r"same feature dimension"),
    (np.full((10, 3), np.nan), np.zeros((10, 3)), r"feats_a must be finite"),
    (np.zeros((10, 3)), np.full((10, 3), np.inf), r"feats_b must be finite"),
  ],
)
def test_frechet_errors(a, b, match):
  with pytest.raises(ValueError, match=match):
    classifier.frechet_distance(a, b)


# ----------------------------------------------------------------------------------------------
# The network.
# ----------------------------------------------------------------------------------------------


def test_architecture_parameter_shapes():
  shapes = jax.eval_shape(classifier.init_classifier, jax.random.key(0))
  got = {k: {n: v.shape for n, v in layer.items()} for k, layer in shapes.items()}
  assert got == {
    "conv1": {"kernel": (5, 5, 1, 6), "bias": (6,)},
    "conv2": {"kernel": (5, 5, 6, 16), "bias": (16,)},
    "fc1": {"kernel": (400, 120), "bias": (120,)},
    "fc2": {"kernel": (120, 84), "bias": (84,)},
    "logits": {"kernel": (84, 10), "bias": (10,)},
  }
  # 156 + 2416 + 48120 + 10164 + 850
  assert sum(math.prod(v.shape) for v in jax.tree_util.tree_leaves(shapes)) == 61_706


def test_max_pool_matches_linen():
  h = jnp.asarray(np.random.default_rng(1).normal(size=(3, 10, 10, 16)), jnp.float32)
  np.testing.assert_array_equal(classifier._max_pool2(h), nn.max_pool(h, (2, 2), strides=(2, 2)))


def test_shift_images_are_translations():
  x = jax.random.uniform(jax.random.key(2), (8, 28, 28, 1))
  out = np.asarray(jax.jit(classifier._shift_images, static_argnums=2)(jax.random.key(3), x, 2))
  padded = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)))
  offsets = set()
  for i in range(len(x)):
    hits = [
      (dy, dx)
      for dy in range(5)
      for dx in range(5)
      if np.array_equal(out[i], padded[i, dy : dy + 28, dx : dx + 28])
    ]
    assert len(hits) == 1
    offsets.add(hits[0])
  assert len(offsets) > 1  # per-image offsets, not one for the batch


@jax.jit
def _direct(params, x):
  """Logits and features of a whole batch in plain Linen calls: no chunks, no `lax.map`."""
  model, variables = classifier.LeNetClassifier(), {"params": params}
  return model.apply(variables, x), model.apply(variables, x, method=model.embed)


@pytest.mark.slow
def test_features_chunked_equal_direct_and_feed_the_logit_layer(small_model, mnist):
  params, _ = small_model
  x = mnist.test_images[::4]  # 250 images, 64 does not divide 250
  logits, direct = _direct(params, x)
  chunked = classifier.features(params, x, chunk=64)
  assert chunked.shape == (250, classifier.FEATURE_DIM) and chunked.dtype == jnp.float32
  # Same float32 ops on a different batch size: agreement to float32 round-off.
  np.testing.assert_allclose(chunked, direct, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(chunked) >= 0)  # post-ReLU
  # The features are the penultimate layer: the logit layer applied to them gives the logits.
  head = params["logits"]
  np.testing.assert_allclose(chunked @ head["kernel"] + head["bias"], logits, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_short_training_accuracy(small_model, mnist):
  params, acc = small_model
  assert acc >= 0.90  # measured 0.93–0.94 (400 steps of 16 images, 1 000 training images)
  # `accuracy` agrees with an arg-max of directly computed logits (250 images, chunk 64).
  x, y = mnist.test_images[1::4], mnist.test_labels[1::4]
  logits = np.asarray(_direct(params, x)[0])
  assert classifier.accuracy(params, x, y, chunk=64) == pytest.approx(
    np.mean(np.argmax(logits, 1) == y), abs=1e-12
  )


def test_training_input_errors(mnist):
  x, y = mnist.test_images[:20], mnist.test_labels[:20]
  key = jax.random.key(0)
  with pytest.raises(ValueError, match=r"\[n, 28, 28, 1\]"):
    classifier.train_classifier(key, x[..., 0], y)
  with pytest.raises(ValueError, match="labels must be an int"):
    classifier.train_classifier(key, x, y[:-1])
  with pytest.raises(ValueError, match="0..9"):
    classifier.train_classifier(key, x, y + 10)
  with pytest.raises(ValueError, match="batch_size=21 is larger"):
    classifier.train_classifier(key, x, y, batch_size=21)
  with pytest.raises(ValueError, match="`steps` must be a positive int"):
    classifier.train_classifier(key, x, y, steps=0)
  with pytest.raises(ValueError, match="learning_rate"):
    classifier.train_classifier(key, x, y, batch_size=16, learning_rate=float("nan"))
  with pytest.raises(ValueError, match="max_shift"):
    classifier.train_classifier(key, x, y, batch_size=16, max_shift=-1)
  with pytest.raises(ValueError, match="`chunk` must be a positive int"):
    classifier.features(None, x, chunk=0)  # rejected before the parameters are used


# ----------------------------------------------------------------------------------------------
# FID-like score.
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow  # trains small_model (≈ 8 s)
def test_fid_like_sanity_ordering(small_model, mnist):
  params, _ = small_model
  real = mnist.test_images
  half_a, half_b = real[0::2], real[1::2]  # file order is sorted by label: both halves balanced
  noise = np.asarray(jax.random.uniform(jax.random.key(5), half_a.shape))
  # Every call below sees 500 images: one compilation of the feature extractor.
  feats = np.asarray(classifier.features(params, half_a), np.float64)
  trace = np.trace(np.cov(feats, rowvar=False))
  # Identical sets: only sqrtm round-off remains, ≤ 1e-6 relative to tr Σ.
  assert abs(classifier.fid_like(params, half_a, half_a)) <= 1e-6 * trace
  real_vs_real = classifier.fid_like(params, half_a, half_b)
  real_vs_noise = classifier.fid_like(params, half_a, noise)
  assert 0 < real_vs_real
  assert real_vs_noise > 10 * real_vs_real, (real_vs_real, real_vs_noise)


def test_fid_like_rejects_bad_images(untrained, mnist):
  params = untrained
  with pytest.raises(ValueError, match="fake_images must be a non-empty"):
    classifier.fid_like(params, mnist.test_images[:10], mnist.test_images[:10, :, :, 0])
  with pytest.raises(ValueError, match="fake_images needs n ≥ 2"):
    classifier.fid_like(params, mnist.test_images[:10], mnist.test_images[:1])


# ----------------------------------------------------------------------------------------------
# Save / load.
# ----------------------------------------------------------------------------------------------


def test_save_load_round_trip(untrained, tmp_path):
  params = untrained
  meta = {"dataset": "mnist5k", "test_accuracy": 0.125, "steps": 0, "seed": 0}
  path = classifier.save_classifier(tmp_path / "sub" / "lenet.msgpack", params, meta)
  assert sorted(p.name for p in path.parent.iterdir()) == ["lenet.msgpack"]  # no tmp left
  loaded, loaded_meta = classifier.load_classifier(path)
  assert loaded_meta == meta
  assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(params)
  leaves = zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params), strict=True)
  for got, want in leaves:
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, want)
  # Overwriting replaces the file.
  classifier.save_classifier(path, params, {**meta, "seed": 1})
  assert classifier.load_classifier(path)[1]["seed"] == 1


def test_load_errors(untrained, tmp_path):
  params = untrained
  good = classifier.save_classifier(tmp_path / "good.msgpack", params, {"dataset": "x"})
  cases = {
    "garbage.msgpack": b"\x00not msgpack at all\xff" * 3,
    "truncated.msgpack": good.read_bytes()[: len(good.read_bytes()) // 2],
  }
  for name, payload in cases.items():
    bad = tmp_path / name
    bad.write_bytes(payload)
    with pytest.raises(ValueError, match=rf"corrupt or incompatible classifier file .*{name}"):
      classifier.load_classifier(bad)
  # A well-formed file with the wrong parameter structure.
  other = {k: v for k, v in params.items() if k != "fc2"}
  wrong = classifier.save_classifier(tmp_path / "wrong.msgpack", other, {})
  with pytest.raises(ValueError, match="wrong.msgpack.*structure"):
    classifier.load_classifier(wrong)
  with pytest.raises(FileNotFoundError):
    classifier.load_classifier(tmp_path / "missing.msgpack")
  with pytest.raises(ValueError, match="JSON-serialisable"):
    classifier.save_classifier(tmp_path / "m.msgpack", params, {"x": object()})
  with pytest.raises(ValueError, match="JSON-serialisable"):
    classifier.save_classifier(tmp_path / "m.msgpack", params, {"acc": float("nan")})
  assert not (tmp_path / "m.msgpack").exists()


# ----------------------------------------------------------------------------------------------
# Full default training (slow).
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_training_reaches_97_percent(mnist):
  start = time.perf_counter()
  params = classifier.train_classifier(jax.random.key(0), mnist.train_images, mnist.train_labels)
  jax.block_until_ready(params)
  seconds = time.perf_counter() - start
  acc = classifier.accuracy(params, mnist.test_images, mnist.test_labels)
  print(f"default classifier: test accuracy {acc:.4f}, trained in {seconds:.1f} s")
  assert acc >= 0.97  # measured 0.977 (key 0) in 36 s on a shared 2-core machine
