"""The engine's data types: a problem, the divergence's settings, and the solvers' results.

All are frozen dataclasses registered as pytrees, so they pass through ``jit``: array fields are
traced leaves, the rest (iteration caps, gradient mode, backend) is static metadata and part of
the compilation key. Cost ``C(x, y) = ½‖x − y‖²`` and ``ε = blur²`` throughout.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gsae_jax.ot import schedule


def _pytree(data: tuple[str, ...], meta: tuple[str, ...]):
  def wrap(cls):
    cls = dataclasses.dataclass(frozen=True)(cls)
    return jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(meta))

  return wrap


@_pytree(data=("x", "y", "a", "b"), meta=())
class OTProblem:
  """Two weighted point clouds ``α = Σ a_i δ_{x_i}``, ``β = Σ b_j δ_{y_j}``.

  Attributes:
    x: ``[n, d]`` source points. y: ``[m, d]`` target points.
    a: ``[n]`` non-negative masses. b: ``[m]`` non-negative masses, ``Σa = Σb``.
  """

  x: jax.Array
  y: jax.Array
  a: jax.Array
  b: jax.Array

  @property
  def log_a(self) -> jax.Array:
    return jnp.log(self.a)

  @property
  def log_b(self) -> jax.Array:
    return jnp.log(self.b)

  def centered(self) -> OTProblem:
    """The same problem translated so the joint bounding box is centred at 0
    (:func:`gsae_jax.ot.schedule.center`): values, potentials and gradients are unchanged."""
    x, y = schedule.center(self.x, self.y)
    return dataclasses.replace(self, x=x, y=y)


BACKENDS = ("dense", "multiscale")
"""Backends of the divergence and the fixed-ε solver (GeomLoss's vocabulary). ``"auto"``
resolves to one of these before tracing; ``"dense"`` is the chunked exact path."""

COARSE_GRIDS = ("accurate", "fast")
"""Coarse phases of the ``multiscale`` divergence (``solve_divergence(coarse=...)``, which
says what each costs and gives): ``"accurate"`` (default) leaves a grid only once ``√ε`` is
below 32 (2-D) or 8 (3-D) of its cells, ``"fast"`` earlier (training's default,
``GSAEConfig.ot_coarse``)."""


@_pytree(
  data=("blur", "scaling", "tol", "diameter", "truncate"),
  meta=(
    "max_iter",
    "grad",
    "chunk_size",
    "static_b",
    "backend",
    "unroll_steps",
    "block_size",
    "tile_fraction",
    "warm_iters",
    "coarse",
  ),
)
class DivergenceSettings:
  """Everything :func:`gsae_jax.ot.solve_divergence` needs besides the problem.

  Traced (changing them does not recompile): ``blur``, ``scaling``, ``tol``, ``diameter``,
  ``truncate``
  (``None`` vs a number is part of the compilation key). Static: the rest.

  Attributes:
    blur: ``√ε`` of the final temperature. scaling: annealing ratio of ``blur``, in ``(0, 1)``.
    tol: L1 marginal-violation tolerance for converged mode, or ``None`` (the paper's annealed
      schedule with no convergence test).
    diameter: fixed problem diameter ``D`` for the schedule, or ``None`` (bounding box).
    max_iter: cap on the updates past the schedule in converged mode.
    grad: ``"envelope"`` or ``"unroll"``.
    chunk_size: rows per dense softmin block, or ``None`` (:func:`default_chunk_size`).
    static_b: skip the target's self-term ``OT_ε(β, β)``.
    backend: one of :data:`BACKENDS` (resolved, never ``"auto"``).
    unroll_steps: static scan length of the annealing in ``"unroll"`` mode (else ``None``).
    truncate: ``multiscale`` only: a dropped tile carries less than ``e^{−truncate}`` of each
      row's mass given the current potentials.
    block_size: ``multiscale`` only: points per block (tiles are ``block_size²`` pairs).
    tile_fraction: ``multiscale`` only: static capacity of each tile list, as a fraction of
      all tiles; a softmin whose kept tiles overflow it runs densely and is counted.
    warm_iters: updates at ``ε = blur²`` run from warm-start potentials (``init``) in annealed
      mode (``tol=None``); unused without ``init``.
    coarse: ``multiscale`` only: the coarse phase's grids, one of :data:`COARSE_GRIDS`.
  """

  blur: jax.Array | float
  scaling: jax.Array | float
  tol: jax.Array | float | None
  diameter: jax.Array | float | None
  truncate: jax.Array | float = 10.0
  max_iter: int = 1000
  grad: str = "envelope"
  chunk_size: int | None = None
  static_b: bool = False
  backend: str = "dense"
  unroll_steps: int | None = None
  block_size: int = 128
  tile_fraction: float = 0.25
  warm_iters: int = 5
  coarse: str = "accurate"


@_pytree(
  data=(
    "value",
    "f_ba",
    "g_ab",
    "f_aa",
    "g_bb",
    "iterations",
    "marginal_violation",
    "converged",
    "dense_fallbacks",
    "kept_tile_fraction",
  ),
  meta=("backend",),
)
class DivergenceOutput:
  """Result of :func:`gsae_jax.ot.solve_divergence`.

  Attributes:
    value: scalar ``S_ε(α, β)`` (``S_ε + ½ OT_ε(β, β)`` with ``static_b``), differentiable in
      ``x, y, a, b``; NaN when an in-graph check failed (see the function's docstring).
    f_ba: ``[n]`` potential of ``OT_ε(α, β)`` on ``x``. g_ab: ``[m]`` its potential on ``y``.
    f_aa: ``[n]`` symmetric potential of ``OT_ε(α, α)``. g_bb: ``[m]`` of ``OT_ε(β, β)``, or
      ``None`` with ``static_b``. All are the true (unfolded) potentials after the final
      extrapolation, for the cost ``½‖x − y‖²``.
    iterations: number of potential updates run (annealing steps plus converged-mode steps).
    marginal_violation: largest L1 marginal violation ``Σ_i w_i |(P 1)_i / w_i − 1|`` of the
      three plans (both sides) at the last loop potentials, at ``ε = blur²``, as the final
      extrapolation measures it.
    converged: in converged mode, whether the loop stopped on its tolerance before ``max_iter``
      (its own test reads one side of the cross plan, so ``marginal_violation`` may sit
      slightly above ``tol``); always ``False`` in annealed mode (``tol=None``), which runs a
      fixed schedule and tests nothing.
    dense_fallbacks: ``multiscale``: the number of softmins whose kept tiles overflowed the
      tile list's capacity and which therefore ran densely (exact, slower); 0 for ``dense``.
    kept_tile_fraction: ``multiscale``: kept tiles over all tiles, averaged over the
      block-sparse softmins (the share of pairs evaluated); 1 for ``dense``.
    backend: the backend that ran (``"auto"`` resolved).
  """

  value: jax.Array
  f_ba: jax.Array
  g_ab: jax.Array
  f_aa: jax.Array
  g_bb: jax.Array | None
  iterations: jax.Array
  marginal_violation: jax.Array
  converged: jax.Array
  dense_fallbacks: jax.Array
  kept_tile_fraction: jax.Array
  backend: str = "dense"


@_pytree(
  data=(
    "f",
    "g",
    "reg_ot_cost",
    "transport_cost",
    "iterations",
    "marginal_violation",
    "converged",
    "dense_fallbacks",
    "kept_tile_fraction",
  ),
  meta=("backend",),
)
class SinkhornOutput:
  """Result of :func:`gsae_jax.ot.sinkhorn` (cost ``½‖x − y‖²``).

  Attributes:
    f: ``[n]`` dual potential on ``x``. g: ``[m]`` dual potential on ``y``.
    reg_ot_cost: dual value ``⟨a, f⟩ + ⟨b, g⟩`` = ``OT_ε`` at convergence (envelope-
      differentiable in ``x, y, a, b``).
    transport_cost: ``⟨P, C⟩`` of the plan ``P_ij = a_i b_j exp((f_i + g_j − C_ij)/ε)``.
    iterations: number of (f, g) update pairs run.
    marginal_violation: ``Σ_i |(P 1)_i − a_i|`` at the returned potentials (the column
      marginal is exact after the final g-update).
    converged: ``marginal_violation ≤ tol``.
    dense_fallbacks: ``multiscale``: the number of softmins whose kept tiles overflowed the
      tile list's capacity and which therefore ran densely (exact, slower); 0 for ``dense``.
    kept_tile_fraction: ``multiscale``: kept tiles over all tiles, averaged over the
      block-sparse softmins; 1 for ``dense``.
    backend: the backend that ran.
  """

  f: jax.Array
  g: jax.Array
  reg_ot_cost: jax.Array
  transport_cost: jax.Array
  iterations: jax.Array
  marginal_violation: jax.Array
  converged: jax.Array
  dense_fallbacks: jax.Array
  kept_tile_fraction: jax.Array
  backend: str = "dense"
