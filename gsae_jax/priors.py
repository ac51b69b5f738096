"""Latent priors: samplers of the target point cloud that the latents are transported onto.

Every sampler takes a `jax.random` key first and a static sample count `n`, and returns an
`[n, d]` float32 array. Samplers are jittable, not jitted: wrap them in `jax.jit` with `n` (and
`dim`) static. Argument errors (n <= 0, dim <= 0, ...) raise `ValueError` at call time, before
any tracing of array values.

The flower prior is the one of the Global Sinkhorn Autoencoder paper (Csiszárik, Kiss, Maga,
Matszangosz, Varga, 2024, §5), itself taken from Patrini et al., "Sinkhorn AutoEncoders"
(2019). The others (standard normal, uniform on the hypersphere, Dirichlet on the simplex,
uniform box, uniform unit square) are the priors of the Sinkhorn AutoEncoders and Genevay et
al. experiments.
"""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Callable

import jax
import jax.numpy as jnp

FLOWER_N_PETALS = 10
"""Number of Gaussian components ("petals") of the flower prior."""

FLOWER_RADIUS = 3.0
"""Distance of every petal mean from the origin."""

FLOWER_VARIANCES = (1.0, 0.01)
"""Variances of a petal along its radial and tangential directions (before rotation)."""

Sampler = Callable[[jax.Array, int], jax.Array]
"""A prior sampler: `(key, n) -> [n, d]` float32 samples."""


def _check_count(name: str, value: int) -> int:
  """Returns `value` as an int, raising `ValueError` unless it is a positive integer."""
  try:
    value = operator.index(value)
  except TypeError:
    raise ValueError(
      f"{name} must be a positive Python int (static under jit), got {value!r}"
    ) from None
  if value <= 0:
    raise ValueError(f"{name} must be a positive integer, got {value}")
  return value


def flower_angles() -> jax.Array:
  """Angles of the flower petals.

  Returns:
    `[10]` float32 array, `α_i = 2πi/10` for `i = 0, ..., 9`.
  """
  return 2.0 * jnp.pi * jnp.arange(FLOWER_N_PETALS, dtype=jnp.float32) / FLOWER_N_PETALS


def flower_means() -> jax.Array:
  """Means of the flower petals.

  Returns:
    `[10, 2]` float32 array, row i is `3·(cos α_i, sin α_i)`.
  """
  a = flower_angles()
  return FLOWER_RADIUS * jnp.stack([jnp.cos(a), jnp.sin(a)], axis=-1)


def flower_covariances() -> jax.Array:
  """Covariances of the flower petals.

  Returns:
    `[10, 2, 2]` float32 array, entry i is `R(α_i)·diag(1, 0.01)·R(α_i)ᵀ` with `R(α)` the
    rotation by α: variance 1 along the radius, 0.01 across it.
  """
  a = flower_angles()
  c, s = jnp.cos(a), jnp.sin(a)
  rot = jnp.stack([jnp.stack([c, -s], -1), jnp.stack([s, c], -1)], -2)  # [10, 2, 2]
  return rot @ jnp.diag(jnp.asarray(FLOWER_VARIANCES, jnp.float32)) @ jnp.swapaxes(rot, -1, -2)


