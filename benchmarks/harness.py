"""The benchmarks' one harness: inputs, timer, isolated runs, flags, JSON and markdown output.

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


def clouds(n: int, d: int = 2, x="flower", y="standard_normal", seed: int = 0) -> tuple[Any, Any]:
  """``n`` points of each of :func:`sample` kinds ``x`` and ``y``, from two keys off ``seed``."""
  import jax

  kx, ky = jax.random.split(jax.random.key(seed))
  return jax.block_until_ready((sample(x, kx, n, d), sample(y, ky, n, d)))


# ----------------------------------------------------------------------------- timer
@dataclasses.dataclass
class Timing:
  """One timed function: its result, compile time, first and warm runs (seconds), and the
  process's peak RSS after compiling, before the first run (``jit=True`` only)."""

  result: Any
  compile_s: float | None
  first_run_s: float
  warm_runs_s: list[float]
  compiled_hwm_mb: float | None = None

  @property
  def warm_s(self) -> float | None:
    """Median of the warm runs; ``None`` without any."""
    return statistics.median(self.warm_runs_s) if self.warm_runs_s else None

  @property
  def seconds(self) -> float:
    """The time to report: the warm median, or the first run without warm runs."""
    return self.first_run_s if self.warm_s is None else self.warm_s

  def fields(self) -> dict[str, Any]:
    """The row fields every benchmark writes: ``compile_s … warm_runs_s``."""
    return {k: getattr(self, k) for k in ("compile_s", "first_run_s", "warm_s", "warm_runs_s")}


def _block(tree: Any) -> Any:
  # Without jax loaded nothing can be pending (torch on the CPU is synchronous), and importing
  # it here would add its memory to a torch process's peak RSS.
  jax = sys.modules.get("jax")
  return jax.block_until_ready(tree) if jax else tree


def time_fn(
  fn: Callable, *args: Any, repeats: int = 0, budget_s=math.inf, jit=True, release=False
) -> Timing:
  """Times ``fn(*args)`` and ``repeats`` warm runs (none once the next would pass ``budget_s``),
  waiting for every result; the result is the first's. ``jit``: compile ``jax.jit(fn)`` for
  ``args`` first (``compile_s``), else call ``fn`` as it is (the first run includes any warm-up).
  ``release``: :func:`gsae_jax.memory.release_host_memory` after compiling (``jit`` only).
  """
  compile_s = compiled_hwm = None
  if jit:
    import jax

    t0 = time.perf_counter()
    fn = jax.jit(fn).lower(*args).compile()
    compile_s, compiled_hwm = time.perf_counter() - t0, vm_hwm_mb()
    if release:
      from gsae_jax.memory import release_host_memory

      release_host_memory()

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
  target: str, kwargs: dict, timeout_s: float | None = None, requires=(), env: dict | None = None
) -> dict[str, Any]:
  """Runs ``"module:function"(**kwargs)`` in a fresh Python process (``env`` added), for its own
  peak memory: ``{"status": "ok", **its dict}`` with ``peak_rss_mb`` (VmHWM at exit, unless set),
  or a status ``"skipped: … not installed"``, ``"failed: <last error line>"`` or ``"timeout after
  N s"`` (the last two with the last VmHWM seen, polled every 0.2 s)."""
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
        time.sleep(0.2)
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

  env = {"jax": jax.__version__, "backend": jax.default_backend(), "cpu_count": os.cpu_count()}
  env["load_avg_1m_at_start"] = os.getloadavg()[0]
  return env | {"python": platform.python_version(), "machine": platform.machine()}


def cell(v: Any, digits: int = 4) -> str:
  """Table cell text: ``–`` for ``None``, floats in ``digits`` significant digits."""
  return "–" if v is None else f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def columns(specs: Sequence[tuple | str]) -> list[tuple]:
  """Table columns: ``(header, key or function of the row)``, or with a third item, a format
  spec for its values (``".6g"``; else :func:`cell`'s). A string stands for columns
  ``"header=key:spec, …"``, ``=key`` left out where it is the header, ``:spec`` optional."""

  def parse(c: str) -> tuple:
    c, _, spec = c.partition(":")
    head, _, key = c.rpartition("=")
    return head or key, key, spec

  return [x for c in specs for x in (map(parse, c.split(", ")) if isinstance(c, str) else [c])]


def table(specs: Sequence[tuple | str], rows: Sequence[dict], digits: int = 4) -> str:
  """A GitHub markdown table of ``rows`` in :func:`columns` ``specs``, one line each (missing
  keys read ``–``)."""

  def text(r: dict, g: str | Callable[[dict], Any], spec: str | None = None) -> str:
    v = g(r) if callable(g) else r.get(g)
    return cell(v, digits) if not spec or v is None else format(v, spec)

  cols = columns(specs)
  lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(text(r, *c[1:]) for c in cols) + " |" for r in rows]
  return "\n".join(lines)


def merge(old: dict, new: dict, key: Callable[[dict], Any]) -> dict:
  """``--append``: ``new``'s rows replace ``old``'s of equal ``key(row)``, sorted by the key; the
  rest is ``new``'s, plus ``runs``: the ``env`` and ``args`` of every run merged so far."""
  fresh = {key(r) for r in new["rows"]}
  rows = sorted([r for r in old["rows"] if key(r) not in fresh] + new["rows"], key=key)
  runs = old.get("runs", [{"env": old["env"], "args": old["args"]}])
  return {**new, "rows": rows, "runs": [*runs, {"env": new["env"], "args": new["args"]}]}


def load(path: str | os.PathLike) -> dict:
  """A result JSON."""
  return json.loads(Path(path).read_text())


def save(out_dir: str | os.PathLike, name: str, payload: dict, markdown: Callable) -> dict:
  """Writes ``name.json`` and ``name.md`` (``markdown(payload)``, printed too) under ``out_dir``;
  returns ``payload``."""
  out, md = Path(out_dir), markdown(payload)
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
  (out / f"{name}.md").write_text(md.rstrip() + "\n")
  print(md)
  return payload


# ----------------------------------------------------------------------------- scripts
def parser(doc: str, **specs: Any) -> argparse.ArgumentParser:
  """A script's argument parser, described by its docstring's first line, with :func:`flags`."""
  p = argparse.ArgumentParser(description=doc.splitlines()[0])
  flags(p, **specs)
  return p


def flags(p: argparse.ArgumentParser, **specs: Any) -> None:
  """Adds ``--<name>`` for each ``name=default`` or ``name=(default, help[, choices])``, typed
  as the default: a list takes one or more values of its first item's type (an empty list: any
  number of strings), ``False`` makes a switch."""
  for name, spec in specs.items():
    default, doc, choices = (*spec, None)[:3] if isinstance(spec, tuple) else (spec, None, None)
    kw = {"default": default, "help": doc, "choices": choices, "type": type(default)}
    if default is False:
      kw = {"action": "store_true", "help": doc}
    elif isinstance(default, list):
      kw |= {"nargs": "+" if default else "*", "type": type(default[0]) if default else None}
    p.add_argument(f"--{name}", **kw)


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None, name=None) -> argparse.Namespace:
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
