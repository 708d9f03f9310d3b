"""The block-FP8 GEMM in Pallas Mosaic GPU (Hopper), beside the Triton kernel of fp8_block_matmul_triton.py: the
same blocking and layouts (fp8_block_matmul.py), K-major (N, K) weights only.

A program computes (64 wgs, 128) tiles of the output: `wgs` compute warpgroups of 64 rows each (2 or 3), and one
more warpgroup that issues the TMA copies (`emit_pipeline_warp_specialized`), `stages` 128-deep K blocks in
flight. Per block a compute warpgroup runs its FP8 wgmmas into a fresh float32 accumulator (the tensor cores' own
accumulation over the block, as in the Triton kernel), waits for them and promotes the block into its float32 sum
in registers: sum += part * (row's activation scale * tile's weight scale). While one warpgroup promotes, the
others' MMAs keep the tensor cores busy (DeepGEMM's overlap; the Triton kernel waits with its whole program).
Programs may run in clusters of 2 x 1, 1 x 2 or 2 x 2 tiles, where one TMA multicast brings a weight tile to the
cluster's row tiles and an activation tile to its column tiles: the kernel moves about 8 bytes from L2 per 1000
FLOP at 128 rows, near L2's bandwidth at FP8 rates (Nsight Compute: L2 throughput 81% of peak), and larger
tiles and multicast cut that. Where there are enough tiles the programs are persistent: one per SM's worth of
clusters, each running its tiles (every `programs`-th, in the grouped order) as one pipeline of pipelines, so the
pipeline's fill and the output's store overlap the neighbouring tiles' MMAs instead of idling the SM.

Operands as the kernel reads them (the wrapper prepares them): `a` (M, K) FP8, more than 8 rows padded to a
multiple of 8 (TMA's 8-row tiling; rows past the array read as zeros); `sa_t` (K / 128, M') float32, the
activation scales transposed so that a tile's row scales for a block are one TMA row (M' = M rounded up to 4:
16-byte row strides); `b` (N, K) FP8 with N a multiple of 128; `sb32` (N / 128, 32 K / 128) float32, each block's
scale followed by 31 zeros: a step reads its scale as the first value of a 128-byte TMA box (every shared-memory
slot a TMA writes must be 128-byte aligned; 16-byte slots of scales faulted with a misaligned address).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend as _backend

__all__ = ["BLOCK", "default_config", "default_programs", "fp8_block_matmul", "tile_count"]

BLOCK = 128  # K per scale block, output columns per program
_WG_ROWS = 64  # the wgmma M
_SB_BOX = 32  # float32 values per TMA box of weight scales: 128 bytes
_BARRIER_SMEM = 1024  # shared memory left to the pipeline's barriers when choosing stages
_GROUP = 8  # row tiles launched together over each column tile (they share its weights in L2)


def _kernel(a_gmem, sat_gmem, b_gmem, sb_gmem, o_gmem, *, steps: int, stages: int, wgs: int,
            cluster: tuple[int, int], m_tiles: int, n_tiles: int, units: int, programs: int, backend: str):
  import jax.experimental.pallas.mosaic_gpu as plgpu
  interpret = backend == "mosaic_interpret"
  cm, cn = cluster
  tile_m = wgs * _WG_ROWS
  wg = lax.axis_index("wg")
  rows = pl.ds(wg * _WG_ROWS, _WG_ROWS)
  tiled = (plgpu.TilingTransform((8, BLOCK)), plgpu.SwizzleTransform(128))  # 128 FP8 codes: one 128-byte row

  def in_specs(mi, ni):
    return [
        # an activation tile is shared by the cluster's column tiles, a weight tile by its row tiles: one TMA
        # multicast to both halves the L2 reads of that operand
        plgpu.BlockSpec((tile_m, BLOCK), lambda k: (mi, k), transforms=tiled, collective_axes=("cn",) * (cn > 1)),
        plgpu.BlockSpec((BLOCK, BLOCK), lambda k: (ni, k), transforms=tiled, collective_axes=("cm",) * (cm > 1)),
        plgpu.BlockSpec((1, tile_m), lambda k: (k, mi)),
        plgpu.BlockSpec((1, _SB_BOX), lambda k: (ni, k)),
    ]

  def step(_, a_smem, b_smem, sa_smem, sb_smem, total, *, stash):
    def block(part):  # this block's product alone, accumulated by the tensor cores
      if interpret:  # (the interpreter takes no transposed wgmma operand)
        stash[...] = b_smem[...].T
        plgpu.wgmma(part, a_smem.at[rows], stash)
      else:
        plgpu.wgmma(part, a_smem.at[rows], b_smem.transpose((1, 0)))
      return part[...]

    part = pl.run_scoped(block, plgpu.ACC((_WG_ROWS, BLOCK)))
    if interpret:  # (the interpreter loads no register layouts)
      sa = sa_smem[0, rows]
    else:
      sa = _backend.register_load(sa_smem.at[0, rows], plgpu.Layout.WGMMA.reduce(1))
    scale = sa * sb_smem[0, 0]
    return total + part * lax.broadcast_in_dim(scale, part.shape, [0])

  def compute(o_smem, mi, ni, eval_pipeline):
    zeros = jnp.zeros((_WG_ROWS, BLOCK), jnp.float32)
    total = eval_pipeline(zeros if interpret else plgpu.layout_cast(zeros, plgpu.Layout.WGMMA))
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store has read o_smem
    o_smem[wg] = total.astype(o_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem.at[wg], o_gmem.at[pl.ds(mi * tile_m + wg * _WG_ROWS, _WG_ROWS),
                                                     pl.ds(ni * BLOCK, BLOCK)])

  def pipeline(body, context, specs, state=None):
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(steps,), memory_registers=40, in_specs=specs, max_concurrent_steps=stages, wg_axis="wg",
        num_compute_wgs=wgs, compute_context=context, pipeline_state=state)

  # 128-byte rows of the output tile in shared memory (64 bfloat16 or 32 float32 values)
  out_tiled = (plgpu.TilingTransform((8, 128 // o_gmem.dtype.itemsize)), plgpu.SwizzleTransform(128))
  gmem = (a_gmem, b_gmem, sat_gmem, sb_gmem)

  def scope(allocations, o_smem, *stash):
    stash = stash[0].at[wg] if stash else None
    pid = _backend.program_id(0, backend=backend)

    def tile(j, state=None):  # the program's j-th tile: units pid, pid + programs, ...
      # Grouped order over clusters of (cm, cn) tiles: _GROUP row tiles run over each column tile in turn.
      u, group = pid + j * programs, _GROUP // cm
      in_group = group * (n_tiles // cn)
      first = u // in_group * group
      size = jnp.minimum(m_tiles // cm - first, group)
      mi = (first + u % in_group % size) * cm + (lax.axis_index("cm") if cm > 1 else 0)
      ni = u % in_group // size * cn + (lax.axis_index("cn") if cn > 1 else 0)
      pipeline(functools.partial(step, stash=stash), functools.partial(compute, o_smem, mi, ni), in_specs(mi, ni),
               state)(*gmem, allocations=allocations)

    if programs < units:  # the program's tiles form one pipeline: the copy warpgroup fetches the next tile's first
      # blocks while the compute warpgroups finish this one and store it (every program has two tiles or more)
      tiles = (units - pid + programs - 1) // programs
      tile(0, plgpu.PipelinePipeline.START)
      lax.fori_loop(1, tiles - 1, lambda j, _: tile(j, plgpu.PipelinePipeline.STEADY), None)
      tile(tiles - 1, plgpu.PipelinePipeline.STOP)
    else:
      tile(0)
    plgpu.wait_smem_to_gmem(0)

  ignore = lambda *_, **__: None
  allocations = pipeline(ignore, ignore, in_specs(0, 0)).get_allocations(*gmem)
  stash = [plgpu.SMEM((wgs, BLOCK, BLOCK), b_gmem.dtype)] if interpret else []  # a (K, N) block per warpgroup
  pl.run_scoped(scope, allocations, plgpu.SMEM((wgs, _WG_ROWS, BLOCK), o_gmem.dtype, transforms=out_tiled),
                *stash, collective_axes="wg")


def default_config(m: int, n: int, backend: str = "mosaic") -> tuple[int, tuple[int, int]]:
  """(warpgroups, cluster) from the sweeps in BENCHMARKS.md (H100, M = 1024 to 8192): from 1536 rows, tiles of
  192 rows on three warpgroups (a sixth less L2 traffic per product than 128 rows) in pairs of column tiles that
  share the activation tile by multicast (3-24% faster than 128-row tiles at 1536-1920 rows); below, 128-row tiles
  (even at 1024 rows, mixed at 1280, and fewer rows computed in vain on a ragged M). The
  interpreter takes two warpgroups and no cluster: it runs no cluster barriers, and a kernel of four warpgroups
  hung in it on a process with one or two host devices (JAX 0.10)."""
  if m < 1536 or backend == "mosaic_interpret":
    return 2, (1, 1)
  return 3, ((1, 2) if n // BLOCK % 2 == 0 else (1, 1))


def tile_count(m: int, n: int, wgs: int, cluster: tuple[int, int]) -> int:
  """Clusters' worth of output tiles of an (m, n) product with (64 wgs, 128) tiles in (rows, columns) clusters: what
  one program computes when there is one per tile."""
  return -(-m // (wgs * _WG_ROWS * cluster[0])) * (n // BLOCK // cluster[1])


def default_programs(units: int, steps: int, stages: int, cluster: tuple[int, int], backend: str) -> int:
  """Clusters to launch for `units` clusters' worth of tiles over `steps` K blocks: as many as the SMs hold
  (persistent) where each then runs two tiles or more and the stages divide the steps (a pipeline of pipelines),
  else one per tile. On the H100, persistent programs ran 3-8% faster than one per tile on every shape timed, with
  6 to 73 tiles each (BENCHMARKS.md)."""
  programs = _backend.sm_count() // (cluster[0] * cluster[1])
  persistent = backend == "mosaic" and steps % stages == 0 and 2 * programs <= units
  return programs if persistent else units


def fp8_block_matmul(a: jax.Array, sa: jax.Array, b: jax.Array, sb: jax.Array, *, out_dtype, backend: str,
                     stages: int = 4, wgs: int | None = None, cluster: tuple[int, int] | None = None,
                     programs: int | None = None) -> jax.Array:
  """(M, N) out_dtype: the block-FP8 product of `a` (M, K) with scales `sa` (M, K / 128) and K-major `b` (N, K)
  with scales `sb` (N / 128, K / 128), K and N multiples of 128. `backend`: "mosaic" (Hopper) or
  "mosaic_interpret" (the Mosaic GPU interpreter, any device). Tiles of 64 `wgs` rows (one compute warpgroup per
  64), `stages` K blocks in flight (fewer where shared memory runs out); `cluster` (rows, columns) of tiles per
  thread-block cluster, 1 or 2 each, N / 128 a multiple of the second; either left None takes
  `default_config`'s. `programs`: clusters launched; with fewer clusters than tiles each runs its tiles in turn as
  one pipeline (persistent: the next tile's first blocks load while the last one's are promoted and stored), which
  needs K / 128 a multiple of the stages and two tiles or more per cluster; None takes `default_programs`'."""
  (m, k), n = a.shape, b.shape[0]
  default_wgs, default_cluster = default_config(m, n, backend)
  wgs, cluster = default_wgs if wgs is None else wgs, default_cluster if cluster is None else cluster
  cm, cn = cluster
  tile_m = wgs * _WG_ROWS
  # (with 2-row clusters an odd row tile count gets one more tile, of zeros read past the array, rows dropped)
  m_tiles, n_tiles, steps = -(-m // (tile_m * cm)) * cm, n // BLOCK, k // BLOCK
  if wgs not in (2, 3):
    raise ValueError(f"fp8_block_matmul: wgs={wgs} must be 2 or 3 (with four, a thread has 118 registers for two "
                     "64-register float32 tiles).")
  if cm not in (1, 2) or cn not in (1, 2) or n_tiles % cn:
    raise ValueError(f"fp8_block_matmul: cluster={cluster} must be 1 or 2 tiles each way, dividing N / 128 = "
                     f"{n_tiles} by the second.")
  free = _backend.HOPPER_SMEM - _BARRIER_SMEM - tile_m * BLOCK * jnp.dtype(out_dtype).itemsize  # less the output
  stages = min(stages, free // ((tile_m + BLOCK) * (BLOCK + 4) + 4 * _SB_BOX))  # a stage: tiles, scale rows
  a = _backend.tma_rows(a)
  sat = jnp.pad(sa.astype(jnp.float32).T, ((0, 0), (0, -m % 4)))
  sb = jnp.pad(sb.astype(jnp.float32)[:, :, None], ((0, 0), (0, 0), (0, _SB_BOX - 1))).reshape(n_tiles, -1)
  units = tile_count(m, n, wgs, cluster)
  programs = default_programs(units, steps, stages, cluster, backend) if programs is None else programs
  if programs < units and backend != "mosaic":
    raise ValueError("fp8_block_matmul: persistent programs (programs < tiles) need backend='mosaic': the Mosaic GPU "
                     "interpreter hangs in a pipeline of pipelines (JAX 0.10).")
  if not 0 < programs <= units or (programs < units and (steps % stages or units < 2 * programs)):
    raise ValueError(f"fp8_block_matmul: programs={programs} must be the {units} clusters of tiles or at most half "
                     f"of them with K / 128 = {steps} a multiple of the stages ({stages}).")
  kernel = functools.partial(_kernel, steps=steps, stages=stages, wgs=wgs, cluster=cluster, m_tiles=m_tiles,
                             n_tiles=n_tiles, units=units, programs=programs, backend=backend)
  # On the GPU the output has M rows, or M rounded up to Mosaic's 8-row tiling: TMA stores only the rows inside the
  # array of a row tile that overhangs it (whole row tiles, then a slice to M, took one more pass over the output:
  # 9-13% of the call at M = 2048 and 8192). The interpreter drops such a store whole: there it has whole tiles.
  rows = a.shape[0] if backend == "mosaic" else m_tiles * tile_m
  out = _backend.call(kernel, backend=backend, out_shape=jax.ShapeDtypeStruct((rows, n), out_dtype),
                      grid=(programs,), in_specs=None, out_specs=None, threads=wgs + 1,
                      cluster=dict(cm=cm, cn=cn))(a, sat, b, sb)
  return out[:m]
