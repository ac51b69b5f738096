"""Latent regularisers (gsae_jax.regularizers), each against an independent computation.

References are numpy/scipy float64: brute-force kernel matrices (mmd), sorting, quantile grids
and a transport LP (sliced), ``scipy.linalg.sqrtm`` (w2gauss), ``linear_sum_assignment`` and
all permutations (hungarian), an unrolled log-domain Sinkhorn with Altschuler rounding (sharp).
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import sqrtm
from scipy.optimize import linear_sum_assignment, linprog
from scipy.special import logsumexp

from gsae_jax import regularizers as R
from gsae_jax.ot import sinkhorn_divergence

KEY = jax.random.key(0)


def _clouds(seed, n=20, m=20, d=3, shift=0.5):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, d)), rng.normal(size=(m, d)) * 1.2 + shift


def _sqdist(x, y):
  return np.sum((x[:, None, :] - y[None, :, :]) ** 2, axis=-1)


def _check_value_and_grad(
  loss, ref, x, rtol=1e-10, grad_rtol=1e-6, n_dirs=2, h=1e-6, eager_loss=None
):
  """``loss(x)`` (jax) against the float64 reference ``ref(x)`` (numpy), and jit against eager.

  * ``jax.jit(jax.value_and_grad(loss))`` gives the value of ``ref`` (``rtol``, atol 1e-14);
  * the eager ``loss(x)`` (or ``eager_loss(x)``, the same function with other static settings)
    equals that jitted value (rtol 1e-12): the regulariser traces and validates its input
    under an outer ``jax.jit`` and gives the same number;
  * the gradient along random directions ``u`` matches central differences of the reference
    (not of ``loss``): float64, ``h = 1e-6``, truncation ~h², round-off ~1e-16/h, so
    ``grad_rtol = 1e-6`` with atol 1e-8.

  Two compilations per call (jitted value_and_grad, eager value), which keeps the file fast.
  """
  value, grad = jax.jit(jax.value_and_grad(loss))(x)
  np.testing.assert_allclose((eager_loss or loss)(x), value, rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(value, ref(x), rtol=rtol, atol=1e-14)
  for u in np.random.default_rng(100).normal(size=(n_dirs, *x.shape)):
    fd = (ref(x + h * u) - ref(x - h * u)) / (2 * h)
    np.testing.assert_allclose(np.sum(grad * u), fd, rtol=grad_rtol, atol=1e-8)


# ----------------------------------------------------------------------------- registry


def test_registry_names_and_default():
  assert R.REGULARIZER_NAMES == ("sinkhorn", "sharp", "mmd", "sliced", "w2gauss", "hungarian")
  assert R.get_regularizer() is R.sinkhorn_regularizer
  for name in R.REGULARIZER_NAMES:
    assert callable(R.get_regularizer(name))


def test_unknown_name_lists_the_names():
  with pytest.raises(ValueError, match="unknown regulariser 'wasserstein'.*'sinkhorn'.*'sliced'"):
    R.get_regularizer("wasserstein")


# ----------------------------------------------------------------------------- mmd


def _numpy_mmd(x, y, sigma2, scales):
  # Full float64 kernel matrices, diagonal masked: the U-statistic of Gretton et al. (2012).
  d = x.shape[1]
  k = lambda a, b: sum(c / (c + _sqdist(a, b)) for c in (2 * d * sigma2 * s for s in scales))
  n, m = len(x), len(y)
  kxx, kyy = k(x, x), k(y, y)
  return (
    (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    - 2 * k(x, y).sum() / (n * m)
  )


@pytest.mark.slow
def test_mmd_matches_bruteforce_u_statistic_with_gradient(x64):
  # Chunk 7 divides neither 50 nor 70: padded last blocks, forward and backward. The eager
  # value is the unchunked one (chunk_size None: one block of all rows), so the jit-vs-eager
  # check is also chunked-vs-unchunked.
  x, y = _clouds(0, n=50, m=70, d=3)
  _check_value_and_grad(
    lambda z: R.mmd_regularizer(z, y, chunk_size=7),
    lambda z: _numpy_mmd(z, y, 1.0, R.WAE_IMQ_SCALES),
    x,
    eager_loss=lambda z: R.mmd_regularizer(z, y),
  )


def test_mmd_other_scales(x64):
  x, y = _clouds(1, n=50, m=70, d=3)
  got = R.mmd_squared(x, y, sigma2=0.5, scales=(0.3, 3.0))
  np.testing.assert_allclose(got, _numpy_mmd(x, y, 0.5, (0.3, 3.0)), rtol=1e-10)


def test_mmd_rows_estimate_and_gradient(x64):
  # mmd_squared_rows against the numpy U-statistic: the full value from all rows, the mean
  # of its batch estimates over a partition (6 batches of 10 of z, 6 of 5 of y), and the full
  # MMD²'s gradient in the batch rows (numpy central differences), zero elsewhere.
  x, y = _clouds(2, n=60, m=30, d=2)
  full = _numpy_mmd(x, y, 2.0, R.WAE_IMQ_SCALES)
  rows_fn = functools.partial(R.mmd_squared_rows, sigma2=2.0, chunk_size=7)
  np.testing.assert_allclose(rows_fn(x, np.arange(60), y, np.arange(30)), full, rtol=1e-10)
  perm_x, perm_y = (
    np.random.default_rng(3).permutation(60),
    np.random.default_rng(4).permutation(30),
  )
  batches = [(perm_x[10 * i : 10 * i + 10], perm_y[5 * i : 5 * i + 5]) for i in range(6)]
  estimates = [float(rows_fn(x, bx, y, by)) for bx, by in batches]
  np.testing.assert_allclose(np.mean(estimates), full, rtol=1e-10)
  assert np.std(estimates) > 1e-3 * abs(full)  # an estimate, not the full value each time

  rows, y_rows = batches[0]
  grad = jax.jit(jax.grad(lambda z: rows_fn(z, rows, y, y_rows)))(x)
  assert np.all(grad[np.setdiff1d(np.arange(60), rows)] == 0.0)
  h = 1e-6
  for u in np.random.default_rng(5).normal(size=(2, 10, 2)):
    step = np.zeros_like(x)
    step[rows] = h * u
    fd = (
      _numpy_mmd(x + step, y, 2.0, R.WAE_IMQ_SCALES)
      - _numpy_mmd(x - step, y, 2.0, R.WAE_IMQ_SCALES)
    ) / (2 * h)
    np.testing.assert_allclose(np.sum(grad[rows] * u), fd, rtol=1e-6, atol=1e-10)

  with pytest.raises(ValueError, match="`rows` must be a non-empty"):
    R.mmd_squared_rows(x, np.zeros((0,), int), y, y_rows)
  with pytest.raises(ValueError, match="`y_rows` must be a non-empty"):
    R.mmd_squared_rows(x, rows, y, np.zeros(3))
  with pytest.raises(ValueError, match="same dimension"):
    R.mmd_squared_rows(x, rows, y[:, :1], y_rows)


# ----------------------------------------------------------------------------- sliced


@pytest.mark.slow
def test_sliced_equal_sizes_is_sorted_w2_per_direction(x64):
  x, y = _clouds(2, n=40, m=40, d=3)
  theta = np.asarray(R.random_directions(KEY, 8, 3, jnp.float64))
  np.testing.assert_allclose(np.linalg.norm(theta, axis=1), 1.0, rtol=1e-12)
  ref = lambda z: np.mean([np.mean((np.sort(z @ t) - np.sort(y @ t)) ** 2) for t in theta])
  _check_value_and_grad(lambda z: R.sliced_regularizer(z, y, key=KEY, n_projections=8), ref, x)


def test_sliced_unequal_sizes_matches_numpy_quantiles(x64):
  n, m = 30, 45
  x, y = _clouds(3, n=n, m=m, d=3)
  theta = np.asarray(R.random_directions(KEY, 8, 3, jnp.float64))
  # Both empirical quantile functions are constant on the pieces of the grid 1/lcm(n, m):
  # their values at its midpoints (never a breakpoint) give the exact 1-D W2².
  levels = (np.arange(math.lcm(n, m)) + 0.5) / math.lcm(n, m)
  q = lambda v: np.quantile(v, levels, method="inverted_cdf")
  ref = np.mean([np.mean((q(x @ t) - q(y @ t)) ** 2) for t in theta])
  np.testing.assert_allclose(R.sliced_regularizer(x, y, key=KEY, n_projections=8), ref, rtol=1e-12)


def test_sliced_unequal_sizes_matches_transport_lp(x64):
  # The exact 1-D W2² of two empirical measures as a linear program (independent of sorting).
  n, m = 7, 11
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(n, 1)), rng.normal(size=(m, 1)) + 0.3
  cost = _sqdist(x, y).ravel()
  a_eq = np.vstack([np.kron(np.eye(n), np.ones(m)), np.kron(np.ones(n), np.eye(m))])
  b_eq = np.concatenate([np.full(n, 1 / n), np.full(m, 1 / m)])
  lp = linprog(cost, A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs")
  assert lp.success
  np.testing.assert_allclose(R.sliced_w2_squared(x, y, np.ones((1, 1))), lp.fun, rtol=1e-9)


def test_sliced_gaussians_match_closed_form(x64):
  # Projections of N(μ₁, σ₁² I) and N(μ₂, σ₂² I) on a unit θ are N(θ·μ, σ²) in 1-D, where
  # W2² = (θ·(μ₁ − μ₂))² + (σ₁ − σ₂)². The samples (n = 20 000) are whitened to exactly these
  # means and covariances, so every projection has the right first two moments and only the
  # shape of the empirical quantiles differs (a ~1e-3 effect; the raw moments' sampling error
  # would be ~3e-2).
  n, d, sig1, sig2 = 20_000, 3, 1.0, 2.0
  mu2 = np.array([1.0, 0.5, -0.5])
  rng = np.random.default_rng(5)

  def gaussian(mu, sig):
    g = rng.normal(size=(n, d))
    g -= g.mean(0)
    g = g @ np.linalg.inv(np.linalg.cholesky(np.cov(g, rowvar=False, ddof=0))).T
    return mu + sig * g

  x, y = gaussian(np.zeros(d), sig1), gaussian(mu2, sig2)
  theta = np.asarray(R.random_directions(KEY, 8, d, jnp.float64))
  ref = np.mean((theta @ mu2) ** 2) + (sig1 - sig2) ** 2
  got = R.sliced_regularizer(x, y, key=KEY, n_projections=8)
  np.testing.assert_allclose(got, ref, atol=1e-2)


# ----------------------------------------------------------------------------- w2gauss


def test_w2gauss_matches_closed_form_with_sqrtm(x64):
  rng = np.random.default_rng(6)
  d = 4
  z = rng.normal(size=(60, d)) @ rng.normal(size=(d, d)) + np.array([0.5, -1.0, 0.0, 2.0])
  eye = np.eye(d)
  root = sqrtm(eye)  # Σ₂^{1/2} = I, kept in the general formula (13)

  def ref(z):
    mu, cov = z.mean(0), np.cov(z, rowvar=False, ddof=1)  # the unbiased Σ̂ of Patrini §4
    return mu @ mu + np.trace(cov + eye - 2 * np.real(sqrtm(root @ cov @ root)))

  prior = rng.normal(size=(5, d))
  _check_value_and_grad(lambda z: R.w2gauss_regularizer(z, prior), ref, z)
  # The prior sample is ignored (the prior is N(0, I) by construction).
  np.testing.assert_allclose(R.w2gauss_regularizer(z, 10 + np.zeros((3, d))), ref(z), rtol=1e-10)


def test_w2gauss_rank_deficient_batch_has_finite_gradient(x64):
  z = np.random.default_rng(7).normal(size=(3, 5))  # n ≤ d: Σ̂ has 3 zero eigenvalues
  g = jax.grad(lambda z: R.w2gauss_regularizer(z, z))(z)
  assert np.all(np.isfinite(g))


# ----------------------------------------------------------------------------- hungarian


def test_hungarian_matches_scipy_assignment(x64):
  # Random points in general position: the optimal assignment is unique and locally constant,
  # so the reference is differentiable there (its central differences keep the same σ).
  x, y = _clouds(8, n=40, m=40, d=3)

  def ref(z):
    rows, cols = linear_sum_assignment(_sqdist(z, y))
    return _sqdist(z, y)[rows, cols].mean()

  _check_value_and_grad(lambda z: R.hungarian_regularizer(z, y), ref, x, rtol=1e-12)


def test_hungarian_matches_bruteforce_permutations(x64):
  x, y = _clouds(9, n=5, m=5, d=2)
  c = _sqdist(x, y)
  ref = min(np.mean(c[np.arange(5), list(p)]) for p in itertools.permutations(range(5)))
  np.testing.assert_allclose(R.hungarian_regularizer(x, y), ref, rtol=1e-12)


# ----------------------------------------------------------------------------- sharp, sinkhorn


def _numpy_sharp(x, y, eps, n_iter):
  """Patrini et al. Eq. 12 in float64: unrolled log-domain Sinkhorn from g = 0 (f then g, as
  the engine orders them), then Altschuler et al. (2017) Algorithm 2, transport term only."""

  def transport(p, q):
    c = 0.5 * _sqdist(p, q)
    la, lb = np.full(len(p), -np.log(len(p))), np.full(len(q), -np.log(len(q)))
    g = np.zeros(len(q))
    for _ in range(n_iter):
      f = -eps * logsumexp(lb[None, :] + (g[None, :] - c) / eps, axis=1)
      g = -eps * logsumexp(la[:, None] + (f[:, None] - c) / eps, axis=0)
    plan = np.exp(la[:, None] + lb[None, :] + (f[:, None] + g[None, :] - c) / eps)
    a, b = np.exp(la), np.exp(lb)
    plan = np.diag(np.minimum(a / plan.sum(1), 1)) @ plan  # Alg. 2: X = diag(min(r/r(F), 1))
    plan = plan @ np.diag(np.minimum(b / plan.sum(0), 1))  # Y = diag(min(c/c(F'), 1))
    err_a, err_b = a - plan.sum(1), b - plan.sum(0)
    plan = plan + np.outer(err_a, err_b) / np.abs(err_a).sum()  # + err_r err_cᵀ / ‖err_r‖₁
    np.testing.assert_allclose(plan.sum(1), a, atol=1e-15)  # the rounding's own contract
    return np.sum(plan * c)

  return transport(x, y) - 0.5 * transport(x, x) - 0.5 * transport(y, y)


@pytest.mark.slow
def test_sharp_matches_numpy_logdomain_sinkhorn_with_rounding(x64):
  # The gradient runs through every unrolled iteration and the rounding's min / rank-one steps.
  x, y = _clouds(10, n=12, m=15, d=2)
  _check_value_and_grad(
    lambda z: R.sharp_regularizer(z, y, epsilon=0.1, n_iter=30),
    lambda z: _numpy_sharp(z, y, 0.1, 30),
    x,
    rtol=1e-9,
  )


# ----------------------------------------------------------------------------- gradients, jit


@pytest.mark.slow
def test_sinkhorn_wraps_the_engine(x64):
  # The wrapper under jit (the value of a jitted value_and_grad) against the engine called
  # eagerly; the engine's own gradients are tested in tests/test_ot_divergence.py.
  x, y = _clouds(12, n=8, m=8, d=3)
  settings = dict(blur=0.5, backend="dense")
  loss = lambda z: R.sinkhorn_regularizer(z, y, **settings)
  value, grad = jax.jit(jax.value_and_grad(loss))(x)
  np.testing.assert_allclose(value, sinkhorn_divergence(x, y, **settings), rtol=1e-12)
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)
  # Debiased: a cloud against itself is 0 (same shapes: the engine's compilation is reused).
  np.testing.assert_allclose(R.sinkhorn_regularizer(x, x, **settings), 0.0, atol=1e-10)


@pytest.mark.slow  # ~5 s of compilation: the engine's converged mode, jitted and eager
def test_sinkhorn_gradient_matches_finite_differences(x64):
  # Converged (tol), the envelope gradient is the derivative of the value. The reference is the
  # engine's own value: the wrapper must give it, under jit too, with a matching gradient.
  x, y = _clouds(12, n=8, m=8, d=3)
  settings = dict(blur=0.5, backend="dense", tol=1e-13)
  _check_value_and_grad(
    lambda z: R.sinkhorn_regularizer(z, y, **settings),
    lambda z: np.asarray(sinkhorn_divergence(z, y, **settings)),
    x,
  )


# ----------------------------------------------------------------------------- errors


def test_sliced_needs_a_key():
  with pytest.raises(ValueError, match="'sliced' needs `key`"):
    R.sliced_regularizer(np.zeros((4, 2)), np.zeros((4, 2)))


def test_hungarian_needs_equal_sizes():
  with pytest.raises(ValueError, match="same number of points.*n = 4 and m = 5"):
    R.hungarian_regularizer(np.zeros((4, 2)), np.zeros((5, 2)))


def test_size_limits():
  big = np.zeros((R.HUNGARIAN_MAX_N + 1, 2), np.float32)
  with pytest.raises(ValueError, match="HUNGARIAN_MAX_N = 5000"):
    R.hungarian_regularizer(big, big)
  with pytest.raises(ValueError, match="SHARP_MAX_PAIRS = 25,000,000"):
    R.sharp_regularizer(np.zeros((5001, 2), np.float32), np.zeros((10, 2), np.float32))
  # Under jit the check fires at trace time, on the static shapes.
  with pytest.raises(ValueError, match="SHARP_MAX_PAIRS"):
    jax.jit(R.sharp_regularizer)(np.zeros((6000, 2), np.float32), np.zeros((6000, 2), np.float32))


@pytest.mark.parametrize("name", R.REGULARIZER_NAMES)
def test_bad_shapes_name_the_argument(name):
  fn = R.get_regularizer(name)
  with pytest.raises(ValueError, match="`z` must be a \\[n, d\\] array"):
    fn(np.zeros(4), np.zeros((4, 2)), key=KEY)
  with pytest.raises(ValueError, match="`prior_sample` must be a \\[n, d\\] array"):
    fn(np.zeros((4, 2)), np.zeros((4, 2, 1)), key=KEY)
  with pytest.raises(ValueError, match="same dimension"):
    fn(np.zeros((4, 2)), np.zeros((4, 3)), key=KEY)


def test_u_statistic_and_covariance_need_two_points():
  with pytest.raises(ValueError, match="`prior_sample` needs at least 2 points"):
    R.mmd_regularizer(np.zeros((4, 2)), np.zeros((1, 2)))
  with pytest.raises(ValueError, match="`z` needs at least 2 points"):
    R.w2gauss_regularizer(np.zeros((1, 2)), np.zeros((4, 2)))


def test_bad_settings():
  z = np.zeros((4, 2))
  with pytest.raises(ValueError, match="`scales`"):
    R.mmd_regularizer(z, z, scales=())
  with pytest.raises(ValueError, match="`sigma2`"):
    R.mmd_regularizer(z, z, sigma2=-1.0)
  with pytest.raises(ValueError, match="`n_projections`"):
    R.sliced_regularizer(z, z, key=KEY, n_projections=0)
  with pytest.raises(ValueError, match="`epsilon`"):
    R.sharp_regularizer(z, z, epsilon=0.0)


# ----------------------------------------------------------------------------- full size


@pytest.mark.slow  # minutes on 2 CPU cores: 3 × 3.6e9 kernel evaluations × 7 scales
def test_mmd_and_sliced_run_at_60k_under_jit():
  # Full-dataset size (MNIST's 60 000 latents against as many prior samples): O(n) memory.
  n, d = 60_000, 8
  rng = np.random.default_rng(14)
  z = rng.normal(size=(n, d)).astype(np.float32)
  p = (1.1 * rng.normal(size=(n, d))).astype(np.float32)
  value = jax.jit(R.mmd_regularizer)(z, p)
  assert np.isfinite(value) and value > 0
  loss = functools.partial(R.sliced_regularizer, key=KEY)
  value, grad = jax.jit(jax.value_and_grad(loss))(z, p)
  assert np.isfinite(value) and value > 0 and np.all(np.isfinite(grad))
