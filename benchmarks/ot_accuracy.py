"""Accuracy of the annealed Sinkhorn divergence, and warm starts of the fixed-ε solver.

(a) The paper's annealed setting (``tol=None``) against the converged float64 divergence
(:func:`reference`), value and ``grad_x``, on flower-vs-Gaussian and flower-vs-flower clouds;
``--check_n`` (0: none) cross-checks the reference with ``sinkhorn_divergence(tol=...)``.
(b) ``sinkhorn(..., tol)`` at fixed ε cold, then after ``x += δ·N(0, 1)`` warm and cold.

  .venv/bin/python -m benchmarks.ot_accuracy --n 200 --warm_n 200 --check_n 100 --out /tmp/b
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from gsae_jax.ot import bounding_box_diameter, epsilon_schedule, sinkhorn, sinkhorn_divergence

CASES = {"flower_vs_gaussian": "standard_normal", "flower_vs_flower": "flower"}
"""Case name → the :func:`benchmarks.harness.sample` kind of ``y`` (``x`` is a flower sample)."""


def make_clouds(case: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``n`` points of a flower sample and of ``case``'s ``y``, sampled in float32, as float64."""
  x, y = harness.clouds(n, 2, "flower", CASES[case], seed)
  return np.asarray(x, np.float64), np.asarray(y, np.float64)


def annealed(x, y, blur, scaling, dtype, repeats, **kwargs) -> dict:
  """Value and ``grad_x`` of ``sinkhorn_divergence`` (annealed unless ``tol`` is passed)."""
  div = lambda x, y: sinkhorn_divergence(x, y, blur=blur, scaling=scaling, **kwargs)
  fn = jax.value_and_grad(div)
  t = harness.time_fn(fn, jnp.asarray(x, dtype), jnp.asarray(y, dtype), repeats=repeats)
  value, grad = t.result
  return {**t.fields(), "value": float(value), "grad": np.asarray(grad, np.float64)}


def reference(x, y, blur, tol, max_iter) -> dict:
  """Converged float64 ``OT_ε(x, y) − ½ OT_ε(x, x) − ½ OT_ε(y, y)`` and its ``grad_x``, each term
  by the alternating :func:`sinkhorn` cold to ``10·tol`` then on to ``tol`` (the value's change
  bounds its error); the gradient from a warm-started call (envelope, at the potentials)."""
  eps, names = blur**2, ("xy", "xx", "yy")

  def terms(x, y, tol_, inits=(None, None, None)):
    solve = lambda p, q, i: sinkhorn(p, q, epsilon=eps, tol=tol_, max_iter=max_iter, init=i)
    return solve(x, y, inits[0]), solve(x, x, inits[1]), solve(y, y, inits[2])

  combine = lambda o: o[0].reg_ot_cost - 0.5 * o[1].reg_ot_cost - 0.5 * o[2].reg_ot_cost
  potentials = lambda outs: tuple((o.f, o.g) for o in outs)

  with jax.enable_x64(True):
    x, y = jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64)
    coarse = harness.time_fn(lambda x, y: terms(x, y, 10 * tol), x, y)
    fine = harness.time_fn(lambda x, y, i: terms(x, y, tol, i), x, y, potentials(coarse.result))
    outs = fine.result

    def value_and_grad(x, y, inits):
      def value(x):
        warm = terms(x, y, tol, inits)
        return combine(warm), tuple(o.iterations for o in warm)

      return jax.value_and_grad(value, has_aux=True)(x)

    (value, grad_iters), grad = harness.time_fn(value_and_grad, x, y, potentials(outs)).result
    v, v10 = float(combine(outs)), float(combine(coarse.result))
    pairs = list(zip(names, coarse.result, outs, strict=True))
    t_run = coarse.first_run_s + fine.first_run_s
    out = {"value": v, "value_at_10tol": v10, "value_change_10tol_to_tol": abs(v - v10)}
    out |= {"value_in_grad_call": float(value), "grad": np.asarray(grad)}
    out["iterations"] = {k: int(a.iterations) + int(b.iterations) for k, a, b in pairs}
    out["marginal_violation"] = {k: float(b.marginal_violation) for k, _, b in pairs}
    out["hit_max_iter"] = any(int(o.iterations) >= max_iter for o in (*coarse.result, *outs))
    out["extra_iterations_in_grad_call"] = [int(i) for i in grad_iters]
    return out | {"compile_s": coarse.compile_s + fine.compile_s, "run_s": t_run}


