"""Latent regularisers of the Sinkhorn AutoEncoder family: a penalty ``D(Q_Z, P_Z)`` on samples.

Patrini et al., "Sinkhorn AutoEncoders" (UAI 2019), train a deterministic autoencoder with
``reconstruction + β · D(ẑ, z)`` where ``ẑ [n, d]`` are the encoded latents of a batch and
``z [m, d]`` a sample of the prior ``P_Z``. Their paper compares the sharp Sinkhorn loss (SAE)
with the baselines below; this module implements all of them behind one interface,

    fn(z [n, d], prior_sample [m, d], *, key=None, **settings) -> scalar,

pure, jittable and differentiable in ``z`` (and in ``prior_sample`` where that makes sense).
Look one up by name with :func:`get_regularizer`; the names are :data:`REGULARIZER_NAMES`:

* ``"sinkhorn"`` (default): the project's debiased Sinkhorn divergence
  :func:`gsae_jax.ot.sinkhorn_divergence` (GeomLoss's annealed algorithm, chunked, O(n) memory).
* ``"sharp"``: Patrini et al.'s sharp debiased Sinkhorn loss (their Eq. 12): unrolled log-domain
  Sinkhorn, Altschuler rounding (Altschuler et al. 2017, Alg. 2), transport term only
  (:func:`gsae_jax.ot.sharp_sinkhorn_loss`). Dense ``[n, m]``: small batches only.
* ``"mmd"``: WAE-MMD (Tolstikhin et al. 2018): the unbiased U-statistic of MMD² with the inverse
  multiquadratic kernel summed over WAE's scales; chunked, O(n) memory.
* ``"sliced"``: SWAE (Kolouri et al. 2019): sliced squared W2 over random unit directions.
* ``"w2gauss"``: W2GAE (Patrini et al. §4): closed-form squared W2 between the Gaussian fit of
  the latents and the standard normal prior.
* ``"hungarian"``: HAE (Patrini et al. §5): exact W2² between the two empirical measures by
  optimal assignment (``scipy.optimize.linear_sum_assignment`` on the host).

Cost conventions (they differ on purpose; compare values across regularisers with care):

* ``sinkhorn`` and ``sharp`` use ``C(x, y) = ½‖x − y‖²``, the OT engine's (GeomLoss's)
  convention, with ``ε = blur²`` for ``sinkhorn`` and ``ε = epsilon`` for ``sharp``. They
  approach ``½ W2²`` as ε → 0. (Patrini et al. write ``c̃ = ‖·‖²``; their ``ε`` is twice ours
  for the same plan.)
* ``sliced``, ``w2gauss`` and ``hungarian`` are estimates of ``W2²`` itself, cost ``‖x − y‖²``
  (no ½), as their papers state them: ``hungarian`` is exactly ``W2²`` of the two empirical
  measures, ``w2gauss`` is ``W2²`` of the Gaussian fits, ``sliced`` is the sliced ``W2²``
  (which is ``W2²/d`` in expectation for a translation in ``d`` dimensions). Multiply
  ``sinkhorn``/``sharp`` by 2 to put them on the same scale.
* ``mmd`` is not a transport cost: MMD² of the IMQ kernel ``C/(C + ‖x − y‖²)``.

Input checks (shape ``[n, d]``, equal ``d``, sizes, settings) raise ``ValueError``/``TypeError``
naming the argument. They run in Python on static shapes, so under ``jax.jit`` they fire at
trace time, before anything is compiled.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from gsae_jax.ot import sharp_sinkhorn_loss, sinkhorn_divergence, validation
from gsae_jax.ot.softmin import default_chunk_size

sg = jax.lax.stop_gradient
# Full float32 products on accelerators (the default TF32 on GPUs loses the ~1e-4 relative
# differences the MMD and the sorted projections are made of).
_HIGHEST = jax.lax.Precision.HIGHEST

Regularizer = Callable[..., jax.Array]
"""``(z [n, d], prior_sample [m, d], *, key=None, **settings) -> scalar``."""

WAE_IMQ_SCALES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
"""Multipliers ``s`` of the IMQ base scale ``C = 2 d σ²`` summed over by WAE-MMD (the WAE code)."""

SHARP_MAX_PAIRS = 25_000_000
"""Largest ``max(n·m, n², m²)`` the dense ``sharp`` loss accepts (a 5 000 × 5 000 cost matrix:
100 MB in float32, and reverse mode keeps ``O(n_iter)`` such matrices)."""

HUNGARIAN_MAX_N = 5_000
"""Largest batch the ``hungarian`` regulariser accepts: the host assignment is ``O(n³)`` time and
``O(n²)`` float64 memory (a few seconds and 200 MB at 5 000)."""


# ----------------------------------------------------------------------------- input checks


def _check_pair(z, prior_sample) -> tuple[jax.Array, jax.Array]:
  """``(z [n, d], prior_sample [m, d])`` (``n, m, d ≥ 1``, finite when concrete) in the working
  dtype (float64 if either is and x64 is on, else float32), with errors naming them."""
  z = validation.check_cloud("z", z)
  p = validation.check_cloud("prior_sample", prior_sample)
  if z.shape[1] != p.shape[1]:
    raise ValueError(
      f"`z` and `prior_sample` must have the same dimension d, got {z.shape} and {p.shape}."
    )
  dtype = validation.working_dtype(z.dtype, p.dtype)
  return z.astype(dtype), p.astype(dtype)


# ----------------------------------------------------------------------------- sinkhorn, sharp


def sinkhorn_regularizer(
  z: jax.Array,
  prior_sample: jax.Array,
  *,
  key: jax.Array | None = None,
  blur: float | jax.Array = 0.05,
  scaling: float | jax.Array = 0.7,
  backend: str = "auto",
  **divergence_kwargs,
) -> jax.Array:
  """Debiased Sinkhorn divergence ``S_ε(ẑ, z)`` (the GSAE regulariser), the default.

  ``OT_ε(α, β) − ½ OT_ε(α, α) − ½ OT_ε(β, β)`` with cost ``½‖x − y‖²`` and ``ε = blur²``
  (GeomLoss ``SamplesLoss("sinkhorn", p=2)``; Feydy et al. 2019), a thin wrapper over
  :func:`gsae_jax.ot.sinkhorn_divergence`: chunked, O(n + m) memory, envelope gradients.

  Args:
    z: ``[n, d]`` latents. prior_sample: ``[m, d]`` prior sample.
    key: ignored (deterministic).
    blur: ``ε = blur²``. scaling: ε-annealing ratio in ``(0, 1)``.
    backend: ``"auto"``, ``"dense"`` or ``"multiscale"`` (see ``sinkhorn_divergence``).
    **divergence_kwargs: any other keyword of :func:`gsae_jax.ot.sinkhorn_divergence`
      (``tol``, ``grad``, ``chunk_size``, ``static_b``, ...).

  Returns:
    Scalar divergence, differentiable in ``z`` and ``prior_sample``.
  """
  del key
  z, p = _check_pair(z, prior_sample)
  return sinkhorn_divergence(z, p, blur=blur, scaling=scaling, backend=backend, **divergence_kwargs)


def sharp_regularizer(
  z: jax.Array,
  prior_sample: jax.Array,
  *,
  key: jax.Array | None = None,
  epsilon: float | jax.Array = 0.01,
  n_iter: int = 100,
) -> jax.Array:
  """Patrini et al.'s sharp debiased Sinkhorn loss (SAE, their Eq. 12 and Algorithm 2).

  ``W(ẑ, z) − ½ W(ẑ, ẑ) − ½ W(z, z)`` with ``W = ⟨R, C⟩`` the transport term of the plan
  after ``n_iter`` unrolled log-domain Sinkhorn iterations rounded onto the exact marginals
  (Altschuler et al. 2017, Algorithm 2); gradients through every iteration. Cost
  ``C = ½‖x − y‖²`` (the engine's; Patrini's ``‖·‖²`` with their ε is ours with ``ε/2``).
  A wrapper over :func:`gsae_jax.ot.sharp_sinkhorn_loss`.

  Dense: it builds ``[n, m]``, ``[n, n]`` and ``[m, m]`` cost matrices, and reverse mode keeps
  ``O(n_iter)`` of them; sizes with ``max(n·m, n², m²) > SHARP_MAX_PAIRS`` are refused.

  Args:
    z: ``[n, d]`` latents. prior_sample: ``[m, d]`` prior sample.
    key: ignored (deterministic).
    epsilon: entropic regularisation ε > 0 (in units of ``½‖·‖²``).
    n_iter: unrolled Sinkhorn iterations ``L`` (static).

  Returns:
    Scalar loss, differentiable in ``z`` and ``prior_sample``.

  Raises:
    ValueError: bad shapes or settings, or a problem above ``SHARP_MAX_PAIRS``.
  """
  del key
  z, p = _check_pair(z, prior_sample)
  n, m = z.shape[0], p.shape[0]
  pairs = max(n * m, n * n, m * m)
  if pairs > SHARP_MAX_PAIRS:
    raise ValueError(
      f"regulariser 'sharp' is dense: it needs max(n·m, n², m²) <= SHARP_MAX_PAIRS = "
      f"{SHARP_MAX_PAIRS:,} cost entries, got n = {n}, m = {m} ({pairs:,}). Use 'sinkhorn' "
      "(chunked, O(n) memory) for large batches."
    )
  validation.check_scalar("epsilon", epsilon, low=0.0)
  n_iter = validation.check_count("n_iter", n_iter)
  return _sharp_value(z, p, epsilon, n_iter)


@functools.partial(jax.jit, static_argnames=("n_iter",))
def _sharp_value(z, p, epsilon, n_iter):
  # Jitted so that eager calls compile once per shape (an eager scan recompiles every call).
  return sharp_sinkhorn_loss(z, p, epsilon=epsilon, n_iter=n_iter)


# ----------------------------------------------------------------------------- mmd


def _check_scales(scales) -> tuple[float, ...]:
  if isinstance(scales, str | bytes) or not isinstance(scales, Sequence | np.ndarray):
    raise TypeError(f"`scales` must be a sequence of positive numbers, got {scales!r}.")
  out = tuple(float(s) for s in scales)
  if not out or not all(math.isfinite(s) and s > 0 for s in out):
    raise ValueError(f"`scales` must be a non-empty sequence of positive numbers, got {scales!r}.")
  return out


@jax.checkpoint
def _imq_row_sums(xc, y, cs):
  """``Σ_j Σ_s c_s / (c_s + ‖x_i − y_j‖²)`` for the rows ``xc [c, d]``: ``[c]``.

  Checkpointed so that reverse mode through the ``lax.map`` over chunks keeps only the chunk
  inputs and recomputes the ``[c, m]`` block, i.e. O(n) memory both ways.
  """
  d2 = (
    jnp.sum(xc * xc, axis=1)[:, None]
    + jnp.sum(y * y, axis=1)[None, :]
    - 2.0 * jnp.matmul(xc, y.T, precision=_HIGHEST)
  )
  # The expansion can go slightly negative in round-off (the diagonal of a self-sum).
  d2 = jnp.maximum(d2, 0.0)
  k = sum(c / (c + d2) for c in cs)
  return jnp.sum(k, axis=1)


def _imq_sum(x, y, cs, chunk_size: int | None) -> jax.Array:
  """``Σ_{i,j} k(x_i, y_j)`` over all pairs (diagonal included), ``chunk`` rows of ``x`` at a
  time: never more than a ``[chunk, m]`` block."""
  n, m = x.shape[0], y.shape[0]
  chunk = default_chunk_size(n, m) if chunk_size is None else min(chunk_size, n)
  n_chunks = -(-n // chunk)
  xp = jnp.pad(x, ((0, n_chunks * chunk - n), (0, 0))).reshape(n_chunks, chunk, x.shape[1])
  rows = jax.lax.map(lambda xc: _imq_row_sums(xc, y, cs), xp).reshape(-1)[:n]  # drop padding
  return jnp.sum(rows)


def mmd_squared(
  x: jax.Array,
  y: jax.Array,
  *,
  sigma2: float | jax.Array = 1.0,
  scales: Sequence[float] = WAE_IMQ_SCALES,
  chunk_size: int | None = None,
) -> jax.Array:
  """Unbiased MMD² of WAE-MMD (Tolstikhin et al. 2018) with the inverse multiquadratic kernel.

  ``k(x, y) = Σ_s C_s / (C_s + ‖x − y‖²)`` with ``C_s = s · 2 d σ²``: WAE's choice ``C = 2 d σ_z²``
  for a prior of per-coordinate variance ``σ_z² = sigma2``, summed over the scales
  ``s ∈ scales`` (default WAE's ``(0.1, 0.2, 0.5, 1, 2, 5, 10)``; pass ``(1.0,)`` for the single
  kernel ``C/(C + ‖x − y‖²)``). The U-statistic (Gretton et al. 2012)

    ``1/(n(n−1)) Σ_{i≠j} k(x_i, x_j) + 1/(m(m−1)) Σ_{i≠j} k(y_i, y_j) − 2/(nm) Σ_{i,j} k(x_i, y_j)``

  is unbiased, so it can be slightly negative. Kernel sums run over chunks of rows
  (``lax.map``, recomputed in the backward pass): O((n + m)·d + chunk·max(n, m)) memory, which
  runs at n = m = 60 000. The Sinkhorn AutoEncoders paper reports this quantity ×10² in latent
  space ("MMD" of its Table 1) to compare the aggregated posterior with the prior.

  Args:
    x: ``[n, d]``, y: ``[m, d]`` samples, ``n, m ≥ 2``.
    sigma2: prior variance ``σ²`` per coordinate (base scale ``C = 2 d σ²``), > 0.
    scales: multipliers of ``C`` (static, positive).
    chunk_size: rows per kernel block (static); default
      :func:`gsae_jax.ot.default_chunk_size` (256 rows, fewer for very large ``m``).

  Returns:
    Scalar MMD² estimate, differentiable in ``x`` and ``y``.
  """
  x = validation.check_cloud("x", x)
  y = validation.check_cloud("y", y)
  return _mmd(x, y, sigma2, scales, chunk_size, ("x", "y"))


def _mmd(x, y, sigma2, scales, chunk_size, names) -> jax.Array:
  scales, chunk_size, dtype = _check_mmd(x, y, sigma2, scales, chunk_size, names)
  return _mmd_value(x.astype(dtype), y.astype(dtype), sigma2, scales, chunk_size)


def _check_mmd(x, y, sigma2, scales, chunk_size, names):
  """Checks of :func:`mmd_squared`'s inputs: ``(scales, chunk_size, working dtype)``."""
  if x.shape[1] != y.shape[1]:
    raise ValueError(
      f"`{names[0]}` and `{names[1]}` must have the same dimension, got {x.shape} and {y.shape}."
    )
  for name, a in zip(names, (x, y), strict=True):
    if a.shape[0] < 2:
      raise ValueError(
        f"`{name}` needs at least 2 points for the unbiased MMD U-statistic, got {a.shape}."
      )
  validation.check_scalar("sigma2", sigma2, low=0.0)
  scales = _check_scales(scales)
  chunk_size = validation.check_count("chunk_size", chunk_size, allow_none=True)
  return scales, chunk_size, validation.working_dtype(x.dtype, y.dtype)


