"""The debiased Sinkhorn divergence on point clouds (GeomLoss's annealed algorithm).

Conventions (GeomLoss ``SamplesLoss("sinkhorn", p=2)``, Feydy et al. 2019, as used by the GSAE
paper): cost ``C(x, y) = ½‖x − y‖²``, temperature ``ε = blur²``, uniform weights unless given.
Inside the loops the potentials are kept folded (``f̂ = f − ½‖x‖²``, see
:mod:`gsae_jax.ot.softmin`); the potentials returned to the user are the true ones.

Structure: :func:`solve_divergence` checks the input (:mod:`gsae_jax.ot.validation`), packs it
into an :class:`~gsae_jax.ot.problem.OTProblem` and a
:class:`~gsae_jax.ot.problem.DivergenceSettings`, and calls one jitted function that dispatches
on ``settings.backend`` through :func:`_backend`: a backend is a function
``(problem, settings) -> DivergenceOutput`` (``dense`` here, ``multiscale`` in
:mod:`gsae_jax.ot.multiscale_divergence`). The dense loop pieces below take the softmin as an
argument.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gsae_jax.ot import schedule, validation
from gsae_jax.ot.problem import (
  BACKENDS,
  COARSE_GRIDS,
  DivergenceOutput,
  DivergenceSettings,
  OTProblem,
)
from gsae_jax.ot.softmin import softmin_kernel

sg = jax.lax.stop_gradient

# softmin(x [n, d], y [m, d], h [m], eps) -> folded potential [n] on x.
Softmin = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]

# Under tracing, `grad="unroll"` scans over the schedule of a cloud up to this many blurs wide
# (steps past the real schedule are skipped by lax.cond and cost nothing); a wider cloud
# returns NaN rather than a silently truncated schedule.
_UNROLL_DIAMETER_BOUND = 1e5
# A user `diameter` may sit this far (relative) below the bounding box's widest side, for
# float32 round-off between the host and the in-graph check.
_DIAMETER_RTOL = 1e-6


class _Clouds(NamedTuple):
  """The centred problem with log-weights, as the loops use it."""

  x: jax.Array  # [n, d]
  y: jax.Array  # [m, d]
  la: jax.Array  # [n] log a
  lb: jax.Array  # [m] log b

  def detached(self) -> _Clouds:
    return _Clouds(*(sg(t) for t in self))


class _State(NamedTuple):
  f_ba: jax.Array  # folded potentials: [n], [m], [n], [m]
  g_ab: jax.Array
  f_aa: jax.Array
  g_bb: jax.Array


# ----------------------------------------------------------------------------- loop pieces


def mass_violation(log_w, f_old, f_new, eps):
  """``Σ_i w_i |exp((f_i − f̃_i)/ε) − 1|``: L1 error of the plan's marginal on this side."""
  w = jnp.exp(log_w)
  return jnp.sum(jnp.where(w > 0, w * jnp.abs(jnp.expm1((f_old - f_new) / eps)), 0.0))


def _self_softmin(sm: Softmin, static_b, g_bb, *args):
  # The target's self-term softmin(*args); skipped (g_bb stays as it is) when ``static_b``.
  return g_bb if static_b else sm(*args)


def _div_init(eps0, p: _Clouds, sm: Softmin, static_b) -> _State:
  # GeomLoss starts from g = 0, f = 0 (true potentials), i.e. ĝ = −½‖y‖², f̂ = −½‖x‖².
  hx = p.la - 0.5 * jnp.sum(p.x * p.x, axis=1) / eps0
  hy = p.lb - 0.5 * jnp.sum(p.y * p.y, axis=1) / eps0
  return _State(
    sm(p.x, p.y, hy, eps0),
    sm(p.y, p.x, hx, eps0),
    sm(p.x, p.x, hx, eps0),
    _self_softmin(sm, static_b, jnp.zeros_like(p.lb), p.y, p.y, hy, eps0),
  )


def _div_step(st: _State, eps, p: _Clouds, sm: Softmin, static_b) -> tuple[_State, jax.Array]:
  """One symmetric, averaged update of the four potentials (Feydy 2020, Fig. 3.24.b).

  Returns the new state and the largest L1 marginal violation of the old one.
  """
  ft_ba = sm(p.x, p.y, p.lb + st.g_ab / eps, eps)
  gt_ab = sm(p.y, p.x, p.la + st.f_ba / eps, eps)
  ft_aa = sm(p.x, p.x, p.la + st.f_aa / eps, eps)
  gt_bb = _self_softmin(sm, static_b, st.g_bb, p.y, p.y, p.lb + st.g_bb / eps, eps)
  viol = jnp.max(
    jnp.stack(
      [
        mass_violation(p.la, st.f_ba, ft_ba, eps),
        mass_violation(p.lb, st.g_ab, gt_ab, eps),
        mass_violation(p.la, st.f_aa, ft_aa, eps),
        mass_violation(p.lb, st.g_bb, gt_bb, eps),  # 0 when static_b
      ]
    )
  )
  avg = lambda old, new: 0.5 * (old + new)
  return _State(
    avg(st.f_ba, ft_ba), avg(st.g_ab, gt_ab), avg(st.f_aa, ft_aa), avg(st.g_bb, gt_bb)
  ), viol


