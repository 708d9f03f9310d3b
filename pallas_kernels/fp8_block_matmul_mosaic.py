"""The block-FP8 GEMM in Pallas Mosaic GPU (Hopper), beside the Triton kernel of fp8_block_matmul_triton.py: the
same blocking and layouts (fp8_block_matmul.py), K-major (N, K) weights only.

A program owns a (128, 128) tile of the output: two compute warpgroups of 64 rows each, and a third warpgroup that
issues the TMA copies (`emit_pipeline_warp_specialized`), `stages` 128-deep K blocks in flight. Per block a compute
warpgroup runs its FP8 wgmmas into a fresh float32 accumulator (the tensor cores' own accumulation over the block,
as in the Triton kernel), waits for them and promotes the block into its float32 sum in registers: sum += part *
(row's activation scale * tile's weight scale). While one warpgroup promotes, the other's MMAs keep the tensor
cores busy (DeepGEMM's overlap; the Triton kernel waits with its whole program).

Operands as the kernel reads them (the wrapper prepares them): `a` (M, K) FP8, more than 8 rows padded to a
multiple of 8 (TMA's 8-row tiling; rows past the array read as zeros); `sa_t` (K / 128, M') float32, the activation scales transposed so that a block's 128 row
scales are one TMA row (M' = M rounded up to 4: 16-byte row strides); `b` (N, K) FP8 with N a multiple of 128;
`sb32` (N / 128, 32 K / 128) float32, each block's scale followed by 31 zeros: a step reads its scale as the first
value of a 128-byte TMA box (every shared-memory slot a TMA writes must be 128-byte aligned; 16-byte slots of
scales faulted with a misaligned address).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend as _backend

__all__ = ["BLOCK", "fp8_block_matmul"]

BLOCK = 128  # K per scale block, output columns per program, rows per program (two warpgroups of 64)
_WG_ROWS = 64  # the wgmma M
_SB_BOX = 32  # float32 values per TMA box of weight scales: 128 bytes
_GROUP = 8  # row tiles launched together over each column tile (they share its weights in L2)


def _kernel(a_gmem, sat_gmem, b_gmem, sb_gmem, o_gmem, *, steps: int, stages: int, m_tiles: int, n_tiles: int,
            backend: str):
  import jax.experimental.pallas.mosaic_gpu as plgpu
  interpret = backend == "mosaic_interpret"
  # Grouped launch order: _GROUP row tiles run over each column tile in turn.
  pid = _backend.program_id(0, backend=backend)
  in_group = _GROUP * n_tiles
  first = pid // in_group * _GROUP
  size = jnp.minimum(m_tiles - first, _GROUP)
  mi = first + pid % in_group % size
  ni = pid % in_group // size
  wg = lax.axis_index("wg")
  rows = pl.ds(wg * _WG_ROWS, _WG_ROWS)
  tiled = (plgpu.TilingTransform((8, BLOCK)), plgpu.SwizzleTransform(128))  # 128 FP8 codes: one 128-byte row
  in_specs = [
      plgpu.BlockSpec((BLOCK, BLOCK), lambda k: (mi, k), transforms=tiled),
      plgpu.BlockSpec((BLOCK, BLOCK), lambda k: (ni, k), transforms=tiled),
      plgpu.BlockSpec((1, BLOCK), lambda k: (k, mi)),
      plgpu.BlockSpec((1, _SB_BOX), lambda k: (ni, k)),
  ]

  def step(_, a_smem, b_smem, sa_smem, sb_smem, total, *, stash):
    def block(part):  # this block's product alone, accumulated by the tensor cores
      if interpret:  # (the interpreter takes no transposed wgmma operand)
        stash[...] = b_smem[...].T
        plgpu.wgmma(part, a_smem.at[rows], stash)
      else:
        plgpu.wgmma(part, a_smem.at[rows], plgpu.transpose_ref(b_smem, (1, 0)))
      return part[...]

    part = pl.run_scoped(block, plgpu.ACC((_WG_ROWS, BLOCK)))
    if interpret:  # (the interpreter loads no register layouts)
      sa = sa_smem[0, rows]
    else:
      sa = plgpu.load(sa_smem.at[0, rows], None, layout=plgpu.Layout.WGMMA.reduce(1))
    scale = sa * sb_smem[0, 0]
    return total + part * lax.broadcast_in_dim(scale, part.shape, [0])

  def compute(o_smem, eval_pipeline):
    zeros = jnp.zeros((_WG_ROWS, BLOCK), jnp.float32)
    total = eval_pipeline(zeros if interpret else plgpu.layout_cast(zeros, plgpu.Layout.WGMMA))
    o_smem[wg] = total.astype(o_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem.at[wg], o_gmem.at[pl.ds(mi * BLOCK + wg * _WG_ROWS, _WG_ROWS),
                                                     pl.ds(ni * BLOCK, BLOCK)])
    plgpu.wait_smem_to_gmem(0)

  # 128-byte rows of the output tile in shared memory (64 bfloat16 or 32 float32 values)
  out_tiled = (plgpu.TilingTransform((8, 128 // o_gmem.dtype.itemsize)), plgpu.SwizzleTransform(128))

  def scope(o_smem, *stash):
    stash = stash[0].at[wg] if stash else None
    plgpu.emit_pipeline_warp_specialized(
        functools.partial(step, stash=stash), grid=(steps,), memory_registers=40, in_specs=in_specs,
        max_concurrent_steps=stages, wg_axis="wg", num_compute_wgs=2,
        compute_context=functools.partial(compute, o_smem))(a_gmem, b_gmem, sat_gmem, sb_gmem)

  stash = [plgpu.SMEM((2, BLOCK, BLOCK), b_gmem.dtype)] if interpret else []
  pl.run_scoped(scope, plgpu.SMEM((2, _WG_ROWS, BLOCK), o_gmem.dtype, transforms=out_tiled), *stash,
                collective_axes="wg")


def fp8_block_matmul(a: jax.Array, sa: jax.Array, b: jax.Array, sb: jax.Array, *, out_dtype, backend: str,
                     stages: int = 4) -> jax.Array:
  """(M, N) out_dtype: the block-FP8 product of `a` (M, K) with scales `sa` (M, K / 128) and K-major `b` (N, K)
  with scales `sb` (N / 128, K / 128), K and N multiples of 128. `backend`: "mosaic" (Hopper) or
  "mosaic_interpret" (the Mosaic GPU interpreter, any device)."""
  m, k = a.shape
  n = b.shape[0]
  m_tiles, n_tiles, steps = -(-m // BLOCK), n // BLOCK, k // BLOCK
  a = _backend.tma_rows(a)
  sat = jnp.pad(sa.astype(jnp.float32).T, ((0, 0), (0, -m % 4)))
  sb = jnp.pad(sb.astype(jnp.float32)[:, :, None], ((0, 0), (0, 0), (0, _SB_BOX - 1))).reshape(n_tiles, -1)
  kernel = functools.partial(_kernel, steps=steps, stages=stages, m_tiles=m_tiles, n_tiles=n_tiles,
                             backend=backend)
  out = _backend.call(kernel, backend=backend, out_shape=jax.ShapeDtypeStruct((m_tiles * BLOCK, n), out_dtype),
                      grid=(m_tiles * n_tiles,), in_specs=None, out_specs=None, threads=3)(a, sat, b, sb)
  return out[:m]