@functools.partial(jax.jit, static_argnames=("scales", "chunk_size"))
def _mmd_value(x, y, sigma2, scales: tuple[float, ...], chunk_size: int | None) -> jax.Array:
  dtype = x.dtype
  n, m, d = x.shape[0], y.shape[0], x.shape[1]
  # Distances are shift-invariant: centring on the joint mean keeps ‖x‖² small, so the expansion
  # ‖x‖² + ‖y‖² − 2⟨x, y⟩ loses fewer digits in float32 (zero gradient through the centre).
  centre = sg((jnp.sum(x, axis=0) + jnp.sum(y, axis=0)) / (n + m))
  x, y = x - centre, y - centre
  base = 2.0 * d * jnp.asarray(sigma2, dtype)
  cs = [base * s for s in scales]
  n_scales = len(scales)
  # Self-sums include the diagonal, k(x_i, x_i) = Σ_s 1 = n_scales exactly: subtract it.
  # Pair counts as Python floats: n(n − 1) passes int32 from n ≈ 46 341 on.
  kxx = (_imq_sum(x, x, cs, chunk_size) - float(n * n_scales)) / float(n * (n - 1))
  kyy = (_imq_sum(y, y, cs, chunk_size) - float(m * n_scales)) / float(m * (m - 1))
  kxy = _imq_sum(x, y, cs, chunk_size) / float(n * m)
  return kxx + kyy - 2.0 * kxy


