"""Time and peak memory of a large Sinkhorn divergence with its gradient, on CPU, float32.

For each size ``n`` (``m = n``, ``d = 2``): ``jax.jit(jax.value_and_grad(sinkhorn_divergence))``
w.r.t. ``x`` (envelope gradient, ``blur=0.05``, ``scaling=0.7``) between ``x ~ N(0, I)`` (the
latents) and a flower-prior sample ``y``. Each configuration runs in a fresh subprocess, so its
peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) is its own; a baseline subprocess that only
imports jax and allocates the inputs gives the RSS the computation adds. The dense cost matrix
that the chunked solver never forms would take ``n·m·4`` bytes.

Run from the repository root::

  .venv/bin/python -m benchmarks.large_cloud                    # n = 10 000 and 40 000
  .venv/bin/python -m benchmarks.large_cloud --sizes 500 --repeats 1 --out /tmp/b

Writes ``large_cloud.json`` and ``large_cloud.md`` under ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks import common
from gsae_jax.ot import bounding_box_diameter, epsilon_schedule, sinkhorn_divergence
from gsae_jax.priors import flower


def _inputs(n: int, seed: int) -> tuple[jax.Array, jax.Array]:
  kx, ky = jax.random.split(jax.random.key(seed))
  return common.block((jax.random.normal(kx, (n, 2), jnp.float32), flower(ky, n)))


def worker(mode: str, n: int, blur: float, scaling: float, repeats: int, seed: int) -> dict:
  """One measurement in this process; ``mode`` is ``baseline`` or ``divergence``."""
  x, y = _inputs(n, seed)
  out = {"mode": mode, "n": n, "m": n, "rss_after_inputs_mb": common.peak_rss_mb()}
  if mode == "divergence":
    fn = jax.value_and_grad(lambda x, y: sinkhorn_divergence(x, y, blur=blur, scaling=scaling))
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(x, y).compile()
    r = {"compile_s": time.perf_counter() - t0, "rss_after_compile_mb": common.peak_rss_mb()}
    (value, grad), r["first_run_s"] = common.timed(lambda: compiled(x, y))
    warm = [common.timed(lambda: compiled(x, y))[1] for _ in range(repeats)]
    r["warm_s"] = statistics.median(warm) if warm else None
    r["warm_runs_s"] = warm
    diam = float(bounding_box_diameter(x, y))
    out.update(
      r,
      value=float(value),
      grad_norm=float(jnp.linalg.norm(grad)),
      grad_finite=bool(jnp.all(jnp.isfinite(grad))),
      diameter=diam,
      schedule_steps=len(epsilon_schedule(diam, blur, scaling)),
      repeats=repeats,
    )
  out["peak_rss_mb"] = common.peak_rss_mb()
  return out


def _spawn(mode: str, n: int, args) -> dict:
  cmd = [sys.executable, "-m", "benchmarks.large_cloud", "--worker", mode, "--sizes", str(n)]
  cmd += ["--blur", str(args.blur), "--scaling", str(args.scaling)]
  cmd += ["--repeats", str(args.repeats), "--seed", str(args.seed)]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"worker {mode} n={n} failed:\n{proc.stderr[-4000:]}")
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  res["subprocess_wall_s"] = time.perf_counter() - t0
  return res


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="benchmarks/results", help="output directory")
  p.add_argument("--sizes", default="10000,40000", help="comma list of n (= m)")
  p.add_argument("--blur", type=float, default=0.05)
  p.add_argument("--scaling", type=float, default=0.7)
  p.add_argument("--repeats", type=int, default=2, help="warm runs after the first (median)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--worker", choices=("baseline", "divergence"), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

  if args.worker:
    res = worker(args.worker, sizes[0], args.blur, args.scaling, args.repeats, args.seed)
    print(json.dumps(res))
    return res

  env = common.env_info()
  rows = []
  for n in sizes:
    print(f"n={n}: baseline ...", flush=True)
    base = _spawn("baseline", n, args)
    print(f"n={n}: divergence + grad ...", flush=True)
    div = _spawn("divergence", n, args)
    row = {
      **div,
      "baseline_peak_rss_mb": base["peak_rss_mb"],
      "net_rss_mb": div["peak_rss_mb"] - base["peak_rss_mb"],
      "compile_plus_first_s": div["compile_s"] + div["first_run_s"],
      "dense_cost_matrix_mb": n * n * 4 / 2**20,
    }
    rows.append(row)
    print(f"  {row}", flush=True)

  command = "python -m benchmarks.large_cloud " + " ".join(argv or [])
  table = common.markdown_table(
    [
      "n = m",
      "steps",
      "compile (s)",
      "first run (s)",
      "compile+first (s)",
      "warm median (s)",
      "peak RSS (MB)",
      "after compile (MB)",
      "baseline RSS (MB)",
      "net (MB)",
      "dense C (MB)",
      "value",
    ],
    [
      [
        r["n"],
        r["schedule_steps"],
        r["compile_s"],
        r["first_run_s"],
        r["compile_plus_first_s"],
        r["warm_s"],
        f"{r['peak_rss_mb']:.0f}",
        f"{r['rss_after_compile_mb']:.0f}",
        f"{r['baseline_peak_rss_mb']:.0f}",
        f"{r['net_rss_mb']:.0f}",
        f"{r['dense_cost_matrix_mb']:.0f}",
        f"{r['value']:.6g}",
      ]
      for r in rows
    ],
  )
  md = "\n".join(
    [
      "# Large-cloud Sinkhorn divergence + gradient (CPU, float32, d = 2)",
      "",
      f"`{command.strip()}` — jax {jax.__version__}, {jax.default_backend()}, "
      f"{env['cpu_count']} CPU cores shared with other jobs (timings noisy). "
      f"`jit(value_and_grad(sinkhorn_divergence))` w.r.t. x, blur {args.blur}, scaling "
      f"{args.scaling}, envelope gradient, default chunking; x ~ N(0, I), y ~ flower. "
      f"Warm: median of {args.repeats} runs. RSS: ru_maxrss of a fresh subprocess per row; "
      ""
      "after compile = peak RSS before the first run; baseline = a process that imports jax "
      "and allocates the inputs; net = peak − baseline. "
      "Dense C: n·m·4 bytes, never formed.",
      "",
      table,
    ]
  )
  payload = {"command": command.strip(), "config": vars(args), "env": env, "rows": rows}
  common.write_outputs(args.out, "large_cloud", payload, md)
  return payload


if __name__ == "__main__":
  main(sys.argv[1:])
