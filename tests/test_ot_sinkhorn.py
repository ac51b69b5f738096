"""Fixed-ε `sinkhorn` against ott-jax, and its warm start."""

import jax
import numpy as np
import pytest
from scipy.special import logsumexp

from gsae_jax.ot import sinkhorn
from tests.conftest import flower_numpy


def _clouds(seed=0, n=150, m=120):
  rng = np.random.default_rng(seed)
  x = flower_numpy(rng, n).astype(np.float32)
  y = (1.5 * rng.normal(size=(m, 2))).astype(np.float32)
  b = rng.dirichlet(np.ones(m)).astype(np.float32)
  return x, y, b


@pytest.mark.slow
def test_matches_ott_fixed_epsilon():
  from ott.geometry import pointcloud
  from ott.problems.linear import linear_problem
  from ott.solvers.linear import sinkhorn as ott_sinkhorn

  x, y, b = _clouds()
  eps = 0.05
  geom = pointcloud.PointCloud(x, y, epsilon=2 * eps)  # ott's cost is ‖x − y‖² = 2 C
  ref = ott_sinkhorn.Sinkhorn(threshold=1e-5, max_iterations=20_000)(
    linear_problem.LinearProblem(geom, b=b)
  )
  out = sinkhorn(x, y, None, b, epsilon=eps, tol=1e-5, max_iter=20_000)
  assert float(out.marginal_violation) < 1e-5
  np.testing.assert_allclose(2 * out.reg_ot_cost, ref.reg_ot_cost, rtol=1e-4)
  np.testing.assert_allclose(2 * out.transport_cost, ref.primal_cost, rtol=1e-3)
  # The potentials solve the Schrödinger fixed point f = softmin_ε(C, log b + g/ε) (float64
  # numpy), and f equals ott's up to the constant that potentials are defined modulo.
  C = 0.5 * np.sum((x[:, None].astype(np.float64) - y[None]) ** 2, axis=-1)
  f, g = np.asarray(out.f, np.float64), np.asarray(out.g, np.float64)
  f_fixed = -eps * logsumexp(np.log(b)[None] + (g[None] - C) / eps, axis=1)
  np.testing.assert_allclose(f, f_fixed, atol=1e-3 * eps)
  shift = 2 * f - np.asarray(ref.f)
  assert np.ptp(shift) < 1e-3 * np.ptp(ref.f)


@pytest.mark.slow
def test_warm_start_after_small_move_needs_fewer_iterations():
  x, y, b = _clouds(seed=1, n=300, m=300)
  eps = 0.01
  cold = sinkhorn(x, y, None, b, epsilon=eps, tol=1e-4, max_iter=20_000)
  x2 = x + 1e-3 * np.random.default_rng(2).normal(size=x.shape).astype(np.float32)
  cold2 = sinkhorn(x2, y, None, b, epsilon=eps, tol=1e-4, max_iter=20_000)
  warm2 = sinkhorn(x2, y, None, b, epsilon=eps, tol=1e-4, max_iter=20_000, init=(cold.f, cold.g))
  assert int(cold2.iterations) < 20_000
  assert int(warm2.iterations) < 0.5 * int(cold2.iterations)
  np.testing.assert_allclose(warm2.reg_ot_cost, cold2.reg_ot_cost, rtol=1e-4)


@pytest.mark.slow
def test_converged_warm_start_does_no_iterations():
  x, y, b = _clouds(seed=3)
  out = sinkhorn(x, y, None, b, epsilon=0.1, tol=1e-5, max_iter=5000)
  again = sinkhorn(x, y, None, b, epsilon=0.1, tol=1e-4, max_iter=5000, init=(out.f, out.g))
  assert int(again.iterations) == 0


@pytest.mark.slow
def test_reg_ot_cost_gradient_is_envelope(x64):
  # At convergence d OT_ε / d x_i = a_i (x_i − Σ_j π_ij y_j): check against finite differences.
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(20, 2)), rng.normal(size=(25, 2)) + 1
  f = lambda x: sinkhorn(x, y, epsilon=0.2, tol=1e-12, max_iter=10_000).reg_ot_cost
  d = rng.normal(size=x.shape)
  h = 1e-5
  fd = (f(x + h * d) - f(x - h * d)) / (2 * h)
  np.testing.assert_allclose(np.sum(jax.grad(f)(x) * d), fd, rtol=1e-6)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"epsilon": 0.0}, "`epsilon`"),
    ({"epsilon": 0.1, "tol": 0.0}, "`tol`"),
    ({"epsilon": 0.1, "init": (np.zeros(3), np.zeros(4))}, "`init`"),
  ],
)
def test_bad_inputs_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sinkhorn(np.zeros((4, 2)), np.ones((4, 2)), **kwargs)
