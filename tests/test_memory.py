"""`release_host_memory` against the process's own resident set (``/proc/self/status``)."""

import pytest

from gsae_jax import memory

pytestmark = pytest.mark.skipif(
  memory._malloc_trim() is None or memory.rss_mb() is None, reason="needs glibc and /proc"
)


def test_release_returns_freed_heap_pages():
  # 3 200 blocks of 64 KB, each written (resident), from the heap (below glibc's 128 KB mmap
  # threshold); then all but every 16th freed. The kept ones split the freed 187.5 MB into
  # 960 KB holes that free() cannot return (it trims only the heap's top).
  blocks = [b"\x01" * 65536 for _ in range(3200)]
  kept = blocks[15::16]
  del blocks
  before = memory.rss_mb()
  assert memory.release_host_memory()
  released = before - memory.rss_mb()
  # Of each 960 KB hole, all but the pages under the chunk headers go back: ≥ 150 of 187.5 MB.
  assert released >= 150, f"released {released:.0f} MB of 187.5 MB freed"
  assert all(b[0] == 1 and b[-1] == 1 for b in kept)  # live blocks untouched


def test_rss_matches_proc_status():
  with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
  assert memory.rss_mb() == pytest.approx(vm / 1024, abs=16)  # the read itself may allocate
