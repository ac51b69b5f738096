"""Host memory: give the compiler's freed heap back to the OS before a large run.

XLA:CPU frees most of what it allocates while compiling, but glibc keeps those pages in the
process's heap. The run's large buffers are ``mmap``-ed and do not reuse them, so the process's
peak RSS is the compile's residue plus the run's buffers (for the multiscale divergence at
n = 1 000 000, about a quarter of the peak: BUILD_NOTES, "Open / known limits").
:func:`release_host_memory` between ``compile()`` and the first call takes it off the peak::

  compiled = jax.jit(jax.value_and_grad(div)).lower(x, y).compile()
  release_host_memory()
  value, grad = compiled(x, y)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
  name = ctypes.util.find_library("c")
  try:
    return ctypes.CDLL(name).malloc_trim if name else None
  except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
    return None


def release_host_memory() -> bool:
  """Returns the heap's free pages to the OS: glibc's ``malloc_trim(0)``.

  Worth calling after compiling a large program and before running it (module docstring): the
  compiler's freed memory otherwise stays resident and adds to the run's peak. Costs a walk of
  the heap (milliseconds); live allocations are untouched.

  Returns:
    ``True`` where glibc's ``malloc_trim`` was called and released memory, ``False`` where
    nothing was released or the C library has no ``malloc_trim`` (not glibc).
  """
  trim = _malloc_trim()
  return bool(trim(0)) if trim is not None else False