def mmd_regularizer(
  z: jax.Array,
  prior_sample: jax.Array,
  *,
  key: jax.Array | None = None,
  sigma2: float | jax.Array = 1.0,
  scales: Sequence[float] = WAE_IMQ_SCALES,
  chunk_size: int | None = None,
) -> jax.Array:
  """WAE-MMD penalty: :func:`mmd_squared` ``(z, prior_sample)`` (IMQ kernel, WAE's scales).

  Args:
    z: ``[n, d]`` latents, prior_sample: ``[m, d]`` prior sample, ``n, m ≥ 2``.
    key: ignored (deterministic).
    sigma2, scales, chunk_size: as :func:`mmd_squared` (defaults ``1.0``,
      :data:`WAE_IMQ_SCALES`, automatic).

  Returns:
    Scalar unbiased MMD², differentiable in ``z`` and ``prior_sample``.
  """
  del key
  z = validation.check_cloud("z", z)
  p = validation.check_cloud("prior_sample", prior_sample)
  return _mmd(z, p, sigma2, scales, chunk_size, ("z", "prior_sample"))


def mmd_squared_rows(
  z: jax.Array,
  rows: jax.Array,
  y: jax.Array,
  y_rows: jax.Array,
  *,
  sigma2: float | jax.Array = 1.0,
  scales: Sequence[float] = WAE_IMQ_SCALES,
  chunk_size: int | None = None,
) -> jax.Array:
  """:func:`mmd_squared` ``(z, y)`` through the rows ``z[rows]`` only, in ``O(M·(n + m))``.

  The global WAE-MMD of the ``minibatch_global`` variant (GSAE paper §4.2): ``z`` is the whole
  latent cache, of which only the batch rows ``z[rows]`` are live. With ``M = len(rows)``,
  ``S = len(scales)`` (``k(x, x) = S``) and ``Σ_b`` over the rows, it returns

  * value: the unbiased estimate of the full U-statistic from the rows,
    ``(Σ_b Σ_j k(z_b, z_j) − M S)/(M(n−1)) + (Σ_a Σ_q k(y_a, y_q) − M S)/(M(m−1))
    − 2 Σ_b Σ_q k(z_b, y_q)/(M m)`` with ``a`` over ``y_rows`` (the full value when the
    rows are all of ``z`` and ``y``, and its mean over any partition into batches);
  * gradient in ``z[rows]``: exactly that of the full :func:`mmd_squared`,
    ``2/(n(n−1)) Σ_{j≠b} ∇₁k(z_b, z_j) − 2/(nm) Σ_q ∇₁k(z_b, y_q)``; every other row of ``z``
    and all of ``y`` are constants (zero gradient), as the variant's stop-gradient cache is.

  The full statistic costs ``n²`` kernel evaluations; this ``M·(n + 2m)``, 600× fewer at
  n = m = 60 000 and M = 100.

  Args:
    z: ``[n, d]`` latents, y: ``[m, d]`` prior sample, ``n, m ≥ 2``.
    rows: ``[M]`` distinct int indices into ``z`` (the live batch).
    y_rows: ``[M']`` distinct int indices into ``y`` for the estimate of the prior's
      self-term (any fixed rows of an i.i.d. sample).
    sigma2, scales, chunk_size: as :func:`mmd_squared`.

  Returns:
    Scalar: the estimate's value with the full MMD²'s gradient in ``z[rows]``.
  """
  z = validation.check_cloud("z", z)
  y = validation.check_cloud("y", y)
  scales, chunk_size, dtype = _check_mmd(z, y, sigma2, scales, chunk_size, ("z", "y"))
  for name, r in (("rows", rows), ("y_rows", y_rows)):
    r = jnp.asarray(r)
    if r.ndim != 1 or r.shape[0] == 0 or not jnp.issubdtype(r.dtype, jnp.integer):
      raise ValueError(
        f"`{name}` must be a non-empty [M] int index array, got {r.shape} {r.dtype}."
      )
  return _mmd_rows_value(
    z.astype(dtype),
    jnp.asarray(rows),
    y.astype(dtype),
    jnp.asarray(y_rows),
    sigma2,
    scales,
    chunk_size,
  )


