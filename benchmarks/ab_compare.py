"""A/B table of two sets of ``benchmarks.sinkhorn`` runs (e.g. before and after a change).

Each side: one or more result JSONs of ``benchmarks.sinkhorn`` made in alternation (A B A B …),
rows matched on ``(d, n, method)``. Per row: the median over a side's runs of each run's time
(:func:`benchmarks.harness.seconds`), the ratio B / A, the range of the per-run ratios (run k
of A against run k of B, when both ran equally often), and the difference of the values.

  python -m benchmarks.ab_compare --a /tmp/ab_old/r1.json /tmp/ab_old/r2.json \\
      --b /tmp/ab_new/r1.json /tmp/ab_new/r2.json --label_a before --label_b after \\
      --out benchmarks/results --name sinkhorn_ab_issue14
"""

from __future__ import annotations

import argparse
from statistics import median

from benchmarks import harness


def compare(a_paths: list[str], b_paths: list[str]) -> list[dict]:
  """One dict per ``(d, n, method)`` row that ran in every run of both sides."""
  runs = [{(r["d"], r["n"], r["method"]): r for r in harness.load(p)["rows"]} for p in a_paths]
  runs += [{(r["d"], r["n"], r["method"]): r for r in harness.load(p)["rows"]} for p in b_paths]
  a_runs, b_runs = runs[: len(a_paths)], runs[len(a_paths) :]
  out = []
  for key in sorted(set.intersection(*map(set, runs))):
    ta, tb = ([harness.seconds(r[key]) for r in side] for side in (a_runs, b_runs))
    if None in ta + tb:
      continue
    pairs = [b / a for a, b in zip(ta, tb, strict=True)] if len(ta) == len(tb) else []
    va, vb = a_runs[0][key]["value"], b_runs[0][key]["value"]
    row = {"d": key[0], "n": key[1], "method": key[2], "a_s": median(ta), "b_s": median(tb)}
    row["ratio"] = median(tb) / median(ta)
    row |= {"pair_ratio_min": min(pairs, default=None), "pair_ratio_max": max(pairs, default=None)}
    row |= {"a_runs_s": ta, "b_runs_s": tb, "value_a": va, "value_b": vb}
    row["value_rel_diff"] = abs(vb - va) / max(abs(va), 1e-30)
    for side, side_runs in (("a", a_runs), ("b", b_runs)):
      row[f"load_{side}"] = [r[key].get("load_avg_1m") for r in side_runs]
    out.append(row)
  return out


def markdown(payload: dict) -> str:
  """The A/B table under the note (``--note``, or one naming the sides)."""
  a = payload["args"]
  ratios = lambda r: (
    None if r["pair_ratio_min"] is None else f"{r['pair_ratio_min']:.3f}–{r['pair_ratio_max']:.3f}"
  )
  columns = [
    ("d", "d"),
    ("n", "n"),
    ("method", "method"),
    (f"{a['label_a']} (s)", "a_s"),
    (f"{a['label_b']} (s)", "b_s"),
    (f"{a['label_b']} / {a['label_a']}", "ratio", ".3f"),
    ("pair ratios", ratios),
    ("value rel. diff", "value_rel_diff"),
  ]
  note = a["note"] or (
    f"A/B of `benchmarks.sinkhorn` runs: {a['label_a']} = {len(a['a'])} run(s), "
    f"{a['label_b']} = {len(a['b'])} run(s), made in alternation. Times: median over runs of "
    "each run's time (warm median, or the first run when it had none)."
  )
  return f"{note}\n\n{harness.table(columns, payload['rows'])}\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--a", nargs="+", required=True, help="result JSONs of side A")
  p.add_argument("--b", nargs="+", required=True, help="result JSONs of side B")
  harness.flags(p, label_a="A", label_b="B")
  p.add_argument("--note", default="", help="a line above the table (what A and B are)")
  args = harness.parse(p, argv, "sinkhorn_ab")
  rows = compare(args.a, args.b)
  if not rows:
    raise SystemExit("no (d, n, method) row ran successfully in every run of both sides")
  return harness.save(args.out, args.name, {"args": vars(args), "rows": rows}, markdown)


if __name__ == "__main__":
  main()
