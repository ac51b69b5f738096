"""Tests for gsae_jax.metrics (SPEC §5; GSAE paper §5.1.1).

References are independent of the library code: flower samples from the formula (numpy), a
full-distance-matrix kNN with a stable argsort and scipy's cKDTree for local clustering, a
bitmask dynamic programme over all bijections for cluster matching, a per-point loop with
scipy.stats.norm and explicit rotation matrices for covered area, and closed forms.
"""

import itertools
import math

import jax
import numpy as np
import pytest
import scipy.spatial
import scipy.stats

from gsae_jax import metrics

ALPHAS = 2 * np.pi * np.arange(10) / 10
MEANS = 3.0 * np.stack([np.cos(ALPHAS), np.sin(ALPHAS)], axis=1)


def flower_numpy(rng: np.random.Generator, n: int) -> np.ndarray:
  """The flower prior from its formula, point i on petal i % 10: mean 3(cos α, sin α),
  covariance R(α) diag(1, 0.01) R(α)ᵀ (independent of gsae_jax.priors)."""
  alpha = ALPHAS[np.arange(n) % 10]
  radial = 3.0 + rng.normal(size=n)
  tangential = 0.1 * rng.normal(size=n)
  c, s = np.cos(alpha), np.sin(alpha)
  return np.stack([c * radial - s * tangential, s * radial + c * tangential], axis=1)