@functools.partial(jax.jit, static_argnames=("scales", "chunk_size"))
def _mmd_rows_value(z, rows, y, y_rows, sigma2, scales, chunk_size) -> jax.Array:
  n, m, d = z.shape[0], y.shape[0], z.shape[1]
  n_rows, n_y_rows = rows.shape[0], y_rows.shape[0]
  centre = sg((jnp.sum(z, axis=0) + jnp.sum(y, axis=0)) / (n + m))  # as in _mmd_value
  z_rows = z[rows] - centre
  z, y = sg(z) - centre, sg(y) - centre
  cs = [2.0 * d * jnp.asarray(sigma2, z.dtype) * s for s in scales]
  s_zz = _imq_sum(z_rows, z, cs, chunk_size)  # live in z_rows; includes k(z_b, z_b) = S
  s_zy = _imq_sum(z_rows, y, cs, chunk_size)
  s_yy = _imq_sum(y[y_rows], y, cs, chunk_size)
  diag = float(len(scales))
  value = (
    (sg(s_zz) - n_rows * diag) / float(n_rows * (n - 1))
    + (s_yy - n_y_rows * diag) / float(n_y_rows * (m - 1))
    - 2.0 * sg(s_zy) / float(n_rows * m)
  )
  # Each pair (b, j) is counted once here with z_j constant, hence the factor 2 of the
  # symmetric full sum; ∇₁k(z_b, z_b) = 0, so the diagonal adds no gradient.
  surrogate = 2.0 * s_zz / float(n * (n - 1)) - 2.0 * s_zy / float(n * m)
  return value + surrogate - sg(surrogate)


