"""The chunked log-sum-exp kernel behind every Sinkhorn solver in the project.

Convention (as GeomLoss ``SamplesLoss("sinkhorn", p=2)``): cost ``C(x, y) = ½‖x − y‖²`` and the
softmin ``softmin_ε(C, h)_i = −ε · log Σ_j exp(h_j − C_ij / ε)``.

Potentials are stored *folded*: ``f̂_i = f_i − ½‖x_i‖²`` and ``ĝ_j = g_j − ½‖y_j‖²``. Because
``C_ij = ½‖x_i‖² + ½‖y_j‖² − ⟨x_i, y_j⟩``, the softmin of the folded potentials is

    f̂_i = −ε · LSE_j( log b_j + ĝ_j / ε + ⟨x_i, y_j⟩ / ε ),

one matrix product and one log-sum-exp per block, with no ``‖x‖²/ε`` terms that would cancel
in float32 (the norm folding of FlashSinkhorn). The kernel walks over blocks of ``chunk`` rows of
``x`` with ``lax.map``, so it holds at most a ``[chunk, m]`` block, and its custom VJP recomputes
each block in the backward pass: memory ``O((n + m)·d + chunk·m)`` both ways.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gsae_jax.ot import validation

# A [chunk, m] float32 block of at most this many entries (4 MiB) stays in the CPU's L3 cache;
# bigger blocks make the two-pass LSE bandwidth-bound (BUILD_NOTES.md, "Softmin throughput" 2).
_BLOCK_ENTRIES = 1 << 20
# 256-row chunks measured fastest on a 2-core CPU (SPEC §2); larger chunks buy nothing there.
_DEFAULT_ROWS = 256
# Rows wider than this are reduced in two stages over equal column tiles: XLA's CPU backend
# evidently runs a wider row reduction on one core (BUILD_NOTES.md, "Softmin throughput" 2).
_MAX_TILE = 1 << 15


def default_chunk_size(n: int, m: int) -> int:
  """Rows of ``x`` per block: 256, fewer when ``m`` is so large that a block passes 4 MiB."""
  rows = min(_DEFAULT_ROWS, max(8, _BLOCK_ENTRIES // max(m, 1)))
  return max(1, min(rows, n))


def _pad_rows(a: jax.Array, chunk: int) -> tuple[jax.Array, int]:
  n = a.shape[0]
  n_pad = (-n) % chunk
  if n_pad:
    a = jnp.concatenate([a, jnp.zeros((n_pad,) + a.shape[1:], a.dtype)])
  return a.reshape((-1, chunk) + a.shape[1:]), n


# Up to this dimension the [c, m] logits are built by broadcast multiply-adds that XLA fuses
# with the max/exp (a matmul with inner size 2 was slower on CPU); the backward keeps matmuls,
# which were faster there (BUILD_NOTES.md, "Softmin throughput").
_BROADCAST_MAX_DIM = 4


def _block_logits(xc: jax.Array, y: jax.Array, h: jax.Array, inv_eps: jax.Array) -> jax.Array:
  # [c, *h.shape] = h_j + <x_i, y_j> / eps for columns y [m, d] (h [m]) or column tiles
  # y [T, t, d] (h [T, t]), with the scale applied to the small [c, d] side.
  xs = xc * inv_eps
  if xc.shape[1] > _BROADCAST_MAX_DIM:
    return h[None] + (xs @ y.reshape(-1, y.shape[-1]).T).reshape(xs.shape[:1] + h.shape)
  s = h[None]
  for k in range(xc.shape[1]):
    s = s + xs[:, k].reshape((-1,) + (1,) * h.ndim) * y[None, ..., k]
  return s


def _safe_max(s: jax.Array) -> jax.Array:
  mx = jnp.max(s, axis=-1)
  return jnp.where(jnp.isfinite(mx), mx, 0.0)


def _lse_last(s: jax.Array) -> jax.Array:
  mx = _safe_max(s)
  return mx + jnp.log(jnp.sum(jnp.exp(s - mx[..., None]), axis=-1))


def _column_tiles(y: jax.Array, h: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``[m, d], [m] -> [T, t, d], [T, t]``: equal tiles of ``t <= _MAX_TILE`` columns, padded
  with ``h = −inf`` (zero weight) columns."""
  m, d = y.shape
  n_tiles = -(-m // _MAX_TILE)
  tile = -(-m // n_tiles)
  pad = n_tiles * tile - m
  y = jnp.concatenate([y, jnp.zeros((pad, d), y.dtype)])
  h = jnp.concatenate([h, jnp.full((pad,), -jnp.inf, h.dtype)])
  return y.reshape(n_tiles, tile, d), h.reshape(n_tiles, tile)


def _lse_rows(x, y, h, eps, chunk):
  inv_eps = 1.0 / eps
  if y.shape[0] <= _MAX_TILE:
    # One tile; the tiled code with T = 1 was slower here (BUILD_NOTES.md).

    def block(xc):
      return _lse_last(_block_logits(xc, y, h, inv_eps))

  else:
    yt, ht = _column_tiles(y, h)

    def block(xc):
      # [c, T, t] logits in one fusion, LSE over each tile, then over the T tiles.
      return _lse_last(_lse_last(_block_logits(xc, yt, ht, inv_eps)))

  xs, n = _pad_rows(x, chunk)
  return jax.lax.map(block, xs).reshape(-1)[:n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _softmin(x, y, h, eps, chunk):
  return -eps * _lse_rows(x, y, h, eps, chunk)


def _softmin_fwd(x, y, h, eps, chunk):
  lse = _lse_rows(x, y, h, eps, chunk)
  # Keep the LSE itself: recovering it as out/ε costs ulp(LSE) in the exponents (BUILD_NOTES.md).
  return -eps * lse, (x, y, h, eps, lse)


def _softmin_bwd(chunk, res, ct):
  # With P_ij = softmax_j(h_j + <x_i, y_j>/eps) = exp(h_j + <x_i, y_j>/eps - LSE_i), out_i =
  # -eps * LSE_i and cotangent c_i:
  #   d/dx_i = -c_i (P y)_i,   d/dy_j = -Σ_i P_ij c_i x_i,   d/dh_j = -eps Σ_i P_ij c_i,
  #   d/deps = Σ_i c_i (out_i + <x_i, (P y)_i>) / eps.
  # Two passes that both reduce along the rows of their blocks: over row blocks of x for
  # (dx, deps), then over row blocks of y for (dy, dh), with x and y swapped and -LSE_i as the
  # column offset; one pass with a Pᵀw scan carry was slower (BUILD_NOTES.md). An empty row
  # (all h = -inf, LSE = -inf, out = +inf) has P = 0 and contributes nothing.
  x, y, h, eps, lse = res
  inv_eps = 1.0 / eps
  n, m = x.shape[0], y.shape[0]
  live = jnp.isfinite(lse)
  ct = jnp.where(live, ct, 0.0)
  xs, _ = _pad_rows(x, chunk)
  cts, _ = _pad_rows(ct, chunk)
  lses, _ = _pad_rows(jnp.where(live, lse, jnp.inf), chunk)  # +inf offset: P = 0 on empty rows

  def row_block(inputs):
    xc, ctc, lsec = inputs
    p = jnp.exp(_block_logits(xc, y, h, inv_eps) - lsec[:, None])
    py = p @ y  # [c, d]
    dx = -ctc[:, None] * py
    deps = jnp.sum(jnp.where(ctc != 0, ctc * (-eps * lsec + jnp.sum(xc * py, axis=1)), 0.0))
    return dx, deps

  dx, deps = jax.lax.map(row_block, (xs, cts, lses))
  neg_lse = jnp.where(live, -lse, -jnp.inf)

  col_chunk = max(1, min(chunk, default_chunk_size(m, n)))
  ys, _ = _pad_rows(y, col_chunk)
  hs, _ = _pad_rows(h, col_chunk)
  w = ct[:, None] * jnp.concatenate([x, jnp.full_like(x[:, :1], eps)], axis=1)  # [n, d + 1]

  def col_block(inputs):
    yc, hc = inputs
    p = jnp.exp(_block_logits(yc, x, neg_lse, inv_eps) + hc[:, None])  # [c, n] = Pᵀ rows
    return -(p @ w)  # (dy, dh)

  acc = jax.lax.map(col_block, (ys, hs)).reshape(-1, w.shape[1])[:m]
  dx = dx.reshape(-1, x.shape[1])[:n]
  return dx, acc[:, :-1], acc[:, -1], (jnp.sum(deps) * inv_eps).astype(jnp.result_type(eps))


_softmin.defvjp(_softmin_fwd, _softmin_bwd)


def _chunk(n: int, m: int, chunk_size: int | None) -> int:
  return default_chunk_size(n, m) if chunk_size is None else max(1, min(int(chunk_size), n))


def softmin_kernel(
  x: jax.Array, y: jax.Array, h: jax.Array, eps: jax.Array, chunk_size: int | None = None
) -> jax.Array:
  """:func:`softmin` without input checks: the engine's inner loops call this on validated,
  same-dtype arrays (``eps`` a positive scalar of ``x``'s dtype)."""
  return _softmin(x, y, h, eps, _chunk(x.shape[0], y.shape[0], chunk_size))


def _check_softmin_args(x, y, h, epsilon, chunk_size, extra=()):
  x = validation.as_array("x", x)
  y = validation.as_array("y", y)
  h = validation.as_array("h", h)
  for name, arr in (("x", x), ("y", y)):
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
      raise ValueError(f"`{name}` must be a non-empty [n, d] array of points, got {arr.shape}.")
  if y.shape[1] != x.shape[1]:
    raise ValueError(f"`x` and `y` must have the same dimension, got {x.shape} and {y.shape}.")
  if h.shape != (y.shape[0],):
    raise ValueError(f"`h` must be a [{y.shape[0]}] vector (one per row of `y`), got {h.shape}.")
  validation.check_scalar("epsilon", epsilon, low=0.0)
  validation.check_count("chunk_size", chunk_size, allow_none=True)
  dtype = validation.working_dtype(x.dtype, y.dtype, h.dtype, *(e.dtype for e in extra))
  eps = jnp.asarray(epsilon, dtype)
  return x.astype(dtype), y.astype(dtype), h.astype(dtype), eps


def softmin(
  x: jax.Array,
  y: jax.Array,
  h: jax.Array,
  epsilon: float | jax.Array,
  chunk_size: int | None = None,
) -> jax.Array:
  """Folded softmin ``f̂_i = −ε · log Σ_j exp(h_j + ⟨x_i, y_j⟩ / ε)``, chunked over rows of x.

  With ``h_j = log b_j + ĝ_j / ε`` (``ĝ = g − ½‖y‖²``) this returns ``f̂ = f − ½‖x‖²`` where
  ``f = softmin_ε(C, log b + g/ε)`` for ``C = ½‖x − y‖²`` (GeomLoss convention, Feydy et al.
  2019; the norm folding follows FlashSinkhorn). Differentiable in ``x, y, h, ε`` through a
  custom VJP that recomputes each block, so no ``[n, m]`` array exists in either pass. For
  ``m > 32 768`` the forward reduces each row in two stages over equal column tiles (a
  log-sum-exp per tile, then over tiles), which keeps both cores of a CPU busy.

  Inputs are computed in float32 (float64 if any is float64): integers and float16/bfloat16 are
  promoted. Shapes and a concrete ``epsilon`` are checked (``ValueError``/``TypeError``); a
  traced ``epsilon ≤ 0`` or non-finite gives NaN. A row whose ``h`` is all ``−inf`` has
  ``f̂_i = +inf`` and zero gradient.

  Args:
    x: ``[n, d]`` points on which the output lives.
    y: ``[m, d]`` points summed over.
    h: ``[m]`` log-weights plus folded potential over ``ε``; ``−inf`` entries are ignored.
    epsilon: positive scalar temperature.
    chunk_size: rows of ``x`` per block (static); default from :func:`default_chunk_size`.

  Returns:
    ``[n]`` folded potential ``f̂``.
  """
  x, y, h, eps = _check_softmin_args(x, y, h, epsilon, chunk_size)
  out = softmin_kernel(x, y, h, eps, chunk_size)
  return jnp.where((eps > 0) & jnp.isfinite(eps), out, jnp.nan)


def softmin_with_mean(
  x: jax.Array,
  y: jax.Array,
  h: jax.Array,
  epsilon: float | jax.Array,
  features: jax.Array,
  chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Folded softmin and the softmax-weighted mean of per-column features (forward only).

  Returns ``(f̂, M)`` with ``f̂`` as in :func:`softmin` and
  ``M_i = Σ_j π_ij features_j``, ``π_ij = softmax_j(h_j + ⟨x_i, y_j⟩ / ε)``: the conditional
  mean of ``features`` under row ``i`` of the plan, used for transport costs and barycentric
  maps without forming the plan. Inputs are checked as in :func:`softmin`.

  Args:
    x: ``[n, d]``; y: ``[m, d]``; h: ``[m]``; epsilon: scalar.
    features: ``[m, k]`` values attached to the points of ``y``.
    chunk_size: rows of ``x`` per block (static).

  Returns:
    ``([n], [n, k])``.
  """
  features = validation.as_array("features", features)
  x, y, h, eps = _check_softmin_args(x, y, h, epsilon, chunk_size, (features,))
  if features.ndim != 2 or features.shape[0] != y.shape[0]:
    raise ValueError(f"`features` must be [{y.shape[0]}, k], got {features.shape}.")
  f, mean = softmin_with_mean_kernel(x, y, h, eps, features.astype(x.dtype), chunk_size)
  ok = (eps > 0) & jnp.isfinite(eps)
  return jnp.where(ok, f, jnp.nan), jnp.where(ok, mean, jnp.nan)


def softmin_with_mean_kernel(x, y, h, eps, features, chunk_size=None):
  """:func:`softmin_with_mean` without input checks (validated, same-dtype arrays)."""
  n = x.shape[0]
  chunk = _chunk(n, y.shape[0], chunk_size)
  inv_eps = 1.0 / eps

  def block(xc):
    s = _block_logits(xc, y, h, inv_eps)
    mx = _safe_max(s)
    e = jnp.exp(s - mx[:, None])
    z = jnp.sum(e, axis=1)
    return -eps * (mx + jnp.log(z)), (e @ features) / z[:, None]

  xs, _ = _pad_rows(x, chunk)
  f, mean = jax.lax.map(block, xs)
  return f.reshape(-1)[:n], mean.reshape(n + (-n) % chunk, -1)[:n]
