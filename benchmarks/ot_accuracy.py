"""Accuracy of the annealed Sinkhorn divergence, and warm starts of the fixed-ε solver.

Part (a), annealed vs converged: on flower-vs-Gaussian and flower-vs-flower clouds, the
divergence with the paper's annealed setting (``tol=None``: one symmetric update per ε of the
schedule) is compared with the converged debiased divergence at ``ε = blur²``, value and
``grad_x``. The converged reference is computed in float64 term by term,
``OT_ε(α, β) − ½ OT_ε(α, α) − ½ OT_ε(β, β)``, each with the alternating solver
:func:`gsae_jax.ot.sinkhorn` run to an L1 marginal violation below ``--ref_tol``; its gradient
comes from a second, warm-started call (the envelope gradient at the converged potentials).
This is the fixed point that ``sinkhorn_divergence(..., tol=...)`` iterates towards, at a
fraction of its cost (the averaged symmetric update needs several times more iterations); a
cross-check at ``--check_n`` points compares the two (``--check_n 0`` skips it).

Part (b), warm start: ``sinkhorn(..., tol)`` at fixed ε, cold; then the points ``x`` move by
``δ·N(0, 1)`` and the problem is solved again from the previous potentials
(``init=(f, g)``) and cold; the table gives the iterations and times, warm over cold.

Run from the repository root::

  .venv/bin/python -m benchmarks.ot_accuracy                      # full size
  .venv/bin/python -m benchmarks.ot_accuracy --n 200 --warm_n 200 --check_n 100 --out /tmp/b

Writes ``ot_accuracy.json`` and ``ot_accuracy.md`` under ``--out`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from gsae_jax.ot import bounding_box_diameter, epsilon_schedule, sinkhorn, sinkhorn_divergence
from gsae_jax.priors import flower

CASES = ("flower_vs_gaussian", "flower_vs_flower")


def _floats(text: str) -> list[float]:
  return [float(t) for t in text.split(",") if t.strip()]


def make_clouds(case: str, n: int, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``x``: a flower sample; ``y``: a standard normal or a second, independent flower sample.

  Sampled in float32 and returned as float64 numpy arrays, so both precisions see the same
  points.
  """
  kx, ky = jax.random.split(jax.random.key(seed))
  x = flower(kx, n)
  if case == "flower_vs_gaussian":
    y = jax.random.normal(ky, (m, 2), jnp.float32)
  elif case == "flower_vs_flower":
    y = flower(ky, m)
  else:
    raise ValueError(f"unknown case {case!r}")
  return np.asarray(x, np.float64), np.asarray(y, np.float64)


