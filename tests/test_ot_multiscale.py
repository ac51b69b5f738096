"""The block-sparse truncated softmin (gsae_jax.ot.multiscale) against dense references."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from gsae_jax.ot import multiscale as ms
from tests.conftest import flower_numpy

T = 10.0


def _dense_np(x, y, g, log_b, eps):
  """f̃_i = −ε log Σ_j exp(log b_j + (g_j − ½‖x_i − y_j‖²)/ε), float64 numpy/scipy."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  cost = 0.5 * np.sum((x[:, None, :] - y[None, :, :]) ** 2, axis=-1)
  return -eps * logsumexp(log_b[None, :] + (g[None, :] - cost) / eps, axis=1)


def _dense_jnp(x, y, g, log_b, eps):
  cost = 0.5 * jnp.sum((x[:, None, :] - y[None, :, :]) ** 2, axis=-1)
  return -eps * jax.nn.logsumexp(log_b[None, :] + (g[None, :] - cost) / eps, axis=1)


def _all_tiles_impl(x, y, g, log_b, eps, block, chunk):
  bx, by = ms.make_blocks(x, None, block), ms.make_blocks(y, log_b, block)
  nbx, nby = bx.valid.shape[0], by.valid.shape[0]
  tiles = ms.tile_list(jnp.ones((nbx, nby), bool), nbx * nby)
  return ms.from_blocks(bx, ms.block_sparse_softmin(bx, by, ms.to_blocks(by, g), eps, tiles, chunk))


@functools.partial(jax.jit, static_argnames=("block", "capacity"))
def _pipeline(x, y, g, log_b, f, eps, block=32, capacity=1536):
  """The whole truncated softmin in one jit with traced points: blocks, the T = 10 mask from
  row potentials f, the tile list, the kernel. Also returns the mask, the tile bounds, the
  tiles dropped from each row's block, the overflow flag, the blocks' sizes and each point's
  block id (per-point arrays in the original order)."""
  bx, by = ms.make_blocks(x, None, block), ms.make_blocks(y, log_b, block)
  gb, fb = ms.to_blocks(by, g), ms.to_blocks(bx, f)
  keep = ms.keep_tiles(bx, by, fb, gb, eps, truncate=T)
  tiles = ms.tile_list(keep, capacity)
  out = ms.from_blocks(bx, ms.block_sparse_softmin(bx, by, gb, eps, tiles))
  dropped = jnp.broadcast_to(jnp.sum(~keep, axis=1)[:, None], bx.valid.shape)
  sizes = (jnp.sum(bx.valid, axis=1), jnp.sum(by.valid, axis=1))
  bound = ms.tile_log_bounds(bx, by, fb, gb, eps)
  block_ids = tuple(
    ms.from_blocks(b, jnp.broadcast_to(jnp.arange(b.valid.shape[0])[:, None], b.valid.shape))
    for b in (bx, by)
  )
  return out, keep, bound, ms.from_blocks(bx, dropped), ms.overflowed(tiles), sizes, block_ids


def _clouds(n, m, d, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d))
  y = 1.5 * rng.normal(size=(m, d)) + 0.3
  log_b = np.log(rng.uniform(0.1, 1.0, size=m) / m)
  return x, y, rng.normal(size=m), log_b


# ------------------------------------------------------------------------------------------
# Hilbert order and blocks


