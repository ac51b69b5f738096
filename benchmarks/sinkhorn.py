"""Our Sinkhorn divergence against ott-jax and GeomLoss: time, memory and error, same inputs.

Per dimension ``d`` and size ``n = m``: ``x`` a flower sample (d = 2) or ``N(0, I)``, ``y``
``N(0.5, 1.5² I)`` (``--target flower``: a flower sample), float32; each (method, d, n) in a
fresh subprocess (its own peak RSS) computes the divergence and its gradient in ``x``. Methods:
``ours[_multiscale[_accurate]]`` (annealed, ``coarse`` grids), ``ours_tol`` (then converged to
``--tol``), ``ours_s0.9[9]`` (that scaling), ``ours_fixed[_multiscale]`` (``OT_ε`` at ``ε =
blur²`` after ``--fixed_iters`` update pairs, compared with ``ours_fixed``), ``ott_dense`` /
``ott_online`` (``ε_ott = 2 blur²``, value halved), ``geomloss_{tensorized,online,multiscale}``
(torch on the CPU). Errors against :func:`benchmarks.ot_accuracy.reference` (float64).

  python -m benchmarks.sinkhorn --sizes 200 --dims 2 --repeats 1 --out /tmp/b
"""

from __future__ import annotations

import importlib
import itertools
import os
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import harness

METHODS = tuple(
  "ours ours_multiscale ours_multiscale_accurate ours_fixed ours_fixed_multiscale ours_tol "
  "ours_s0.9 ours_s0.99 ott_dense ott_online geomloss_tensorized geomloss_online "
  "geomloss_multiscale".split()
)
DENSE = {"ott_dense", "geomloss_tensorized"}
# Run only for n <= --tol_max_n: converged solves and the slow, accurate annealing schedules.
ACCURATE = {"ours_tol", "ours_s0.9", "ours_s0.99", "ott_dense"}
KEOPS = ("torch", "geomloss", "pykeops")
REQUIRES = {"ott": ("ott",), "geomloss": KEOPS[:2]} | dict.fromkeys(
  ("geomloss_online", "geomloss_multiscale"), KEOPS
)
# Loaded before the RSS reading that precedes the solve, so that ΔRSS is the method's own.
PRELOAD = {
  "geomloss": ("geomloss", "torch"),
  "ott": ("gsae_jax.ot", "ott.tools.sinkhorn_divergence"),
}


def _ours(method: str, a: dict):
  from gsae_jax.ot import sinkhorn, sinkhorn_divergence

  backend = "multiscale" if "multiscale" in method else "dense"
  if method.startswith("ours_fixed"):  # tol below float32's reach: exactly --fixed_iters pairs
    kw = {"epsilon": a["blur"] ** 2, "tol": 1e-12, "max_iter": a["fixed_iters"]}
    return lambda x, y: sinkhorn(x, y, backend=backend, **kw).reg_ot_cost
  scaling = float(method[6:]) if method.startswith("ours_s0") else a["scaling"]
  kw = {"blur": a["blur"], "scaling": scaling, "tol": a["tol"] if method == "ours_tol" else None}
  kw |= {"max_iter": a["max_iter"], "backend": backend}
  kw["coarse"] = "accurate" if method.endswith("_accurate") else "fast"
  return lambda x, y: sinkhorn_divergence(x, y, **kw)


def _ott(method: str, a: dict, n: int):
  from ott.geometry import pointcloud
  from ott.tools import sinkhorn_divergence as ott_sd

  kw = {"batch_size": min(1024, n)} if method == "ott_online" else {}
  kw |= {"epsilon": 2 * a["blur"] ** 2}
  solve = {"threshold": a["tol"], "max_iterations": a["max_iter"]}

  def div(x, y):
    value, _ = ott_sd.sinkhorn_divergence(pointcloud.PointCloud, x, y, solve_kwargs=solve, **kw)
    return 0.5 * value  # ott's cost is ‖x − y‖² = 2C

  return div