def _tol_step(st: _State, viols, eps, tol, p: _Clouds, sm: Softmin, static_b):
  """One update at the final ε past the schedule: alternating for the cross pair.

  ``f_ba ← softmin(g_ab)`` then ``g_ab ← softmin(f_ba)`` (Gauss–Seidel, as in ott-jax and the
  fixed-ε :func:`gsae_jax.ot.sinkhorn`) converges in far fewer steps than the averaged update
  once ε is small; the symmetric self-terms keep the averaged update, and each stops
  (``lax.cond``) once its own violation is within ``tol``: they do not depend on the cross pair
  and converge sooner, so the long tail runs 2 softmins per step, not 4.

  ``viols`` is ``[3]``: the last L1 marginal violations of the cross pair (of the plan
  ``(f_ba_new, g_ab_old)`` on ``b``'s side; its ``a`` side is exact), ``aa`` and ``bb``.
  Returns the new state and the new ``viols``.
  """
  f_ba = sm(p.x, p.y, p.lb + st.g_ab / eps, eps)
  g_ab = sm(p.y, p.x, p.la + f_ba / eps, eps)
  v_ab = mass_violation(p.lb, st.g_ab, g_ab, eps)

  def self_update(pts, lw, pot):
    def run(_):
      new = sm(pts, pts, lw + pot / eps, eps)
      return 0.5 * (pot + new), mass_violation(lw, pot, new, eps)

    return run

  keep = lambda pot, v: lambda _: (pot, v)
  f_aa, v_aa = jax.lax.cond(
    viols[1] > tol, self_update(p.x, p.la, st.f_aa), keep(st.f_aa, viols[1]), None
  )
  if static_b:
    g_bb, v_bb = st.g_bb, jnp.zeros_like(v_ab)
  else:
    g_bb, v_bb = jax.lax.cond(
      viols[2] > tol, self_update(p.y, p.lb, st.g_bb), keep(st.g_bb, viols[2]), None
    )
  return _State(f_ba, g_ab, f_aa, g_bb), jnp.stack([v_ab, v_aa, v_bb])


def _extrapolate(st: _State, eps, p: _Clouds, sm: Softmin, detach: bool, static_b) -> _State:
  """GeomLoss's "last extrapolation": one more softmin per potential.

  With ``detach`` (envelope gradients) only the points a potential lives on carry gradient:
  ``f_ba`` from ``C(x, sg(y))``, ``g_ab`` from ``C(y, sg(x))``, ``f_aa`` from ``C(x, sg(x))``.
  The ``g_ab`` update reads the *previous* ``f_ba`` (a simultaneous update, as in GeomLoss).
  """
  d = sg if detach else (lambda t: t)
  return _State(
    sm(p.x, d(p.y), d(p.lb + st.g_ab / eps), eps),
    sm(p.y, d(p.x), d(p.la + st.f_ba / eps), eps),
    sm(p.x, d(p.x), d(p.la + st.f_aa / eps), eps),
    _self_softmin(sm, static_b, st.g_bb, p.y, d(p.y), d(p.lb + st.g_bb / eps), eps),
  )


class _Schedule(NamedTuple):
  diam: jax.Array  # D, at least blur
  n_mid: jax.Array  # int32 number of intermediate ε
  blur: jax.Array
  scaling: jax.Array

  @property
  def n_sched(self) -> jax.Array:
    return self.n_mid + 2  # updates at D², the n_mid intermediate ε, then blur²

  def epsilon(self, k: jax.Array) -> jax.Array:
    return schedule.traced_epsilon(k, self.diam, self.n_mid, self.blur, self.scaling)


def _tail_while(st: _State, eps, tol, n_updates, p: _Clouds, sm: Softmin, static_b):
  """The converged-mode updates of :func:`_tol_step` at the final ε from the potentials ``st``
  (after the annealing, or a warm start): ``n_updates`` of them with ``tol=None``, else until
  within ``tol`` (at most ``n_updates``). Returns ``(state, updates run, last largest
  marginal violation)``."""
  inf = jnp.asarray(jnp.inf, p.x.dtype)
  run_tol = -inf if tol is None else tol  # annealed mode: every update runs all sides

  def body(carry):
    k, st, viols = carry
    st, viols = _tol_step(st, viols, eps, run_tol, p, sm, static_b)
    return k + 1, st, viols

  cond = lambda c: (c[0] < n_updates) & (jnp.max(c[2]) > run_tol)
  k, st, viols = jax.lax.while_loop(cond, body, (jnp.int32(0), st, jnp.full((3,), inf)))
  return st, k, jnp.max(viols)