@pytest.mark.parametrize("d, bits", [(2, 4), (3, 3)])
@pytest.mark.slow
def test_hilbert_index_visits_the_grid_by_unit_steps(d, bits):
  # The defining property of a Hilbert curve: a bijection onto [0, 2^{d·bits}) whose
  # consecutive cells are grid neighbours (L1 distance exactly 1).
  grid = np.array(list(itertools.product(range(2**bits), repeat=d)))
  key = np.asarray(ms.hilbert_index(jnp.asarray(grid), bits))
  np.testing.assert_array_equal(np.sort(key), np.arange(2 ** (d * bits)))
  steps = np.abs(np.diff(grid[np.argsort(key)], axis=0)).sum(axis=1)
  assert np.all(steps == 1)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_hilbert_permutation_is_a_local_permutation(d):
  rng = np.random.default_rng(0)
  pts = flower_numpy(rng, 2000) if d == 2 else rng.normal(size=(2000, d))
  perm = np.asarray(jax.jit(ms.hilbert_permutation)(pts))
  np.testing.assert_array_equal(np.sort(perm), np.arange(2000))

  def mean_step(p):
    return np.mean(np.linalg.norm(np.diff(pts[p], axis=0), axis=1))

  # Mean step along the curve vs a random order: 0.003 (d = 1), 0.031 (d = 2), 0.16 (d = 3).
  ratio = mean_step(perm) / mean_step(rng.permutation(2000))
  assert ratio < {1: 0.02, 2: 0.06, 3: 0.3}[d], ratio


def test_make_blocks_layout_and_round_trip():
  rng = np.random.default_rng(1)
  x = flower_numpy(rng, 203)
  lw = np.log(rng.uniform(size=203))
  b = jax.jit(ms.make_blocks, static_argnums=2)(x, lw, 32)
  assert b.points.shape == (7, 32, 2) and b.valid.shape == (7, 32)
  assert int(b.valid.sum()) == 203 and not bool(b.valid[-1, -1])
  assert np.all(np.isneginf(np.asarray(b.log_weights)[~np.asarray(b.valid)]))
  pts, valid = np.asarray(b.points), np.asarray(b.valid)
  for i in range(7):
    p = pts[i][valid[i]]
    np.testing.assert_array_equal(p.min(0), b.lo[i])
    np.testing.assert_array_equal(p.max(0), b.hi[i])
  round_trip = jax.jit(lambda b, v: ms.from_blocks(b, ms.to_blocks(b, v)))
  np.testing.assert_array_equal(round_trip(b, x), x.astype(np.float32))
  np.testing.assert_array_equal(round_trip(b, lw), lw.astype(np.float32))
  with pytest.raises(ValueError, match="d = 1, 2 or 3"):
    ms.make_blocks(rng.normal(size=(10, 4)), None, 4)
  with pytest.raises(ValueError, match="log_weights"):
    ms.make_blocks(x, lw[:5], 32)


# ------------------------------------------------------------------------------------------
# Exactness with every tile kept


@pytest.mark.parametrize(
  "d, n, m, block, chunk", [(1, 157, 93, 16, 3), (2, 157, 93, 32, None), (3, 100, 130, 16, 7)]
)
@pytest.mark.slow
def test_all_tiles_match_dense_values_and_vjp(x64, d, n, m, block, chunk):
  # n, m not multiples of B (padding), weighted b with one zero-mass column; the VJP (x, y, g,
  # log b, ε through make_blocks and from_blocks) against autodiff of the dense formula.
  x, y, g, log_b = _clouds(n, m, d, seed=d)
  log_b[5] = -np.inf
  w = np.random.default_rng(3).normal(size=n)
  args = (x, y, g, log_b, 0.3)

  @jax.jit
  def value_and_vjp(*args):
    out, vjp = jax.vjp(lambda *a: _all_tiles_impl(*a, block, chunk), *args)
    return out, vjp(w)

  out, grads = value_and_vjp(*args)
  np.testing.assert_allclose(out, _dense_np(*args), rtol=1e-10, atol=1e-12)
  ref = jax.vjp(_dense_jnp, *args)[1](w)
  for name, a, r in zip(("x", "y", "g", "log_b", "eps"), grads, ref, strict=True):
    np.testing.assert_allclose(a, r, rtol=1e-8, atol=1e-12, err_msg=name)