def _geomloss(method: str, x, y, a: dict) -> harness.Timing:
  import torch
  from geomloss import SamplesLoss

  torch.set_num_threads(a["torch_threads"])
  backend = method.split("_")[1]
  loss = SamplesLoss("sinkhorn", p=2, blur=a["blur"], scaling=a["scaling"], backend=backend)
  xt, yt = torch.from_numpy(x), torch.from_numpy(y)

  def once():
    xg = xt.clone().requires_grad_(True)
    value = loss(xg, yt)
    return value.detach(), torch.autograd.grad(value, xg)[0]

  return harness.time_fn(once, repeats=a["repeats"], budget_s=a["repeat_budget_s"], jit=False)


def measure(method: str, inputs: str, grad_path: str, a: dict) -> dict:
  """One (method, d, n) in this process on the ``.npz`` ``inputs``, the gradient saved to
  ``grad_path``; peak RSS at the end and before the solve (the difference is the method's own)."""
  family = method.split("_")[0]
  for module in PRELOAD.get(family, ("gsae_jax.ot",)):
    importlib.import_module(module)
  with np.load(inputs) as z:
    x, y = z["x"], z["y"]
  if family != "geomloss":
    import jax
    import jax.numpy as jnp

    x, y = jnp.asarray(x), jnp.asarray(y)
  hwm_before = harness.vm_hwm_mb()
  if method == "reference":
    from benchmarks.ot_accuracy import reference

    ref = reference(x, y, a["blur"], a["ref_tol"], a["ref_max_iter"])
    t = harness.Timing((ref["value"], ref["grad"]), ref["compile_s"], ref["run_s"], [])
  elif family == "geomloss":
    t = _geomloss(method, x, y, a)
  else:
    div = _ours(method, a) if family == "ours" else _ott(method, a, x.shape[0])
    fn, budget = jax.value_and_grad(div), a["repeat_budget_s"]
    release = a["release_host_memory"]  # recorded in the payload's args
    t = harness.time_fn(fn, x, y, repeats=a["repeats"], budget_s=budget, release=release)
  value, grad = t.result
  grad = np.asarray(grad, np.float64)
  np.save(grad_path, grad)
  out = {"value": float(value), "grad_finite": bool(np.all(np.isfinite(grad))), **t.fields()}
  return {**out, "vm_hwm_before_mb": hwm_before, "vm_hwm_mb": harness.vm_hwm_mb()}


def _skip(method: str, n: int, d: int, args) -> str | None:
  """Why ``method`` does not run at ``(n, d)``, or ``None``."""
  if method in DENSE and 3 * n * n * 4 > args.dense_limit_gb * 2**30:
    return f"skipped: 3 dense {n}×{n} float32 arrays exceed {args.dense_limit_gb:g} GB"
  if method in ("ours", "ours_fixed") and args.ours_max_n and n > args.ours_max_n:
    return f"skipped: dense above --ours_max_n {args.ours_max_n}"
  if "multiscale" in method and d > 3:
    return "skipped: the multiscale backend is for d <= 3"
  if method in ACCURATE and n > args.tol_max_n:
    return f"skipped: too slow here for n > --tol_max_n {args.tol_max_n}"
  return None


def _isolated(method: str, d: int, n: int, tmp: Path, args) -> tuple[dict, np.ndarray | None]:
  """:func:`measure` in a fresh process on the inputs saved for (d, n): its row and gradient."""
  grad_path = tmp / f"{method}_{d}_{n}.npy"
  a = {**vars(args), "repeats": args.repeats if n < args.big_n else min(args.repeats, 1)}
  inputs = str(tmp / f"inputs_{d}_{n}.npz")
  kwargs = {"method": method, "inputs": inputs, "grad_path": str(grad_path), "a": a}
  # Also KeOps's OpenMP threads; it must be set before torch (and its OpenMP runtime) loads.
  env = {"OMP_NUM_THREADS": str(args.torch_threads)} if method.startswith("geomloss") else None
  requires = REQUIRES.get(method) or REQUIRES.get(method.split("_")[0], ())
  r = harness.run_isolated("benchmarks.sinkhorn:measure", kwargs, args.timeout_s, requires, env)
  return r, np.load(grad_path) if r["status"] == "ok" else None


def _base(method: str) -> str:
  """The row ``method`` is compared with: ``ours_fixed`` for the fixed-ε rows, else ``ours``."""
  return "ours_fixed" if method.startswith("ours_fixed") else "ours"


