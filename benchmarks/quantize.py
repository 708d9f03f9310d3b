"""Quantize and dequantize throughput on the GPU: an 8192 x 8192 bfloat16 array in every format.

Prints a markdown table: time, GB/s (bytes read + written) and the fraction of a device copy's bandwidth measured
in the same run. Formats with a tensor scale get two quantize rows: the scale computed from the array (one more
read of it) and given (static calibration). `--axis 0` blocks along the first axis instead, as a (K, N) weight is
quantized along K. `--sweep` times the fused kernels of pallas_kernels/quantize.py over tile shapes instead (with
`--axis 0`: the column dequantize kernel).

Usage: python benchmarks/quantize.py [--size 8192] [--formats mxfp4,nvfp4] [--axis 0] [--sweep 4:1024:4,8:2048:8]
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


def table(x, names, bw, axis) -> None:
  print("| format | quantize us | GB/s | of copy | dequantize us | GB/s | of copy |")
  print("|---|---|---|---|---|---|---|")
  for name in names:
    qf = jax.jit(lambda v, name=name: lb.quantize(v, name, axis=axis))
    q = qf(x)
    moved = x.nbytes + q.nbytes
    print(_row(name, moved, bench(qf, x), bench(lb.dequantize, q), bw), flush=True)
    if q.tensor_scale is not None:
      qg = lambda v, g, name=name: lb.quantize(v, name, axis=axis, tensor_scale=g)
      print(_row(f"{name} (given tensor scale)", moved, bench(qg, x, q.tensor_scale), None, bw), flush=True)


def sweep(x, names, configs, bw, axis) -> None:
  from pallas_kernels.quantize import dequantize_cols, dequantize_rows, quantize_rows
  print("| format | rows x cols, warps | quantize us | of copy | dequantize us | of copy |")
  print("|---|---|---|---|---|---|")
  for name in names:
    fmt = lb.get_format(name)
    q = lb.quantize(x, fmt, axis=axis)
    moved = x.nbytes + q.nbytes
    for c in configs:
      r, cols, w = map(int, c.split(":"))
      kw = dict(block_rows=r, block_cols=cols, num_warps=w)
      if axis == 0:  # weights: the column kernel dequantizes; quantize is XLA's
        tq = None
        td = bench(lambda q: dequantize_cols(q.data, q.scale, fmt, x.dtype, q.tensor_scale, q.zero_point, **kw), q)
      else:
        tq = bench(lambda v: quantize_rows(v, fmt, q.tensor_scale, **kw), x)
        td = bench(lambda d, s: dequantize_rows(d, s, fmt, x.dtype, q.tensor_scale, **kw), q.data, q.scale)
      quant = f"{tq * 1e6:.0f} | {moved / tq / bw:.2f}" if tq else " | "
      print(f"| {name} | {r} x {cols}, {w} | {quant} | {td * 1e6:.0f} | {moved / td / bw:.2f} |", flush=True)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--size", type=int, default=8192)
  p.add_argument("--formats", default=",".join(lb.formats()))
  p.add_argument("--axis", type=int, default=-1, help="the block axis: -1 (rows, activations) or 0 (weights)")
  p.add_argument("--sweep", default=None, help="rows:cols:warps tile configs of the fused kernels, comma-separated")
  args = p.parse_args()
  n = args.size
  x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(jnp.bfloat16)
  bw = copy_bandwidth()
  print(header())
  print(f"device copy: {bw / 1e9:.0f} GB/s; input {n}x{n} bfloat16 blocked along axis {args.axis}\n")
  names = args.formats.split(",")
  if args.sweep:
    sweep(x, names, args.sweep.split(","), bw, args.axis)
  else:
    table(x, names, bw, args.axis)


if __name__ == "__main__":
  main()