@pytest.mark.slow
def test_empty_rows_are_inf_with_zero_gradient(x64):
  x, y, g, log_b = _clouds(60, 40, 2, seed=4)
  keep = np.ones((4, 3), bool)
  keep[1] = False  # row block 1 has no tile

  @jax.jit
  def value_and_vjp(x, y, g, log_b, ct):
    bx, by = ms.make_blocks(x, None, 16), ms.make_blocks(y, log_b, 16)
    tiles = ms.tile_list(jnp.asarray(keep), 12)

    def f(xp, gb):
      return ms.block_sparse_softmin(bx._replace(points=xp), by, gb, 0.3, tiles, 4)

    out, vjp = jax.vjp(f, bx.points, ms.to_blocks(by, g))
    return out, vjp(jnp.where(jnp.isfinite(out), 1.0, ct))

  out, (dx, dg) = value_and_vjp(x, y, g, log_b, 7.0)  # cotangent 7 on the +inf rows
  out = np.asarray(out)
  assert np.all(np.isposinf(out[1])) and np.all(np.isfinite(out[[0, 2, 3]]))
  assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dg))
  assert not np.any(np.asarray(dx)[1])


# ------------------------------------------------------------------------------------------
# Truncation


EPS = (0.05**2, 0.1**2)


@jax.jit
def _anneal(x, y, schedule):
  """Dense alternating Sinkhorn (float32 jnp, independent of gsae_jax) over an ε schedule;
  returns g after every step."""
  cost = 0.5 * jnp.sum((x[:, None] - y[None]) ** 2, axis=-1)
  la, lb = -jnp.log(float(x.shape[0])), -jnp.log(float(y.shape[0]))

  def step(fg, eps):
    f, g = fg
    f = -eps * jax.nn.logsumexp(lb + (g[None, :] - cost) / eps, axis=1)
    g = -eps * jax.nn.logsumexp(la + (f[:, None] - cost) / eps, axis=0)
    return (f, g), g

  return jax.lax.scan(step, (jnp.zeros(x.shape[0]), jnp.zeros(y.shape[0])), schedule)[1]


def _annealed_potentials(x, y, iters=40):
  """``{ε: g}`` for ε in EPS: ε halved from the squared diameter, ``iters`` steps at each ε."""
  pts = np.r_[x, y]
  eps, schedule, marks = float(np.sum((pts.max(0) - pts.min(0)) ** 2)), [], {}
  for target in sorted(EPS, reverse=True):
    while eps > target:
      schedule.append(eps)
      eps /= 2
    schedule += [target] * iters
    marks[target] = len(schedule) - 1
    eps = target
  with jax.enable_x64(False):
    gs = np.asarray(_anneal(x.astype(np.float32), y.astype(np.float32), np.float32(schedule)))
  return {t: gs[k].astype(np.float64) for t, k in marks.items()}


@pytest.fixture(scope="module")
def converged():
  """Flower-vs-flower and flower-vs-Gaussian clouds (n = 2000, m = 1950), ε-annealed g."""
  rng = np.random.default_rng(7)
  x = flower_numpy(rng, 2000)
  clouds = {"flower": flower_numpy(rng, 1950), "gauss": 0.5 * rng.normal(size=(1950, 2))}
  return {name: (x, y, _annealed_potentials(x, y)) for name, y in clouds.items()}


