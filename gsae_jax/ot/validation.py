"""Input checks of the OT engine: one place that turns bad input into a named error.

Every public OT function calls these before any ``jit``. Shapes, dtypes and static settings are
always checked; values (NaN/inf, signs, masses) only where the arrays are concrete, i.e. not
``jax`` tracers. A check that cannot run under tracing is repeated in-graph by the solver, which
then returns NaN rather than a plausible wrong number (see :func:`in_graph_ok`).
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

# Relative tolerance on ``|Σa − Σb| / max(Σa, Σb)``: float32 sums of 10⁶ weights drift by
# ~1e-6, while a mismatch this small moves the divergence by about the same fraction.
MASS_RTOL = 1e-4


def is_concrete(*arrays) -> bool:
  """True when none of ``arrays`` is a ``jax`` tracer (their values can be read)."""
  return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def host(a) -> np.ndarray:
  # Value checks run in numpy: inside a jit trace even jnp ops on a concrete (closed-over)
  # array are staged, and `bool()` of their result would raise.
  return np.asarray(a)


def working_dtype(*dtypes) -> jnp.dtype:
  """The floating dtype the engine computes in: float64 if any input is, else float32.

  Integer and boolean inputs become float32; float16/bfloat16 are promoted to float32 because
  ``exp(⟨x, y⟩/ε)`` overflows their range and their 3-digit mantissas lose the potentials.
  """
  wide = any(jnp.dtype(d) == jnp.float64 for d in dtypes)
  return jnp.dtype(jnp.float64 if wide and jax.config.jax_enable_x64 else jnp.float32)


def as_array(name: str, value) -> jax.Array:
  """``jnp.asarray(value)``, refusing complex, string and object input by name."""
  if isinstance(value, str | bytes):
    raise TypeError(f"`{name}` must be an array of real numbers, got a string.")
  try:
    arr = value if isinstance(value, jax.Array) else jnp.asarray(value)
  except (TypeError, ValueError) as e:
    raise TypeError(f"`{name}` must be an array of real numbers: {e}") from None
  if jnp.issubdtype(arr.dtype, jnp.complexfloating):
    raise TypeError(f"`{name}` must be real; got complex dtype {arr.dtype}.")
  return arr


def check_cloud(name: str, pts) -> jax.Array:
  """A ``[n, d]`` point cloud with ``n, d ≥ 1`` and (when concrete) finite coordinates."""
  pts = as_array(name, pts)
  if pts.ndim != 2:
    raise ValueError(f"`{name}` must be a [n, d] array of points, got shape {pts.shape}.")
  if pts.shape[0] == 0 or pts.shape[1] == 0:
    raise ValueError(f"`{name}` must hold at least one point of dimension >= 1, got {pts.shape}.")
  if is_concrete(pts) and not np.all(np.isfinite(host(pts))):
    raise ValueError(f"`{name}` contains NaN or inf coordinates.")
  return pts


def check_weights(name: str, w, n: int, dtype) -> jax.Array:
  """``[n]`` non-negative weights with a positive sum (uniform ``1/n`` when ``None``)."""
  if w is None:
    return jnp.full((n,), 1.0 / n, dtype)
  w = as_array(name, w).astype(dtype)
  if w.shape != (n,):
    raise ValueError(f"`{name}` must be a [{n}] weight vector matching its cloud, got {w.shape}.")
  if is_concrete(w):
    w_host = host(w)
    if not np.all(np.isfinite(w_host)) or np.any(w_host < 0):
      raise ValueError(f"`{name}` must be finite and non-negative.")
    if not float(np.sum(w_host)) > 0:
      raise ValueError(f"`{name}` sums to zero: it cannot be normalised to a probability.")
  return w


def check_equal_mass(a: jax.Array, b: jax.Array) -> None:
  """Balanced OT needs ``Σa = Σb``; raises with both sums when concrete weights differ."""
  if not is_concrete(a, b):
    return
  sa, sb = float(np.sum(host(a), dtype=np.float64)), float(np.sum(host(b), dtype=np.float64))
  if abs(sa - sb) > MASS_RTOL * max(sa, sb):
    raise ValueError(
      f"`a` and `b` must have the same total mass (balanced OT): sum(a) = {sa:.6g}, "
      f"sum(b) = {sb:.6g}. Normalise both, e.g. a / a.sum() and b / b.sum()."
    )


def validate_inputs(x, y, a=None, b=None):
  """Checks and normalises ``(x, y, a, b)``; raises ``ValueError``/``TypeError`` naming the bad
  argument.

  Shapes and dtypes are always checked; values (NaN/inf, negative or zero-sum weights) only
  where the arrays are concrete, i.e. outside ``jit``. Weights are returned as given (not
  renormalised): GeomLoss treats them as the measures' masses. The common dtype is float32
  unless an input is float64 (integers and float16/bfloat16 are computed in float32).

  Returns:
    ``(x [n, d], y [m, d], a [n], b [m])`` in that common floating dtype.
  """
  x = check_cloud("x", x)
  y = check_cloud("y", y)
  if x.shape[1] != y.shape[1]:
    raise ValueError(f"`x` and `y` must have the same dimension, got {x.shape} and {y.shape}.")
  dtype = working_dtype(x.dtype, y.dtype)
  x, y = x.astype(dtype), y.astype(dtype)
  return x, y, check_weights("a", a, x.shape[0], dtype), check_weights("b", b, y.shape[0], dtype)


def _is_real_scalar(value) -> bool:
  if isinstance(value, bool | np.bool_):
    return False
  if isinstance(value, numbers.Real):
    return True
  return isinstance(value, jax.Array | np.ndarray) and value.shape == ()


def check_scalar(
  name: str, value, *, low: float | None = None, high: float | None = None, open_high=True
):
  """A real scalar (Python number or 0-d array, possibly traced) in ``(low, high)``.

  Returns the value unchanged. Booleans, strings and arrays of other shapes are a
  ``TypeError``/``ValueError`` naming ``name``; the range is checked only when concrete
  (the solver re-checks it in-graph and returns NaN).
  """
  if isinstance(value, bool | np.bool_ | str | bytes) or (
    isinstance(value, jax.Array | np.ndarray) and value.dtype == bool
  ):
    raise TypeError(f"`{name}` must be a real number, got {value!r}.")
  if isinstance(value, jax.Array | np.ndarray | list | tuple) and np.shape(value) != ():
    raise ValueError(f"`{name}` must be a scalar, got shape {np.shape(value)}.")
  if isinstance(value, complex) or (
    isinstance(value, jax.Array | np.ndarray) and jnp.issubdtype(value.dtype, jnp.complexfloating)
  ):
    raise TypeError(f"`{name}` must be real, got {value!r}.")
  if not _is_real_scalar(value):
    raise TypeError(f"`{name}` must be a real number, got {type(value).__name__}.")
  if is_concrete(value):
    v = float(host(value))
    above = v > low if low is not None else True
    below = (v < high if open_high else v <= high) if high is not None else True
    if not (np.isfinite(v) and above and below):
      lo = "-inf" if low is None else f"{low:g}"
      hi = "inf" if high is None else f"{high:g}"
      raise ValueError(f"`{name}` must be finite and in ({lo}, {hi}), got {value!r}.")
  return value


def check_count(name: str, value, *, allow_none: bool = False) -> int | None:
  """A static positive integer (iteration cap, chunk size); ``None`` if allowed."""
  if value is None and allow_none:
    return None
  if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
    raise TypeError(f"`{name}` must be a positive int, got {value!r}.")
  if int(value) < 1:
    raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
  return int(value)


def check_choice(name: str, value, choices: tuple[str, ...]) -> str:
  if value not in choices:
    raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}; got {value!r}.")
  return value


def in_graph_ok(*conditions) -> jax.Array:
  """``all(conditions)`` as a traced boolean: the solvers return NaN where it is false."""
  ok = jnp.asarray(True)
  for c in conditions:
    ok = ok & jnp.all(c)
  return ok