def run(args) -> dict:
  """Every (d, n, method) of ``args``, after the float64 reference of each (d, n)."""
  env, rows = harness.env_info(), []
  with tempfile.TemporaryDirectory(prefix="sinkhorn_bench_") as tmp_dir:
    tmp = Path(tmp_dir)
    for d, n in itertools.product(args.dims, args.sizes):
      # x: flower in d = 2, else N(0, I); y: the --target cloud; the same for every method.
      x, y = harness.clouds(n, d, "flower" if d == 2 else "standard_normal", args.target, args.seed)
      np.savez(tmp / f"inputs_{d}_{n}.npz", x=np.asarray(x), y=np.asarray(y))
      ref_value, ref_grad, ref_note = None, None, f"none: n > --ref_max_n {args.ref_max_n}"
      if n <= args.ref_max_n:
        harness.log(f"[d={d} n={n}] float64 reference ...")
        r, ref_grad = _isolated("reference", d, n, tmp, args)
        ref_note = r["status"]
        if r["status"] == "ok":
          ref_value, t = r["value"], r["first_run_s"] + (r["compile_s"] or 0)
          ref_note = f"ok, {t:.1f} s"
        harness.log(f"  reference {ref_note}, S = {ref_value}")
      bases = {}  # the dense rows the others are compared with: ours, ours_fixed
      for method in args.methods:
        row = {"method": method, "d": d, "n": n, "ref_value": ref_value, "reference": ref_note}
        row["load_avg_1m"] = os.getloadavg()[0]
        why = _skip(method, n, d, args)
        r, g = ({"status": why}, None) if why else _isolated(method, d, n, tmp, args)
        row.update(r)
        base = _base(method)
        if g is not None and ref_grad is not None and base == "ours":
          row["value_rel_err"] = harness.rel_err(row["value"], ref_value)
          row["grad_rel_err"] = harness.rel_err(g, ref_grad)
        if g is not None and method == base:
          bases[method] = row["value"], g
        elif g is not None and base in bases:
          row["value_rel_diff_ours"] = harness.rel_err(row["value"], bases[base][0])
          row["grad_rel_diff_ours"] = harness.rel_err(g, bases[base][1])
        rows.append(row)
        t, v = harness.seconds(row), row.get("value")
        status = row["status"] + (f", {t:.3g} s, {v:.6g}" if t else "")
        harness.log(f"[d={d} n={n}] {method}: {status}")
  return {"env": env, "args": vars(args), "rows": rows}


def markdown(payload: dict) -> str:
  """The result table: one row per (d, n, method), times as ratios to ``ours`` too."""
  rows, time_s, a = payload["rows"], harness.seconds, payload["args"]
  is_base = lambda r: r["method"] == _base(r["method"])
  bases = {(r["d"], r["n"], r["method"]): time_s(r) for r in rows if is_base(r)}
  base = lambda r: bases.get((r["d"], r["n"], _base(r["method"])))
  peak, before = lambda r: r.get("peak_rss_mb"), lambda r: r.get("vm_hwm_before_mb")
  columns = [
    "d, n, method",
    ("time (s)", time_s),
    ("÷ ours", lambda r: f"{time_s(r) / base(r):.2f}×" if time_s(r) and base(r) else None),
    ("compile / first (s)", lambda r: r.get("compile_s") or (r.get("warm_s") and r["first_run_s"])),
    ("warm", lambda r: len(r.get("warm_runs_s") or []) if time_s(r) else None),
    ("peak RSS (MB)", lambda r: peak(r) or None),
    ("ΔRSS (MB)", lambda r: peak(r) - before(r) if peak(r) and before(r) else None),
    "value, value rel. err=value_rel_err, grad rel. err=grad_rel_err",
    "value vs ours=value_rel_diff_ours, grad vs ours=grad_rel_diff_ours, load=load_avg_1m",
    ("status", lambda r: r.get("status", "")),
  ]
  refs = sorted({(r["d"], r["n"]): (r.get("ref_value"), r.get("reference")) for r in rows}.items())
  text = (
    f"Sinkhorn divergence value + gradient in x, float32 inputs, blur {a['blur']}, scaling "
    f"{a['scaling']}; GeomLoss on {a.get('torch_threads', '?')} torch/OpenMP thread(s); "
    f"`ours_tol` and `ott_dense` run to marginal violation {a['tol']}. "
  )
  if any(r["method"].startswith("ours_fixed") for r in rows):
    text += (
      f"`ours_fixed*`: OT_ε(x, y) at ε = blur² after {a['fixed_iters']} update pairs from "
      'zero potentials, "÷ ours" and "vs ours" against `ours_fixed`. '
    )
  text += (
    'Errors ("rel. err") are against a float64 reference: the three OT terms solved separately '
    f"by the alternating fixed-ε `gsae_jax.ot.sinkhorn` to marginal violation {a['ref_tol']} "
    '(`benchmarks.ot_accuracy.reference`); "vs ours" is the relative difference to `ours` '
    "in the same run (gradient: ‖g − g_ours‖/‖g_ours‖). Time: median of the warm runs "
    '("warm" = how many; 0 = the single first run after compilation). ΔRSS = peak RSS '
    "minus the process's peak after importing its framework and making the inputs. "
    f"Load average (1 min) at the start of each row on {payload['env']['cpu_count']} CPUs.\n\n"
  )
  ref = lambda v, note: f"S = {v:.8g} ({note})" if v is not None else f"{note or 'none'}"
  text += "\n".join(f"- d = {d}, n = {n}: reference {ref(*r)}" for (d, n), r in refs)
  return text + "\n\n" + harness.table(columns, rows)


