"""Orbax checkpoints: exact round trips, the last two kept, fallback past damaged ones, and the
legacy msgpack pair still resuming."""

import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from gsae_jax import checkpointing
from gsae_jax.models import make_autoencoder
from gsae_jax.training.gsae import GSAEConfig, TrainState, init_state


def _state(variant="minibatch_global", step=0):
  """A real TrainState with distinct values in every float leaf (Adam's moments start at 0)."""
  images = jax.random.uniform(jax.random.key(1), (30, 28, 28, 1))
  model = make_autoencoder("mlp", 2)
  state = init_state(jax.random.key(0), model, GSAEConfig(variant=variant), images)
  leaves, treedef = jax.tree.flatten(state)
  # numpy draws: jax.random per leaf shape compiled ≈ 50 programs (≈ 7 s).
  rng = np.random.default_rng(2)
  leaves = [
    jnp.asarray(rng.standard_normal(x.shape), x.dtype)
    if jnp.issubdtype(x.dtype, jnp.floating)
    else x
    for x in leaves
  ]
  return jax.tree.unflatten(treedef, leaves)._replace(step=jnp.int32(step))


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    u, v = np.asarray(u), np.asarray(v)
    assert u.dtype == v.dtype and u.shape == v.shape
    np.testing.assert_array_equal(u, v)


def _steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _write_legacy(workdir, state, header):
  """The format before Orbax, as the old ``checkpointing.save`` wrote it."""
  (workdir / checkpointing.LEGACY_CHECKPOINT).write_bytes(serialization.to_bytes(state))
  (workdir / checkpointing.LEGACY_HEADER).write_text(json.dumps(header, indent=2))


@pytest.mark.parametrize("variant", ["local", "minibatch_global"])
@pytest.mark.slow
def test_train_state_round_trips_exactly(tmp_path, variant):
  # `local` holds [0, 2] latents/prior and [4, 0] potentials, which Orbax cannot store itself.
  state = _state(variant, step=7)
  assert state.potentials.shape == (4, 0)
  assert not checkpointing.exists(tmp_path)
  header = {"step": 7, "records": [{"step": 7, "reconstruction": 0.5}]}
  path = checkpointing.save(tmp_path, state, header)
  assert path == tmp_path / "checkpoints" / "7" and path.is_dir()
  assert checkpointing.exists(tmp_path)
  restored, got = checkpointing.restore(tmp_path, state)
  assert got == header
  assert type(restored) is TrainState and type(restored.opt_state) is type(state.opt_state)
  _assert_same(restored, state)
  raw, _ = checkpointing.restore(tmp_path)  # no template: the saved state dict
  assert raw["latents"].shape == state.latents.shape and raw["step"].dtype == np.int32


@pytest.mark.slow
def test_the_last_two_steps_are_kept(tmp_path):
  state = _state()
  for step in (1, 2, 3):
    checkpointing.save(tmp_path, state._replace(step=jnp.int32(step)), {"step": step})
  assert _steps(tmp_path) == [2, 3]
  restored, header = checkpointing.restore(tmp_path, state)
  assert header["step"] == 3 and int(restored.step) == 3


def test_a_relative_workdir_round_trips(tmp_path, monkeypatch):
  # `--workdir=runs/x` is relative, and Orbax refuses relative paths: the first resume of a
  # real run with a relative workdir failed before this.
  monkeypatch.chdir(tmp_path)
  state = _state(step=4)
  checkpointing.save("runs/x", state, {"step": 4})
  restored, header = checkpointing.restore("runs/x", state)
  assert header["step"] == 4
  _assert_same(restored, state)


def test_a_save_killed_midway_is_ignored_and_cleaned_up(tmp_path):
  # Orbax writes into <step>.orbax-checkpoint-tmp and renames it when complete.
  state = _state()
  leftover = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp"
  (leftover / "state").mkdir(parents=True)
  assert not checkpointing.exists(tmp_path)
  checkpointing.save(tmp_path, state._replace(step=jnp.int32(1)), {"step": 1})
  assert not leftover.exists() and _steps(tmp_path) == [1]
  (leftover / "state").mkdir(parents=True)
  assert checkpointing.restore(tmp_path, state)[1]["step"] == 1


