"""Dense, fully unrolled Sinkhorn losses of the other source papers (small problems only).

Both build the ``[n, m]`` cost matrix ``C = ½‖x − y‖²`` (the project's convention) and
differentiate through every Sinkhorn iteration, as their papers do. For large clouds use the
chunked :func:`gsae_jax.ot.sinkhorn_divergence`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from gsae_jax.ot.validation import validate_inputs


def _cost(x, y):
  return 0.5 * jnp.sum((x[:, None, :] - y[None, :, :]) ** 2, axis=-1)


def sinkhorn_plan(C, a, b, epsilon, n_iter):
  """Plan of ``n_iter`` alternating log-domain Sinkhorn iterations from ``g = 0``.

  ``f ← −ε LSE_j(log b_j + (g_j − C_ij)/ε)``, ``g ← −ε LSE_i(log a_i + (f_i − C_ij)/ε)``;
  returns ``P_ij = a_i b_j exp((f_i + g_j − C_ij)/ε)``, whose column marginal is exact.
  Genevay et al. 2018, Algorithm 1, in log domain.

  Args:
    C: ``[n, m]`` cost. a: ``[n]``, b: ``[m]`` probability weights. epsilon: scalar.
    n_iter: number of (f, g) update pairs (static).

  Returns:
    ``[n, m]`` plan.
  """
  la, lb = jnp.log(a), jnp.log(b)

  def step(g, _):
    f = -epsilon * logsumexp(lb[None, :] + (g[None, :] - C) / epsilon, axis=1)
    g = -epsilon * logsumexp(la[:, None] + (f[:, None] - C) / epsilon, axis=0)
    return g, f

  g, fs = jax.lax.scan(step, jnp.zeros_like(b), None, length=n_iter)
  f = fs[-1]
  return jnp.exp(la[:, None] + lb[None, :] + (f[:, None] + g[None, :] - C) / epsilon)


def round_plan(P, a, b):
  """Altschuler rounding: the nearby plan with exactly the marginals ``a`` and ``b``.

  Altschuler, Weed & Rigollet 2017, Algorithm 2 (used by Patrini et al. 2019): scale rows down
  to at most ``a``, then columns down to at most ``b``, then add the rank-one correction
  ``err_a err_bᵀ / ‖err_a‖₁``.

  Args:
    P: ``[n, m]`` non-negative plan. a: ``[n]``, b: ``[m]`` with equal total mass.

  Returns:
    ``[n, m]`` plan ``R`` with ``R 1 = a``, ``Rᵀ 1 = b``, ``R ≥ 0``.
  """
  P = P * jnp.minimum(a / P.sum(axis=1), 1.0)[:, None]
  P = P * jnp.minimum(b / P.sum(axis=0), 1.0)[None, :]
  err_a, err_b = a - P.sum(axis=1), b - P.sum(axis=0)
  total = jnp.sum(err_a)
  safe = jnp.where(total > 0, total, 1.0)
  return P + jnp.where(total > 0, 1.0, 0.0) * jnp.outer(err_a, err_b) / safe


def _prob(w):
  return w / jnp.sum(w)


def _transport(x, y, a, b, epsilon, n_iter, rounded):
  C = _cost(x, y)
  P = sinkhorn_plan(C, a, b, epsilon, n_iter)
  if rounded:
    P = round_plan(P, a, b)
  return jnp.sum(P * C)


def genevay_loss(x, y, a=None, b=None, *, epsilon: float = 1.0, n_iter: int = 10) -> jax.Array:
  """Genevay et al. (2018) Sinkhorn loss ``2 W_L(μ, ν) − W_L(μ, μ) − W_L(ν, ν)``.

  ``W_L`` is the transport term ``⟨P_L, C⟩`` (no entropy) of the plan after ``L = n_iter``
  Sinkhorn iterations (:func:`sinkhorn_plan`), differentiated through every iteration.
  ``C = ½‖x − y‖²``. Dense: ``O(n m)`` memory.

  Args:
    x: ``[n, d]``, y: ``[m, d]``; a, b: optional weights (normalised to probabilities).
    epsilon: regularisation. n_iter: unrolled iterations ``L`` (static).

  Returns:
    Scalar loss.
  """
  x, y, a, b = validate_inputs(x, y, a, b)
  a, b = _prob(a), _prob(b)
  w = lambda p, q, u, v: _transport(p, q, u, v, epsilon, n_iter, rounded=False)
  return 2 * w(x, y, a, b) - w(x, x, a, a) - w(y, y, b, b)


def sharp_sinkhorn_loss(
  x, y, a=None, b=None, *, epsilon: float = 0.01, n_iter: int = 100
) -> jax.Array:
  """Patrini et al. (2019) sharp, debiased Sinkhorn loss of Sinkhorn AutoEncoders.

  ``W(μ, ν) − ½ W(μ, μ) − ½ W(ν, ν)`` with ``W = ⟨R, C⟩`` the transport term of the plan after
  ``n_iter`` unrolled Sinkhorn iterations and Altschuler rounding (:func:`round_plan`), so
  ``R`` is exactly feasible. ``C = ½‖x − y‖²``. Dense: ``O(n m)`` memory.

  Args:
    x: ``[n, d]``, y: ``[m, d]``; a, b: optional weights (normalised to probabilities).
    epsilon: regularisation. n_iter: unrolled iterations (static).

  Returns:
    Scalar loss.
  """
  x, y, a, b = validate_inputs(x, y, a, b)
  a, b = _prob(a), _prob(b)
  w = lambda p, q, u, v: _transport(p, q, u, v, epsilon, n_iter, rounded=True)
  return w(x, y, a, b) - 0.5 * w(x, x, a, a) - 0.5 * w(y, y, b, b)
