"""absl flags derived from a config dataclass, so that a new setting is a one-line change.

Every field of the dataclass becomes ``--name`` with the field's default and the help text in
its ``metadata["help"]``; its annotation (``int``, ``float``, ``bool``, ``str``, optionally
``| None``) picks the flag type. The values are checked by the dataclass itself
(``__post_init__``), whose ``ValueError`` the entry points report as a usage error.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from absl import flags

_DEFINE = {
  "int": flags.DEFINE_integer,
  "float": flags.DEFINE_float,
  "bool": flags.DEFINE_bool,
  "str": flags.DEFINE_string,
}


def _kind(field: dataclasses.Field) -> str:
  t = field.type  # a string under `from __future__ import annotations`, else a type
  if isinstance(t, str):
    kind = t.replace(" ", "").replace("|None", "").replace("None|", "")
  else:
    args = [a for a in typing.get_args(t) if a is not type(None)] or [t]
    kind = getattr(args[0], "__name__", "") if len(args) == 1 else ""
  if kind not in _DEFINE:
    raise TypeError(f"field {field.name!r}: no flag type for annotation {field.type!r}")
  return kind


def define_flags(
  cls: type,
  *,
  skip: Iterable[str] = (),
  defaults: Mapping[str, Any] | None = None,
  flag_values: flags.FlagValues = flags.FLAGS,
) -> list[str]:
  """Defines one flag per field of the dataclass ``cls``; returns the names defined.

  Args:
    cls: a dataclass whose fields all have ``metadata["help"]``.
    skip: fields that get no flag (the entry point sets them itself).
    defaults: flag defaults that differ from the fields' (e.g. a sweep's shorter runs).
    flag_values: where to define them (tests pass their own ``FlagValues``).
  """
  skip, defaults = set(skip), dict(defaults or {})
  names = [f.name for f in dataclasses.fields(cls)]
  unknown = (skip | defaults.keys()) - set(names)
  if unknown:
    raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)}")
  defined = []
  for field in dataclasses.fields(cls):
    if field.name in skip:
      continue
    if "help" not in field.metadata:
      raise ValueError(f"{cls.__name__}.{field.name} has no metadata['help'] for its flag")
    default = defaults.get(field.name, field.default)
    _DEFINE[_kind(field)](field.name, default, field.metadata["help"], flag_values=flag_values)
    defined.append(field.name)
  return defined


def config_from_flags(
  cls: type,
  names: Iterable[str],
  flag_values: flags.FlagValues = flags.FLAGS,
  **overrides: Any,
) -> Any:
  """``cls(**values)`` from the flags ``names`` (what :func:`define_flags` returned) plus
  ``overrides``."""
  return cls(**{**{name: flag_values[name].value for name in names}, **overrides})


def parse_seeds(values: Iterable[str]) -> list[int]:
  """``--seeds``: one value N means seeds ``0..N-1``, several values are the seeds themselves.

  Raises:
    ValueError: a value is not an integer, or a count is not positive.
  """
  values = list(values)
  try:
    ints = [int(v) for v in values]
  except ValueError as e:
    raise ValueError(f"--seeds must be integers, got {values}") from e
  if len(ints) == 1:
    if ints[0] < 1:
      raise ValueError(f"--seeds count must be positive, got {ints[0]}")
    return list(range(ints[0]))
  return ints