def _anneal_while(p: _Clouds, sch: _Schedule, tol, max_iter: int, sm: Softmin, static_b):
  """Envelope mode: the annealing (and converged-mode tail) as ``lax.while_loop``s.

  Returns ``(state, updates run, last largest marginal violation)``.
  """
  inf = jnp.asarray(jnp.inf, p.x.dtype)

  def body(carry):
    k, st, _ = carry
    st, viol = _div_step(st, sch.epsilon(k), p, sm, static_b)
    return k + 1, st, viol

  st0 = _div_init(sch.diam**2, p, sm, static_b)
  k, st, viol = jax.lax.while_loop(lambda c: c[0] < sch.n_sched, body, (jnp.int32(0), st0, inf))
  if tol is None:
    return st, k, viol
  # Past the schedule, only while some marginal is off: the warm loop from these potentials.
  st, extra, viol = _tail_while(st, sch.blur**2, tol, max_iter, p, sm, static_b)
  return st, k + extra, viol


def _anneal_scan(p: _Clouds, sch: _Schedule, tol, max_iter, sm: Softmin, static_b, n_steps):
  """Unroll mode: a static-length, reverse-differentiable scan whose idle steps ``lax.cond``
  skips. Returns ``(state, updates run, last largest marginal violation)``."""
  inf = jnp.asarray(jnp.inf, p.x.dtype)

  def sched_step(carry, k):
    def run(c):
      st, viol = _div_step(c[0], sch.epsilon(k), p, sm, static_b)
      return st, c[1] + 1, viol

    return jax.lax.cond(k < sch.n_sched, run, lambda c: c, carry), None

  st0 = _div_init(sch.diam**2, p, sm, static_b)
  carry = (st0, jnp.int32(0), inf)
  (st, k, viol), _ = jax.lax.scan(sched_step, carry, jnp.arange(n_steps, dtype=jnp.int32))
  if tol is None:
    return st, k, viol
  eps = sch.blur**2

  def tol_step(carry, _):
    def run(c):
      st, viols = _tol_step(c[0], c[2], eps, tol, p, sm, static_b)
      return st, c[1] + 1, viols

    return jax.lax.cond(jnp.max(carry[2]) > tol, run, lambda c: c, carry), None

  (st, k, viols), _ = jax.lax.scan(tol_step, (st, k, jnp.full((3,), inf)), None, length=max_iter)
  return st, k, jnp.max(viols)


def init_ok(init) -> jax.Array:
  """In-graph check of warm-start potentials (all finite); ``True`` without ``init``."""
  if init is None:
    return jnp.asarray(True)
  return validation.in_graph_ok(*(jnp.isfinite(t) for t in init if t is not None))


# ----------------------------------------------------------------------------- dense backend


class Checked(NamedTuple):
  """What every backend starts from: traced settings in the problem's dtype, the in-graph
  validity flag and the ε schedule of the centred problem."""

  ok: jax.Array  # bool: every check that validation could not make on traced values passed
  blur: jax.Array
  scaling: jax.Array
  tol: jax.Array | None  # +inf when not ok (no runaway converged-mode loop)
  truncate: jax.Array
  schedule: _Schedule


def check_and_schedule(x, y, problem: OTProblem, s: DivergenceSettings) -> Checked:
  """In-graph checks (a failed one makes the outputs NaN) and the schedule for the centred
  clouds ``x, y``: ``D = max(bounding-box diagonal or s.diameter, blur)``."""
  dtype = x.dtype
  scalar = lambda v: None if v is None else jnp.asarray(v, dtype)
  blur, scaling, tol, diameter = (scalar(v) for v in (s.blur, s.scaling, s.tol, s.diameter))
  truncate = scalar(s.truncate)
  sa, sb = jnp.sum(problem.a), jnp.sum(problem.b)
  checks = [
    (blur > 0) & jnp.isfinite(blur),
    (scaling > 0) & (scaling < 1),
    (truncate > 0) & jnp.isfinite(truncate),
    jnp.abs(sa - sb) <= validation.MASS_RTOL * jnp.maximum(sa, sb),
  ]
  if tol is not None:
    checks.append((tol > 0) & jnp.isfinite(tol))
  if diameter is None:
    diam = schedule.bounding_box_diameter(x, y)
  else:
    extent = schedule.largest_extent(sg(x), sg(y))
    checks.append(diameter >= extent * (1 - _DIAMETER_RTOL))
    diam = diameter
  ok = validation.in_graph_ok(*checks)
  diam = sg(jnp.where(ok, jnp.maximum(diam, blur), blur))
  n_mid = jnp.where(ok, schedule.n_mid_steps(diam, blur, scaling), 0)  # no runaway loop on NaN
  tol_ = None if tol is None else jnp.where(ok, tol, jnp.inf)
  return Checked(ok, blur, scaling, tol_, truncate, _Schedule(diam, n_mid, blur, scaling))


