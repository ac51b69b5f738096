"""Time and peak memory of a large Sinkhorn divergence with its gradient, on CPU, float32.

Per ``n`` (``m = n``, ``d = 2``, ``x ~ N(0, I)``, ``y`` flower): ``jit(value_and_grad)`` in a
fresh subprocess (its own peak RSS), beside a baseline process that only makes the inputs.

  .venv/bin/python -m benchmarks.large_cloud --sizes 500 --repeats 1 --out /tmp/b
"""

from __future__ import annotations

import time

from benchmarks import harness


def measure(mode: str, n: int, blur: float, scaling: float, repeats: int, seed: int) -> dict:
  """One measurement in this process; ``mode`` is ``baseline`` or ``divergence``."""
  import jax
  import jax.numpy as jnp

  from gsae_jax.ot import bounding_box_diameter, epsilon_schedule, sinkhorn_divergence

  x, y = harness.clouds(n, 2, "standard_normal", "flower", seed)
  out = {"mode": mode, "n": n, "m": n, "rss_after_inputs_mb": harness.vm_hwm_mb()}
  if mode == "divergence":
    fn = jax.value_and_grad(lambda x, y: sinkhorn_divergence(x, y, blur=blur, scaling=scaling))
    t = harness.time_fn(fn, x, y, repeats=repeats)
    value, grad = t.result
    diam = float(bounding_box_diameter(x, y))
    out |= {**t.fields(), "rss_after_compile_mb": t.compiled_hwm_mb, "value": float(value)}
    out["grad_norm"] = float(jnp.linalg.norm(grad))
    out["grad_finite"] = bool(jnp.isfinite(grad).all())
    out |= {"diameter": diam, "schedule_steps": len(epsilon_schedule(diam, blur, scaling))}
    out["repeats"] = repeats
  return out


def _isolated(mode: str, n: int, args) -> dict:
  kwargs = {k: getattr(args, k) for k in ("blur", "scaling", "repeats", "seed")}
  harness.log(f"n={n}: {mode} ...")
  t0 = time.perf_counter()
  res = harness.run_isolated("benchmarks.large_cloud:measure", {"mode": mode, "n": n, **kwargs})
  if res.pop("status") != "ok":
    raise RuntimeError(f"large_cloud {mode} n={n}: {res}")
  return {**res, "subprocess_wall_s": time.perf_counter() - t0}


def markdown(payload: dict) -> str:
  """The table, under a header naming the command and the setting."""
  c, env = payload["config"], payload["env"]
  columns = [
    "n = m=n, steps=schedule_steps, compile (s)=compile_s, first run (s)=first_run_s",
    "compile+first (s)=compile_plus_first_s, warm median (s)=warm_s",
    "peak RSS (MB)=peak_rss_mb:.0f",
    "after compile (MB)=rss_after_compile_mb:.0f, baseline RSS (MB)=baseline_peak_rss_mb:.0f",
    "net (MB)=net_rss_mb:.0f, dense C (MB)=dense_cost_matrix_mb:.0f, value:.6g",
  ]
  return (
    "# Large-cloud Sinkhorn divergence + gradient (CPU, float32, d = 2)\n\n"
    f"`{payload['command']}` — jax {env['jax']}, {env['backend']}, "
    f"{env['cpu_count']} CPU cores shared with other jobs (timings noisy). "
    f"`jit(value_and_grad(sinkhorn_divergence))` w.r.t. x, blur {c['blur']}, scaling "
    f"{c['scaling']}, envelope gradient, default chunking; x ~ N(0, I), y ~ flower. "
    f"Warm: median of {c['repeats']} runs. RSS: VmHWM of a fresh subprocess per row; "
    "after compile = peak RSS before the first run; baseline = a process that imports jax "
    "and allocates the inputs; net = peak − baseline. "
    "Dense C: n·m·4 bytes, never formed.\n\n" + harness.table(columns, payload["rows"])
  )


def main(argv: list[str] | None = None) -> dict:
  p = harness.parser(__doc__, sizes=("10000,40000", "comma list of n (= m)"), blur=0.05)
  harness.flags(p, scaling=0.7, repeats=(2, "warm runs after the first (median)"), seed=0)
  args = harness.parse(p, argv)
  env, rows = harness.env_info(), []
  for n in [int(s) for s in args.sizes.split(",") if s.strip()]:
    base, div = _isolated("baseline", n, args), _isolated("divergence", n, args)
    row = {**div, "baseline_peak_rss_mb": base["peak_rss_mb"]}
    row["net_rss_mb"] = div["peak_rss_mb"] - base["peak_rss_mb"]
    row["compile_plus_first_s"] = div["compile_s"] + div["first_run_s"]
    rows.append({**row, "dense_cost_matrix_mb": n * n * 4 / 2**20})
    harness.log(f"  {rows[-1]}")
  command = harness.command("large_cloud", argv)
  payload = {"command": command, "config": vars(args), "env": env, "rows": rows}
  return harness.save(args.out, "large_cloud", payload, markdown)


if __name__ == "__main__":
  main()