def flower_with_labels(key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  """Stratified sample of the flower prior, with the petal each point was drawn from.

  The flower is the equal-weight mixture of 10 Gaussians in 2-D: petal i has mean
  `3·(cos α_i, sin α_i)` and covariance `R(α_i)·diag(1, 0.01)·R(α_i)ᵀ`, `α_i = 2πi/10`
  (GSAE paper §5; Patrini et al. 2019). As in the authors' sampler, the petal counts are
  fixed, not multinomial: each petal gets exactly `n // 10` points and the remaining
  `n % 10` points go one each to petals `0, ..., n % 10 − 1`. The points are then shuffled
  with `key`, so any prefix of the sample is an (approximately) unbiased mixture sample.

  Args:
    key: a `jax.random` key.
    n: number of points, a positive Python int (static under jit).

  Returns:
    A pair `(z, petal)`: `z` is `[n, 2]` float32 samples, `petal` is `[n]` int32 petal
    indices in `0..9`.
  """
  n = _check_count("n", n)
  key_perm, key_noise = jax.random.split(key)
  petal = jax.random.permutation(key_perm, jnp.arange(n, dtype=jnp.int32) % FLOWER_N_PETALS)
  # Sample in the petal's own frame (radial, tangential), then rotate by α: R·diag(σ)·ε has
  # covariance R·diag(σ²)·Rᵀ.
  std = jnp.sqrt(jnp.asarray(FLOWER_VARIANCES, jnp.float32))
  eps = jax.random.normal(key_noise, (n, 2), jnp.float32) * std
  a = flower_angles()[petal]
  c, s = jnp.cos(a), jnp.sin(a)
  radial = FLOWER_RADIUS + eps[:, 0]
  z = jnp.stack([c * radial - s * eps[:, 1], s * radial + c * eps[:, 1]], axis=-1)
  return z, petal


def flower(key: jax.Array, n: int) -> jax.Array:
  """Stratified, shuffled sample of the flower prior; see `flower_with_labels`.

  Args:
    key: a `jax.random` key.
    n: number of points, a positive Python int (static under jit).

  Returns:
    `[n, 2]` float32 samples: exactly `n // 10` per petal, the `n % 10` extra points on
    petals `0, ..., n % 10 − 1`.
  """
  return flower_with_labels(key, n)[0]


def standard_normal(key: jax.Array, n: int, dim: int) -> jax.Array:
  """Samples of the standard normal `N(0, I_dim)`.

  Args:
    key: a `jax.random` key.
    n: number of points (static).
    dim: dimension (static).

  Returns:
    `[n, dim]` float32 samples.
  """
  n, dim = _check_count("n", n), _check_count("dim", dim)
  return jax.random.normal(key, (n, dim), jnp.float32)


def hypersphere(key: jax.Array, n: int, dim: int) -> jax.Array:
  """Uniform samples on the unit sphere `S^{dim−1} ⊂ R^dim` (normalised Gaussians).

  Args:
    key: a `jax.random` key.
    n: number of points (static).
    dim: dimension of the ambient space (static); `dim = 1` gives ±1.

  Returns:
    `[n, dim]` float32 samples of unit Euclidean norm.
  """
  x = standard_normal(key, n, dim)
  # A Gaussian draw of exactly 0 has probability ~0 in float32; the floor only avoids 0/0.
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-30)


def uniform_box(
  key: jax.Array, n: int, dim: int, low: float = -1.0, high: float = 1.0
) -> jax.Array:
  """Uniform samples in the box `[low, high)^dim`.

  Args:
    key: a `jax.random` key.
    n: number of points (static).
    dim: dimension (static).
    low: lower bound of every coordinate.
    high: upper bound of every coordinate; must exceed `low`.

  Returns:
    `[n, dim]` float32 samples.
  """
  n, dim = _check_count("n", n), _check_count("dim", dim)
  if isinstance(low, int | float) and isinstance(high, int | float) and not low < high:
    raise ValueError(f"uniform_box needs low < high, got low={low}, high={high}")
  return jax.random.uniform(key, (n, dim), jnp.float32, minval=low, maxval=high)


def uniform_unit(key: jax.Array, n: int, dim: int) -> jax.Array:
  """Uniform samples in the unit cube `[0, 1)^dim` (Genevay et al.'s latent space).

  Args:
    key: a `jax.random` key.
    n: number of points (static).
    dim: dimension (static).

  Returns:
    `[n, dim]` float32 samples.
  """
  return uniform_box(key, n, dim, 0.0, 1.0)


