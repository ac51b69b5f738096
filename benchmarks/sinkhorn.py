"""Our Sinkhorn divergence against ott-jax and GeomLoss: time, memory and error, same inputs.

For each dimension ``d`` and size ``n = m``: ``x`` = a flower-prior sample (d = 2) or
``N(0, I)`` (d = 10), ``y`` = ``N(0.5, 1.5² I)`` (numpy seed, float32, identical for every
method). Every (method, d, n) runs in a fresh subprocess (its own peak RSS, VmHWM) and computes
the divergence and its gradient in ``x``:

* ``ours``: :func:`gsae_jax.ot.sinkhorn_divergence` with ``backend="dense"`` (every pair),
  GeomLoss's annealed schedule (the GSAE paper's setting, ``blur``, ``scaling``), no test;
* ``ours_multiscale``: the same with ``backend="multiscale"`` (d ≤ 3 only);
* ``ours_tol``: the same, then iterations at ``ε = blur²`` to marginal violation ``--tol``;
* ``ours_s0.9`` / ``ours_s0.99``: annealed only, at scaling 0.9 / 0.99 (GeomLoss's accuracy
  knob: more, finer ε steps), to show the time/accuracy trade-off against ``ours_tol``;
* ``ott_dense``: ott-jax ``sinkhorn_divergence`` (dense ``PointCloud``, ``ε_ott = 2 blur²``, its
  cost and value are twice ours, halved here), ``threshold = --tol``;
* ``ott_online``: the same with ``PointCloud(batch_size=...)``;
* ``geomloss_tensorized`` / ``geomloss_online`` / ``geomloss_multiscale``: ``SamplesLoss(
  "sinkhorn", p=2, blur, scaling)`` in torch float32 on the CPU, ``backend="tensorized"`` /
  ``"online"`` / ``"multiscale"`` (the last two through KeOps; multiscale with GeomLoss's
  default cluster scale and truncation, d ≤ 3).

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
  "ours_multiscale",
  "ours_tol",
  "ours_s0.9",
  "ours_s0.99",
  "ott_dense",
  "ott_online",
  "geomloss_tensorized",
  "geomloss_online",
  "geomloss_multiscale",
)
DENSE = {"ott_dense", "geomloss_tensorized"}
# Run only for n <= --tol_max_n: converged solves and the slow, accurate annealing schedules.
ACCURATE = {"ours_tol", "ours_s0.9", "ours_s0.99", "ott_dense"}


def _flower(rng, n):
  petal = rng.permutation(np.arange(n) % 10)
  a = 2 * np.pi * petal / 10
  r = 3 + rng.normal(size=n)
  t = 0.1 * rng.normal(size=n)
  return np.stack([np.cos(a) * r - np.sin(a) * t, np.sin(a) * r + np.cos(a) * t], axis=1)


def make_inputs(
  n: int, d: int, seed: int = 0, target: str = "gauss"
) -> tuple[np.ndarray, np.ndarray]:
  """``x`` (flower for d = 2, else N(0, I)) and ``y``, float32 ``[n, d]``: ``y ~ N(0.5, 1.5² I)``
  (``target="gauss"``) or an independent flower sample (``"flower"``, d = 2: the GSAE regime
  where the latents match the prior)."""
  rng = np.random.default_rng(seed)
  x = _flower(rng, n) if d == 2 else rng.normal(size=(n, d))
  if target == "flower":
    if d != 2:
      raise ValueError("--target flower needs d = 2")
    y = _flower(rng, n)
  else:
    y = 0.5 + 1.5 * rng.normal(size=(n, d))
  return x.astype(np.float32), y.astype(np.float32)


# ----------------------------------------------------------------------------- workers


def _warm_runs(once, first: float, repeats: int, budget_s: float) -> list[float]:
  """Up to ``repeats`` more timed runs of ``once()``, none that would push past ``budget_s``."""
  warm: list[float] = []
  while len(warm) < repeats and sum(warm) + (warm[-1] if warm else first) <= budget_s:
    warm.append(once())
  return warm


def _time_jax(fn, x, y, args):
  import jax

  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(x, y).compile()
  compile_s = time.perf_counter() - t0
  (value, grad), first = common.timed(lambda: compiled(x, y))
  warm = _warm_runs(
    lambda: common.timed(lambda: compiled(x, y))[1], first, args.repeats, args.repeat_budget_s
  )
  return value, grad, compile_s, first, warm


def _run_ours(x, y, args, tol, scaling, backend):
  import jax

  from gsae_jax.ot import sinkhorn_divergence

  kw = dict(blur=args.blur, scaling=scaling, tol=tol, max_iter=args.max_iter, backend=backend)
  fn = jax.value_and_grad(lambda x, y: sinkhorn_divergence(x, y, **kw))
  return _time_jax(fn, x, y, args)


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

  return _time_jax(jax.value_and_grad(div), x, y, args)


def _run_geomloss(x, y, args, backend: str):
  import torch
  from geomloss import SamplesLoss

  torch.set_num_threads(args.torch_threads)
  loss = SamplesLoss("sinkhorn", p=2, blur=args.blur, scaling=args.scaling, backend=backend)
  xt, yt = torch.from_numpy(x), torch.from_numpy(y)

  def once():
    xg = xt.clone().requires_grad_(True)
    t0 = time.perf_counter()
    value = loss(xg, yt)
    (grad,) = torch.autograd.grad(value, xg)
    return float(value), grad.numpy(), time.perf_counter() - t0

  value, grad, first = once()
  warm = _warm_runs(lambda: once()[2], first, args.repeats, args.repeat_budget_s)
  return value, grad, None, first, warm


def _import_framework(method: str, args) -> None:
  """Imports what ``method`` runs on, so that the baseline VmHWM includes the libraries."""
  if method.startswith("geomloss"):
    # Also KeOps's OpenMP loops; set before torch (and its OpenMP runtime) is imported.
    os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)
    import geomloss  # noqa: F401
    import torch  # noqa: F401
  else:
    import jax  # noqa: F401

    import gsae_jax.ot  # noqa: F401

    if method.startswith("ott"):
      import ott.tools.sinkhorn_divergence  # noqa: F401


def worker(method: str, n: int, d: int, args, grad_path: str) -> dict:
  """One measurement in this process; saves the gradient to ``grad_path`` (``.npy``).

  Also reports this process's peak RSS (``VmHWM``) at the end and just before the solve (after
  importing the framework and making the inputs), so the difference is the method's own memory.
  """
  _import_framework(method, args)
  make_inputs(n, d, args.seed, args.target)
  hwm_before = common.vm_hwm_mb(os.getpid())
  if method == "reference":
    from benchmarks.ot_accuracy import reference

    ref = reference(
      *make_inputs(n, d, args.seed, args.target), args.blur, args.ref_tol, args.ref_max_iter
    )
    value, grad, compile_s, first, warm = ref["value"], ref["grad"], ref["compile_s"], 0.0, []
    first = ref["run_s"]
  else:
    x, y = make_inputs(n, d, args.seed, args.target)
    if method.startswith("ours"):
      tol = args.tol if method == "ours_tol" else None
      scaling = float(method[6:]) if method.startswith("ours_s0") else args.scaling
      backend = "multiscale" if method == "ours_multiscale" else "dense"
      value, grad, compile_s, first, warm = _run_ours(x, y, args, tol, scaling, backend)
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
    "vm_hwm_before_mb": hwm_before,
    "vm_hwm_mb": common.vm_hwm_mb(os.getpid()),
  }


# ----------------------------------------------------------------------------- driver


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
    f"--repeat_budget_s={args.repeat_budget_s}",
    f"--torch_threads={args.torch_threads}",
    f"--seed={args.seed}",
    f"--target={args.target}",
  ]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  t0, peak = time.time(), None
  while proc.poll() is None:
    peak = common.vm_hwm_mb(proc.pid) or peak
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
  res = json.loads(out.strip().splitlines()[-1])
  # The worker's own VmHWM at exit is exact; the 0.2 s polling above is the fallback.
  return {"status": "ok", **res, "peak_rss_mb": res.get("vm_hwm_mb") or peak}


def _available(method: str) -> str | None:
  """``None`` if the method's package imports, else why not."""
  import importlib.util

  need = {"ott": ("ott",), "geomloss": ("torch", "geomloss"), "ours": ()}[method.split("_")[0]]
  if method in ("geomloss_online", "geomloss_multiscale"):
    need += ("pykeops",)
  missing = [m for m in need if importlib.util.find_spec(m) is None]
  return f"skipped: {', '.join(missing)} not installed" if missing else None


