"""Small helpers shared by the benchmarks: timing, peak RSS, JSON and markdown output."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax


def block(tree: Any) -> Any:
  """Waits for every array in ``tree`` and returns it."""
  return jax.block_until_ready(tree)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
  """Runs ``fn()`` once, blocking on its result; returns ``(result, seconds)``."""
  t0 = time.perf_counter()
  out = block(fn())
  return out, time.perf_counter() - t0


def compile_and_time(fn: Callable[..., Any], *args: Any, repeats: int = 1) -> dict[str, Any]:
  """Ahead-of-time compiles ``jax.jit(fn)`` for ``args``, then times its runs.

  Returns:
    ``{"result", "compile_s", "first_run_s", "warm_s"}``: ``warm_s`` is the median of
    ``repeats`` runs after the first, or ``None`` when ``repeats`` is 0.
  """
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  out, first = timed(lambda: compiled(*args))
  warm = [timed(lambda: compiled(*args))[1] for _ in range(repeats)]
  return {
    "result": out,
    "compile_s": compile_s,
    "first_run_s": first,
    "warm_s": statistics.median(warm) if warm else None,
  }


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
  """Peak resident set size in MiB (``ru_maxrss`` is KiB on Linux)."""
  return resource.getrusage(who).ru_maxrss / 1024.0


def vm_hwm_mb(pid: int) -> float | None:
  """Peak RSS (VmHWM) of a live process in MiB, from ``/proc``; ``None`` if unreadable."""
  try:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024.0
  except OSError:
    return None
  return None


def env_info() -> dict[str, Any]:
  """Machine and library facts worth recording next to a timing."""
  return {
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "cpu_count": os.cpu_count(),
    "load_avg_1m_at_start": os.getloadavg()[0],
    "python": platform.python_version(),
    "machine": platform.machine(),
  }


def fmt(v: Any, digits: int = 4) -> str:
  """Compact cell text: floats in ``digits`` significant digits, the rest via ``str``."""
  if isinstance(v, float):
    return f"{v:.{digits}g}"
  return str(v)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub markdown table."""
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
  return "\n".join(lines)


def write_outputs(out_dir: str | os.PathLike, name: str, payload: dict, markdown: str) -> Path:
  """Writes ``name.json`` and ``name.md`` under ``out_dir`` and prints the markdown.

  Returns:
    Path of the JSON file.
  """
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"{name}.json"
  path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
  (out / f"{name}.md").write_text(markdown.rstrip() + "\n")
  print(markdown)
  return path
