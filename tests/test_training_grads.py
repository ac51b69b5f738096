"""Each GSAE variant's gradient against jax.grad of the straightforward, unchunked loss."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsae_jax import priors
from gsae_jax.models import make_autoencoder
from gsae_jax.ot import sinkhorn_divergence, solve_divergence
from gsae_jax.training.gsae import GSAEConfig, init_state, loss_and_grad, refresh

N, M = 240, 40


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(size=(N, 28, 28, 1)).astype(np.float32))
  model = make_autoencoder("mlp", 2)
  idx = jnp.asarray(rng.permutation(N)[:M].astype(np.int32))
  return model, images, idx


def _reference_loss(model, config, params, images, idx, prior, key):
  x = images[idx]
  z_b = model.encode(params["encoder"], x)
  d = jnp.mean((model.decode(params["decoder"], z_b) - x) ** 2)
  div = lambda z, p: sinkhorn_divergence(z, p, blur=config.blur, scaling=config.scaling)
  if config.variant == "local":
    s = div(z_b, priors.flower(key, M))
  elif config.variant == "minibatch_global":
    z_all = jax.lax.stop_gradient(model.encode(params["encoder"], images))
    s = div(z_all.at[idx].set(z_b), prior)
  else:
    s = div(model.encode(params["encoder"], images), prior)
  return d + config.lam * s


def _rel_err(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  num = np.sqrt(sum(float(jnp.sum((u - v) ** 2)) for u, v in zip(la, lb, strict=True)))
  den = np.sqrt(sum(float(jnp.sum(v**2)) for v in lb))
  return num / den


@pytest.mark.parametrize("prior_self_term", [True, False])
@pytest.mark.parametrize("variant", ["local", "minibatch_global", "full_global"])
@pytest.mark.slow
def test_variant_gradient_matches_unchunked(setup, variant, prior_self_term):
  model, images, idx = setup
  # encode_chunk 64 does not divide N = 240: padding is exercised too.
  config = GSAEConfig(
    variant=variant, lam=3.0, encode_chunk=64, batch_size=M, prior_self_term=prior_self_term
  )
  key = jax.random.key(1)
  state = init_state(jax.random.key(0), model, config, images)
  k_prior, k_local = jax.random.split(key)
  state = refresh(model, config, state, images, k_prior)
  loss, _, grads = jax.jit(lambda s, i, k: loss_and_grad(model, config, s, i, images, k))(
    state, idx, k_local
  )
  prior = state.prior
  ref_loss, ref_grads = jax.value_and_grad(
    lambda p: _reference_loss(model, config, p, images, idx, prior, k_local)
  )(state.params)
  if prior_self_term:
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  else:  # the skipped ½ OT_ε(prior, prior) is a positive offset of the loss, not the gradient
    assert loss > ref_loss + 1e-3
  assert _rel_err(grads, ref_grads) < 1e-4
  # The OT term really reaches the encoder: dropping it changes the gradient a lot.
  d_only = jax.grad(
    lambda p: _reference_loss(
      model, dataclasses.replace(config, lam=0.0), p, images, idx, prior, k_local
    )
  )(state.params)
  assert _rel_err(grads["encoder"], d_only["encoder"]) > 1e-2


@pytest.mark.parametrize("prior_self_term", [False, True])
@pytest.mark.parametrize("variant", ["minibatch_global", "full_global"])
@pytest.mark.slow
def test_warm_started_step_matches_unchunked(setup, variant, prior_self_term):
  # ot_warm_iters with resample_freq = 2: steps 0 and 2 redraw the prior and run cold; step 1
  # keeps it and starts from step 0's potentials. Reference: the unchunked loss with
  # solve_divergence (cold, or init=...) called directly.
  model, images, idx = setup
  config = GSAEConfig(
    variant=variant,
    lam=3.0,
    encode_chunk=64,
    batch_size=M,
    ot_warm_iters=3,
    resample_freq=2,
    prior_self_term=prior_self_term,
  )
  step = jax.jit(lambda s, i, k: loss_and_grad(model, config, s, i, images, k))

  def reference(params, state, init):
    x = images[idx]
    z_b = model.encode(params["encoder"], x)
    d = jnp.mean((model.decode(params["decoder"], z_b) - x) ** 2)
    z_all = model.encode(params["encoder"], images)
    if variant == "minibatch_global":
      z_all = jax.lax.stop_gradient(z_all).at[idx].set(z_b)
    out = solve_divergence(
      z_all,
      state.prior,
      blur=config.blur,
      scaling=config.scaling,
      static_b=not prior_self_term,
      init=init,
      warm_iters=3,
    )
    return d + config.lam * out.value, out

  def check(state, init, key):
    (ref_loss, ref_out), ref_grads = jax.value_and_grad(reference, has_aux=True)(
      state.params, state, init
    )
    loss, (_, _, pots), grads = step(state, idx, key)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert _rel_err(grads, ref_grads) < 1e-4
    want = (ref_out.f_ba, ref_out.g_ab, ref_out.f_aa)
    for got, w in zip(pots[:3], want, strict=True):
      np.testing.assert_allclose(got, w, rtol=0, atol=1e-4)
    return pots, grads

  state = init_state(jax.random.key(0), model, config, images)
  state = refresh(model, config, state, images, jax.random.key(1))
  pots0, _ = check(state, None, jax.random.key(2))  # step 0: cold

  state = state._replace(step=jnp.int32(1), potentials=pots0)
  prior0 = state.prior
  state = refresh(model, config, state, images, jax.random.key(3))
  assert bool(jnp.all(state.prior == prior0))  # kept
  f_ba, g_ab, f_aa, g_bb = pots0
  init = (f_ba, g_ab, f_aa, g_bb if prior_self_term else None)
  pots1, grads1 = check(state, init, jax.random.key(4))
  # Not the cold step in disguise: the cold gradient differs.
  _, cold_grads = jax.value_and_grad(reference, has_aux=True)(state.params, state, None)
  assert _rel_err(grads1, cold_grads) > 1e-3

  state = state._replace(step=jnp.int32(2), potentials=pots1)
  state = refresh(model, config, state, images, jax.random.key(5))
  assert bool(jnp.any(state.prior != prior0))  # redrawn: cold again
  check(state, None, jax.random.key(6))


@pytest.mark.parametrize("coarse", ["fast", "accurate"])
def test_the_step_solves_with_the_configured_engine(monkeypatch, coarse):
  # The training step hands its OT settings to solve_divergence; `ot_coarse` defaults to
  # "fast" there (the library's default is "accurate").
  from gsae_jax.training import gsae

  seen = {}

  def spy(z, prior, **kwargs):
    seen.update(kwargs)
    return solve_divergence(z, prior, **kwargs)

  monkeypatch.setattr(gsae, "solve_divergence", spy)
  z = jnp.asarray(np.random.default_rng(0).normal(size=(50, 2)), jnp.float32)
  config = GSAEConfig(ot_coarse=coarse, ot_backend="dense")
  state = types.SimpleNamespace(potentials=jnp.zeros((4, 0)))  # what a cold step reads
  value, _ = gsae._divergence(config, z, 0.5 * z, state)
  assert seen["coarse"] == coarse and seen["backend"] == "dense" and seen["static_b"]
  np.testing.assert_allclose(
    value, sinkhorn_divergence(z, 0.5 * z, static_b=True), rtol=1e-6, atol=1e-7
  )
  assert GSAEConfig().ot_coarse == "fast"


def test_warm_iters_needs_a_global_variant_and_a_kept_prior():
  with pytest.raises(ValueError, match="global variant"):
    GSAEConfig(variant="local", ot_warm_iters=2)
  with pytest.raises(ValueError, match="resample_freq > 1"):
    GSAEConfig(variant="full_global", ot_warm_iters=2)
  with pytest.raises(ValueError, match="ot_warm_iters"):
    GSAEConfig(ot_warm_iters=-1)


@pytest.mark.slow
def test_train_step_takes_the_images_as_an_argument():
  # Closed-over images would be embedded in the compiled program as a constant (hundreds of
  # MB of HLO at n = 60 000); as an argument they are a parameter of it.
  from gsae_jax.training.gsae import make_train_step

  images = jax.random.uniform(jax.random.key(1), (2000, 28, 28, 1))
  model = make_autoencoder("mlp", 2)
  config = GSAEConfig(variant="full_global", encode_chunk=500)
  state = init_state(jax.random.key(0), model, config, images)
  step = make_train_step(model, config)
  hlo = step.lower(state, images, jnp.arange(100), jax.random.key(2)).as_text()
  assert len(hlo) < images.nbytes / 10  # 6.3 MB of pixels; the program alone is far smaller
  new, out = step(state, images, jnp.arange(100), jax.random.key(2))
  assert int(new.step) == 1 and np.isfinite(float(out["loss"]))


def _imq_mmd(x, y, d, sigma2):
  """WAE-MMD's unbiased U-statistic with the summed IMQ kernels, written out unchunked."""
  cs = [2.0 * d * sigma2 * s for s in (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)]
  k = lambda a, b: sum(c / (c + jnp.sum((a[:, None] - b[None]) ** 2, -1)) for c in cs)
  n, m = x.shape[0], y.shape[0]
  kxx, kyy = k(x, x), k(y, y)
  return (
    (jnp.sum(kxx) - jnp.trace(kxx)) / (n * (n - 1))
    + (jnp.sum(kyy) - jnp.trace(kyy)) / (m * (m - 1))
    - 2 * jnp.mean(k(x, y))
  )


