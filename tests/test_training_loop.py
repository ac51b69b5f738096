"""The train/evaluate loop and the flower_mnist entry point on a tiny configuration."""

import json
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from gsae_jax import checkpointing
from gsae_jax.training.loop import ExperimentConfig, train_and_evaluate

TINY = dict(
  variant="local",
  dataset="mnist5k",
  n_train=200,
  n_test=100,
  batch_size=50,
  epochs=1,
  eval_every=2,
  encode_chunk=100,
)


def test_resume_continues_from_saved_step(tmp_path):
  # First run: 1 epoch = 4 steps, checkpoints at steps 2 and 4.
  train_and_evaluate(ExperimentConfig(**TINY), str(tmp_path))
  _, header = checkpointing.restore(tmp_path, {})
  assert header["step"] == 4
  # Asking for 2 epochs resumes at step 4 and only runs steps 5..8.
  final = train_and_evaluate(ExperimentConfig(**{**TINY, "epochs": 2}), str(tmp_path))
  steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
  assert steps == [2, 4, 6, 8]
  assert set(final) == {
    "global_ot_loss",
    "reconstruction",
    "local_clustering",
    "cluster_matching",
    "covered_area",
  }
  assert json.loads((tmp_path / "metrics.json").read_text()) == final
  assert (tmp_path / "latents.png").stat().st_size > 1000


def test_resumed_run_equals_uninterrupted_run(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  full = train_and_evaluate(ExperimentConfig(**{**TINY, "epochs": 2}), str(a))
  train_and_evaluate(ExperimentConfig(**TINY), str(b))
  resumed = train_and_evaluate(ExperimentConfig(**{**TINY, "epochs": 2}), str(b))
  np.testing.assert_allclose(resumed["reconstruction"], full["reconstruction"], rtol=1e-5)
  sa, _ = checkpointing.restore(a, _template(a))
  sb, _ = checkpointing.restore(b, _template(b))
  for u, v in zip(jax.tree.leaves(sa), jax.tree.leaves(sb), strict=True):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7)


def _template(workdir):
  from flax import serialization

  return serialization.msgpack_restore((workdir / checkpointing.CHECKPOINT).read_bytes())


def test_config_mismatch_on_resume_is_an_error(tmp_path):
  train_and_evaluate(ExperimentConfig(**{**TINY, "eval_every": 4}), str(tmp_path))
  with pytest.raises(ValueError, match="different config"):
    train_and_evaluate(ExperimentConfig(**{**TINY, "seed": 1}), str(tmp_path))


def test_non_finite_loss_stops_the_run_and_saves_nothing(tmp_path):
  # λ = 1e38 overflows the gradient at once; the first check (step 2) must stop the run
  # before its evaluation would checkpoint the NaN state.
  with pytest.raises(FloatingPointError, match="non-finite loss at step 2.*Nothing was saved"):
    train_and_evaluate(ExperimentConfig(**{**TINY, "lam": 1e38}), str(tmp_path))
  assert not checkpointing.exists(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "nan", "header"])
def test_damaged_checkpoint_is_reported_by_path(tmp_path, damage):
  train_and_evaluate(ExperimentConfig(**TINY), str(tmp_path))
  ckpt = tmp_path / checkpointing.CHECKPOINT
  if damage == "truncate":
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    path, match = ckpt, "corrupt or incompatible checkpoint"
  elif damage == "nan":
    state, header = checkpointing.restore(tmp_path, _template(tmp_path))
    state["params"] = jax.tree.map(lambda v: v * np.nan, state["params"])
    checkpointing.save(tmp_path, state, header)
    path, match = ckpt, "non-finite values"
  else:
    (tmp_path / checkpointing.HEADER).write_text("{not json")
    path, match = tmp_path / checkpointing.HEADER, "corrupt checkpoint header"
  with pytest.raises(ValueError, match=match) as err:
    train_and_evaluate(ExperimentConfig(**{**TINY, "epochs": 2}), str(tmp_path))
  assert str(path) in str(err.value) and "delete it" in str(err.value)


def test_a_test_set_the_metrics_cannot_use_fails_before_training(tmp_path):
  # 5 test images: too few for the metrics' neighbourhoods; found before the first step.
  with pytest.raises(ValueError, match="cannot be evaluated.*nothing was trained"):
    train_and_evaluate(ExperimentConfig(**{**TINY, "n_test": 5}), str(tmp_path))
  assert not checkpointing.exists(tmp_path)


def test_resume_refuses_fewer_epochs_or_a_missing_config(tmp_path):
  train_and_evaluate(ExperimentConfig(**{**TINY, "epochs": 2}), str(tmp_path))  # 8 steps
  saved = (tmp_path / "config.json").read_text()
  with pytest.raises(ValueError, match="already holds 8 steps.*at least 2 epochs"):
    train_and_evaluate(ExperimentConfig(**TINY), str(tmp_path))
  assert (tmp_path / "config.json").read_text() == saved  # not rewritten by the refused run
  (tmp_path / "config.json").unlink()
  with pytest.raises(ValueError, match="no config.json"):
    train_and_evaluate(ExperimentConfig(**{**TINY, "epochs": 2}), str(tmp_path))


