"""Wall-clock timing of jitted calls, shared by the demo and benchmarks/."""

from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np

__all__ = ["bench"]


def bench(fn: Callable, *args, warmup: int = 2, iters: int = 10, min_time: float = 0.05) -> float:
  """Median seconds per call of `fn(*args)`, compiled with `jax.jit`, after `warmup` calls (compilation included
  there).

  The arguments go into the jit as their flat leaves and are rebuilt inside it: flattening QArrays (custom pytree
  nodes, flattened in Python) on every call took longer than the GPU work of short calls (BENCHMARKS.md, MXFP8 x
  MXFP4 at M <= 16). Each sample times a batch of calls sized so that it lasts at least `min_time`, so launch
  overhead and the clock's resolution do not dominate short kernels.

  Example:
    >>> import jax.numpy as jnp
    >>> bench(jnp.dot, jnp.ones((8, 8)), jnp.ones((8, 8)), iters=2) > 0
    True
  """
  leaves, tree = jax.tree.flatten(args)
  call = jax.jit(lambda leaves: fn(*jax.tree.unflatten(tree, leaves)))
  for _ in range(warmup):
    jax.block_until_ready(call(leaves))
  t0 = time.perf_counter()
  jax.block_until_ready(call(leaves))
  one = max(time.perf_counter() - t0, 1e-7)
  reps = max(1, int(min_time / one))
  samples = []
  for _ in range(iters):
    t0 = time.perf_counter()
    for _ in range(reps):
      out = call(leaves)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / reps)
  return float(np.median(samples))