# ----------------------------------------------------------------------------- sliced


def random_directions(key: jax.Array, n_projections: int, d: int, dtype=jnp.float32) -> jax.Array:
  """``[n_projections, d]`` independent directions uniform on the unit sphere ``S^{d−1}``.

  Normalised standard Gaussian vectors; the directions :func:`sliced_regularizer` draws from
  its ``key``.
  """
  n_projections = validation.check_count("n_projections", n_projections)
  d = validation.check_count("d", d)
  g = jax.random.normal(key, (n_projections, d), dtype)
  return g / jnp.linalg.norm(g, axis=1, keepdims=True)


@functools.lru_cache(maxsize=64)
def _quantile_pieces(n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The pieces of ``[0, 1]`` on which both empirical quantile functions are constant.

  The quantile function of ``n`` sorted points is ``x_(i)`` on ``[i/n, (i+1)/n)``; the union of
  the breakpoints ``{i/n}`` and ``{j/m}`` (integers ``i·m`` and ``j·n`` over ``n·m``, so exact)
  cuts ``[0, 1]`` into at most ``n + m − 1`` pieces. Returns, per piece, the index into the
  sorted ``x``, into the sorted ``y``, and its length.
  """
  cuts = np.union1d(np.arange(n + 1, dtype=np.int64) * m, np.arange(m + 1, dtype=np.int64) * n)
  lo, hi = cuts[:-1], cuts[1:]
  return (lo // m).astype(np.int32), (lo // n).astype(np.int32), (hi - lo) / (n * m)


def sliced_w2_squared(x: jax.Array, y: jax.Array, directions: jax.Array) -> jax.Array:
  """Sliced squared 2-Wasserstein distance of two point clouds along given directions.

  ``SW2²(α, β) = (1/P) Σ_p W2²(⟨θ_p, ·⟩#α, ⟨θ_p, ·⟩#β)`` (Kolouri et al. 2019; Bonneel et al.
  2015), cost ``‖·‖²``, uniform weights. In 1-D, ``W2² = ∫₀¹ (F_α⁻¹(t) − F_β⁻¹(t))² dt``; both
  quantile functions are step functions, so the integral is exact on the pieces between the
  union of their breakpoints ``{i/n} ∪ {j/m}`` (quantile matching at the union of the levels):
  for ``n = m`` this is ``(1/n) Σ_i (x_(i) − y_(i))²`` of the sorted projections, and for
  ``n ≠ m`` the exact W2² of the two empirical measures (no interpolation). Sorting costs
  ``O((n + m) P)`` memory and ``O((n + m) log(n + m) P)`` time; gradients flow through the sort
  (the order is locally constant).

  Args:
    x: ``[n, d]``, y: ``[m, d]`` point clouds. directions: ``[P, d]`` unit vectors
      (e.g. :func:`random_directions`); not renormalised.

  Returns:
    Scalar, the mean over the ``P`` directions; differentiable in ``x`` and ``y``.
  """
  x = validation.check_cloud("x", x)
  y = validation.check_cloud("y", y)
  return _sliced(x, y, directions, ("x", "y"))


def _sliced(x, y, directions, names) -> jax.Array:
  if x.shape[1] != y.shape[1]:
    raise ValueError(
      f"`{names[0]}` and `{names[1]}` must have the same dimension, got {x.shape} and {y.shape}."
    )
  directions = validation.as_array("directions", directions)
  if directions.ndim != 2 or directions.shape[1] != x.shape[1] or directions.shape[0] == 0:
    raise ValueError(
      f"`directions` must be [P, {x.shape[1]}] with P >= 1, got shape {directions.shape}."
    )
  dtype = validation.working_dtype(x.dtype, y.dtype)
  return _sliced_value(x.astype(dtype), y.astype(dtype), directions.astype(dtype))


@jax.jit
def _sliced_value(x, y, directions) -> jax.Array:
  dtype = x.dtype
  xs = jnp.sort(jnp.matmul(x, directions.T, precision=_HIGHEST), axis=0)  # [n, P]
  ys = jnp.sort(jnp.matmul(y, directions.T, precision=_HIGHEST), axis=0)  # [m, P]
  n, m = x.shape[0], y.shape[0]
  if n == m:
    return jnp.mean((xs - ys) ** 2)
  ix, iy, w = _quantile_pieces(n, m)
  per_direction = jnp.sum(jnp.asarray(w, dtype)[:, None] * (xs[ix] - ys[iy]) ** 2, axis=0)
  return jnp.mean(per_direction)


def sliced_regularizer(
  z: jax.Array,
  prior_sample: jax.Array,
  *,
  key: jax.Array | None = None,
  n_projections: int = 50,
) -> jax.Array:
  """SWAE penalty (Kolouri et al. 2019): sliced ``W2²`` over random directions.

  :func:`sliced_w2_squared` ``(z, prior_sample, random_directions(key, n_projections, d))``:
  fresh directions per ``key`` (pass a new key each step), cost ``‖·‖²``; for ``n ≠ m`` the
  exact 1-D W2² of the empirical measures by quantile matching at the union of their levels.

  Args:
    z: ``[n, d]`` latents. prior_sample: ``[m, d]`` prior sample.
    key: PRNG key for the directions (required).
    n_projections: number ``P`` of directions (static), default 50.

  Returns:
    Scalar, differentiable in ``z`` and ``prior_sample``.

  Raises:
    ValueError: ``key`` is None, or bad shapes/settings.
  """
  if key is None:
    raise ValueError(
      "regulariser 'sliced' needs `key` (a jax.random key) to draw its random directions."
    )
  z, p = _check_pair(z, prior_sample)
  n_projections = validation.check_count("n_projections", n_projections)
  return _sliced_from_key(z, p, key, n_projections)


@functools.partial(jax.jit, static_argnames=("n_projections",))
def _sliced_from_key(z, p, key, n_projections: int) -> jax.Array:
  directions = random_directions(key, n_projections, z.shape[1], z.dtype)
  return _sliced(z, p, directions, ("z", "prior_sample"))


# ----------------------------------------------------------------------------- w2gauss


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _trace_sqrt_psd(cov: jax.Array, floor: float) -> jax.Array:
  """``tr(Σ^{1/2}) = Σ_i sqrt(max(λ_i, 0))`` for a symmetric PSD ``Σ [d, d]``, guarded JVP below.

  The derivative of a spectral trace ``tr f(Σ)`` is ``f'(Σ) = V diag(f'(λ)) Vᵀ``, which does not
  involve the eigenvectors' derivatives; differentiating ``eigh`` itself would divide by
  ``λ_i − λ_j`` and give NaN at repeated eigenvalues (a rank-deficient batch has many zeros).
  ``f'(λ) = 1/(2 sqrt(λ))`` is infinite at ``λ = 0``, so it is evaluated at ``max(λ, floor)``:
  finite, and exact for eigenvalues above the floor.
  """
  return jnp.sum(jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(cov), 0.0)))


@_trace_sqrt_psd.defjvp
def _trace_sqrt_psd_jvp(floor, primals, tangents):
  (cov,), (dcov,) = primals, tangents
  lam, v = jnp.linalg.eigh(cov)
  value = jnp.sum(jnp.sqrt(jnp.maximum(lam, 0.0)))
  fprime = 0.5 / jnp.sqrt(jnp.maximum(lam, floor))
  dcov = 0.5 * (dcov + dcov.T)  # the tangent of a symmetric matrix
  # tr(f'(Σ) dΣ) = Σ_i f'(λ_i) v_iᵀ dΣ v_i
  proj = jnp.sum(v * jnp.matmul(dcov, v, precision=_HIGHEST), axis=0)
  return value, jnp.sum(fprime * proj)


def gaussian_w2_squared_to_standard_normal(
  z: jax.Array, *, eigenvalue_floor: float = 1e-6
) -> jax.Array:
  """``W2²(N(μ̂, Σ̂), N(0, I))`` for the Gaussian fit of the sample ``z`` (W2GAE).

  Patrini et al. §4 (their Eq. 13), from the closed form ``W2²(N(μ₁, Σ₁), N(μ₂, Σ₂)) =
  ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₂^{1/2} Σ₁ Σ₂^{1/2})^{1/2})`` (Peyré & Cuturi, "Computational
  Optimal Transport", Rem. 2.31), which for ``μ₂ = 0, Σ₂ = I`` is
  ``‖μ̂‖² + tr(Σ̂) + d − 2 tr(Σ̂^{1/2})``. ``μ̂`` is the sample mean and
  ``Σ̂ = (1/(n−1)) Σ_i (z_i − μ̂)(z_i − μ̂)ᵀ`` the unbiased covariance, as the paper states
  (§4). ``tr(Σ̂^{1/2}) = Σ_i sqrt(λ_i)`` from ``eigh`` of the symmetric PSD ``Σ̂``, eigenvalues
  clipped at 0 (round-off), with the gradient's ``1/(2 sqrt(λ))`` evaluated at
  ``max(λ, eigenvalue_floor)`` so that a rank-deficient batch (``n ≤ d``, collapsed latents)
  has a finite gradient. Cost ``‖·‖²``.

  Args:
    z: ``[n, d]`` sample, ``n ≥ 2``.
    eigenvalue_floor: smallest eigenvalue at which the gradient of ``sqrt`` is evaluated
      (static, > 0); only eigenvalues below it are affected.

  Returns:
    Scalar, differentiable in ``z``.
  """
  z = validation.check_cloud("z", z)
  return _w2gauss(z, eigenvalue_floor)


def _w2gauss(z, eigenvalue_floor) -> jax.Array:
  if z.shape[0] < 2:
    raise ValueError(f"`z` needs at least 2 points for a covariance, got shape {z.shape}.")
  validation.check_scalar("eigenvalue_floor", eigenvalue_floor, low=0.0)
  if not validation.is_concrete(eigenvalue_floor):
    raise TypeError("`eigenvalue_floor` must be a Python float (it is static).")
  return _w2gauss_value(z.astype(validation.working_dtype(z.dtype)), float(eigenvalue_floor))


@functools.partial(jax.jit, static_argnames=("eigenvalue_floor",))
def _w2gauss_value(z, eigenvalue_floor: float) -> jax.Array:
  n, d = z.shape
  mu = jnp.mean(z, axis=0)
  zc = z - mu
  cov = jnp.matmul(zc.T, zc, precision=_HIGHEST) / (n - 1)
  cov = 0.5 * (cov + cov.T)  # exactly symmetric for eigh
  return jnp.sum(mu * mu) + jnp.trace(cov) + d - 2.0 * _trace_sqrt_psd(cov, eigenvalue_floor)


def w2gauss_regularizer(
  z: jax.Array,
  prior_sample: jax.Array,
  *,
  key: jax.Array | None = None,
  eigenvalue_floor: float = 1e-6,
) -> jax.Array:
  """W2GAE penalty: :func:`gaussian_w2_squared_to_standard_normal` of ``z``.

  The prior is assumed to be the standard normal ``N(0, I_d)``: ``prior_sample`` is only checked
  for its dimension (it is accepted for the common interface) and its values are ignored. With
  another prior this regulariser still matches the batch to ``N(0, I)``.

  Args:
    z: ``[n, d]`` latents, ``n ≥ 2``. prior_sample: ``[m, d]``, values ignored.
    key: ignored (deterministic).
    eigenvalue_floor: see :func:`gaussian_w2_squared_to_standard_normal` (default 1e-6).

  Returns:
    Scalar, differentiable in ``z`` (zero gradient in ``prior_sample``).
  """
  del key
  z, _ = _check_pair(z, prior_sample)
  return _w2gauss(z, eigenvalue_floor)


# ----------------------------------------------------------------------------- hungarian


def _assignment_host(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Optimal permutation ``σ`` (``x_i ↔ y_σ(i)``) for the cost ``‖x_i − y_j‖²``, in float64."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  cost = np.sum(x * x, 1)[:, None] + np.sum(y * y, 1)[None, :] - 2.0 * (x @ y.T)
  rows, cols = linear_sum_assignment(cost)
  perm = np.empty(x.shape[0], np.int32)
  perm[rows] = cols
  return perm


def hungarian_regularizer(
  z: jax.Array, prior_sample: jax.Array, *, key: jax.Array | None = None
) -> jax.Array:
  """HAE penalty: exact ``W2²`` between the two empirical measures by optimal assignment.

  ``(1/n) Σ_i ‖z_i − p_σ(i)‖²`` (cost ``‖·‖²``, so this is ``W2²(ẑ, z)`` of the batches exactly)
  for the optimal permutation ``σ``, found on the host by ``scipy.optimize.linear_sum_assignment``
  (Hungarian-type algorithm, Kuhn 1955; Crouse 2016) through ``jax.pure_callback``, so it jits.
  ``σ`` is piecewise constant in the points and is treated as a constant: the gradient is that
  of the matched cost for the current ``σ`` (stop-gradient on ``σ``), the exact gradient
  wherever the optimal assignment is unique.

  Args:
    z: ``[n, d]`` latents. prior_sample: ``[n, d]`` prior sample of the same size.
    key: ignored (deterministic).

  Returns:
    Scalar, differentiable in ``z`` and ``prior_sample``.

  Raises:
    ValueError: ``n ≠ m`` (a permutation needs equal sizes), or ``n > HUNGARIAN_MAX_N``.
  """
  del key
  z, p = _check_pair(z, prior_sample)
  n, m = z.shape[0], p.shape[0]
  if n != m:
    raise ValueError(
      f"regulariser 'hungarian' matches points one to one: `z` and `prior_sample` need the "
      f"same number of points, got n = {n} and m = {m}."
    )
  if n > HUNGARIAN_MAX_N:
    raise ValueError(
      f"regulariser 'hungarian' is limited to n <= HUNGARIAN_MAX_N = {HUNGARIAN_MAX_N} points "
      f"(O(n³) host assignment, O(n²) memory), got n = {n}. For a global regulariser at full "
      "size use 'sinkhorn' (or 'sliced'/'mmd')."
    )
  return _hungarian_value(z, p)


@jax.jit
def _hungarian_value(z, p) -> jax.Array:
  n = z.shape[0]
  perm = jax.pure_callback(
    _assignment_host,
    jax.ShapeDtypeStruct((n,), jnp.int32),
    sg(z),
    sg(p),
    vmap_method="sequential",
  )
  return jnp.mean(jnp.sum((z - p[sg(perm)]) ** 2, axis=1))


# ----------------------------------------------------------------------------- registry


_REGISTRY: dict[str, Regularizer] = {
  "sinkhorn": sinkhorn_regularizer,
  "sharp": sharp_regularizer,
  "mmd": mmd_regularizer,
  "sliced": sliced_regularizer,
  "w2gauss": w2gauss_regularizer,
  "hungarian": hungarian_regularizer,
}

REGULARIZER_NAMES: tuple[str, ...] = tuple(_REGISTRY)
"""Names accepted by :func:`get_regularizer`; ``"sinkhorn"`` (the first) is the default."""

DEFAULT_REGULARIZER = "sinkhorn"


def get_regularizer(name: str = DEFAULT_REGULARIZER) -> Regularizer:
  """The regulariser called ``name``: ``fn(z [n, d], prior_sample [m, d], *, key=None,
  **settings) -> scalar``.

  Raises:
    ValueError: ``name`` is not one of :data:`REGULARIZER_NAMES`.
  """
  if not isinstance(name, str) or name not in _REGISTRY:
    raise ValueError(
      f"unknown regulariser {name!r}; choose one of {', '.join(map(repr, REGULARIZER_NAMES))}."
    )
  return _REGISTRY[name]
