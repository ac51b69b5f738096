"""The benchmark scripts run on a tiny size and write well-formed JSON and markdown."""

import json

from benchmarks import train_step


def test_train_step_benchmark_tiny(tmp_path):
  train_step.main(["--n", "200", "--variants", "local", "--steps", "1", "--out", str(tmp_path)])
  rows = json.loads((tmp_path / "train_step.json").read_text())["rows"]
  assert [r["variant"] for r in rows] == ["local"] and rows[0]["n"] == 200
  assert rows[0]["steps_per_s"] > 0 and rows[0]["peak_rss_mb"] > 0
  assert (tmp_path / "train_step.md").read_text().startswith("| variant | n |")


def test_ab_compare_pairs_runs_and_takes_medians(tmp_path):
  from benchmarks import ab_compare

  def run(name, t_ours, value, first_only=False):
    rows = [
      {
        "d": 2,
        "n": 10,
        "method": "ours",
        "status": "ok",
        "value": value,
        "load_avg_1m": 1.0,
        "warm_s": None if first_only else t_ours,
        "first_run_s": t_ours,
      },
      {"d": 2, "n": 10, "method": "other", "status": "failed: x", "value": None},
    ]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"rows": rows}))
    return str(path)

  a = [run("a1", 2.0, 1.0), run("a2", 4.0, 1.0), run("a3", 3.0, 1.0)]
  b = [run("b1", 1.0, 1.5), run("b2", 3.0, 1.5), run("b3", 1.5, 1.5, first_only=True)]
  payload = ab_compare.main(["--a", *a, "--b", *b, "--out", str(tmp_path), "--name", "ab"])
  (row,) = payload["rows"]  # the failed method is left out
  assert row["a_s"] == 3.0 and row["b_s"] == 1.5 and row["ratio"] == 0.5
  assert (row["pair_ratio_min"], row["pair_ratio_max"]) == (0.5, 0.75)
  assert row["value_rel_diff"] == 0.5
  assert (
    "| 2 | 10 | ours | 3 | 1.5 | 0.500 | 0.500–0.750 | 0.5 |" in (tmp_path / "ab.md").read_text()
  )
