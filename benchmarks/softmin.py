"""Softmin throughput against this machine's exp throughput, measured in the same run.

A softmin pair is one ``exp`` plus a few multiply-adds, so a fused ``exp`` + sum over a large
float32 array (``exp_sum``) is the practical ceiling; a plain ``exp`` map (``exp_map``) is
memory-bound. Rates: median of ``--repeats`` warm runs, and each one's fraction of ``exp_sum``.

  python -m benchmarks.softmin --sizes 512 --repeats 1 --out /tmp/b
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks import harness
from gsae_jax.ot import softmin


def _rate(fn, args, count: float, repeats: int) -> dict:
  t = harness.time_fn(fn, *args, repeats=repeats)
  return {"seconds": t.seconds, "compile_s": t.compile_s, "per_s": count / t.seconds}


def run(args) -> dict:
  """The exp ceiling, then both softmin kernels at each size: the payload."""
  env, rows = harness.env_info(), []
  n_exp = 1 << args.exp_log2
  a = jax.random.uniform(jax.random.key(0), (n_exp,), jnp.float32, -5.0, 0.0)
  for kernel, fn in (("exp_map", jnp.exp), ("exp_sum", lambda a: jnp.sum(jnp.exp(a)))):
    rows.append({"kernel": kernel, "size": n_exp, **_rate(fn, (a,), n_exp, args.repeats)})
  ceiling = rows[-1]["per_s"]
  for n in args.sizes:
    x, y = harness.clouds(n, args.d, "standard_normal", "standard_normal", seed=n)
    h = harness.sample("standard_normal", jax.random.key(n + 1), n, 1)[:, 0]
    eps = jnp.float32(0.01)
    fwd = lambda x, y, h, e: softmin(x, y, h, e)
    bwd = jax.grad(lambda x, y, h, e: jnp.sum(softmin(x, y, h, e)), argnums=(0, 1, 2))
    for name, fn in (("softmin_forward", fwd), ("softmin_forward+backward", bwd)):
      r = _rate(fn, (x, y, h, eps), float(n) * n, args.repeats)
      rows.append({"kernel": name, "size": n, "d": args.d, **r})
  for r in rows:
    r["fraction_of_exp_sum"] = r["per_s"] / ceiling
  return {"env": env, "args": vars(args), "rows": rows}


def markdown(payload: dict) -> str:
  """Table of rates; softmin rows in pair evaluations per second."""
  head = (
    "Rates in G elements/s (exp) or G pair evaluations/s (softmin; forward+backward counts the "
    "n·m pairs once, though the backward recomputes each block). Load average at start "
    f"{payload['env']['load_avg_1m_at_start']:.2f} on {payload['env']['cpu_count']} CPUs.\n\n"
  )
  rate = ("G/s", lambda r: r["per_s"] / 1e9)
  columns = ["kernel, size, seconds", rate, "fraction of exp_sum=fraction_of_exp_sum"]
  return head + harness.table(columns, payload["rows"])


def main(argv: list[str] | None = None) -> dict:
  p = harness.parser(__doc__, sizes=[4096, 16384], d=2)
  harness.flags(p, exp_log2=(26, "exp benchmark over 2^k floats"), repeats=5)
  args = harness.parse(p, argv)
  return harness.save(args.out, "softmin", run(args), markdown)


if __name__ == "__main__":
  main()
