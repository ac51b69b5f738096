"""Prior samplers against closed-form moments, exact stratification, jit and argument errors.

Tolerances are about 4 standard errors of the estimate at the sample size used, so the
(fixed-key, deterministic) tests are not fragile to a change of key.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsae_jax import priors

KEY = jax.random.key(0)

# The library samplers are jittable, not jitted; jitting here (n, dim static) also keeps the
# suite fast: eager mode compiles every primitive separately for every new shape.
flower_with_labels = jax.jit(priors.flower_with_labels, static_argnums=1)
standard_normal = jax.jit(priors.standard_normal, static_argnums=(1, 2))
hypersphere = jax.jit(priors.hypersphere, static_argnums=(1, 2))
uniform_box = jax.jit(priors.uniform_box, static_argnums=(1, 2))
uniform_unit = jax.jit(priors.uniform_unit, static_argnums=(1, 2))
dirichlet = jax.jit(priors.dirichlet, static_argnums=(1, 2))


def _moments(x):
  x = np.asarray(x, np.float64)
  return x.mean(0), np.cov(x, rowvar=False)


# ---------------------------------------------------------------- flower


def test_flower_constants_and_closed_forms():
  assert priors.FLOWER_N_PETALS == 10
  assert priors.FLOWER_RADIUS == 3.0
  assert priors.FLOWER_VARIANCES == (1.0, 0.01)
  a = 2 * np.pi * np.arange(10) / 10
  np.testing.assert_allclose(
    priors.flower_means(), 3 * np.stack([np.cos(a), np.sin(a)], -1), rtol=0, atol=1e-5
  )
  # The paper's explicit covariance entries (GSAE §5).
  c, s = np.cos(a), np.sin(a)
  paper = np.stack(
    [
      np.stack([c**2 + s**2 / 100, c * s * (1 - 1 / 100)], -1),
      np.stack([c * s * (1 - 1 / 100), s**2 + c**2 / 100], -1),
    ],
    -2,
  )
  np.testing.assert_allclose(priors.flower_covariances(), paper, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", [3, 100_003])
def test_flower_exact_petal_counts(n):
  z, petal = flower_with_labels(KEY, n)
  assert z.shape == (n, 2) and z.dtype == jnp.float32
  assert petal.shape == (n,) and petal.dtype == jnp.int32
  expected = np.full(10, n // 10) + (np.arange(10) < n % 10)
  np.testing.assert_array_equal(np.bincount(np.asarray(petal), minlength=10), expected)


def test_flower_is_shuffled_and_matches_labelled_sampler():
  z, petal = flower_with_labels(KEY, 100_003)  # same shape as above: no new compile
  np.testing.assert_array_equal(jax.jit(priors.flower, static_argnums=1)(KEY, 100_003), z)
  assert not np.array_equal(np.asarray(petal), np.arange(100_003) % 10)
  # Any prefix is close to balanced (shuffled, not blocked by petal).
  assert np.bincount(np.asarray(petal[:100]), minlength=10).min() >= 3


def test_flower_moments():
  z, petal = flower_with_labels(KEY, 100_003)  # 10 000 or 10 001 per petal
  z, petal = np.asarray(z, np.float64), np.asarray(petal)
  # Stratified: the mean of the mixture is exactly 0 up to within-petal noise (var 0.5/n).
  np.testing.assert_allclose(z.mean(0), 0.0, rtol=0, atol=0.015)
  means, covs = np.asarray(priors.flower_means()), np.asarray(priors.flower_covariances())
  for i in range(10):
    zi = z[petal == i]
    m, c = _moments(zi)
    np.testing.assert_allclose(m, means[i], rtol=0, atol=0.04)  # se 0.01
    np.testing.assert_allclose(c, covs[i], rtol=0, atol=0.06)  # se 0.014
    # In the petal's frame the variances are (1, 0.01) and uncorrelated.
    a = 2 * np.pi * i / 10
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    local = (zi - means[i]) @ rot  # rows R^T (z - mean)
    np.testing.assert_allclose(local.var(0), priors.FLOWER_VARIANCES, rtol=0.06, atol=0)
    corr = np.corrcoef(local, rowvar=False)[0, 1]
    assert abs(corr) < 0.04  # se 0.01


# ---------------------------------------------------------------- the other priors


def test_standard_normal_moments():
  x = standard_normal(KEY, 40_000, 3)
  assert x.shape == (40_000, 3) and x.dtype == jnp.float32
  m, c = _moments(x)
  np.testing.assert_allclose(m, 0.0, rtol=0, atol=0.02)  # se 0.005
  np.testing.assert_allclose(c, np.eye(3), rtol=0, atol=0.03)  # se 0.007


@pytest.mark.parametrize("dim", [1, 4])
def test_hypersphere_norms_and_moments(dim):
  x = hypersphere(KEY, 20_000, dim)
  assert x.shape == (20_000, dim) and x.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(x, axis=-1), 1.0, rtol=1e-6, atol=1e-6)
  x = np.asarray(x, np.float64)
  np.testing.assert_allclose(x.mean(0), 0.0, rtol=0, atol=0.03)  # se <= 0.007
  # Uniform on the sphere: E[x x^T] = I / dim.
  np.testing.assert_allclose(x.T @ x / len(x), np.eye(dim) / dim, rtol=0, atol=0.02)


@pytest.mark.parametrize("low, high", [(-1.0, 1.0), (2.0, 5.0)])
def test_uniform_box_moments(low, high):
  x = uniform_box(KEY, 40_000, 2, low, high)
  assert x.dtype == jnp.float32
  assert float(x.min()) >= low and float(x.max()) < high
  m, c = _moments(x)
  width = high - low
  np.testing.assert_allclose(m, (low + high) / 2, rtol=0, atol=0.02 * width)  # se .0014 w
  np.testing.assert_allclose(c, np.eye(2) * width**2 / 12, rtol=0, atol=0.004 * width**2)


def test_uniform_unit_moments():
  x = uniform_unit(KEY, 40_000, 2)
  assert float(x.min()) >= 0.0 and float(x.max()) < 1.0
  m, c = _moments(x)
  np.testing.assert_allclose(m, 0.5, rtol=0, atol=0.01)
  np.testing.assert_allclose(c, np.eye(2) / 12, rtol=0, atol=0.004)


@pytest.mark.parametrize("alpha", [0.3, (0.5, 1.0, 2.0)])
@pytest.mark.slow
def test_dirichlet_moments(alpha):
  # alpha passed as a [3] array in both cases, so the (slow to compile) gamma sampler compiles
  # once; the scalar-alpha path is covered by test_get_prior_shapes.
  alpha = np.broadcast_to(np.asarray(alpha, np.float32), (3,))
  x = dirichlet(KEY, 40_000, 3, jnp.asarray(alpha))
  assert x.shape == (40_000, 3) and x.dtype == jnp.float32
  assert float(x.min()) >= 0.0
  np.testing.assert_allclose(x.sum(-1), 1.0, rtol=0, atol=1e-5)
  a = alpha.astype(np.float64)
  a0 = a.sum()
  m, c = _moments(x)
  np.testing.assert_allclose(m, a / a0, rtol=0, atol=0.01)  # se <= 0.0025
  var = a * (a0 - a) / (a0**2 * (a0 + 1))
  np.testing.assert_allclose(np.diag(c), var, rtol=0.06, atol=0)  # rel. se <= 1.5%


# ---------------------------------------------------------------- jit, keys, lookup, errors

SAMPLERS = [
  ("flower", {}, 2),
  ("standard_normal", {"dim": 3}, 3),
  ("hypersphere", {"dim": 3}, 3),
  ("uniform_box", {"dim": 3, "low": -2.0, "high": 0.5}, 3),
  ("uniform_unit", {"dim": 2}, 2),
  ("dirichlet", {"dim": 4, "alpha": 0.5}, 4),
]


@pytest.mark.parametrize("name, kwargs, dim", SAMPLERS)
def test_get_prior_shapes(name, kwargs, dim):
  # Shape-only trace: the sampling itself is covered (jitted) by the moment tests above.
  sampler = priors.get_prior(name, **kwargs)
  assert priors.prior_dim(sampler) == dim
  out = jax.eval_shape(lambda key: sampler(key, 64), KEY)
  assert out.shape == (64, dim) and out.dtype == jnp.float32


def test_get_prior_sampler_is_jittable_and_deterministic():
  sampler = jax.jit(priors.get_prior("uniform_box", dim=2, low=2.0, high=5.0), static_argnums=1)
  x = sampler(KEY, 40_000)
  np.testing.assert_array_equal(x, uniform_box(KEY, 40_000, 2, 2.0, 5.0))
  np.testing.assert_array_equal(sampler(KEY, 40_000), x)
  assert not np.allclose(sampler(jax.random.key(1), 40_000), x)


def test_get_prior_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match="valid names") as err:
    priors.get_prior("gaussian")
  for name in priors.PRIOR_NAMES:
    assert name in str(err.value)


@pytest.mark.parametrize(
  "name, kwargs, match",
  [
    ("standard_normal", {}, "needs parameter"),
    ("hypersphere", {"dim": 0}, "dim must be a positive"),
    ("dirichlet", {"dim": 3, "beta": 1.0}, "unknown"),
    ("dirichlet", {"dim": 3, "alpha": 0.0}, "alpha must be positive"),
    ("dirichlet", {"dim": 3, "alpha": (1.0, 2.0)}, r"\[3\] array"),
    ("uniform_box", {"dim": 2, "low": 1.0, "high": 1.0}, "low < high"),
    ("flower", {"dim": 3}, "2-D"),
  ],
)
def test_get_prior_bad_parameters(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    priors.get_prior(name, **kwargs)


@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_bad_counts_raise(n):
  with pytest.raises(ValueError, match="n must be a positive"):
    priors.flower(KEY, n)
  with pytest.raises(ValueError, match="n must be a positive"):
    priors.standard_normal(KEY, n, 2)
  with pytest.raises(ValueError, match="dim must be a positive"):
    priors.uniform_unit(KEY, 4, n)
