"""Wall-clock timing of jitted calls, shared by the demo and benchmarks/."""

from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np

__all__ = ["bench"]


def bench(fn: Callable, *args, warmup: int = 2, iters: int = 10, min_time: float = 0.05) -> float:
  """Median seconds per call of `fn(*args)` after `warmup` calls (compilation included there).

  Each sample times a batch of calls sized so that it lasts at least `min_time`, so launch overhead and
  the clock's resolution do not dominate short kernels.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  one = max(time.perf_counter() - t0, 1e-7)
  reps = max(1, int(min_time / one))
  samples = []
  for _ in range(iters):
    t0 = time.perf_counter()
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / reps)
  return float(np.median(samples))
