"""Checkpoints of a training state in ``--workdir``, written by Orbax's ``CheckpointManager``.

Layout: ``workdir/checkpoints/<step>/`` holds three Orbax items: ``state`` (the arrays of the
state's :func:`flax.serialization.to_state_dict`, as numpy arrays), ``header`` (the caller's
JSON header: step and evaluation records) and ``layout`` (JSON: every leaf's path, shape,
dtype and CRC-32, and the empty subtrees). Orbax writes a step into a temporary directory and
renames it into place, so an interruption never leaves a half-written checkpoint; the last two
steps are kept (:data:`MAX_TO_KEEP`). Saves are synchronous: a single-process run must not
exit before its checkpoint is on disk.

Orbax cannot store arrays with a zero-size dimension (``latents`` and ``prior`` are ``[0, z]``,
``potentials`` ``[4, 0]`` in some variants): those are recorded by shape and dtype in
``layout`` only and rebuilt on restore. The state goes through ``to_state_dict`` /
``from_state_dict`` (as the legacy format did) so that NamedTuples, optax's empty states and
added fields (:data:`ADDED_FIELDS`) are handled by the same code in both formats.

:func:`restore` tries the newest step first; a step that cannot be read, whose arrays do not
match their recorded checksums, that does not fit the template or that holds non-finite values
is reported on stderr by path and the previous one is used. The legacy format (one
``checkpoint.msgpack`` + ``checkpoint.json`` pair, flax msgpack) is still read, as the oldest
candidate; the first save in the new layout deletes it.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import sys
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization, traverse_util

MAX_TO_KEEP = 2
CHECKPOINTS = "checkpoints"  # the CheckpointManager's directory inside the workdir
LEGACY_CHECKPOINT = "checkpoint.msgpack"  # the format before Orbax: read, then replaced
LEGACY_HEADER = "checkpoint.json"
ADVICE = (
  "delete the workdir's checkpoints/ (and any checkpoint.msgpack/checkpoint.json) to start "
  "over, or use another --workdir"
)

# Top-level state fields added after checkpoints were first written, with the reason: a
# checkpoint without one takes the template's value (what a fresh run of its config holds).
ADDED_FIELDS = {
  "potentials": "TrainState.potentials (warm starts, issue 13); empty unless ot_warm_iters",
}


class _QuietOrbax(logging.Filter):
  """Drops Orbax's INFO/DEBUG records: under ``absl.app.run`` (the entry points) absl logs INFO
  to stderr, and Orbax writes several lines per save, which would bury the training log."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


logging.getLogger("absl").addFilter(_QuietOrbax())


def exists(workdir: str | os.PathLike) -> bool:
  """Whether ``workdir`` holds a checkpoint (good or not) in either format."""
  workdir = pathlib.Path(workdir)
  return bool(_steps(workdir)) or (workdir / LEGACY_CHECKPOINT).is_file()


def save(workdir: str | os.PathLike, state: Any, header: dict) -> pathlib.Path:
  """Writes ``state`` (any pytree) and the JSON ``header`` as step ``header["step"]``.

  Steps at or after it are deleted first: they belong to a history the run abandoned when it
  resumed from an earlier checkpoint (the newer ones being unusable). After the save, the
  oldest steps beyond :data:`MAX_TO_KEEP` and a legacy checkpoint pair are deleted.

  Returns:
    The step's directory.
  """
  workdir = pathlib.Path(workdir)
  step = int(header["step"])
  arrays, layout = _split(state)
  items = {"header": ocp.args.JsonSave(header), "layout": ocp.args.JsonSave(layout)}
  if arrays:  # Orbax refuses an empty tree; a state of only zero-size arrays is all layout
    items["state"] = ocp.args.StandardSave(arrays)
  with _manager(workdir) as mgr:
    for old in mgr.all_steps():
      if old >= step:
        mgr.delete(old)
    mgr.save(step, args=ocp.args.Composite(**items))
    mgr.wait_until_finished()
  # Only now that the new checkpoint is committed is the legacy pair redundant.
  for name in (LEGACY_CHECKPOINT, LEGACY_HEADER):
    (workdir / name).unlink(missing_ok=True)
  return workdir / CHECKPOINTS / str(step)


