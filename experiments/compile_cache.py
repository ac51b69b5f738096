"""The entry points' persistent XLA compilation cache (``--compilation_cache``).

A rerun, a resumed run or the next run of a sweep loads its compiled steps from disk instead of
compiling them again: the multiscale OT step compiles for ≈ 30 s on the 2-core CPU, and a
process that finds it in the cache only traces and lowers it (BUILD_NOTES.md, "Compile time of
the multiscale backend"). JAX keys the
entries by the lowered program, the compile options and the jax/XLA versions, so a changed
program or installation misses the cache rather than loading a stale executable.
"""

import os

import jax
from absl import flags

_CACHE = flags.DEFINE_string(
  "compilation_cache",
  os.path.join("~", ".cache", "gsae_jax", "xla"),
  "Directory of JAX's persistent compilation cache (reruns, resumes and sweeps skip the "
  "compilations already done); empty: off. JAX_COMPILATION_CACHE_DIR, if set, wins.",
)


def enable() -> str | None:
  """Points JAX's persistent compilation cache at ``--compilation_cache``.

  Returns the directory in use (``None``: off). An explicit ``JAX_COMPILATION_CACHE_DIR`` in
  the environment is left as JAX read it.
  """
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  if not _CACHE.value:
    return None
  path = os.path.expanduser(_CACHE.value)
  jax.config.update("jax_compilation_cache_dir", path)
  return path
