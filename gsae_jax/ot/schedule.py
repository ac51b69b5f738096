"""The ε-annealing schedule of GeomLoss (``p = 2``), on the host and in-graph.

``ε = blur²``; the schedule for a problem of diameter ``D`` is

    [D²] + [exp(e) for e in arange(2 ln D, 2 ln blur, 2 ln scaling)] + [blur²]

(Feydy et al. 2019; GeomLoss ``scaling_parameters``), with ``D²`` appearing twice as in GeomLoss
(the initialisation and the first update). One deviation: ``D`` is taken as at least ``blur``,
so a cloud of zero diameter (all points equal) gets ``[blur², blur²]`` instead of ``ε = 0``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def center(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Translates both clouds so their joint bounding box is centred at 0.

  ``C = ½‖x − y‖²`` (and so every potential and gradient) is unchanged, but the float32
  exponents ``⟨x_i, y_j⟩ / ε`` stay small when the clouds sit far from the origin.
  """
  lo = jnp.minimum(jnp.min(x, axis=0), jnp.min(y, axis=0))
  hi = jnp.maximum(jnp.max(x, axis=0), jnp.max(y, axis=0))
  c = jax.lax.stop_gradient(0.5 * (lo + hi))
  return x - c, y - c


def bounding_box_diameter(x: jax.Array, y: jax.Array) -> jax.Array:
  """Length of the diagonal of the bounding box of ``x ∪ y`` (GeomLoss ``max_diameter``)."""
  lo = jnp.minimum(jnp.min(x, axis=0), jnp.min(y, axis=0))
  hi = jnp.maximum(jnp.max(x, axis=0), jnp.max(y, axis=0))
  return jnp.linalg.norm(hi - lo)


def largest_extent(x: jax.Array, y: jax.Array) -> jax.Array:
  """Widest side of the bounding box of ``x ∪ y``: a lower bound of the largest distance
  between two points, so a ``diameter`` below it is certainly too small."""
  lo = jnp.minimum(jnp.min(x, axis=0), jnp.min(y, axis=0))
  hi = jnp.maximum(jnp.max(x, axis=0), jnp.max(y, axis=0))
  return jnp.max(hi - lo)


def epsilon_schedule(diam: float, blur: float, scaling: float) -> np.ndarray:
  """GeomLoss's ε-annealing schedule for ``p = 2`` (float64, on the host).

  ``[D²] + [exp(e) for e in arange(2 ln D, 2 ln blur, 2 ln scaling)] + [blur²]`` with
  ``D = max(diam, blur)``.

  Args:
    diam: diameter of the problem (bounding-box diagonal, or a user bound).
    blur: final ``√ε``. scaling: ratio of ``blur`` between steps, in ``(0, 1)``.

  Returns:
    ``[k]`` float64 temperatures, non-increasing.
  """
  diam = max(float(diam), float(blur))
  mid = np.exp(np.arange(2 * np.log(diam), 2 * np.log(blur), 2 * np.log(scaling)))
  return np.concatenate([[diam**2], mid, [blur**2]])


def n_mid_steps(diam: jax.Array, blur: jax.Array, scaling: jax.Array) -> jax.Array:
  """In-graph ``len(arange(2 ln D, 2 ln blur, 2 ln scaling))`` (int32)."""
  start, stop, step = 2 * jnp.log(diam), 2 * jnp.log(blur), 2 * jnp.log(scaling)
  return jnp.maximum(jnp.ceil((stop - start) / step), 0).astype(jnp.int32)


def traced_epsilon(
  k: jax.Array, diam: jax.Array, n_mid: jax.Array, blur: jax.Array, scaling: jax.Array
) -> jax.Array:
  """ε of step ``k`` of :func:`epsilon_schedule`, in-graph (for traced ``diam``, ``blur``)."""
  mid = jnp.exp(2 * jnp.log(diam) + (k - 1).astype(diam.dtype) * (2 * jnp.log(scaling)))
  return jnp.where(k == 0, diam**2, jnp.where(k <= n_mid, mid, blur**2)).astype(diam.dtype)