def restore(workdir: str | os.PathLike, template: Any = None) -> tuple[Any, dict]:
  """Reads the newest usable checkpoint; returns ``(state, header)``.

  ``header["step"]`` is the step restored. A checkpoint that cannot be used is reported on
  stderr (its path and why) and the previous one is tried. A checkpoint written before a field
  of :data:`ADDED_FIELDS` existed gets the template's value for it; any other difference in
  structure, shape or dtype is an error.

  Args:
    workdir: the run's directory.
    template: a pytree of the state's structure (e.g. a fresh ``TrainState``); ``None``
      returns the saved state dict (nested dicts of numpy arrays) as it is.

  Raises:
    ValueError: no checkpoint is usable; names each with its reason and what to do.
  """
  workdir = pathlib.Path(workdir)
  candidates = [workdir / CHECKPOINTS / str(s) for s in sorted(_steps(workdir), reverse=True)]
  if (workdir / LEGACY_CHECKPOINT).is_file():
    candidates.append(workdir / LEGACY_CHECKPOINT)
  failures = []
  for path in candidates:
    try:
      read = _read_legacy if path.name == LEGACY_CHECKPOINT else _read
      raw, header = read(path)
      state = _fit(raw, template)
      bad = [k for k, leaf in _float_leaves(state) if not np.all(np.isfinite(leaf))]
      if bad:  # a NaN state can only fail again
        raise ValueError(f"non-finite values (in {bad[:3]})")
    except Exception as e:  # noqa: BLE001 — Orbax, tensorstore, msgpack, flax raise many types
      failures.append((path, _one_line(e)))
      continue
    for bad_path, reason in failures:
      print(
        f"gsae: checkpoint {bad_path} is unusable ({reason}); using {path} instead",
        file=sys.stderr,
        flush=True,
      )
    return state, header
  if not failures:
    raise ValueError(f"{workdir} holds no checkpoint.")
  listed = "; ".join(f"{p}: {r}" for p, r in failures)
  raise ValueError(f"no usable checkpoint in {workdir} ({listed}); {ADVICE}.")


def _drop_late_read_callbacks() -> None:
  """Stops a failed Orbax read from printing dozens of tracebacks after its error.

  When one array of a damaged checkpoint fails to read, Orbax closes its event loop while
  tensorstore still completes the other reads; each completion then calls into the closed loop
  and Python prints "Exception ignored ... RuntimeError: Event loop is closed" (47 for one
  TrainState). Those callbacks have nothing left to do, so that one error is dropped; every
  other unraisable exception still reaches the previous hook. Installed before the first read
  (not after a failure): the callbacks can fire before the error reaches :func:`restore`.
  """
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_callbacks", False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
      previous(unraisable)

  hook.drops_closed_loop_callbacks = True
  sys.unraisablehook = hook


def _manager(workdir: pathlib.Path) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=MAX_TO_KEEP,
    enable_async_checkpointing=False,
    cleanup_tmp_directories=True,  # a save killed midway leaves a *.orbax-checkpoint-tmp dir
  )
  return ocp.CheckpointManager((workdir / CHECKPOINTS).absolute(), options=options)


def _steps(workdir: pathlib.Path) -> list[int]:
  """The committed steps: Orbax renames ``<step>.orbax-checkpoint-tmp`` to ``<step>``."""
  root = workdir / CHECKPOINTS
  if not root.is_dir():
    return []
  return [int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()]


def _split(state: Any) -> tuple[dict, dict]:
  """The state's non-empty arrays (a nested dict) and its layout (JSON-able)."""
  flat = traverse_util.flatten_dict(
    serialization.to_state_dict(jax.device_get(state)), keep_empty_nodes=True
  )
  arrays, leaves, empty = {}, [], []
  for path, value in flat.items():
    path = [str(k) for k in path]
    if value is traverse_util.empty_node:
      empty.append(path)
      continue
    value = np.asarray(value)
    leaves.append(
      {"path": path, "shape": list(value.shape), "dtype": value.dtype.str, "crc32": _crc(value)}
    )
    if value.size:
      arrays[tuple(path)] = value
  layout = {"format": 1, "leaves": leaves, "empty": empty}
  return traverse_util.unflatten_dict(arrays), layout


