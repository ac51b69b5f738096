"""One-file checkpoints of a training state, written atomically into ``--workdir``.

The state pytree is serialised with ``flax.serialization`` (msgpack) next to a small JSON
header; a write goes to a temporary file and is renamed into place, so an interruption never
leaves a half-written checkpoint. (Orbax's async, multi-host machinery buys nothing for a
single-process CPU/GPU run of a few MB; see BUILD_NOTES.md.)
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import numpy as np
from flax import serialization

CHECKPOINT = "checkpoint.msgpack"
HEADER = "checkpoint.json"


def save(workdir: str | os.PathLike, state: Any, header: dict) -> pathlib.Path:
  """Writes ``state`` (any pytree) and a JSON ``header`` into ``workdir`` atomically."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / CHECKPOINT
  tmp = path.with_suffix(".tmp")
  tmp.write_bytes(serialization.to_bytes(state))
  os.replace(tmp, path)
  tmp = workdir / (HEADER + ".tmp")
  tmp.write_text(json.dumps(header, indent=2))
  os.replace(tmp, workdir / HEADER)
  return path


def exists(workdir: str | os.PathLike) -> bool:
  """Whether ``workdir`` holds a checkpoint."""
  return (pathlib.Path(workdir) / CHECKPOINT).is_file()


# Top-level state fields added after checkpoints were first written, with the reason: a
# checkpoint without one takes the template's value (what a fresh run of its config holds).
ADDED_FIELDS = {
  "potentials": "TrainState.potentials (warm starts, issue 13); empty unless ot_warm_iters",
}


def restore(workdir: str | os.PathLike, template: Any) -> tuple[Any, dict]:
  """Reads the checkpoint into the structure of ``template``; returns ``(state, header)``.

  A checkpoint written before a field of :data:`ADDED_FIELDS` existed gets the template's
  value for it; any other difference in structure is an error.
  """
  workdir = pathlib.Path(workdir)
  path, header_path = workdir / CHECKPOINT, workdir / HEADER
  advice = "delete it (and checkpoint.json) to start over, or use another --workdir"
  try:
    raw = serialization.msgpack_restore(path.read_bytes())
    expected = serialization.to_state_dict(template)
    if isinstance(raw, dict) and isinstance(expected, dict):
      for name in ADDED_FIELDS.keys() & (expected.keys() - raw.keys()):
        raw[name] = expected[name]
    state = serialization.from_state_dict(template, raw)
  except Exception as e:  # noqa: BLE001 — msgpack and flax raise many types for a bad file
    raise ValueError(f"corrupt or incompatible checkpoint {path} ({e}); {advice}.") from e
  try:
    header = json.loads(header_path.read_text()) if header_path.is_file() else {}
  except (OSError, ValueError) as e:
    raise ValueError(f"corrupt checkpoint header {header_path} ({e}); {advice}.") from e
  bad = [k for k, leaf in _leaves(state) if not np.all(np.isfinite(leaf))]
  if bad:  # a NaN state can only fail again
    raise ValueError(f"checkpoint {path} holds non-finite values (in {bad[:3]}); {advice}.")
  return state, header


def _leaves(state):
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  return [
    (jax.tree_util.keystr(k), np.asarray(v))
    for k, v in flat
    if np.issubdtype(np.asarray(v).dtype, np.floating)
  ]
