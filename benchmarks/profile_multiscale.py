"""Where a multiscale divergence's time goes: XLA thunk time per named scope of the backend.

One warm value + gradient solve (flower vs ``--target``, d = 2, blur 0.05, scaling 0.7) is
traced with ``jax.profiler``; each thunk's exclusive time (its duration less that of the
thunks nested in it, per thread) goes to the backend's named scopes in its HLO op's metadata
(``coarse/grid<K>``, ``jump``, ``fine``, ``extrapolate``, each with its ``select_tiles``);
thunks of no scope inherit their enclosing thunk's, the rest is ``other`` (layout, clustering,
the gradient's scatter). Times are summed over threads, so compare shares, not seconds.

  python -m benchmarks.profile_multiscale --n 60000 --target gauss --coarse accurate
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile
import time

from benchmarks import harness
from gsae_jax.ot import COARSE_GRIDS

# Path components of an op's name that are the backend's named scopes (multiscale_divergence).
_SCOPE = re.compile(r"^(coarse|grid\d+|jump|fine|extrapolate|select_tiles)$")
_OP_NAME = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"')


def op_scopes(hlo_text: str) -> dict[str, str]:
  """``{HLO instruction name: "scope/…" path}`` from a compiled module's text (``"other"``
  where its op name holds none of the backend's scopes)."""
  out = {}
  for line in hlo_text.splitlines():
    m = _OP_NAME.match(line)
    if m:
      parts = [p for p in m.group(2).split("/") if _SCOPE.match(p)]
      out[m.group(1)] = "/".join(parts) or "other"
  return out


def scope_times(events: list[dict], scopes: dict[str, str]) -> dict[str, float]:
  """Exclusive seconds per scope of the trace's XLA thunk events (``args.hlo_op``), nested
  per thread by their time intervals."""
  by_thread = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and "hlo_op" in e.get("args", {}):
      by_thread[(e["pid"], e["tid"])].append(e)
  if not by_thread:
    raise RuntimeError("the profiler trace holds no XLA thunk events (args.hlo_op)")
  total = collections.Counter()
  for events_t in by_thread.values():
    events_t.sort(key=lambda e: (e["ts"], -e["dur"]))
    stack, child, scope = [], collections.Counter(), {}
    for i, e in enumerate(events_t):
      while stack and events_t[stack[-1]]["ts"] + events_t[stack[-1]]["dur"] <= e["ts"]:
        stack.pop()
      s = scopes.get(e["args"]["hlo_op"], "other")
      if stack:
        child[stack[-1]] += e["dur"]
        s = scope[stack[-1]] if s == "other" else s
      scope[i] = s
      stack.append(i)
    for i, e in enumerate(events_t):
      total[scope[i]] += (e["dur"] - child[i]) * 1e-6  # µs → s
  return dict(total)


def measure(n: int, target: str, coarse: str, seed: int) -> dict:
  """Value, warm time and per-scope thunk seconds of one traced solve."""
  import jax

  from gsae_jax.ot import solve_divergence

  x, y = harness.clouds(n, 2, "flower", target, seed)
  kw = dict(blur=0.05, scaling=0.7, backend="multiscale", coarse=coarse)
  vg = jax.value_and_grad(lambda x: solve_divergence(x, y, **kw).value)
  harness.log(f"compiling and running n = {n}, {target}, {coarse}")
  fn = jax.jit(vg).lower(x).compile()  # one compilation: the traced program and its HLO text
  jax.block_until_ready(fn(x))
  start = time.perf_counter()
  value, _ = jax.block_until_ready(fn(x))
  warm = time.perf_counter() - start
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp, create_perfetto_trace=True)
    jax.block_until_ready(fn(x))
    jax.profiler.stop_trace()
    (path,) = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)
    with gzip.open(path) as f:
      events = json.load(f)["traceEvents"]
  times = scope_times(events, op_scopes(fn.as_text()))
  total = sum(times.values())
  rows = [
    {"scope": s, "seconds": t, "share": t / total}
    for s, t in sorted(times.items(), key=lambda kv: -kv[1])
  ]
  return {"value": float(value), "warm_s": warm, "thunk_s": total, "rows": rows}


def markdown(payload: dict) -> str:
  a = payload["args"]
  return (
    f"# Multiscale solve by named scope: flower vs {a['target']}, n = {a['n']}, "
    f"coarse={a['coarse']}\n\n`{payload['command']}`: value + gradient, float32, blur 0.05, "
    f"scaling 0.7; one warm run {payload['warm_s']:.2f} s, value {payload['value']:.7g}; "
    f"thunk time {payload['thunk_s']:.2f} s summed over threads (load "
    f"{payload['env']['load_avg_1m_at_start']:.2f} at the start).\n\n"
    + harness.table(["scope, seconds:.3f, share:.3f"], payload["rows"])
  )


def main(argv=None) -> dict:
  p = harness.parser(__doc__, n=60000, target=("gauss", None, ("flower", "gauss")))
  harness.flags(p, coarse=("accurate", None, COARSE_GRIDS), seed=0)
  args = harness.parse(p, argv, "profile_multiscale")
  payload = {"env": harness.env_info(), "args": vars(args)}
  payload["command"] = harness.command("profile_multiscale", argv)
  payload |= measure(args.n, args.target, args.coarse, args.seed)
  return harness.save(args.out, args.name, payload, markdown)


if __name__ == "__main__":
  main()
