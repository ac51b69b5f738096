"""The benchmarks' one harness: inputs, timer, isolated runs, JSON and markdown output.

jax is imported inside the functions that use it: a child process that times GeomLoss must not
carry jax's memory in its peak RSS.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------- inputs


def sample(kind: str, key: Any, n: int, d: int = 2) -> Any:
  """``[n, d]`` float32 points of a :data:`gsae_jax.priors.PRIOR_NAMES` prior, or ``"gauss"``:
  ``N(0.5, 1.5² I)``, off the origin and wider than ``N(0, I)`` (a non-trivial transport)."""
  from gsae_jax import priors

  if kind == "gauss":
    return 0.5 + 1.5 * priors.standard_normal(key, n, d)
  return priors.get_prior(kind, dim=d)(key, n)


def clouds(
  n: int, d: int = 2, x: str = "flower", y: str = "standard_normal", seed: int = 0
) -> tuple[Any, Any]:
  """``n`` points of each of :func:`sample` kinds ``x`` and ``y``, from two keys off ``seed``."""
  import jax

  kx, ky = jax.random.split(jax.random.key(seed))
  return jax.block_until_ready((sample(x, kx, n, d), sample(y, ky, n, d)))


# ----------------------------------------------------------------------------- timer


@dataclasses.dataclass
class Timing:
  """One timed function: its result, compile time, first run and warm runs (seconds)."""

  result: Any
  compile_s: float | None
  first_run_s: float
  warm_runs_s: list[float]
  compiled_hwm_mb: float | None = None
  """The process's peak RSS after compiling, before the first run (``jit=True`` only)."""

  @property
  def warm_s(self) -> float | None:
    """Median of the warm runs; ``None`` without any."""
    return statistics.median(self.warm_runs_s) if self.warm_runs_s else None

  @property
  def min_s(self) -> float:
    """Fastest warm run, or the first run without any."""
    return min(self.warm_runs_s, default=self.first_run_s)

  @property
  def seconds(self) -> float:
    """The time to report: the warm median, or the first run without warm runs."""
    return self.first_run_s if self.warm_s is None else self.warm_s

  def fields(self) -> dict[str, Any]:
    """The row fields every benchmark writes: ``compile_s … warm_runs_s``."""
    names = ("compile_s", "first_run_s", "warm_s", "warm_runs_s")
    return {k: getattr(self, k) for k in names}


def _block(tree: Any) -> Any:
  # Without jax loaded nothing can be pending (torch on the CPU is synchronous), and importing
  # it here would add its memory to a torch process's peak RSS.
  jax = sys.modules.get("jax")
  return jax.block_until_ready(tree) if jax else tree


def time_fn(
  fn: Callable[..., Any], *args: Any, repeats: int = 0, budget_s: float = math.inf, jit=True
) -> Timing:
  """Times ``fn(*args)``, waiting for every result; the :class:`Timing`'s result is the first's.

  ``repeats`` warm runs follow the first, none once the last one would take them past
  ``budget_s``. ``jit``: compile ``jax.jit(fn)`` ahead of time for ``args`` (``compile_s``);
  else call ``fn`` as it is (``compile_s`` is ``None``, the first run includes any warm-up).
  """
  compile_s = compiled_hwm = None
  if jit:
    import jax

    t0 = time.perf_counter()
    fn = jax.jit(fn).lower(*args).compile()
    compile_s, compiled_hwm = time.perf_counter() - t0, vm_hwm_mb()

  def once() -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = _block(fn(*args))
    return out, time.perf_counter() - t0

  result, first = once()
  warm: list[float] = []
  while len(warm) < repeats and sum(warm) + (warm[-1] if warm else first) <= budget_s:
    warm.append(once()[1])
  return Timing(result, compile_s, first, warm, compiled_hwm)


# ----------------------------------------------------------------------------- runner


def vm_hwm_mb(pid: int | str = "self") -> float | None:
  """Peak resident set size (VmHWM) of a live process in MiB; ``None`` if unreadable."""
  try:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return None


def _error_line(log: str) -> str:
  lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
  errors = [ln for ln in lines if "Error" in ln and "JAX_TRACEBACK" not in ln]
  return (errors or lines or ["?"])[-1][:300]


def run_isolated(
  target: str,
  kwargs: dict[str, Any],
  timeout_s: float | None = None,
  requires: Sequence[str] = (),
  env: dict[str, str] | None = None,
  poll_s: float = 0.2,
) -> dict[str, Any]:
  """Runs ``"module:function"(**kwargs)`` in a fresh Python process, for its own peak memory.

  The function returns a JSON-able dict; the result is ``{"status": "ok", **that}`` with
  ``peak_rss_mb`` (the process's VmHWM at exit, unless the function set it), or ``{"status":
  "skipped: <requires> not installed"}``, or ``{"status": "failed: <its last error line>" |
  "timeout after N s", "peak_rss_mb": <last VmHWM seen, polled every poll_s>}``. ``env``:
  variables set for the process (e.g. ``OMP_NUM_THREADS``).
  """
  missing = [m for m in requires if importlib.util.find_spec(m) is None]
  if missing:
    return {"status": f"skipped: {', '.join(missing)} not installed"}
  with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
    result, log = Path(tmp) / "result.json", Path(tmp) / "log.txt"
    cmd = [sys.executable, "-m", "benchmarks.harness", target, json.dumps(kwargs), str(result)]
    with log.open("w") as out:
      proc = subprocess.Popen(cmd, stdout=out, stderr=out, env={**os.environ, **(env or {})})
      t0, peak = time.monotonic(), None
      while proc.poll() is None:
        peak = vm_hwm_mb(proc.pid) or peak
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
          proc.kill()
          proc.wait()
          return {"status": f"timeout after {timeout_s:g} s", "peak_rss_mb": peak}
        time.sleep(poll_s)
    if proc.returncode != 0:
      return {"status": f"failed: {_error_line(log.read_text())}", "peak_rss_mb": peak}
    return {"status": "ok", **json.loads(result.read_text())}


