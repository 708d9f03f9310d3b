"""A8W8: y = (x_q @ w_q^T) * s_x * s_w with int8 operands, exact int32 accumulation and the scales applied once,
in the epilogue.

Layouts: x (M, K) int8 codes with one scale per row, (M, 1); w (N, K) int8 codes, K-major as the int8 MMA reads
its second operand, with one scale per row (per output channel), (N, 1). Scales are any float dtype (bfloat16 in
the registered formats) and are multiplied in float32: y = (float32(acc) * s_x) * s_w, as
`lowbit_jax.xla.dot_general` computes it. One program computes a (BM, BN) tile, looping over K in steps of BK.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend as _backend

__all__ = ["Int8Config", "int8_matmul"]


@dataclasses.dataclass(frozen=True)
class Int8Config:
  """Tile sizes (powers of two) and launch parameters."""
  bm: int = 128
  bn: int = 256
  bk: int = 128
  num_warps: int = 8
  num_stages: int = 3


def _kernel(x_ref, sx_ref, w_ref, sw_ref, o_ref, *, cfg: Int8Config, m: int, n: int, k: int, backend: str):
  bm, bn, bk = cfg.bm, cfg.bn, cfg.bk
  row_ok = _backend.in_bounds(0, bm, m, dim=0)
  col_ok = _backend.in_bounds(1, bn, n, dim=0)  # rows of the K-major weight tile
  out_col_ok = _backend.in_bounds(1, bn, n, dim=1)

  def ld(ref, idx, mask, shape):
    return _backend.load(ref, idx, None if mask is None else jnp.broadcast_to(mask, shape), 0, backend=backend)

  def body(i, acc):
    ks = pl.ds(i * bk, bk)
    a = ld(x_ref, (slice(None), ks), row_ok, (bm, bk))
    b = ld(w_ref, (slice(None), ks), col_ok, (bn, bk))
    return acc + _backend.dot(a, b, trans_b=True)

  acc = lax.fori_loop(0, k // bk, body, jnp.zeros((bm, bn), jnp.int32))
  sx = ld(sx_ref, (slice(None), slice(None)), row_ok, (bm, 1)).astype(jnp.float32)
  sw = ld(sw_ref, (slice(None), slice(None)), out_col_ok, (1, bn))
  y = (acc.astype(jnp.float32) * sx) * sw.astype(jnp.float32)
  mask = _backend.tile_mask(row_ok, out_col_ok, (bm, bn))
  _backend.store(o_ref, y.astype(o_ref.dtype), mask, backend=backend)


@_backend.jit_op("out_dtype", "backend", "config")
def int8_matmul(x: jax.Array, sx: jax.Array, w: jax.Array, sw: jax.Array, *, out_dtype=jnp.bfloat16,
                backend: str = "triton", config: Int8Config | None = None) -> jax.Array:
  """(x @ w.T) * sx * sw.T for int8 x (M, K), w (N, K) and per-row scales sx (M, 1), sw (N, 1); (M, N) out_dtype.

  K is zero-padded to a multiple of BK (exact: zero codes add nothing).
  """
  cfg = config or Int8Config()
  (m, k), (n, kw) = x.shape, w.shape
  if x.dtype != jnp.int8 or w.dtype != jnp.int8:
    raise ValueError(f"int8_matmul: x and w must be int8 codes, got {x.dtype} and {w.dtype}.")
  if k != kw or sx.shape != (m, 1) or sw.shape != (n, 1):
    raise ValueError(f"int8_matmul: shapes x {x.shape}, sx {sx.shape}, w {w.shape}, sw {sw.shape} do not match "
                     "(M, K), (M, 1), (N, K), (N, 1).")
  bk = min(cfg.bk, max(32, 1 << (k - 1).bit_length()))
  cfg = dataclasses.replace(cfg, bk=bk)
  kp = -(-k // bk) * bk
  if kp != k:
    x, w = jnp.pad(x, ((0, 0), (0, kp - k))), jnp.pad(w, ((0, 0), (0, kp - k)))
  kernel = functools.partial(_kernel, cfg=cfg, m=m, n=n, k=kp, backend=backend)
  return _backend.call(
      kernel, backend=backend, out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(pl.cdiv(m, cfg.bm), pl.cdiv(n, cfg.bn)),
      in_specs=[pl.BlockSpec((cfg.bm, kp), lambda i, j: (i, 0)), pl.BlockSpec((cfg.bm, 1), lambda i, j: (i, 0)),
                pl.BlockSpec((cfg.bn, kp), lambda i, j: (j, 0)), pl.BlockSpec((1, cfg.bn), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((cfg.bm, cfg.bn), lambda i, j: (i, j)),
      num_warps=cfg.num_warps, num_stages=cfg.num_stages, name="int8_matmul")(x, sx, w, sw.reshape(1, n))
