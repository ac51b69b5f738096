"""The three GSAE training steps: ``local``, ``minibatch_global`` and ``full_global``.

Global Sinkhorn Autoencoder (Algorithm 1 of the GSAE paper, as the authors' code runs it):
the loss is ``D + λ·S`` with ``D`` the per-pixel MSE of the minibatch and ``S`` the debiased
Sinkhorn divergence (:func:`gsae_jax.ot.sinkhorn_divergence`, GeomLoss conventions) between
latents and a prior sample:

* ``local`` (the SAE baseline of Patrini et al.): ``S`` between the ``M`` batch latents and a
  fresh ``M``-point prior sample.
* ``minibatch_global``: ``S`` between a cache of all ``n`` training latents, re-encoded under
  ``stop_gradient`` every ``recalculate_freq`` steps with the batch rows replaced by the live
  batch latents, and an ``n``-point prior sample redrawn every ``resample_freq`` steps. The
  gradient reaches the encoder through the batch only.
* ``full_global``: all ``n`` latents are live. In bounded memory: a chunked forward pass keeps
  no activations, ``dS/dZ`` comes from the OT engine for all ``n`` latents, then a second
  chunked pass of encoder VJPs accumulates the parameter gradient.

Everything here is pure and jittable; :func:`make_train_step` builds one jitted step per run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gsae_jax import priors, regularizers
from gsae_jax.models import Autoencoder
from gsae_jax.ot import (
  BACKENDS,
  COARSE_GRIDS,
  DivergenceOutput,
  resolve_backend,
  solve_divergence,
)

VARIANTS = ("local", "minibatch_global", "full_global")
OT_BACKENDS = ("auto", *BACKENDS)
# Paper λ per variant (SPEC §3): the global modes weight each point's OT gradient by 1/n
# instead of 1/M, so λ does not transfer between them.
DEFAULT_LAMBDA = {"local": 0.1, "minibatch_global": 100.0, "full_global": 0.1}


@dataclasses.dataclass(frozen=True)
class GSAEConfig:
  """Static settings of a GSAE run (hashable: it parameterises the jitted step).

  Attributes:
    variant: one of :data:`VARIANTS`.
    regularizer: the latent regulariser ``S`` (:func:`gsae_jax.regularizers.get_regularizer`):
      ``"sinkhorn"`` (default, the GSAE's), ``"sharp"``, ``"mmd"``, ``"sliced"``,
      ``"w2gauss"`` or ``"hungarian"``. Every variant takes any of them; the global ones
      apply it to all ``n`` latents and an ``n``-point prior sample (``sharp`` and
      ``hungarian`` are dense and refuse large ``n`` at the first step). The OT settings
      below (``blur``, ``scaling``, ``ot_*``, ``prior_self_term``) are the Sinkhorn's; ``sharp``
      takes ``ε = blur²`` and ``sharp_iters``; ``sliced`` takes ``n_projections``; ``mmd``
      takes ``mmd_sigma2``; in ``minibatch_global`` it is
      :func:`gsae_jax.regularizers.mmd_squared_rows` (the full MMD²'s gradient in the batch
      rows from ``M·n`` kernel terms; the logged value is the batch's unbiased estimate).
    lam: weight λ of the regulariser; ``None`` (default) takes the paper's λ of the variant
      (:data:`DEFAULT_LAMBDA`, Sinkhorn only: another regulariser needs it set), resolved
      here and nowhere else.
    blur, scaling: GeomLoss parameters of ``S`` (``ε = blur²``).
    batch_size: ``M``.
    recalculate_freq: re-encode the latent cache every this many steps (minibatch_global).
    resample_freq: redraw the ``n``-point prior sample every this many steps (global modes).
    encode_chunk: images per chunk when encoding the whole training set.
    prior: name for :func:`gsae_jax.priors.get_prior`.
    prior_self_term: compute the prior's self-term ``½ OT_ε(prior, prior)`` of ``S``. It does
      not depend on the encoder, so ``False`` (default) skips it (ott-jax's ``static_b``):
      the same gradients for 3 softmins per Sinkhorn iteration instead of 4, but the logged
      training ``sinkhorn`` is then ``S + ½ OT_ε(prior, prior)``, not ``S``. Evaluation's
      global OT loss always computes the full ``S``.
    learning_rate, b1, b2: Adam.
    ot_backend: backend of the OT engine (:func:`gsae_jax.ot.resolve_backend`): ``"auto"``
      (default: block-sparse ``"multiscale"`` for the global variants' 2-D clouds from
      2 500 points on, ``"dense"`` below: ``resolve_backend(..., repeated=True)``, since the
      step is compiled once), ``"dense"`` or ``"multiscale"``.
    ot_coarse: the multiscale backend's coarse phase (``solve_divergence(coarse=...)``):
      ``"fast"`` (default here, unlike the library's ``"accurate"``: a training step needs
      the gradient, which both give close to dense, and ``"accurate"`` doubles the OT time at
      n = 60 000) or ``"accurate"`` (an unbiased value; BUILD_NOTES.md, "Multiscale backend").
    ot_warm_iters: global variants with ``resample_freq > 1`` only. ``0`` (default): every
      step runs the cold annealed schedule, as the paper. ``k > 0``: a step that keeps the
      prior sample starts from the previous step's potentials (kept in :class:`TrainState`)
      and runs ``k`` updates at ``ε = blur²`` (``solve_divergence(init=...)``); a step that
      redraws it runs cold. Measured at n = 60 000 (BUILD_NOTES.md, "Warm starts across
      steps"): with the prior kept, 2 updates are both faster and closer to the converged
      divergence than the cold schedule; after a redraw they are not, hence cold there.
    n_projections: random directions of the ``sliced`` regulariser.
    sharp_iters: unrolled Sinkhorn iterations of the ``sharp`` regulariser.
    mmd_sigma2: the ``mmd`` regulariser's prior variance σ² per coordinate, which sets its
      IMQ kernels' base scale ``C = 2dσ²`` (WAE's convention; 1 for N(0, I), the default).
      The flower's per-coordinate variance is ≈ 5 (petals at radius 3), and its petals are
      ≈ 0.1 wide: the scale decides which of these the kernel resolves.
  """

  variant: str = "minibatch_global"
  regularizer: str = "sinkhorn"
  lam: float | None = None
  blur: float = 0.05
  scaling: float = 0.7
  batch_size: int = 100
  recalculate_freq: int = 1
  resample_freq: int = 1
  encode_chunk: int = 500
  prior: str = "flower"
  prior_self_term: bool = False
  learning_rate: float = 1e-3
  b1: float = 0.5
  b2: float = 0.999
  ot_backend: str = "auto"
  ot_coarse: str = "fast"
  ot_warm_iters: int = 0
  n_projections: int = 50
  sharp_iters: int = 100
  mmd_sigma2: float = 1.0

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"`variant` must be one of {VARIANTS}, got {self.variant!r}.")
    for name in (
      "batch_size",
      "recalculate_freq",
      "resample_freq",
      "encode_chunk",
      "n_projections",
      "sharp_iters",
    ):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)!r}.")
    for name in ("blur", "mmd_sigma2"):
      value = getattr(self, name)
      if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"`{name}` must be a positive finite number, got {value!r}.")
    if not 0 < self.scaling < 1:
      raise ValueError(f"`scaling` must lie strictly between 0 and 1, got {self.scaling!r}.")
    regularizers.get_regularizer(self.regularizer)  # an unknown name fails here
    if self.lam is None and self.regularizer != "sinkhorn":
      raise ValueError(
        f"`lam` has no default for the {self.regularizer!r} regulariser (the paper's λ are the "
        "Sinkhorn's, and the terms' scales differ): set it."
      )
    if self.lam is None:  # frozen: set the resolved λ once, here
      object.__setattr__(self, "lam", float(DEFAULT_LAMBDA[self.variant]))
    if not (self.lam >= 0 and math.isfinite(self.lam)):
      raise ValueError(f"`lam` must be a non-negative finite number, got {self.lam!r}.")
    priors.get_prior(self.prior)  # an unknown name fails here, not at the first step
    for name in ("learning_rate", "b1", "b2"):
      value = getattr(self, name)
      if not (math.isfinite(value) and (0 < value if name == "learning_rate" else 0 <= value < 1)):
        raise ValueError(f"`{name}` out of range: {value!r}.")
    if self.ot_backend not in OT_BACKENDS:
      raise ValueError(f"`ot_backend` must be one of {OT_BACKENDS}, got {self.ot_backend!r}.")
    if self.ot_coarse not in COARSE_GRIDS:
      raise ValueError(f"`ot_coarse` must be one of {COARSE_GRIDS}, got {self.ot_coarse!r}.")
    if int(self.ot_warm_iters) < 0:
      raise ValueError(f"`ot_warm_iters` must be >= 0, got {self.ot_warm_iters!r}.")
    if self.ot_warm_iters and self.regularizer != "sinkhorn":
      raise ValueError(
        "`ot_warm_iters` > 0 warm-starts Sinkhorn potentials: it needs "
        f"regularizer='sinkhorn', not {self.regularizer!r}."
      )
    if self.ot_warm_iters and self.variant == "local":
      raise ValueError(
        "`ot_warm_iters` > 0 needs a global variant: `local` draws a new batch and prior "
        "sample every step, so there are no potentials to carry over."
      )
    if self.ot_warm_iters and self.resample_freq == 1:
      raise ValueError(
        "`ot_warm_iters` > 0 needs resample_freq > 1: warm starts run on the steps that keep "
        "the prior sample (after a redraw they were less accurate than the cold schedule, "
        "BUILD_NOTES.md 'Warm starts across steps'), and resample_freq = 1 keeps none."
      )


class TrainState(NamedTuple):
  """Everything a step reads and writes; a pytree, checkpointed as a whole.

  Attributes:
    step: int32 scalar, steps taken.
    params: ``{"encoder": ..., "decoder": ...}``.
    opt_state: Adam state.
    latents: ``[n, z]`` latent cache (``minibatch_global``; ``[0, z]`` otherwise).
    prior: ``[n, z]`` current prior sample (global modes; ``[0, z]`` for ``local``).
    potentials: ``[4, n]`` the last step's ``(f_ba, g_ab, f_aa, g_bb)`` for the warm start
      (``ot_warm_iters > 0``; ``g_bb`` zero without ``prior_self_term``; ``[4, 0]``
      otherwise).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  latents: jax.Array
  prior: jax.Array
  potentials: jax.Array


def make_optimizer(config: GSAEConfig) -> optax.GradientTransformation:
  """Adam(lr, b1, b2) as in the paper (1e-3, 0.5, 0.999)."""
  return optax.adam(config.learning_rate, b1=config.b1, b2=config.b2)


def _chunked(a: jax.Array, chunk: int) -> jax.Array:
  """``[n, ...]`` → ``[n_chunks, chunk, ...]``, zero-padding only when ``chunk ∤ n``."""
  pad = (-a.shape[0]) % chunk
  if pad:
    a = jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)])
  return a.reshape((-1, chunk) + a.shape[1:])


