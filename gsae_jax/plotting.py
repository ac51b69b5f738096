"""Figures of a GSAE run, written as PNG (matplotlib, Agg backend, no display needed).

``latents.png`` (test latents over the flower prior's density), ``samples.png`` (decoded prior
samples, one row per petal), ``reconstructions.png`` and ``curves.png``: the pictures of the
GSAE paper's Figures 2–4, for any run.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gsae_jax import priors  # noqa: E402

LIM = 5.5  # the flower prior lives in |z| < ~5: same axes for every variant


def flower_density(z) -> np.ndarray:
  """Density of the flower prior at ``[..., 2]`` points (float64 numpy, same leading shape).

  ``p(z) = (1/10) Σ_i N(z; μ_i, Σ_i)`` with the means and covariances of
  :func:`gsae_jax.priors.flower_covariances` (GSAE paper §5, SPEC §4).
  """
  z = np.asarray(z, np.float64)
  means = np.asarray(priors.flower_means(), np.float64)
  covs = np.asarray(priors.flower_covariances(), np.float64)
  out = np.zeros(z.shape[:-1])
  for mu, cov in zip(means, covs, strict=True):
    d = z - mu
    q = np.einsum("...i,ij,...j->...", d, np.linalg.inv(cov), d)
    out += np.exp(-0.5 * q) / (2 * np.pi * np.sqrt(np.linalg.det(cov)))
  return out / len(means)


def plot_latents(path: str | os.PathLike, z, labels, title: str = "", density: bool = True) -> None:
  """Scatter of ``[n, 2]`` latents coloured by digit over the flower prior's density contours.

  Fixed axes ``[-5.5, 5.5]²`` for every run, so variants compare side by side.
  """
  z, labels = np.asarray(z), np.asarray(labels)
  fig, ax = plt.subplots(figsize=(6, 6), dpi=110)
  if density:
    g = np.linspace(-LIM, LIM, 300)
    gx, gy = np.meshgrid(g, g)
    dens = flower_density(np.stack([gx, gy], axis=-1))
    levels = dens.max() * np.array([0.02, 0.1, 0.3, 0.6])
    ax.contour(gx, gy, dens, levels=levels, colors="0.55", linewidths=0.7)
  sc = ax.scatter(z[:, 0], z[:, 1], s=3, c=labels, cmap="tab10", vmin=-0.5, vmax=9.5)
  fig.colorbar(sc, ax=ax, ticks=range(10), fraction=0.046, pad=0.04, label="digit")
  ax.set(xlim=(-LIM, LIM), ylim=(-LIM, LIM), aspect="equal", title=title)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_curves(path: str | os.PathLike, records: list[dict]) -> None:
  """Training curves: loss terms and the five metrics against the step, one panel each."""
  if not records:
    return
  keys = [k for k in records[-1] if k != "step" and isinstance(records[-1][k], int | float)]
  steps = [r["step"] for r in records]
  cols = 3
  rows = -(-len(keys) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), dpi=100, squeeze=False)
  for ax, k in zip(axes.flat, keys, strict=False):
    ax.plot(steps, [r.get(k, np.nan) for r in records], marker="o", ms=3)
    ax.set(title=k, xlabel="step")
  for ax in list(axes.flat)[len(keys) :]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def petal_latents(key, per_petal: int = 10) -> np.ndarray:
  """``[10·per_petal, 2]`` flower-prior samples ordered by petal (rows of :func:`plot_samples`).

  Drawn with :func:`gsae_jax.priors.flower_with_labels` (stratified, so exactly ``per_petal``
  points per petal), then stably sorted by petal index.
  """
  z, petal = priors.flower_with_labels(key, priors.FLOWER_N_PETALS * per_petal)
  order = np.argsort(np.asarray(petal), kind="stable")
  return np.asarray(z)[order]


def plot_image_row(path: str | os.PathLike, images, title: str = "") -> None:
  """One row of ``[k, 28, 28(, 1)]`` images (e.g. the decoded vertices of a simplex)."""
  images = np.asarray(images)
  fig, ax = plt.subplots(figsize=(0.55 * len(images) + 0.8, 1.2), dpi=100)
  _image_grid(ax, images, 1, len(images))
  ax.set_yticks([])
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_labelled_rows(path: str | os.PathLike, images, labels: list[str], title: str = "") -> None:
  """A grid of ``[len(labels)·k, 28, 28(, 1)]`` images, one labelled row per entry of
  ``labels`` (e.g. decoded prior samples of several models)."""
  rows = len(labels)
  cols = len(images) // rows
  fig, ax = plt.subplots(figsize=(0.55 * cols + 2.0, 0.55 * rows + 0.5), dpi=100)
  _image_grid(ax, images, rows, cols)
  ax.set_yticklabels(labels, fontsize=7)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def _image_grid(ax, images, rows: int, cols: int) -> None:
  images = np.asarray(images).reshape(rows, cols, 28, 28)
  ax.imshow(images.transpose(0, 2, 1, 3).reshape(rows * 28, cols * 28), cmap="gray", vmin=0, vmax=1)
  ax.set_xticks([])
  ax.set_yticks(np.arange(rows) * 28 + 14)


def plot_samples(
  path: str | os.PathLike, images, title: str = "", row_label: str | None = "petal"
) -> None:
  """10-row grid of ``[10·k, 28, 28(, 1)]`` decoded samples; by default row ``j`` is from
  petal ``j`` (``row_label=None``: unlabelled rows, for priors without petals)."""
  rows = priors.FLOWER_N_PETALS
  cols = len(images) // rows
  fig, ax = plt.subplots(figsize=(0.55 * cols + 0.8, 0.55 * rows + 0.5), dpi=100)
  _image_grid(ax, images, rows, cols)
  if row_label is None:
    ax.set_yticks([])
  else:
    ax.set_yticklabels([f"{row_label} {j}" for j in range(rows)], fontsize=7)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_reconstructions(path: str | os.PathLike, inputs, recons, title: str = "") -> None:
  """Inputs (odd rows) above their reconstructions (even rows), ``[k, 28, 28(, 1)]`` each."""
  inputs, recons = np.asarray(inputs), np.asarray(recons)
  cols = min(10, len(inputs))
  pairs = len(inputs) // cols
  inputs, recons = inputs[: pairs * cols], recons[: pairs * cols]
  stacked = np.stack(
    [inputs.reshape(pairs, cols, 28, 28), recons.reshape(pairs, cols, 28, 28)], axis=1
  ).reshape(-1, 28, 28)
  fig, ax = plt.subplots(figsize=(0.55 * cols + 0.8, 0.55 * 2 * pairs + 0.5), dpi=100)
  _image_grid(ax, stacked, 2 * pairs, cols)
  ax.set_yticklabels(["input", "recon."] * pairs, fontsize=7)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