def test_metrics_lines_written_after_the_checkpoint_are_not_duplicated(tmp_path):
  train_and_evaluate(ExperimentConfig(**TINY), str(tmp_path))  # records at steps 2, 4
  with open(tmp_path / "metrics.jsonl", "a") as f:  # a line the checkpoint never saw
    f.write(json.dumps({"step": 6}) + "\n")
  train_and_evaluate(ExperimentConfig(**{**TINY, "epochs": 2}), str(tmp_path))
  steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
  assert steps == [2, 4, 6, 8]
  assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[2])["reconstruction"] > 0


def test_sigterm_saves_a_checkpoint(tmp_path):
  cmd = [
    sys.executable,
    "-m",
    "experiments.flower_mnist",
    "--variant=local",
    "--n_train=200",
    "--n_test=100",
    "--batch_size=50",
    "--epochs=100000",
    "--eval_every=1000000",
    "--log_every_s=0",
    f"--workdir={tmp_path}",
  ]
  proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
  try:
    for line in proc.stderr:  # wait until steps run
      if line.startswith("gsae: step 3/"):
        break
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) != 0
  finally:
    proc.kill()
  assert "interrupted; checkpoint at step" in err
  header = json.loads((tmp_path / checkpointing.HEADER).read_text())
  assert header["step"] >= 3


def test_resume_accepts_a_setting_added_later_at_its_default(tmp_path):
  # A run saved before `ot_warm_iters` existed ran at its default; asking for the default
  # resumes, asking for another value is a different config.
  tiny = {**TINY, "variant": "minibatch_global", "resample_freq": 2}
  train_and_evaluate(ExperimentConfig(**tiny), str(tmp_path))
  cfg = json.loads((tmp_path / "config.json").read_text())
  del cfg["ot_warm_iters"]
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  final = train_and_evaluate(ExperimentConfig(**{**tiny, "epochs": 2}), str(tmp_path))
  assert np.isfinite(final["reconstruction"])
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="different config.*ot_warm_iters"):
    train_and_evaluate(ExperimentConfig(**{**tiny, "epochs": 3, "ot_warm_iters": 2}), str(tmp_path))


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"variant": "global"}, "variant"),
    ({"arch": "vgg"}, "arch"),
    ({"epochs": 0}, "epochs"),
    ({"recalculate_freq": 0}, "recalculate_freq"),
    ({"lam": -1.0}, "lam"),
    ({"lam": float("nan")}, "lam"),
    ({"blur": -1.0}, "blur"),
    ({"blur": float("inf")}, "blur"),
    ({"scaling": 1.0}, "scaling"),
  ],
)
def test_bad_config_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ExperimentConfig(**kwargs)


def test_entry_point_runs_and_prints_summary(tmp_path):
  cmd = [
    sys.executable,
    "-m",
    "experiments.flower_mnist",
    "--variant=minibatch_global",
    "--n_train=200",
    "--n_test=100",
    "--batch_size=50",
    "--epochs=1",
    "--eval_every=100",
    f"--workdir={tmp_path}",
  ]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
  summary = out.stdout.strip().splitlines()[-1]
  assert summary.startswith("minibatch_global mlp mnist5k: {")
  assert "steps/s" in out.stderr  # progress is visible
  bad = subprocess.run(
    cmd[:3] + ["--arch=vgg", f"--workdir={tmp_path}"], capture_output=True, text=True, timeout=120
  )
  assert bad.returncode != 0 and "arch" in bad.stderr


def test_checkpoint_from_before_an_added_field_restores(tmp_path):
  # A TrainState saved before `potentials` existed (5 fields) loads into today's template;
  # a checkpoint missing any other field is still refused.
  from gsae_jax.models import make_autoencoder
  from gsae_jax.training.gsae import GSAEConfig, init_state

  images = jax.numpy.zeros((30, 28, 28, 1))
  state = init_state(jax.random.key(0), make_autoencoder("mlp", 2), GSAEConfig(), images)
  old = {k: v for k, v in state._asdict().items() if k != "potentials"}
  checkpointing.save(tmp_path, old, {"step": 0})
  restored, _ = checkpointing.restore(tmp_path, state)
  assert type(restored) is type(state)
  for u, v in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
    np.testing.assert_array_equal(u, v)
  checkpointing.save(tmp_path, {k: v for k, v in old.items() if k != "prior"}, {"step": 0})
  with pytest.raises(ValueError, match="do not match"):
    checkpointing.restore(tmp_path, state)