def encode_all(model: Autoencoder, enc_params, images: jax.Array, chunk: int) -> jax.Array:
  """Encodes ``[n, 28, 28, 1]`` images in chunks with ``lax.map``: ``[n, z]`` latents.

  Only one chunk of activations is alive at a time; under ``jax.grad`` use
  :func:`full_global_loss_and_grad` instead, which never stores activations.
  """
  n = images.shape[0]
  xs = _chunked(images, min(chunk, n))
  z = jax.lax.map(lambda xc: model.encode(enc_params, xc), xs)
  return z.reshape(-1, z.shape[-1])[:n]


def init_state(
  key: jax.Array, model: Autoencoder, config: GSAEConfig, train_images: jax.Array
) -> TrainState:
  """Fresh parameters, optimiser state, latent cache and prior sample."""
  params = model.init(key)
  opt_state = make_optimizer(config).init(params)
  n, zdim = train_images.shape[0], model.latent_dim
  if config.variant == "minibatch_global":
    latents = encode_all(model, params["encoder"], train_images, config.encode_chunk)
  else:
    latents = jnp.zeros((0, zdim), jnp.float32)
  n_prior = 0 if config.variant == "local" else n
  prior = jnp.zeros((n_prior, zdim), jnp.float32)
  potentials = jnp.zeros((4, n if config.ot_warm_iters else 0), jnp.float32)
  return TrainState(jnp.int32(0), params, opt_state, latents, prior, potentials)


