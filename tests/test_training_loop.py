"""The train/evaluate loop and the flower_mnist entry point on a tiny configuration."""

import json
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from gsae_jax import checkpointing
from gsae_jax.training.gsae import GSAEConfig, step_ot_backend
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


@pytest.mark.slow
def test_resume_continues_from_saved_step(tmp_path):
  # First run: 1 epoch = 4 steps, checkpoints at steps 2 and 4.
  train_and_evaluate(ExperimentConfig(**TINY), str(tmp_path))
  _, header = checkpointing.restore(tmp_path)
  assert header["step"] == 4
  assert _steps(tmp_path) == [2, 4]
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
  assert _steps(tmp_path) == [6, 8]  # the last two kept


def _steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  full = train_and_evaluate(ExperimentConfig(**{**TINY, "epochs": 2}), str(a))
  train_and_evaluate(ExperimentConfig(**TINY), str(b))
  resumed = train_and_evaluate(ExperimentConfig(**{**TINY, "epochs": 2}), str(b))
  np.testing.assert_allclose(resumed["reconstruction"], full["reconstruction"], rtol=1e-5)
  sa, _ = checkpointing.restore(a)
  sb, _ = checkpointing.restore(b)
  for u, v in zip(jax.tree.leaves(sa), jax.tree.leaves(sb), strict=True):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_config_mismatch_on_resume_is_an_error(tmp_path):
  train_and_evaluate(ExperimentConfig(**{**TINY, "eval_every": 4}), str(tmp_path))
  with pytest.raises(ValueError, match="different config"):
    train_and_evaluate(ExperimentConfig(**{**TINY, "seed": 1}), str(tmp_path))


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_and_saves_nothing(tmp_path):
  # λ = 1e38 overflows the gradient at once; the first check (step 2) must stop the run
  # before its evaluation would checkpoint the NaN state.
  with pytest.raises(FloatingPointError, match="non-finite loss at step 2.*Nothing was saved"):
    train_and_evaluate(ExperimentConfig(**{**TINY, "lam": 1e38}), str(tmp_path))
  assert not checkpointing.exists(tmp_path)


@pytest.mark.slow
def test_damaged_checkpoint_falls_back_to_the_previous_or_is_refused(tmp_path, capsys):
  train_and_evaluate(ExperimentConfig(**TINY), str(tmp_path))  # checkpoints at steps 2, 4
  # A NaN state in the newest: reported by path, the run resumes from step 2 and its history
  # (metrics.jsonl) is step 2's.
  state, header = checkpointing.restore(tmp_path)
  state["params"] = jax.tree.map(lambda v: v * np.nan, state["params"])
  checkpointing.save(tmp_path, state, header)
  capsys.readouterr()
  train_and_evaluate(ExperimentConfig(**{**TINY, "epochs": 2}), str(tmp_path))
  err = capsys.readouterr().err
  assert f"checkpoint {tmp_path / 'checkpoints' / '4'} is unusable (ValueError: non-finite" in err
  assert "gsae: resumed from step 2" in err
  steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
  assert steps == [2, 4, 6, 8] and _steps(tmp_path) == [6, 8]
  # Both kept checkpoints truncated: refused, naming each, before anything is trained.
  paths = [tmp_path / "checkpoints" / s for s in ("6", "8")]
  for path in paths:
    for f in (path / "state").rglob("*"):
      if f.is_file():
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  with pytest.raises(ValueError, match="no usable checkpoint") as err:
    train_and_evaluate(ExperimentConfig(**{**TINY, "epochs": 3}), str(tmp_path))
  assert all(f"{p}: " in str(err.value) for p in paths)
  assert "another --workdir" in str(err.value)
  assert _steps(tmp_path) == [6, 8]  # nothing deleted


@pytest.mark.slow
def test_a_legacy_checkpoint_resumes_in_the_new_layout(tmp_path):
  # A workdir of the format before Orbax (checkpoint.msgpack + checkpoint.json) resumes; the
  # next save writes checkpoints/<step>/ and deletes the old pair.
  from flax import serialization

  train_and_evaluate(ExperimentConfig(**TINY), str(tmp_path))
  raw, header = checkpointing.restore(tmp_path)  # the state dict, as the old format stored it
  (tmp_path / checkpointing.LEGACY_CHECKPOINT).write_bytes(serialization.msgpack_serialize(raw))
  (tmp_path / checkpointing.LEGACY_HEADER).write_text(json.dumps(header, indent=2))
  shutil.rmtree(tmp_path / "checkpoints")
  train_and_evaluate(ExperimentConfig(**{**TINY, "epochs": 2}), str(tmp_path))
  steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
  assert steps == [2, 4, 6, 8] and _steps(tmp_path) == [6, 8]
  assert not (tmp_path / checkpointing.LEGACY_CHECKPOINT).exists()
  assert not (tmp_path / checkpointing.LEGACY_HEADER).exists()