def flower_with_petals(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
  """A float32 stratified flower sample from the formula and the petal of each point."""
  z = flower_numpy(np.random.default_rng(seed), n).astype(np.float32)
  return z, np.arange(n) % 10  # flower_numpy puts point i on petal i % 10


def petal_by_nearest_direction(z: np.ndarray) -> np.ndarray:
  """Petal whose mean direction is closest in angle: argmax_j cos(θ − α_j) (not sectors)."""
  theta = np.arctan2(z[:, 1], z[:, 0])
  return np.argmax(np.cos(theta[:, None] - ALPHAS[None, :]), axis=1)


# ------------------------------------------------------------------------------------------
# Local clustering.
# ------------------------------------------------------------------------------------------


def local_clustering_reference(z: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Brute force: full distance matrix, self first, other ties to the lower index."""
  z = np.asarray(z, np.float32)
  diff = z[:, None, :] - z[None, :, :]
  d2 = np.sum(diff * diff, axis=-1)
  np.fill_diagonal(d2, -1.0)  # the point itself always comes first
  order = np.argsort(d2, axis=1, kind="stable")[:, :k]
  return float(np.mean(np.all(labels[order] == labels[:, None], axis=1)))


def mixed_labels_cloud(seed: int, n: int = 500) -> tuple[np.ndarray, np.ndarray]:
  """Points whose labels follow space with 15% noise: neighbourhoods cross label boundaries."""
  rng = np.random.default_rng(seed)
  z = rng.uniform(-1.0, 1.0, size=(n, 2)).astype(np.float32)
  labels = (z[:, 0] > 0).astype(np.int64) + 2 * (z[:, 1] > 0)
  flip = rng.random(n) < 0.15
  labels[flip] = rng.integers(0, 4, size=flip.sum())
  return z, labels


@pytest.mark.parametrize("k", [1, 2, 5, 10, 25])
def test_local_clustering_matches_brute_force(k):
  z, labels = mixed_labels_cloud(0)
  ref = local_clustering_reference(z, labels, k)
  if k > 1:
    assert 0.0 < ref < 1.0  # a genuinely mixed case
  # Exact agreement (atol 0): both count the same set of good points out of 500.
  assert metrics.local_clustering(z, labels, k) == ref


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 500, 4096])
def test_local_clustering_chunk_size_does_not_matter(chunk_size):
  z, labels = mixed_labels_cloud(1)
  ref = local_clustering_reference(z, labels, 10)
  assert metrics.local_clustering(z, labels, 10, chunk_size=chunk_size) == ref


def test_local_clustering_matches_kdtree():
  """scipy cKDTree on a continuous cloud (no ties): query k includes the point itself."""
  rng = np.random.default_rng(2)
  z = rng.standard_normal((3000, 2)).astype(np.float32)
  labels = (np.arctan2(z[:, 1], z[:, 0]) > 0).astype(np.int64)
  labels[rng.random(3000) < 0.05] ^= 1
  _, idx = scipy.spatial.cKDTree(z.astype(np.float64)).query(z.astype(np.float64), k=10)
  assert np.all(idx[:, 0] == np.arange(3000))
  ref = float(np.mean(np.all(labels[idx] == labels[:, None], axis=1)))
  assert 0.3 < ref < 1.0
  assert metrics.local_clustering(z, labels) == ref


def test_local_clustering_ties_on_a_lattice():
  """Integer lattice: distances 1, √2, 2 ... are exact and tie massively across labels."""
  rng = np.random.default_rng(3)
  g = np.arange(12, dtype=np.float32)
  z = np.stack(np.meshgrid(g, g), axis=-1).reshape(-1, 2)
  perm = rng.permutation(len(z))  # ties then resolve by a shuffled index order
  z = z[perm]
  labels = rng.integers(0, 2, size=len(z))
  labels[z[:, 0] < 6] = 0  # a pure half, so that some points are good
  for k in (2, 3, 5, 6, 9, 10):
    ref = local_clustering_reference(z, labels, k)
    assert metrics.local_clustering(z, labels, k) == ref, k


def test_local_clustering_self_always_included_among_duplicates():
  # Four copies of one point: the first has another label than the other three. Each point
  # keeps itself; its other neighbours are the copies in index order.
  z = np.zeros((4, 2), np.float32)
  labels = np.array([7, 3, 3, 3])
  assert metrics.local_clustering(z, labels, k=1) == 1.0
  # k = 2: point 0 takes {0, 1} (bad), points 1..3 take themselves and point 0 (bad).
  assert metrics.local_clustering(z, labels, k=2) == 0.0
  assert local_clustering_reference(z, labels, 2) == 0.0
  # Point 0 alone differs; with all copies at distance 0 every neighbourhood of size 4 holds
  # both labels.
  assert metrics.local_clustering(z, labels, k=4) == 0.0
  labels = np.array([3, 3, 3, 7])
  # k = 3: points 0..2 take two of {0, 1, 2} (good); point 3 takes itself first (bad).
  assert metrics.local_clustering(z, labels, k=3) == 0.75
  assert local_clustering_reference(z, labels, 3) == 0.75


def test_local_clustering_pure_separated_clusters_score_one():
  rng = np.random.default_rng(4)
  centres = 100.0 * rng.standard_normal((10, 2))
  labels = np.repeat(np.arange(10), 200)
  z = (centres[labels] + 0.01 * rng.standard_normal((2000, 2))).astype(np.float32)
  assert metrics.local_clustering(z, labels) == 1.0


def test_local_clustering_random_labels_score_near_zero():
  # P(good) = (1/10)^9 per point: expected 2e-6 good points out of 2000.
  z, _ = flower_with_petals(5, 2000)
  labels = np.random.default_rng(5).integers(0, 10, size=2000)
  assert metrics.local_clustering(z, labels) <= 1 / 2000


def test_local_clustering_accepts_any_integer_labels_and_dims():
  z, labels = mixed_labels_cloud(6)
  ref = local_clustering_reference(z, labels, 10)
  big = labels.astype(np.int64) * 10**12 - 5  # outside int32; only equality matters
  assert metrics.local_clustering(z, big) == ref
  z3 = np.concatenate([z, np.zeros((500, 1), np.float32)], axis=1)  # d = 3, same distances
  assert metrics.local_clustering(z3, labels) == ref


# ------------------------------------------------------------------------------------------
# Cluster matching.
# ------------------------------------------------------------------------------------------


def best_matching_count(counts: np.ndarray) -> int:
  """Max over all bijections σ of Σ_j counts[j, σ(j)], by DP over subsets of labels."""
  m = counts.shape[0]
  best = np.full(1 << m, -1, dtype=np.int64)
  best[0] = 0
  for mask in range(1 << m):
    if best[mask] < 0:
      continue
    row = bin(mask).count("1")  # petals 0..row-1 are already matched
    if row == m:
      continue
    for col in range(m):
      if not mask >> col & 1:
        new = mask | 1 << col
        best[new] = max(best[new], best[mask] + counts[row, col])
  return int(best[-1])


def test_best_matching_reference_agrees_with_permutations():
  counts = np.random.default_rng(7).integers(0, 50, size=(6, 6))
  brute = max(sum(counts[j, p[j]] for j in range(6)) for p in itertools.permutations(range(6)))
  assert best_matching_count(counts) == brute


def test_cluster_matching_perfect_prior_sample():
  z, petal = flower_with_petals(8, 10_000)
  value = metrics.cluster_matching(z, petal)
  assert value > 0.97  # only the tails crossing into a neighbouring sector are lost
  assert metrics.cluster_matching(z, (petal + 3) % 10) == value  # any relabelling


def test_cluster_matching_permuted_labels_inside_sectors_is_one():
  rng = np.random.default_rng(9)
  petal = rng.integers(0, 10, size=1000)
  angle = ALPHAS[petal] + rng.uniform(-0.3, 0.3, size=1000)  # within ±17° of the centre
  radius = rng.uniform(0.5, 6.0, size=1000)
  z = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
  assert metrics.cluster_matching(z, (petal + 3) % 10) == 1.0
  assert metrics.cluster_matching(z, rng.permutation(10)[petal]) == 1.0


def test_cluster_matching_half_random_matches_direct_count():
  z, petal = flower_with_petals(10, 3000)
  rng = np.random.default_rng(10)
  labels = (petal + 3) % 10
  noisy = rng.random(3000) < 0.5
  labels[noisy] = rng.integers(0, 10, size=noisy.sum())
  counts = np.zeros((10, 10), dtype=np.int64)
  for p, c in zip(petal_by_nearest_direction(z), labels, strict=True):
    counts[p, c] += 1
  expected = best_matching_count(counts) / 3000
  assert 0.4 < expected < 0.7
  assert metrics.cluster_matching(z, labels) == pytest.approx(expected, rel=0, abs=1e-12)


def test_assign_petals_sector_boundaries():
  # Sector j is centred on α_j = 36°·j; check centres, ±17° inside, and the wrap at 0.
  deg = np.array([0.0, 17.0, 19.0, 36.0, 341.0, 340.0, 324.0, 180.0, -17.0])
  rad = np.deg2rad(deg)
  z = np.stack([np.cos(rad), np.sin(rad)], axis=1)
  np.testing.assert_array_equal(metrics.assign_petals(z), [0, 0, 1, 1, 9, 9, 9, 5, 0])
  z, _ = flower_with_petals(11, 2000)
  np.testing.assert_array_equal(metrics.assign_petals(z), petal_by_nearest_direction(z))


# ------------------------------------------------------------------------------------------
# Covered area.
# ------------------------------------------------------------------------------------------


def covered_area_reference(z: np.ndarray) -> float:
  """Straight from SPEC §5.5 with rotation matrices, scipy.stats.norm and per-point loops."""
  z = np.asarray(z, np.float64)
  petal = petal_by_nearest_direction(z)
  values = []
  for j in range(10):
    pts = z[petal == j]
    if len(pts) == 0:
      values.append(0.0)
      continue
    a = -ALPHAS[j]
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    t = 2 * scipy.stats.norm.cdf((np.diag([1.0, 10.0]) @ rot @ pts.T).T - [3.0, 0.0]) - 1
    r = math.floor(1.1 * math.sqrt(4 * len(pts)))
    painted = set()
    for tx, ty in t:
      p = min(max(math.floor(r * (tx + 1) / 2), 0), r - 1)
      q = min(max(math.floor(r * (ty + 1) / 2), 0), r - 1)
      for a_ in range(p - 2, p + 2):
        for b_ in range(q - 2, q + 2):
          if 0 <= a_ < r and 0 <= b_ < r:
            painted.add((a_, b_))
    values.append(len(painted) / r**2)
  return float(np.mean(values))


def test_covered_area_perfect_prior_sample():
  z, _ = flower_with_petals(12, 10_000)
  assert metrics.covered_area(z) == pytest.approx(0.95, abs=0.02)  # SPEC: ≈0.95


def test_covered_area_collapsed_on_petal_means_closed_form():
  # N = 1000 per petal: r = ⌊1.1·√4000⌋ = 69; every point sits at grid cell (34, 34) and
  # paints one 4 × 4 block: 16 / 69² = 0.0033606...
  z = np.repeat(MEANS, 1000, axis=0).astype(np.float32)
  assert math.floor(1.1 * math.sqrt(4000)) == 69
  assert metrics.covered_area(z) == pytest.approx(16 / 69**2, rel=1e-12, abs=0)


def test_covered_area_small_closed_forms():
  # 4 points on petal 0's mean (exactly (3, 0), so t = (0, 0) exactly): r = ⌊1.1·√16⌋ = 4,
  # index (2, 2) paints [0, 4)²: the whole grid. Nine empty petals score 0: mean 1/10.
  z = np.repeat(MEANS[0:1], 4, axis=0)
  assert metrics.covered_area(z) == pytest.approx(0.1, rel=1e-12, abs=0)
  # 6 points on petal 2's mean: r = ⌊1.1·√24⌋ = 5 (odd, so t ≈ 0 up to rounding still lands
  # in cell ⌊2.5⌋ = 2), block [0, 4)² = 16 of 25 cells: mean 0.064.
  z = np.repeat(MEANS[2:3], 6, axis=0)
  assert metrics.covered_area(z) == pytest.approx(16 / 25 / 10, rel=1e-12, abs=0)
  # 1 point far out on petal 0's axis: r = ⌊2.2⌋ = 2, t → (1, 0), index (1, 1): the
  # block [−1, 3)² clipped to [0, 2)² covers all 4 cells. 1 point near the origin:
  # t ≈ (−0.99, 0), index (0, 1), block [−2, 2) × [−1, 3) also covers all 4.
  assert metrics.covered_area(np.array([[50.0, 0.0]])) == pytest.approx(0.1, rel=1e-12)
  assert metrics.covered_area(np.array([[0.5, 0.0]])) == pytest.approx(0.1, rel=1e-12)


def test_covered_area_matches_reference_loop():
  rng = np.random.default_rng(14)
  z, _ = flower_with_petals(14, 600)
  z = z * rng.uniform(0.7, 1.2) + rng.normal(scale=0.2, size=z.shape)  # a worse latent set
  z = z[rng.random(600) < 0.8]  # unequal petal sizes
  ref = covered_area_reference(z)
  assert 0.2 < ref < 0.95
  assert metrics.covered_area(z) == pytest.approx(ref, rel=1e-12, abs=0)
  few = flower_with_petals(15, 50)[0]  # 5 points a petal: r = 4
  assert metrics.covered_area(few) == pytest.approx(covered_area_reference(few), rel=1e-12)


def test_covered_area_is_rotation_equivariant_by_one_petal():
  z, _ = flower_with_petals(16, 2000)
  a = ALPHAS[1]
  rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
  assert metrics.covered_area(z @ rot.T) == pytest.approx(metrics.covered_area(z), abs=2e-3)


# ------------------------------------------------------------------------------------------
# Reconstruction error.
# ------------------------------------------------------------------------------------------


def test_reconstruction_error_is_per_pixel_mse():
  rng = np.random.default_rng(17)
  images = rng.random((64, 28, 28, 1)).astype(np.float32)
  recon = rng.random((64, 28, 28, 1)).astype(np.float32)
  expected = np.mean((images.astype(np.float64) - recon) ** 2)
  assert metrics.reconstruction_error(images, recon) == pytest.approx(expected, rel=1e-6)
  flat = metrics.reconstruction_error(images.reshape(64, -1), recon.reshape(64, -1))
  assert flat == pytest.approx(expected, rel=1e-6)
  assert metrics.reconstruction_error(images, images) == 0.0
  # Chunk-friendly: the mean of equal-size chunk values is the set value.
  chunks = [
    metrics.reconstruction_error(images[i : i + 16], recon[i : i + 16]) for i in range(0, 64, 16)
  ]
  assert np.mean(chunks) == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------------------
# Global OT loss (needs gsae_jax.ot.sinkhorn_divergence).
# ------------------------------------------------------------------------------------------


def _require_sinkhorn():
  ot = pytest.importorskip("gsae_jax.ot")
  if not hasattr(ot, "sinkhorn_divergence"):
    pytest.skip("gsae_jax.ot.sinkhorn_divergence not written yet")


def numpy_flower_prior(key, n):
  """A `(key, n) -> [n, 2]` prior from the formula, seeded from the key's data."""
  seed = int(np.asarray(jax.random.key_data(key)).ravel()[-1])
  return flower_numpy(np.random.default_rng(seed), n).astype(np.float32)


@pytest.mark.slow
def test_global_ot_loss_prior_vs_prior_small_shift_large():
  _require_sinkhorn()
  # n = 4000: the finite-sample S between two independent prior samples is ≈0.005 (measured
  # 0.0044–0.0055 over seeds; ≈0.011–0.018 at n = 2000), well under 0.01.
  z, _ = flower_with_petals(18, 4000)
  key = jax.random.key(19)
  same = metrics.global_ot_loss(key, z, prior=numpy_flower_prior)
  assert 0.0 <= same < 0.01
  shifted = metrics.global_ot_loss(key, z + np.float32([0.5, 0.0]), prior=numpy_flower_prior)
  assert shifted > 0.05  # ≈ ½·0.5² = 0.125 for a rigid shift, less the blur
  assert shifted > 5 * same


def test_global_ot_loss_rejects_a_bad_prior():
  _require_sinkhorn()
  z, _ = flower_with_petals(22, 100)
  with pytest.raises(ValueError, match="prior"):
    metrics.global_ot_loss(jax.random.key(0), z, prior=lambda key, n: np.zeros((n, 3)))


# ------------------------------------------------------------------------------------------
# evaluate_latents and validation.
# ------------------------------------------------------------------------------------------


def test_evaluate_latents_keys_and_values(monkeypatch):
  monkeypatch.setattr(metrics, "global_ot_loss", lambda key, z: 0.123)
  z, petal = flower_with_petals(23, 1000)
  out = metrics.evaluate_latents(jax.random.key(0), z, petal)
  assert list(out) == ["global_ot_loss", "local_clustering", "cluster_matching", "covered_area"]
  assert out["global_ot_loss"] == 0.123
  assert out["local_clustering"] == metrics.local_clustering(z, petal)
  assert out["cluster_matching"] == metrics.cluster_matching(z, petal)
  assert out["covered_area"] == metrics.covered_area(z)
  images = np.full((1000, 784), 0.5, np.float32)
  out = metrics.evaluate_latents(jax.random.key(0), z, petal, images, images + 0.1)
  assert set(out) == set(metrics.METRIC_NAMES)
  assert out["reconstruction"] == pytest.approx(0.01, rel=1e-5)
  assert all(isinstance(v, float) for v in out.values())


@pytest.mark.slow
def test_evaluate_latents_with_the_real_ot_loss_and_flower_prior():
  _require_sinkhorn()
  priors = pytest.importorskip("gsae_jax.priors")
  if not hasattr(priors, "flower"):
    pytest.skip("gsae_jax.priors.flower not written yet")
  z, petal = flower_with_petals(24, 4000)  # n = 4000 as above: S ≈ 0.005
  out = metrics.evaluate_latents(jax.random.key(25), z, petal)
  assert 0.0 <= out["global_ot_loss"] < 0.01
  assert out["cluster_matching"] > 0.97
  assert out["local_clustering"] > 0.9


BAD_Z = [
  (np.zeros((5, 3)), "shape"),
  (np.zeros(5), "shape"),
  (np.zeros((0, 2)), "n > 0"),
  (np.array([[0.0, np.nan]] * 3), "finite"),
  (np.array([[0.0, np.inf]] * 3), "finite"),
  (np.array([["a", "b"]] * 3), "float"),
]


@pytest.mark.parametrize("bad, message", BAD_Z)
@pytest.mark.parametrize("fn", [metrics.covered_area, metrics.assign_petals])
def test_bad_latents_raise(fn, bad, message):
  with pytest.raises(ValueError, match=rf"^z .*{message}"):
    fn(bad)


@pytest.mark.parametrize("bad, message", BAD_Z[1:])  # [n, 3] is fine for local clustering
def test_bad_latents_raise_in_label_metrics(bad, message):
  labels = np.zeros(max(len(bad), 1), np.int64)
  for fn in (metrics.local_clustering, metrics.cluster_matching):
    with pytest.raises(ValueError, match=rf"^z .*{message}"):
      fn(bad, labels[: len(bad)])
  with pytest.raises(ValueError, match=rf"^z .*{message}"):
    metrics.evaluate_latents(jax.random.key(0), bad, labels[: len(bad)])


@pytest.mark.parametrize(
  "labels, message",
  [
    (np.zeros(4, np.int64), r"shape \[n\] = \[5\]"),
    (np.zeros((5, 1), np.int64), r"shape \[n\]"),
    (np.zeros(5, np.float32), "integer dtype"),
    (np.array([0, 1, 2, 3, 10]), r"0\.\.9"),
    (np.array([0, 1, 2, 3, -1]), r"0\.\.9"),
  ],
)
def test_bad_labels_raise(labels, message):
  z = np.ones((5, 2), np.float32)
  with pytest.raises(ValueError, match=rf"^labels .*{message}"):
    metrics.cluster_matching(z, labels)
  with pytest.raises(ValueError, match=rf"^labels .*{message}"):
    metrics.evaluate_latents(jax.random.key(0), z, labels)
  if "0..9" not in message.replace("\\", ""):  # local clustering takes any integer labels
    with pytest.raises(ValueError, match=rf"^labels .*{message}"):
      metrics.local_clustering(z, labels, k=2)


@pytest.mark.parametrize("k", [0, 6, 2.0, True, None])
def test_bad_k_raises(k):
  with pytest.raises(ValueError, match="^k must"):
    metrics.local_clustering(np.ones((5, 2)), np.zeros(5, np.int64), k=k)


@pytest.mark.parametrize("chunk_size", [0, -3, 1.5])
def test_bad_chunk_size_raises(chunk_size):
  with pytest.raises(ValueError, match="^chunk_size must"):
    metrics.local_clustering(np.ones((5, 2)), np.zeros(5, np.int64), 2, chunk_size=chunk_size)


def test_bad_images_raise():
  a = np.zeros((4, 784), np.float32)
  with pytest.raises(ValueError, match="^reconstructions must have the same shape"):
    metrics.reconstruction_error(a, np.zeros((4, 28, 28)))
  with pytest.raises(ValueError, match="^images must be a non-empty"):
    metrics.reconstruction_error(np.zeros((0, 784)), np.zeros((0, 784)))
  with pytest.raises(ValueError, match="finite"):
    metrics.reconstruction_error(a, np.full((4, 784), np.nan))
  z, labels = np.ones((4, 2), np.float32), np.zeros(4, np.int64)
  with pytest.raises(ValueError, match="together"):
    metrics.evaluate_latents(jax.random.key(0), z, labels, images=a)
  with pytest.raises(ValueError, match="^images must hold one image per latent"):
    metrics.evaluate_latents(jax.random.key(0), z, labels, np.zeros((3, 784)), np.zeros((3, 784)))
