"""Golden values for the GeomLoss cross-check of gsae_jax's Sinkhorn divergence.

Computes, in float64 with GeomLoss's ``backend="tensorized"``::

    SamplesLoss("sinkhorn", p=2, blur=blur, scaling=scaling, debias=True,
                backend="tensorized")(a, x, b, y)

and its gradients w.r.t. ``x``, ``y``, ``a`` and ``b`` for a handful of deterministic cases,
and stores everything in ``tests/data/geomloss_golden.npz``. See ``notes/geomloss.md`` for an
exact description of what GeomLoss computes.

Usage (needs the ``crosscheck`` extra: ``pip install torch==2.13.0 geomloss==0.3.1``)::

    .venv/bin/python scripts/make_geomloss_golden.py [--out PATH] [--seed SEED]

Importable API (this module itself imports numpy only; torch/geomloss are imported lazily)::

    make_inputs(seed=BASE_SEED) -> dict[str, dict]   # case name -> inputs (numpy only)
    geomloss_reference(x, y, a, b, blur, scaling) -> (value, grad_x, grad_y, grad_a)
    geomloss_reference_full(x, y, a, b, blur, scaling) -> dict (adds grad_b)
    geomloss_eps_list(x, y, blur, scaling) -> (diameter, eps_list)

npz layout, for each case name ``cK`` in ``case_names``: ``cK_x`` [n,d], ``cK_y`` [m,d],
``cK_a`` [n], ``cK_b`` [m] (uniform weights stored explicitly), ``cK_weighted`` (bool),
``cK_blur``, ``cK_scaling``, ``cK_seed``, ``cK_value`` (scalar), ``cK_grad_x`` [n,d],
``cK_grad_y`` [m,d], ``cK_grad_a`` [n], ``cK_grad_b`` [m], ``cK_n_eps`` (len of GeomLoss's
eps_list), ``cK_diameter``; plus ``case_names``, ``geomloss_version``, ``torch_version``.
Float arrays are float64 (``cK_weighted`` is bool, ``cK_seed``/``cK_n_eps`` int64). The
weights are always passed explicitly to GeomLoss (``loss(a, x, b, y)``), so ``grad_a``/``grad_b``
are stored for the uniform cases too; for those the value and ``grad_x``/``grad_y`` equal those
of the two-argument call ``loss(x, y)``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

BASE_SEED = 20_240_601
CASE_NAMES = ("c0", "c1", "c2", "c3", "c4", "c5")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "geomloss_golden.npz"


# ------------------------------------------------------------------------------------------
# Inputs (numpy only)
# ------------------------------------------------------------------------------------------


def _uniform(n: int) -> np.ndarray:
  return np.full(n, 1.0 / n, dtype=np.float64)


def _dirichlet(rng: np.random.Generator, n: int) -> np.ndarray:
  w = rng.dirichlet(np.ones(n))
  return (w / w.sum()).astype(np.float64)


def _flower(
  rng: np.random.Generator,
  n: int,
  petals: int = 10,
  radius: float = 3.0,
  std_radial: float = 1.0,
  std_tangential: float = 0.1,
) -> np.ndarray:
  """2-D mixture of ``petals`` anisotropic Gaussians on a circle (the "flower")."""
  k = rng.integers(0, petals, size=n)
  theta = 2.0 * np.pi * k / petals
  u_rad = np.stack([np.cos(theta), np.sin(theta)], axis=1)  # radial unit vectors
  u_tan = np.stack([-np.sin(theta), np.cos(theta)], axis=1)  # tangential unit vectors
  z = rng.standard_normal((n, 2))
  return radius * u_rad + std_radial * z[:, :1] * u_rad + std_tangential * z[:, 1:] * u_tan


def _gmm(
  rng: np.random.Generator, n: int, means: np.ndarray, stds: np.ndarray, probs: np.ndarray
) -> np.ndarray:
  """Isotropic Gaussian mixture: component k has mean means[k] and std stds[k]."""
  means = np.asarray(means, dtype=np.float64)
  k = rng.choice(len(means), size=n, p=probs)
  return means[k] + np.asarray(stds)[k, None] * rng.standard_normal((n, means.shape[1]))


def _case(x, y, a, b, blur, scaling, weighted, seed, description) -> dict:
  return {
    "x": np.ascontiguousarray(x, dtype=np.float64),
    "y": np.ascontiguousarray(y, dtype=np.float64),
    "a": np.ascontiguousarray(a, dtype=np.float64),
    "b": np.ascontiguousarray(b, dtype=np.float64),
    "blur": float(blur),
    "scaling": float(scaling),
    "weighted": bool(weighted),
    "seed": int(seed),
    "description": description,
  }


def make_inputs(seed: int = BASE_SEED) -> dict[str, dict]:
  """Deterministic test cases; case ``cK`` draws from ``np.random.default_rng(seed + K)``.

  Returns ``{name: {"x", "y", "a", "b", "blur", "scaling", "weighted", "seed",
  "description"}}`` with float64 arrays x [n,d], y [m,d], a [n], b [m] (a, b sum to 1).
  """
  cases: dict[str, dict] = {}

  # c0: 2-D flower (10 petals) vs 1.5 * N(0, I); uniform weights.
  s = seed + 0
  rng = np.random.default_rng(s)
  x = _flower(rng, 300)
  y = 1.5 * rng.standard_normal((200, 2))
  desc = "d=2 flower(10 petals, r=3, std 1 radial/0.1 tangential) vs 1.5*N(0,I); uniform"
  cases["c0"] = _case(x, y, _uniform(300), _uniform(200), 0.05, 0.7, False, s, desc)

  # c1: 5-D N(0, I) vs N(1, 0.5^2 I); uniform weights.
  s = seed + 1
  rng = np.random.default_rng(s)
  x = rng.standard_normal((250, 5))
  y = 1.0 + 0.5 * rng.standard_normal((250, 5))
  desc = "d=5 N(0,I) vs N(1,0.25 I); uniform"
  cases["c1"] = _case(x, y, _uniform(250), _uniform(250), 0.1, 0.5, False, s, desc)

  # c2: 2-D Gaussian mixtures, Dirichlet(1) weights.
  s = seed + 2
  rng = np.random.default_rng(s)
  means_x = [[-1.0, 0.0], [1.0, 0.5], [0.0, -1.5]]
  x = _gmm(rng, 200, means_x, [0.3, 0.5, 0.2], [0.3, 0.5, 0.2])
  means_y = [[0.0, 1.0], [1.5, -1.0], [-1.5, -0.5], [0.5, 0.0]]
  y = _gmm(rng, 300, means_y, [0.4, 0.2, 0.3, 0.6], [0.25, 0.25, 0.25, 0.25])
  a, b = _dirichlet(rng, 200), _dirichlet(rng, 300)
  desc = "d=2 GMM(3) vs GMM(4); Dirichlet(1) weights"
  cases["c2"] = _case(x, y, a, b, 0.02, 0.9, True, s, desc)

  # c3: 5-D, Dirichlet(1) weights.
  s = seed + 3
  rng = np.random.default_rng(s)
  x = rng.standard_normal((150, 5))
  means_y = [np.full(5, 0.5), np.r_[-1.0, 1.0, 0.0, 0.0, 1.0]]
  y = _gmm(rng, 220, means_y, [0.7, 0.4], [0.6, 0.4])
  a, b = _dirichlet(rng, 150), _dirichlet(rng, 220)
  desc = "d=5 N(0,I) vs GMM(2); Dirichlet(1) weights"
  cases["c3"] = _case(x, y, a, b, 0.05, 0.7, True, s, desc)

  # c4: 2-D uniform in [0,1]^2 vs uniform in [0.3,1.3]^2; uniform weights.
  s = seed + 4
  rng = np.random.default_rng(s)
  x = rng.uniform(0.0, 1.0, (400, 2))
  y = rng.uniform(0.3, 1.3, (400, 2))
  desc = "d=2 U[0,1]^2 vs U[0.3,1.3]^2; uniform"
  cases["c4"] = _case(x, y, _uniform(400), _uniform(400), 0.1, 0.9, False, s, desc)

  # c5: 2-D at scale ~5 (float32 cancellation stress); uniform weights.
  s = seed + 5
  rng = np.random.default_rng(s)
  x = 5.0 * rng.standard_normal((120, 2))
  y = np.array([2.0, -1.0]) + 5.0 * rng.standard_normal((180, 2))
  desc = "d=2 5*N(0,I) vs (2,-1)+5*N(0,I); uniform; large coordinates"
  cases["c5"] = _case(x, y, _uniform(120), _uniform(180), 0.03, 0.5, False, s, desc)

  return cases


# ------------------------------------------------------------------------------------------
# GeomLoss reference (torch / geomloss imported lazily)
# ------------------------------------------------------------------------------------------


def geomloss_reference_full(x, y, a, b, blur: float, scaling: float) -> dict:
  """GeomLoss tensorized Sinkhorn divergence (p=2, debias=True) and gradients, in float64.

  Returns ``{"value": float, "grad_x": [n,d], "grad_y": [m,d], "grad_a": [n],
  "grad_b": [m]}`` (numpy float64).
  """
  import torch
  from geomloss import SamplesLoss

  def _t(v):
    return torch.tensor(np.asarray(v, dtype=np.float64), dtype=torch.float64).requires_grad_()

  xt, yt, at, bt = _t(x), _t(y), _t(a), _t(b)
  loss = SamplesLoss(
    "sinkhorn",
    p=2,
    blur=float(blur),
    scaling=float(scaling),
    debias=True,
    backend="tensorized",
  )
  value = loss(at, xt, bt, yt)
  gx, gy, ga, gb = torch.autograd.grad(value, (xt, yt, at, bt))
  return {
    "value": float(value.detach().item()),
    "grad_x": gx.detach().numpy().copy(),
    "grad_y": gy.detach().numpy().copy(),
    "grad_a": ga.detach().numpy().copy(),
    "grad_b": gb.detach().numpy().copy(),
  }


def geomloss_reference(x, y, a, b, blur: float, scaling: float):
  """``(value, grad_x, grad_y, grad_a)`` from GeomLoss (see ``geomloss_reference_full``)."""
  r = geomloss_reference_full(x, y, a, b, blur, scaling)
  return r["value"], r["grad_x"], r["grad_y"], r["grad_a"]


def geomloss_eps_list(x, y, blur: float, scaling: float) -> tuple[float, list[float]]:
  """``(diameter, eps_list)`` exactly as GeomLoss's tensorized backend builds them (p=2)."""
  import torch

  try:  # geomloss >= 0.3.1 keeps the SamplesLoss code under geomloss._legacy
    from geomloss._legacy.sinkhorn_divergence import scaling_parameters
  except ImportError:  # geomloss <= 0.3.0
    from geomloss.sinkhorn_divergence import scaling_parameters

  xt = torch.tensor(np.asarray(x, dtype=np.float64))[None]  # (1, n, d), as in forward()
  yt = torch.tensor(np.asarray(y, dtype=np.float64))[None]
  diameter, _eps, eps_list, _rho = scaling_parameters(
    xt, yt, 2, float(blur), None, None, float(scaling)
  )
  return float(diameter), [float(e) for e in eps_list]


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
  parser.add_argument("--seed", type=int, default=BASE_SEED)
  args = parser.parse_args(argv)

  import geomloss
  import torch

  cases = make_inputs(args.seed)
  out: dict[str, np.ndarray] = {
    "case_names": np.array(list(cases)),
    "geomloss_version": np.array(geomloss.__version__),
    "torch_version": np.array(torch.__version__),
  }
  print(f"geomloss {geomloss.__version__}, torch {torch.__version__}, float64, tensorized")
  header = f"{'case':4} {'n':>4} {'m':>4} {'d':>2} {'blur':>5} {'scal':>4} {'w':>1} "
  header += f"{'n_eps':>5} {'diam':>7} {'value':>22} {'|gx|max':>9} {'time_s':>7}"
  print(header)
  for name, c in cases.items():
    t0 = time.perf_counter()
    r = geomloss_reference_full(c["x"], c["y"], c["a"], c["b"], c["blur"], c["scaling"])
    dt = time.perf_counter() - t0
    diameter, eps_list = geomloss_eps_list(c["x"], c["y"], c["blur"], c["scaling"])
    for k, v in r.items():
      if not np.all(np.isfinite(v)):
        raise RuntimeError(f"{name}: non-finite {k}")
    if r["value"] < 0:
      raise RuntimeError(f"{name}: negative Sinkhorn divergence {r['value']}")
    if not c["weighted"]:  # the implicit-weights call must agree with the explicit one
      v2 = _geomloss_value_implicit(c["x"], c["y"], c["blur"], c["scaling"])
      if abs(v2 - r["value"]) > 1e-12 * max(1.0, abs(r["value"])):
        raise RuntimeError(f"{name}: loss(x, y) != loss(a, x, b, y): {v2} vs {r}")
    for k in ("x", "y", "a", "b"):
      out[f"{name}_{k}"] = c[k]
    out[f"{name}_weighted"] = np.array(c["weighted"])
    out[f"{name}_blur"] = np.array(c["blur"])
    out[f"{name}_scaling"] = np.array(c["scaling"])
    out[f"{name}_seed"] = np.array(c["seed"])
    out[f"{name}_value"] = np.array(r["value"])
    for k in ("grad_x", "grad_y", "grad_a", "grad_b"):
      out[f"{name}_{k}"] = r[k]
    out[f"{name}_n_eps"] = np.array(len(eps_list))
    out[f"{name}_diameter"] = np.array(diameter)
    n, d = c["x"].shape
    m = c["y"].shape[0]
    print(
      f"{name:4} {n:4d} {m:4d} {d:2d} {c['blur']:5.2f} {c['scaling']:4.1f} "
      f"{int(c['weighted']):1d} {len(eps_list):5d} {diameter:7.3f} {r['value']:22.16e} "
      f"{np.abs(r['grad_x']).max():9.3e} {dt:7.3f}"
    )
  args.out.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(args.out, **out)
  print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.1f} KiB)")


def _geomloss_value_implicit(x, y, blur: float, scaling: float) -> float:
  """Value of the two-argument call ``loss(x, y)`` (GeomLoss builds uniform weights)."""
  import torch
  from geomloss import SamplesLoss

  loss = SamplesLoss(
    "sinkhorn", p=2, blur=float(blur), scaling=float(scaling), debias=True, backend="tensorized"
  )
  with torch.no_grad():
    return float(loss(torch.tensor(x), torch.tensor(y)).item())


if __name__ == "__main__":
  main()
