"""Warm-started divergence (``init=``): the same fixed point as the cold solve, fewer updates.

References: the dense converged divergence (``tol``) of the moved clouds, computed cold; the
exact softmin by scipy's ``logsumexp`` (float64) for the multiscale upper bound.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from gsae_jax.ot import multiscale as ms
from gsae_jax.ot import solve_divergence
from tests.conftest import flower_numpy

MS = {"backend": "multiscale", "block_size": 32, "tile_fraction": 1.0}
BACKENDS = {"dense": {"backend": "dense"}, "multiscale": MS}


def _clouds(seed, n=600, m=500):
  rng = np.random.default_rng(seed)
  return flower_numpy(rng, n), rng.normal(size=(m, 2))


def _rel(a, b):
  return float(jnp.linalg.norm(jnp.ravel(a - b)) / jnp.linalg.norm(jnp.ravel(b)))


@pytest.mark.parametrize("target", ["kept", "redrawn"])
@pytest.mark.parametrize(
  "backend", ["dense", pytest.param("multiscale", marks=pytest.mark.slow)]
)  # multiscale: 30–50 s each here; its warm updates match dense in the default suite below
@pytest.mark.slow
def test_warm_start_from_moved_clouds_reaches_the_cold_converged_divergence(x64, backend, target):
  # A training step in miniature: the source moves a little; the target is kept (its
  # potential reused) or redrawn (its potential None, extended by one softmin). Converged
  # mode from the old potentials must land on the dense cold converged value and gradient of
  # the new clouds.
  kw = dict(BACKENDS[backend], blur=0.2, static_b=True)
  x0, y0 = _clouds(0)
  x1 = x0 + 0.005 * np.random.default_rng(1).normal(size=x0.shape)
  y1 = y0 if target == "kept" else _clouds(2)[1]
  tol = 1e-5
  old = solve_divergence(x0, y0, tol=tol, max_iter=5000, **kw)
  init = (old.f_ba, old.g_ab if target == "kept" else None, old.f_aa, None)
  warm = lambda x: solve_divergence(x, y1, tol=tol, max_iter=5000, init=init, **kw)
  ref = lambda x: solve_divergence(
    x, y1, tol=tol, max_iter=5000, blur=0.2, static_b=True, backend="dense"
  )
  w, r = warm(x1), ref(x1)
  assert bool(w.converged) and bool(r.converged)
  np.testing.assert_allclose(float(w.value), float(r.value), rtol=1e-5, atol=0)
  gw, gr = jax.grad(lambda x: warm(x).value)(x1), jax.grad(lambda x: ref(x).value)(x1)
  assert _rel(gw, gr) < 1e-3
  # With the target kept, warm needs far fewer updates than the cold solve (annealing
  # included). A redrawn target moves the fixed point by the sampling noise, from where the
  # tail converges no faster than from the annealing (BUILD_NOTES, "Warm starts").
  if target == "kept":
    assert int(w.iterations) < 0.5 * int(r.iterations)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.slow
def test_converged_potentials_are_a_fixed_point_of_the_warm_updates(x64, backend):
  kw = dict(BACKENDS[backend], blur=0.2)
  x, y = _clouds(3)
  ref = solve_divergence(x, y, tol=1e-9, max_iter=5000, backend="dense", blur=0.2)
  assert bool(ref.converged)
  w = solve_divergence(x, y, init=ref, warm_iters=3, **kw)
  assert int(w.iterations) == 3
  np.testing.assert_allclose(float(w.value), float(ref.value), rtol=1e-7, atol=0)
  for name in ("f_ba", "g_ab", "f_aa", "g_bb"):
    np.testing.assert_allclose(getattr(w, name), getattr(ref, name), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_multiscale_warm_updates_match_dense_from_the_same_start(x64):
  # From an unconverged start (the annealed potentials), with the target's potential
  # extended: each multiscale softmin drops < e^-10 of a row's mass, so three updates agree.
  x, y = _clouds(4)
  cold = solve_divergence(x, y, blur=0.1, backend="dense", static_b=True)
  init = (cold.f_ba, None, cold.f_aa, None)
  out = {
    be: solve_divergence(x, y, blur=0.1, static_b=True, init=init, warm_iters=3, **kw)
    for be, kw in BACKENDS.items()
  }
  np.testing.assert_allclose(
    float(out["multiscale"].value), float(out["dense"].value), rtol=1e-5, atol=0
  )
  assert float(out["multiscale"].kept_tile_fraction) < 0.8  # tiles were actually dropped
  assert int(out["multiscale"].dense_fallbacks) == 0
  np.testing.assert_allclose(out["multiscale"].f_ba, out["dense"].f_ba, rtol=0, atol=1e-5)
  np.testing.assert_allclose(out["multiscale"].g_ab, out["dense"].g_ab, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_softmin_upper_bound_is_an_upper_bound_and_keeps_the_exact_tiles(x64):
  rng = np.random.default_rng(5)
  x, y = flower_numpy(rng, 700), flower_numpy(rng, 650) + 0.3
  eps = 0.1**2
  g = rng.normal(size=650) * 0.05
  log_b = np.full(650, -np.log(650))
  bx, by = ms.make_blocks(x, None, 32), ms.make_blocks(y, log_b, 32)
  gb = ms.to_blocks(by, jnp.asarray(g))
  upper = ms.from_blocks(bx, ms.softmin_upper_bound(bx, by, gb, eps))
  cost = 0.5 * np.sum((x[:, None] - y[None]) ** 2, -1)
  exact = -eps * logsumexp(log_b[None] + (g[None] - cost) / eps, axis=1)
  assert np.all(np.asarray(upper) >= exact - 1e-9)
  assert np.all(np.isfinite(upper))
  # Not vacuous: tight for most rows (measured median gap ≈ 1e-15 ε, mean 1.5 ε).
  assert float(np.median(np.asarray(upper) - exact)) < 0.1 * eps
  # With the bound as the rows' potential, every tile the exact potential keeps is kept, and
  # not many more (measured 0.288 vs 0.284 of all tiles).
  keep_upper = ms.keep_tiles(bx, by, ms.to_blocks(bx, upper), gb, eps)
  keep_exact = ms.keep_tiles(bx, by, ms.to_blocks(bx, jnp.asarray(exact)), gb, eps)
  assert bool(jnp.all(keep_upper | ~keep_exact))
  assert int(jnp.sum(keep_upper)) <= 1.1 * int(jnp.sum(keep_exact))


def test_init_errors_name_the_problem():
  x, y = _clouds(6, 50, 40)
  f, g = np.zeros(50), np.zeros(40)
  with pytest.raises(ValueError, match="f_aa"):
    solve_divergence(x, y, init=(f, g, None, g))
  with pytest.raises(ValueError, match="g_bb"):
    solve_divergence(x, y, init=(f, g, f, None))
  with pytest.raises(ValueError, match=r"init.g_ab.*\(40,\)"):
    solve_divergence(x, y, init=(f, f, f, g))
  with pytest.raises(ValueError, match="NaN"):
    solve_divergence(x, y, init=(f * np.nan, g, f, g))
  with pytest.raises(ValueError, match="envelope"):
    solve_divergence(x, y, init=(f, g, f, g), grad="unroll")
  with pytest.raises(ValueError, match="tuple"):
    solve_divergence(x, y, init=(f, g))
  with pytest.raises(ValueError, match="warm_iters"):
    solve_divergence(x, y, init=(f, g, f, g), warm_iters=0)
