"""The table runner on a tiny configuration: report numbers, resume, λ sweep, bad flags."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from gsae_jax.metrics import METRIC_NAMES
from gsae_jax.training import loop
from gsae_jax.training.loop import ExperimentConfig
from gsae_jax.training.tables import PAPER_TABLES, run_table

TINY = ExperimentConfig(
  dataset="mnist5k",
  n_train=200,
  n_test=100,
  batch_size=50,
  epochs=1,
  eval_every=100,
  encode_chunk=100,
  blur=0.2,  # a short ε schedule keeps the global steps fast
)


class CountingTrainer:
  def __init__(self):
    self.calls = []

  def __call__(self, config, workdir):
    self.calls.append(workdir)
    return loop.train_and_evaluate(config, workdir)


def _cells(md: str, metric: str) -> list[str]:
  row = next(line for line in md.splitlines() if line.startswith(f"| {metric} "))
  return [c.strip() for c in row.strip("|").split("|")][1:]


@pytest.mark.slow
def test_table_runner_report_and_resume(tmp_path):
  variants, seeds = ("local", "minibatch_global"), (0, 1)
  trainer = CountingTrainer()
  results = run_table(TINY, tmp_path, variants=variants, seeds=seeds, train_fn=trainer)
  assert len(trainer.calls) == 4 and all(r.metrics for r in results)
  md = (tmp_path / "results.md").read_text()
  for metric in METRIC_NAMES:
    cells = _cells(md, metric)
    # columns: ours local, paper local, ours minibatch_global, paper minibatch_global
    for j, v in enumerate(variants):
      vals = [
        json.loads((tmp_path / f"mlp_{v}_seed{s}" / "metrics.json").read_text())[metric]
        for s in seeds
      ]
      mean, std = re.match(r"(\S+) ± (\S+)", cells[2 * j]).groups()
      np.testing.assert_allclose(float(mean), np.mean(vals), rtol=1e-3)
      np.testing.assert_allclose(float(std), np.std(vals, ddof=1), rtol=0.05, atol=1e-6)
      paper = PAPER_TABLES["mlp"][metric][("local", "minibatch_global", "full_global").index(v)]
      assert float(cells[2 * j + 1]) == paper
  assert "(λ=0.1, n=2)" in md and "(λ=100, n=2)" in md
  assert "![mlp_local_seed0 latents](mlp_local_seed0/latents.png)" in md
  assert (tmp_path / "mlp_local_seed0" / "samples.png").is_file()
  runs = json.loads((tmp_path / "results.json").read_text())["runs"]
  assert [r["name"] for r in runs] == [
    "mlp_local_seed0",
    "mlp_local_seed1",
    "mlp_minibatch_global_seed0",
    "mlp_minibatch_global_seed1",
  ]

  # A second invocation reads the finished runs back and trains nothing.
  mtime = (tmp_path / "mlp_local_seed1" / "metrics.json").stat().st_mtime_ns
  again = CountingTrainer()
  results2 = run_table(TINY, tmp_path, variants=variants, seeds=seeds, train_fn=again)
  assert again.calls == []
  assert [r.metrics for r in results2] == [r.metrics for r in results]
  assert (tmp_path / "mlp_local_seed1" / "metrics.json").stat().st_mtime_ns == mtime
  assert (tmp_path / "results.md").read_text() == md


@pytest.mark.slow
def test_lambda_sweep_ranks_by_global_ot_and_records_failures(tmp_path):
  def trainer(config, workdir):
    if config.lam == 1.0:
      raise FloatingPointError("non-finite loss at step 3")
    return loop.train_and_evaluate(config, workdir)

  results = run_table(
    TINY, tmp_path, variants=("local",), seeds=(0,), sweep_lams=(0.01, 0.1, 1.0), train_fn=trainer
  )
  assert [r.name for r in results] == [
    "mlp_local_lam0.01_seed0",
    "mlp_local_lam0.1_seed0",
    "mlp_local_lam1_seed0",
  ]
  md = (tmp_path / "results.md").read_text()
  assert "## λ sweep: local" in md
  assert "`mlp_local_lam1_seed0`: FloatingPointError: non-finite loss at step 3" in md
  ot = {r.lam: r.metrics["global_ot_loss"] for r in results if r.metrics}
  rows = [line for line in md.splitlines() if re.match(r"\| 0\.0?1 \| 1 \|", line)]
  assert [float(r.split("|")[1]) for r in rows] == sorted(ot, key=ot.get)


@pytest.mark.slow
def test_entry_point_rejects_bad_flags(tmp_path):
  base = [sys.executable, "-m", "experiments.paper_tables", f"--workdir={tmp_path}"]
  for flag, word in (
    ("--variants=local,bogus", "bogus"),
    ("--seeds=x", "seeds"),
    ("--variants=", "`variants` must not be empty"),
    ("--seeds=0,0", "`seeds` repeats [0]"),
    ("--variants=local,local", "`variants` repeats ['local']"),
    ("--sweep_lam=0.1,0.1", "`sweep_lams` repeats [0.1]"),
    ("--regularizer=mmd", "has no paper λ: pass --lam_local, --lam_minibatch_global"),
  ):
    out = subprocess.run(base + [flag], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and word in out.stderr, (flag, out.stderr[-500:])
  assert not (tmp_path / "results.md").exists()


@pytest.mark.slow
def test_finished_run_with_other_settings_is_not_reused(tmp_path):
  run_table(TINY, tmp_path, variants=("local",), seeds=(0,))
  other = ExperimentConfig(**{**TINY.__dict__, "epochs": 2})
  with pytest.raises(ValueError, match="epochs"):
    run_table(other, tmp_path, variants=("local",), seeds=(0,))