def _check_truncation(x, y, g, eps, label):
  """Runs the T = 10 pipeline with f = softmin(g) and checks the bound; returns the fraction of
  kept pairs. Bound: 0 ≤ f̃_kept − f̃ ≤ −ε log(1 − N_I e^{−T}) for N_I dropped tiles of row
  block I (keep_tiles's docstring with f = f̃)."""
  log_b = np.full(y.shape[0], -np.log(y.shape[0]))
  ref = _dense_np(x, y, g, log_b, eps)
  out, keep, tile_bound, n_drop, overflow, (nx, ny), (row_ids, col_ids) = _pipeline(
    x, y, g, log_b, ref, eps
  )
  assert not overflow
  # The bound itself: U_IJ ≥ max_{i∈I} log Σ_{j∈J} exp(log b_j + (f_i + g_j − C_ij)/ε), exactly
  # (block ids are sorted by the Hilbert order: blocks are contiguous, only the last is short).
  rows, cols = np.argsort(row_ids, kind="stable"), np.argsort(col_ids, kind="stable")
  pad_x, pad_y = len(nx) * 32 - x.shape[0], len(ny) * 32 - y.shape[0]
  cost = 0.5 * np.sum((x[rows, None] - y[None, cols]) ** 2, axis=-1)
  share = log_b[cols] + (ref[rows, None] + g[cols] - cost) / eps
  share = np.pad(share, ((0, pad_x), (0, pad_y)), constant_values=-np.inf)
  share = logsumexp(share.reshape(-1, len(ny), 32), axis=2)
  exact = share.reshape(len(nx), 32, len(ny)).max(axis=1)
  assert np.all(np.asarray(tile_bound) >= exact - 1e-9), label
  out, n_drop = np.asarray(out), np.asarray(n_drop)
  delta = n_drop * np.exp(-T)
  assert np.all(delta < 1)
  bound = -eps * np.log1p(-delta)
  err = out - ref
  slack = 1e-12 * (1 + np.abs(ref))
  assert np.all(np.isfinite(out))
  assert np.all(err >= -slack), (label, err.min())
  assert np.all(err <= bound + slack), (label, np.max(err - bound))
  # The forced best tile was never needed: the rigorous test alone keeps a tile in every row
  # block, as proved in keep_tiles for f = f̃ and log nby < T.
  assert np.all(np.any(np.asarray(tile_bound) > -T, axis=1))
  frac = float(np.asarray(nx) @ np.asarray(keep) @ np.asarray(ny)) / (x.shape[0] * y.shape[0])
  print(f"{label}: kept {frac:.1%} of pairs, max error {err.max():.2e} (bound {bound.max():.2e})")
  return frac


@pytest.mark.parametrize("eps", EPS)
@pytest.mark.parametrize("target", ["flower", "gauss"])
@pytest.mark.slow
def test_truncation_error_is_within_the_bound(x64, converged, target, eps):
  x, y, pots = converged[target]
  frac = _check_truncation(x, y, pots[eps], eps, f"{target} eps={eps:g}")
  assert frac < 0.3


@pytest.mark.slow
def test_isolated_outlier_keeps_partners(x64, converged):
  x, y, pots = converged["flower"]
  eps, g = EPS[0], pots[EPS[0]]
  x = x.copy()
  x[-1] = [25.0, -25.0]  # C/ε ≈ 2.5e5 to every column
  _check_truncation(x, y, g, eps, "outlier")
  # Cold start (f far below the softmin): the rigorous test keeps nothing, the forced best tile
  # keeps exactly one per row block, and every row, the outlier's too, stays finite.
  log_b = np.full(y.shape[0], -np.log(y.shape[0]))
  out, keep, *_ = _pipeline(x, y, g, log_b, np.full(x.shape[0], -1e3), eps)
  np.testing.assert_array_equal(np.sum(keep, axis=1), 1)
  assert np.all(np.isfinite(out))


# ------------------------------------------------------------------------------------------
# Capacity, jit, memory


def test_overflow_is_reported():
  keep = np.random.default_rng(5).uniform(size=(20, 30)) < 0.2
  count = int(keep.sum())
  make_list = jax.jit(ms.tile_list, static_argnums=1)
  tiles = make_list(keep, count - 5)
  assert int(tiles.count) == count and bool(ms.overflowed(tiles))
  cap = ms.tile_capacity(keep, margin=0.25, multiple=8)
  assert cap >= 1.25 * count and cap % 8 == 0
  full = make_list(keep, cap)
  assert not bool(ms.overflowed(full))
  rows, cols = np.nonzero(keep)
  np.testing.assert_array_equal(full.rows[:count], rows)
  np.testing.assert_array_equal(full.cols[:count], cols)
  assert np.all(np.asarray(full.rows[count:]) == 20) and np.all(np.asarray(full.cols[count:]) == 30)


