"""Shared fixtures: float64 context and small deterministic point clouds."""

import jax
import numpy as np
import pytest


@pytest.fixture
def x64():
  """Runs the test with float64 enabled (restored afterwards)."""
  with jax.enable_x64(True):
    yield


def flower_numpy(rng: np.random.Generator, n: int) -> np.ndarray:
  """The GSAE flower prior from its formula, independently of gsae_jax.priors (for OT tests)."""
  k = np.arange(n) % 10
  alpha = 2 * np.pi * k / 10
  radial = 3.0 + rng.normal(size=n)
  tangential = 0.1 * rng.normal(size=n)
  c, s = np.cos(alpha), np.sin(alpha)
  return np.stack([c * radial - s * tangential, s * radial + c * tangential], axis=1)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_code():
  """Drops JAX's compiled executables after each test module.

  XLA:CPU maps each executable's code into its own memory regions (≈ 3–4 per compilation);
  one process running the whole slow suite reached the kernel's `vm.max_map_count` (65 530)
  and LLVM aborted mid-compile. Clearing per module bounds the count by the largest module's.
  """
  yield
  jax.clear_caches()
