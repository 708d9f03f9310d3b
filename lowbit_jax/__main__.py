"""Demo: `python -m lowbit_jax [--size N]` quantizes a random N x N matrix in every format and reports storage,
error and speed, then multiplies activations by the quantized weights and reports error and speed against a
bfloat16 matmul, on whatever device JAX finds (CPU included)."""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import lowbit_jax as lb
from lowbit_jax import dispatch
from lowbit_jax.timing import bench


def sqnr_db(x: jax.Array, y: jax.Array) -> float:
  """Signal-to-quantization-noise ratio of y against x, in dB."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return float(10 * np.log10(np.sum(x * x) / max(np.sum((x - y) ** 2), 1e-300)))


def quantize_table(x: jax.Array) -> list[str]:
  rows = [f"{'format':<20}{'bits/el':>8}{'MiB':>9}{'SQNR dB':>9}{'max |err|':>11}{'quant ms':>10}{'dequant ms':>11}"]
  for name in lb.formats():
    q = lb.quantize(x, name)
    y = lb.dequantize(q, jnp.float32)
    tq = bench(lambda v: lb.quantize(v, name), x, iters=3)
    td = bench(lb.dequantize, q, iters=3)
    err = float(jnp.max(jnp.abs(y - x.astype(jnp.float32))))
    rows.append(f"{name:<20}{q.bits_per_element:>8.3f}{q.nbytes / 2**20:>9.2f}{sqnr_db(x, y):>9.2f}"
                f"{err:>11.4f}{tq * 1e3:>10.2f}{td * 1e3:>11.2f}")
  return rows


MATMUL_FORMATS = ("mxfp4", "nvfp4", "int4_g128_sym", "mxfp6_e2m3", "mxfp8_e4m3", "int8_channel_sym")


def matmul_table(w: jax.Array, rows: int) -> list[str]:
  """x (rows, K) @ W with W quantized along K, against the bf16 matmul (time) and the float32 product (error)."""
  x = jax.random.normal(jax.random.key(1), (rows, w.shape[0]), jnp.float32).astype(jnp.bfloat16)
  exact = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest")
  t_bf16 = bench(jnp.dot, x, w, iters=3)
  rows_out = [f"{'weights':<20}{'path':>8}{'rel. error':>12}{'ms':>9}{'vs bf16':>9}",
              f"{'bfloat16':<20}{'xla':>8}{_rel(jnp.dot(x, w), exact):>12.2e}{t_bf16 * 1e3:>9.3f}{1.0:>8.2f}x"]
  for name in MATMUL_FORMATS:
    q = lb.quantize(w, name, axis=0)
    path = dispatch.choose(None, x, q, (((1,), (0,)), ((), ())), rows)
    t = bench(lb.matmul, x, q, iters=3)
    rows_out.append(f"{name:<20}{path:>8}{_rel(lb.matmul(x, q), exact):>12.2e}{t * 1e3:>9.3f}{t_bf16 / t:>8.2f}x")
  return rows_out


def _rel(y: jax.Array, ref: jax.Array) -> float:
  """Relative Frobenius error of y against ref."""
  y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--size", type=int, default=4096)
  args = p.parse_args()
  dev = jax.devices()[0]
  print(f"lowbit_jax {lb.__version__} on {dev.platform}: {dev.device_kind} (JAX {jax.__version__})")
  x = jax.random.normal(jax.random.key(0), (args.size, args.size), jnp.float32).astype(jnp.bfloat16)
  print(f"\nquantize a {args.size}x{args.size} bfloat16 matrix (N(0, 1)), blocks along the last axis:")
  print("\n".join(quantize_table(x)))
  for rows in (16, 512):
    print(f"\nmatmul: x ({rows}, {args.size}) bfloat16 @ W ({args.size}, {args.size}) quantized along K "
          "(error against the float32 product of the unquantized operands):")
    print("\n".join(matmul_table(x, rows)))


if __name__ == "__main__":
  main()
