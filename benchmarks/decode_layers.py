"""GPU time per call of the e2e LM's weight-only layers at decode (M = 1), by Mosaic kernel configuration.

For each layer shape of the benchmarks/e2e_decode.py model (qkv, o, gate/up, down, LM head) and each weight format
(prepared K-major weights, `lb.prepare`): XLA bf16 `x @ w.T`, then the kernel under each split:groups:stages
configuration, timed by `jax.profiler` as the GPU time of the whole call (the kernel plus XLA's sum of split-K
partials). Each call reads the next of 8 distinct weights, so the weight streams from HBM as in a decode step
(one weight of these 2-32 MB would sit in L2). Profiler time, not wall time: at a few microseconds per call, timing
many calls from the host measures the host (BENCHMARKS.md).

Usage (from the repository root, on a Hopper GPU):
  PYTHONPATH=. python benchmarks/decode_layers.py [--formats int4_g128_sym,mxfp4] [--shapes 16384x2048,...]
"""

from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp

import lowbit_jax as lb
from benchmarks.common import gpu_us_by_kernel, header
from pallas_kernels.dequant_gemv_mosaic import Config, default_config, dequant_gemv

SHAPES = "3072x2048,2048x2048,16384x2048,2048x8192,32000x2048"  # qkv, o, gate/up, down, LM head (N x K)
CALLS, COPIES = 24, 8


def gpu_us(fn, x, ws) -> tuple[float, float]:
  """(GPU us per call of fn(x, w) over every kernel it launches, of which in Mosaic GPU kernels), by the profiler."""
  f = jax.jit(fn)
  jax.block_until_ready(f(x, ws[0]))
  by = gpu_us_by_kernel(lambda: [f(x, ws[i % len(ws)]) for i in range(CALLS)], CALLS)
  return sum(us for us, _ in by.values()), sum(us for name, (us, _) in by.items() if "mosaic" in name)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--formats", default="int4_g128_sym")
  p.add_argument("--shapes", default=SHAPES)
  p.add_argument("--splits", default="1,2,4,8,16")
  p.add_argument("--groups", default="1,2,4")
  p.add_argument("--stages", default="2,4")
  a = p.parse_args()
  print(header())
  for fmt, shape in itertools.product(a.formats.split(","), a.shapes.split(",")):
    n, k = map(int, shape.split("x"))
    x = jax.random.normal(jax.random.key(0), (1, k), jnp.float32).astype(jnp.bfloat16)
    w16 = [jax.random.normal(jax.random.key(1 + i), (n, k), jnp.float32).astype(jnp.bfloat16) for i in range(COPIES)]
    ws = [lb.prepare(lb.quantize(w, fmt, axis=1)) for w in w16]
    bf16, _ = gpu_us(lambda x, w: x @ w.T, x, w16)
    del w16
    default = default_config(n, k, 1, lb.get_format(fmt).element_type.bits)
    print(f"\n({n}, {k}) {fmt}: XLA bf16 {bf16:.2f} us per call; default {default}")
    print("| split:groups:stages | call us | of which kernel us | vs bf16 |\n|---|---|---|---|", flush=True)
    for split, groups, stages in itertools.product(*(map(int, s.split(",")) for s in (a.splits, a.groups,
                                                                                           a.stages))):
      if k % (128 * groups * split):
        continue
      cfg = Config(split=split, groups=groups, stages=stages)
      t, kernel = gpu_us(lambda x, w, cfg=cfg: dequant_gemv(x, w, config=cfg), x, ws)
      mark = " (default)" if cfg == default else ""
      print(f"| {split}:{groups}:{stages}{mark} | {t:.2f} | {kernel:.2f} | {bf16 / t:.2f}x |", flush=True)


if __name__ == "__main__":
  main()