def _rel_l2(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def annealed(x, y, blur, scaling, dtype, repeats, **kwargs) -> dict:
  """Value and ``grad_x`` of ``sinkhorn_divergence`` (annealed unless ``tol`` is passed)."""

  def fn(x, y):
    return jax.value_and_grad(
      lambda x: sinkhorn_divergence(x, y, blur=blur, scaling=scaling, **kwargs)
    )(x)

  r = common.compile_and_time(fn, jnp.asarray(x, dtype), jnp.asarray(y, dtype), repeats=repeats)
  value, grad = r.pop("result")
  return {**r, "value": float(value), "grad": np.asarray(grad, np.float64)}


def reference(x, y, blur, tol, max_iter) -> dict:
  """Converged float64 debiased divergence and its ``grad_x``, term by term (see module doc).

  Solved twice: cold to ``10·tol``, then on from there to ``tol``; the change of the value
  between the two bounds the reference's own error (generously: Sinkhorn's value converges
  monotonically, and faster than its marginals).
  """
  eps = blur**2
  names = ("xy", "xx", "yy")

  def terms(x, y, tol_, inits=(None, None, None)):
    solve = lambda p, q, i: sinkhorn(p, q, epsilon=eps, tol=tol_, max_iter=max_iter, init=i)
    return solve(x, y, inits[0]), solve(x, x, inits[1]), solve(y, y, inits[2])

  def combine(outs):
    oxy, oxx, oyy = outs
    return oxy.reg_ot_cost - 0.5 * oxx.reg_ot_cost - 0.5 * oyy.reg_ot_cost

  def potentials(outs):
    return tuple((o.f, o.g) for o in outs)

  with jax.enable_x64(True):
    x, y = jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64)
    coarse = common.compile_and_time(lambda x, y: terms(x, y, 10 * tol), x, y, repeats=0)
    fine = common.compile_and_time(
      lambda x, y, i: terms(x, y, tol, i), x, y, potentials(coarse["result"]), repeats=0
    )
    outs = fine["result"]

    def value_and_grad(x, y, inits):
      def value(x):
        warm = terms(x, y, tol, inits)
        return combine(warm), tuple(o.iterations for o in warm)

      return jax.value_and_grad(value, has_aux=True)(x)

    (value, grad_iters), grad = common.compile_and_time(
      value_and_grad, x, y, potentials(outs), repeats=0
    )["result"]
    iters = {
      k: int(a.iterations) + int(b.iterations)
      for k, a, b in zip(names, coarse["result"], outs, strict=True)
    }
    return {
      "value": float(combine(outs)),
      "value_at_10tol": float(combine(coarse["result"])),
      "value_change_10tol_to_tol": abs(float(combine(outs)) - float(combine(coarse["result"]))),
      "value_in_grad_call": float(value),
      "grad": np.asarray(grad),
      "iterations": iters,
      "marginal_violation": {
        k: float(o.marginal_violation) for k, o in zip(names, outs, strict=True)
      },
      "hit_max_iter": any(int(o.iterations) >= max_iter for o in (*coarse["result"], *outs)),
      "extra_iterations_in_grad_call": [int(i) for i in grad_iters],
      "compile_s": coarse["compile_s"] + fine["compile_s"],
      "run_s": coarse["first_run_s"] + fine["first_run_s"],
    }


def cached_reference(args, case, n, x, y, blur) -> dict:
  """:func:`reference`, stored under ``--ref_cache`` (if set) so an interrupted run resumes."""
  if not args.ref_cache:
    return reference(x, y, blur, args.ref_tol, args.ref_max_iter)
  key = f"{case}_n{n}_blur{blur:g}_seed{args.seed}_tol{args.ref_tol:g}_max{args.ref_max_iter}"
  path = Path(args.ref_cache) / f"{key}.npz"
  if path.exists():
    with np.load(path) as z:
      print(f"    (reference from {path})", flush=True)
      return {**json.loads(str(z["meta"])), "grad": z["grad"]}
  ref = reference(x, y, blur, args.ref_tol, args.ref_max_iter)
  path.parent.mkdir(parents=True, exist_ok=True)
  meta = json.dumps({k: v for k, v in ref.items() if k != "grad"})
  np.savez(path, grad=ref["grad"], meta=np.asarray(meta))
  return ref