@pytest.mark.slow  # ≈ 6 s: compiles the whole tile pipeline
def test_jit_with_traced_points(x64, converged):
  # _pipeline is one jit over traced points, weights, potentials and ε: new values of the same
  # shapes reuse it. C is translation invariant, so shifting both clouds changes nothing.
  x, y, pots = converged["gauss"]
  g, eps = pots[EPS[1]], EPS[1]
  log_b = np.full(y.shape[0], -np.log(y.shape[0]))
  f = _dense_np(x, y, g, log_b, eps)
  out, keep, *_ = _pipeline(x, y, g, log_b, f, eps)
  shifted, keep_shifted, *_ = _pipeline(x - 0.75, y - 0.75, g, log_b, f, eps)
  np.testing.assert_array_equal(keep_shifted, keep)
  np.testing.assert_allclose(shifted, out, rtol=1e-12)


def _avals(jaxpr):
  """Every intermediate shape of a jaxpr, sub-jaxprs (scan, cond, custom_vjp) included."""
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      yield getattr(v.aval, "shape", ())
    for p in eqn.params.values():
      for sub in p if isinstance(p, list | tuple) else [p]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _avals(inner)


def test_gradient_memory_is_linear():
  # capacity · B² = 256 · 64² ≈ 1e6 logits; a chunk is 4 tiles (16 384): no array of the
  # backward pass, nor any residual, may scale with capacity · B². The backward's row and
  # column sums are broadcast-multiply-reduces over (d + 2) features of a chunk's logits,
  # which XLA fuses into the reduction; their jaxpr operand is (d + 2) chunks big.
  x, y, g, log_b = _clouds(1000, 1000, 2, seed=9)

  def loss(x, y, g, log_b, eps):
    bx, by = ms.make_blocks(x, None, 64), ms.make_blocks(y, log_b, 64)
    tiles = ms.tile_list(jnp.ones((16, 16), bool), 256)
    out = ms.block_sparse_softmin(bx, by, ms.to_blocks(by, g), eps, tiles, 4)
    return jnp.sum(ms.from_blocks(bx, out))

  args = (x, y, g, log_b, 0.1)
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*args)
  biggest = max(int(np.prod(s)) for s in _avals(jaxpr.jaxpr))
  assert biggest <= (2 + 2) * 4 * 64 * 64, biggest
  vjp_fn = jax.eval_shape(lambda *a: jax.vjp(loss, *a)[1], *args)
  residual = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(vjp_fn))
  assert residual < 20 * (1024 + 1024), residual


# ------------------------------------------------------------------------------------------
# Two-stage tile selection and the one-pass (offset) kernel


@pytest.mark.parametrize("target", ["flower", "gauss"])
@pytest.mark.slow
def test_select_tiles_keeps_the_tiles_of_keep_tiles(x64, converged, target):
  # The box-then-refine list holds every tile the full mask keeps by its bound; beyond those
  # only each row block's best candidate. With a candidate list too small to hold the box's
  # tiles, it falls back to the full mask and lists exactly the same tiles.
  x, y, pots = converged[target]
  eps = EPS[-1]
  g = pots[eps]
  log_b = np.full(y.shape[0], -np.log(y.shape[0]))
  f = _dense_np(x, y, g, log_b, eps)
  bx, by = ms.make_blocks(x, None, 32), ms.make_blocks(y, log_b, 32)
  fb, gb = ms.to_blocks(bx, f), ms.to_blocks(by, g)
  nbx, nby = bx.valid.shape[0], by.valid.shape[0]
  bound = np.asarray(ms.tile_log_bounds(bx, by, fb, gb, eps))
  keep = np.asarray(ms.keep_tiles(bx, by, fb, gb, eps, truncate=T))

  def listed(tiles):
    count = int(tiles.count)
    assert count <= tiles.rows.shape[0]
    mask = np.zeros((nbx, nby), bool)
    mask[np.asarray(tiles.rows)[:count], np.asarray(tiles.cols)[:count]] = True
    assert np.all(np.diff(np.asarray(tiles.rows)[:count]) >= 0)  # sorted by row block
    return mask

  capacity = nbx * nby // 2
  two_stage = listed(ms.select_tiles(bx, by, fb, gb, eps, T, capacity))
  assert np.all(two_stage[bound > -T])
  extra = two_stage & ~(bound > -T)
  assert np.all(extra.sum(axis=1) <= 1)
  assert np.all(two_stage.any(axis=1))
  full = listed(ms.select_tiles(bx, by, fb, gb, eps, T, capacity, box_capacity=nbx))
  np.testing.assert_array_equal(full, keep)