def _reconstruction(model, params, x):
  return jnp.mean((model.decode(params["decoder"], model.encode(params["encoder"], x)) - x) ** 2)


def step_ot_backend(config: GSAEConfig, n: int, latent_dim: int) -> str | None:
  """The OT backend a training step on ``n`` images runs (``None``: not the Sinkhorn).

  The global variants solve ``n × n`` problems (all latents against an ``n``-point prior
  sample), ``local`` ``M × M``; ``"auto"`` resolves with the repeated-call threshold
  (:func:`gsae_jax.ot.resolve_backend`), since the step is compiled once.
  """
  if config.regularizer != "sinkhorn":
    return None
  size = config.batch_size if config.variant == "local" else n
  return resolve_backend(config.ot_backend, size, size, latent_dim, repeated=True)


def solve_step_ot(config: GSAEConfig, z, prior, init=None) -> DivergenceOutput:
  """The Sinkhorn divergence ``S_ε(z, prior)`` exactly as a training step solves it.

  GeomLoss's debiased divergence (cost ``½‖x − y‖²``, ``ε = blur²``, Feydy et al. 2019; the
  GSAE paper's §3) with ``config``'s blur, scaling, prior self-term, warm-start updates and
  coarse grids, and the backend ``config.ot_backend`` resolves to for a step that is compiled
  once and run many times. Benchmarks time this call so that they time what training runs.

  Args:
    config: the run's :class:`GSAEConfig`.
    z: ``[n, d]`` latent codes. prior: ``[m, d]`` prior sample.
    init: optional warm-start potentials (``solve_divergence``'s ``init``).

  Returns:
    The :class:`gsae_jax.ot.DivergenceOutput` (value ``S``, potentials, report).
  """
  return solve_divergence(
    z,
    prior,
    blur=config.blur,
    scaling=config.scaling,
    static_b=not config.prior_self_term,
    # A training step is compiled once and run every step: the repeated-call crossover.
    backend=resolve_backend(
      config.ot_backend, z.shape[0], prior.shape[0], z.shape[1], repeated=True
    ),
    init=init,
    warm_iters=max(1, config.ot_warm_iters),
    coarse=config.ot_coarse,
  )