def cached_reference(args, case, n, x, y, blur) -> dict:
  """:func:`reference`, stored under ``--ref_cache`` (if set) so an interrupted run resumes."""
  if not args.ref_cache:
    return reference(x, y, blur, args.ref_tol, args.ref_max_iter)
  key = f"{case}_n{n}_blur{blur:g}_seed{args.seed}_tol{args.ref_tol:g}_max{args.ref_max_iter}"
  path = Path(args.ref_cache) / f"{key}.npz"
  if path.exists():
    with np.load(path) as z:
      harness.log(f"    (reference from {path})")
      return {**json.loads(str(z["meta"])), "grad": z["grad"]}
  ref = reference(x, y, blur, args.ref_tol, args.ref_max_iter)
  path.parent.mkdir(parents=True, exist_ok=True)
  meta = json.dumps({k: v for k, v in ref.items() if k != "grad"})
  np.savez(path, grad=ref["grad"], meta=np.asarray(meta))
  return ref


def part_annealed(args) -> dict:
  """Part (a): the rows, the references and the cross-checks."""
  rows, refs, checks = [], [], []
  for case in CASES:
    x, y = make_clouds(case, args.n, args.seed)
    diam = float(bounding_box_diameter(jnp.asarray(x), jnp.asarray(y)))
    for blur in args.blurs:
      harness.log(f"[a] {case} blur={blur}: converged reference ...")
      ref = cached_reference(args, case, args.n, x, y, blur)
      refs.append({"case": case, "blur": blur, **{k: v for k, v in ref.items() if k != "grad"}})
      harness.log(f"    S_ref={ref['value']:.8g} iterations={ref['iterations']}")
      for scaling in args.scalings:
        f32 = annealed(x, y, blur, scaling, jnp.float32, args.repeats)
        with jax.enable_x64(True):
          f64 = annealed(x, y, blur, scaling, jnp.float64, args.repeats)
        steps = len(epsilon_schedule(diam, blur, scaling))
        row = {"case": case, "blur": blur, "scaling": scaling, "diameter": diam}
        row |= {"schedule_steps": steps, "annealed_f32": f32["value"], "annealed_f64": f64["value"]}
        row["converged"], both = ref["value"], {"f32": f32, "f64": f64}
        for tag, r in both.items():
          row[f"abs_diff_{tag}"] = abs(r["value"] - ref["value"])
          row[f"rel_diff_{tag}"] = harness.rel_err(r["value"], ref["value"])
        for tag, r in both.items():
          row[f"grad_rel_l2_{tag}"] = harness.rel_err(r["grad"], ref["grad"])
        row |= {f"time_annealed_f32_{k}": f32[k] for k in ("warm_s", "compile_s")}
        row |= {"time_annealed_f64_warm_s": f64["warm_s"], "time_converged_s": ref["run_s"]}
        rows.append(row)
        harness.log(
          f"    scaling={scaling}: steps={steps} annealed={f32['value']:.6g}"
          f" rel_diff={row['rel_diff_f32']:.3g} grad_rel={row['grad_rel_l2_f32']:.3g}"
        )
    if args.check_n:
      xc, yc = make_clouds(case, args.check_n, args.seed + 1)
      blur = max(args.blurs)
      harness.log(f"[a] cross-check {case} n={args.check_n} blur={blur} ...")
      ref = cached_reference(args, case, args.check_n, xc, yc, blur)
      kw = {"tol": args.ref_tol, "max_iter": args.check_max_iter}
      with jax.enable_x64(True):
        div = annealed(xc, yc, blur, 0.7, jnp.float64, 0, **kw)
      check = {"case": case, "n": args.check_n, "blur": blur, "term_by_term": ref["value"]}
      check |= {"divergence_tol": div["value"], "abs_diff": abs(ref["value"] - div["value"])}
      check["grad_rel_l2"] = harness.rel_err(div["grad"], ref["grad"])
      check |= {"time_term_by_term_s": ref["run_s"], "time_divergence_tol_s": div["first_run_s"]}
      checks.append(check)
      harness.log(f"    {check}")
  return {"rows": rows, "references": refs, "cross_checks": checks}


