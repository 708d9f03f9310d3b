"""Block FP8 (1x128 activations x 128x128 weights, K-major) kernels side by side on the GPU, timed in one run.

For each (N, K) weight shape and M: XLA bf16 `a @ b.T`, XLA's per-tensor FP8 GEMM (`a @ b.T` on float8_e4m3fn
operands: no block scales, its fastest FP8 layout), the Triton kernel (`jax_triton`, where installed), the Mosaic
GPU kernel in its default configuration (`default_config`: what dispatch runs) and in each configuration asked for
(K blocks in flight x compute warpgroups x cluster rows x cluster columns [x clusters launched], as `4x3x1x2`;
4 stages, 2 warpgroups, no cluster and the default launch where left out; 0 clusters launched: one per tile, no
persistent programs). TFLOP/s and the ratios the issue's targets name (>= 1.5x bf16, >= 0.8x XLA's FP8
GEMM) are the default configuration's. Activations and weights are quantized before timing. `--check` adds a last
column: each Mosaic configuration's output checked (`benchmarks.common.check`), "ok" or the configurations that fail.

Usage (Hopper):
  PYTHONPATH=. python benchmarks/block_fp8.py [--shapes 8192x8192,28672x8192] [--ms 16,2048,8192] [--configs 4,4x3]
                                             [--check]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import lowbit_jax as lb
from benchmarks.common import check, header, time_calls
from pallas_kernels import scaled_matmul_mosaic as mosaic
from pallas_kernels.backend import jax_triton_available
from pallas_kernels.fp8_block_matmul import fp8_block_matmul

CALLS = 2  # independent calls per timed program, each with its own operands


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shapes", default="8192x8192,28672x8192,8192x28672")
  p.add_argument("--ms", default="16,2048,8192")
  p.add_argument("--configs", default="",
                 help="more Mosaic configurations: stages[xwarpgroups[xrowsxcolumns[xprograms]]]")
  p.add_argument("--check", action="store_true", help="check each Mosaic configuration's output (last column)")
  a = p.parse_args()
  configs = [[*map(int, c.split("x"))] for c in a.configs.split(",") if c]
  configs = [tuple(c + [4, 2, 1, 1, -1][len(c):]) for c in configs]  # (stages, warpgroups, rows, columns, programs)
  print(header())
  print("| M | N | K | bf16 us | XLA FP8 us | Triton us | Mosaic default | us | " +
        "".join(f"{'x'.join(map(str, c))} us | " for c in configs) +
        "Mosaic TFLOP/s | Mosaic vs bf16 | Triton vs bf16 | Mosaic vs XLA FP8 |" + " check |" * a.check)
  print("|---|---|---|---|---|---|---|---|" + "---|" * (len(configs) + a.check) + "---|---|---|---|", flush=True)
  for shape in a.shapes.split(","):
    n, k = map(int, shape.split("x"))
    for m in map(int, a.ms.split(",")):
      keys = jax.random.split(jax.random.key(m), 2 * CALLS)
      xs = [jax.random.normal(key, (m, k), jnp.float32).astype(jnp.bfloat16) for key in keys[:CALLS]]
      ws = [(jax.random.normal(key, (n, k), jnp.float32) * 0.02).astype(jnp.bfloat16) for key in keys[CALLS:]]
      nt = lambda x, w: jnp.einsum("mk,nk->mn", x, w, preferred_element_type=jnp.bfloat16)
      t_bf16 = time_calls(nt, xs, ws)
      t_fp8 = time_calls(nt, [x.astype(jnp.float8_e4m3fn) for x in xs], [w.astype(jnp.float8_e4m3fn) for w in ws])
      qas = [lb.quantize(x, "fp8_block_1x128", axis=1) for x in xs]
      qws = [lb.quantize(w, "fp8_block_128x128") for w in ws]
      del xs, ws
      t_triton = float("nan")
      if jax_triton_available():
        t_triton = time_calls(lambda qa, qw: fp8_block_matmul(qa.data, qa.scale, qw.data, qw.scale, n=n, k_major=True,
                                                              backend="jax_triton"), qas, qws)
      kernel = lambda **kw: lambda qa, qw: mosaic.fp8_block_matmul(
          qa.data, qa.scale, qw.data, qw.scale, out_dtype=jnp.bfloat16, backend="mosaic", **kw)
      variants = {"default": {}, **{"x".join(map(str, c)): dict(
          stages=c[0], wgs=c[1], cluster=c[2:4],
          programs=None if c[4] < 0 else c[4] or mosaic.tile_count(m, n, c[1], c[2:4])) for c in configs}}
      t, *ts = [time_calls(kernel(**kw), qas, qws) for kw in variants.values()]
      checked = ""
      if a.check:
        results = {name: check(kernel(**kw), qas[0], qws[0], k_major=True) for name, kw in variants.items()}
        checked = " " + ("ok" if set(results.values()) == {"ok"} else
                         "; ".join(f"{name}: {r}" for name, r in results.items() if r != "ok")) + " |"
      wgs, cluster = mosaic.default_config(m, n)
      print(f"| {m} | {n} | {k} | {t_bf16 * 1e6:.0f} | {t_fp8 * 1e6:.0f} | {t_triton * 1e6:.0f} | "
            f"4x{wgs}x{cluster[0]}x{cluster[1]} | {t * 1e6:.0f} | " + "".join(f"{v * 1e6:.0f} | " for v in ts) +
            f"{2 * m * n * k / t / 1e12:.0f} | {t_bf16 / t:.2f}x | {t_bf16 / t_triton:.2f}x | {t_fp8 / t:.2f}x |"
            + checked, flush=True)


if __name__ == "__main__":
  main()
