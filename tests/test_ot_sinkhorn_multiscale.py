"""The fixed-ε `sinkhorn` with ``backend="multiscale"`` against the dense backend.

The dense backend is the reference (``tests/test_ot_sinkhorn.py`` checks it against ott-jax).
Converged mode (``tol=1e-4``): the multiscale solve must give the same cost within 1e-4
relative, the same transport cost and x-gradient within 1e-3, and potentials within 1e-2·ε
(up to their additive constant), while keeping fewer than all tiles (small blocks, so that
tiles are truncated at this size).
"""

import jax
import numpy as np
import pytest

from gsae_jax.ot import sinkhorn
from tests.conftest import flower_numpy

N, M = 600, 500
EPS = 0.05
KW = {"epsilon": EPS, "tol": 1e-4, "max_iter": 5000}
SPARSE = {"backend": "multiscale", "block_size": 32, "tile_fraction": 1.0}


def _case(name: str, d: int = 2, seed: int = 0):
  rng = np.random.default_rng(seed)

  def flower(n):
    pts = flower_numpy(rng, n)
    return pts if d == 2 else np.concatenate([pts, 0.3 * rng.normal(size=(n, 1))], axis=1)

  x, a, b = flower(N), None, None
  if name == "flower_gauss":
    y = rng.normal(size=(M, d))
  elif name == "weighted":
    y = 1.5 * rng.normal(size=(M, d))
    a, b = rng.dirichlet(np.ones(N)), rng.dirichlet(np.ones(M))
  elif name == "far_apart":
    y = flower(M) + np.r_[25.0, np.zeros(d - 1)]
  else:
    raise ValueError(name)
  f32 = lambda v: None if v is None else np.asarray(v, np.float32)
  return f32(x), f32(y), f32(a), f32(b)


def _grad_x(x, y, a, b, **kw):
  return jax.grad(lambda x: sinkhorn(x, y, a, b, **kw).reg_ot_cost)(x)


@pytest.mark.parametrize(
  "name,d",
  [("flower_gauss", 2), ("weighted", 2), pytest.param("far_apart", 2, marks=pytest.mark.slow)],
)
@pytest.mark.slow
def test_multiscale_matches_dense(name, d):
  x, y, a, b = _case(name, d)
  dense = sinkhorn(x, y, a, b, backend="dense", **KW)
  sparse = sinkhorn(x, y, a, b, **SPARSE, **KW)
  assert sparse.backend == "multiscale" and dense.backend == "dense"
  assert bool(dense.converged) and bool(sparse.converged)
  assert float(sparse.marginal_violation) <= 1e-4
  assert int(sparse.dense_fallbacks) == 0
  assert float(sparse.kept_tile_fraction) < 0.8  # tiles were truncated
  np.testing.assert_allclose(sparse.reg_ot_cost, dense.reg_ot_cost, rtol=1e-4)
  np.testing.assert_allclose(sparse.transport_cost, dense.transport_cost, rtol=1e-3)
  # Potentials are defined up to (f + c, g − c); the truncated mass drifts c slowly.
  shift = float(np.mean(sparse.f - dense.f))
  # float32 rounding of potentials of size |f| (≈ 300 for the far-apart clouds): 2e-5 |f|.
  atol = 1e-2 * EPS + 2e-5 * float(np.max(np.abs(dense.f)))
  np.testing.assert_allclose(sparse.f - shift, dense.f, atol=atol)
  np.testing.assert_allclose(sparse.g + shift, dense.g, atol=atol)
  g_sparse = _grad_x(x, y, a, b, **SPARSE, **KW)
  g_dense = _grad_x(x, y, a, b, backend="dense", **KW)
  assert np.linalg.norm(g_sparse - g_dense) <= 1e-3 * np.linalg.norm(g_dense)


@pytest.mark.slow
def test_multiscale_matches_dense_in_3d():
  x, y, a, b = _case("flower_gauss", 3)
  dense = sinkhorn(x, y, a, b, backend="dense", **KW)
  sparse = sinkhorn(x, y, a, b, **SPARSE, **KW)
  assert bool(sparse.converged) and float(sparse.kept_tile_fraction) < 1.0
  np.testing.assert_allclose(sparse.reg_ot_cost, dense.reg_ot_cost, rtol=1e-4)
  np.testing.assert_allclose(sparse.transport_cost, dense.transport_cost, rtol=1e-3)


@pytest.mark.slow
def test_cold_start_at_small_epsilon_follows_the_dense_iterates():
  # 30 updates from zero potentials at ε = 0.0025, far from the fixed point: the rows'
  # potentials lag their softmins by many ε, so tiles chosen from them alone dropped mass
  # (2.5 % value and 27 % gradient error here before the checked softmin; a negative cost at
  # n = 60 000). The same iterates as dense, whatever the convergence.
  from benchmarks.harness import clouds

  x, y = (np.asarray(v) for v in clouds(2000, 2, "flower", "gauss", 0))
  kw = {"epsilon": 0.0025, "tol": 1e-12, "max_iter": 30}
  vd, gd = jax.value_and_grad(lambda x: sinkhorn(x, y, backend="dense", **kw).reg_ot_cost)(x)
  sparse = lambda x: sinkhorn(x, y, backend="multiscale", block_size=32, **kw)
  vm, gm = jax.value_and_grad(lambda x: sparse(x).reg_ot_cost)(x)
  out = sparse(x)
  assert int(out.iterations) == 30 and float(out.kept_tile_fraction) < 0.5
  np.testing.assert_allclose(vm, vd, rtol=1e-5)
  assert np.linalg.norm(gm - gd) <= 2e-3 * np.linalg.norm(gd)


@pytest.mark.slow
def test_overflowing_tile_lists_run_densely_and_are_counted():
  x, y, a, b = _case("flower_gauss")
  dense = sinkhorn(x, y, a, b, backend="dense", **KW)
  tight = sinkhorn(x, y, a, b, **{**SPARSE, "tile_fraction": 0.05}, **KW)
  assert int(tight.dense_fallbacks) > 0
  np.testing.assert_allclose(tight.reg_ot_cost, dense.reg_ot_cost, rtol=1e-4)
  np.testing.assert_allclose(tight.transport_cost, dense.transport_cost, rtol=1e-3)


@pytest.mark.slow
def test_multiscale_warm_start_from_its_solution_runs_no_update():
  x, y, a, b = _case("flower_gauss")
  out = sinkhorn(x, y, a, b, **SPARSE, **{**KW, "tol": 1e-5})
  again = sinkhorn(x, y, a, b, **SPARSE, **KW, init=(out.f, out.g))
  assert int(again.iterations) == 0
  np.testing.assert_allclose(again.reg_ot_cost, out.reg_ot_cost, rtol=1e-5)


@pytest.mark.slow
def test_backend_choice_and_errors():
  x, y, _, _ = _case("flower_gauss")
  assert sinkhorn(x, y, epsilon=0.1, max_iter=5).backend == "dense"  # auto: small n·m
  x4 = np.zeros((10, 4), np.float32)
  with pytest.raises(ValueError, match="d <= 3"):
    sinkhorn(x4, x4, epsilon=0.1, backend="multiscale")
  with pytest.raises(ValueError, match="`block_size`"):
    sinkhorn(x, y, epsilon=0.1, backend="multiscale", block_size=0)
  with pytest.raises(ValueError, match="`tile_fraction`"):
    sinkhorn(x, y, epsilon=0.1, backend="multiscale", tile_fraction=0.0)
  with pytest.raises(ValueError, match="`truncate`"):
    sinkhorn(x, y, epsilon=0.1, backend="multiscale", truncate=-1.0)