def _read(path: pathlib.Path) -> tuple[dict, dict]:
  """The raw state dict and header of one Orbax step directory, checked against its layout."""
  path = path.absolute()  # Orbax refuses relative paths (a relative --workdir is common)
  _drop_late_read_callbacks()
  handler = ocp.CompositeCheckpointHandler()
  with ocp.Checkpointer(handler) as ckptr:
    meta = ckptr.restore(
      path, args=ocp.args.Composite(header=ocp.args.JsonRestore(), layout=ocp.args.JsonRestore())
    )
    header, layout = meta.header, meta.layout
    if not isinstance(header, dict) or not isinstance(layout, dict) or "leaves" not in layout:
      raise ValueError("header or layout is not a JSON object")
    nonempty = [leaf for leaf in layout["leaves"] if np.prod(leaf["shape"]) > 0]
    saved = {}
    if nonempty:
      restored = ckptr.restore(path, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
      saved = traverse_util.flatten_dict(restored.state)
  flat = {}
  for leaf in layout["leaves"]:
    key, dtype, shape = tuple(leaf["path"]), np.dtype(leaf["dtype"]), tuple(leaf["shape"])
    name = "/".join(key)
    if 0 in shape:
      value = np.zeros(shape, dtype)
    elif key in saved:
      value = np.asarray(saved.pop(key))
    else:
      raise ValueError(f"{name} is missing from the saved arrays")
    if value.shape != shape or value.dtype != dtype:
      raise ValueError(f"{name} is {value.dtype}{list(value.shape)}, saved as {dtype}{shape}")
    if _crc(value) != leaf["crc32"]:  # tensorstore reads damaged raw bytes without complaint
      raise ValueError(f"{name} does not match its checksum (damaged data)")
    flat[key] = value
  if saved:
    raise ValueError(f"arrays missing from the layout: {sorted('/'.join(k) for k in saved)[:3]}")
  for key in layout["empty"]:
    flat[tuple(key)] = traverse_util.empty_node
  return traverse_util.unflatten_dict(flat), header


def _read_legacy(path: pathlib.Path) -> tuple[dict, dict]:
  """The raw state dict and header of a legacy ``checkpoint.msgpack`` (+ ``checkpoint.json``)."""
  raw = serialization.msgpack_restore(path.read_bytes())
  header_path = path.parent / LEGACY_HEADER
  try:
    header = json.loads(header_path.read_text()) if header_path.is_file() else {}
  except (OSError, ValueError) as e:
    raise ValueError(f"corrupt checkpoint header {header_path} ({e})") from e
  return raw, header


def _fit(raw: Any, template: Any) -> Any:
  """``raw`` (a state dict) in the structure of ``template``; ``raw`` itself without one."""
  if template is None:
    return raw
  expected = serialization.to_state_dict(template)
  if isinstance(raw, dict) and isinstance(expected, dict):
    for name in ADDED_FIELDS.keys() & (expected.keys() - raw.keys()):
      raw[name] = expected[name]
  state = serialization.from_state_dict(template, raw)
  # from_state_dict takes any array for a leaf; a shape or dtype the run does not expect would
  # only fail (or silently retrace) in the first step.
  want = traverse_util.flatten_dict(expected)
  for key, value in traverse_util.flatten_dict(serialization.to_state_dict(state)).items():
    ref = want.get(key)
    if ref is None or not hasattr(ref, "shape"):
      continue
    got, ref = np.asarray(value), np.asarray(ref)
    if got.shape != ref.shape or got.dtype != ref.dtype:
      raise ValueError(
        f"{'/'.join(map(str, key))} is {got.dtype}{list(got.shape)}, the run expects "
        f"{ref.dtype}{list(ref.shape)} (incompatible checkpoint)"
      )
  return state


def _crc(value: np.ndarray) -> int:
  return zlib.crc32(np.ascontiguousarray(value).tobytes())


def _one_line(e: Exception) -> str:
  text = " ".join(f"{type(e).__name__}: {e}".split())
  return text if len(text) <= 300 else text[:297] + "..."


def _float_leaves(state):
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  return [
    (jax.tree_util.keystr(k), np.asarray(v))
    for k, v in flat
    if np.issubdtype(np.asarray(v).dtype, np.floating)
  ]
