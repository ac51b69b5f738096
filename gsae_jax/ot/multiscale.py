"""Block-sparse, truncated softmin for low-dimensional clouds (the multiscale kernel).

Convention (as :mod:`gsae_jax.ot.softmin`, GeomLoss ``SamplesLoss("sinkhorn", p=2)``): cost
``C(x, y) = ½‖x − y‖²``, temperature ``ε``, and the softmin of *true* potentials

    f̃_i = −ε · log Σ_j exp( log b_j + (g_j − C(x_i, y_j)) / ε ).

In dimension ``d ≤ 3`` almost every pair ``(i, j)`` carries a negligible share of row ``i``'s
mass at small ``ε`` (MULTISCALE.md §1). This module evaluates the softmin on a sparse set of
*tiles* only, following the multiscale backend of GeomLoss (Feydy et al. 2019, "Interpolating
between optimal transport and MMD using Sinkhorn divergences"; ``geomloss`` ``multiscale``) in the
static-shape form of MULTISCALE.md §3:

1. :func:`make_blocks` orders a cloud along a Hilbert curve (:func:`hilbert_permutation`), pads
   it with zero-mass points to ``nb·B`` and cuts it into ``nb`` blocks of ``B`` neighbours, each
   with its bounding box.
2. :func:`keep_tiles` keeps the tile ``(I, J)`` (row block ``I`` × column block ``J``) unless an
   upper bound proves that it carries less than ``e^{−T}`` of every row's mass, given the
   current potentials (never a distance-only cut-off). :func:`tile_list` flattens the kept
   tiles into a static-capacity list and reports their true count, so overflow is detectable.
3. :func:`block_sparse_softmin` computes the softmin over the listed tiles: ``B × B`` logits per
   tile, a per-row max and sum of exponentials, merged across a row block's tiles by an online
   log-sum-exp, a chunk of tiles at a time. Its custom VJP recomputes the tiles, so both passes
   hold ``O(n + m)`` memory plus one chunk of logits.

Truncation bound (proved in :func:`keep_tiles`): with ``f`` the row potentials given to the
test and ``N_I`` the number of tiles dropped from row block ``I``, every row ``i`` of ``I`` gets

    0 ≤ f̃_i^{kept} − f̃_i ≤ −ε · log(1 − δ_i),   δ_i = N_I · e^{−T} · e^{(f̃_i − f_i)/ε},

i.e. ``≈ ε · N_I · e^{−T}`` at the fixed point ``f = f̃`` (when ``δ_i < 1``).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gsae_jax.ot import validation

# Tiles per chunk are sized so that one chunk holds about this many logits (4 MiB in float32,
# the L3-resident block size of the dense kernel, gsae_jax.ot.softmin; chunk sizes measured in
# BUILD_NOTES.md, "Multiscale backend").
_CHUNK_ENTRIES = 1 << 20
# MULTISCALE.md §1 (measured, flower vs flower, converged potentials): T = 10 keeps 1.4 % of
# pairs and moves an f-update by ≤ 2e-10, below float32 resolution of the potentials.
DEFAULT_TRUNCATE = 10.0
# Hilbert keys are uint32: d · bits ≤ 32.
_MAX_BITS = {1: 32, 2: 16, 3: 10}


class Blocks(NamedTuple):
  """A cloud sorted along a Hilbert curve and cut into ``nb`` blocks of ``B`` points.

  Sorted position ``k = I·B + r`` holds the original point ``perm[k]`` for ``k < n``; positions
  ``k ≥ n`` are padding (a copy of the last point, log-weight ``−inf``, i.e. zero mass).

  Attributes:
    points: ``[nb, B, d]`` sorted, padded points.
    log_weights: ``[nb, B]`` log-masses ``log b``; ``−inf`` on padding.
    valid: ``[nb, B]`` bool, false on padding.
    perm: ``[n]`` int32 original index of each sorted point.
    lo: ``[nb, d]`` lower corner of each block's bounding box (valid points only).
    hi: ``[nb, d]`` upper corner.
  """

  points: jax.Array
  log_weights: jax.Array
  valid: jax.Array
  perm: jax.Array
  lo: jax.Array
  hi: jax.Array


class TileList(NamedTuple):
  """Kept ``(row block, column block)`` tiles, sorted by row block, in a static capacity.

  Attributes:
    rows: ``[capacity]`` int32 row-block ids, non-decreasing; padding entries hold ``nbx``.
    cols: ``[capacity]`` int32 column-block ids; padding entries hold ``nby``.
    count: int32 scalar, the number of kept tiles. ``count > capacity`` means the list
      overflowed: tiles were lost and the softmin is wrong (see :func:`overflowed`).
  """

  rows: jax.Array
  cols: jax.Array
  count: jax.Array


# --------------------------------------------------------------------------------------------
# Hilbert order


def _check_bits(d: int, bits: int | None) -> int:
  if d < 1 or d > 3:
    raise ValueError(f"The multiscale kernel supports dimension d = 1, 2 or 3, got d = {d}.")
  if bits is None:
    return _MAX_BITS[d] if d > 1 else 16
  if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= _MAX_BITS[d]:
    raise ValueError(f"`bits` must be an int in [1, {_MAX_BITS[d]}] for d = {d}, got {bits!r}.")
  return bits


def hilbert_index(q: jax.Array, bits: int) -> jax.Array:
  """Index along the Hilbert curve of integer grid points (Skilling 2004, "Programming the
  Hilbert curve", ``AxestoTranspose`` then bit interleaving).

  Consecutive indices are grid cells at unit L1 distance, which is why blocks of consecutive
  points have small bounding boxes (Morton order jumps; MULTISCALE.md §3.1). Branch-free and
  jittable: the loops below run over the static ``bits`` and ``d``, not over data.

  Args:
    q: ``[n, d]`` integer coordinates in ``[0, 2^bits)``, ``d = 2`` or ``3``.
    bits: bits per coordinate (static), ``d · bits ≤ 32``.

  Returns:
    ``[n]`` uint32 Hilbert index in ``[0, 2^{d·bits})``.
  """
  d = q.shape[1]
  if d * bits > 32:
    raise ValueError(f"`bits` = {bits} too large for d = {d}: need d · bits ≤ 32.")
  xs = [q[:, k].astype(jnp.uint32) for k in range(d)]
  # Inverse undo of the excess work of the Gray code (Skilling's first loop).
  bit = 1 << (bits - 1)
  while bit > 1:
    low = jnp.uint32(bit - 1)
    for i in range(d):
      on = (xs[i] & jnp.uint32(bit)) != 0
      if i == 0:
        xs[0] = jnp.where(on, xs[0] ^ low, xs[0])
      else:
        t = (xs[0] ^ xs[i]) & low
        xs[0], xs[i] = jnp.where(on, xs[0] ^ low, xs[0] ^ t), jnp.where(on, xs[i], xs[i] ^ t)
    bit >>= 1
  # Gray encode.
  for i in range(1, d):
    xs[i] = xs[i] ^ xs[i - 1]
  t = jnp.zeros_like(xs[0])
  bit = 1 << (bits - 1)
  while bit > 1:
    t = jnp.where((xs[d - 1] & jnp.uint32(bit)) != 0, t ^ jnp.uint32(bit - 1), t)
    bit >>= 1
  xs = [x ^ t for x in xs]
  # The "transposed" index: bit b of axis 0, 1, .., d − 1, from the top bit down.
  key = jnp.zeros_like(xs[0])
  for b in range(bits - 1, -1, -1):
    for i in range(d):
      key = (key << 1) | ((xs[i] >> b) & jnp.uint32(1))
  return key


def hilbert_permutation(
  points: jax.Array, lo: jax.Array | None = None, hi: jax.Array | None = None, bits=None
) -> jax.Array:
  """In-graph order of points along a Hilbert curve of their quantised coordinates.

  The points (gradients stopped) are quantised on an isotropic grid of ``2^bits`` cells per axis
  spanning the cube of side ``max_k(hi_k − lo_k)`` at ``lo``; points outside ``[lo, hi]`` are
  clipped to the border cells. Ties are broken by the original index (stable sort). In ``d = 1``
  this is a plain sort of the coordinate.

  Args:
    points: ``[n, d]`` points, ``d ≤ 3``; may be traced.
    lo: ``[d]`` lower corner of the grid (default: the points' minimum).
    hi: ``[d]`` upper corner (default: the points' maximum).
    bits: bits per axis (static; default 16 for ``d = 2``, 10 for ``d = 3``).

  Returns:
    ``[n]`` int32 permutation: ``points[perm]`` is in Hilbert order.
  """
  points = validation.as_array("points", points)
  if points.ndim != 2:
    raise ValueError(f"`points` must be a [n, d] array, got shape {points.shape}.")
  d = points.shape[1]
  bits = _check_bits(d, bits)
  p = jax.lax.stop_gradient(points)
  if d == 1:
    return jnp.argsort(p[:, 0], stable=True).astype(jnp.int32)
  lo = jnp.min(p, axis=0) if lo is None else jax.lax.stop_gradient(jnp.asarray(lo, p.dtype))
  hi = jnp.max(p, axis=0) if hi is None else jax.lax.stop_gradient(jnp.asarray(hi, p.dtype))
  side = jnp.max(hi - lo)
  scale = jnp.where(side > 0, (2.0**bits) / jnp.where(side > 0, side, 1.0), 0.0)
  q = jnp.clip(jnp.floor((p - lo) * scale), 0, 2**bits - 1).astype(jnp.uint32)
  return jnp.argsort(hilbert_index(q, bits), stable=True).astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# Blocks


def make_blocks(
  points: jax.Array,
  log_weights: jax.Array | None,
  block_size: int,
  lo: jax.Array | None = None,
  hi: jax.Array | None = None,
  bits: int | None = None,
  perm: jax.Array | None = None,
  valid: jax.Array | None = None,
) -> Blocks:
  """Sorts a cloud along its Hilbert curve and cuts it into blocks of ``block_size`` points.

  The cloud is padded to ``nb·B`` points (``nb = ⌈n / B⌉``) with copies of its last sorted point
  whose log-weight is ``−inf`` (zero mass), so only the last block holds padding and every block
  holds at least one valid point. Differentiable in ``points`` and ``log_weights`` (a gather);
  the order and the boxes are computed on stopped gradients.

  Args:
    points: ``[n, d]`` points, ``d ≤ 3``; may be traced.
    log_weights: ``[n]`` log-masses ``log b`` (``−inf`` allowed), or ``None`` for ``−log n``.
    block_size: ``B``, points per block (static).
    lo: optional ``[d]`` grid corner for :func:`hilbert_permutation`.
    hi: optional ``[d]`` grid corner.
    bits: optional Hilbert grid resolution per axis.
    perm: optional ``[n]`` order to use instead of the Hilbert order (e.g. grid cells sorted
      by their own Hilbert index, :mod:`gsae_jax.ot.multiscale_divergence`).
    valid: optional ``[n]`` bool: points marked false are treated as padding (not computed as
      rows, no tile of their own, outside the boxes); default all true.

  Returns:
    :class:`Blocks`.
  """
  points = validation.as_array("points", points)
  if points.ndim != 2 or points.shape[0] == 0:
    raise ValueError(f"`points` must be a non-empty [n, d] array, got shape {points.shape}.")
  n, d = points.shape
  _check_bits(d, bits)
  bs = validation.check_count("block_size", block_size)
  dtype = validation.working_dtype(points.dtype)
  points = points.astype(dtype)
  if log_weights is None:
    log_weights = jnp.full((n,), -math.log(n), dtype)
  log_weights = validation.as_array("log_weights", log_weights).astype(dtype)
  if log_weights.shape != (n,):
    raise ValueError(f"`log_weights` must be a [{n}] vector, got shape {log_weights.shape}.")
  nb = -(-n // bs)
  pad = nb * bs - n
  if perm is None:
    perm = hilbert_permutation(points, lo, hi, bits)
  elif perm.shape != (n,):
    raise ValueError(f"`perm` must be a [{n}] permutation, got shape {perm.shape}.")
  perm = perm.astype(jnp.int32)
  pts = points[perm]
  lw = log_weights[perm]
  if pad:
    pts = jnp.concatenate([pts, jnp.broadcast_to(pts[-1:], (pad, d))])
    lw = jnp.concatenate([lw, jnp.full((pad,), -jnp.inf, dtype)])
  inside = jnp.arange(nb * bs) < n
  if valid is not None:
    if valid.shape != (n,):
      raise ValueError(f"`valid` must be a [{n}] bool vector, got shape {valid.shape}.")
    inside = inside & jnp.concatenate([valid[perm], jnp.zeros((pad,), bool)])
  valid = inside.reshape(nb, bs)
  pts = pts.reshape(nb, bs, d)
  stat = jax.lax.stop_gradient(pts)
  lo_b = jnp.min(jnp.where(valid[..., None], stat, jnp.inf), axis=1)
  hi_b = jnp.max(jnp.where(valid[..., None], stat, -jnp.inf), axis=1)
  # A block without a valid point gets the box of its first point (finite, never kept).
  some = jnp.any(valid, axis=1)[:, None]
  lo_b, hi_b = jnp.where(some, lo_b, stat[:, 0]), jnp.where(some, hi_b, stat[:, 0])
  return Blocks(pts, lw.reshape(nb, bs), valid, perm, lo_b, hi_b)


def to_blocks(blocks: Blocks, values: jax.Array, fill=0.0) -> jax.Array:
  """Per-point values in the original order ``[n, ...]`` → block layout ``[nb, B, ...]``.

  Padding entries get ``fill``. Differentiable (a gather).
  """
  nb, bs = blocks.valid.shape
  values = jnp.asarray(values)
  v = values[blocks.perm]
  pad = nb * bs - v.shape[0]
  if pad:
    v = jnp.concatenate([v, jnp.full((pad,) + v.shape[1:], fill, v.dtype)])
  return v.reshape((nb, bs) + v.shape[1:])


def from_blocks(blocks: Blocks, values: jax.Array) -> jax.Array:
  """Block layout ``[nb, B, ...]`` → original order ``[n, ...]`` (padding dropped).

  Scatters sorted entry ``k`` back to ``perm[k]``; differentiable (a scatter).
  """
  n = blocks.perm.shape[0]
  flat = values.reshape((-1,) + values.shape[2:])[:n]
  return jnp.zeros_like(flat).at[blocks.perm].set(flat, unique_indices=True)


# --------------------------------------------------------------------------------------------
# Tile selection


def _lse_last(h: jax.Array) -> jax.Array:
  """Log-sum-exp over the last axis; ``−inf`` where all entries are ``−inf``."""
  mx = jnp.max(h, axis=-1)
  safe = jnp.where(jnp.isfinite(mx), mx, 0.0)
  return safe + jnp.log(jnp.sum(jnp.exp(h - safe[..., None]), axis=-1))


def _block_frames(blocks: Blocks, v: jax.Array):
  """Per block: box centre ``c [nb, d]``, half-widths ``r [nb, d]``, offsets ``u = p − c``
  ``[nb, B, d]`` (``|u_k| ≤ r_k`` on valid points) and a slope ``a [nb, d]`` of
  ``v − ½‖u‖²`` (ridge-regularised least squares over the valid, finite entries).

  Any slope keeps the bounds of :func:`tile_log_bounds` valid; a good one makes them tight:
  near the fixed point ``f − ½‖x‖²`` is minus a convex Brenier potential, so its residual
  after the slope is small and non-positive around the block.
  """
  c = 0.5 * (blocks.lo + blocks.hi)
  r = 0.5 * (blocks.hi - blocks.lo)
  u = jax.lax.stop_gradient(blocks.points) - c[:, None, :]
  v = v - 0.5 * jnp.sum(u * u, axis=-1)
  ok = blocks.valid & jnp.isfinite(v)
  w = ok.astype(v.dtype)
  cnt = jnp.maximum(jnp.sum(w, axis=1), 1.0)
  du = w[..., None] * (u - (jnp.sum(w[..., None] * u, axis=1) / cnt[:, None])[:, None, :])
  dv = jnp.where(ok, v - (jnp.sum(jnp.where(ok, v, 0.0), axis=1) / cnt)[:, None], 0.0)
  cov = jnp.einsum("nbi,nbj->nij", du, du)
  d = u.shape[-1]
  ridge = 1e-6 * jnp.trace(cov, axis1=1, axis2=2) / d + jnp.finfo(v.dtype).tiny
  lhs = cov + ridge[:, None, None] * jnp.eye(d, dtype=v.dtype)
  a = jnp.linalg.solve(lhs, jnp.einsum("nbi,nb->ni", du, dv)[..., None])[..., 0]
  return c, r, u, jnp.where(jnp.isfinite(a), a, 0.0)


def _map_blocks(fn, n_blocks: int, per_block: int):
  """``lax.map`` of ``fn(ids [k]) -> [k, ...]`` over chunks of block ids, about 2^20 entries of
  ``per_block`` each per chunk; ids past ``n_blocks`` are clipped and their rows dropped."""
  k = max(1, min(n_blocks, _CHUNK_ENTRIES // max(per_block, 1)))
  ids = jnp.minimum(jnp.arange(-(-n_blocks // k) * k), n_blocks - 1).reshape(-1, k)
  out = jax.lax.map(fn, ids)
  return out.reshape((-1,) + out.shape[2:])[:n_blocks]


def tile_log_bounds(
  bx: Blocks, by: Blocks, f_blocks: jax.Array, g_blocks: jax.Array, eps
) -> jax.Array:
  """Upper bound ``U_IJ ≥ max_{i∈I} [f_i/ε + log S_iJ]``, ``S_iJ = Σ_{j∈J} exp(log b_j +
  (g_j − C_ij)/ε)``: the log of the largest share of a row's mass the tile can hold when ``f``
  is the softmin of ``g`` (at the fixed point ``Σ_J S_iJ = e^{−f_i/ε}``).

  The minimum of three rigorous bounds. Notation: box centres ``c``, half-widths ``r`` (row
  blocks) and ``ρ`` (column blocks), offsets ``u_i = x_i − c_I`` (``|u_ik| ≤ r_Ik``) and
  ``v_j = y_j − c_J``; ``a_I``, ``β_J`` are per-block slopes of ``f − ½‖u‖²`` and
  ``g − ½‖v‖²`` (any slopes keep the bounds valid; least squares make them tight).

  1. **Box** (MULTISCALE.md §3.3), ``O(nbx·nby)``: ``C_ij ≥ ½ dist²(box_I, box_J)``, so
     ``U ≤ max_I f/ε + LSE_{j∈J}(log b_j + g_j/ε) − ½ dist²(box_I, box_J)/ε``.
  2. **Row block vs column point**, ``O(nbx·m)``: with ``w_j = c_I − y_j``, exactly
     ``C_ij = ½‖w_j‖² + ⟨w_j, u_i⟩ + ½‖u_i‖²``, hence
     ``f_i − C_ij ≤ F_I + Σ_k |a_Ik − w_jk| r_Ik − ½‖w_j‖²`` with
     ``F_I = max_{i∈I}(f_i − ½‖u_i‖² − ⟨a_I, u_i⟩)``, and
     ``U ≤ LSE_{j∈J}(log b_j + (g_j + F_I + Σ_k |a_Ik − w_jk| r_Ik − ½‖w_j‖²)/ε)``.
  3. **Row point vs column block**, ``O(n·nby)``: with ``z_i = x_i − c_J``,
     ``g_j − C_ij ≤ ĝ_j + Σ_k |β_Jk + z_ik| ρ_Jk − ½‖z_i‖²``, ``ĝ_j = g_j − ½‖v_j‖² − ⟨β_J, v_j⟩``,
     and ``U ≤ max_{i∈I} [f_i + Σ_k |β_Jk + z_ik| ρ_Jk − ½‖z_i‖²]/ε + LSE_{j∈J}(log b_j + ĝ_j/ε)``.

  The box bound loses ``≈ (|∇f| r + |Δ| (r + ρ))/ε`` to the linear variation of ``f`` and of
  ``C`` across a box; bounds 2 and 3 cancel it (``a_I ≈ w_j`` and ``β_J ≈ −z_i`` on relevant
  pairs) and lose only ``r·(distance in y)`` resp. ``ρ·(distance in x)``. Measured at T = 10,
  converged potentials, n ≈ 2 000, B = 32, ε = 0.05² (kept fraction of pairs): flower vs
  0.5·Gaussian, box 86 %, bound 2 or 3 alone 23–24 %, the minimum 18 %, an exact per-tile test
  13 %; flower vs flower, box 15 %, minimum 11.5 %, exact 8.6 %. Bounds 2 and 3 evaluate
  ``nbx·m + n·nby`` point-block pairs (``2/B`` of a dense pass) in a chunked ``lax.map``;
  :func:`select_tiles` evaluates them on the box bound's candidate tiles only.

  Args:
    bx: row :class:`Blocks` (``nbx`` blocks).
    by: column :class:`Blocks` (``nby`` blocks).
    f_blocks: ``[nbx, B_x]`` row potentials in ``bx``'s layout (padding ignored).
    g_blocks: ``[nby, B_y]`` column potentials in ``by``'s layout (padding ignored).
    eps: positive scalar temperature.

  Returns:
    ``[nbx, nby]`` bounds; ``−inf`` for a massless column block, possibly ``NaN`` where the
    potentials are not finite (:func:`keep_tiles` keeps such tiles).
  """
  return _full_bounds(_bound_terms(bx, by, f_blocks, g_blocks, eps))


def _full_bounds(t: _BoundTerms) -> jax.Array:
  """The ``[nbx, nby]`` bound of :func:`tile_log_bounds` from its precomputed terms."""
  nbx, bxs, d = t.x.shape
  nby, bys, _ = t.y.shape

  def row_block_bound(ids):  # [k] row blocks -> [k, nby]; [k, nby, B_y] planes, one per axis
    s = jnp.broadcast_to(t.f_hat[ids][:, None, None], (ids.shape[0],) + t.h.shape)
    for k in range(d):
      w = t.c_i[ids, k][:, None, None] - t.y[None, :, :, k]
      s = s + jnp.abs(t.a_i[ids, k][:, None, None] - w) * t.r_i[ids, k][:, None, None] - 0.5 * w * w
    return _lse_last(t.h[None] + s * t.inv_eps)

  def col_block_bound(ids):  # [k] column blocks -> [k, nbx]
    s = jnp.broadcast_to(t.f[None], (ids.shape[0],) + t.f.shape)
    for k in range(d):
      z = t.x[None, :, :, k] - t.c_j[ids, k][:, None, None]
      s = s + jnp.abs(t.b_j[ids, k][:, None, None] + z) * t.r_j[ids, k][:, None, None] - 0.5 * z * z
    return jnp.max(s, axis=-1) * t.inv_eps

  bound_2 = _map_blocks(row_block_bound, nbx, nby * bys)
  bound_3 = _map_blocks(col_block_bound, nby, nbx * bxs).T + t.g_lse[None, :]
  return jnp.minimum(t.box, jnp.minimum(bound_2, bound_3))


class _BoundTerms(NamedTuple):
  """Per-block quantities of the three bounds of :func:`tile_log_bounds` (all stopped)."""

  inv_eps: jax.Array
  x: jax.Array  # [nbx, B_x, d] row points
  y: jax.Array  # [nby, B_y, d] column points
  f: jax.Array  # [nbx, B_x] row potentials, −inf on padding
  h: jax.Array  # [nby, B_y] log b + g/ε, −inf on padding
  box: jax.Array  # [nbx, nby] bound 1
  c_i: jax.Array  # [nbx, d] row box centres, half-widths r_i, slopes a_i
  r_i: jax.Array
  a_i: jax.Array
  f_hat: jax.Array  # [nbx] F_I of bound 2
  c_j: jax.Array  # [nby, d] column box centres, half-widths r_j, slopes b_j
  r_j: jax.Array
  b_j: jax.Array
  g_lse: jax.Array  # [nby] LSE_j(log b_j + ĝ_j/ε) of bound 3


def _bound_terms(bx: Blocks, by: Blocks, f_blocks, g_blocks, eps) -> _BoundTerms:
  if f_blocks.shape != bx.valid.shape:
    raise ValueError(f"`f_blocks` must have shape {bx.valid.shape}, got {f_blocks.shape}.")
  if g_blocks.shape != by.valid.shape:
    raise ValueError(f"`g_blocks` must have shape {by.valid.shape}, got {g_blocks.shape}.")
  dtype = bx.lo.dtype
  nbx, _, d = bx.points.shape
  nby = by.points.shape[0]
  inv_eps = 1.0 / jax.lax.stop_gradient(jnp.asarray(eps, dtype))
  f = jnp.where(bx.valid, jax.lax.stop_gradient(f_blocks).astype(dtype), -jnp.inf)
  g = jnp.where(by.valid, jax.lax.stop_gradient(g_blocks).astype(dtype), 0.0)
  lw = jnp.where(by.valid, jax.lax.stop_gradient(by.log_weights).astype(dtype), -jnp.inf)
  h = lw + g * inv_eps

  # 1. Box.
  dist2 = jnp.zeros((nbx, nby), dtype)
  for k in range(d):  # static d ≤ 3: [nbx, nby] planes
    gap = jnp.maximum(by.lo[None, :, k] - bx.hi[:, None, k], bx.lo[:, None, k] - by.hi[None, :, k])
    dist2 = dist2 + jnp.square(jnp.maximum(gap, 0.0))
  box = (jnp.max(f, axis=1)[:, None] - 0.5 * dist2) * inv_eps + _lse_last(h)[None, :]

  # 2. Row block vs column point: F_I.
  c_i, r_i, u_i, a_i = _block_frames(bx, f)
  f_hat = jnp.max(f - 0.5 * jnp.sum(u_i * u_i, -1) - jnp.sum(a_i[:, None] * u_i, -1), axis=1)

  # 3. Row point vs column block: LSE of log b + ĝ/ε.
  c_j, r_j, v_j, b_j = _block_frames(by, g)
  g_hat = g - 0.5 * jnp.sum(v_j * v_j, -1) - jnp.sum(b_j[:, None] * v_j, -1)
  g_lse = _lse_last(lw + g_hat * inv_eps)

  return _BoundTerms(
    inv_eps=inv_eps,
    x=jax.lax.stop_gradient(bx.points).astype(dtype),
    y=jax.lax.stop_gradient(by.points).astype(dtype),
    f=f,
    h=h,
    box=box,
    c_i=c_i,
    r_i=r_i,
    a_i=a_i,
    f_hat=f_hat,
    c_j=c_j,
    r_j=r_j,
    b_j=b_j,
    g_lse=g_lse,
  )


def _listed_bounds(t: _BoundTerms, rows: jax.Array, cols: jax.Array, count) -> jax.Array:
  """The bound of :func:`tile_log_bounds` for listed tiles only: ``O(B)`` work per tile
  instead of the ``O(nbx·m + n·nby)`` of the full mask. Returns ``[capacity]``, ``−inf`` on
  padding entries."""
  nbx, bxs, d = t.x.shape
  nby, bys, _ = t.y.shape
  chunk = max(1, min(rows.shape[0], (_CHUNK_ENTRIES >> 4) // max(bxs, bys)))
  rs, cs = _chunks(rows, cols, count, nbx, nby, chunk)

  def work(r, c):
    ri, ci = jnp.minimum(r, nbx - 1), jnp.minimum(c, nby - 1)
    s = t.f_hat[ri][:, None]  # bound 2: [K, B_y]
    for k in range(d):
      w = t.c_i[ri, k][:, None] - t.y[ci, :, k]
      s = s + jnp.abs(t.a_i[ri, k][:, None] - w) * t.r_i[ri, k][:, None] - 0.5 * w * w
    b2 = _lse_last(t.h[ci] + s * t.inv_eps)
    s = t.f[ri]  # bound 3: [K, B_x]
    for k in range(d):
      z = t.x[ri, :, k] - t.c_j[ci, k][:, None]
      s = s + jnp.abs(t.b_j[ci, k][:, None] + z) * t.r_j[ci, k][:, None] - 0.5 * z * z
    b3 = jnp.max(s, axis=-1) * t.inv_eps + t.g_lse[ci]
    return jnp.where(r < nbx, jnp.minimum(t.box[ri, ci], jnp.minimum(b2, b3)), -jnp.inf)

  out = jnp.full(rs.shape, -jnp.inf, t.box.dtype)
  out = jax.lax.fori_loop(
    0, _live_chunks(count, rs), lambda i, o: o.at[i].set(work(rs[i], cs[i])), out
  )
  return out.reshape(-1)[: rows.shape[0]]


def select_tiles(
  bx: Blocks,
  by: Blocks,
  f_blocks: jax.Array,
  g_blocks: jax.Array,
  eps,
  truncate,
  capacity: int,
  box_capacity: int | None = None,
) -> TileList:
  """The tiles of :func:`keep_tiles` as a :class:`TileList`, at a fraction of its cost.

  Two stages: the cheap box bound (``O(nbx·nby)``) lists candidate tiles in ``box_capacity``
  entries (default ``min(nbx·nby, 2·capacity)``); the point–block bounds 2 and 3 of
  :func:`tile_log_bounds` are then evaluated on the candidates only (``O(B)`` per tile) and
  the survivors compacted into ``capacity`` entries. The kept set is that of
  :func:`keep_tiles` (the bound is the same minimum of three, and a tile the box drops has
  a bound ≤ −T), except for the rule that keeps each row block's best tile: here it is the
  best among the candidates (the box's best tile is always a candidate), which still leaves
  every row block a partner. If the candidates overflow ``box_capacity`` (mismatched clouds,
  where the box bound is loose), the full mask of :func:`keep_tiles` is computed instead
  (``lax.cond``). Overflow of ``capacity`` itself is reported by ``count`` as in
  :func:`tile_list`.

  Args:
    bx: row :class:`Blocks`.
    by: column :class:`Blocks`.
    f_blocks: ``[nbx, B_x]`` current row potentials.
    g_blocks: ``[nby, B_y]`` column potentials.
    eps: positive scalar temperature.
    truncate: ``T`` (may be traced).
    capacity: static length of the returned list.
    box_capacity: static length of the candidate list.

  Returns:
    :class:`TileList` of the kept tiles, sorted by row block.
  """
  capacity = validation.check_count("capacity", capacity)
  t = _bound_terms(bx, by, f_blocks, g_blocks, eps)
  nbx, nby = t.box.shape
  box_capacity = min(nbx * nby, 2 * capacity) if box_capacity is None else box_capacity
  box_capacity = validation.check_count("box_capacity", box_capacity)
  candidates = tile_list(_keep_mask(t.box, bx, by, truncate), box_capacity)

  def refine(_):
    bound = _listed_bounds(t, candidates.rows, candidates.cols, candidates.count)
    row_best = jax.ops.segment_max(
      bound, candidates.rows, num_segments=nbx + 1, indices_are_sorted=True
    )
    live = candidates.rows < nbx
    keep = live & (~(bound <= -truncate) | (bound >= row_best[candidates.rows]))
    idx = jnp.nonzero(keep, size=capacity, fill_value=box_capacity)[0]
    pick = jnp.minimum(idx, box_capacity - 1)
    listed = idx < box_capacity
    return TileList(
      jnp.where(listed, candidates.rows[pick], nbx).astype(jnp.int32),
      jnp.where(listed, candidates.cols[pick], nby).astype(jnp.int32),
      jnp.sum(keep, dtype=jnp.int32),
    )

  def full(_):
    return tile_list(_keep_mask(_full_bounds(t), bx, by, truncate), capacity)

  return jax.lax.cond(overflowed(candidates), full, refine, None)


# Tiles per row block in softmin_upper_bound: a point's nearest neighbours lie in a few blocks.
_UPPER_BOUND_TILES = 4


def softmin_upper_bound(bx: Blocks, by: Blocks, g_blocks: jax.Array, eps) -> jax.Array:
  """A per-row upper bound of the softmin of ``g``, for rows with no potential yet.

  The softmin ``f̃_i = −ε log Σ_j exp(log b_j + (g_j − C_ij)/ε)`` only grows when columns are
  left out of the sum, so its restriction to a few tiles per row block is an upper bound
  ``U_i ≥ f̃_i``: the row block's ``_UPPER_BOUND_TILES`` column blocks of largest box bound
  (:func:`tile_log_bounds`' bound 1, which orders column blocks independently of the rows'
  potentials). Used as the rows' potential in :func:`select_tiles`, ``U`` keeps a superset of
  the tiles that the exact ``f̃`` would keep (a larger ``f`` only raises every bound), so the
  truncation stays rigorous; ``O(nbx)`` tiles of work. E.g. the potential of a freshly drawn
  target sample in a warm-started divergence.

  Args:
    bx: row :class:`Blocks`. by: column :class:`Blocks`.
    g_blocks: ``[nby, B_y]`` column potentials.
    eps: positive scalar temperature.

  Returns:
    ``[nbx, B_x]`` upper bounds (``+inf`` on a row whose tiles hold no mass; 0 on padding).
  """
  nbx, nby = bx.valid.shape[0], by.valid.shape[0]
  zeros = jnp.zeros(bx.valid.shape, bx.lo.dtype)
  box = _bound_terms(bx, by, zeros, g_blocks, eps).box
  massive = jnp.any(by.valid & (by.log_weights > -jnp.inf), axis=1)
  k = min(nby, _UPPER_BOUND_TILES)
  _, best = jax.lax.top_k(jnp.where(massive[None, :], box, -jnp.inf), k)  # [nbx, k]
  rows = jnp.repeat(jnp.arange(nbx, dtype=jnp.int32), k)
  tiles = TileList(rows, best.reshape(-1).astype(jnp.int32), jnp.int32(nbx * k))
  sg = jax.lax.stop_gradient
  return block_sparse_softmin(bx, by, sg(g_blocks), sg(eps), tiles)


def keep_tiles(
  bx: Blocks,
  by: Blocks,
  f_blocks: jax.Array,
  g_blocks: jax.Array,
  eps,
  truncate: float = DEFAULT_TRUNCATE,
) -> jax.Array:
  """Rigorous tile test: keeps ``(I, J)`` unless it provably holds ``< e^{−T}`` of each row's mass.

  With ``f`` the rows' current potentials, the tile is dropped only when, for every ``i ∈ I``,

      Σ_{j∈J} exp(log b_j + (g_j − C_ij)/ε) ≤ e^{−T} · exp(−f_i/ε),

  which holds whenever the bound of :func:`tile_log_bounds` is ``≤ −T`` (per-block maxima of
  ``f``, per-block log-sum-exps of ``log b + g/ε`` and box geometry; never a distance-only
  cut-off). At the fixed point ``Σ_j exp(log b_j + (g_j + f_i − C_ij)/ε) = 1`` this says the
  tile carries less than ``e^{−T}`` of row ``i``'s mass (MULTISCALE.md §3.3; GeomLoss's
  multiscale test is the analogue on cluster centroids, without a guarantee). Massless column
  blocks are dropped (they contribute exactly 0); tiles with a non-finite bound are kept.

  **Error bound.** Let ``f̃`` be the exact softmin of ``g`` and ``N_I`` the number of tiles
  dropped from row block ``I``. The dropped sum of row ``i`` is at most
  ``N_I e^{−T} e^{−f_i/ε}``, a fraction ``δ_i = N_I e^{−T} e^{(f̃_i − f_i)/ε}`` of the full
  sum ``e^{−f̃_i/ε}``, so the truncated softmin satisfies
  ``0 ≤ f̃_i^{kept} − f̃_i ≤ −ε log(1 − δ_i)`` (``≈ ε N_I e^{−T}`` at ``f = f̃``), up to the
  rounding of the bound itself.

  **No empty row block.** Each row block also keeps its tile of largest bound
  ``argmax_J U_IJ`` (first such ``J`` on ties), so every row gets partners even from stale
  potentials (a cold start ``f ≪ f̃``). Near the fixed point this is never needed: since
  ``Σ_J S_iJ = e^{−f̃_i/ε}``, some ``J`` has ``S_iJ ≥ e^{−f̃_i/ε}/nby``, hence
  ``U_IJ ≥ (f_i − f̃_i)/ε − log nby``, and the test alone keeps that tile as soon as some
  ``i ∈ I`` has ``f_i − f̃_i > −ε (T − log nby)``.

  Args:
    bx: row :class:`Blocks`.
    by: column :class:`Blocks`.
    f_blocks: ``[nbx, B_x]`` current row potentials (padding ignored).
    g_blocks: ``[nby, B_y]`` column potentials.
    eps: positive scalar temperature.
    truncate: ``T`` (default 10: 1.4 % of pairs at converged potentials on flower clouds,
      MULTISCALE.md §1; the per-tile relative error ``e^{−10} ≈ 4.5e-5``).

  Returns:
    ``[nbx, nby]`` bool mask of kept tiles; every row has at least one ``True``.
  """
  return _keep_mask(tile_log_bounds(bx, by, f_blocks, g_blocks, eps), bx, by, truncate)


def _keep_mask(bound, bx: Blocks, by: Blocks, truncate) -> jax.Array:
  """Tiles with a bound above ``−T`` (NaN kept) and a massive column block, plus the best
  tile of each row block that holds a valid row."""
  massive = jnp.any(by.valid & (by.log_weights > -jnp.inf), axis=1)
  keep = ~(bound <= -truncate) & massive[None, :]
  best = jax.nn.one_hot(jnp.argmax(bound, axis=1), bound.shape[1], dtype=jnp.bool_)
  return keep | (best & jnp.any(bx.valid, axis=1)[:, None])


def tile_list(keep: jax.Array, capacity: int) -> TileList:
  """Flat, row-sorted list of the kept tiles in a static ``capacity`` (``jnp.nonzero``).

  Padding entries hold the out-of-range ids ``(nbx, nby)``, which the kernel skips. If more
  than ``capacity`` tiles are kept, the first ``capacity`` in row-major order are listed and
  ``count > capacity`` flags the overflow: the caller must check :func:`overflowed` (outside
  ``jit``, or with ``jnp.where`` inside) and enlarge the capacity or fall back to the dense
  kernel (the jax-md ``cell_list`` pattern).

  Args:
    keep: ``[nbx, nby]`` bool mask from :func:`keep_tiles`.
    capacity: static list length (see :func:`tile_capacity`).

  Returns:
    :class:`TileList`.
  """
  capacity = validation.check_count("capacity", capacity)
  if keep.ndim != 2:
    raise ValueError(f"`keep` must be a [nbx, nby] mask, got shape {keep.shape}.")
  nbx, nby = keep.shape
  rows, cols = jnp.nonzero(keep, size=capacity, fill_value=(nbx, nby))
  count = jnp.sum(keep, dtype=jnp.int32)
  return TileList(rows.astype(jnp.int32), cols.astype(jnp.int32), count)


def overflowed(tiles: TileList) -> jax.Array:
  """True when the list lost tiles (``count > capacity``): the softmin is then wrong."""
  return tiles.count > tiles.rows.shape[0]


def tile_capacity(keep, margin: float = 0.25, multiple: int = 1) -> int:
  """Host helper: a capacity for the concrete mask ``keep`` with a relative ``margin``.

  Returns ``⌈count · (1 + margin)⌉`` rounded up to a multiple of ``multiple`` (e.g. the
  kernel's tiles per chunk), at least 1 and at most ``nbx·nby`` rounded up the same way.
  """
  keep = np.asarray(keep)
  if keep.ndim != 2:
    raise ValueError(f"`keep` must be a concrete [nbx, nby] mask, got shape {keep.shape}.")
  if not margin >= 0:
    raise ValueError(f"`margin` must be >= 0, got {margin!r}.")
  multiple = validation.check_count("multiple", multiple)
  count = int(np.count_nonzero(keep))
  cap = min(max(1, math.ceil(count * (1.0 + margin))), keep.size)
  return -(-cap // multiple) * multiple


def default_tiles_per_chunk(bx_size: int, by_size: int) -> int:
  """Tiles per chunk: about 2^20 logits (``4 MiB`` in float32) per chunk."""
  return max(1, _CHUNK_ENTRIES // (bx_size * by_size))


# --------------------------------------------------------------------------------------------
# The kernel


def _chunks(rows, cols, count, nbx, nby, chunk):
  # Dead entries (past `count`, or out of range) get the ids (nbx, nby): every scatter below
  # uses mode="drop", so they contribute nothing; gathers clip them to a real block.
  cap = rows.shape[0]
  live = (jnp.arange(cap) < count) & (rows >= 0) & (rows < nbx) & (cols >= 0) & (cols < nby)
  rows = jnp.where(live, rows, nbx).astype(jnp.int32)
  cols = jnp.where(live, cols, nby).astype(jnp.int32)
  pad = (-cap) % chunk
  if pad:
    rows = jnp.concatenate([rows, jnp.full((pad,), nbx, jnp.int32)])
    cols = jnp.concatenate([cols, jnp.full((pad,), nby, jnp.int32)])
  return rows.reshape(-1, chunk), cols.reshape(-1, chunk)


def _tile_logits(xs, ys_scaled, hh):
  # [K, Bx, By] = hh_j + <x'_i, y'_j>/eps by broadcast multiply-adds (d ≤ 3; XLA fuses them with
  # the max/exp, as in the dense kernel's _block_logits).
  s = hh[:, None, :]
  for k in range(xs.shape[-1]):
    s = s + xs[:, :, None, k] * ys_scaled[:, None, :, k]
  return s


def _gather_tile(x_c, y, h, centers, r, c, inv_eps):
  """Centred tile operands: rows x' = x − c_I, columns y' = y − c_I, ĥ = h − ½‖y'‖²/ε.

  ``C_ij/ε = ½‖x'_i‖²/ε + ½‖y'_j‖²/ε − ⟨x'_i, y'_j⟩/ε``; the row term is the same for all tiles
  of a row block (same centre) and is added once at the end. Centring each tile on its row
  block keeps every term small (|x'| ≤ box size), so float32 loses nothing to cancellation.
  """
  rc = jnp.minimum(r, x_c.shape[0] - 1)
  cc = jnp.minimum(c, y.shape[0] - 1)
  xs = x_c[rc]
  ys = y[cc] - centers[rc][:, None, :]
  hh = h[cc] - (0.5 * inv_eps) * jnp.sum(ys * ys, axis=-1)
  return rc, xs, ys, hh


def _live_chunks(count, rs) -> jax.Array:
  """Chunks that hold listed tiles: live entries are the first ``count`` (``jnp.nonzero``
  order), so the unused tail of the capacity is never visited."""
  n_chunks, chunk = rs.shape
  return jnp.clip((count + chunk - 1) // chunk, 0, n_chunks)


def _scan_chunks(work, init, chunks, count):
  """``work(carry, r, c)`` over the live tile chunks (a loop of dynamic length: a skipped
  chunk would still cost a step, and capacities are sized for the worst case)."""
  rs, cs = chunks
  return jax.lax.fori_loop(0, _live_chunks(count, rs), lambda i, cr: work(cr, rs[i], cs[i]), init)


def _forward_online(x_c, y, h, inv_eps, centers, rs, cs, count):
  """Log-sum-exp of the hat logits over the listed tiles with a running max: safe for any
  potentials, but two passes over each tile's logits. Returns ``lse_hat [nbx, B_x]``."""
  nbx, bxs, _ = x_c.shape

  def work(carry, r, c):
    m_acc, s_acc = carry
    rc, xs, ys, hh = _gather_tile(x_c, y, h, centers, r, c, inv_eps)
    s = _tile_logits(xs, ys * inv_eps, hh)
    mt = jnp.max(s, axis=-1)  # [K, Bx]
    safe = jnp.where(jnp.isfinite(mt), mt, 0.0)
    st = jnp.sum(jnp.exp(s - safe[..., None]), axis=-1)
    # Online log-sum-exp across tiles: raise each touched row's max, rescale its sum (duplicate
    # rows in the chunk write identical values), then add the tiles' rescaled sums.
    m_new = m_acc.at[r].max(mt, mode="drop")
    old, new = m_acc[rc], m_new[rc]
    scale = jnp.where(new > -jnp.inf, jnp.exp(old - new), 0.0)
    s_acc = s_acc.at[r].set(s_acc[rc] * scale, mode="drop")
    add = jnp.where(mt > -jnp.inf, st * jnp.exp(mt - jnp.where(new > -jnp.inf, new, 0.0)), 0.0)
    return m_new, s_acc.at[r].add(add, mode="drop")

  init = (jnp.full((nbx, bxs), -jnp.inf, x_c.dtype), jnp.zeros((nbx, bxs), x_c.dtype))
  m_acc, s_acc = _scan_chunks(work, init, (rs, cs), count)
  return m_acc + jnp.log(s_acc)  # empty row: −inf + log 0 = −inf


# The single pass is accepted when every row's Σ exp(s − o) lies in [e^-50, e^50]: no partial
# sum can overflow float32 (e^88), and terms flushed below e^-87 weigh < e^-37 of the sum each.
_OFFSET_RANGE = 50.0


def _offset_sums(x_c, y, h, inv_eps, centers, rs, cs, count, o_hat, acc):
  """``acc + Σ_j exp(s_ij − o_i)`` over the listed tiles (one pass, fixed per-row offset)."""

  def work(acc, r, c):
    rc, xs, ys, hh = _gather_tile(x_c, y, h, centers, r, c, inv_eps)
    s = _tile_logits(xs, ys * inv_eps, hh) - o_hat[rc][..., None]
    return acc.at[r].add(jnp.sum(jnp.exp(s), axis=-1), mode="drop")

  return _scan_chunks(work, acc, (rs, cs), count)


def _offset_result(acc, o_hat, valid):
  """``(lse_hat, ok)`` from the offset sums; ``ok`` is false when some row's sum left the safe
  range (its estimate was off by more than ``_OFFSET_RANGE``)."""
  in_range = (acc >= math.exp(-_OFFSET_RANGE)) & (acc <= math.exp(_OFFSET_RANGE))
  return o_hat + jnp.log(acc), jnp.all(in_range | ~valid)


def _forward_offset(x_c, y, h, inv_eps, centers, rs, cs, count, o_hat, valid):
  """One pass: ``Σ_j exp(s_ij − o_i)`` with a fixed per-row offset ``o`` (an estimate of the
  row's log-sum-exp), no running max. Returns ``(lse_hat, ok)``; ``ok`` is false when some
  row's sum left the safe range (the estimate was off by more than ``_OFFSET_RANGE``)."""
  acc = jnp.zeros(x_c.shape[:2], x_c.dtype)
  return _offset_result(
    _offset_sums(x_c, y, h, inv_eps, centers, rs, cs, count, o_hat, acc), o_hat, valid
  )


# Taylor tiles (the fast Gauss transform's expansion, Greengard & Strain 1991): with u, v the
# points' offsets from their blocks' centres and t = ⟨u, v⟩/ε, a tile whose blocks' radii have
# R_I·R_J ≤ τ·ε sums e^t as Σ_{p≤P} t^p/p! = Σ_{|α|≤P} u^α v^α / (α! ε^|α|): per pair the
# relative error is ≤ τ^{P+1} e^{2τ} / (P+1)! = 1.0e-7 at P = 4, τ = 0.1 (float32 rounding),
# and the tile costs O((B_x + B_y)·#α) instead of B_x·B_y exponentials.
_TAYLOR_DEGREE = 4
_TAYLOR_TAU = 0.1
# Taylor tiles per chunk: each costs O(B·#α), so a chunk needs many of them to amortise the
# loop step (64 ran 10 % slower than 512 at n = 60 000).
_TAYLOR_CHUNK = 512


def _multi_indices(d: int, degree: int) -> np.ndarray:
  """``[#α, d]`` int: every multi-index of total degree ≤ ``degree`` in ``d`` variables."""
  return np.array([a for a in itertools.product(range(degree + 1), repeat=d) if sum(a) <= degree])


def _block_radii(points, live):
  """Per block: the centre of its live points' box ``[nb, d]`` and their largest distance from
  it ``[nb]`` (0 for a block without live points)."""
  lo = jnp.min(jnp.where(live[..., None], points, jnp.inf), axis=1)
  hi = jnp.max(jnp.where(live[..., None], points, -jnp.inf), axis=1)
  some = jnp.any(live, axis=1)
  c = jnp.where(some[:, None], 0.5 * (lo + hi), points[:, 0])
  dist = jnp.sqrt(jnp.sum(jnp.square(points - c[:, None, :]), axis=-1))
  return c, jnp.max(jnp.where(live, dist, 0.0), axis=1)


def _taylor_sums(x_c, y, h, inv_eps, centers, rows, cols, count, o_hat, valid, acc):
  """``acc + Σ_j exp(s_ij − o_i)`` over the listed tiles, each tile exact or by its Taylor
  expansion (:data:`_TAYLOR_TAU`). Returns ``(acc, taylor_tiles)``."""
  nbx, bxs, d = x_c.shape
  nby, bys, _ = y.shape
  dtype = x_c.dtype
  alphas = _multi_indices(d, _TAYLOR_DEGREE)
  scale = np.array([math.prod(math.factorial(int(a)) for a in al) for al in alphas], float)
  # Rows: offsets u = x_c from their block's centre; the monomials' 1/(α! ε^|α|) is u_pow.
  r_row = jnp.max(jnp.where(valid, jnp.sqrt(jnp.sum(x_c * x_c, axis=-1)), 0.0), axis=1)
  u_pow = jnp.asarray(1.0 / scale, dtype) * inv_eps ** jnp.asarray(alphas.sum(1), dtype)
  # Columns with mass: offsets from their own block's centre.
  c_col, r_col = _block_radii(y, jnp.isfinite(h))
  v = y - c_col[:, None, :]
  a0 = h - (0.5 * inv_eps) * jnp.sum(v * v, axis=-1)  # −inf on massless columns

  cap = rows.shape[0]
  live = (jnp.arange(cap) < count) & (rows >= 0) & (rows < nbx) & (cols >= 0) & (cols < nby)
  ri, ci = jnp.clip(rows, 0, nbx - 1), jnp.clip(cols, 0, nby - 1)
  far = live & (r_row[ri] * r_col[ci] <= _TAYLOR_TAU / inv_eps)

  def compact(mask):
    idx = jnp.nonzero(mask, size=cap, fill_value=cap)[0]
    pick = jnp.minimum(idx, cap - 1)
    listed = idx < cap
    n = jnp.sum(mask, dtype=jnp.int32)
    return jnp.where(listed, rows[pick], nbx), jnp.where(listed, cols[pick], nby), n

  n_rows, n_cols, n_near = compact(live & ~far)
  f_rows, f_cols, n_far = compact(far)
  chunk = max(1, min(cap, _CHUNK_ENTRIES // (bys * bxs)))
  rs, cs = _chunks(n_rows, n_cols, n_near, nbx, nby, chunk)
  acc = _offset_sums(x_c, y, h, inv_eps, centers, rs, cs, n_near, o_hat, acc)

  # Struct-of-arrays offsets [nb, d, B]: a chunk gathers d·B numbers per block and forms the
  # monomials on the fly (gathering [#α, B] monomials per tile ran at memory speed, 3× slower).
  u_soa = jnp.swapaxes(jnp.where(valid[..., None], x_c, 0.0), 1, 2)
  v_soa = jnp.swapaxes(v, 1, 2)
  n_alpha = alphas.shape[0]

  def powers(t):  # [K, d, B] -> per axis, the powers 0..P of its offsets
    out = []
    for k in range(d):
      pk = [jnp.ones_like(t[:, k])]
      for _ in range(_TAYLOR_DEGREE):
        pk.append(pk[-1] * t[:, k])
      out.append(pk)
    return out

  def mono(pw, q):
    out = pw[0][alphas[q, 0]]
    for k in range(1, d):
      out = out * pw[k][alphas[q, k]]
    return out

  def work(acc, r, c):
    rc, cc = jnp.minimum(r, nbx - 1), jnp.minimum(c, nby - 1)
    # s_ij = a_j − ⟨D, v_j⟩/ε − ½‖D‖²/ε + ⟨u_i, D⟩/ε + ⟨u_i, v_j⟩/ε,  D = c_J − c_I.
    dd = (c_col[cc] - centers[rc]) * inv_eps  # [K, d], over ε
    vc, xr = v_soa[cc], u_soa[rc]  # [K, d, B]
    a = a0[cc]
    e = -o_hat[rc]
    for k in range(d):
      a = a - vc[:, k] * dd[:, k, None]
      e = e + xr[:, k] * dd[:, k, None]
    m = jnp.max(a, axis=-1)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(a - m[:, None])  # [K, B_y]
    pv, pu = powers(vc), powers(xr)
    moments = jnp.stack([jnp.sum(w * mono(pv, q), axis=-1) for q in range(n_alpha)], -1)
    moments = moments * u_pow
    poly = sum(mono(pu, q) * moments[:, q, None] for q in range(n_alpha))
    row = m - (0.5 / inv_eps) * jnp.sum(dd * dd, -1)
    return acc.at[r].add(jnp.exp(e + row[:, None]) * poly, mode="drop")

  t_chunk = max(1, min(cap, _TAYLOR_CHUNK))
  return _scan_chunks(work, acc, _chunks(f_rows, f_cols, n_far, nbx, nby, t_chunk), n_far), n_far


def _plan_row_sums(p, xs, ys):
  """Row sums of a tile's plan ``p [K, B_x, B_y]`` in its centred coordinates: ``Σ_j p``,
  ``Σ_j p (x'_i − y'_j)`` ``[K, B_x, d]`` and ``Σ_j p C_ij`` (``C = ½‖x' − y'‖²``)."""
  # Broadcast-multiply-reduce, not einsum: XLA's CPU batched matmul with 3–4 output columns
  # was ≈ 6× slower than this fused form (BUILD_NOTES.md, "Multiscale backend").
  feats = jnp.concatenate([jnp.ones_like(ys[..., :1]), ys], -1)  # [K, By, d + 1]
  py = jnp.sum(p[..., None] * feats[:, None, :, :], axis=-2)
  p0, p_y = py[..., 0], py[..., 1:]
  # Σ_j p ½‖y'‖² in its own reduction, so that XLA can drop it when only d/dx is needed.
  p_y2 = jnp.sum(p * (0.5 * jnp.sum(ys * ys, axis=-1))[:, None, :], axis=-1)
  pc = 0.5 * jnp.sum(xs * xs, axis=-1) * p0 - jnp.sum(xs * p_y, axis=-1) + p_y2
  return p0, xs * p0[..., None] - p_y, pc


def _row_sums_offset(x_c, y, h, inv_eps, centers, rs, cs, count, o_hat, valid):
  """:func:`_forward_offset` that also takes the backward pass's row sums in the same pass:
  ``Σ_j P_ij (x'_i − y'_j)`` and ``Σ_j P_ij C_ij`` (``P`` the row-normalised plan), which do
  not depend on the cotangent. Returns ``(lse_hat, ok, dx [nbx, B_x, d], pc [nbx, B_x])``."""
  nbx, bxs, d = x_c.shape

  def work(carry, r, c):
    acc, sx, sc = carry
    rc, xs, ys, hh = _gather_tile(x_c, y, h, centers, r, c, inv_eps)
    p = jnp.exp(_tile_logits(xs, ys * inv_eps, hh) - o_hat[rc][..., None])  # [K, Bx, By]
    p0, r_dx, r_pc = _plan_row_sums(p, xs, ys)
    acc = acc.at[r].add(p0, mode="drop")
    sx = sx.at[r].add(r_dx, mode="drop")
    return acc, sx, sc.at[r].add(r_pc, mode="drop")

  zeros = lambda *shape: jnp.zeros(shape, x_c.dtype)
  acc, sx, sc = _scan_chunks(
    work, (zeros(nbx, bxs), zeros(nbx, bxs, d), zeros(nbx, bxs)), (rs, cs), count
  )
  in_range = (acc >= math.exp(-_OFFSET_RANGE)) & (acc <= math.exp(_OFFSET_RANGE))
  ok = jnp.all(in_range | ~valid)
  norm = jnp.where(acc > 0, 1.0 / acc, 0.0)
  return o_hat + jnp.log(acc), ok, sx * norm[..., None], sc * norm


def _forward(
  x, y, h, eps, centers, rows, cols, count, f_est, valid, chunk, sums=False, taylor=False
):
  # Returns (out, lse_hat, row_sums): row_sums = (ok, dx, pc) of _row_sums_offset when `sums`
  # (and an estimate is given), else None. `taylor`: small tiles by _taylor_sums (not with sums).
  nbx = x.shape[0]
  nby = y.shape[0]
  inv_eps = 1.0 / eps
  x_c = x - centers[:, None, :]
  half_x2 = (0.5 * inv_eps) * jnp.sum(x_c * x_c, axis=-1)
  rs, cs = _chunks(rows, cols, count, nbx, nby, chunk)
  row_sums = None
  if f_est is None:
    lse_hat = _forward_online(x_c, y, h, inv_eps, centers, rs, cs, count)
    # Padding rows are not the caller's: they read 0, not a softmin of whatever they hold.
    lse_hat = jnp.where(valid, lse_hat, half_x2)
  else:
    # Near the fixed point the row's log-sum-exp is −f/ε (hat units: + ½‖x'‖²/ε), so the exp
    # needs no running max; a row off by > e^50 reruns the whole softmin with the online max.
    o_hat = jnp.where(jnp.isfinite(f_est), -f_est * inv_eps, 0.0) + half_x2
    args = (x_c, y, h, inv_eps, centers, rs, cs, count, o_hat, valid)
    if sums:
      lse_hat, ok, dx, pc = _row_sums_offset(*args)
      row_sums = (ok, dx, pc)
    elif taylor:
      acc = jnp.zeros((nbx, x.shape[1]), x.dtype)
      acc, _ = _taylor_sums(x_c, y, h, inv_eps, centers, rows, cols, count, o_hat, valid, acc)
      lse_hat, ok = _offset_result(acc, o_hat, valid)
    else:
      lse_hat, ok = _forward_offset(*args)
    lse_hat = jax.lax.cond(
      ok,
      lambda: lse_hat,
      lambda: _forward_online(x_c, y, h, inv_eps, centers, rs, cs, count),
    )
    # Padding rows read their estimate.
    lse_hat = jnp.where(valid, lse_hat, o_hat)
  return -eps * (lse_hat - half_x2), lse_hat, row_sums


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11, 12))
def _tiled_softmin(
  x, y, h, eps, centers, rows, cols, count, f_est, valid, chunk, column_grad, taylor
):
  return _forward(x, y, h, eps, centers, rows, cols, count, f_est, valid, chunk, taylor=taylor)[0]


def _tiled_softmin_fwd(
  x, y, h, eps, centers, rows, cols, count, f_est, valid, chunk, column_grad, taylor
):
  # Rows only (no column cotangents) with an estimate: the backward's row sums come out of the
  # forward pass (≈ 1.5× its cost) instead of a second pass over the tiles (≈ 3×). The backward
  # is always exact (it recomputes the tiles when the forward used Taylor tiles).
  sums = f_est is not None and not column_grad and not taylor
  out, lse_hat, row_sums = _forward(
    x, y, h, eps, centers, rows, cols, count, f_est, valid, chunk, sums=sums, taylor=taylor
  )
  # Residuals are O(n + m + capacity): tiles are recomputed in the backward pass if needed.
  return out, (x, y, h, eps, centers, rows, cols, count, valid, lse_hat, out, row_sums)


def _tiled_softmin_bwd(chunk, column_grad, taylor, res, ct):
  # With P_ij = exp(h_j − C_ij/ε − LSE_i) over the kept tiles, out_i = −ε LSE_i and cotangent
  # c_i:  d/dx_i = c_i Σ_j P_ij (x_i − y_j),   d/dy_j = Σ_i c_i P_ij (y_j − x_i),
  #       d/dh_j = −ε Σ_i c_i P_ij,            d/dε  = Σ_i c_i (out_i − Σ_j P_ij C_ij) / ε.
  # Differences are translation invariant, so each tile works in its centred coordinates. The
  # row sums (Σ_j P (x'−y'), Σ_j P C) do not need c and are scaled by it at the end. An empty
  # row (LSE = −inf, out = +inf) has P = 0 and contributes nothing.
  x, y, h, eps, centers, rows, cols, count, valid, lse_hat, out, row_sums = res
  nbx, bxs, d = x.shape
  nby, bys, _ = y.shape
  inv_eps = 1.0 / eps
  live = valid & jnp.isfinite(lse_hat)
  ct = jnp.where(live, ct, 0.0)
  offset = jnp.where(live, lse_hat, jnp.inf)
  x_c = x - centers[:, None, :]
  rs, cs = _chunks(rows, cols, count, nbx, nby, chunk)

  def work(carry, r, c):
    dx_acc, pc_acc, col_acc = carry
    rc, xs, ys, hh = _gather_tile(x_c, y, h, centers, r, c, inv_eps)
    p = jnp.exp(_tile_logits(xs, ys * inv_eps, hh) - offset[rc][..., None])  # [K, Bx, By]
    _, r_dx, r_pc = _plan_row_sums(p, xs, ys)
    dx_acc = dx_acc.at[r].add(r_dx, mode="drop")
    pc_acc = pc_acc.at[r].add(r_pc, mode="drop")  # its own carry: dropped when ε needs no grad
    if column_grad:
      ctk = ct[rc][..., None]
      weights = jnp.concatenate([ctk, ctk * xs], -1)  # [K, Bx, d + 1]
      pc = jnp.sum(p[..., None] * weights[:, :, None, :], axis=-3)  # [K, By, d + 1]
      w, u = pc[..., :1], pc[..., 1:]
      col_acc = col_acc.at[c].add(jnp.concatenate([ys * w - u, w], -1), mode="drop")
    return dx_acc, pc_acc, col_acc

  col_shape = (nby, bys, d + 1) if column_grad else (1, 1, d + 1)  # unused without column_grad
  zeros = lambda *shape: jnp.zeros(shape, x.dtype)
  init = (zeros(nbx, bxs, d), zeros(nbx, bxs), zeros(*col_shape))
  recompute = lambda: _scan_chunks(work, init, (rs, cs), count)
  if row_sums is None:
    dx_acc, pc_acc, col_acc = recompute()
  else:  # from the forward pass, unless it fell back to the online kernel
    ok, dx_f, pc_f = row_sums
    dx_f, pc_f = jnp.where(live[..., None], dx_f, 0.0), jnp.where(live, pc_f, 0.0)
    dx_acc, pc_acc, col_acc = jax.lax.cond(ok, lambda: (dx_f, pc_f, init[2]), recompute)
  dx = ct[..., None] * dx_acc
  deps = jnp.sum(jnp.where(live, ct * (out - pc_acc), 0.0)) * inv_eps
  if not column_grad:
    col_acc = jnp.zeros((nby, bys, d + 1), x.dtype)
  return (
    dx,
    col_acc[..., :d],
    -eps * col_acc[..., d],
    deps.astype(eps.dtype),
    None,
    None,
    None,
    None,
    None,
    None,
  )


_tiled_softmin.defvjp(_tiled_softmin_fwd, _tiled_softmin_bwd)


def block_sparse_softmin(
  bx: Blocks,
  by: Blocks,
  g_blocks: jax.Array,
  eps,
  tiles: TileList,
  tiles_per_chunk: int | None = None,
  f_estimate: jax.Array | None = None,
  column_grad: bool = True,
  taylor: bool = False,
) -> jax.Array:
  """Softmin of true potentials restricted to the listed tiles, in block layout.

  For each row ``i`` of row block ``I``,

      f̃_i = −ε · log Σ_{J : (I, J) listed} Σ_{j∈J} exp(log b_j + (g_j − C(x_i, y_j)) / ε),

  ``C(x, y) = ½‖x − y‖²`` (GeomLoss convention; block-sparse reductions as in GeomLoss's
  multiscale backend, Feydy et al. 2019, laid out as in MULTISCALE.md §3.4–3.5). Each tile's
  ``B_x × B_y`` logits are reduced to a per-row max and sum of exponentials and merged over the
  row block's tiles by an online log-sum-exp, ``tiles_per_chunk`` tiles at a time in a
  ``lax.scan``. Given ``f_estimate`` (the rows' current potentials, e.g. the previous
  iterate), the exponentials are taken once, relative to the fixed offset ``−f_estimate/ε``,
  with no running max (about twice as fast); if any row's sum then leaves ``[e^-50, e^50]``
  (an estimate off by more than ``50 ε``), the whole softmin reruns with the online max, so
  the result never depends on the estimate beyond rounding. Memory ``O(n + m + capacity)``
  plus one chunk of logits, never ``[capacity, B_x, B_y]``. A custom VJP recomputes the
  tiles, giving gradients with respect to ``bx.points``, ``by.points``, ``g_blocks``,
  ``by.log_weights`` and ``eps`` with the same memory. A valid row with no listed mass gets
  ``+inf`` (and zero gradient). Jittable; the tile list's capacity and ``tiles_per_chunk``
  are static. Overflow (``tiles.count > capacity``) is
  not corrected here: check :func:`overflowed`.

  Args:
    bx: row :class:`Blocks` (``[nbx, B_x, d]`` points).
    by: column :class:`Blocks` (``[nby, B_y, d]`` points, log-weights ``log b``).
    g_blocks: ``[nby, B_y]`` column potentials ``g`` in ``by``'s layout (padding ignored).
    eps: positive scalar temperature ``ε``.
    tiles: :class:`TileList` from :func:`tile_list`.
    tiles_per_chunk: tiles per scan step (static; default :func:`default_tiles_per_chunk`).
    f_estimate: optional ``[nbx, B_x]`` estimate of the result (gradient stopped), for the
      one-pass exponentials above.
    column_grad: static; ``False`` skips the column cotangents in the backward pass (they
      come out as zeros), for callers that differentiate the rows only.
    taylor: static; with ``f_estimate``, a tile whose blocks are small against ``√ε``
      (radii about their boxes' centres with ``R_I·R_J ≤ 0.1·ε``) is summed by the
      degree-4 Taylor expansion of ``exp(⟨u_i, v_j⟩/ε)`` in the points' offsets from those
      centres (the fast Gauss transform's, Greengard & Strain 1991): ``O(B·15)`` work per
      tile in 2-D instead of ``B²`` exponentials, each pair's term within ``1.0e-7``
      relative (so the result within ``≈ 1e-7·ε``, float32 rounding). For the large-ε
      levels of the coarse phase, where every tile is kept; the backward pass stays exact.

  Returns:
    ``[nbx, B_x]`` softmin in ``bx``'s layout. Rows that are not ``bx.valid`` (padding, or
    cells a caller marked empty) are not the caller's: they hold ``f_estimate`` (or 0), have
    zero gradient and need no tile; :func:`from_blocks` drops padding.
  """
  args = _softmin_args(bx, by, g_blocks, eps, tiles, tiles_per_chunk, f_estimate)
  if taylor and f_estimate is None:
    raise ValueError("`taylor=True` needs `f_estimate` (the one-pass kernel's offsets).")
  return _tiled_softmin(*args, bool(column_grad), bool(taylor))


def _softmin_args(bx: Blocks, by: Blocks, g_blocks, eps, tiles: TileList, tiles_per_chunk, f_est):
  """Checks the arguments of :func:`block_sparse_softmin` and returns those of
  :func:`_tiled_softmin` up to ``column_grad``."""
  x, y = bx.points, by.points
  if x.ndim != 3 or y.ndim != 3 or x.shape[2] != y.shape[2]:
    raise ValueError(f"`bx`/`by` points must be [nb, B, d] alike, got {x.shape} and {y.shape}.")
  if g_blocks.shape != by.valid.shape:
    raise ValueError(f"`g_blocks` must have shape {by.valid.shape}, got {g_blocks.shape}.")
  if tiles.rows.ndim != 1 or tiles.rows.shape != tiles.cols.shape:
    raise ValueError("`tiles.rows` and `tiles.cols` must be 1-D of equal length.")
  chunk = default_tiles_per_chunk(x.shape[1], y.shape[1])
  if tiles_per_chunk is not None:
    chunk = validation.check_count("tiles_per_chunk", tiles_per_chunk)
  chunk = max(1, min(chunk, tiles.rows.shape[0]))
  dtype = x.dtype
  eps = jnp.asarray(eps, dtype)
  g = jnp.where(by.valid, jnp.asarray(g_blocks, dtype), 0.0)
  h = jnp.where(by.valid, by.log_weights.astype(dtype) + g / eps, -jnp.inf)
  centers = jax.lax.stop_gradient(0.5 * (bx.lo + bx.hi)).astype(dtype)
  if f_est is not None:
    if f_est.shape != bx.valid.shape:
      raise ValueError(f"`f_estimate` must have shape {bx.valid.shape}, got {f_est.shape}.")
    f_est = jax.lax.stop_gradient(jnp.asarray(f_est, dtype))
  return (
    x,
    y.astype(dtype),
    h,
    eps,
    centers,
    tiles.rows,
    tiles.cols,
    tiles.count,
    f_est,
    bx.valid,
    chunk,
  )


def block_sparse_row_cost(
  bx: Blocks,
  by: Blocks,
  g_blocks: jax.Array,
  eps,
  tiles: TileList,
  tiles_per_chunk: int | None = None,
  f_estimate: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """:func:`block_sparse_softmin` and the transport cost per row of its row-normalised plan.

  The softmin ``f̃`` and the cost ``c`` of each row's normalised plan,

      f̃_i = −ε log Σ_j b_j e^{(g_j − C_ij)/ε},   c_i = Σ_j b_j e^{(g_j + f̃_i − C_ij)/ε} C_ij,

  both over the listed tiles (``C = ½‖x − y‖²``). A plan ``P_ij = a_i b_j e^{(f_i + g_j −
  C_ij)/ε}`` then has row masses ``a_i e^{(f_i − f̃_i)/ε}`` and transport cost
  ``Σ_i a_i e^{(f_i − f̃_i)/ε} c_i``. Two passes over the tiles (the softmin, then the sums
  relative to its exact log-sum-exp); no gradient (stopped).

  Args:
    bx, by, g_blocks, eps, tiles, tiles_per_chunk, f_estimate: as :func:`block_sparse_softmin`.

  Returns:
    ``(f̃ [nbx, B_x], c [nbx, B_x])`` in ``bx``'s layout; padding rows hold ``f_estimate``
    (or 0) and cost 0.
  """
  sg = jax.lax.stop_gradient
  args = _softmin_args(sg(bx), sg(by), sg(g_blocks), sg(eps), tiles, tiles_per_chunk, f_estimate)
  x, y, h, eps, centers, rows, cols, count, f_est, valid, chunk = args
  out, lse_hat, _ = _forward(*args)
  nbx, nby = x.shape[0], y.shape[0]
  rs, cs = _chunks(rows, cols, count, nbx, nby, chunk)
  live = valid & jnp.isfinite(lse_hat)
  offset = jnp.where(live, lse_hat, 0.0)  # the exact log-sum-exp: every row sums to 1
  x_c = x - centers[:, None, :]
  _, _, _, pc = _row_sums_offset(x_c, y, h, 1.0 / eps, centers, rs, cs, count, offset, valid)
  return out, jnp.where(live, pc, 0.0)
