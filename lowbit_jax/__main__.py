"""Demo: `python -m lowbit_jax [--size N]` quantizes a random N x N matrix in every format and reports storage,
error and speed on whatever device JAX finds (CPU included)."""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import lowbit_jax as lb
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


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--size", type=int, default=4096)
  args = p.parse_args()
  dev = jax.devices()[0]
  print(f"lowbit_jax {lb.__version__} on {dev.platform}: {dev.device_kind} (JAX {jax.__version__})")
  x = jax.random.normal(jax.random.key(0), (args.size, args.size), jnp.float32).astype(jnp.bfloat16)
  print(f"\nquantize a {args.size}x{args.size} bfloat16 matrix (N(0, 1)), blocks along the last axis:")
  print("\n".join(quantize_table(x)))


if __name__ == "__main__":
  main()
