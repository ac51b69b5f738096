"""Grid clustering (the multiscale backend's coarse scale) against a numpy group-by."""

import jax
import numpy as np
import pytest

from gsae_jax.ot import clusters
from tests.conftest import flower_numpy


@pytest.mark.slow
def test_cluster_centroids_and_masses_match_numpy_groupby(x64):
  rng = np.random.default_rng(0)
  x = flower_numpy(rng, 500)
  y = rng.normal(size=(300, 2))
  w = rng.dirichlet(np.ones(500))
  k = 8
  grid = clusters.make_grid(x, y, k)
  cent, log_mass = clusters.cluster(grid, x, np.log(w))
  # Reference: cells from the same box, computed in numpy.
  lo = np.minimum(x.min(0), y.min(0))
  side = np.max(np.maximum(x.max(0), y.max(0)) - lo) / k
  ij = np.clip(np.floor((x - lo) / side).astype(int), 0, k - 1)
  flat = ij[:, 0] * k + ij[:, 1]
  for c in range(k * k):
    members = flat == c
    if members.any():
      np.testing.assert_allclose(np.exp(log_mass[c]), w[members].sum(), rtol=1e-12)
      ref = (w[members, None] * x[members]).sum(0) / w[members].sum()
      np.testing.assert_allclose(cent[c], ref, rtol=1e-12, atol=1e-12)
    else:
      assert log_mass[c] == -np.inf and np.all(np.isfinite(cent[c]))
      # an empty cell's centroid is its centre, inside the cell
      np.testing.assert_allclose(cent[c], lo + (np.array([c // k, c % k]) + 0.5) * side)
  np.testing.assert_allclose(np.exp(jax.scipy.special.logsumexp(log_mass)), 1.0, rtol=1e-12)


@pytest.mark.slow
def test_cluster_of_identical_points_and_3d():
  x = np.full((10, 3), 2.0, np.float32)
  grid = clusters.make_grid(x, x, 4)
  cent, log_mass = clusters.cluster(grid, x, np.full(10, np.log(0.1), np.float32))
  assert np.sum(np.isfinite(log_mass)) == 1 and log_mass.shape == (64,)
  np.testing.assert_allclose(cent[np.argmax(log_mass)], [2.0, 2.0, 2.0], rtol=1e-6)
  np.testing.assert_allclose(np.max(log_mass), 0.0, atol=1e-6)