def _child(target: str, kwargs: str, result: str) -> None:
  """The process side of :func:`run_isolated`."""
  module, name = target.split(":")
  out = getattr(importlib.import_module(module), name)(**json.loads(kwargs))
  out.setdefault("peak_rss_mb", vm_hwm_mb())
  Path(result).write_text(json.dumps(out, default=float))


# ----------------------------------------------------------------------------- output


def env_info() -> dict[str, Any]:
  """Machine and library facts worth recording next to a timing."""
  import jax

  return {
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "cpu_count": os.cpu_count(),
    "load_avg_1m_at_start": os.getloadavg()[0],
    "python": platform.python_version(),
    "machine": platform.machine(),
  }


def cell(v: Any, digits: int = 4) -> str:
  """Table cell text: ``–`` for ``None``, floats in ``digits`` significant digits."""
  if v is None:
    return "–"
  return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def table(columns: Sequence[tuple], rows: Sequence[dict], digits: int = 4) -> str:
  """A GitHub markdown table of ``rows``, one line each (missing keys read ``–``).

  A column is ``(header, key or function of the row)``, or with a third item, a format spec for
  its values (``".6g"``; else :func:`cell`'s).
  """

  def text(r: dict, g: str | Callable[[dict], Any], spec: str | None = None) -> str:
    v = g(r) if callable(g) else r.get(g)
    return cell(v, digits) if spec is None or v is None else format(v, spec)

  lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(text(r, *c[1:]) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def merge(old: dict, new: dict, key: Callable[[dict], Any]) -> dict:
  """``--append``: ``new``'s rows replace ``old``'s of equal ``key(row)``, sorted by the key.

  The rest is ``new``'s, plus ``runs``: the ``env`` and ``args`` of every run merged so far.
  """
  fresh = {key(r) for r in new["rows"]}
  rows = sorted([r for r in old["rows"] if key(r) not in fresh] + new["rows"], key=key)
  runs = old.get("runs", [{"env": old["env"], "args": old["args"]}])
  return {**new, "rows": rows, "runs": [*runs, {"env": new["env"], "args": new["args"]}]}


def load(path: str | os.PathLike) -> dict:
  """A result JSON."""
  return json.loads(Path(path).read_text())


def write(out_dir: str | os.PathLike, name: str, payload: dict, markdown: str) -> Path:
  """Writes ``name.json`` and ``name.md`` under ``out_dir``, prints the markdown; the JSON path."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"{name}.json"
  path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
  (out / f"{name}.md").write_text(markdown.rstrip() + "\n")
  print(markdown)
  return path


def save(out_dir: str, name: str, payload: dict, markdown: Callable[[dict], str]) -> dict:
  """:func:`write` of ``payload`` and ``markdown(payload)``; returns ``payload``."""
  write(out_dir, name, payload, markdown(payload))
  return payload


# ----------------------------------------------------------------------------- scripts


def parser(doc: str) -> argparse.ArgumentParser:
  """A script's argument parser, described by its docstring's first line."""
  return argparse.ArgumentParser(description=doc.splitlines()[0])


def flags(p: argparse.ArgumentParser, **defaults: Any) -> None:
  """Adds ``--<name>`` for each ``name=default``, typed as the default (a list: one or more
  values of its first item's type)."""
  for name, default in defaults.items():
    if isinstance(default, list):
      p.add_argument(f"--{name}", type=type(default[0]), nargs="+", default=default)
    else:
      p.add_argument(f"--{name}", type=type(default), default=default)


def parse(
  p: argparse.ArgumentParser, argv: Sequence[str] | None, name: str | None = None
) -> argparse.Namespace:
  """Adds ``--out`` (and, given its default ``name``, ``--name``) to ``p``, parses ``argv``."""
  p.add_argument("--out", default="benchmarks/results", help="output directory")
  if name:
    p.add_argument("--name", default=name, help="output file stem")
  return p.parse_args(argv)


def floats(text: str) -> list[float]:
  """A comma-separated list of numbers (a flag's type)."""
  return [float(t) for t in text.split(",") if t.strip()]


def command(module: str, argv: Sequence[str] | None) -> str:
  """The command line that ran ``benchmarks.<module>`` with ``argv`` (``None``: this process's)."""
  return " ".join([f"python -m benchmarks.{module}", *(sys.argv[1:] if argv is None else argv)])


def seconds(row: dict) -> float | None:
  """A run row's time: its warm median, else its first run; ``None`` unless its status is ok."""
  return (row.get("warm_s") or row.get("first_run_s")) if row.get("status") == "ok" else None


def log(text: str) -> None:
  """A progress line, on stderr: stdout carries the table."""
  print(text, file=sys.stderr, flush=True)


def rel_err(a: Any, b: Any) -> float:
  """``‖a − b‖ / ‖b‖`` in float64: over all entries of arrays, ``|a − b| / |b|`` of numbers."""
  import numpy as np

  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


if __name__ == "__main__":
  _child(*sys.argv[1:])
