"""The run figures: prior density (closed form), petal rows, and that PNGs get written."""

import jax
import numpy as np
import pytest
from PIL import Image

from gsae_jax import metrics, plotting


def test_flower_density_integrates_to_one_and_peaks_on_petals():
  g = np.linspace(-8, 8, 801)
  gx, gy = np.meshgrid(g, g)
  dens = plotting.flower_density(np.stack([gx, gy], axis=-1))
  step = g[1] - g[0]
  np.testing.assert_allclose(dens.sum() * step**2, 1.0, atol=2e-3)
  # Petal 0's mean (3, 0): 1/10 of N(0; 0, diag(1, .01)) = 1 / (10 · 2π · 0.1), plus the tails
  # of the other petals (< 1e-3 of it).
  np.testing.assert_allclose(
    plotting.flower_density(np.array([3.0, 0.0])), 1 / (20 * np.pi * 0.1), rtol=1e-3
  )


@pytest.mark.slow
def test_petal_latents_rows_lie_in_their_sectors():
  z = plotting.petal_latents(jax.random.key(0), per_petal=10)
  assert z.shape == (100, 2)
  petals = metrics.assign_petals(z).reshape(10, 10)
  # Each row is one petal; a petal's Gaussian is narrow, so nearly all its points stay in its
  # 36° sector (a point near the origin can fall outside).
  for j in range(10):
    assert np.mean(petals[j] == j) >= 0.8


def test_figures_are_written(tmp_path):
  rng = np.random.default_rng(0)
  z = rng.normal(size=(200, 2))
  labels = rng.integers(0, 10, 200)
  images = rng.uniform(size=(100, 28, 28, 1))
  plotting.plot_latents(tmp_path / "l.png", z, labels, title="t")
  plotting.plot_samples(tmp_path / "s.png", images, title="t")
  plotting.plot_reconstructions(tmp_path / "r.png", images[:20], images[20:40], title="t")
  plotting.plot_curves(tmp_path / "c.png", [{"step": 1, "a": 1.0}, {"step": 2, "a": 0.5}])
  for name in ("l", "s", "r", "c"):
    with Image.open(tmp_path / f"{name}.png") as im:
      assert im.size[0] > 300 and im.size[1] > 150