def _biggest_file(path):
  return max((f for f in path.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


def _flip_bytes(path):
  f = _biggest_file(path / "state")  # the arrays' data
  data = bytearray(f.read_bytes())
  mid = len(data) // 2
  data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
  f.write_bytes(bytes(data))


def _truncate(path):
  f = _biggest_file(path / "state")
  f.write_bytes(f.read_bytes()[:100])


DAMAGES = {
  "flipped bytes": _flip_bytes,  # read back without error by tensorstore: the checksum catches it
  "truncated": _truncate,
  "deleted metadata": lambda path: (path / "state" / "_METADATA").unlink(),
  "corrupt header": lambda path: (path / "header" / "metadata").write_text("{not json"),
  "deleted state": lambda path: shutil.rmtree(path / "state"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys, damage):
  state = _state()
  for step in (1, 2):
    checkpointing.save(tmp_path, state._replace(step=jnp.int32(step)), {"step": step})
  newest = tmp_path / "checkpoints" / "2"
  DAMAGES[damage](newest)
  restored, header = checkpointing.restore(tmp_path, state)
  assert header["step"] == 1 and int(restored.step) == 1
  _assert_same(restored, state._replace(step=jnp.int32(1)))
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"checkpoint {newest} is unusable (" in err[0]
  # The run goes on from step 1; its next save replaces the damaged step 2.
  checkpointing.save(tmp_path, state._replace(step=jnp.int32(2)), {"step": 2})
  assert _steps(tmp_path) == [1, 2]
  assert checkpointing.restore(tmp_path, state)[1]["step"] == 2


def test_a_non_finite_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
  state = _state()
  checkpointing.save(tmp_path, state._replace(step=jnp.int32(1)), {"step": 1})
  nan = state._replace(step=jnp.int32(2), params=jax.tree.map(lambda v: v * jnp.nan, state.params))
  checkpointing.save(tmp_path, nan, {"step": 2})
  restored, header = checkpointing.restore(tmp_path, state)
  assert header["step"] == 1
  _assert_same(restored, state._replace(step=jnp.int32(1)))
  assert "checkpoints/2 is unusable (ValueError: non-finite values" in capsys.readouterr().err


def test_no_usable_checkpoint_is_refused_naming_each(tmp_path):
  state = _state()
  for step in (1, 2):
    checkpointing.save(tmp_path, state._replace(step=jnp.int32(step)), {"step": step})
  _truncate(tmp_path / "checkpoints" / "1")
  _flip_bytes(tmp_path / "checkpoints" / "2")
  with pytest.raises(ValueError, match="no usable checkpoint") as err:
    checkpointing.restore(tmp_path, state)
  msg = str(err.value)
  for step, reason in ((1, "OUT_OF_RANGE"), (2, "does not match its checksum")):
    assert f"{tmp_path / 'checkpoints' / str(step)}: " in msg and reason in msg
  assert "delete the workdir's checkpoints/" in msg and "another --workdir" in msg


def test_a_checkpoint_of_another_shape_is_refused(tmp_path):
  checkpointing.save(tmp_path, _state("local"), {"step": 0})  # latents [0, 2]
  with pytest.raises(ValueError, match=r"latents is float32\[0, 2\], the run expects"):
    checkpointing.restore(tmp_path, _state("minibatch_global"))  # latents [30, 2]


def test_a_legacy_checkpoint_restores_and_the_next_save_migrates_it(tmp_path):
  state = _state("local", step=5)  # zero-size arrays in the legacy format too
  header = {"step": 5, "records": [{"step": 5}]}
  _write_legacy(tmp_path, state, header)
  assert checkpointing.exists(tmp_path)
  restored, got = checkpointing.restore(tmp_path, state)
  assert got == header
  _assert_same(restored, state)
  checkpointing.save(tmp_path, restored._replace(step=jnp.int32(6)), {**header, "step": 6})
  assert _steps(tmp_path) == [6]
  assert not (tmp_path / checkpointing.LEGACY_CHECKPOINT).exists()
  assert not (tmp_path / checkpointing.LEGACY_HEADER).exists()
  _assert_same(checkpointing.restore(tmp_path, state)[0], state._replace(step=jnp.int32(6)))


def test_a_damaged_legacy_checkpoint_is_refused_by_path(tmp_path):
  _write_legacy(tmp_path, _state(), {"step": 0})
  legacy = tmp_path / checkpointing.LEGACY_CHECKPOINT
  legacy.write_bytes(legacy.read_bytes()[:100])
  with pytest.raises(ValueError, match=f"{legacy}: .*another --workdir"):
    checkpointing.restore(tmp_path, _state())


@pytest.mark.parametrize("legacy", [False, True])
def test_a_checkpoint_from_before_an_added_field_restores(tmp_path, legacy):
  # A TrainState saved before `potentials` existed (5 fields) takes the template's value; a
  # checkpoint missing any other field is still refused.
  state = _state()
  old = {k: v for k, v in state._asdict().items() if k not in checkpointing.ADDED_FIELDS}
  write = _write_legacy if legacy else checkpointing.save
  write(tmp_path, old, {"step": 0})
  restored, _ = checkpointing.restore(tmp_path, state)
  _assert_same(restored, state)
  shutil.rmtree(tmp_path / "checkpoints", ignore_errors=True)
  write(tmp_path, {k: v for k, v in old.items() if k != "prior"}, {"step": 0})
  with pytest.raises(ValueError, match="do not match"):
    checkpointing.restore(tmp_path, state)


def test_orbax_info_logging_is_silenced(tmp_path, caplog):
  # absl.app.run logs INFO to stderr; Orbax would write dozens of lines per save and restore.
  caplog.set_level(logging.DEBUG, logger="absl")
  checkpointing.save(tmp_path, _state(), {"step": 0})
  checkpointing.restore(tmp_path, _state())
  assert [r.getMessage() for r in caplog.records if "orbax" in r.pathname] == []
