"""The ``multiscale`` backend of the Sinkhorn divergence (d ≤ 3).

Same divergence, schedule and update order as the dense backend (GeomLoss
``SamplesLoss("sinkhorn", p=2)``, Feydy et al. 2019; cost ``C = ½‖x − y‖²``, ``ε = blur²``),
with two scales, as GeomLoss's ``multiscale`` backend:

1. **Coarse phase.** While ``√ε`` is at least the cell side of static nested ``K^d`` grids
   (:mod:`gsae_jax.ot.clusters`; 64², 128², 256² cells in 2-D, 64² and 256² with
   ``coarse="accurate"``, 16³ in 3-D), the annealing runs on the cells' mass-weighted
   centroids, each level on the coarsest grid fine enough for it (``_GRIDS``), through the
   same block-sparse softmin as the points: the occupied cells first
   along the grid's Hilbert curve, the empty ones marked invalid, so only occupied cells and
   their relevant tiles cost anything; tiles whose blocks are small against ``√ε`` are summed
   by their Taylor expansion (``block_sparse_softmin(..., taylor=True)``).
2. **Jumps.** Each potential moves to the next grid's cells, and from the finest grid to the
   points, as its cell's coarse value plus the within-cell variation of one fresh
   (block-sparse) softmin of the new rows against the centroids, which keeps the lag of the
   annealed potentials (GeomLoss's bare softmin extrapolation does not; BUILD_NOTES.md,
   "Multiscale backend").
3. **Fine phase.** Every later update, the final extrapolation and the converged-mode tail
   use the block-sparse softmin of :mod:`gsae_jax.ot.multiscale`: the tiles are selected
   afresh from the current potentials for every softmin (:func:`multiscale.select_tiles`),
   a dropped tile provably carries less than ``e^{−T}`` of each row's mass (``truncate=T``),
   and the current potentials also serve as the one-pass kernel's offset. A tile list that
   overflows its static capacity makes that softmin run densely (``lax.cond``), and the
   result counts it in ``dense_fallbacks``: never a silent loss of tiles.

Warm start (``init``): steps 1–2 are skipped; the fine loop starts in the converged-mode tail
from the given potentials (a redrawn target's potential first gets one softmin of ``f_ba``,
its tiles chosen from :func:`multiscale.softmin_upper_bound`).

Gradients: ``envelope`` only (the final extrapolation runs the block-sparse softmin with live
row points; its custom VJP recomputes the tiles).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gsae_jax.ot import clusters, multiscale
from gsae_jax.ot.divergence import check_and_schedule, init_ok, mass_violation
from gsae_jax.ot.problem import DivergenceOutput, DivergenceSettings, OTProblem
from gsae_jax.ot.softmin import softmin_kernel

sg = jax.lax.stop_gradient

# The coarse grids per `coarse` setting and d, coarse to fine, as (K, J): a static K^d grid
# over the joint box whose levels run while √ε ≥ J of its cell sides. Only occupied cells cost
# anything; the finest grid moves the jump to the points to a smaller ε, where the fine levels
# are sparser, and the coarser ones keep the large-ε levels (every cell pair relevant) cheap.
# "fast": in d = 3 jumping at one cell left the gradient 8–19 % off dense (n = 1 500), at four
# within 5 %; the 64² grid stops at eight cells: at one it moved the isolated-outlier case
# 15 % from dense, at eight 5 %. The annealed value keeps a bias from each jump between grids
# taken at J ≤ 16 (J = 8: ≈ 1e-6, n-independent; J = 32: none measurable), so "accurate" runs
# the 256² grid from 32 cells of the 64² grid down; in d = 3 its 16³ grid hands over to the
# points at eight cells (four left the outlier case 6 % off; BUILD_NOTES.md, "Multiscale").
_FAST_GRIDS = {1: ((4096, 1.0),), 2: ((64, 8.0), (128, 1.0), (256, 1.0)), 3: ((16, 4.0),)}
_GRIDS = {
  "fast": _FAST_GRIDS,
  "accurate": {**_FAST_GRIDS, 2: ((64, 32.0), (256, 1.0)), 3: ((16, 8.0),)},
}
# Cells per block of the coarse cloud.
_CELL_BLOCK = 128


def _capacity_from_fraction(n_row_blocks: int, n_col_blocks: int, fraction: float) -> int:
  """Static length of a tile list: ``⌈fraction · nbx · nby⌉`` (at least one tile per row)."""
  tiles = n_row_blocks * n_col_blocks
  return max(n_row_blocks, min(tiles, math.ceil(fraction * tiles)))


class _Stats(NamedTuple):
  fallbacks: jax.Array  # int32: softmins that overflowed their tile list and ran densely
  kept: jax.Array  # float: Σ kept tiles over the block-sparse softmins
  total: jax.Array  # float: Σ tiles those softmins could have used


def _dense_true(rows, cols, col_log_w, g, eps, chunk):
  """Dense softmin of *true* potentials: ``−ε log Σ_j exp(log w_j + (g_j − C_ij)/ε)``."""
  h = col_log_w + (g - 0.5 * jnp.sum(cols * cols, axis=1)) / eps
  return softmin_kernel(rows, cols, h, eps, chunk) + 0.5 * jnp.sum(rows * rows, axis=1)


def _flat(blocks: multiscale.Blocks):
  d = blocks.points.shape[-1]
  return blocks.points.reshape(-1, d), blocks.log_weights.reshape(-1)


def _pad_blocks(blocks: multiscale.Blocks, nb: int) -> multiscale.Blocks:
  """Appends massless blocks (copies of the last point, log-weight −inf) up to ``nb`` blocks,
  so that both clouds share one block shape and the four softmins one compiled kernel."""
  extra = nb - blocks.valid.shape[0]
  if extra == 0:
    return blocks
  last = blocks.points[-1, -1]
  bs, d = blocks.points.shape[1:]
  cat = lambda a, fill: jnp.concatenate([a, jnp.broadcast_to(fill, (extra,) + a.shape[1:])])
  return multiscale.Blocks(
    points=cat(blocks.points, last),
    log_weights=cat(blocks.log_weights, jnp.asarray(-jnp.inf, blocks.log_weights.dtype)),
    valid=cat(blocks.valid, False),
    perm=blocks.perm,
    lo=cat(blocks.lo, jax.lax.stop_gradient(last)),
    hi=cat(blocks.hi, jax.lax.stop_gradient(last)),
  )


def _cell_blocks(grid: clusters.Grid, centroids, log_mass, max_cells: int):
  """The grid's cells as a cloud in block layout: the occupied cells first, along the Hilbert
  curve of their integer coordinates (so a block is a compact patch), then empty ones, marked
  not valid (never computed as rows, massless as columns). A cloud of n points occupies at
  most n cells, so only the first ``max_cells`` (≥ n) sorted cells are kept: at small n the
  fine grids cost what the points do, not ``K^d``.

  Returns ``(blocks, slot)``: ``slot [K^d]`` is each cell's flat position in the block layout
  (occupied cells only are meaningful; the others are clipped into range)."""
  k = grid.per_axis
  n_cells, d = centroids.shape
  flat = jnp.arange(n_cells, dtype=jnp.int32)
  digits = (flat[:, None] // (k ** jnp.arange(d - 1, -1, -1, dtype=jnp.int32))) % k
  key = multiscale.hilbert_index(digits.astype(jnp.uint32), max(1, (k - 1).bit_length()))
  occupied = log_mass > -jnp.inf
  order = jnp.lexsort((key, ~occupied))[:max_cells]
  slot = jnp.full((n_cells,), max_cells - 1, jnp.int32).at[order].set(flat[:max_cells])
  blocks = multiscale.make_blocks(
    centroids[order],
    log_mass[order],
    _CELL_BLOCK,
    perm=jnp.arange(order.shape[0], dtype=jnp.int32),
    valid=occupied[order],
  )
  return blocks, slot


def _prefix_sizes(n_blocks: int, grid_blocks: int) -> tuple[int, ...]:
  """Static block counts for a cell cloud's occupied prefix, small to large: a third of its
  ``n_blocks`` and all of them, where the cloud was cut to n points (``n_blocks`` below the
  grid's ``grid_blocks``) and has at least 64 blocks; else all only. A cloud of n points then
  occupies far fewer cells than n (a flower sample of 60 000 points 13 % of the 256² grid's
  first n cells, N(0.5, 1.5² I) 23 %). Each size compiles its own coarse softmins, and at
  n ≥ K^d, where the clouds fill more of the grid, the small size measured no faster."""
  if 64 <= n_blocks < grid_blocks:
    return (-(-n_blocks // 3), n_blocks)
  return (n_blocks,)


def _prefix(stacked: multiscale.Blocks, m: int) -> multiscale.Blocks:
  """The first ``m`` blocks of each side of a stacked cloud."""
  return jax.tree_util.tree_map(lambda a: a[:, :m], stacked)


def _stack(*blocks: multiscale.Blocks) -> multiscale.Blocks:
  """Blocks of equal shape stacked on a leading side axis (``perm`` dropped: per cloud)."""
  return multiscale.Blocks(
    *(jnp.stack([getattr(b, f) for b in blocks]) for f in ("points", "log_weights", "valid")),
    perm=jnp.zeros((len(blocks), 0), jnp.int32),
    lo=jnp.stack([b.lo for b in blocks]),
    hi=jnp.stack([b.hi for b in blocks]),
  )


def _side(stacked: multiscale.Blocks, s) -> multiscale.Blocks:
  return jax.tree_util.tree_map(lambda a: a[s], stacked)


# Side s updates potential s (f_ba, g_ab, f_aa, g_bb) on rows ROWS[s] from potential COLS[s].
_ROW_CLOUD = (0, 1, 0, 1)  # 0 = x, 1 = y
_COL_CLOUD = (1, 0, 0, 1)
_COL_POT = (1, 0, 2, 3)


def _fine_softmin(
  rows, cols, f_rows, g_cols, eps, truncate, capacity, chunk, stats: _Stats, taylor=False
):
  """Block-sparse softmin of ``g_cols`` onto the rows, tiles chosen from ``(f_rows, g_cols)``;
  the dense kernel when the tile list overflows. Returns ``(f̃ [nb, B], stats)``."""
  with jax.named_scope("select_tiles"):
    tiles = multiscale.select_tiles(rows, cols, sg(f_rows), sg(g_cols), sg(eps), truncate, capacity)
  over = multiscale.overflowed(tiles)
  g = jnp.where(cols.valid, g_cols, 0.0)

  def sparse(_):
    # Columns are always stopped here (envelope gradients flow through the rows only).
    return multiscale.block_sparse_softmin(
      rows, cols, g, eps, tiles, f_estimate=sg(f_rows), column_grad=False, taylor=taylor
    )

  def dense(_):
    r, _ = _flat(rows)
    c, lw = _flat(cols)
    return _dense_true(r, c, lw, g.reshape(-1), eps, chunk).reshape(rows.valid.shape)

  out = jax.lax.cond(over, dense, sparse, None)
  stats = _Stats(
    stats.fallbacks + over.astype(jnp.int32),
    stats.kept + jnp.minimum(tiles.count, capacity).astype(stats.kept.dtype),
    stats.total + rows.valid.shape[0] * cols.valid.shape[0],
  )
  return out, stats


def multiscale_backend(problem: OTProblem, s: DivergenceSettings, init=None) -> DivergenceOutput:
  """``(problem, settings, init) -> DivergenceOutput`` for ``backend="multiscale"`` (envelope
  only); ``init``: warm-start potentials from :func:`gsae_jax.ot.divergence.check_init`."""
  dtype = problem.x.dtype
  c = problem.centered()
  x, y = c.x, c.y
  la, lb = problem.log_a, problem.log_b
  d = x.shape[1]
  chk = check_and_schedule(x, y, problem, s)
  ok, blur, scaling, tol, truncate = chk.ok, chk.blur, chk.scaling, chk.tol, chk.truncate
  ok = ok & init_ok(init)
  diam, n_mid = chk.schedule.diam, chk.schedule.n_mid
  n_sched = chk.schedule.n_sched
  eps_k = chk.schedule.epsilon
  chunk = s.chunk_size
  n_sides = 3 if s.static_b else 4

  # ---- layout: Hilbert-sorted blocks of each cloud (stopped), one shape for both clouds.
  xs, ys, las, lbs = sg(x), sg(y), sg(la), sg(lb)
  bx = multiscale.make_blocks(xs, las, s.block_size)
  by = multiscale.make_blocks(ys, lbs, s.block_size)
  nb = max(bx.valid.shape[0], by.valid.shape[0])
  bx, by = _pad_blocks(bx, nb), _pad_blocks(by, nb)
  clouds = (bx, by)
  rows_all = _stack(*(clouds[i] for i in _ROW_CLOUD[:n_sides]))
  cols_all = _stack(*(clouds[i] for i in _COL_CLOUD[:n_sides]))
  col_pot = jnp.asarray(_COL_POT[:n_sides], jnp.int32)
  row_lw = rows_all.log_weights
  capacity = _capacity_from_fraction(nb, nb, s.tile_fraction)

  def side_softmin(
    side, row_clouds, col_clouds, pots, eps, cap, stats, rows=None, est=None, taylor=False
  ):
    # Side `side`'s softmin: its potential's update from its column potential, with the rows'
    # current potential (or `est`) as the tile test's and the one-pass kernel's estimate.
    rows = _side(row_clouds, side) if rows is None else rows
    f_rows = pots[side] if est is None else est
    col_side, g_cols = _side(col_clouds, side), pots[col_pot[side]]
    return _fine_softmin(
      rows, col_side, f_rows, g_cols, eps, truncate, cap, chunk, stats, taylor=taylor
    )

  def fresh(side, pots, eps, stats, rows=None):
    return side_softmin(side, rows_all, cols_all, pots, eps, capacity, stats, rows=rows)

  def cold_start():
    """The coarse phase and the jumps: ``(updates run, potentials [4, nb, B], stats)``."""
    # ---- coarse phase: the annealing on the cell centroids of nested grids (true
    # potentials), through the same block-sparse softmin: occupied cells first in Hilbert
    # order, empty cells invalid (never computed, never a column), so only occupied cells cost
    # anything. Each level runs on the coarsest grid whose cell is at most √ε / its J (_GRIDS).
    # Per grid: (grid, cells and slots of x and y, rows and columns per side, prefix, n_end).
    levels = []
    for per_axis, jump_cells in _GRIDS[s.coarse][d]:
      grid = clusters.make_grid(xs, ys, per_axis)
      max_cells = min(per_axis**d, -(-max(x.shape[0], y.shape[0]) // _CELL_BLOCK) * _CELL_BLOCK)
      cells, slots = zip(
        *(
          _cell_blocks(grid, *clusters.cluster(grid, p, lw), max_cells)
          for p, lw in ((xs, las), (ys, lbs))
        ),
        strict=True,
      )
      c_rows = _stack(*(cells[i] for i in _ROW_CLOUD[:n_sides]))
      c_cols = _stack(*(cells[i] for i in _COL_CLOUD[:n_sides]))
      # Schedule entries with σ ≥ jump_cells · cell: the init at D², then the intermediate
      # σ_k = D·scaling^(k−1) ≥ that; the last update (ε = blur²) is always on the points.
      ratio = (jnp.log(jump_cells * grid.cell) - jnp.log(diam)) / jnp.log(scaling)
      n_mid_here = jnp.clip(jnp.floor(ratio) + 1, 0, n_mid).astype(jnp.int32)
      # Which prefix of the cell blocks the coarse softmins run on (coarse_update), once per grid.
      sizes = _prefix_sizes(cells[0].valid.shape[0], -(-(per_axis**d) // _CELL_BLOCK))
      occupied = jnp.max(jnp.stack([jnp.sum(jnp.any(c.valid, axis=1)) for c in cells]))
      prefix = (sizes, jnp.sum(occupied > jnp.asarray(sizes[:-1], jnp.int32)))
      n_end = jnp.minimum(1 + n_mid_here, n_sched - 1)
      levels.append((grid, cells, slots, c_rows, c_cols, prefix, n_end))

    def coarse_update(level, pots, eps):  # [4, nbc, Bc] -> [n_sides, nbc, Bc]
      """One softmin per side on ``level``'s cells. The occupied cells come first, so the
      blocks past them are empty: the softmins run on the first ``m`` blocks, the smallest
      of :func:`_prefix_sizes` that holds them all (``lax.switch``), which spares the tile
      selection its ``O(nbc²)`` passes over empty blocks; the empty rows get zeros."""
      _, cells, _, c_rows, c_cols, (sizes, index), _ = level

      def update(m):
        rows, cols = _prefix(c_rows, m), _prefix(c_cols, m)

        def step(_, side):
          out = side_softmin(side, rows, cols, pots[:, :m], eps, m * m, zero_stats, taylor=True)
          return None, out[0]

        new = jax.lax.scan(step, None, jnp.arange(n_sides))[1]
        return jnp.zeros((n_sides,) + cells[0].valid.shape, dtype).at[:, :m].set(new)

      return jax.lax.switch(index, [lambda m=m: update(m) for m in sizes])

    def anneal(level, k, pots):
      def body(carry):
        k, pots = carry
        new = coarse_update(level, pots, eps_k(k))
        return k + 1, pots.at[:n_sides].set(0.5 * (pots[:n_sides] + new))

      return jax.lax.while_loop(lambda c: c[0] < level[-1], body, (k, pots))

    def jump(level, pots, new_clouds, new_rows, eps):
      """Potentials on the rows of ``new_clouds`` (the next grid's cells, or the points;
      ``new_rows`` their per-side stack) from those of ``level``'s grid. The
      annealed potentials lag (each is the average of the previous one and a fresh softmin),
      so a bare softmin of the coarse potentials would jump to another trajectory. Instead
      each row takes its cell's coarse value plus the within-cell variation of the fresh
      softmin: f(x_i) = F(c_i) + S(G)(x_i) − S(G)(c_i)."""
      grid, cells, slots, _, c_cols, _, _ = level
      fresh_c = coarse_update(level, pots, eps)
      # Per side, in the block layout's flat order: the coarse potential and the fresh softmin.
      own_cells, fresh_cells = (v[:n_sides].reshape(n_sides, -1) for v in (pots, fresh_c))
      pts = jnp.stack([_flat(b)[0] for b in new_clouds])  # [2, nb'·B', d]
      # Each new row's slot in its own cloud's cell layout of this grid.
      slot_of = jnp.stack(
        [sl[clusters.cell_index(grid, p)] for sl, p in zip(slots, pts, strict=True)]
      )
      slot_of = slot_of[jnp.asarray(_ROW_CLOUD[:n_sides])]
      nb_new, nbc = new_clouds[0].valid.shape[0], cells[0].valid.shape[0]

      def jump_side(_, side):
        own = own_cells[side][slot_of[side]].reshape(nb_new, -1)
        at_c = fresh_cells[side][slot_of[side]].reshape(nb_new, -1)
        fresh_p, _ = side_softmin(
          side, new_rows, c_cols, pots, eps, nb_new * nbc, zero_stats, est=at_c
        )
        return None, own + fresh_p - at_c

      jumped = jax.lax.scan(jump_side, None, jnp.arange(n_sides))[1]  # [n_sides, nb', B']
      return jnp.zeros((4,) + jumped.shape[1:], dtype).at[:n_sides].set(jumped)

    k = jnp.int32(0)
    for g, level in enumerate(levels):
      grid, cells, _, c_rows, _, _, _ = level
      with jax.named_scope("coarse"), jax.named_scope(f"grid{grid.per_axis}"):
        if g == 0:
          zeros_c = jnp.zeros((4,) + cells[0].valid.shape, dtype)
          pots = zeros_c.at[:n_sides].set(coarse_update(level, zeros_c, diam**2))
        else:  # onto this grid's cells, at the ε of the last level run
          pots = jump(levels[g - 1], pots, cells, c_rows, eps_run(k))
        k, pots = anneal(level, k, pots)
    with jax.named_scope("jump"):
      pots = jump(levels[-1], pots, clouds, rows_all, eps_run(k))
    return k, pots, zero_stats

  def eps_run(k):
    """ε of the last schedule entry run after ``k`` updates (the init's D² before any)."""
    return jnp.where(k > 0, eps_k(jnp.maximum(k - 1, 0)), diam**2)

  def warm_start():
    """``init`` in block layout; a target sample with no potential gets the softmin of
    ``f_ba``, its tiles chosen from an upper bound of that softmin (rigorous)."""
    eps = blur**2
    blk = lambda t, cloud: multiscale.to_blocks(clouds[cloud], sg(t))
    zeros_y = jnp.zeros(by.valid.shape, dtype)
    f_ba, g_ab, f_aa, g_bb = init
    pots = jnp.stack(
      [
        blk(f_ba, 0),
        zeros_y if g_ab is None else blk(g_ab, 1),
        blk(f_aa, 0),
        zeros_y if g_bb is None else blk(g_bb, 1),
      ]
    )
    stats = zero_stats
    if g_ab is None:  # side 1: rows y, columns x with f_ba
      est = multiscale.softmin_upper_bound(by, bx, pots[0], eps)
      g_new, stats = side_softmin(1, rows_all, cols_all, pots, eps, capacity, stats, est=est)
      pots = pots.at[1].set(g_new)
    return n_sched, pots, stats

  zero_stats = _Stats(jnp.int32(0), jnp.asarray(0, dtype), jnp.asarray(0, dtype))
  k, pots, stats0 = cold_start() if init is None else warm_start()

  # ---- fine phase. One loop covers the rest of the schedule (simultaneous averaged updates
  # of the sides, as the dense backend) and the converged-mode tail (cross pair alternating,
  # self-terms averaged until each is within tol); its body runs the sides through one scan,
  # so the block-sparse softmin is compiled once.
  inf = jnp.asarray(jnp.inf, dtype)
  if init is None:
    tol_ = inf if tol is None else tol
    n_total = n_sched + (s.max_iter if tol is not None else 0)
  else:  # warm: the tail only, warm_iters updates of every side (annealed) or until tol
    tol_ = -inf if tol is None else tol
    n_total = n_sched + (s.warm_iters if tol is None else s.max_iter)
  replace = jnp.asarray([True, True, False, False][:n_sides])

  def fine_body(carry):
    k, pots, stats, viols = carry
    tail = k >= n_sched  # converged-mode update
    eps = jnp.where(tail, blur**2, eps_k(jnp.minimum(k, n_sched - 1)))

    def side_step(inner, side):
      new_pots, stats = inner
      read = jnp.where(tail, new_pots, pots)  # sequential in the tail, simultaneous before
      run = ~tail | (side < 2) | (viols[side] > tol_)

      def compute(st):
        f_new, st = fresh(side, read, eps, st)
        old = read[side]
        upd = jnp.where(tail & replace[side], f_new, 0.5 * (old + f_new))
        return upd, st, mass_violation(row_lw[side], old, f_new, eps)

      upd, stats, v = jax.lax.cond(run, compute, lambda st: (read[side], st, viols[side]), stats)
      return (new_pots.at[side].set(upd), stats), v

    (pots_new, stats), v = jax.lax.scan(side_step, (pots, stats), jnp.arange(n_sides))
    return k + 1, pots_new, stats, v

  def fine_cond(carry):
    k, _, _, viols = carry
    return (k < n_sched) | ((k < n_total) & (jnp.max(viols) > tol_))

  viols0 = jnp.full((n_sides,), inf)
  with jax.named_scope("fine"):
    k, pots, stats, viols = jax.lax.while_loop(fine_cond, fine_body, (k, pots, stats0, viols0))
  converged = jnp.asarray(False) if tol is None else ok & (jnp.max(viols) <= tol)

  # ---- final extrapolation: rows carry gradient (envelope), columns and potentials do not.
  pots = sg(pots)
  # The live points in the (padded) block layout; padding rows are massless and dropped.
  live = (multiscale.to_blocks(bx, x), multiscale.to_blocks(by, y))

  def ext_step(stats, side_and_rows):
    side, pts = side_and_rows
    rows = _side(rows_all, side)._replace(points=pts)
    out, stats = fresh(side, pots, blur**2, stats, rows=rows)
    return stats, out

  # One scan per row cloud, so that when only x is differentiated (training: the prior is a
  # constant) autodiff skips the y-row softmins' backward passes altogether.
  by_cloud = [[side for side in range(n_sides) if _ROW_CLOUD[side] == c] for c in (0, 1)]
  ext = [None] * n_sides
  for cloud, sides in enumerate(by_cloud):
    rows = jnp.stack([live[cloud]] * len(sides))
    with jax.named_scope("extrapolate"):
      stats, out = jax.lax.scan(ext_step, stats, (jnp.asarray(sides), rows))
    for i, side in enumerate(sides):
      ext[side] = out[i]
  ext = jnp.stack(ext)
  viol_final = jnp.max(
    jax.vmap(mass_violation, in_axes=(0, 0, 0, None))(row_lw, pots[:n_sides], sg(ext), blur**2)
  )
  e_ba, e_ab, e_aa = ext[0], ext[1], ext[2]
  a_blk = multiscale.to_blocks(bx, problem.a)
  b_blk = multiscale.to_blocks(by, problem.b)
  # With static_b, g_ab is compared with the zero potential (as in the dense backend).
  e_bb = jnp.zeros_like(e_ab) if s.static_b else ext[3]
  value = jnp.sum(a_blk * (e_ba - e_aa)) + jnp.sum(b_blk * (e_ab - e_bb))
  nan = lambda v: jnp.where(ok, v, jnp.nan)
  back_x = lambda v: nan(multiscale.from_blocks(bx, v))
  back_y = lambda v: nan(multiscale.from_blocks(by, v))
  return DivergenceOutput(
    value=nan(value),
    f_ba=back_x(e_ba),
    g_ab=back_y(e_ab),
    f_aa=back_x(e_aa),
    g_bb=None if s.static_b else back_y(e_bb),
    iterations=k if init is None else k - n_sched,
    marginal_violation=nan(viol_final),
    converged=converged,
    dense_fallbacks=stats.fallbacks,
    kept_tile_fraction=stats.kept / jnp.maximum(stats.total, 1),
    backend="multiscale",
  )
