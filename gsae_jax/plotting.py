"""Figures of a GSAE run, written as PNG (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

LIM = 5.5  # the flower prior lives in |z| < ~5: same axes for every variant


def plot_latents(path: str | os.PathLike, z, labels, prior_sample=None, title: str = "") -> None:
  """Scatter of ``[n, 2]`` latents coloured by digit over a prior sample (grey), fixed axes."""
  z, labels = np.asarray(z), np.asarray(labels)
  fig, ax = plt.subplots(figsize=(6, 6), dpi=110)
  if prior_sample is not None:
    p = np.asarray(prior_sample)
    ax.scatter(p[:, 0], p[:, 1], s=1, c="0.82", label="prior", rasterized=True)
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