def _dense_backend(problem: OTProblem, s: DivergenceSettings, init=None) -> DivergenceOutput:
  """The exact chunked path: every softmin over all ``n × m`` pairs, in O(n) memory."""
  dtype = problem.x.dtype
  c = problem.centered()
  p = _Clouds(c.x, c.y, problem.log_a, problem.log_b)
  chk = check_and_schedule(p.x, p.y, problem, s)
  ok, blur, tol, sch = chk.ok & init_ok(init), chk.blur, chk.tol, chk.schedule

  sm = lambda x, y, h, eps: softmin_kernel(x, y, h, eps, s.chunk_size)
  if init is not None:  # warm start: no annealing (envelope gradients only)
    pd, eps = p.detached(), blur**2
    hx2 = 0.5 * jnp.sum(pd.x * pd.x, axis=1)
    hy2 = 0.5 * jnp.sum(pd.y * pd.y, axis=1)
    f_ba, g_ab, f_aa, g_bb = (None if t is None else sg(t) for t in init)
    f_ba, f_aa = f_ba - hx2, f_aa - hx2
    # A target sample with no potential yet gets the softmin of f_ba (its c-transform).
    g_ab = sm(pd.y, pd.x, pd.la + f_ba / eps, eps) if g_ab is None else g_ab - hy2
    g_bb = jnp.zeros_like(hy2) if g_bb is None else g_bb - hy2
    n_updates = s.warm_iters if tol is None else s.max_iter
    st0 = _State(f_ba, g_ab, f_aa, g_bb)
    st, iters, viol = _tail_while(st0, eps, tol, n_updates, pd, sm, s.static_b)
  elif s.grad == "envelope":
    st, iters, viol = _anneal_while(p.detached(), sch, tol, s.max_iter, sm, s.static_b)
  else:
    st, iters, viol = _anneal_scan(p, sch, tol, s.max_iter, sm, s.static_b, s.unroll_steps)
    ok = ok & (sch.n_sched <= s.unroll_steps)
  eps = blur**2
  ext = _extrapolate(st, eps, p, sm, detach=s.grad == "envelope", static_b=s.static_b)
  # The marginal violation of the last loop potentials, read off the extrapolation's update.
  viol_final = jnp.max(
    jnp.stack(
      [
        mass_violation(lw, sg(old), sg(new), sg(eps))
        for old, new, lw in zip(st, ext, (p.la, p.lb, p.la, p.lb), strict=True)
      ]
    )
  )
  st = ext

  hx2 = 0.5 * jnp.sum(p.x * p.x, axis=1)
  hy2 = 0.5 * jnp.sum(p.y * p.y, axis=1)
  # Folded potentials: the ½‖·‖² cancel between f_ba and f_aa, and between g_ab and g_bb;
  # with static_b, g_ab is unfolded against the zero potential −½‖y‖².
  g_bb = -hy2 if s.static_b else st.g_bb
  value = jnp.sum(problem.a * (st.f_ba - st.f_aa)) + jnp.sum(problem.b * (st.g_ab - g_bb))
  nan = lambda v: jnp.where(ok, v, jnp.nan)
  converged = jnp.asarray(False) if tol is None else ok & (viol <= tol)  # the loop's own test
  return DivergenceOutput(
    value=nan(value),
    f_ba=nan(st.f_ba + hx2),
    g_ab=nan(st.g_ab + hy2),
    f_aa=nan(st.f_aa + hx2),
    g_bb=None if s.static_b else nan(st.g_bb + hy2),
    iterations=iters,
    marginal_violation=nan(viol_final),
    converged=converged,
    dense_fallbacks=jnp.int32(0),
    kept_tile_fraction=jnp.asarray(1.0, dtype),
    backend="dense",
  )


def _backend(name: str) -> Callable[..., DivergenceOutput]:
  """The implementation of a backend of :data:`BACKENDS`: ``(problem, settings, init) ->
  output``."""
  if name == "dense":
    return _dense_backend
  if name == "multiscale":
    from gsae_jax.ot.multiscale_divergence import multiscale_backend  # imports this module

    return multiscale_backend
  raise ValueError(f"unknown backend {name!r}")


@jax.jit
def _solve(problem: OTProblem, settings: DivergenceSettings, init=None) -> DivergenceOutput:
  # Settings' static fields are pytree metadata: part of the compilation key; blur, scaling,
  # tol, diameter and truncate are traced, so sweeping them does not recompile. Which of the
  # `init` potentials are None is part of the key too.
  return _backend(settings.backend)(problem, settings, init)