def _other_regularizer(config: GSAEConfig, z, prior, key):
  """A non-Sinkhorn ``config.regularizer`` with its settings from ``config``."""
  fn = regularizers.get_regularizer(config.regularizer)
  settings = {
    "sharp": {"epsilon": config.blur**2, "n_iter": config.sharp_iters},
    "sliced": {"n_projections": config.n_projections},
    "mmd": {"sigma2": config.mmd_sigma2},
  }.get(config.regularizer, {})
  return fn(z, prior, key=key, **settings)


def _divergence(config: GSAEConfig, z, prior, state: TrainState, key=None):
  """``S(z, prior)`` and the potentials ``[4, n]`` to carry to the next step.

  ``S`` is ``config.regularizer``; for the Sinkhorn (the default): cold (the annealed
  schedule) unless ``config.ot_warm_iters``; then warm from ``state.potentials`` on the
  steps that keep the prior sample, cold on those that redraw it (:func:`refresh`; step 0
  is one). ``key`` feeds a random regulariser (``sliced``).
  """
  if config.regularizer != "sinkhorn":
    return _other_regularizer(config, z, prior, key), state.potentials
  if not config.ot_warm_iters:
    return solve_step_ot(config, z, prior).value, state.potentials

  def run(init):
    out = solve_step_ot(config, z, prior, init)
    g_bb = jnp.zeros_like(out.g_ab) if out.g_bb is None else out.g_bb
    return out.value, jnp.stack([out.f_ba, out.g_ab, out.f_aa, g_bb])

  f_ba, g_ab, f_aa, g_bb = state.potentials
  warm = (f_ba, g_ab, f_aa, g_bb if config.prior_self_term else None)
  redrawn = state.step % config.resample_freq == 0
  return jax.lax.cond(redrawn, lambda: run(None), lambda: run(warm))


