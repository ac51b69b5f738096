"""`release_host_memory` against the process's own resident set (``/proc/self/status``)."""

from pathlib import Path

import pytest

from gsae_jax import memory

STATUS = Path("/proc/self/status")
pytestmark = pytest.mark.skipif(
  memory._malloc_trim() is None or not STATUS.exists(), reason="needs glibc and /proc"
)


def _rss_mb() -> float:
  line = next(ln for ln in STATUS.read_text().splitlines() if ln.startswith("VmRSS:"))
  return int(line.split()[1]) / 1024


def test_release_returns_freed_heap_pages():
  # 3 200 blocks of 64 KB, each written (resident), from the heap (below glibc's 128 KB mmap
  # threshold); then all but every 16th freed. The kept ones split the freed 187.5 MB into
  # 960 KB holes that free() cannot return (it trims only the heap's top).
  blocks = [b"\x01" * 65536 for _ in range(3200)]
  kept = blocks[15::16]
  del blocks
  before = _rss_mb()
  assert memory.release_host_memory()
  released = before - _rss_mb()
  # Of each 960 KB hole, all but the pages under the chunk headers go back: ≥ 150 of 187.5 MB.
  assert released >= 150, f"released {released:.0f} MB of 187.5 MB freed"
  assert all(b[0] == 1 and b[-1] == 1 for b in kept)  # live blocks untouched
