"""Entropic OT at a fixed temperature: alternating log-domain Sinkhorn, warm-startable.

Cost ``C(x, y) = ½‖x − y‖²`` (GeomLoss convention). Two backends: ``dense`` (every pair, in
row chunks; potentials folded inside the loop, ``f̂ = f − ½‖x‖²``, :mod:`gsae_jax.ot.softmin`)
and ``multiscale`` (d ≤ 3: every softmin block-sparse over the tiles that the current
potentials make relevant, :mod:`gsae_jax.ot.multiscale`). Potentials are returned unfolded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gsae_jax.ot import multiscale, validation
from gsae_jax.ot.divergence import mass_violation, resolve_backend
from gsae_jax.ot.multiscale_divergence import _capacity_from_fraction, _fine_softmin, _Stats
from gsae_jax.ot.problem import OTProblem, SinkhornOutput
from gsae_jax.ot.softmin import softmin_kernel, softmin_with_mean_kernel

sg = jax.lax.stop_gradient


def sinkhorn(
  x: jax.Array,
  y: jax.Array,
  a: jax.Array | None = None,
  b: jax.Array | None = None,
  *,
  epsilon: float | jax.Array,
  tol: float | jax.Array = 1e-3,
  max_iter: int = 1000,
  init: tuple[jax.Array, jax.Array] | None = None,
  chunk_size: int | None = None,
  backend: str = "auto",
  truncate: float | jax.Array = multiscale.DEFAULT_TRUNCATE,
  block_size: int = 128,
  tile_fraction: float = 0.25,
) -> SinkhornOutput:
  """Entropic OT at a fixed ``ε`` by alternating log-domain Sinkhorn updates, warm-startable.

  Solves ``OT_ε(α, β) = min_P ⟨P, C⟩ + ε KL(P | α⊗β)`` for ``C = ½‖x − y‖²`` (Cuturi 2013 in
  log domain; GeomLoss cost convention). Updates ``f ← softmin_ε(C, log b + g/ε)``,
  ``g ← softmin_ε(Cᵀ, log a + f/ε)`` until the row-marginal L1 violation is below ``tol`` or
  ``max_iter`` pairs ran (``converged`` in the result says which); ``init=(f, g)`` starts from
  given potentials (e.g. the previous solution after a small move of the points). Chunked: no
  ``[n, m]`` matrix.

  ``backend="multiscale"`` (d ≤ 3) runs every softmin over the tiles of ``block_size²`` pairs
  that the current potentials cannot rule out: a dropped tile provably holds less than
  ``e^{−truncate}`` of each row's mass given the potentials it is chosen from
  (:func:`gsae_jax.ot.multiscale.select_tiles`), and a softmin whose result exceeds its rows'
  estimate by more than ``ε`` (far from the fixed point, e.g. a cold start at a small ``ε``)
  reruns with that result as the estimate, so the truncation is rigorous at every update; a
  tile list that overflows ``tile_fraction`` of all tiles runs that softmin densely
  and counts it in ``dense_fallbacks``. It pays when ``√ε`` is small against the clouds'
  extent (few tiles relevant); at a large ``ε`` every tile is relevant and ``dense`` is faster.
  ``"auto"`` picks it as :func:`gsae_jax.ot.resolve_backend` does (d ≤ 3 and
  ``n·m ≥ AUTO_MULTISCALE_PAIRS``). Gradients are envelope gradients in both backends.

  ``x, y, a, b, epsilon, tol, truncate`` and ``init`` are traced (a new ε does not
  recompile); ``max_iter``, ``chunk_size``, ``backend``, ``block_size`` and ``tile_fraction``
  are static. Bad shapes, a non-scalar or
  concrete non-positive/infinite ``epsilon``, non-finite concrete ``init`` and unequal masses
  raise ``ValueError``/``TypeError`` naming the argument; a traced ``epsilon`` or ``tol`` out
  of range, or a traced non-finite ``init``, makes every output NaN instead.

  Args:
    x: ``[n, d]``; y: ``[m, d]``; a: ``[n]``; b: ``[m]`` (uniform by default; ``Σa = Σb``).
    epsilon: positive finite scalar temperature.
    tol: target L1 marginal violation. max_iter: cap on update pairs (static).
    init: optional ``(f [n], g [m])`` true potentials to start from (default zeros).
    chunk_size: rows per dense softmin block (static).
    backend: ``"auto"``, ``"dense"`` or ``"multiscale"`` (static).
    truncate: ``multiscale``: ``T`` of the tile test (traced).
    block_size: ``multiscale``: points per block (static).
    tile_fraction: ``multiscale``: capacity of each tile list as a fraction of all tiles
      (static).

  Returns:
    A :class:`~gsae_jax.ot.problem.SinkhornOutput`.
  """
  x, y, a, b = validation.validate_inputs(x, y, a, b)
  validation.check_equal_mass(a, b)
  validation.check_scalar("epsilon", epsilon, low=0.0)
  validation.check_scalar("tol", tol, low=0.0)
  max_iter = validation.check_count("max_iter", max_iter)
  chunk_size = validation.check_count("chunk_size", chunk_size, allow_none=True)
  validation.check_scalar("truncate", truncate, low=0.0)
  block_size = validation.check_count("block_size", block_size)
  validation.check_scalar("tile_fraction", tile_fraction, low=0.0, high=1.0, open_high=False)
  n, m = x.shape[0], y.shape[0]
  backend = resolve_backend(backend, n, m, x.shape[1])
  if init is None:
    f0, g0 = jnp.zeros((n,), x.dtype), jnp.zeros((m,), x.dtype)
  else:
    if not isinstance(init, tuple | list) or len(init) != 2:
      raise ValueError(f"`init` must be a pair (f [{n}], g [{m}]), got {type(init).__name__}.")
    f0, g0 = (validation.as_array("init", t).astype(x.dtype) for t in init)
    if f0.shape != (n,) or g0.shape != (m,):
      raise ValueError(f"`init` must be (f [{n}], g [{m}]), got {f0.shape}, {g0.shape}.")
    if validation.is_concrete(f0, g0) and not (
      np.all(np.isfinite(validation.host(f0))) and np.all(np.isfinite(validation.host(g0)))
    ):
      raise ValueError("`init` potentials contain NaN or inf.")
  eps = jnp.asarray(epsilon, x.dtype)
  tol = jnp.asarray(tol, x.dtype)
  problem = OTProblem(x, y, a, b)
  if backend == "multiscale":
    return _multiscale_sinkhorn(
      problem,
      eps,
      tol,
      f0,
      g0,
      jnp.asarray(truncate, x.dtype),
      max_iter=max_iter,
      chunk_size=chunk_size,
      block_size=block_size,
      tile_fraction=float(tile_fraction),
    )
  return _dense_sinkhorn(problem, eps, tol, f0, g0, max_iter=max_iter, chunk_size=chunk_size)


def _inputs_ok(problem: OTProblem, eps, tol, f0, g0, *extra) -> jax.Array:
  """In-graph checks of the traced inputs shared by both backends (the NaN contract)."""
  sa, sb = jnp.sum(problem.a), jnp.sum(problem.b)
  return validation.in_graph_ok(
    (eps > 0) & jnp.isfinite(eps),
    (tol > 0) & jnp.isfinite(tol),
    jnp.isfinite(f0),
    jnp.isfinite(g0),
    jnp.abs(sa - sb) <= validation.MASS_RTOL * jnp.maximum(sa, sb),
    *extra,
  )


@functools.partial(jax.jit, static_argnames=("max_iter", "chunk_size"))
def _dense_sinkhorn(problem: OTProblem, eps, tol, f0, g0, *, max_iter, chunk_size):
  a, b = problem.a, problem.b
  ok = _inputs_ok(problem, eps, tol, f0, g0)
  c = problem.centered()
  x, y = c.x, c.y
  la, lb = problem.log_a, problem.log_b
  hx2 = 0.5 * jnp.sum(x * x, axis=1)
  hy2 = 0.5 * jnp.sum(y * y, axis=1)
  xs, ys, las, lbs = sg(x), sg(y), sg(la), sg(lb)
  eps_s = sg(jnp.where(ok, eps, 1.0))  # a bad ε runs no loop (the outputs are NaN)
  tol_s = jnp.where(ok, tol, jnp.inf)

  smin_x = lambda gh: softmin_kernel(xs, ys, lbs + gh / eps_s, eps_s, chunk_size)  # f̂ from ĝ
  smin_y = lambda fh: softmin_kernel(ys, xs, las + fh / eps_s, eps_s, chunk_size)  # ĝ from f̂

  # The carry holds (f̂, ĝ), the f-update f̃ that ĝ implies, and the row violation of the plan
  # (f̂, ĝ) measured with it, so the loop stops on the potentials it returns.
  def cond(c):
    k, _, _, _, viol = c
    return (k < max_iter) & (viol > tol_s)

  def body(c):
    k, _, _, f_next, _ = c
    gh = smin_y(f_next)
    f_after = smin_x(gh)
    return k + 1, f_next, gh, f_after, mass_violation(las, f_next, f_after, eps_s)

  fh0, gh0 = sg(f0) - hx2, sg(g0) - hy2
  f_next0 = smin_x(gh0)
  viol0 = mass_violation(las, fh0, f_next0, eps_s)
  k, fh, gh, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), fh0, gh0, f_next0, viol0))
  fh, gh = sg(fh), sg(gh)

  # Row marginal and transport cost of the plan (fh, gh), without forming it.
  feats = jnp.concatenate([ys, sg(hy2)[:, None]], axis=1)
  ft, mean = softmin_with_mean_kernel(xs, ys, lbs + gh / eps_s, eps_s, feats, chunk_size)
  row_mass = a * jnp.exp((fh - ft) / eps_s)
  viol = jnp.sum(jnp.abs(row_mass - a))
  cost_rows = sg(hx2) + mean[:, -1] - jnp.sum(xs * mean[:, :-1], axis=1)
  transport = jnp.sum(sg(row_mass) * cost_rows)

  # Envelope-differentiable dual value, as in the divergence's last extrapolation.
  f_ext = hx2 + softmin_kernel(x, ys, lbs + gh / eps, eps, chunk_size)
  g_ext = hy2 + softmin_kernel(y, xs, las + fh / eps, eps, chunk_size)
  reg = jnp.sum(a * f_ext) + jnp.sum(b * g_ext)
  nan = lambda v: jnp.where(ok, v, jnp.nan)
  return SinkhornOutput(
    f=nan(fh + sg(hx2)),
    g=nan(gh + sg(hy2)),
    reg_ot_cost=nan(reg),
    transport_cost=nan(transport),
    iterations=k,
    marginal_violation=nan(viol),
    converged=ok & (viol <= tol),
    dense_fallbacks=jnp.int32(0),
    kept_tile_fraction=jnp.asarray(1.0, x.dtype),
    backend="dense",
  )


def _checked_softmin(rows, cols, f_est, g, eps, truncate, capacity, chunk, stats):
  """:func:`_fine_softmin` whose tile test holds whatever the estimate ``f_est``.

  The test drops a tile whose mass, relative to ``e^{f_est/ε}``, is below ``e^{−T}``: rigorous
  only if ``f_est`` is not below the result. Far from the fixed point (a cold start at a
  small ``ε``) it is, by many ``ε``, and the dropped tiles carried the rows' mass (at
  n = 60 000 the value went negative). So the first pass runs at ``T + 1``; if a row's result
  exceeds its estimate by more than ``ε``, the softmin reruns at ``T`` with the result as the
  estimate: a softmin over a subset of the tiles bounds the true one from above.
  """
  f1, stats = _fine_softmin(rows, cols, f_est, g, eps, truncate + 1.0, capacity, chunk, stats)
  low = jnp.any(rows.valid & (sg(f1) > sg(f_est) + eps))

  def rerun(stats):
    est = jnp.maximum(sg(f_est), sg(f1))
    return _fine_softmin(rows, cols, est, g, eps, truncate, capacity, chunk, stats)

  return jax.lax.cond(low, rerun, lambda stats: (f1, stats), stats)


@functools.partial(
  jax.jit, static_argnames=("max_iter", "chunk_size", "block_size", "tile_fraction")
)
def _multiscale_sinkhorn(
  problem: OTProblem,
  eps,
  tol,
  f0,
  g0,
  truncate,
  *,
  max_iter,
  chunk_size,
  block_size,
  tile_fraction,
):
  # The dense solver's loop and outputs with true potentials in block layout and block-sparse
  # softmins; each softmin's tiles are chosen from the potentials of its rows and columns.
  a, b = problem.a, problem.b
  ok = _inputs_ok(problem, eps, tol, f0, g0, (truncate > 0) & jnp.isfinite(truncate))
  c = problem.centered()
  x, y = c.x, c.y
  bx = multiscale.make_blocks(sg(x), sg(problem.log_a), block_size)
  by = multiscale.make_blocks(sg(y), sg(problem.log_b), block_size)
  nbx, nby = bx.valid.shape[0], by.valid.shape[0]
  cap_x = _capacity_from_fraction(nbx, nby, tile_fraction)  # rows x, columns y
  cap_y = _capacity_from_fraction(nby, nbx, tile_fraction)
  eps_s = sg(jnp.where(ok, eps, 1.0))  # a bad ε runs no loop (the outputs are NaN)
  tol_s = jnp.where(ok, tol, jnp.inf)
  trunc = jnp.where(ok, truncate, 1.0)

  def smin_x(g, f_est, stats):  # f̃ on x from g on y
    return _checked_softmin(bx, by, f_est, g, eps_s, trunc, cap_x, chunk_size, stats)

  def smin_y(f, g_est, stats):  # g̃ on y from f on x
    return _checked_softmin(by, bx, g_est, f, eps_s, trunc, cap_y, chunk_size, stats)

  def viol_of(f, f_next):
    return mass_violation(bx.log_weights, f, f_next, eps_s)

  # The carry as in the dense solver: (f, g), the f-update f̃ that g implies, the violation of
  # the plan (f, g) measured with it, and the tile statistics.
  def cond(carry):
    k, _, _, _, viol, _ = carry
    return (k < max_iter) & (viol > tol_s)

  def body(carry):
    k, _, g, f_next, _, stats = carry
    g_new, stats = smin_y(f_next, g, stats)
    f_after, stats = smin_x(g_new, f_next, stats)
    return k + 1, f_next, g_new, f_after, viol_of(f_next, f_after), stats

  dtype = x.dtype
  stats0 = _Stats(jnp.int32(0), jnp.asarray(0, dtype), jnp.asarray(0, dtype))
  fb0, gb0 = multiscale.to_blocks(bx, sg(f0)), multiscale.to_blocks(by, sg(g0))
  f_next0, stats0 = smin_x(gb0, fb0, stats0)
  carry0 = (jnp.int32(0), fb0, gb0, f_next0, viol_of(fb0, f_next0), stats0)
  k, fb, gb, f_last, _, stats = jax.lax.while_loop(cond, body, carry0)
  fb, gb = sg(fb), sg(gb)
  # f_last, the softmin of g over a subset of the tiles, bounds the true one from above: with
  # it as the rows' estimate the tile test below is rigorous even before convergence.
  f_est = jnp.maximum(fb, sg(f_last))

  # Row marginal and transport cost of the plan (f, g) over its relevant tiles.
  tiles = multiscale.select_tiles(bx, by, f_est, gb, eps_s, trunc, cap_x)

  def sparse_cost(_):
    return multiscale.block_sparse_row_cost(bx, by, gb, eps_s, tiles, f_estimate=f_est)

  def dense_cost(_):
    pts, lw = (t.reshape(-1, t.shape[-1]) for t in (by.points, by.log_weights[..., None]))
    rows = bx.points.reshape(-1, bx.points.shape[-1])
    hy2 = 0.5 * jnp.sum(pts * pts, axis=1)
    feats = jnp.concatenate([pts, hy2[:, None]], axis=1)
    h = lw[:, 0] + (jnp.where(by.valid.reshape(-1), gb.reshape(-1), 0.0) - hy2) / eps_s
    ft, mean = softmin_with_mean_kernel(rows, pts, h, eps_s, feats, chunk_size)
    hx2 = 0.5 * jnp.sum(rows * rows, axis=1)
    cost = hx2 + mean[:, -1] - jnp.sum(rows * mean[:, :-1], axis=1)
    return (ft + hx2).reshape(fb.shape), cost.reshape(fb.shape)

  ft, cost_rows = jax.lax.cond(multiscale.overflowed(tiles), dense_cost, sparse_cost, None)
  a_blk = multiscale.to_blocks(bx, sg(a))
  row_mass = jnp.where(bx.valid, a_blk * jnp.exp((fb - ft) / eps_s), 0.0)
  viol = jnp.sum(jnp.abs(row_mass - a_blk))
  transport = jnp.sum(row_mass * cost_rows)

  # Envelope-differentiable dual value: one more softmin per side with the live points as
  # rows (columns and potentials stopped), as the divergence's final extrapolation.
  live_x = bx._replace(points=multiscale.to_blocks(bx, x))
  live_y = by._replace(points=multiscale.to_blocks(by, y))
  f_ext, stats = _fine_softmin(live_x, by, f_est, gb, eps, trunc, cap_x, chunk_size, stats)
  g_ext, stats = _checked_softmin(live_y, bx, gb, fb, eps, trunc, cap_y, chunk_size, stats)
  reg = jnp.sum(multiscale.to_blocks(bx, a) * f_ext) + jnp.sum(multiscale.to_blocks(by, b) * g_ext)
  nan = lambda v: jnp.where(ok, v, jnp.nan)
  return SinkhornOutput(
    f=nan(multiscale.from_blocks(bx, fb)),
    g=nan(multiscale.from_blocks(by, gb)),
    reg_ot_cost=nan(reg),
    transport_cost=nan(transport),
    iterations=k,
    marginal_violation=nan(viol),
    converged=ok & (viol <= tol),
    dense_fallbacks=stats.fallbacks,
    kept_tile_fraction=stats.kept / jnp.maximum(stats.total, 1),
    backend="multiscale",
  )
