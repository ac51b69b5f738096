"""The peer and softmin benchmarks run at a tiny size and write well-formed output.

Torch, GeomLoss and KeOps are not in the default test install: their rows must then read
"skipped: ... not installed" and the rest of the benchmark must still run.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from benchmarks import sinkhorn, softmin

_HAVE_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "geomloss"))
_RESULTS = Path(__file__).parents[1] / "benchmarks" / "results"


@pytest.mark.slow
def test_sinkhorn_benchmark_tiny(tmp_path):
  methods = ["ours", "ours_tol", "ott_dense", "geomloss_tensorized"]
  payload = sinkhorn.main(
    ["--sizes", "120", "--dims", "2", "--methods", *methods, "--blur", "0.1"]
    + ["--repeats", "1", "--out", str(tmp_path)]
  )
  saved = json.loads((tmp_path / "sinkhorn.json").read_text())
  assert saved == json.loads(json.dumps(payload))
  rows = {r["method"]: r for r in saved["rows"]}
  assert list(rows) == methods and rows["ours"]["ref_value"] > 0
  # Converged solvers agree with the independent float64 reference (the alternating fixed-ε
  # solver, term by term, to marginal violation 1e-5) to their tolerance 1e-3: rtol 2e-3 on
  # the value. The annealed paper setting (scaling 0.7, no convergence test) is further off.
  assert rows["ours_tol"]["value_rel_err"] < 2e-3
  assert rows["ott_dense"]["value_rel_err"] < 2e-3
  assert rows["ours"]["value_rel_err"] < 0.2
  ours = rows["ours"]
  assert ours["grad_finite"] and ours["peak_rss_mb"] >= ours["vm_hwm_before_mb"] > 50
  assert ours["compile_s"] > 0 and ours["warm_s"] > 0 and len(ours["warm_runs_s"]) == 1
  gl = rows["geomloss_tensorized"]
  if _HAVE_TORCH:
    # GeomLoss runs the same annealed schedule: the same value to float32 rounding, whatever
    # its distance to the converged reference.
    assert gl["status"] == "ok" and gl["value_rel_diff_ours"] < 1e-5
    assert gl["value_rel_err"] == pytest.approx(ours["value_rel_err"], rel=1e-3)
  else:
    assert gl["status"].startswith("skipped:") and "not installed" in gl["status"]
  md = (tmp_path / "sinkhorn.md").read_text()
  assert "| d | n | method | time (s) |" in md and "| 2 | 120 | ours | " in md
  assert "- d = 2, n = 120: reference S = " in md


@pytest.mark.slow
def test_sinkhorn_benchmark_fixed_epsilon_rows(tmp_path):
  # The fixed-ε rows: the multiscale solver against the dense one after the same 30 update
  # pairs (the truncation, e^-10 of each row's mass, is all that separates them).
  methods = ["ours_fixed", "ours_fixed_multiscale"]
  payload = sinkhorn.main(
    ["--sizes", "300", "--dims", "2", "--methods", *methods, "--blur", "0.1"]
    + ["--fixed_iters", "30", "--ref_max_n", "0", "--repeats", "1", "--out", str(tmp_path)]
  )
  rows = {r["method"]: r for r in payload["rows"]}
  assert [r["status"] for r in rows.values()] == ["ok", "ok"]
  dense, multi = rows["ours_fixed"], rows["ours_fixed_multiscale"]
  assert dense["value"] > 0 and dense["grad_finite"] and "value_rel_err" not in multi
  assert multi["value_rel_diff_ours"] < 1e-4 and multi["grad_rel_diff_ours"] < 1e-3
  md = (tmp_path / "sinkhorn.md").read_text()
  assert "`ours_fixed*`: OT_ε(x, y) at ε = blur² after 30 update pairs" in md
  assert "| 2 | 300 | ours_fixed | " in md and "| 1.00× |" in md


@pytest.mark.slow
def test_sinkhorn_skip_rules_and_append(tmp_path):
  # Dense peers and slow converged solves are skipped with a reason, not silently dropped;
  # --append merges those rows into a recorded result file.
  shutil.copy(_RESULTS / "sinkhorn.json", tmp_path / "sinkhorn.json")
  old = json.loads((tmp_path / "sinkhorn.json").read_text())
  payload = sinkhorn.main(
    ["--sizes", "100000", "--dims", "2", "--methods", "ott_dense", "ours_tol", "--append"]
    + ["--out", str(tmp_path), "--ref_max_n", "0", "--dense_limit_gb", "1"]
  )
  rows = {(r["n"], r["method"]): r["status"] for r in payload["rows"]}
  assert rows[100000, "ott_dense"].startswith("skipped: 3 dense 100000×100000")
  assert rows[100000, "ours_tol"].startswith("skipped: too slow")
  assert [r for r in payload["rows"] if r["n"] != 100000] == old["rows"]
  assert len(payload["runs"]) == len(old["runs"]) + 1
  assert payload["runs"][-1]["args"]["append"] and payload["args"]["sizes"] == [100000]
  # Re-rendering the merged file from JSON gives the same markdown.
  md = (tmp_path / "sinkhorn.md").read_text()
  assert "| 2 | 100000 | ott_dense | – |" in md
  sinkhorn.main(["--render_only", "--out", str(tmp_path)])
  assert (tmp_path / "sinkhorn.md").read_text() == md


def test_sinkhorn_render_only_reproduces_the_recorded_table(tmp_path):
  shutil.copy(_RESULTS / "sinkhorn.json", tmp_path / "sinkhorn.json")
  sinkhorn.main(["--render_only", "--out", str(tmp_path)])
  assert (tmp_path / "sinkhorn.md").read_text() == (_RESULTS / "sinkhorn.md").read_text()


def test_softmin_benchmark_tiny(tmp_path):
  softmin.main(
    ["--sizes", "256", "--d", "2", "--exp_log2", "14", "--repeats", "1", "--out", str(tmp_path)]
  )
  rows = json.loads((tmp_path / "softmin.json").read_text())["rows"]
  kernels = [r["kernel"] for r in rows]
  assert kernels == ["exp_map", "exp_sum", "softmin_forward", "softmin_forward+backward"]
  # Each rate is its count over its time: elements for exp, n·m pairs for softmin ...
  for r in rows:
    count = r["size"] if r["kernel"].startswith("exp") else r["size"] ** 2
    assert r["seconds"] > 0 and r["per_s"] == pytest.approx(count / r["seconds"])
  # ... and each fraction is its rate over exp_sum's (same size for exp_map: a time ratio).
  exp_map, exp_sum, fwd, _ = rows
  assert exp_map["fraction_of_exp_sum"] == pytest.approx(exp_sum["seconds"] / exp_map["seconds"])
  assert fwd["fraction_of_exp_sum"] == pytest.approx(fwd["per_s"] / exp_sum["per_s"])
  md = (tmp_path / "softmin.md").read_text()
  assert md.count("\n| softmin_") == 2
  assert f"| {fwd['fraction_of_exp_sum']:.4g} |" in md
