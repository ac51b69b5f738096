"""The chunked softmin kernel against a dense log-sum-exp reference (values and VJP)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import logsumexp

from gsae_jax.ot import default_chunk_size, softmin, softmin_with_mean


def _dense(x, y, h, eps):
  return -eps * logsumexp(h[None, :] + x @ y.T / eps, axis=1)


def _data(n=157, m=93, d=3, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, d)), rng.normal(size=(m, d)), rng.normal(size=m)


@pytest.mark.parametrize("chunk", [1, 16, 50, 157, None])
@pytest.mark.slow
def test_value_matches_dense(x64, chunk):
  x, y, h = _data()
  np.testing.assert_allclose(softmin(x, y, h, 0.3, chunk), _dense(x, y, h, 0.3), rtol=1e-12)


@pytest.mark.parametrize("chunk", [16, 50])
@pytest.mark.slow
def test_vjp_matches_dense_autodiff(x64, chunk):
  x, y, h = _data(seed=1)
  w = np.random.default_rng(2).normal(size=x.shape[0])
  ours = jax.grad(lambda *a: jnp.sum(w * softmin(*a, chunk)), argnums=(0, 1, 2, 3))
  ref = jax.grad(lambda *a: jnp.sum(w * _dense(*a)), argnums=(0, 1, 2, 3))
  for g, r in zip(ours(x, y, h, 0.3), ref(x, y, h, 0.3), strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-12)


def test_minus_inf_weights_are_ignored(x64):
  x, y, h = _data(seed=4)
  h_masked = h.copy()
  h_masked[10:] = -np.inf
  np.testing.assert_allclose(
    softmin(x, y, h_masked, 0.5, 32), _dense(x, y[:10], h[:10], 0.5), rtol=1e-12
  )


@pytest.mark.slow
def test_vjp_with_minus_inf_weights(x64):
  # Masked columns get zero gradient; the rest matches the dense softmin of the kept columns.
  x, y, h = _data(seed=5)
  h_masked = h.copy()
  h_masked[10:] = -np.inf
  w = np.random.default_rng(6).normal(size=x.shape[0])
  ours = jax.grad(lambda *a: jnp.sum(w * softmin(*a, 32)), argnums=(0, 1, 2, 3))
  ref = jax.grad(lambda *a: jnp.sum(w * _dense(*a)), argnums=(0, 1, 2, 3))
  gx, gy, gh, ge = ours(x, y, h_masked, 0.5)
  rx, ry, rh, re = ref(x, y[:10], h[:10], 0.5)
  np.testing.assert_allclose(gx, rx, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(gy[:10], ry, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(gh[:10], rh, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(ge, re, rtol=1e-9)
  assert not np.any(gy[10:]) and not np.any(gh[10:])


@pytest.mark.parametrize("d", [2, 10])
@pytest.mark.slow
def test_wide_rows_two_stage_lse_matches_dense(x64, d):
  # m > 32 768 takes the column-tiled forward (3 tiles, the last one padded); d = 10 its matmul
  # branch. The whole first tile is masked, so its tile LSE is −inf.
  x, y, h = _data(n=20, m=2 * 32768 + 5, d=d, seed=7)
  y *= 0.3
  h_masked = h.copy()
  h_masked[:30000] = -np.inf
  w = np.random.default_rng(8).normal(size=x.shape[0])
  for hh in (h, h_masked):
    np.testing.assert_allclose(softmin(x, y, hh, 0.2, 8), _dense(x, y, hh, 0.2), rtol=1e-12)
  ours = jax.grad(lambda *a: jnp.sum(w * softmin(*a, 8)), argnums=(0, 1, 2, 3))
  ref = jax.grad(lambda *a: jnp.sum(w * _dense(*a)), argnums=(0, 1, 2, 3))
  for g, r in zip(ours(x, y, h_masked, 0.2), ref(x, y, h_masked, 0.2), strict=True):
    np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-12)


def test_softmin_with_mean(x64):
  x, y, h = _data(seed=5)
  feats = np.random.default_rng(6).normal(size=(y.shape[0], 4))
  f, mean = softmin_with_mean(x, y, h, 0.4, feats, chunk_size=40)
  p = jax.nn.softmax(h[None, :] + x @ y.T / 0.4, axis=1)
  np.testing.assert_allclose(f, _dense(x, y, h, 0.4), rtol=1e-12)
  np.testing.assert_allclose(mean, p @ feats, rtol=1e-10, atol=1e-12)


def test_default_chunk_size_bounds_block():
  # 256 rows, fewer once a [rows, m] float32 block would pass 4 MiB (2^20 entries), at least 8.
  assert default_chunk_size(4_000, 4_000) == 256
  assert default_chunk_size(10_000, 10_000) == (1 << 20) // 10_000 == 104
  assert default_chunk_size(60_000, 60_000) == 17
  assert default_chunk_size(100, 10_000) == 100
  assert default_chunk_size(10**6, 10**6) == 8


def test_compiled_memory_has_no_dense_block():
  # value + gradient of the softmin at n = m = 4096 in float32: a dense [n, m] array is 64 MiB.
  n = 4096
  x = jnp.zeros((n, 2))
  f = jax.jit(jax.grad(lambda x, y: jnp.sum(softmin(x, y, jnp.zeros(n), 0.1))))
  stats = f.lower(x, x).compile().memory_analysis()
  dense = n * n * 4
  chunk_block = default_chunk_size(n, n) * n * 4
  assert stats.temp_size_in_bytes < 3 * chunk_block < dense / 5