def part_annealed(args) -> dict:
  rows, refs, checks = [], [], []
  for case in CASES:
    x, y = make_clouds(case, args.n, args.n, args.seed)
    diam = float(bounding_box_diameter(jnp.asarray(x), jnp.asarray(y)))
    for blur in args.blurs:
      print(f"[a] {case} blur={blur}: converged reference ...", flush=True)
      ref = cached_reference(args, case, args.n, x, y, blur)
      refs.append({"case": case, "blur": blur, **{k: v for k, v in ref.items() if k != "grad"}})
      print(f"    S_ref={ref['value']:.8g} iterations={ref['iterations']}", flush=True)
      for scaling in args.scalings:
        f32 = annealed(x, y, blur, scaling, jnp.float32, args.repeats)
        with jax.enable_x64(True):
          f64 = annealed(x, y, blur, scaling, jnp.float64, args.repeats)
        row = {
          "case": case,
          "blur": blur,
          "scaling": scaling,
          "diameter": diam,
          "schedule_steps": len(epsilon_schedule(diam, blur, scaling)),
          "annealed_f32": f32["value"],
          "annealed_f64": f64["value"],
          "converged": ref["value"],
          "abs_diff_f32": abs(f32["value"] - ref["value"]),
          "rel_diff_f32": abs(f32["value"] - ref["value"]) / abs(ref["value"]),
          "abs_diff_f64": abs(f64["value"] - ref["value"]),
          "rel_diff_f64": abs(f64["value"] - ref["value"]) / abs(ref["value"]),
          "grad_rel_l2_f32": _rel_l2(f32["grad"], ref["grad"]),
          "grad_rel_l2_f64": _rel_l2(f64["grad"], ref["grad"]),
          "time_annealed_f32_warm_s": f32["warm_s"],
          "time_annealed_f32_compile_s": f32["compile_s"],
          "time_annealed_f64_warm_s": f64["warm_s"],
          "time_converged_s": ref["run_s"],
        }
        rows.append(row)
        print(
          f"    scaling={scaling}: steps={row['schedule_steps']} annealed={f32['value']:.6g}"
          f" rel_diff={row['rel_diff_f32']:.3g} grad_rel={row['grad_rel_l2_f32']:.3g}",
          flush=True,
        )
    if args.check_n:
      xc, yc = make_clouds(case, args.check_n, args.check_n, args.seed + 1)
      blur = max(args.blurs)
      print(f"[a] cross-check {case} n={args.check_n} blur={blur} ...", flush=True)
      ref = cached_reference(args, case, args.check_n, xc, yc, blur)
      with jax.enable_x64(True):
        div = annealed(
          xc, yc, blur, 0.7, jnp.float64, 0, tol=args.ref_tol, max_iter=args.check_max_iter
        )
      checks.append(
        {
          "case": case,
          "n": args.check_n,
          "blur": blur,
          "term_by_term": ref["value"],
          "divergence_tol": div["value"],
          "abs_diff": abs(ref["value"] - div["value"]),
          "grad_rel_l2": _rel_l2(div["grad"], ref["grad"]),
          "time_term_by_term_s": ref["run_s"],
          "time_divergence_tol_s": div["first_run_s"],
        }
      )
      print(f"    {checks[-1]}", flush=True)
  return {"rows": rows, "references": refs, "cross_checks": checks}


def part_warm(args) -> dict:
  rng = np.random.default_rng(args.seed)
  kx, ky = jax.random.split(jax.random.key(args.seed + 7))
  n = args.warm_n
  # "Flower-ish": a flower sample blurred by 0.05·N(0, 1), against an independent flower sample.
  x = np.asarray(flower(kx, n), np.float32) + 0.05 * rng.standard_normal((n, 2), np.float32)
  y = np.asarray(flower(ky, n), np.float32)
  zeros = np.zeros(n, np.float32)
  compiled = {}

  def solve(max_iter, xx, eps, f0, g0):
    args_ = (jnp.asarray(xx), jnp.asarray(y), jnp.float32(eps), jnp.asarray(f0), jnp.asarray(g0))
    if max_iter not in compiled:
      fn = lambda x, y, e, f, g: sinkhorn(
        x, y, epsilon=e, tol=args.warm_tol, max_iter=max_iter, init=(f, g)
      )
      compiled[max_iter] = jax.jit(fn).lower(*args_).compile()
    times, out = [], None
    for _ in range(max(1, args.repeats_warm)):
      out, t = common.timed(lambda: compiled[max_iter](*args_))
      times.append(t)
    return out, float(np.median(times))

  rows = []
  for eps in args.warm_eps:
    max_iter = args.warm_max_iter
    while True:
      print(f"[b] eps={eps}: cold solve, max_iter={max_iter} ...", flush=True)
      cold, t_cold = solve(max_iter, x, eps, zeros, zeros)
      if int(cold.iterations) < max_iter or max_iter >= args.warm_max_iter_cap:
        break
      max_iter = min(10 * max_iter, args.warm_max_iter_cap)
    for delta in args.warm_deltas:
      xp = x + delta * rng.standard_normal(x.shape).astype(np.float32)
      warm, t_warm = solve(max_iter, xp, eps, cold.f, cold.g)
      cold_p, t_cold_p = solve(max_iter, xp, eps, zeros, zeros)
      rows.append(
        {
          "epsilon": eps,
          "delta": delta,
          "max_iter": max_iter,
          "raised_max_iter": max_iter != args.warm_max_iter,
          "cold_iters": int(cold.iterations),
          "cold_s": t_cold,
          "cold_hit_max_iter": int(cold.iterations) >= max_iter,
          "warm_iters": int(warm.iterations),
          "warm_s": t_warm,
          "cold_perturbed_iters": int(cold_p.iterations),
          "cold_perturbed_s": t_cold_p,
          "iters_warm_over_cold": int(warm.iterations) / max(int(cold_p.iterations), 1),
          "time_warm_over_cold": t_warm / t_cold_p,
          "reg_ot_warm": float(warm.reg_ot_cost),
          "reg_ot_cold": float(cold_p.reg_ot_cost),
          "viol_warm": float(warm.marginal_violation),
          "viol_cold": float(cold_p.marginal_violation),
        }
      )
      print(f"    delta={delta}: {rows[-1]}", flush=True)
  return {"rows": rows}