# ----------------------------------------------------------------------------- public API


# `auto` picks multiscale from this many pairs on (n·m), in d ≤ 3 (BUILD_NOTES.md, "Multiscale").
AUTO_MULTISCALE_PAIRS = 10_000**2
# ... and from this many for a call compiled once and run many times (a training step), where
# multiscale's longer compile (≈ 30 s against ≈ 2 s) is paid once (BUILD_NOTES.md, "auto").
AUTO_MULTISCALE_PAIRS_REPEATED = 2_500**2
MULTISCALE_MAX_DIM = 3


def resolve_backend(
  backend: str, n: int, m: int, d: int, grad: str = "envelope", repeated: bool = False
) -> str:
  """The backend that runs for ``backend`` on an ``n × m`` problem in dimension ``d``.

  ``"auto"`` picks ``"multiscale"`` for ``d ≤ 3``, envelope gradients and
  ``n·m ≥ AUTO_MULTISCALE_PAIRS`` (GeomLoss's ``auto`` rule, 10⁸), else ``"dense"``. With
  ``repeated=True`` (a jitted call run many times, as a training step) the threshold is
  ``AUTO_MULTISCALE_PAIRS_REPEATED`` (2 500²), where multiscale's run time overtakes dense's on
  the 2-core CPU; a single call compiles the multiscale backend for ≈ 30 s against ≈ 2 s and
  so gains from it only on larger clouds. An explicit ``"multiscale"`` with ``d > 3`` or
  ``grad="unroll"`` is an error.
  """
  validation.check_choice("backend", backend, ("auto", *BACKENDS))
  if backend == "auto":
    pairs = AUTO_MULTISCALE_PAIRS_REPEATED if repeated else AUTO_MULTISCALE_PAIRS
    sparse = d <= MULTISCALE_MAX_DIM and grad == "envelope" and n * m >= pairs
    return "multiscale" if sparse else "dense"
  if backend == "multiscale":
    if d > MULTISCALE_MAX_DIM:
      raise ValueError(
        f"backend='multiscale' supports d <= {MULTISCALE_MAX_DIM}, got d = {d}: use 'dense' "
        "(or 'auto', which picks it)."
      )
    if grad != "envelope":
      raise ValueError(
        "backend='multiscale' supports grad='envelope' only (its tile masks are rebuilt from "
        "the potentials at every update); use backend='dense' for grad='unroll'."
      )
  return backend


def _unroll_steps(x, y, blur, scaling, diameter) -> int:
  """Static scan length of the annealing for ``grad="unroll"``: exact when the schedule is
  known on the host, else the schedule of a cloud ``_UNROLL_DIAMETER_BOUND`` blurs wide."""
  if not validation.is_concrete(scaling):
    raise ValueError(
      "grad='unroll' needs a concrete `scaling` (its scan length is static); got a traced "
      "value. Pass a Python float, or use grad='envelope', where every setting may be traced."
    )
  scaling = float(validation.host(scaling))
  if validation.is_concrete(blur):
    blur = float(validation.host(blur))
    if diameter is not None and validation.is_concrete(diameter):
      return len(schedule.epsilon_schedule(float(validation.host(diameter)), blur, scaling))
    if validation.is_concrete(x, y):
      xh, yh = validation.host(x), validation.host(y)
      lo = np.minimum(xh.min(axis=0), yh.min(axis=0))
      hi = np.maximum(xh.max(axis=0), yh.max(axis=0))
      diam = float(np.linalg.norm(hi - lo, ord=2))
      # A hair wider than the in-graph float32 diameter: the scan is a bound (idle steps skip).
      return len(schedule.epsilon_schedule(diam * (1 + 1e-6), blur, scaling))
  return len(schedule.epsilon_schedule(_UNROLL_DIAMETER_BOUND, 1.0, scaling))