def _imq_mmd_rows(z, rows, y, d, sigma2):
  """The batch estimate of :func:`_imq_mmd` that minibatch_global logs, written out."""
  cs = [2.0 * d * sigma2 * s for s in (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)]
  k = lambda a, b: sum(c / (c + jnp.sum((a[:, None] - b[None]) ** 2, -1)) for c in cs)
  n, m, r = z.shape[0], y.shape[0], rows.shape[0]
  return (
    (jnp.sum(k(z[rows], z)) - 7 * r) / (r * (n - 1))
    + (jnp.sum(k(y[rows], y)) - 7 * r) / (r * (m - 1))
    - 2 * jnp.mean(k(z[rows], y))
  )


def _w2_to_standard_normal(z):
  """Closed-form W2² of the Gaussian fit of ``z`` to N(0, I), by eigenvalues."""
  mu, cov = jnp.mean(z, 0), jnp.cov(z.T)  # unbiased, as the paper (§4)
  lam = jnp.linalg.eigvalsh(cov)
  return mu @ mu + jnp.sum(lam) + z.shape[1] - 2 * jnp.sum(jnp.sqrt(jnp.maximum(lam, 1e-12)))


@pytest.mark.parametrize(
  "variant, regularizer, sigma2",
  [
    ("full_global", "mmd", 5.0),  # the non-default σ² must reach the kernel
    ("local", "mmd", 1.0),
    ("minibatch_global", "mmd", 1.0),
    ("local", "w2gauss", 1.0),
    ("minibatch_global", "w2gauss", 1.0),
    ("full_global", "w2gauss", 1.0),
  ],
)
@pytest.mark.slow  # each case compiles its own step
def test_other_regularizers_in_every_variant(setup, variant, regularizer, sigma2):
  # Each variant with a non-Sinkhorn regulariser: loss and gradient against the unchunked
  # loss with the regulariser written out here (rtol 1e-4 value, 1e-3 gradient, L2).
  model, images, idx = setup
  config = GSAEConfig(
    variant=variant,
    regularizer=regularizer,
    lam=2.0,
    encode_chunk=64,
    batch_size=M,
    mmd_sigma2=sigma2,
  )
  state = init_state(jax.random.key(0), model, config, images)
  k_prior, k_local = jax.random.split(jax.random.key(1))
  state = refresh(model, config, state, images, k_prior)
  loss, _, grads = jax.jit(lambda s, i, k: loss_and_grad(model, config, s, i, images, k))(
    state, idx, k_local
  )
  if regularizer == "w2gauss":  # its prior is N(0, I): the flower sample is ignored
    reg = lambda z, p: _w2_to_standard_normal(z)
  else:
    reg = lambda z, p: _imq_mmd(z, p, 2, sigma2)

  def reference(params):
    x = images[idx]
    z_b = model.encode(params["encoder"], x)
    d = jnp.mean((model.decode(params["decoder"], z_b) - x) ** 2)
    if variant == "local":
      s = reg(z_b, priors.flower(k_local, M))
    elif variant == "minibatch_global":
      z_all = jax.lax.stop_gradient(model.encode(params["encoder"], images))
      s = reg(z_all.at[idx].set(z_b), state.prior)
    else:
      s = reg(model.encode(params["encoder"], images), state.prior)
    return d + config.lam * s

  ref_loss, ref_grads = jax.value_and_grad(reference)(state.params)
  if variant == "minibatch_global" and regularizer == "mmd":
    # Gradient of the full MMD², value its batch estimate (mmd_squared_rows); the cache was
    # just re-encoded with these parameters, so it equals the live encoding.
    x = images[idx]
    d = jnp.mean(
      (model.decode(state.params["decoder"], model.encode(state.params["encoder"], x)) - x) ** 2
    )
    z_all = model.encode(state.params["encoder"], images)
    ref_loss = d + config.lam * _imq_mmd_rows(z_all, idx, state.prior, 2, sigma2)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-4)
  assert _rel_err(grads, ref_grads) < 1e-3


def test_other_regularizers_need_their_lambda_and_no_warm_start():
  with pytest.raises(ValueError, match="`lam` has no default for the 'mmd'"):
    GSAEConfig(regularizer="mmd")
  with pytest.raises(ValueError, match="unknown regulariser 'xyz'"):
    GSAEConfig(regularizer="xyz", lam=1.0)
  with pytest.raises(ValueError, match="needs regularizer='sinkhorn'"):
    GSAEConfig(regularizer="mmd", lam=1.0, ot_warm_iters=2, resample_freq=5)
  with pytest.raises(ValueError, match="`mmd_sigma2` must be a positive finite number"):
    GSAEConfig(regularizer="mmd", lam=1.0, mmd_sigma2=0.0)
  with pytest.raises(ValueError, match="`mmd_sigma2` must be a positive finite number"):
    GSAEConfig(regularizer="mmd", lam=1.0, mmd_sigma2=float("nan"))
  with pytest.raises(ValueError, match="`blur` must be a positive finite number"):
    GSAEConfig(blur=float("inf"))