@pytest.mark.slow
def test_a_test_set_the_metrics_cannot_use_fails_before_training(tmp_path):
  # 5 test images: too few for the metrics' neighbourhoods; found before the first step.
  with pytest.raises(ValueError, match="cannot be evaluated.*nothing was trained"):
    train_and_evaluate(ExperimentConfig(**{**TINY, "n_test": 5}), str(tmp_path))
  assert not checkpointing.exists(tmp_path)


@pytest.mark.slow
def test_resume_refuses_fewer_epochs_or_a_missing_config(tmp_path):
  train_and_evaluate(ExperimentConfig(**{**TINY, "epochs": 2}), str(tmp_path))  # 8 steps
  saved = (tmp_path / "config.json").read_text()
  with pytest.raises(ValueError, match="already holds 8 steps.*at least 2 epochs"):
    train_and_evaluate(ExperimentConfig(**TINY), str(tmp_path))
  assert (tmp_path / "config.json").read_text() == saved  # not rewritten by the refused run
  (tmp_path / "config.json").unlink()
  with pytest.raises(ValueError, match="no config.json"):
    train_and_evaluate(ExperimentConfig(**{**TINY, "epochs": 2}), str(tmp_path))


@pytest.mark.slow
def test_metrics_lines_written_after_the_checkpoint_are_not_duplicated(tmp_path):
  train_and_evaluate(ExperimentConfig(**TINY), str(tmp_path))  # records at steps 2, 4
  with open(tmp_path / "metrics.jsonl", "a") as f:  # a line the checkpoint never saw
    f.write(json.dumps({"step": 6}) + "\n")
  train_and_evaluate(ExperimentConfig(**{**TINY, "epochs": 2}), str(tmp_path))
  steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
  assert steps == [2, 4, 6, 8]
  assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[2])["reconstruction"] > 0


@pytest.mark.slow
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
    "--compilation_cache=",
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
  _, header = checkpointing.restore(tmp_path)
  assert header["step"] >= 3 and _steps(tmp_path) == [header["step"]]


@pytest.mark.slow
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
    ({"ot_coarse": "fine"}, "ot_coarse"),
  ],
)
def test_bad_config_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ExperimentConfig(**kwargs)


@pytest.mark.slow
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
    f"--compilation_cache={tmp_path / 'xla'}",
    f"--workdir={tmp_path / 'run'}",
  ]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
  summary = out.stdout.strip().splitlines()[-1]
  assert summary.startswith("minibatch_global mlp mnist5k: {")
  assert "steps/s" in out.stderr  # progress is visible
  # The compiled steps went to the persistent cache (compilations of ≥ 1 s).
  assert any(p.name.endswith("-cache") for p in (tmp_path / "xla").iterdir())
  bad = subprocess.run(
    cmd[:3] + ["--arch=vgg", f"--workdir={tmp_path / 'bad'}"],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert bad.returncode != 0 and "arch" in bad.stderr


def test_step_ot_backend_by_variant_and_size():
  # The global variants solve n × n (mnist5k: 4 000² ≥ 2 500², the repeated-call threshold);
  # local solves batch × batch; other regularisers run no Sinkhorn.
  assert step_ot_backend(GSAEConfig(variant="minibatch_global"), 4_000, 2) == "multiscale"
  assert step_ot_backend(GSAEConfig(variant="full_global"), 2_000, 2) == "dense"
  assert step_ot_backend(GSAEConfig(variant="local"), 60_000, 2) == "dense"
  assert step_ot_backend(GSAEConfig(variant="full_global"), 60_000, 8) == "dense"
  assert step_ot_backend(GSAEConfig(ot_backend="dense"), 60_000, 2) == "dense"
  assert step_ot_backend(GSAEConfig(regularizer="mmd", lam=1.0), 60_000, 2) is None
