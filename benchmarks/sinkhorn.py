"""Our Sinkhorn divergence against ott-jax and GeomLoss: time, memory and error, same inputs.

For each dimension ``d`` and size ``n = m``: ``x`` = a flower-prior sample (d = 2) or
``N(0, I)`` (d = 10), ``y`` = ``N(0.5, 1.5² I)`` (numpy seed, float32, identical for every
method). Every (method, d, n) runs in a fresh subprocess (its own peak RSS, VmHWM) and computes
the divergence and its gradient in ``x``:

* ``ours``: :func:`gsae_jax.ot.sinkhorn_divergence`, GeomLoss's annealed schedule (the GSAE
  paper's setting, ``blur``, ``scaling``), no convergence test;
* ``ours_tol``: the same, then iterations at ``ε = blur²`` to marginal violation ``--tol``;
* ``ott_dense``: ott-jax ``sinkhorn_divergence`` (dense ``PointCloud``, ``ε_ott = 2 blur²``, its
  cost and value are twice ours, halved here), ``threshold = --tol``;
* ``ott_online``: the same with ``PointCloud(batch_size=...)``;
* ``geomloss_tensorized`` / ``geomloss_online``: ``SamplesLoss("sinkhorn", p=2, blur, scaling)``
  in torch float32 on the CPU, ``backend="tensorized"`` / ``"online"`` (KeOps).

Errors are relative to a float64 reference: the three OT terms solved separately by our
alternating fixed-ε :func:`gsae_jax.ot.sinkhorn` to marginal violation ``--ref_tol``
(:func:`benchmarks.ot_accuracy.reference`), i.e. the converged divergence, so the annealed
methods show how far their answer is from it. Time is
the median of ``--repeats`` warm runs of value + gradient; compile (or first-run) time apart.
Peers that cannot run (not installed, API failure, too large for memory) get a row saying why.

  python -m benchmarks.sinkhorn                                  # d = 2, 10; n = 1k … 60k
  python -m benchmarks.sinkhorn --sizes 200 --dims 2 --repeats 1 --out /tmp/b

Writes ``sinkhorn.json`` and ``sinkhorn.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import common

METHODS = (
  "ours",
  "ours_tol",
  "ott_dense",
  "ott_online",
  "geomloss_tensorized",
  "geomloss_online",
)
DENSE = {"ott_dense", "geomloss_tensorized"}


def make_inputs(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """``x`` (flower for d = 2, else N(0, I)) and ``y ~ N(0.5, 1.5² I)``, float32 ``[n, d]``."""
  rng = np.random.default_rng(seed)
  if d == 2:
    petal = rng.permutation(np.arange(n) % 10)
    a = 2 * np.pi * petal / 10
    r = 3 + rng.normal(size=n)
    t = 0.1 * rng.normal(size=n)
    x = np.stack([np.cos(a) * r - np.sin(a) * t, np.sin(a) * r + np.cos(a) * t], axis=1)
  else:
    x = rng.normal(size=(n, d))
  y = 0.5 + 1.5 * rng.normal(size=(n, d))
  return x.astype(np.float32), y.astype(np.float32)


# ----------------------------------------------------------------------------- workers


def _time_jax(fn, x, y, repeats):
  import jax

  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(x, y).compile()
  compile_s = time.perf_counter() - t0
  (value, grad), first = common.timed(lambda: compiled(x, y))
  warm = [common.timed(lambda: compiled(x, y))[1] for _ in range(repeats)]
  return value, grad, compile_s, first, warm


def _run_ours(x, y, args, tol):
  import jax

  from gsae_jax.ot import sinkhorn_divergence

  kw = dict(blur=args.blur, scaling=args.scaling, tol=tol, max_iter=args.max_iter)
  fn = jax.value_and_grad(lambda x, y: sinkhorn_divergence(x, y, **kw))
  return _time_jax(fn, x, y, args.repeats)


def _run_ott(x, y, args, online: bool):
  import jax
  from ott.geometry import pointcloud
  from ott.tools import sinkhorn_divergence as ott_sd

  kw = {"batch_size": min(1024, x.shape[0])} if online else {}

  def div(x, y):
    value, _ = ott_sd.sinkhorn_divergence(
      pointcloud.PointCloud,
      x,
      y,
      epsilon=2 * args.blur**2,
      solve_kwargs={"threshold": args.tol, "max_iterations": args.max_iter},
      **kw,
    )
    return 0.5 * value  # ott's cost is ‖x − y‖² = 2C

  return _time_jax(jax.value_and_grad(div), x, y, args.repeats)


def _run_geomloss(x, y, args, backend: str):
  import torch
  from geomloss import SamplesLoss

  torch.set_num_threads(os.cpu_count() or 1)
  loss = SamplesLoss("sinkhorn", p=2, blur=args.blur, scaling=args.scaling, backend=backend)
  xt, yt = torch.from_numpy(x), torch.from_numpy(y)

  def once():
    xg = xt.clone().requires_grad_(True)
    t0 = time.perf_counter()
    value = loss(xg, yt)
    (grad,) = torch.autograd.grad(value, xg)
    return float(value), grad.numpy(), time.perf_counter() - t0

  value, grad, first = once()
  warm = [once()[2] for _ in range(args.repeats)]
  return value, grad, None, first, warm


def worker(method: str, n: int, d: int, args, grad_path: str) -> dict:
  """One measurement in this process; saves the gradient to ``grad_path`` (``.npy``)."""
  if method == "reference":
    from benchmarks.ot_accuracy import reference

    ref = reference(*make_inputs(n, d, args.seed), args.blur, args.ref_tol, args.ref_max_iter)
    value, grad, compile_s, first, warm = ref["value"], ref["grad"], ref["compile_s"], 0.0, []
    first = ref["run_s"]
  else:
    x, y = make_inputs(n, d, args.seed)
    if method in ("ours", "ours_tol"):
      value, grad, compile_s, first, warm = _run_ours(
        x, y, args, args.tol if method == "ours_tol" else None
      )
    elif method.startswith("ott"):
      value, grad, compile_s, first, warm = _run_ott(x, y, args, method == "ott_online")
    else:
      value, grad, compile_s, first, warm = _run_geomloss(x, y, args, method.split("_")[1])
  grad = np.asarray(grad, np.float64)
  np.save(grad_path, grad)
  return {
    "value": float(value),
    "grad_finite": bool(np.all(np.isfinite(grad))),
    "compile_s": compile_s,
    "first_run_s": first,
    "warm_s": statistics.median(warm) if warm else None,
    "warm_runs_s": warm,
  }


# ----------------------------------------------------------------------------- driver


def _vm_hwm_mb(pid: int) -> float | None:
  try:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024.0
  except OSError:
    return None
  return None


def _subprocess(method, n, d, args, grad_path) -> dict:
  cmd = [sys.executable, "-m", "benchmarks.sinkhorn", f"--one={method},{n},{d},{grad_path}"]
  cmd += [
    f"--blur={args.blur}",
    f"--scaling={args.scaling}",
    f"--tol={args.tol}",
    f"--max_iter={args.max_iter}",
    f"--ref_tol={args.ref_tol}",
    f"--ref_max_iter={args.ref_max_iter}",
    f"--timeout_s={args.timeout_s}",
    f"--repeats={args.repeats if n < args.big_n else min(args.repeats, 1)}",
    f"--seed={args.seed}",
  ]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  t0, peak = time.time(), None
  while proc.poll() is None:
    peak = _vm_hwm_mb(proc.pid) or peak
    if time.time() - t0 > args.timeout_s:
      proc.kill()
      proc.communicate()
      return {"status": f"timeout after {args.timeout_s:g} s", "peak_rss_mb": peak}
    time.sleep(0.2)
  out, err = proc.communicate()
  if proc.returncode != 0:
    lines = [ln.strip() for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln and "JAX_TRACEBACK" not in ln]
    last = (errors or lines or ["?"])[-1]
    return {"status": f"failed: {last[:300]}", "peak_rss_mb": peak}
  return {"status": "ok", "peak_rss_mb": peak, **json.loads(out.strip().splitlines()[-1])}


def _available(method: str) -> str | None:
  """``None`` if the method's package imports, else why not."""
  import importlib.util

  need = {"ott": ("ott",), "geomloss": ("torch", "geomloss"), "ours": ()}[method.split("_")[0]]
  if method == "geomloss_online":
    need += ("pykeops",)
  missing = [m for m in need if importlib.util.find_spec(m) is None]
  return f"skipped: {', '.join(missing)} not installed" if missing else None