def _sample_prior(config: GSAEConfig, key, n, zdim):
  return priors.get_prior(config.prior, dim=zdim)(key, n)


def full_global_loss_and_grad(model, config, state: TrainState, idx, images, key=None):
  """``D + λ S`` and its gradient with every training latent live, in bounded memory.

  ``S(Q(X), prior)`` is differentiated as ``Σ_chunks VJP_Q(X_chunk)(∂S/∂Z_chunk)``: a first
  ``lax.map`` encodes the ``n`` images without keeping activations, the OT engine gives
  ``∂S/∂Z`` for all ``n`` latents ([n, z]), and a ``lax.scan`` over chunks recomputes each
  chunk's forward pass inside ``jax.vjp`` and accumulates the parameter cotangent. Memory:
  ``O(n·z)`` latents plus one chunk of activations, whatever ``n``.

  Returns:
    ``(loss, (D, S, potentials), grads)`` with ``grads`` shaped like ``params`` and
    ``potentials`` as :attr:`TrainState.potentials`.
  """
  params = state.params
  enc = params["encoder"]
  z_all = jax.lax.stop_gradient(encode_all(model, enc, images, config.encode_chunk))
  (s_val, pots), ds_dz = jax.value_and_grad(
    lambda z: _divergence(config, z, state.prior, state, key), has_aux=True
  )(z_all)

  chunk = min(config.encode_chunk, images.shape[0])
  xs, cts = _chunked(images, chunk), _chunked(ds_dz, chunk)

  def accumulate(acc, inputs):
    xc, ctc = inputs
    _, vjp = jax.vjp(lambda p: model.encode(p, xc), enc)
    return jax.tree.map(jnp.add, acc, vjp(ctc)[0]), None

  zeros = jax.tree.map(jnp.zeros_like, enc)
  s_grad_enc, _ = jax.lax.scan(accumulate, zeros, (xs, cts))

  d_val, grads = jax.value_and_grad(lambda p: _reconstruction(model, p, images[idx]))(params)
  grads = dict(grads)
  grads["encoder"] = jax.tree.map(lambda g, s: g + config.lam * s, grads["encoder"], s_grad_enc)
  return d_val + config.lam * s_val, (d_val, s_val, pots), grads


def _local_loss(model, config, params, state: TrainState, x, idx, prior_key):
  """``local``: ``D + λ S(Q(x_batch), fresh M-point prior sample)``."""
  z_b = model.encode(params["encoder"], x)
  d_val = jnp.mean((model.decode(params["decoder"], z_b) - x) ** 2)
  prior = _sample_prior(config, prior_key, x.shape[0], z_b.shape[1])
  # fold_in, not split: the Sinkhorn runs keep the prior samples they always drew.
  s_val, pots = _divergence(config, z_b, prior, state, jax.random.fold_in(prior_key, 1))
  return d_val + config.lam * s_val, (d_val, s_val, pots)


def _minibatch_global_loss(model, config, params, state: TrainState, x, idx, prior_key):
  """``minibatch_global``: ``D + λ S(cache with the batch rows live, n-point prior sample)``."""
  z_b = model.encode(params["encoder"], x)
  d_val = jnp.mean((model.decode(params["decoder"], z_b) - x) ** 2)
  z = state.latents.at[idx].set(z_b)  # stop-gradient cache, live batch rows
  if config.regularizer == "mmd":  # the gradient reaches only the batch rows: M·n, not n²
    s_val = regularizers.mmd_squared_rows(z, idx, state.prior, idx, sigma2=config.mmd_sigma2)
    return d_val + config.lam * s_val, (d_val, s_val, state.potentials)
  s_val, pots = _divergence(config, z, state.prior, state, prior_key)
  return d_val + config.lam * s_val, (d_val, s_val, pots)