def make_problem_and_settings(
  x,
  y,
  a=None,
  b=None,
  *,
  blur=0.05,
  scaling=0.7,
  tol=None,
  max_iter=1000,
  grad="envelope",
  chunk_size=None,
  diameter=None,
  static_b=False,
  backend="auto",
  truncate=10.0,
  block_size=128,
  tile_fraction=0.25,
  warm_iters=5,
  coarse="accurate",
) -> tuple[OTProblem, DivergenceSettings]:
  """Checks every argument of :func:`solve_divergence` and packs them; raises ``ValueError``
  or ``TypeError`` naming the first bad one. See :func:`solve_divergence` for the arguments."""
  x, y, a, b = validation.validate_inputs(x, y, a, b)
  validation.check_equal_mass(a, b)
  validation.check_scalar("blur", blur, low=0.0)
  validation.check_scalar("scaling", scaling, low=0.0, high=1.0)
  if tol is not None:
    validation.check_scalar("tol", tol, low=0.0)
  if diameter is not None:
    validation.check_scalar("diameter", diameter, low=0.0)
    if validation.is_concrete(x, y, diameter):
      extent = float(schedule.largest_extent(validation.host(x), validation.host(y)))
      if float(validation.host(diameter)) < extent * (1 - _DIAMETER_RTOL):
        raise ValueError(
          f"`diameter` = {diameter!r} is below the widest side of the bounding box of x ∪ y "
          f"({extent:.6g}), so it underestimates the largest distance between points and "
          "the ε schedule would start too cold. Pass an upper bound, or None (the bounding "
          "box's diagonal)."
        )
  max_iter = validation.check_count("max_iter", max_iter)
  chunk_size = validation.check_count("chunk_size", chunk_size, allow_none=True)
  validation.check_choice("grad", grad, ("envelope", "unroll"))
  if not isinstance(static_b, bool | np.bool_):
    raise TypeError(f"`static_b` must be a bool, got {static_b!r}.")
  backend = resolve_backend(backend, x.shape[0], y.shape[0], x.shape[1], grad)
  validation.check_scalar("truncate", truncate, low=0.0)
  block_size = validation.check_count("block_size", block_size)
  validation.check_scalar("tile_fraction", tile_fraction, low=0.0, high=1.0, open_high=False)
  warm_iters = validation.check_count("warm_iters", warm_iters)
  validation.check_choice("coarse", coarse, COARSE_GRIDS)
  unroll_steps = _unroll_steps(x, y, blur, scaling, diameter) if grad == "unroll" else None
  settings = DivergenceSettings(
    blur=blur,
    scaling=scaling,
    tol=tol,
    diameter=diameter,
    max_iter=max_iter,
    grad=grad,
    chunk_size=chunk_size,
    static_b=bool(static_b),
    backend=backend,
    unroll_steps=unroll_steps,
    truncate=truncate,
    block_size=block_size,
    tile_fraction=float(tile_fraction),
    warm_iters=warm_iters,
    coarse=coarse,
  )
  return OTProblem(x, y, a, b), settings


_INIT_NAMES = ("f_ba", "g_ab", "f_aa", "g_bb")


def check_init(init, problem: OTProblem, settings: DivergenceSettings):
  """Checks warm-start potentials for :func:`solve_divergence`; returns them as a 4-tuple of
  arrays in the problem's dtype (``g_ab``/``g_bb`` possibly ``None``), or ``None``."""
  if init is None:
    return None
  if isinstance(init, DivergenceOutput):
    init = (init.f_ba, init.g_ab, init.f_aa, init.g_bb)
  if not isinstance(init, tuple | list) or len(init) != 4:
    raise ValueError(
      "`init` must be a DivergenceOutput or a tuple (f_ba [n], g_ab [m] or None, f_aa [n], "
      f"g_bb [m] or None), got {type(init).__name__}."
    )
  if settings.grad != "envelope":
    raise ValueError("`init` (warm start) needs grad='envelope': it skips the annealing.")
  n, m = problem.x.shape[0], problem.y.shape[0]
  out = []
  for name, t, size in zip(_INIT_NAMES, init, (n, m, n, m), strict=True):
    if t is None:
      if name in ("f_ba", "f_aa"):
        raise ValueError(f"`init` needs {name} [{n}] (only the target's potentials may be None).")
      if name == "g_bb" and not settings.static_b:
        raise ValueError(
          "`init` needs g_bb [m] unless static_b=True (the target's self-potential cannot be "
          "extended from the source side)."
        )
      out.append(None)
      continue
    t = validation.as_array(f"init.{name}", t).astype(problem.x.dtype)
    if t.shape != (size,):
      raise ValueError(f"`init.{name}` must have shape ({size},), got {t.shape}.")
    if validation.is_concrete(t) and not np.all(np.isfinite(validation.host(t))):
      raise ValueError(f"`init.{name}` contains NaN or inf.")
    out.append(t)
  if settings.static_b:
    out[3] = None  # unused
  return tuple(out)