def run(args) -> dict:
  env = common.env_info()
  rows = []
  tmp = Path(tempfile.mkdtemp(prefix="sinkhorn_bench_"))
  for d in args.dims:
    for n in args.sizes:
      ref_grad, ref_value = None, None
      if n <= args.ref_max_n:
        print(f"[d={d} n={n}] float64 reference ...", file=sys.stderr, flush=True)
        r = _subprocess("reference", n, d, args, str(tmp / f"ref_{d}_{n}.npy"))
        if r["status"] == "ok":
          ref_value, ref_grad = r["value"], np.load(tmp / f"ref_{d}_{n}.npy")
          t = r["first_run_s"] + (r["compile_s"] or 0)
          print(f"  reference S = {ref_value:.8g} ({t:.1f} s)", file=sys.stderr, flush=True)
        else:
          print(f"  reference {r['status']}", file=sys.stderr, flush=True)
      for method in args.methods:
        row = {"method": method, "d": d, "n": n, "ref_value": ref_value}
        why = _available(method)
        if why is None and method in DENSE and 3 * n * n * 4 > args.dense_limit_gb * 2**30:
          why = f"skipped: 3 dense {n}×{n} float32 arrays exceed {args.dense_limit_gb:g} GB"
        if why is None and method in ("ours_tol", "ott_dense") and n > args.tol_max_n:
          why = f"skipped: converged solve too slow here for n > --tol_max_n {args.tol_max_n}"
        if why:
          row["status"] = why
          rows.append(row)
          print(f"[d={d} n={n}] {method}: {why}", file=sys.stderr, flush=True)
          continue
        grad_path = tmp / f"{method}_{d}_{n}.npy"
        row.update(_subprocess(method, n, d, args, str(grad_path)))
        if row["status"] == "ok" and ref_grad is not None:
          g = np.load(grad_path)
          row["value_rel_err"] = abs(row["value"] - ref_value) / abs(ref_value)
          row["grad_rel_err"] = float(np.linalg.norm(g - ref_grad) / np.linalg.norm(ref_grad))
        rows.append(row)
        t = row.get("warm_s") or row.get("first_run_s")
        print(
          f"[d={d} n={n}] {method}: {row['status']}"
          + (f", {t:.3g} s, value {row['value']:.6g}" if t else ""),
          file=sys.stderr,
          flush=True,
        )
  return {"env": env, "args": {k: v for k, v in vars(args).items() if k != "one"}, "rows": rows}


