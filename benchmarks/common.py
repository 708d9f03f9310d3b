"""Shared harness for the GPU benchmarks: device facts, a copy-bandwidth baseline, and timing of several
independent calls inside one jitted program (so launch gaps, not Python dispatch, separate the kernels, and
rotating weight sets keep them out of L2)."""

from __future__ import annotations

import collections
import datetime
import glob
import re
import tempfile
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from lowbit_jax.timing import bench

BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100/H200 SXM (REFERENCE section 4)


def header() -> str:
  d = jax.devices()[0]
  return (f"device: {d.device_kind} ({d.platform}), JAX {jax.__version__}, "
          f"{datetime.date.today().isoformat()}")


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
  """Bytes/s of a device read + write pass (negation of a 1 GiB bf16 array)."""
  x = jax.random.normal(jax.random.key(0), (nbytes // 2,), jnp.float32).astype(jnp.bfloat16)
  t = bench(jnp.negative, x)
  return 2 * nbytes / t


def time_calls(fn: Callable, xs: Sequence, ws: Sequence) -> float:
  """Seconds per call of fn(x, w): the calls fn(xs[i], ws[i]) unrolled in one jit (`bench`, which passes the
  operands as flat leaves: flattening QArrays per call had timed the harness, MXFP8 x MXFP4 at 8192^2, M = 16:
  29.9 us per call against 23.9 from leaves; H100, BENCHMARKS.md).

  Every call gets its own activation and its own weights: XLA merges dots that share an operand and reuses a
  dequantized weight across calls, and repeated weights that fit in L2 would be read from it.
  """
  if len(xs) != len(ws):
    raise ValueError("time_calls: one weight set per call")
  return bench(lambda xs, ws: [fn(x, w) for x, w in zip(xs, ws)], list(xs), list(ws), iters=5) / len(xs)


def gpu_us_by_kernel(run: Callable[[], object], calls: int) -> dict[str, tuple[float, float]]:
  """{kernel name: (GPU us per call, launches per call)} of everything `run()` launches on the GPU, by
  `jax.profiler`, `calls` being how many calls (or decode steps) one run() makes. Names are the profiler's with
  trailing instance numbers dropped, so the launches of one kernel or fusion kind add up. Profiler time, not wall
  time: at a few microseconds per kernel, timing from the host measures the host (BENCHMARKS.md)."""
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      jax.block_until_ready(run())
    data = jax.profiler.ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
  by = collections.defaultdict(lambda: [0.0, 0])
  for plane in data.planes:
    if "GPU" not in plane.name:
      continue
    for line in plane.lines:
      for ev in (ev for ev in line.events if "tream" in line.name and "emcpy" not in ev.name):
        entry = by[re.sub(r"([._]\d+)+$", "", ev.name)]
        entry[0] += ev.duration_ns / 1e3
        entry[1] += 1
  return {name: (us / calls, n / calls) for name, (us, n) in by.items()}