def part_warm(args) -> dict:
  """Part (b): a row per (ε, δ)."""
  n = args.warm_n
  # "Flower-ish": a flower sample blurred by 0.05·N(0, 1), against an independent flower sample.
  x, y = harness.clouds(n, 2, "flower", "flower", args.seed + 7)
  key = jax.random.key(args.seed)
  noise = lambda i: harness.sample("standard_normal", jax.random.fold_in(key, i), n)
  x = x + 0.05 * noise(0)
  zeros = jnp.zeros(n, jnp.float32)
  compiled = {}

  def solve(max_iter, xx, eps, f0, g0):
    a = (xx, y, jnp.float32(eps), f0, g0)
    if max_iter not in compiled:
      kw = {"tol": args.warm_tol, "max_iter": max_iter}
      fn = lambda x, y, e, f, g: sinkhorn(x, y, epsilon=e, init=(f, g), **kw)
      compiled[max_iter] = jax.jit(fn).lower(*a).compile()
    t = harness.time_fn(compiled[max_iter], *a, repeats=args.repeats_warm - 1, jit=False)
    return t.result, int(t.result.iterations), t.seconds

  rows = []
  for eps in args.warm_eps:
    max_iter = args.warm_max_iter
    while True:
      harness.log(f"[b] eps={eps}: cold solve, max_iter={max_iter} ...")
      cold, cold_iters, t_cold = solve(max_iter, x, eps, zeros, zeros)
      if cold_iters < max_iter or max_iter >= args.warm_max_iter_cap:
        break
      max_iter = min(10 * max_iter, args.warm_max_iter_cap)
    for i, delta in enumerate(args.warm_deltas, 1):
      xp = x + delta * noise(i)
      warm, warm_iters, t_warm = solve(max_iter, xp, eps, cold.f, cold.g)
      cold_p, cold_p_iters, t_cold_p = solve(max_iter, xp, eps, zeros, zeros)
      row = {"epsilon": eps, "delta": delta, "max_iter": max_iter}
      row |= {"raised_max_iter": max_iter != args.warm_max_iter, "cold_iters": cold_iters}
      row |= {"cold_s": t_cold, "cold_hit_max_iter": cold_iters >= max_iter}
      row |= {"warm_iters": warm_iters, "warm_s": t_warm}
      row |= {"cold_perturbed_iters": cold_p_iters, "cold_perturbed_s": t_cold_p}
      row["iters_warm_over_cold"] = warm_iters / max(cold_p_iters, 1)
      row["time_warm_over_cold"] = t_warm / t_cold_p
      pair = (("warm", warm), ("cold", cold_p))
      row |= {f"reg_ot_{tag}": float(o.reg_ot_cost) for tag, o in pair}
      row |= {f"viol_{tag}": float(o.marginal_violation) for tag, o in pair}
      rows.append(row)
      harness.log(f"    delta={delta}: {row}")
  return {"rows": rows}


ANNEALED_COLUMNS = [
  "case, blur, scaling, steps=schedule_steps, annealed f32=annealed_f32:.6g",
  "converged f64=converged:.6g, abs diff=abs_diff_f32, rel diff f32=rel_diff_f32",
  "rel diff f64=rel_diff_f64, grad rel f32=grad_rel_l2_f32, grad rel f64=grad_rel_l2_f64",
  "t ann f32 (s)=time_annealed_f32_warm_s, t ann f64 (s)=time_annealed_f64_warm_s",
  "t conv (s)=time_converged_s",
]
REFERENCE_COLUMNS = [
  "case, blur, S converged=value:.8g, Δ vs 10·tol=value_change_10tol_to_tol",
  *[(f"iters {k}", lambda r, k=k: r["iterations"][k]) for k in ("xy", "xx", "yy")],
  ("max viol", lambda r: max(r["marginal_violation"].values())),
  "hit max_iter=hit_max_iter, time (s)=run_s",
]
CHECK_COLUMNS = [
  "case, n, blur, term by term=term_by_term:.10g, divergence tol=divergence_tol:.10g",
  "abs diff=abs_diff, grad rel=grad_rel_l2, t terms=time_term_by_term_s",
  "t div=time_divergence_tol_s",
]
WARM_COLUMNS = [
  "ε=epsilon, δ=delta, max_iter, cold iters=cold_iters, cold (s)=cold_s, warm iters=warm_iters",
  "warm (s)=warm_s, cold pert. iters=cold_perturbed_iters, cold pert. (s)=cold_perturbed_s",
  "iters warm/cold=iters_warm_over_cold, time warm/cold=time_warm_over_cold",
  ("|ΔOT| warm vs cold", lambda r: abs(r["reg_ot_warm"] - r["reg_ot_cold"])),
]