def _by_autodiff(loss):
  """A ``(model, config, params, state, x, idx, key) -> (loss, aux)`` loss as a variant's
  ``loss_and_grad`` (plain ``jax.value_and_grad``)."""

  def loss_and_grad(model, config, state: TrainState, idx, images, key):
    fn = functools.partial(loss, model, config)
    (value, aux), grads = jax.value_and_grad(fn, has_aux=True)(
      state.params, state, images[idx], idx, key
    )
    return value, aux, grads

  return loss_and_grad


def refresh(model, config: GSAEConfig, state: TrainState, images, key) -> TrainState:
  """Redraws the prior sample and re-encodes the latent cache when their step comes."""
  n, zdim = images.shape[0], model.latent_dim
  if config.variant != "local":
    prior = jax.lax.cond(
      state.step % config.resample_freq == 0,
      lambda: _sample_prior(config, key, n, zdim),
      lambda: state.prior,
    )
    state = state._replace(prior=prior)
  if config.variant == "minibatch_global":
    latents = jax.lax.cond(
      state.step % config.recalculate_freq == 0,
      lambda: jax.lax.stop_gradient(
        encode_all(model, state.params["encoder"], images, config.encode_chunk)
      ),
      lambda: state.latents,
    )
    state = state._replace(latents=latents)
  return state


def loss_and_grad(model, config: GSAEConfig, state: TrainState, idx, images, key):
  """``(loss, (D, S), grads)`` of the variant's ``D + λ S`` at ``state`` (already refreshed).

  Args:
    model, config: as in :func:`make_train_step`.
    state: the train state after :func:`refresh`.
    idx: ``[M]`` batch indices into ``images``.
    images: ``[n, 28, 28, 1]`` training set.
    key: the step's key for the ``local`` prior sample and a random regulariser.

  Returns:
    ``(loss, (D, S, potentials), grads)``; ``potentials`` as :attr:`TrainState.potentials`.
  """
  return _LOSS_AND_GRAD[config.variant](model, config, state, idx, images, key)


# Each variant's ``(model, config, state, idx, images, key) -> (loss, (D, S, potentials),
# grads)``: the one place the variants differ in their loss.
_LOSS_AND_GRAD = {
  "local": _by_autodiff(_local_loss),
  "minibatch_global": _by_autodiff(_minibatch_global_loss),
  "full_global": full_global_loss_and_grad,
}


def make_train_step(
  model: Autoencoder, config: GSAEConfig
) -> Callable[
  [TrainState, jax.Array, jax.Array, jax.Array], tuple[TrainState, dict[str, jax.Array]]
]:
  """The jitted step ``(state, images, idx, key) -> (state, metrics)`` of ``config.variant``.

  The training images are an argument, not a closure: jax would embed closed-over arrays in
  the compiled program as constants (188 MB at n = 60 000, with seconds of extra compile).

  Args:
    model: the autoencoder.
    config: run settings.

  Returns:
    A jitted step. ``images`` is the ``[n, 28, 28, 1]`` training set (put on the device once,
    e.g. with ``jax.device_put``); ``idx`` the ``[M]`` int32 batch; ``key`` the step's key
    (e.g. ``fold_in(train_key, step)``). Metrics: ``loss``, ``reconstruction``, ``sinkhorn``.
  """
  opt = make_optimizer(config)

  def step(state: TrainState, images: jax.Array, idx: jax.Array, key: jax.Array):
    k_prior, k_local = jax.random.split(key)
    state = refresh(model, config, state, images, k_prior)
    loss, (d_val, s_val, pots), grads = loss_and_grad(model, config, state, idx, images, k_local)
    updates, opt_state = opt.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state._replace(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      potentials=jax.lax.stop_gradient(pots),
    )
    return new, {"loss": loss, "reconstruction": d_val, "sinkhorn": s_val}

  return jax.jit(step, donate_argnums=0)
