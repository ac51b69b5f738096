"""Softmin throughput against this machine's exp throughput, measured in the same run.

One *pair* of the softmin ``f_i = −ε log Σ_j exp(h_j + ⟨x_i, y_j⟩/ε)`` is one ``exp`` plus a few
multiply-adds and a running max/sum, so the rate of a fused ``exp`` + sum over a large float32
array (``exp_sum``) is the practical ceiling; a plain elementwise ``exp`` that writes its output
(``exp_map``) is memory-bound and shown for reference. Reported: pairs (or elements) per second,
the median of ``--repeats`` warm runs, and each softmin's fraction of the ``exp_sum`` rate.

  python -m benchmarks.softmin                       # n = m ∈ {4096, 16384}, d = 2
  python -m benchmarks.softmin --sizes 512 --repeats 1 --out /tmp/b

Writes ``softmin.json`` and ``softmin.md`` under ``--out``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from gsae_jax.ot import softmin


def _rate(fn, args, count: float, repeats: int) -> dict:
  r = common.compile_and_time(fn, *args, repeats=repeats)
  t = r["warm_s"] if r["warm_s"] is not None else r["first_run_s"]
  return {"seconds": t, "compile_s": r["compile_s"], "per_s": count / t}


def run(args) -> dict:
  rows = []
  n_exp = 1 << args.exp_log2
  a = jnp.asarray(np.random.default_rng(0).uniform(-5, 0, n_exp), jnp.float32)
  exp_map = _rate(jnp.exp, (a,), n_exp, args.repeats)
  exp_sum = _rate(lambda a: jnp.sum(jnp.exp(a)), (a,), n_exp, args.repeats)
  rows.append({"kernel": "exp_map", "size": n_exp, **exp_map})
  rows.append({"kernel": "exp_sum", "size": n_exp, **exp_sum})
  for n in args.sizes:
    rng = np.random.default_rng(n)
    x = jnp.asarray(rng.normal(size=(n, args.d)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(n, args.d)), jnp.float32)
    h = jnp.asarray(rng.normal(size=n), jnp.float32)
    eps = jnp.float32(0.01)
    fwd = lambda x, y, h, e: softmin(x, y, h, e)
    bwd = jax.grad(lambda x, y, h, e: jnp.sum(softmin(x, y, h, e)), argnums=(0, 1, 2))
    for name, fn in (("softmin_forward", fwd), ("softmin_forward+backward", bwd)):
      r = _rate(fn, (x, y, h, eps), float(n) * n, args.repeats)
      rows.append({"kernel": name, "size": n, "d": args.d, **r})
  for r in rows:
    r["fraction_of_exp_sum"] = r["per_s"] / exp_sum["per_s"]
  return {"env": common.env_info(), "args": vars(args), "rows": rows}


def markdown(payload: dict) -> str:
  """Table of rates; softmin rows in pair evaluations per second."""
  head = (
    "Rates in G elements/s (exp) or G pair evaluations/s (softmin; forward+backward counts the "
    "n·m pairs once, though the backward recomputes each block). Load average at start "
    f"{payload['env']['load_avg_1m_at_start']:.2f} on {payload['env']['cpu_count']} CPUs.\n\n"
  )
  return head + common.markdown_table(
    ["kernel", "size", "seconds", "G/s", "fraction of exp_sum"],
    [
      [r["kernel"], r["size"], r["seconds"], r["per_s"] / 1e9, r["fraction_of_exp_sum"]]
      for r in payload["rows"]
    ],
  )


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
  p.add_argument("--d", type=int, default=2)
  p.add_argument("--exp_log2", type=int, default=26, help="exp benchmark over 2^k floats")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default="benchmarks/results")
  args = p.parse_args(argv)
  payload = run(args)
  common.write_outputs(args.out, "softmin", payload, markdown(payload))
  return payload


if __name__ == "__main__":
  main()