def solve_divergence(
  x: jax.Array,
  y: jax.Array,
  a: jax.Array | None = None,
  b: jax.Array | None = None,
  *,
  blur: float | jax.Array = 0.05,
  scaling: float | jax.Array = 0.7,
  tol: float | jax.Array | None = None,
  max_iter: int = 1000,
  grad: str = "envelope",
  chunk_size: int | None = None,
  diameter: float | jax.Array | None = None,
  static_b: bool = False,
  backend: str = "auto",
  truncate: float | jax.Array = 10.0,
  block_size: int = 128,
  tile_fraction: float = 0.25,
  init: DivergenceOutput | tuple | None = None,
  warm_iters: int = 5,
  coarse: str = "accurate",
) -> DivergenceOutput:
  """Debiased Sinkhorn divergence with its potentials and convergence report.

  ``S_ε(α, β) = OT_ε(α, β) − ½ OT_ε(α, α) − ½ OT_ε(β, β)``, exactly GeomLoss
  ``SamplesLoss("sinkhorn", p=2, blur=blur, scaling=scaling, debias=True)`` (Feydy et al.
  2019), the divergence of the GSAE paper (§3, Algorithm 1):

  * cost ``C(x, y) = ½‖x − y‖²`` and ``ε = blur²``;
  * ε-annealing ``[D²] + [exp(e) for e in arange(2 ln D, 2 ln blur, 2 ln scaling)] + [blur²]``
    with ``D`` the diagonal of the bounding box of ``x ∪ y`` (at least ``blur``), one
    symmetric averaged update (``f ← ½(f + f̃)``) of the four potentials per ε, no test;
  * value ``⟨α, f_ba − f_aa⟩ + ⟨β, g_ab − g_bb⟩`` after one final extrapolation.

  With ``tol`` (converged mode), updates continue at ``ε = blur²`` until the largest L1
  marginal violation of the three plans is below ``tol`` or ``max_iter`` more updates ran: the
  converged divergence, as ott-jax computes it. The cross pair is then updated alternately
  (Gauss–Seidel) and each self-term stops once its own violation is within ``tol``. Check
  ``converged`` in the result: a run that hit ``max_iter`` says ``False``.

  Every softmin is chunked (:mod:`gsae_jax.ot.softmin`): memory
  ``O((n + m)·d + chunk·max(n, m))``, never an ``[n, m]`` matrix.

  Gradients:
    * ``"envelope"`` (default): the loop runs under ``stop_gradient`` (a ``lax.while_loop``,
      jittable with traced points and settings); gradient flows through the final
      extrapolation only, with each potential differentiated in the points it lives on
      (GeomLoss "last extrapolation"). Exact at convergence, and the cost of ~2 softmins.
    * ``"unroll"``: autodiff through every iteration (Genevay et al. 2018; Patrini et al.
      2019). The loop is a ``lax.scan`` of static length: ``scaling`` must be concrete, and
      the length is exact when ``blur`` and the points (or ``diameter``) are, else a bound.

  Traced vs static: ``x, y, a, b, blur, scaling, tol, diameter`` are traced, so a sweep over
  blur compiles once; ``max_iter, grad, chunk_size, static_b, backend`` (and whether ``tol``
  and ``diameter`` are ``None``) are static.

  Errors: bad shapes, dtypes and static settings raise ``ValueError``/``TypeError`` naming
  the argument; so do bad values of concrete arguments (NaN/inf points, negative weights,
  unequal total masses, ``blur ≤ 0``, ``scaling ∉ (0, 1)``, ``tol ≤ 0``, a ``diameter`` below
  the bounding box's widest side). The same value checks on *traced* arguments cannot raise:
  they make the value and potentials NaN instead. float16/bfloat16 and integer inputs are
  computed in float32.

  Args:
    x: ``[n, d]`` source points. y: ``[m, d]`` target points.
    a: ``[n]`` non-negative weights of ``x`` (default uniform ``1/n``).
    b: ``[m]`` non-negative weights of ``y`` (default uniform ``1/m``); ``Σa = Σb``.
    blur: ``ε = blur²``; GeomLoss's blur.
    scaling: annealing ratio of ``blur`` per step, in ``(0, 1)``.
    tol: optional marginal-violation tolerance for converged mode.
    max_iter: cap on the converged-mode updates (static).
    grad: ``"envelope"`` or ``"unroll"``.
    chunk_size: rows per softmin block (static); default 256 rows, fewer once a block passes
      4 MiB.
    diameter: optional fixed diameter ``D`` instead of the bounding box's diagonal (an upper
      bound of the distances between points).
    static_b: skip the target's self-term ``OT_ε(β, β)`` (as ott-jax's ``static_b``) and
      return ``OT_ε(α, β) − ½ OT_ε(α, α) = S_ε + ½ OT_ε(β, β)``: the same gradient in ``x``
      and ``a`` (exactly, not just at convergence) for 3 softmins per update instead of 4.
      For training against a prior sample.
    backend: ``"auto"`` (default: :func:`resolve_backend`), ``"dense"`` (every pair, the
      reference) or ``"multiscale"`` (d ≤ 3, envelope gradients: a coarse phase on grid
      cells, then block-sparse softmins that drop only tiles provably carrying less than
      ``e^{−truncate}`` of each row's mass; :mod:`gsae_jax.ot.multiscale_divergence`).
    truncate: ``multiscale`` truncation ``T`` (traced; default 10).
    block_size: ``multiscale`` points per block (static; default 128).
    tile_fraction: ``multiscale`` tile-list capacity as a fraction of all tiles (static); a
      softmin that overflows it runs densely and is counted in ``dense_fallbacks``.
    init: warm start (envelope gradients): the result of a previous call on nearby clouds
      (the same points moved a little), or ``(f_ba [n], g_ab [m], f_aa [n], g_bb [m])`` true
      potentials. ``g_ab`` may be ``None`` for a freshly drawn target sample: it starts as
      the softmin of ``f_ba`` (block-sparse under ``multiscale``, tiles chosen from an upper
      bound, :func:`gsae_jax.ot.multiscale.softmin_upper_bound`); ``g_bb`` may be ``None``
      with ``static_b``. The annealing (and the coarse phase) is skipped: the loop runs the
      converged-mode updates at ``ε = blur²`` (cross pair alternating, self-terms averaged),
      ``warm_iters`` of them with ``tol=None``, or until within ``tol`` (at most
      ``max_iter``). Repeated over training steps, the potentials keep converging, so this
      approaches the converged divergence, not the annealed one (BUILD_NOTES.md, "Warm
      starts across steps"). Which entries are ``None`` is static.
    warm_iters: updates run from ``init`` when ``tol`` is ``None`` (static; default 5).
    coarse: ``multiscale`` coarse phase (static), one of :data:`COARSE_GRIDS`:
      ``"accurate"`` (default; it leaves a grid only at 32 cells per ``√ε`` in 2-D, 8 in 3-D:
      within 0.3 % of dense's value at n = 200 000 between two samples of one distribution)
      or ``"fast"`` (≈ 0.5–0.7× the time in 2-D, a value bias of ≈ 1.7e-6 that does not
      shrink with n, 5–6 % around isolated outliers; gradients within a few percent).

  Returns:
    A :class:`~gsae_jax.ot.problem.DivergenceOutput`; its ``value`` is differentiable in
    ``x, y, a, b``.
  """
  problem, settings = make_problem_and_settings(
    x,
    y,
    a,
    b,
    blur=blur,
    scaling=scaling,
    tol=tol,
    max_iter=max_iter,
    grad=grad,
    chunk_size=chunk_size,
    diameter=diameter,
    static_b=static_b,
    backend=backend,
    truncate=truncate,
    block_size=block_size,
    tile_fraction=tile_fraction,
    warm_iters=warm_iters,
    coarse=coarse,
  )
  return _solve(problem, settings, check_init(init, problem, settings))


