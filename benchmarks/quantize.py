"""Quantize and dequantize throughput on the GPU: an 8192 x 8192 bfloat16 array in every format.

Prints a markdown table: time, GB/s (bytes read + written) and the fraction of a device copy's bandwidth measured
in the same run. Formats with a tensor scale get two quantize rows: the scale computed from the array (one more
read of it) and given (static calibration). `--sweep` times the fused kernels of pallas_kernels/quantize.py over
tile shapes instead.

Usage: python benchmarks/quantize.py [--size 8192] [--formats mxfp4,nvfp4] [--sweep 4:1024:4,8:2048:8]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import lowbit_jax as lb
from benchmarks.common import copy_bandwidth, header
from lowbit_jax.timing import bench


def _row(label, moved, tq, td, bw) -> str:
  cells = [f"{t * 1e6:.0f} | {moved / t / 1e9:.0f} | {moved / t / bw:.2f}" if t else " | | " for t in (tq, td)]
  return f"| {label} | {cells[0]} | {cells[1]} |"


def table(x, names, bw) -> None:
  print("| format | quantize us | GB/s | of copy | dequantize us | GB/s | of copy |")
  print("|---|---|---|---|---|---|---|")
  for name in names:
    qf = jax.jit(lambda v, name=name: lb.quantize(v, name))
    q = qf(x)
    moved = x.nbytes + q.nbytes
    print(_row(name, moved, bench(qf, x), bench(jax.jit(lambda q: lb.dequantize(q)), q), bw), flush=True)
    if q.tensor_scale is not None:
      qg = jax.jit(lambda v, g, name=name: lb.quantize(v, name, tensor_scale=g))
      print(_row(f"{name} (given tensor scale)", moved, bench(qg, x, q.tensor_scale), None, bw), flush=True)


def sweep(x, names, configs, bw) -> None:
  from pallas_kernels.quantize import dequantize_rows, quantize_rows
  print("| format | rows x cols, warps | quantize us | of copy | dequantize us | of copy |")
  print("|---|---|---|---|---|---|")
  for name in names:
    fmt = lb.get_format(name)
    q = lb.quantize(x, fmt)
    moved = x.nbytes + q.nbytes
    for c in configs:
      r, cols, w = map(int, c.split(":"))
      kw = dict(block_rows=r, block_cols=cols, num_warps=w)
      tq = bench(jax.jit(lambda v: quantize_rows(v, fmt, q.tensor_scale, **kw)), x)
      td = bench(jax.jit(lambda d, s: dequantize_rows(d, s, fmt, x.dtype, q.tensor_scale, **kw)), q.data, q.scale)
      print(f"| {name} | {r} x {cols}, {w} | {tq * 1e6:.0f} | {moved / tq / bw:.2f} | {td * 1e6:.0f} | "
            f"{moved / td / bw:.2f} |", flush=True)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--size", type=int, default=8192)
  p.add_argument("--formats", default=",".join(lb.formats()))
  p.add_argument("--sweep", default=None, help="rows:cols:warps tile configs of the fused kernels, comma-separated")
  args = p.parse_args()
  n = args.size
  x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(jnp.bfloat16)
  bw = copy_bandwidth()
  print(header())
  print(f"device copy: {bw / 1e9:.0f} GB/s; input {n}x{n} bfloat16\n")
  names = args.formats.split(",")
  if args.sweep:
    sweep(x, names, args.sweep.split(","), bw)
  else:
    table(x, names, bw)


if __name__ == "__main__":
  main()