def main(argv: list[str] | None = None) -> dict:
  p = harness.parser(__doc__, sizes=[1000, 5000, 20000, 60000], dims=[2, 10])
  harness.flags(p, methods=([*METHODS], None, METHODS), blur=0.05, scaling=0.7)
  harness.flags(p, tol=(1e-3, "marginal tolerance of converged runs"))
  harness.flags(p, max_iter=10_000, fixed_iters=(100, "update pairs of ours_fixed*"), ref_tol=1e-5)
  harness.flags(p, ref_max_iter=100_000, ref_max_n=(1000, "largest n given a reference"))
  harness.flags(p, tol_max_n=(1000, "largest n for converged solves"), dense_limit_gb=16.0)
  harness.flags(p, repeats=3, big_n=(20000, "from this n on, at most 1 repeat"))
  harness.flags(p, repeat_budget_s=(120.0, "warm runs' total cap (s)"))
  harness.flags(p, timeout_s=(1800.0, "per (method, d, n)"))
  # All CPUs, like XLA: 2 threads ran GeomLoss 1.7-1.9x faster than 1 idle, 5.5x slower loaded.
  threads = os.cpu_count() or 1
  harness.flags(p, torch_threads=(threads, "torch/KeOps (OpenMP) threads"), seed=0)
  harness.flags(p, target=("gauss", "y cloud", ("gauss", "flower")))
  p.add_argument("--ours_max_n", type=int, default=None, help="largest n for dense `ours`")
  harness.flags(p, release_host_memory=(False, "ours/ott: malloc_trim(0) after compiling"))
  harness.flags(p, append=(False, "merge into <out>/<name>.json"))
  harness.flags(p, merge_from=([], "--render_only: JSONs to merge"))
  harness.flags(p, render_only=(False, "run nothing: rewrite <out>/<name>.*"))
  args = harness.parse(p, argv, "sinkhorn")
  if args.target == "flower" and set(args.dims) != {2}:
    p.error("--target flower needs d = 2")
  # Rows of the same (d, n, method) replace the old ones, in the order of METHODS.
  key = lambda r: (r["d"], r["n"], METHODS.index(r["method"]))
  old = Path(args.out) / f"{args.name}.json"
  if args.render_only:
    payload = harness.load(old)
    for extra in args.merge_from:
      payload = harness.merge(payload, harness.load(extra), key)
  else:
    payload = run(args)
    if args.append and old.exists():
      payload = harness.merge(harness.load(old), payload, key)
  return harness.save(args.out, args.name, payload, markdown)


if __name__ == "__main__":
  main()
