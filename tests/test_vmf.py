"""The von Mises–Fisher distribution of the HVAE (``gsae_jax.vmf``) against scipy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special as sp
import scipy.stats as st
from scipy.integrate import quad
from scipy.optimize import brentq

from gsae_jax import vmf

_slow = lambda v: pytest.param(v, marks=pytest.mark.slow)  # each value compiles anew
ORDERS = (0.0, _slow(0.5), _slow(3.0), _slow(4.0), _slow(7.5), _slow(12.0))


@pytest.mark.parametrize("nu", ORDERS)
def test_log_iv_and_its_derivative_match_scipy(x64, nu):
  # Both branches (series below max(15, ν²), Hankel above) over 1e-3 … 1e3, float64.
  x = np.logspace(-3, 3, 200)
  ref = np.log(sp.ive(nu, x)) + x
  np.testing.assert_allclose(vmf.log_iv(nu, jnp.asarray(x)), ref, rtol=1e-10, atol=1e-10)
  slope = jax.vmap(jax.grad(lambda t: vmf.log_iv(nu, t)))(jnp.asarray(x))
  np.testing.assert_allclose(slope, sp.ive(nu + 1, x) / sp.ive(nu, x) + nu / x, rtol=1e-9)


@pytest.mark.slow
def test_log_iv_float32():
  x = np.logspace(-3, 3, 200)
  got = vmf.log_iv(4.0, jnp.asarray(x, jnp.float32))
  assert got.dtype == jnp.float32
  ref = np.log(sp.ive(4.0, x)) + x
  np.testing.assert_allclose(got, ref, rtol=5e-6, atol=5e-6)


@pytest.mark.parametrize("m", [_slow(3), _slow(8), _slow(16)])  # x64 compiles: ≈ 6 s each
def test_kl_to_uniform_matches_scipy_entropy(x64, m):
  # KL(vMF ‖ uniform) = log|S^{m−1}| − H(vMF), H from scipy.stats.vonmises_fisher.
  kappas = np.array([0.5, 5.0, 50.0, 500.0])
  log_area = np.log(2.0) + m / 2 * np.log(np.pi) - sp.gammaln(m / 2)
  mu = np.eye(m)[0]
  ref = [log_area - st.vonmises_fisher(mu, k).entropy() for k in kappas]
  np.testing.assert_allclose(vmf.kl_to_uniform(jnp.asarray(kappas), m), ref, rtol=1e-9)
  # and its κ-derivative against central differences of the scipy value
  h = 1e-5
  fd = [
    (st.vonmises_fisher(mu, k - h).entropy() - st.vonmises_fisher(mu, k + h).entropy()) / (2 * h)
    for k in kappas
  ]
  grad = jax.vmap(jax.grad(lambda k: vmf.kl_to_uniform(k, m)))(jnp.asarray(kappas))
  np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)  # FD round-off ≈ 1e-9


@pytest.mark.parametrize("kappa", [1.0, 5.0, 30.0, 200.0])
@pytest.mark.slow  # 100 000 samples, and as many from scipy
def test_samples_match_scipy_and_the_mean_resultant(x64, kappa):
  # 100 000 samples around a random direction: on the sphere, w = μᵀz distributed as
  # scipy's samples (two-sample KS), mean within 4 standard errors of A_m(κ), and the
  # component orthogonal to μ centred.
  m, n = 8, 100_000
  mu = np.random.default_rng(0).normal(size=m)
  mu /= np.linalg.norm(mu)
  z = np.asarray(vmf.sample(jax.random.key(1), jnp.tile(mu, (n, 1)), jnp.full((n,), kappa)))
  np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-12)
  w = z @ mu
  ref = st.vonmises_fisher(mu, kappa).rvs(n, random_state=2) @ mu
  assert st.ks_2samp(w, ref).pvalue > 1e-3
  mean = float(vmf.mean_resultant(jnp.asarray(kappa), m))
  assert abs(w.mean() - mean) < 4 * w.std() / np.sqrt(n)
  ortho = z - w[:, None] * mu
  assert np.all(np.abs(ortho.mean(0)) < 4 * ortho.std(0) / np.sqrt(n))


def _quantile_derivative(w, kappa, m, h=1e-5):
  """∂w/∂κ at the fixed quantile of w: scipy quadrature of the marginal's smaller tail (so
  that far-out quantiles keep their digits) and root finding at ``κ ± h``. The density
  ``∝ e^{κ(t−1)}`` is < e^{-100} of its peak below ``1 − 100/κ``: the normaliser starts there."""
  dens = lambda t, k: np.exp(k * (t - 1)) * (1 - t * t) ** ((m - 3) / 2)
  integral = lambda a, b, k: quad(dens, a, b, args=(k,), epsabs=0, epsrel=1e-11, limit=200)[0]
  lower = lambda k: max(-1.0, 1.0 - 100.0 / k)
  if integral(w, 1, kappa) / integral(lower(kappa), 1, kappa) < 0.5:
    tail = lambda x, k: integral(x, 1, k) / integral(lower(k), 1, k)
  else:
    tail = lambda x, k: integral(-1, x, k) / integral(lower(k), 1, k)
  q = tail(w, kappa)
  root = lambda k: brentq(lambda x: tail(x, k) - q, -1, 1, xtol=1e-15)
  return (root(kappa + h) - root(kappa - h)) / (2 * h)


@pytest.mark.parametrize("m", [_slow(3), _slow(8)])  # ≈ 5.5 s each
def test_implicit_gradient_in_kappa_matches_the_quantile_derivative(x64, m):
  # The gradient of a sample's w in κ is the derivative of w at its fixed quantile: checked
  # sample by sample against scipy, on both of its integration branches (s_w = κ(1 − w) below
  # and above min(60, κ)).
  cases = [
    (1.0, 0.3),
    (1.0, -0.6),
    (5.0, 0.9),
    (5.0, 0.2),
    (5.0, -0.3),
    (20.0, -0.1),
    (30.0, 0.97),
    (200.0, 0.995),
  ]
  kappa = jnp.asarray([k for k, _ in cases])
  w = jnp.asarray([w for _, w in cases])
  got = jax.vmap(jax.grad(lambda k, w: vmf._implicit_w(m, w, k)), in_axes=(0, 0))(kappa, w)
  ref = [_quantile_derivative(wi, ki, m) for ki, wi in cases]
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-9)


@pytest.mark.slow
def test_pathwise_gradient_of_the_mean_resultant(x64):
  # d/dκ of the Monte Carlo mean of w (fixed key) against the closed-form dA_m/dκ: 0.1 %.
  m, n = 8, 200_000
  mu = jnp.zeros((n, m)).at[:, 0].set(1.0)
  for kappa in (1.0, 5.0, 30.0):
    mc = jax.grad(lambda k: jnp.mean(vmf.sample(jax.random.key(3), mu, jnp.full((n,), k))[:, 0]))
    exact = jax.grad(lambda k: vmf.mean_resultant(k, m))
    np.testing.assert_allclose(mc(kappa), exact(kappa), rtol=3e-3)


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="`nu` must be a finite order"):
    vmf.log_iv(-1.0, 2.0)
  with pytest.raises(ValueError, match="ambient dimension `m`"):
    vmf.kl_to_uniform(jnp.ones(3), 1)
  with pytest.raises(ValueError, match="m >= 3"):
    vmf.sample(jax.random.key(0), jnp.eye(2), jnp.ones(2))
  with pytest.raises(ValueError, match="`kappa` must have shape"):
    vmf.sample(jax.random.key(0), jnp.eye(4), jnp.ones(3))
