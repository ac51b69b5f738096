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
  raw = serialization.msgpack_restore((workdir / CHECKPOINT).read_bytes())
  expected = serialization.to_state_dict(template)
  if isinstance(raw, dict) and isinstance(expected, dict):
    for name in ADDED_FIELDS.keys() & (expected.keys() - raw.keys()):
      raw[name] = expected[name]
  state = serialization.from_state_dict(template, raw)
  header_path = workdir / HEADER
  header = json.loads(header_path.read_text()) if header_path.is_file() else {}
  return state, header
