"""The five evaluation metrics of the Global Sinkhorn Autoencoder paper (§5.1.1).

All metrics are computed on the test set: `z` are the test latents, `[n, 2]`, `labels` the
test labels, int `[n]` in 0..9, and `images` / `reconstructions` the test images and their
decodings (pixels in [0, 1]). Definitions follow SPEC §5, i.e. the paper as its authors'
code computed them:

1. `global_ot_loss`: Sinkhorn divergence S_ε (blur 0.05, scaling 0.7) between all test
   latents and a fresh flower-prior sample of the same size.
2. `reconstruction_error`: per-pixel mean squared error over the test set.
3. `local_clustering`: fraction of latents whose k = 10 nearest latents (itself included)
   all carry its label.
4. `cluster_matching`: latents assigned to petals by 36° angular sector; the best
   petal↔label bijection (Hungarian, maximum weight) counts the matched points.
5. `covered_area`: per petal, latents mapped to U(−1, 1)² and painted onto a grid; the mean
   painted fraction over the 10 petals.

Every public function validates its inputs on the host (a `ValueError` naming the argument)
and returns a Python float: these are evaluation metrics, pulled to the host at log steps.
The exact kNN behind `local_clustering` runs on device in row chunks (`lax.map`), so its
memory is O(n · chunk_size), never n × n; the petal metrics are small numpy computations.

Source: Csiszárik, Kiss, Maga, Matszangosz, Varga, "Global Sinkhorn Autoencoder — Optimal
Transport on the latent representation of the full dataset" (GSAE paper), §5.1.1
"Evaluation metrics".
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
import scipy.special
from jax import lax

# The flower prior the metrics refer to (SPEC §4): 10 petals, means 3·(cos α_j, sin α_j),
# α_j = 2πj/10, covariance R(α_j) diag(1, 0.01) R(α_j)ᵀ. Kept here as well as in
# `gsae_jax.priors` so that the metrics never need the sampler.
N_PETALS = 10
PETAL_RADIUS = 3.0
PETAL_MINOR_STD = 0.1  # sqrt(0.01): the tangential standard deviation of a petal
SECTOR_WIDTH = 2.0 * math.pi / N_PETALS  # 36°

METRIC_NAMES = (
  "global_ot_loss",
  "reconstruction",
  "local_clustering",
  "cluster_matching",
  "covered_area",
)


# ----------------------------------------------------------------------------------------------
# Validation at the boundary.
# ----------------------------------------------------------------------------------------------


def _check_latents(z, name: str = "z", *, dim: int | None = 2) -> np.ndarray:
  """Returns `z` as a host float array after checking it is `[n, dim]`, n > 0, finite."""
  want = "[n, d]" if dim is None else f"[n, {dim}]"
  try:
    arr = np.asarray(z)
  except Exception as e:  # any conversion failure is a bad argument
    raise ValueError(f"{name} must be an array of shape {want}; got {type(z)!r}") from e
  if arr.ndim != 2 or (dim is not None and arr.shape[1] != dim) or arr.shape[1] == 0:
    raise ValueError(f"{name} must have shape {want}; got shape {arr.shape}")
  if arr.shape[0] == 0:
    raise ValueError(f"{name} must hold at least one point (n > 0); got shape {arr.shape}")
  if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
    raise ValueError(f"{name} must be a real (float) array; got dtype {arr.dtype}")
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"{name} must be finite; it holds NaN or inf")
  return arr


def _check_labels(labels, n: int, *, n_classes: int | None = N_PETALS) -> np.ndarray:
  """Returns `labels` as a host int64 array after checking it is int `[n]` in 0..n_classes-1."""
  try:
    arr = np.asarray(labels)
  except Exception as e:
    raise ValueError(f"labels must be an int array of shape [{n}]; got {type(labels)!r}") from e
  if arr.shape != (n,):
    raise ValueError(f"labels must have shape [n] = [{n}] (one per latent); got {arr.shape}")
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"labels must have an integer dtype; got {arr.dtype}")
  if n_classes is not None and (arr.min() < 0 or arr.max() >= n_classes):
    raise ValueError(
      f"labels must lie in 0..{n_classes - 1}; got values in [{arr.min()}, {arr.max()}]"
    )
  return arr.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# 1. Global OT loss.
# ----------------------------------------------------------------------------------------------


def global_ot_loss(
  key: jax.Array,
  z,
  *,
  blur: float = 0.05,
  scaling: float = 0.7,
  prior: Callable[[jax.Array, int], jax.Array] | None = None,
  chunk_size: int | None = None,
) -> float:
  """Sinkhorn divergence between the test latents and a fresh prior sample of the same size.

  `S_ε(α, β) = OT_ε(α, β) − ½ OT_ε(α, α) − ½ OT_ε(β, β)` with cost `C(x, y) = ½‖x − y‖²`,
  `ε = blur²` and ε-annealing with `scaling` (GeomLoss `SamplesLoss("sinkhorn", p=2)`
  conventions, SPEC §2), α the uniform measure on the n latents and β the uniform measure on
  n points drawn from the prior. GSAE paper §5.1.1 ("global OT loss"), SPEC §5.1.

  Args:
    key: PRNG key (`jax.random.key`) for the prior sample; use a fixed evaluation key.
    z: [n, 2] test latents.
    blur: ε = blur² (0.05 in the paper).
    scaling: ε-annealing ratio (0.7 in the paper).
    prior: `prior(key, n) -> [n, 2]` sampler; defaults to the flower prior
      `gsae_jax.priors.flower`.
    chunk_size: passed to `gsae_jax.ot.sinkhorn_divergence` (rows per softmin chunk).

  Returns:
    The divergence as a Python float.
  """
  z = _check_latents(z)
  # Imported lazily: the metrics module must import (and its other metrics run) without the
  # OT engine or the priors.
  from gsae_jax.ot import sinkhorn_divergence

  if prior is None:
    from gsae_jax.priors import flower as prior
  n = z.shape[0]
  y = jnp.asarray(prior(key, n))
  if y.shape != (n, 2):
    raise ValueError(f"prior(key, n) must return shape [n, 2] = [{n}, 2]; got {y.shape}")
  x = jnp.asarray(z, dtype=y.dtype if jnp.issubdtype(y.dtype, jnp.floating) else jnp.float32)
  return float(sinkhorn_divergence(x, y, blur=blur, scaling=scaling, chunk_size=chunk_size))


# ----------------------------------------------------------------------------------------------
# 2. Reconstruction error.
# ----------------------------------------------------------------------------------------------


@jax.jit
def _mse(images: jax.Array, reconstructions: jax.Array) -> jax.Array:
  err = jnp.square(images.astype(jnp.float32) - reconstructions.astype(jnp.float32))
  # Mean per image first, then over images: the same value as one global mean (every image
  # has the same pixel count) but a far smaller float32 summation error at n·784 ≈ 10⁷ terms.
  return jnp.mean(jnp.mean(err.reshape(err.shape[0], -1), axis=1))


def reconstruction_error(images, reconstructions) -> float:
  """Per-pixel mean squared error averaged over the set.

  `D = (1 / (n·P)) Σ_i Σ_p (x_ip − x̂_ip)²` over n images of P pixels each (pixels in
  [0, 1], no normalisation); the same D the GSAE loss uses on a batch. Because every image has
  P pixels, the set value is also the plain mean of per-chunk values of equal-size chunks.
  GSAE paper §5.1.1 ("reconstruction error"), SPEC §5.2.

  Args:
    images: [n, ...] test images (e.g. [n, 784] or [n, 28, 28, 1]).
    reconstructions: decoder outputs, the same shape as `images`.

  Returns:
    The mean squared error as a Python float.
  """
  shapes = {}
  for name, arr in (("images", images), ("reconstructions", reconstructions)):
    shape = jnp.shape(arr)
    if len(shape) < 1 or shape[0] == 0 or math.prod(shape) == 0:
      raise ValueError(f"{name} must be a non-empty [n, ...] array; got shape {shape}")
    shapes[name] = shape
  if shapes["images"] != shapes["reconstructions"]:
    raise ValueError(
      "reconstructions must have the same shape as images; got "
      f"{shapes['reconstructions']} vs {shapes['images']}"
    )
  value = float(_mse(jnp.asarray(images), jnp.asarray(reconstructions)))
  if not math.isfinite(value):
    raise ValueError("images and reconstructions must be finite; the error is NaN or inf")
  return value


# ----------------------------------------------------------------------------------------------
# 3. Local clustering (exact, chunked kNN).
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _count_pure_neighbourhoods(
  z: jax.Array, labels: jax.Array, k: jax.Array, *, chunk_size: int
) -> jax.Array:
  """Number of points whose k nearest points (itself included) all share its label.

  No sort or top-k: for row i let j* be the nearest point with another label, the
  lexicographic minimum of (d²_ij, j) over those points. The k − 1 nearest others of i (ties
  to the lower index, as `lax.top_k` and a stable argsort order them) all share i's label iff
  at least k − 1 same-label points j ≠ i come before j* in that order. Three fused row
  reductions (a min, an index min, a count) replace a top-k, which XLA:CPU runs one to two
  orders of magnitude slower on [chunk, n] blocks.

  Memory O(n · chunk_size): each `lax.map` step holds one [chunk_size, n] distance block.
  `k` is traced (one compilation serves every k); `chunk_size` fixes shapes, so it is static.
  """
  n, d = z.shape
  n_chunks = -(-n // chunk_size)
  pad = n_chunks * chunk_size - n
  rows = jnp.arange(n_chunks * chunk_size).reshape(n_chunks, chunk_size)
  z_rows = jnp.pad(z, ((0, pad), (0, 0))).reshape(n_chunks, chunk_size, d)
  label_rows = jnp.pad(labels, (0, pad)).reshape(n_chunks, chunk_size)
  columns = jnp.arange(n)[None, :]
  z_columns = z.T  # [d, n]

  def chunk(args):
    z_c, label_c, i_c = args  # [c, d], [c], [c]
    # Squared distances from coordinate differences, not ‖a‖² + ‖b‖² − 2a·b: no cancellation,
    # so duplicates sit at exactly 0 and near-ties keep their order; one term per coordinate
    # (a [c, n, d] broadcast summed over d ran 25× slower on XLA:CPU).
    d2 = sum(jnp.square(z_c[:, a, None] - z_columns[a][None, :]) for a in range(d))  # [c, n]
    same = labels[None, :] == label_c[:, None]
    d_star = jnp.min(jnp.where(same, jnp.inf, d2), axis=1, keepdims=True)
    j_star = jnp.min(jnp.where(~same & (d2 == d_star), columns, n), axis=1, keepdims=True)
    before = (d2 < d_star) | ((d2 == d_star) & (columns < j_star))
    # The point itself is always in its neighbourhood (SPEC: "including itself"), even when
    # other points coincide with it, so it is excluded from the count of the k − 1 others.
    n_before = jnp.sum(same & before & (columns != i_c[:, None]), axis=1, dtype=jnp.int32)
    return (n_before >= k - 1) & (i_c < n)  # padded rows never count

  good = lax.map(chunk, (z_rows, label_rows, rows))
  return jnp.sum(good, dtype=jnp.int32)


def local_clustering(z, labels, k: int = 10, *, chunk_size: int | None = None) -> float:
  """Fraction of latents whose k nearest latents, itself included, all share its label.

  `LC = (1/n) Σ_i 1[ℓ_j = ℓ_i for all j ∈ N_k(i)]`, where N_k(i) is the point i itself plus
  its k − 1 nearest other latents in Euclidean distance. Ties at the k-th distance are broken
  towards the lower index (so the result is deterministic; a stable argsort reproduces it),
  and i is always in N_k(i) even when other points coincide with it. Exact brute-force kNN on
  device in the default float dtype, chunked over rows: memory O(n · chunk_size), time
  O(n² d). GSAE paper §5.1.1 ("local clustering"), SPEC §5.3.

  Args:
    z: [n, d] latents (d = 2 for the GSAE; any small d ≥ 1 works).
    labels: int [n] labels (any integer values).
    k: neighbourhood size including the point itself, 1 ≤ k ≤ n (10 in the paper).
    chunk_size: rows per [chunk_size, n] distance block; default 16 on CPU (the block stays
      in cache across the three reductions) and 512 on accelerators.

  Returns:
    The fraction of good points as a Python float.
  """
  z = _check_latents(z, dim=None)
  n = z.shape[0]
  labels = _check_labels(labels, n, n_classes=None)
  if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= n:
    raise ValueError(f"k must be an int with 1 <= k <= n = {n}; got {k!r}")
  if chunk_size is None:
    chunk_size = 16 if jax.default_backend() == "cpu" else 512
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer):
    raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
  # Only label equality matters: compact the labels to 0..m-1 so any int64 values fit int32.
  _, compact = np.unique(labels, return_inverse=True)
  count = _count_pure_neighbourhoods(
    jnp.asarray(z, dtype=jnp.result_type(float)),
    jnp.asarray(compact.reshape(n), dtype=jnp.int32),
    jnp.asarray(k, jnp.int32),
    chunk_size=int(min(chunk_size, n)),
  )
  return int(count) / n


# ----------------------------------------------------------------------------------------------
# 4.–5. Petal metrics (host numpy: small, and the grid size r depends on the data).
# ----------------------------------------------------------------------------------------------


def assign_petals(z) -> np.ndarray:
  """Petal index of each latent by angular sector.

  Sector j is the 36° wedge centred on the petal mean direction α_j = 2πj/10:
  `j = round(atan2(z₂, z₁) / (2π/10)) mod 10`. For the flower prior (equal, well separated
  petals) this is the maximum-likelihood petal away from the origin. GSAE paper §5.1.1
  ("cluster matching": 5 lines through the origin whose bisectors hit the petal means).

  Args:
    z: [n, 2] latents.

  Returns:
    int64 [n] petal indices in 0..9 (the origin goes to petal 0).
  """
  z = _check_latents(z).astype(np.float64)
  angle = np.arctan2(z[:, 1], z[:, 0])
  return np.mod(np.floor(angle / SECTOR_WIDTH + 0.5), N_PETALS).astype(np.int64)


def cluster_matching(z, labels) -> float:
  """Accuracy of the petal clustering under the best petal↔label bijection.

  With petals p_i from `assign_petals` and the 10 × 10 count matrix
  `M[j, c] = #{i : p_i = j, ℓ_i = c}`, the value is `max_σ Σ_j M[j, σ(j)] / n` over
  bijections σ, a maximum-weight perfect matching solved by the Hungarian method
  (`scipy.optimize.linear_sum_assignment(maximize=True)`). GSAE paper §5.1.1 ("cluster
  matching"), SPEC §5.4.

  Args:
    z: [n, 2] latents.
    labels: int [n] labels in 0..9.

  Returns:
    The matched fraction as a Python float, in [0.1, 1].
  """
  petals = assign_petals(z)
  n = petals.shape[0]
  labels = _check_labels(labels, n)
  counts = np.zeros((N_PETALS, N_PETALS), dtype=np.int64)
  np.add.at(counts, (petals, labels), 1)
  rows, cols = scipy.optimize.linear_sum_assignment(counts, maximize=True)
  return float(counts[rows, cols].sum()) / n


def _petal_coverage(t_cdf: np.ndarray) -> float:
  """Painted fraction of the r × r grid for one petal's points, given Φ of their coordinates.

  `t_cdf` is [N, 2] with entries Φ(u) = (t + 1) / 2 ∈ [0, 1].
  """
  n_points = t_cdf.shape[0]
  if n_points == 0:
    return 0.0
  r = math.floor(1.1 * math.sqrt(4 * n_points))
  # (p, q) = ⌊r·(t + 1)/2⌋ = ⌊r·Φ(u)⌋; Φ itself is used to avoid the 2Φ − 1 round trip.
  idx = np.clip(np.floor(r * t_cdf).astype(np.int64), 0, r - 1)
  idx = np.unique(idx, axis=0)
  grid = np.zeros((r, r), dtype=bool)
  for dp in range(-2, 2):  # cells [p − 2, p + 2) × [q − 2, q + 2), clipped to the grid
    for dq in range(-2, 2):
      p, q = idx[:, 0] + dp, idx[:, 1] + dq
      inside = (p >= 0) & (p < r) & (q >= 0) & (q < r)
      grid[p[inside], q[inside]] = True
  return float(grid.mean())


def covered_area(z) -> float:
  """Mean over petals of the fraction of a uniform grid painted by the petal's latents.

  Each latent goes to its petal j by angular sector (`assign_petals`) and is mapped by
  `T_j(z) = 2Φ(diag(1, 10)·R(−α_j)·z − (3, 0)) − 1` (Φ the standard normal CDF,
  coordinate-wise), which sends petal j's Gaussian N(3(cos α_j, sin α_j),
  R(α_j) diag(1, 0.01) R(α_j)ᵀ) to U(−1, 1)². With N points in the petal, on an r × r grid,
  `r = ⌊1.1·√(4N)⌋`, the point with grid index `(p, q) = ⌊r·(t + 1)/2⌋` (clipped to
  [0, r − 1]) paints the cells `[p − 2, p + 2) × [q − 2, q + 2)` (clipped to the grid); the
  petal's value is the painted fraction of the r² cells, an empty petal scores 0, and the
  metric is the mean over the 10 petals. Sanity values: ≈0.95 for a 10 000-point prior
  sample, 16/69² ≈ 0.0034 for 1 000 points on each petal mean. GSAE paper §5.1.1 ("covered
  area"), SPEC §5.5.

  Args:
    z: [n, 2] latents.

  Returns:
    The mean covered fraction as a Python float, in [0, 1].
  """
  z64 = _check_latents(z).astype(np.float64)
  petals = assign_petals(z64)
  values = []
  for j in range(N_PETALS):
    pts = z64[petals == j]
    alpha = j * SECTOR_WIDTH
    c, s = math.cos(alpha), math.sin(alpha)
    # R(−α_j)·z, then diag(1, 1/0.1) standardises the petal (the 10 of the SPEC formula).
    u = np.stack(
            [c * pts[:, 0] + s * pts[:, 1] - PETAL_RADIUS,
             (-s * pts[:, 0] + c * pts[:, 1]) / PETAL_MINOR_STD],
            axis=1,
        )  # fmt: skip
    values.append(_petal_coverage(scipy.special.ndtr(u)))
  return float(np.mean(values))


# ----------------------------------------------------------------------------------------------
# All of them.
# ----------------------------------------------------------------------------------------------


def evaluate_latents(
  key: jax.Array, z, labels, images=None, reconstructions=None
) -> dict[str, float]:
  """All five GSAE metrics (GSAE paper §5.1.1, SPEC §5) of one set of test latents.

  Args:
    key: PRNG key for the prior sample of the global OT loss (a fixed evaluation key).
    z: [n, 2] test latents.
    labels: int [n] test labels in 0..9.
    images: optional [n, ...] test images; with `reconstructions`, adds "reconstruction".
    reconstructions: optional decodings of `images`, the same shape.

  Returns:
    A dict of Python floats with keys "global_ot_loss", "local_clustering",
    "cluster_matching", "covered_area", and "reconstruction" when images are given (the
    order of `METRIC_NAMES`).
  """
  if (images is None) != (reconstructions is None):
    raise ValueError("images and reconstructions must be given together (or neither)")
  z = _check_latents(z)
  labels = _check_labels(labels, z.shape[0])
  if images is not None and jnp.shape(images)[:1] != (z.shape[0],):
    # Checked before any metric runs, so a bad call fails fast.
    raise ValueError(
      f"images must hold one image per latent, [n, ...] with n = {z.shape[0]}; "
      f"got shape {jnp.shape(images)}"
    )
  out = {"global_ot_loss": global_ot_loss(key, z)}
  if images is not None:
    out["reconstruction"] = reconstruction_error(images, reconstructions)
  out["local_clustering"] = local_clustering(z, labels)
  out["cluster_matching"] = cluster_matching(z, labels)
  out["covered_area"] = covered_area(z)
  return out