def to_markdown(args, res: dict) -> str:
  out = [
    "# OT accuracy benchmarks",
    "",
    f"`{' '.join(args.argv)}` — jax {jax.__version__}, {jax.default_backend()}, "
    f"{common.env_info()['cpu_count']} CPU cores (shared, timings noisy).",
  ]
  if "annealed" in res:
    a = res["annealed"]
    out += [
      "",
      f"## (a) Annealed (`tol=None`) vs converged, n = m = {args.n}",
      "",
      "Converged: float64, term by term with `sinkhorn(tol="
      f"{args.ref_tol:g})`. Differences are |annealed − converged|; grad: ‖∇ₓ annealed − "
      "∇ₓ converged‖ / ‖∇ₓ converged‖. Times: median warm run of `jit(value_and_grad)`; "
      "t conv: run time of the three float64 solves (value only, compile excluded).",
      "",
      common.markdown_table(
        [
          "case",
          "blur",
          "scaling",
          "steps",
          "annealed f32",
          "converged f64",
          "abs diff",
          "rel diff f32",
          "rel diff f64",
          "grad rel f32",
          "grad rel f64",
          "t ann f32 (s)",
          "t ann f64 (s)",
          "t conv (s)",
        ],
        [
          [
            r["case"],
            r["blur"],
            r["scaling"],
            r["schedule_steps"],
            f"{r['annealed_f32']:.6g}",
            f"{r['converged']:.6g}",
            r["abs_diff_f32"],
            r["rel_diff_f32"],
            r["rel_diff_f64"],
            r["grad_rel_l2_f32"],
            r["grad_rel_l2_f64"],
            r["time_annealed_f32_warm_s"],
            r["time_annealed_f64_warm_s"],
            r["time_converged_s"],
          ]
          for r in a["rows"]
        ],
      ),
      "",
      "Converged references (alternating Sinkhorn iterations per term, float64):",
      "",
      common.markdown_table(
        [
          "case",
          "blur",
          "S converged",
          "Δ vs 10·tol",
          "iters xy",
          "iters xx",
          "iters yy",
          "max viol",
          "hit max_iter",
          "time (s)",
        ],
        [
          [
            r["case"],
            r["blur"],
            f"{r['value']:.8g}",
            r["value_change_10tol_to_tol"],
            r["iterations"]["xy"],
            r["iterations"]["xx"],
            r["iterations"]["yy"],
            max(r["marginal_violation"].values()),
            r["hit_max_iter"],
            r["run_s"],
          ]
          for r in a["references"]
        ],
      ),
    ]
    if a["cross_checks"]:
      out += [
        "",
        "Cross-check: term-by-term reference vs `sinkhorn_divergence(tol="
        f"{args.ref_tol:g}, max_iter={args.check_max_iter})`, float64, scaling 0.7:",
        "",
        common.markdown_table(
          [
            "case",
            "n",
            "blur",
            "term by term",
            "divergence tol",
            "abs diff",
            "grad rel",
            "t terms",
            "t div",
          ],
          [
            [
              c["case"],
              c["n"],
              c["blur"],
              f"{c['term_by_term']:.10g}",
              f"{c['divergence_tol']:.10g}",
              c["abs_diff"],
              c["grad_rel_l2"],
              c["time_term_by_term_s"],
              c["time_divergence_tol_s"],
            ]
            for c in a["cross_checks"]
          ],
        ),
      ]
  if "warm" in res:
    out += [
      "",
      f"## (b) Warm start of `sinkhorn(tol={args.warm_tol:g})`, n = m = {args.warm_n}, float32",
      "",
      "Cold: from zero potentials. Then x += δ·N(0, 1): warm from the cold solution's (f, g), "
      "and cold again. Ratios are warm / cold on the perturbed problem.",
      "",
      common.markdown_table(
        [
          "ε",
          "δ",
          "max_iter",
          "cold iters",
          "cold (s)",
          "warm iters",
          "warm (s)",
          "cold pert. iters",
          "cold pert. (s)",
          "iters warm/cold",
          "time warm/cold",
          "|ΔOT| warm vs cold",
        ],
        [
          [
            r["epsilon"],
            r["delta"],
            r["max_iter"],
            r["cold_iters"],
            r["cold_s"],
            r["warm_iters"],
            r["warm_s"],
            r["cold_perturbed_iters"],
            r["cold_perturbed_s"],
            r["iters_warm_over_cold"],
            r["time_warm_over_cold"],
            abs(r["reg_ot_warm"] - r["reg_ot_cold"]),
          ]
          for r in res["warm"]["rows"]
        ],
      ),
    ]
  return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="benchmarks/results", help="output directory")
  p.add_argument("--parts", default="annealed,warm", help="comma list of annealed, warm")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--n", type=int, default=3000, help="points per cloud in part (a)")
  p.add_argument("--blurs", type=_floats, default=[0.05, 0.1])
  p.add_argument("--scalings", type=_floats, default=[0.5, 0.7, 0.9])
  p.add_argument("--repeats", type=int, default=3, help="warm repeats of the annealed runs")
  p.add_argument("--ref_tol", type=float, default=1e-4)
  p.add_argument("--ref_max_iter", type=int, default=200_000)
  p.add_argument("--ref_cache", default="", help="directory caching references (resumable)")
  p.add_argument("--check_n", type=int, default=500, help="cross-check size; 0 skips it")
  p.add_argument("--check_max_iter", type=int, default=200_000)
  p.add_argument("--warm_n", type=int, default=2000)
  p.add_argument("--warm_eps", type=_floats, default=[0.01, 0.0025])
  p.add_argument("--warm_deltas", type=_floats, default=[1e-2, 1e-3])
  p.add_argument("--warm_tol", type=float, default=1e-3)
  p.add_argument("--warm_max_iter", type=int, default=2000)
  p.add_argument("--warm_max_iter_cap", type=int, default=20_000)
  p.add_argument("--repeats_warm", type=int, default=1, help="timed runs per warm-start solve")
  args = p.parse_args(argv)
  args.argv = ["python -m benchmarks.ot_accuracy", *(argv if argv is not None else [])]
  parts = {s.strip() for s in args.parts.split(",")}

  env = common.env_info()
  t0 = time.perf_counter()
  res: dict = {}
  if "annealed" in parts:
    res["annealed"] = part_annealed(args)
  if "warm" in parts:
    res["warm"] = part_warm(args)
  payload = {
    "config": {k: v for k, v in vars(args).items() if k != "argv"},
    "command": " ".join(args.argv),
    "env": env,
    "total_s": time.perf_counter() - t0,
    **res,
  }
  common.write_outputs(args.out, "ot_accuracy", payload, to_markdown(args, res))
  return payload


if __name__ == "__main__":
  import sys

  main(sys.argv[1:])