@pytest.mark.parametrize("column_grad", [True, False])
@pytest.mark.parametrize("shift", [0.0, 3.0, -200.0, 400.0])
@pytest.mark.slow
def test_offset_kernel_matches_dense_for_any_estimate(x64, shift, column_grad):
  # f_estimate only sets the exponentials' offset: a good estimate (shift 0, 3 ε) takes the
  # one-pass path, a bad one (off by 200 ε or 400 ε: sums outside [e^-50, e^50]) must rerun
  # with the running max. Either way the value and the gradient are the dense ones. Without
  # column gradients the backward's row sums come from the forward pass (or, after a rerun,
  # from a recomputation): the x- and ε-gradients must not change.
  x, y, g, log_b = _clouds(700, 650, 2, seed=3)
  eps = 0.2
  ref = _dense_np(x, y, g, log_b, eps)
  bx, by = ms.make_blocks(x, None, 32), ms.make_blocks(y, log_b, 32)
  nbx, nby = bx.valid.shape[0], by.valid.shape[0]
  tiles = ms.tile_list(jnp.ones((nbx, nby), bool), nbx * nby)
  est = ms.to_blocks(bx, ref + shift * eps)

  def run(xp, e=eps):
    out = ms.block_sparse_softmin(
      bx._replace(points=ms.to_blocks(bx, xp)),
      by,
      ms.to_blocks(by, g),
      e,
      tiles,
      f_estimate=est,
      column_grad=column_grad,
    )
    return ms.from_blocks(bx, out)

  np.testing.assert_allclose(np.asarray(run(x)), ref, rtol=1e-10, atol=1e-10)
  weights = np.random.default_rng(0).normal(size=x.shape[0])
  dense = lambda xp, e: _dense_jnp(xp, jnp.asarray(y), jnp.asarray(g), log_b, e)
  if not column_grad:  # no column cotangents: h = log b + g/ε counts as a constant
    h_fixed = jnp.asarray(log_b + g / eps)
    dense = lambda xp, e: _dense_jnp(xp, jnp.asarray(y), e * (h_fixed - log_b), log_b, e)
  grad, g_eps = jax.grad(lambda xp, e: jnp.sum(weights * run(xp, e)), argnums=(0, 1))(
    jnp.asarray(x), eps
  )
  ref_grad, ref_eps = jax.grad(lambda xp, e: jnp.sum(weights * dense(xp, e)), argnums=(0, 1))(
    jnp.asarray(x), eps
  )
  np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=1e-8, atol=1e-10)
  np.testing.assert_allclose(float(g_eps), float(ref_eps), rtol=1e-8)


