"""Grid clustering of a point cloud: the coarse scale of the multiscale backend.

GeomLoss's multiscale scheme (Feydy et al. 2019; ``geomloss`` ``_legacy/sinkhorn_samples.py``,
``kernel_truncation``/``clusterize``) runs the first, large-ε levels of the annealing on the
centroids of voxels of a grid, each weighted by the mass of its points, then extrapolates the
potentials to the points. Here the grid is a static ``K^d`` lattice over the joint bounding box
(empty cells have zero mass, log-weight ``−inf``), so every shape is known at trace time.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Grid(NamedTuple):
  """A ``K^d`` lattice of cubic cells of side ``cell`` whose lower corner is ``lo``."""

  lo: jax.Array  # [d]
  cell: jax.Array  # scalar side length
  per_axis: int  # K (static)


def make_grid(x: jax.Array, y: jax.Array, per_axis: int) -> Grid:
  """The cubic grid of ``per_axis^d`` cells covering the joint bounding box of ``x ∪ y``.

  The side is the box's widest extent over ``per_axis`` (at least a tiny positive number, so a
  cloud of zero extent maps to one cell).
  """
  lo = jnp.minimum(jnp.min(x, axis=0), jnp.min(y, axis=0))
  hi = jnp.maximum(jnp.max(x, axis=0), jnp.max(y, axis=0))
  extent = jnp.max(hi - lo)
  cell = jnp.maximum(extent / per_axis, jnp.finfo(x.dtype).tiny)
  return Grid(jax.lax.stop_gradient(lo), jax.lax.stop_gradient(cell), per_axis)


def cell_index(grid: Grid, pts: jax.Array) -> jax.Array:
  """``[n]`` int32 flat index of the cell of each point (row-major over the ``d`` axes)."""
  k = grid.per_axis
  ijk = jnp.clip(jnp.floor((pts - grid.lo) / grid.cell).astype(jnp.int32), 0, k - 1)
  strides = k ** jnp.arange(pts.shape[1] - 1, -1, -1, dtype=jnp.int32)
  return ijk @ strides


def cluster(grid: Grid, pts: jax.Array, log_w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mass-weighted centroids and log-masses of the grid's cells.

  Args:
    grid: from :func:`make_grid`. pts: ``[n, d]`` points. log_w: ``[n]`` log-weights.

  Returns:
    ``(centroids [K^d, d], log_mass [K^d])``: ``centroid_c = Σ_{i∈c} w_i x_i / Σ_{i∈c} w_i``
    and ``log Σ_{i∈c} w_i``; an empty cell has log-mass ``−inf`` and its centre as centroid
    (finite, so that its zero weight masks it exactly in a softmin).
  """
  k, d = grid.per_axis, pts.shape[1]
  n_cells = k**d
  idx = cell_index(grid, pts)
  # Weights relative to the largest, so that tiny masses do not underflow before the log.
  shift = jnp.max(log_w)
  w = jnp.exp(log_w - shift)
  mass = jax.ops.segment_sum(w, idx, num_segments=n_cells)
  moment = jax.ops.segment_sum(w[:, None] * pts, idx, num_segments=n_cells)
  flat = jnp.arange(n_cells, dtype=jnp.int32)
  digits = (flat[:, None] // (k ** jnp.arange(d - 1, -1, -1, dtype=jnp.int32))) % k
  centres = grid.lo + (digits.astype(pts.dtype) + 0.5) * grid.cell
  full = mass > 0
  centroids = jnp.where(full[:, None], moment / jnp.where(full, mass, 1.0)[:, None], centres)
  log_mass = jnp.where(full, jnp.log(jnp.where(full, mass, 1.0)) + shift, -jnp.inf)
  return centroids, log_mass
