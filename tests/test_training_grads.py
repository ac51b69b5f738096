"""Each GSAE variant's gradient against jax.grad of the straightforward, unchunked loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsae_jax import priors
from gsae_jax.models import make_autoencoder
from gsae_jax.ot import sinkhorn_divergence
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
