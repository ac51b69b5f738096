"""The benchmark scripts run on a tiny size and write well-formed JSON and markdown."""

import json

from benchmarks import train_step


def test_train_step_benchmark_tiny(tmp_path):
  train_step.main(["--n", "200", "--variants", "local", "--steps", "1", "--out", str(tmp_path)])
  rows = json.loads((tmp_path / "train_step.json").read_text())["rows"]
  assert [r["variant"] for r in rows] == ["local"] and rows[0]["n"] == 200
  assert rows[0]["steps_per_s"] > 0 and rows[0]["peak_rss_mb"] > 0
  assert (tmp_path / "train_step.md").read_text().startswith("| variant | n |")