def markdown(payload: dict) -> str:
  """The result table: one row per (d, n, method), times as ratios to ``ours`` too."""
  rows = payload["rows"]
  ours = {(r["d"], r["n"]): r for r in rows if r["method"] == "ours" and r.get("status") == "ok"}
  table = []
  for r in rows:
    t = r.get("warm_s") or r.get("first_run_s")
    base = ours.get((r["d"], r["n"]))
    bt = base and (base.get("warm_s") or base.get("first_run_s"))
    table.append(
      [
        r["d"],
        r["n"],
        r["method"],
        t if t else "–",
        f"{t / bt:.2f}×" if t and bt else "–",
        r.get("compile_s") or (r.get("first_run_s") if r.get("warm_s") else None) or "–",
        r.get("peak_rss_mb") or "–",
        r.get("value", "–"),
        r.get("value_rel_err", "–"),
        r.get("grad_rel_err", "–"),
        r.get("status", ""),
      ]
    )
  a = payload["args"]
  head = (
    f"Sinkhorn divergence value + gradient in x, float32, blur {a['blur']}, scaling "
    f"{a['scaling']}, tolerance {a['tol']} for `ours_tol`/`ott_*`; errors against float64 `ours` "
    f"with tol {a['ref_tol']} (n ≤ {a['ref_max_n']}). Load average at start "
    f"{payload['env']['load_avg_1m_at_start']:.2f} on {payload['env']['cpu_count']} CPUs.\n\n"
  )
  return head + common.markdown_table(
    [
      "d",
      "n",
      "method",
      "time (s)",
      "÷ ours",
      "compile / first (s)",
      "peak RSS (MB)",
      "value",
      "value rel. err",
      "grad rel. err",
      "status",
    ],
    table,
  )


def main(argv: list[str] | None = None) -> dict | None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000, 60000])
  p.add_argument("--dims", type=int, nargs="+", default=[2, 10])
  p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
  p.add_argument("--blur", type=float, default=0.05)
  p.add_argument("--scaling", type=float, default=0.7)
  p.add_argument("--tol", type=float, default=1e-3, help="marginal tolerance of converged runs")
  p.add_argument("--max_iter", type=int, default=10_000)
  p.add_argument("--ref_tol", type=float, default=1e-5)
  p.add_argument("--ref_max_iter", type=int, default=100_000)
  p.add_argument("--ref_max_n", type=int, default=5000, help="largest n given a reference")
  p.add_argument("--tol_max_n", type=int, default=5000, help="largest n for converged solves")
  p.add_argument("--dense_limit_gb", type=float, default=16.0)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--big_n", type=int, default=20000, help="from this n on, at most 1 repeat")
  p.add_argument("--timeout_s", type=float, default=1800.0, help="per (method, d, n)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="benchmarks/results")
  p.add_argument("--name", default="sinkhorn", help="output file stem")
  p.add_argument("--one", help=argparse.SUPPRESS)  # internal: method,n,d,grad_path
  args = p.parse_args(argv)
  if args.one:
    method, n, d, grad_path = args.one.split(",", 3)
    print(json.dumps(worker(method, int(n), int(d), args, grad_path)))
    return None
  payload = run(args)
  common.write_outputs(args.out, args.name, payload, markdown(payload))
  return payload


if __name__ == "__main__":
  main()