def sinkhorn_divergence(
  x: jax.Array,
  y: jax.Array,
  a: jax.Array | None = None,
  b: jax.Array | None = None,
  *,
  blur: float | jax.Array = 0.05,
  scaling: float | jax.Array = 0.7,
  tol: float | jax.Array | None = None,
  max_iter: int = 1000,
  grad: str = "envelope",
  chunk_size: int | None = None,
  diameter: float | jax.Array | None = None,
  static_b: bool = False,
  backend: str = "auto",
  truncate: float | jax.Array = 10.0,
  block_size: int = 128,
  tile_fraction: float = 0.25,
  init: DivergenceOutput | tuple | None = None,
  warm_iters: int = 5,
  coarse: str = "accurate",
) -> jax.Array:
  """Debiased Sinkhorn divergence ``S_ε(α, β)`` as a differentiable scalar.

  ``solve_divergence(...).value``: the GeomLoss-style call (``SamplesLoss("sinkhorn", p=2,
  blur=blur, scaling=scaling)``, cost ``½‖x − y‖²``, ``ε = blur²``; Feydy et al. 2019) used
  by the GSAE paper. Arguments, errors and the NaN contract for traced values are those of
  :func:`solve_divergence`; use that function to see the potentials, the number of updates
  and whether converged mode converged.

  Args:
    x: ``[n, d]``; y: ``[m, d]``; a: ``[n]``; b: ``[m]`` (uniform by default).
    blur, scaling, tol, max_iter, grad, chunk_size, diameter, static_b, backend, truncate,
      block_size, tile_fraction, init, warm_iters, coarse: as in :func:`solve_divergence`.

  Returns:
    Scalar ``S_ε`` (or ``S_ε + ½ OT_ε(β, β)`` with ``static_b``), differentiable in
    ``x, y, a, b``.
  """
  return solve_divergence(
    x,
    y,
    a,
    b,
    blur=blur,
    scaling=scaling,
    tol=tol,
    max_iter=max_iter,
    grad=grad,
    chunk_size=chunk_size,
    diameter=diameter,
    static_b=static_b,
    backend=backend,
    truncate=truncate,
    block_size=block_size,
    tile_fraction=tile_fraction,
    init=init,
    warm_iters=warm_iters,
    coarse=coarse,
  ).value
