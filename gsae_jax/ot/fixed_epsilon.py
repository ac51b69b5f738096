"""Entropic OT at a fixed temperature: alternating log-domain Sinkhorn, warm-startable.

Cost ``C(x, y) = ½‖x − y‖²`` (GeomLoss convention). Potentials are folded inside the loop
(``f̂ = f − ½‖x‖²``, :mod:`gsae_jax.ot.softmin`) and returned unfolded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gsae_jax.ot import validation
from gsae_jax.ot.divergence import mass_violation
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
) -> SinkhornOutput:
  """Entropic OT at a fixed ``ε`` by alternating log-domain Sinkhorn updates, warm-startable.

  Solves ``OT_ε(α, β) = min_P ⟨P, C⟩ + ε KL(P | α⊗β)`` for ``C = ½‖x − y‖²`` (Cuturi 2013 in
  log domain; GeomLoss cost convention). Updates ``f ← softmin_ε(C, log b + g/ε)``,
  ``g ← softmin_ε(Cᵀ, log a + f/ε)`` until the row-marginal L1 violation is below ``tol`` or
  ``max_iter`` pairs ran (``converged`` in the result says which); ``init=(f, g)`` starts from
  given potentials (e.g. the previous solution after a small move of the points). Chunked: no
  ``[n, m]`` matrix.

  ``x, y, a, b, epsilon, tol`` and ``init`` are traced (a new ε does not recompile);
  ``max_iter``, ``chunk_size`` and ``backend`` are static. Bad shapes, a non-scalar or
  concrete non-positive/infinite ``epsilon``, non-finite concrete ``init`` and unequal masses
  raise ``ValueError``/``TypeError`` naming the argument; a traced ``epsilon`` or ``tol`` out
  of range, or a traced non-finite ``init``, makes every output NaN instead.

  Args:
    x: ``[n, d]``; y: ``[m, d]``; a: ``[n]``; b: ``[m]`` (uniform by default; ``Σa = Σb``).
    epsilon: positive finite scalar temperature.
    tol: target L1 marginal violation. max_iter: cap on update pairs (static).
    init: optional ``(f [n], g [m])`` true potentials to start from (default zeros).
    chunk_size: rows per softmin block (static).
    backend: ``"auto"`` or ``"dense"`` (the only backend of the fixed-ε solver so far).

  Returns:
    A :class:`~gsae_jax.ot.problem.SinkhornOutput`.
  """
  x, y, a, b = validation.validate_inputs(x, y, a, b)
  validation.check_equal_mass(a, b)
  validation.check_scalar("epsilon", epsilon, low=0.0)
  validation.check_scalar("tol", tol, low=0.0)
  max_iter = validation.check_count("max_iter", max_iter)
  chunk_size = validation.check_count("chunk_size", chunk_size, allow_none=True)
  validation.check_choice("backend", backend, ("auto", "dense"))
  backend = "dense"  # the fixed-ε solver has no block-sparse path yet
  n, m = x.shape[0], y.shape[0]
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
  return _SOLVERS[backend](
    OTProblem(x, y, a, b), eps, tol, f0, g0, max_iter=max_iter, chunk_size=chunk_size
  )


@functools.partial(jax.jit, static_argnames=("max_iter", "chunk_size"))
def _dense_sinkhorn(problem: OTProblem, eps, tol, f0, g0, *, max_iter, chunk_size):
  a, b = problem.a, problem.b
  sa, sb = jnp.sum(a), jnp.sum(b)
  ok = validation.in_graph_ok(
    (eps > 0) & jnp.isfinite(eps),
    (tol > 0) & jnp.isfinite(tol),
    jnp.isfinite(f0),
    jnp.isfinite(g0),
    jnp.abs(sa - sb) <= validation.MASS_RTOL * jnp.maximum(sa, sb),
  )
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
    backend="dense",
  )


# One entry per backend of gsae_jax.ot.problem.BACKENDS: (problem, ε, tol, f0, g0, *, max_iter,
# chunk_size) -> SinkhornOutput.
_SOLVERS = {"dense": _dense_sinkhorn}
