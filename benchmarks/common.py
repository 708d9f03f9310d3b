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
import numpy as np

import lowbit_jax as lb
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


def check(fn: Callable, x, w, k_major: bool = False) -> str:
  """What `--check` prints for the call fn(x, w) that a row timed: x (M, K) and w (K, N), or (N, K) where
  `k_major`, each an array, a QArray or a prepared weight. "ok" if two calls give the same bits and every output
  lies within the rounding the kernels may do of the float32 product of the dequantized operands (2^-8 of it for a
  bfloat16 output, plus 2^-9 of the sum of |products| for weights rounded to bfloat16 before their MMA or FP8 MMAs
  summing a block in the tensor cores' format), else how many outputs fall outside it and whether the calls
  differ. A race or a wrong scale is off by the output's own size; these bounds are far looser than the tests' and
  far tighter than that."""
  def f32(v):  # (lb.dequantize takes QArrays and prepared weights alike)
    return v.astype(jnp.float32) if isinstance(v, jax.Array) else lb.dequantize(v, jnp.float32)
  a, b = f32(x), f32(w)
  b = b.T if k_major else b
  y1, y2 = np.asarray(fn(x, w), np.float64), np.asarray(fn(x, w), np.float64)
  dot = lambda u, v: np.asarray(jnp.dot(u, v, precision="highest"), np.float64)
  ref = dot(a, b)
  wrong = int((~(np.abs(y1 - ref) <= 2.0 ** -8 * np.abs(ref) + 2.0 ** -9 * dot(jnp.abs(a), jnp.abs(b)))).sum())
  same = np.array_equal(y1, y2, equal_nan=True)
  return " ".join(["ok" if not wrong else f"{wrong} of {y1.size} wrong", "" if same else "(calls differ)"]).strip()


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