def markdown(payload: dict) -> str:
  """Both parts' tables from a result payload."""
  c, env = payload["config"], payload["env"]
  out = [
    "# OT accuracy benchmarks",
    f"`{payload['command']}` — jax {env['jax']}, {env['backend']}, "
    f"{env['cpu_count']} CPU cores (shared, timings noisy).",
  ]
  if "annealed" in payload:
    a = payload["annealed"]
    out += [
      f"## (a) Annealed (`tol=None`) vs converged, n = m = {c['n']}",
      f"Converged: float64, term by term with `sinkhorn(tol={c['ref_tol']:g})`. Differences are "
      "|annealed − converged|; grad: ‖∇ₓ annealed − ∇ₓ converged‖ / ‖∇ₓ converged‖. Times: "
      "median warm run of `jit(value_and_grad)`; t conv: run time of the three float64 solves "
      "(value only, compile excluded).",
      harness.table(ANNEALED_COLUMNS, a["rows"]),
      "Converged references (alternating Sinkhorn iterations per term, float64):",
      harness.table(REFERENCE_COLUMNS, a["references"]),
    ]
    if a["cross_checks"]:
      out += [
        "Cross-check: term-by-term reference vs `sinkhorn_divergence(tol="
        f"{c['ref_tol']:g}, max_iter={c['check_max_iter']})`, float64, scaling 0.7:",
        harness.table(CHECK_COLUMNS, a["cross_checks"]),
      ]
  if "warm" in payload:
    out += [
      f"## (b) Warm start of `sinkhorn(tol={c['warm_tol']:g})`, n = m = {c['warm_n']}, float32",
      "Cold: from zero potentials. Then x += δ·N(0, 1): warm from the cold solution's (f, g), "
      "and cold again. Ratios are warm / cold on the perturbed problem.",
      harness.table(WARM_COLUMNS, payload["warm"]["rows"]),
    ]
  return "\n\n".join(out)


def main(argv: list[str] | None = None) -> dict:
  p = harness.parser(__doc__, parts=("annealed,warm", "comma list of annealed, warm"), seed=0)
  harness.flags(p, n=(3000, "points per cloud in part (a)"))
  p.add_argument("--blurs", type=harness.floats, default=[0.05, 0.1])
  p.add_argument("--scalings", type=harness.floats, default=[0.5, 0.7, 0.9])
  harness.flags(p, repeats=(3, "warm repeats of the annealed runs"), ref_tol=1e-4)
  harness.flags(p, ref_max_iter=200_000)
  harness.flags(p, ref_cache=("", "directory caching references (resumable)"))
  harness.flags(p, check_n=(500, "cross-check size; 0 skips it"))
  harness.flags(p, check_max_iter=200_000, warm_n=2000)
  p.add_argument("--warm_eps", type=harness.floats, default=[0.01, 0.0025])
  p.add_argument("--warm_deltas", type=harness.floats, default=[1e-2, 1e-3])
  harness.flags(p, warm_tol=1e-3, warm_max_iter=2000, warm_max_iter_cap=20_000)
  harness.flags(p, repeats_warm=(1, "timed runs per warm-start solve"))
  args = harness.parse(p, argv)
  parts = {s.strip() for s in args.parts.split(",")}
  command = harness.command("ot_accuracy", argv)
  payload = {"config": vars(args), "command": command, "env": harness.env_info()}
  t0 = time.perf_counter()
  res = {k: f(args) for k, f in (("annealed", part_annealed), ("warm", part_warm)) if k in parts}
  payload = {**payload, "total_s": time.perf_counter() - t0, **res}
  return harness.save(args.out, "ot_accuracy", payload, markdown)


if __name__ == "__main__":
  main()