def dirichlet(key: jax.Array, n: int, dim: int, alpha: float = 1.0) -> jax.Array:
  """Samples of the symmetric (or general) Dirichlet distribution on the simplex.

  Args:
    key: a `jax.random` key.
    n: number of points (static).
    dim: number of simplex coordinates (static).
    alpha: concentration, a positive scalar (symmetric Dirichlet) or a `[dim]` array.
      `alpha = 1` is uniform on the simplex. The mean is `alpha / sum(alpha)`.

  Returns:
    `[n, dim]` float32 samples, nonnegative, each row summing to 1.
  """
  n, dim = _check_count("n", n), _check_count("dim", dim)
  if isinstance(alpha, int | float) and not alpha > 0:
    raise ValueError(f"dirichlet alpha must be positive, got {alpha}")
  alpha = jnp.asarray(alpha, jnp.float32)
  if alpha.ndim > 1 or (alpha.ndim == 1 and alpha.shape[0] != dim):
    raise ValueError(f"dirichlet alpha must be a scalar or a [{dim}] array, got {alpha.shape}")
  alpha = jnp.broadcast_to(alpha, (dim,))
  return jax.random.dirichlet(key, alpha, (n,), jnp.float32)


_PRIORS: dict[str, Callable[..., jax.Array]] = {
  "flower": flower,
  "standard_normal": standard_normal,
  "hypersphere": hypersphere,
  "uniform_box": uniform_box,
  "uniform_unit": uniform_unit,
  "dirichlet": dirichlet,
}

PRIOR_NAMES = tuple(_PRIORS)
"""Names accepted by `get_prior`."""


def get_prior(name: str, **kwargs) -> Sampler:
  """Looks up a prior by name and binds its parameters.

  Args:
    name: one of `PRIOR_NAMES`: "flower", "standard_normal", "hypersphere",
      "uniform_box", "uniform_unit", "dirichlet".
    **kwargs: the sampler's parameters after `(key, n)`, e.g. `dim=8` or
      `dim=3, alpha=0.5`. "flower" takes none (it is 2-D; `dim=2` is accepted).

  Returns:
    A sampler `(key, n) -> [n, d]` float32, jittable with `n` static.

  Raises:
    ValueError: on an unknown name, a missing or unknown parameter, or an invalid value
      (checked now, not at the first call).
  """
  if name not in _PRIORS:
    raise ValueError(f"unknown prior {name!r}; valid names: {', '.join(PRIOR_NAMES)}")
  fn = _PRIORS[name]
  if name == "flower" and "dim" in kwargs:
    if kwargs.pop("dim") != 2:
      raise ValueError("the flower prior is 2-D; drop dim or pass dim=2")
  params = dict(list(inspect.signature(fn).parameters.items())[2:])  # after (key, n)
  unknown = sorted(set(kwargs) - set(params))
  if unknown:
    raise ValueError(f"prior {name!r} takes parameters {list(params)}, got unknown {unknown}")
  required = [p for p, spec in params.items() if spec.default is inspect.Parameter.empty]
  missing = [p for p in required if p not in kwargs]
  if missing:
    raise ValueError(f"prior {name!r} needs parameter(s) {missing}")
  sampler = functools.partial(fn, **kwargs)
  # Shape-only trace: runs every argument check now at no compute cost.
  jax.eval_shape(lambda key: sampler(key, 1), jax.random.key(0))
  return sampler


def prior_dim(sampler: Sampler) -> int:
  """Dimension `d` of the points a sampler returns (found by a shape-only trace)."""
  return jax.eval_shape(lambda key: sampler(key, 1), jax.random.key(0)).shape[-1]


__all__ = [
  "FLOWER_N_PETALS",
  "FLOWER_RADIUS",
  "FLOWER_VARIANCES",
  "PRIOR_NAMES",
  "Sampler",
  "dirichlet",
  "flower",
  "flower_angles",
  "flower_covariances",
  "flower_means",
  "flower_with_labels",
  "get_prior",
  "hypersphere",
  "prior_dim",
  "standard_normal",
  "uniform_box",
  "uniform_unit",
]
