"""A/B table of two sets of ``benchmarks.sinkhorn`` runs (e.g. before and after a change).

Each side is one or more result JSONs of ``python -m benchmarks.sinkhorn`` made in alternation
(A B A B …, so drift in the machine's speed hits both); rows are matched on ``(d, n, method)``.
Per row: the median over that side's runs of each run's time (its warm median, or its single
first run when it had no warm runs), the ratio B / A of those medians, the range of the per-run
ratios when both sides ran equally often (run k of A paired with run k of B), and the
difference of the values (a change that should not move numbers must show ~0 there).

  python -m benchmarks.ab_compare --a /tmp/ab_old/r1.json /tmp/ab_old/r2.json \\
      --b /tmp/ab_new/r1.json /tmp/ab_new/r2.json --label_a before --label_b after \\
      --out benchmarks/results --name sinkhorn_ab_issue14

Writes ``<name>.json`` and ``<name>.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks import harness


def _rows(paths: list[str]) -> list[dict[tuple, dict]]:
  load = lambda p: json.loads(Path(p).read_text())["rows"]
  return [{(r["d"], r["n"], r["method"]): r for r in load(p)} for p in paths]


def compare(a_paths: list[str], b_paths: list[str]) -> list[dict]:
  """One dict per ``(d, n, method)`` row that ran in every run of both sides."""
  a_runs, b_runs = _rows(a_paths), _rows(b_paths)
  keys = sorted(set.intersection(*(set(r) for r in a_runs + b_runs)))
  out = []
  for key in keys:
    ta = [harness.seconds(r[key]) for r in a_runs]
    tb = [harness.seconds(r[key]) for r in b_runs]
    if any(t is None for t in ta + tb):
      continue
    pair_ratios = [b / a for a, b in zip(ta, tb, strict=True)] if len(ta) == len(tb) else []
    va, vb = a_runs[0][key]["value"], b_runs[0][key]["value"]
    out.append(
      {
        "d": key[0],
        "n": key[1],
        "method": key[2],
        "a_s": statistics.median(ta),
        "b_s": statistics.median(tb),
        "ratio": statistics.median(tb) / statistics.median(ta),
        "pair_ratio_min": min(pair_ratios) if pair_ratios else None,
        "pair_ratio_max": max(pair_ratios) if pair_ratios else None,
        "a_runs_s": ta,
        "b_runs_s": tb,
        "value_a": va,
        "value_b": vb,
        "value_rel_diff": abs(vb - va) / max(abs(va), 1e-30),
        "load_a": [r[key].get("load_avg_1m") for r in a_runs],
        "load_b": [r[key].get("load_avg_1m") for r in b_runs],
      }
    )
  return out


def markdown(rows: list[dict], label_a: str, label_b: str, note: str) -> str:
  """The A/B table under ``note``."""
  pairs = lambda r: (
    None if r["pair_ratio_min"] is None else f"{r['pair_ratio_min']:.3f}–{r['pair_ratio_max']:.3f}"
  )
  columns = [
    ("d", "d"),
    ("n", "n"),
    ("method", "method"),
    (f"{label_a} (s)", "a_s"),
    (f"{label_b} (s)", "b_s"),
    (f"{label_b} / {label_a}", "ratio", ".3f"),
    ("pair ratios", pairs),
    ("value rel. diff", "value_rel_diff"),
  ]
  return f"{note}\n\n{harness.table(columns, rows)}\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--a", nargs="+", required=True, help="result JSONs of side A")
  p.add_argument("--b", nargs="+", required=True, help="result JSONs of side B")
  p.add_argument("--label_a", default="A")
  p.add_argument("--label_b", default="B")
  p.add_argument("--note", default="", help="a line above the table (what A and B are)")
  args = harness.parse(p, argv, "sinkhorn_ab")
  rows = compare(args.a, args.b)
  if not rows:
    raise SystemExit("no (d, n, method) row ran successfully in every run of both sides")
  note = args.note or (
    f"A/B of `benchmarks.sinkhorn` runs: {args.label_a} = {len(args.a)} run(s), "
    f"{args.label_b} = {len(args.b)} run(s), made in alternation. Times: median over runs of "
    "each run's time (warm median, or the first run when it had none)."
  )
  payload = {"args": vars(args), "rows": rows}
  harness.write(args.out, args.name, payload, markdown(rows, args.label_a, args.label_b, note))
  return payload


if __name__ == "__main__":
  main()