def _rel(a, b) -> float:
  return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def run(args) -> dict:
  env = common.env_info()
  rows = []
  tmp = Path(tempfile.mkdtemp(prefix="sinkhorn_bench_"))
  for d in args.dims:
    for n in args.sizes:
      ref_grad, ref_value, ref_note = None, None, f"none: n > --ref_max_n {args.ref_max_n}"
      if n <= args.ref_max_n:
        print(f"[d={d} n={n}] float64 reference ...", file=sys.stderr, flush=True)
        r = _subprocess("reference", n, d, args, str(tmp / f"ref_{d}_{n}.npy"))
        if r["status"] == "ok":
          ref_value, ref_grad = r["value"], np.load(tmp / f"ref_{d}_{n}.npy")
          t = r["first_run_s"] + (r["compile_s"] or 0)
          ref_note = f"ok, {t:.1f} s"
          print(f"  reference S = {ref_value:.8g} ({t:.1f} s)", file=sys.stderr, flush=True)
        else:
          ref_note = r["status"]
          print(f"  reference {r['status']}", file=sys.stderr, flush=True)
      ours_value, ours_grad = None, None
      for method in args.methods:
        row = {"method": method, "d": d, "n": n, "ref_value": ref_value, "reference": ref_note}
        row["load_avg_1m"] = os.getloadavg()[0]
        why = _available(method)
        if why is None and method in DENSE and 3 * n * n * 4 > args.dense_limit_gb * 2**30:
          why = f"skipped: 3 dense {n}×{n} float32 arrays exceed {args.dense_limit_gb:g} GB"
        if why is None and method == "ours" and args.ours_max_n and n > args.ours_max_n:
          why = f"skipped: dense above --ours_max_n {args.ours_max_n}"
        if why is None and method.endswith("multiscale") and d > 3:
          why = "skipped: the multiscale backend is for d <= 3"
        if why is None and method in ACCURATE and n > args.tol_max_n:
          why = f"skipped: too slow here for n > --tol_max_n {args.tol_max_n}"
        if why:
          row["status"] = why
          rows.append(row)
          print(f"[d={d} n={n}] {method}: {why}", file=sys.stderr, flush=True)
          continue
        grad_path = tmp / f"{method}_{d}_{n}.npy"
        row.update(_subprocess(method, n, d, args, str(grad_path)))
        if row["status"] == "ok":
          g = np.load(grad_path)
          if ref_grad is not None:
            row["value_rel_err"] = abs(row["value"] - ref_value) / abs(ref_value)
            row["grad_rel_err"] = _rel(g, ref_grad)
          if method == "ours":
            ours_value, ours_grad = row["value"], g
          elif ours_grad is not None:
            row["value_rel_diff_ours"] = abs(row["value"] - ours_value) / abs(ours_value)
            row["grad_rel_diff_ours"] = _rel(g, ours_grad)
        rows.append(row)
        t = row.get("warm_s") or row.get("first_run_s")
        print(
          f"[d={d} n={n}] {method}: {row['status']}"
          + (f", {t:.3g} s, value {row['value']:.6g}" if t else ""),
          file=sys.stderr,
          flush=True,
        )
  return {"env": env, "args": {k: v for k, v in vars(args).items() if k != "one"}, "rows": rows}