@pytest.mark.slow
def test_padding_rows_read_their_estimate_and_need_no_tile(x64):
  # Rows that are not `valid` are not computed: they read f_estimate, get zero gradient, and a
  # row block without a valid row keeps no tile.
  x, y, g, log_b = _clouds(70, 90, 2, seed=4)
  bx, by = ms.make_blocks(x, None, 32), ms.make_blocks(y, log_b, 32)
  gb = ms.to_blocks(by, g)
  valid = bx.valid.at[1].set(False)
  bxv = bx._replace(valid=valid)
  est = jnp.full(bx.valid.shape, 7.0)
  keep = np.asarray(ms.keep_tiles(bxv, by, est, gb, 0.3))
  assert not keep[1].any() and keep[0].any()
  tiles = ms.tile_list(jnp.ones(keep.shape, bool), keep.size)
  out = np.asarray(ms.block_sparse_softmin(bxv, by, gb, 0.3, tiles, f_estimate=est))
  np.testing.assert_allclose(out[~np.asarray(valid)], 7.0, rtol=1e-12)
  ref = _dense_np(np.asarray(bx.points[0]), y, g, log_b, 0.3)
  np.testing.assert_allclose(out[0], ref, rtol=1e-10)

  def total(p):
    out = ms.block_sparse_softmin(bxv._replace(points=p), by, gb, 0.3, tiles, f_estimate=est)
    return jnp.sum(out)

  grad = jax.grad(total)(bx.points)
  assert np.all(np.asarray(grad)[~np.asarray(valid)] == 0.0)


def _taylor_case(d, seed, spread=0.05):
  """Compact clusters (radius ≈ 2·spread) over a box, so that blocks are small against √ε and
  many tiles qualify for the Taylor expansion, and a few far points, whose blocks do not;
  clouds of 305 / 265 points (blocks of 20)."""
  rng = np.random.default_rng(seed)
  centres = rng.uniform(-2.0, 2.0, size=(15, d))
  far = lambda: rng.uniform(-30.0, 30.0, size=(5, d))
  x = (centres[:, None, :] + spread * rng.normal(size=(15, 20, d))).reshape(-1, d)
  y = (centres[:13, None, :] + 0.3 + spread * rng.normal(size=(13, 20, d))).reshape(-1, d)
  x, y = np.concatenate([x, far()]), np.concatenate([y, far()])
  g = 0.2 * rng.normal(size=y.shape[0])
  log_b = np.log(rng.dirichlet(np.ones(y.shape[0])))
  return x, y, g, log_b


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("eps", [0.3, 3.0])
def test_taylor_tiles_match_the_exact_kernel(x64, d, eps):
  # Tiles with R_I·R_J ≤ τ·ε are summed by the degree-4 Taylor expansion of exp(⟨u, v⟩/ε):
  # each pair within τ⁵e^{2τ}/5! = 1.02e-7 relative, so f̃ within 1.02e-7·ε of the exact
  # kernel (measured ≈ 1e-9·ε: the bound is for u ∥ v at the largest radii). The case has
  # both kinds of tiles, so the sum over the exact ones is covered too.
  x, y, g, log_b = _taylor_case(d, seed=d)
  bx, by = ms.make_blocks(jnp.asarray(x), None, 20), ms.make_blocks(jnp.asarray(y), log_b, 20)
  nbx, nby = bx.valid.shape[0], by.valid.shape[0]
  tiles = ms.tile_list(jnp.ones((nbx, nby), bool), nbx * nby)
  gb = ms.to_blocks(by, jnp.asarray(g))
  ref = _dense_np(np.asarray(bx.points).reshape(-1, d), y, g, log_b, eps).reshape(nbx, -1)
  est = jnp.asarray(ref) + 0.5 * eps  # an estimate off by half an ε
  out = ms.block_sparse_softmin(bx, by, gb, eps, tiles, f_estimate=est, taylor=True)
  valid = np.asarray(bx.valid)
  np.testing.assert_allclose(np.asarray(out)[valid], ref[valid], rtol=0, atol=1.02e-7 * eps)
  # Both kinds of tiles were summed.
  centers = 0.5 * (bx.lo + bx.hi)
  x_c = bx.points - centers[:, None, :]
  h = jnp.where(by.valid, by.log_weights + gb / eps, -jnp.inf)
  o_hat = -est / eps + 0.5 * jnp.sum(x_c * x_c, -1) / eps
  zero = jnp.zeros(bx.valid.shape)
  _, n_taylor = ms._taylor_sums(
    x_c,
    by.points,
    h,
    1.0 / eps,
    centers,
    tiles.rows,
    tiles.cols,
    tiles.count,
    o_hat,
    bx.valid,
    zero,
  )
  assert 0 < int(n_taylor) < nbx * nby


