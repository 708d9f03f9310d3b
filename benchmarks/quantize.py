"""Quantize and dequantize throughput on the GPU: an 8192 x 8192 bfloat16 array in every format.

Prints a markdown table: time, GB/s (bytes read + written) and the fraction of a device copy's bandwidth measured
in the same run. Usage: python benchmarks/quantize.py [--size 8192] [--formats mxfp4,nvfp4]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import lowbit_jax as lb
from benchmarks.common import copy_bandwidth, header
from lowbit_jax.timing import bench


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--size", type=int, default=8192)
  p.add_argument("--formats", default=",".join(lb.formats()))
  args = p.parse_args()
  n = args.size
  x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(jnp.bfloat16)
  bw = copy_bandwidth()
  print(header())
  print(f"device copy: {bw / 1e9:.0f} GB/s; input {n}x{n} bfloat16\n")
  print("| format | quantize us | GB/s | of copy | dequantize us | GB/s | of copy |")
  print("|---|---|---|---|---|---|---|")
  for name in args.formats.split(","):
    qf = jax.jit(lambda v, name=name: lb.quantize(v, name))
    q = qf(x)
    df = jax.jit(lambda q: lb.dequantize(q))
    moved = x.nbytes + q.nbytes
    tq, td = bench(qf, x), bench(df, q)
    print(f"| {name} | {tq * 1e6:.0f} | {moved / tq / 1e9:.0f} | {moved / tq / bw:.2f} | {td * 1e6:.0f} | "
          f"{moved / td / 1e9:.0f} | {moved / td / bw:.2f} |", flush=True)


if __name__ == "__main__":
  main()
