"""Dense unrolled losses (Genevay et al. 2018; Patrini et al. 2019) against numpy references."""

import jax
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from gsae_jax.ot import genevay_loss, round_plan, sharp_sinkhorn_loss, sinkhorn_plan


def _cost(x, y):
  return 0.5 * np.sum((x[:, None] - y[None]) ** 2, axis=-1)


def _numpy_sinkhorn_plan(C, a, b, eps, n_iter):
  # Scaling form of Genevay et al. Algorithm 1 (u, v multiplicative), independent of ours,
  # started from g = 0, i.e. v = b (Genevay's v = 1 is the same for uniform b).
  K = np.exp(-C / eps)
  v = b.copy()
  for _ in range(n_iter):
    u = a / (K @ v)
    v = b / (K.T @ u)
  return u[:, None] * K * v[None, :]


def _numpy_round(P, a, b):
  P = P * np.minimum(a / P.sum(1), 1)[:, None]
  P = P * np.minimum(b / P.sum(0), 1)[None, :]
  ea, eb = a - P.sum(1), b - P.sum(0)
  return P + np.outer(ea, eb) / ea.sum() if ea.sum() > 0 else P


def _data(seed, n=30, m=40, d=2):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, d)), rng.normal(size=(m, d)) + 0.5, rng.dirichlet(np.ones(n))


def test_plan_matches_scaling_form(x64):
  x, y, a = _data(0)
  b = np.full(40, 1 / 40)
  C = _cost(x, y)
  np.testing.assert_allclose(
    sinkhorn_plan(C, a, b, 0.5, 15),
    _numpy_sinkhorn_plan(C, a, b, 0.5, 15),
    rtol=1e-10,
    atol=1e-14,
  )


@pytest.mark.slow
def test_genevay_loss_matches_numpy(x64):
  x, y, a = _data(1)
  b = np.full(40, 1 / 40)
  W = lambda p, q, u, v: np.sum(_numpy_sinkhorn_plan(_cost(p, q), u, v, 1.0, 10) * _cost(p, q))
  ref = 2 * W(x, y, a, b) - W(x, x, a, a) - W(y, y, b, b)
  np.testing.assert_allclose(genevay_loss(x, y, a, b, epsilon=1.0, n_iter=10), ref, rtol=1e-10)


@pytest.mark.slow
def test_genevay_gradient_matches_finite_differences(x64):
  x, y, _ = _data(2)
  f = lambda x: genevay_loss(x, y, epsilon=0.5, n_iter=20)
  d = np.random.default_rng(3).normal(size=x.shape)
  h = 1e-6
  fd = (f(x + h * d) - f(x - h * d)) / (2 * h)
  np.testing.assert_allclose(np.sum(jax.grad(f)(x) * d), fd, rtol=1e-6)


def test_rounding_gives_exact_marginals(x64):
  x, y, a = _data(4)
  b = np.random.default_rng(5).dirichlet(np.ones(40))
  P = np.asarray(sinkhorn_plan(_cost(x, y), a, b, 0.05, 3))  # far from converged
  R = np.asarray(round_plan(P, a, b))
  np.testing.assert_allclose(R.sum(1), a, atol=1e-14)
  np.testing.assert_allclose(R.sum(0), b, atol=1e-14)
  assert R.min() >= -1e-15  # non-negative up to round-off
  np.testing.assert_allclose(R, _numpy_round(P, a, b), rtol=1e-12, atol=1e-15)


@pytest.mark.slow
def test_sharp_loss_at_small_epsilon_approaches_exact_ot(x64):
  rng = np.random.default_rng(6)
  n = 60
  x, y = rng.uniform(size=(n, 2)), rng.uniform(size=(n, 2)) + np.array([0.3, 0.1])
  C = _cost(x, y)
  r, c = linear_sum_assignment(C)
  exact = C[r, c].mean()
  # exact self-transport is 0, so the debiased sharp loss tends to W(μ, ν)
  ours = sharp_sinkhorn_loss(x, y, epsilon=1e-3, n_iter=3000)
  np.testing.assert_allclose(ours, exact, rtol=0.02)