def test_taylor_tile_error_at_the_radius_limit(x64):
  # One row and one column block in d = 1, every offset at the radius (R_I·R_J = τ·ε): with
  # the columns at +r weighing e^30 more, a row at ±r sums terms at t = ⟨u, v⟩/ε = ±τ only
  # (up to e^-30), so its relative error is the degree-4 series' remainder at ±τ, ≈ ±τ⁵/5! =
  # ±8.3e-8: within the bound 1.02e-7, and large enough to show that the expansion of this
  # degree was used.
  eps, tau = 2.0, 0.1
  r = np.sqrt(tau * eps) * (1.0 - 1e-9)
  x = np.tile([[-r], [r]], (8, 1))  # row block: centre 0, radius r
  y = 10.0 + np.tile([[-r], [r]], (8, 1))  # column block: centre 10, radius r
  g = np.where(y[:, 0] > 10.0, 30.0 * eps, 0.0)
  log_b = np.full(16, -np.log(16))
  bx, by = ms.make_blocks(jnp.asarray(x), None, 16), ms.make_blocks(jnp.asarray(y), log_b, 16)
  tiles = ms.tile_list(jnp.ones((1, 1), bool), 1)
  gb = ms.to_blocks(by, jnp.asarray(g))
  xs = np.asarray(bx.points).reshape(-1, 1)
  ref = _dense_np(xs, np.asarray(by.points).reshape(-1, 1), np.asarray(gb).ravel(), log_b, eps)
  est = jnp.asarray(ref)[None]
  out = np.asarray(ms.block_sparse_softmin(bx, by, gb, eps, tiles, f_estimate=est, taylor=True))
  # f̃ = −ε log(S·(1 − δ)), δ the sum's relative shortfall.
  rel = 1.0 - np.exp(-(out.ravel() - ref) / eps)
  t = np.sign(xs[:, 0]) * tau
  remainder = (np.exp(t) - sum(t**p / math.factorial(p) for p in range(5))) / np.exp(t)
  np.testing.assert_allclose(rel, remainder, rtol=1e-3)
  assert np.all(np.abs(rel) <= tau**5 * np.exp(2 * tau) / math.factorial(5))


def test_taylor_needs_an_estimate_and_keeps_exact_gradients(x64):
  x, y, g, log_b = _taylor_case(2, seed=7)
  bx, by = ms.make_blocks(jnp.asarray(x), None, 20), ms.make_blocks(jnp.asarray(y), log_b, 20)
  nbx, nby = bx.valid.shape[0], by.valid.shape[0]
  tiles = ms.tile_list(jnp.ones((nbx, nby), bool), nbx * nby)
  gb = ms.to_blocks(by, jnp.asarray(g))
  with pytest.raises(ValueError, match="f_estimate"):
    ms.block_sparse_softmin(bx, by, gb, 3.0, tiles, taylor=True)
  est = ms.block_sparse_softmin(bx, by, gb, 3.0, tiles)

  def total(p, taylor):
    out = ms.block_sparse_softmin(
      bx._replace(points=p), by, gb, 3.0, tiles, f_estimate=est, taylor=taylor
    )
    return jnp.sum(jnp.where(bx.valid, out, 0.0))

  grads = [jax.grad(total)(bx.points, t) for t in (False, True)]
  np.testing.assert_allclose(np.asarray(grads[1]), np.asarray(grads[0]), rtol=1e-6, atol=1e-9)
