"""Warm-started potentials across training steps vs the cold annealed schedule (issue 13, part 3).

Latents ``x_t`` drift a little per step (rotation and dilation), the flower prior sample is
redrawn every step or kept; each step solves the divergence (``static_b``) with its gradient
cold and in warm chains of ``warm_iters = k`` updates; errors against a converged reference at
the last step.

  python -m benchmarks.warm_start --n 60000 --steps 10 --warm_iters 2 5 --name warm_start_60k
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from gsae_jax.ot import solve_divergence


def base_latents(regime: str, key, n: int) -> jax.Array:
  """``early``: a small Gaussian blob off-centre (an untrained encoder); ``late``: another
  flower sample, rotated a little (latents close to the prior)."""
  if regime == "early":
    return 0.5 * harness.sample("standard_normal", key, n) + jnp.array([0.5, -0.3])
  return rotated(harness.sample("flower", key, n), 0.05)


def rotated(pts: jax.Array, angle: float, scale: float = 1.0) -> jax.Array:
  """``pts`` rotated by ``angle`` (radians) about the origin, times ``scale``."""
  c, s = np.cos(angle), np.sin(angle)
  return scale * (pts @ jnp.array([[c, -s], [s, c]]))


def make_solver(kw: dict, warm_iters: int | None, redrawn: bool):
  """Jitted ``(x, y, init) -> (value, grad_x, output)``; ``init`` unused when cold."""

  def run(x, y, init):
    def value(x):
      if warm_iters is None:
        out = solve_divergence(x, y, **kw)
      else:
        f_ba, g_ab, f_aa = init
        start = (f_ba, None if redrawn else g_ab, f_aa, None)
        out = solve_divergence(x, y, init=start, warm_iters=warm_iters, **kw)
      return out.value, out

    (val, out), grad = jax.value_and_grad(value, has_aux=True)(x)
    return val, grad, out

  return jax.jit(run)


def run_regime(args, regime: str, target: str) -> list[dict]:
  """``args.steps`` steps of one regime and target, every method: one row per method."""
  k_base, k_prior = jax.random.split(jax.random.key(args.seed))
  base = base_latents(regime, k_base, args.n)
  redrawn = target == "redrawn"
  kw = dict(blur=args.blur, scaling=args.scaling, static_b=True, backend=args.backend)
  methods = {"cold": None} | {f"warm_{k}": k for k in args.warm_iters}
  solvers = {m: make_solver(kw, k, redrawn) for m, k in methods.items()}
  state, last, times, viol = {}, {}, {m: [] for m in methods}, {m: [] for m in methods}
  y_fixed = harness.sample("flower", k_prior, args.n)
  for t in range(args.steps):
    x = rotated(base, args.rate * t, 1.0 + args.rate * t)  # each point moves ≈ rate·|x| a step
    y = harness.sample("flower", jax.random.fold_in(k_prior, t), args.n) if redrawn else y_fixed
    for m in methods:
      init = state.get(m, state.get("cold"))  # cold runs first: a chain starts from it
      timing = harness.time_fn(solvers[m], x, y, init, jit=False)
      val, grad, out = timing.result
      if t > 0 or m == "cold":  # step 0 of a warm chain includes its compile
        times[m].append(timing.first_run_s)
      viol[m].append(float(out.marginal_violation))
      state[m], last[m] = (out.f_ba, out.g_ab, out.f_aa), (float(val), grad, out)
      where = f"  {regime}/{target} step {t} {m}: {timing.first_run_s:.2f} s"
      harness.log(f"{where}, value {float(val):.6g}, violation {viol[m][-1]:.3g}")
  # Converged reference at the last step, from the most-iterated warm chain's potentials.
  best = max((k, m) for m, k in methods.items() if k is not None)[1]
  init, ref_kw = (*state[best], None), dict(kw, tol=args.ref_tol, max_iter=args.ref_max_iter)

  def ref_value(x):
    out = solve_divergence(x, y, init=init, **ref_kw)
    return out.value, out

  ref = harness.time_fn(jax.jit(jax.value_and_grad(ref_value, has_aux=True)), x, jit=False)
  (ref_val, ref_out), ref_grad = ref.result
  rows = []
  for m, k in methods.items():
    val, grad, out = last[m]
    row = {"regime": regime, "target": target, "method": m, "warm_iters": k}
    row["median_s"] = float(np.median(times[m])) if times[m] else None
    row |= {"violation_last": viol[m][-1], "violation_median": float(np.median(viol[m]))}
    row |= {"value_last": val, "ref_value": float(ref_val)}
    row["value_rel_err"] = harness.rel_err(val, ref_val)
    row["grad_rel_err"] = harness.rel_err(grad, ref_grad)
    row |= {"ref_converged": bool(ref_out.converged), "ref_updates": int(ref_out.iterations)}
    row |= {"ref_s": ref.first_run_s, "kept_tile_fraction": float(out.kept_tile_fraction)}
    rows.append({**row, "dense_fallbacks": int(out.dense_fallbacks)})
  return rows


def markdown(payload: dict, command: str) -> str:
  """The table, under a line of the setting and over the command."""
  a = payload["args"]
  columns = [
    "regime, target, method, s/solve (v+g)=median_s, marginal viol. (last)=violation_last",
    "value rel. err=value_rel_err, grad rel. err=grad_rel_err",
    ("ref. updates (converged)", lambda r: f"{r['ref_updates']} ({r['ref_converged']})"),
  ]
  return (
    f"Warm start across steps, n = {a['n']}, {a['steps']} steps, drift {a['rate']}/step, "
    f"blur {a['blur']}, scaling {a['scaling']}, backend {a['backend']}; errors against a "
    f"converged reference (tol {a['ref_tol']}) at the last step.\n\n"
    + harness.table(columns, payload["rows"], digits=3)
    + f"\n\n`{command}`\n"
  )


def main(argv=None) -> dict:
  p = harness.parser(__doc__, n=60000, steps=10, warm_iters=[2, 5])
  harness.flags(p, regimes=(["early", "late"], None, ["early", "late"]))
  harness.flags(p, targets=(["redrawn"], None, ["redrawn", "kept"]))
  harness.flags(p, rate=(0.002, "drift per step (relative)"), blur=0.05, scaling=0.7)
  harness.flags(p, backend="multiscale", ref_tol=1e-3, ref_max_iter=2000, seed=0)
  args = harness.parse(p, argv, "warm_start")
  env, command = harness.env_info(), harness.command("warm_start", argv)
  rows = [r for reg in args.regimes for tgt in args.targets for r in run_regime(args, reg, tgt)]
  payload = {"args": vars(args), "env": env, "rows": rows}
  return harness.save(args.out, args.name, payload, lambda p: markdown(p, command))


if __name__ == "__main__":
  main()