def merge(old: dict, new: dict) -> dict:
  """``--append``: ``new``'s rows replace ``old``'s rows of the same (d, n, method)."""
  key = lambda r: (r["d"], r["n"], r["method"])
  fresh = {key(r) for r in new["rows"]}
  rows = [r for r in old["rows"] if key(r) not in fresh] + new["rows"]
  rows.sort(key=lambda r: (r["d"], r["n"], METHODS.index(r["method"])))
  runs = old.get("runs", [{"env": old["env"], "args": old["args"]}])
  return {**new, "rows": rows, "runs": [*runs, {"env": new["env"], "args": new["args"]}]}


def markdown(payload: dict) -> str:
  """The result table: one row per (d, n, method), times as ratios to ``ours`` too."""
  rows = payload["rows"]
  ours = {(r["d"], r["n"]): r for r in rows if r["method"] == "ours" and r.get("status") == "ok"}
  table = []
  for r in rows:
    t = r.get("warm_s") or r.get("first_run_s")
    base = ours.get((r["d"], r["n"]))
    bt = base and (base.get("warm_s") or base.get("first_run_s"))
    before = r.get("vm_hwm_before_mb")
    peak = r.get("peak_rss_mb")
    table.append(
      [
        r["d"],
        r["n"],
        r["method"],
        t if t else "–",
        f"{t / bt:.2f}×" if t and bt else "–",
        r.get("compile_s") or (r.get("first_run_s") if r.get("warm_s") else None) or "–",
        len(r.get("warm_runs_s") or []) if t else "–",
        peak or "–",
        peak - before if peak and before else "–",
        r.get("value", "–"),
        r.get("value_rel_err", "–"),
        r.get("grad_rel_err", "–"),
        r.get("value_rel_diff_ours", "–"),
        r.get("grad_rel_diff_ours", "–"),
        r.get("load_avg_1m", "–"),
        r.get("status", ""),
      ]
    )
  a = payload["args"]
  refs = {(r["d"], r["n"]): (r.get("ref_value"), r.get("reference")) for r in rows}
  ref_lines = "\n".join(
    f"- d = {d}, n = {n}: reference "
    + (f"S = {v:.8g} ({note})" if v is not None else f"{note or 'none'}")
    for (d, n), (v, note) in sorted(refs.items())
  )
  head = (
    f"Sinkhorn divergence value + gradient in x, float32 inputs, blur {a['blur']}, scaling "
    f"{a['scaling']}; GeomLoss on {a.get('torch_threads', '?')} torch/OpenMP thread(s); "
    f"`ours_tol` and `ott_dense` run to marginal violation {a['tol']}. Errors "
    f'("rel. err") are against a float64 reference: the three OT terms solved separately by '
    f"the alternating fixed-ε `gsae_jax.ot.sinkhorn` to marginal violation {a['ref_tol']} "
    f'(`benchmarks.ot_accuracy.reference`); "vs ours" is the relative difference to `ours` '
    f"in the same run (gradient: ‖g − g_ours‖/‖g_ours‖). Time: median of the warm runs "
    f'("warm" = how many; 0 = the single first run after compilation). ΔRSS = peak RSS '
    f"minus the process's peak after importing its framework and making the inputs. "
    f"Load average (1 min) at the start of each row on {payload['env']['cpu_count']} CPUs.\n\n"
    f"{ref_lines}\n\n"
  )
  return head + common.markdown_table(
    [
      "d",
      "n",
      "method",
      "time (s)",
      "÷ ours",
      "compile / first (s)",
      "warm",
      "peak RSS (MB)",
      "ΔRSS (MB)",
      "value",
      "value rel. err",
      "grad rel. err",
      "value vs ours",
      "grad vs ours",
      "load",
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
  p.add_argument("--ref_max_n", type=int, default=1000, help="largest n given a reference")
  p.add_argument("--tol_max_n", type=int, default=1000, help="largest n for converged solves")
  p.add_argument("--dense_limit_gb", type=float, default=16.0)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--big_n", type=int, default=20000, help="from this n on, at most 1 repeat")
  p.add_argument(
    "--repeat_budget_s",
    type=float,
    default=120.0,
    help="no further warm run once the warm runs would exceed this many seconds",
  )
  p.add_argument("--timeout_s", type=float, default=1800.0, help="per (method, d, n)")
  p.add_argument(
    "--torch_threads",
    type=int,
    default=os.cpu_count() or 1,
    help="torch/KeOps (OpenMP) threads (default: all CPUs, like XLA); on the idle 2-core box 2 "
    "threads ran GeomLoss 1.7-1.9x faster than 1 at n = 5000, under load 5.5x slower",
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--target", default="gauss", choices=("gauss", "flower"), help="y cloud")
  p.add_argument("--ours_max_n", type=int, default=None, help="largest n for dense `ours`")
  p.add_argument("--out", default="benchmarks/results")
  p.add_argument("--name", default="sinkhorn", help="output file stem")
  p.add_argument(
    "--append",
    action="store_true",
    help="merge into an existing <out>/<name>.json (same (d, n, method) rows replaced)",
  )
  p.add_argument(
    "--merge_from",
    nargs="*",
    default=[],
    help="with --render_only: result JSONs merged into <out>/<name>.json (later ones win)",
  )
  p.add_argument(
    "--render_only",
    action="store_true",
    help="run nothing: rewrite <out>/<name>.{json,md} from the JSON (and --merge_from)",
  )
  p.add_argument("--one", help=argparse.SUPPRESS)  # internal: method,n,d,grad_path
  args = p.parse_args(argv)
  if args.one:
    method, n, d, grad_path = args.one.split(",", 3)
    print(json.dumps(worker(method, int(n), int(d), args, grad_path)))
    return None
  old = Path(args.out) / f"{args.name}.json"
  if args.render_only:
    payload = json.loads(old.read_text())
    for extra in args.merge_from:
      payload = merge(payload, json.loads(Path(extra).read_text()))
    common.write_outputs(args.out, args.name, payload, markdown(payload))
    return payload
  payload = run(args)
  if args.append and old.exists():
    payload = merge(json.loads(old.read_text()), payload)
  common.write_outputs(args.out, args.name, payload, markdown(payload))
  return payload


if __name__ == "__main__":
  main()
