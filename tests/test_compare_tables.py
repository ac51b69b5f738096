"""compare_sweeps / experiments.compare_tables against numpy on hand-made results.json files."""

import json
import subprocess
import sys

import numpy as np
import pytest

from gsae_jax.metrics import METRIC_NAMES
from gsae_jax.training.tables import compare_sweeps, comparison_markdown


def _write(d, values, variant="full_global", lam=0.1, failed_seed=None):
  """results.json with one run per seed; metric m of seed s is values[s] + index(m)."""
  runs = []
  for s, v in enumerate(values):
    metrics = {m: v + i for i, m in enumerate(METRIC_NAMES)}
    failed = s == failed_seed
    runs.append(
      dict(
        variant=variant,
        seed=s,
        lam=lam,
        name=f"mlp_{variant}_seed{s}",
        metrics=None if failed else metrics,
        error="FloatingPointError: non-finite loss" if failed else None,
      )
    )
  d.mkdir(parents=True)
  (d / "results.json").write_text(json.dumps({"runs": runs}))
  return d


def test_compare_sweeps_matches_numpy(tmp_path):
  a_vals, b_vals = [0.10, 0.14, 0.12], [0.11, 0.13, 0.20]
  a = _write(tmp_path / "a", a_vals)
  b = _write(tmp_path / "b", b_vals)
  rows = compare_sweeps(a, b)
  assert len(rows) == len(METRIC_NAMES)
  r = rows[0]
  assert r["seeds"] == [0, 1, 2]
  np.testing.assert_allclose(r["mean_a"], np.mean(a_vals), rtol=1e-12)
  np.testing.assert_allclose(r["std_b"], np.std(b_vals, ddof=1), rtol=1e-12)
  np.testing.assert_allclose(r["delta"], np.mean(b_vals) - np.mean(a_vals), rtol=1e-12)
  diffs = np.subtract(b_vals, a_vals)
  np.testing.assert_allclose(r["paired_std"], np.std(diffs, ddof=1), rtol=1e-12)
  # Δ = 0.06 / 3 = 0.02; std_a = 0.02, std_b ≈ 0.0473: within.
  np.testing.assert_allclose(r["spread"], np.std(b_vals, ddof=1), rtol=1e-12)
  assert r["within"]
  # Shifting b by more than its spread fails the check.
  c = _write(tmp_path / "c", [v + 0.2 for v in b_vals])
  assert not any(r["within"] for r in compare_sweeps(a, c))


def test_compare_sweeps_uses_seeds_finished_in_both(tmp_path):
  a = _write(tmp_path / "a", [0.1, 0.2, 0.3])
  b = _write(tmp_path / "b", [0.1, 0.2, 0.9], failed_seed=2)
  r = compare_sweeps(a, b)[0]
  assert r["seeds"] == [0, 1]
  np.testing.assert_allclose(r["mean_a"], 0.15, rtol=1e-12)
  table = comparison_markdown(compare_sweeps(a, b), "dense", "multiscale")
  assert "| full_global (λ=0.1) | global_ot_loss | 0,1 | 0.15 ± 0.071 | 0.15 ± 0.071 |" in table


def test_compare_sweeps_refuses_missing_or_disjoint(tmp_path):
  a = _write(tmp_path / "a", [0.1])
  with pytest.raises(FileNotFoundError, match="results.json"):
    compare_sweeps(a, tmp_path / "nothing")
  b = _write(tmp_path / "b", [0.1], variant="minibatch_global")
  with pytest.raises(ValueError, match="no finished"):
    compare_sweeps(a, b)


@pytest.mark.slow
def test_compare_tables_entry_point(tmp_path):
  a = _write(tmp_path / "a", [0.10, 0.14, 0.12])
  b = _write(tmp_path / "b", [0.11, 0.13, 0.20])
  out = tmp_path / "cmp"
  cmd = [sys.executable, "-m", "experiments.compare_tables", f"--a={a}", f"--b={b}"]
  cmd += ["--labels=dense,multiscale", f"--out={out}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr
  assert "5 of 5 (variant, metric) pairs within the seed spread." in proc.stdout
  saved = json.loads((out / "comparison.json").read_text())
  assert saved["labels"] == ["dense", "multiscale"] and len(saved["rows"]) == 5
  assert (out / "comparison.md").read_text().startswith("# multiscale vs dense")
