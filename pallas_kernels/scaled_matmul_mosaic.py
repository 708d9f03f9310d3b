"""8-bit GEMMs with block scales in Pallas Mosaic GPU (Hopper): FP8 or int8 MMAs over each scale block, promoted
into a float32 sum with the block's scales. Two scalings, K-major (N, K) weights only:
  - block FP8 (`fp8_block_matmul`, DeepSeek-V3 style, beside the Triton kernel of fp8_block_matmul_triton.py, the
    layouts of fp8_block_matmul.py): 128-deep blocks, one scale per activation row and block, one per 128 x 128
    weight block;
  - MX pairs (`mx_matmul`: MXFP8 x MXFP8 of one element type, MXINT8 x MXINT8): 32-deep blocks, one E8M0 scale per
    activation row and block and one per weight row (output column) and block. int8 MMAs sum a block exactly in
    int32 (at most 32 x 127^2 < 2^24, so its float32 conversion is exact too); FP8 MMAs sum it in the tensor
    cores' own format.

A program computes (64 wgs, 128) tiles of the output: `wgs` compute warpgroups of 64 rows each (2 or 3), and one
more warpgroup that issues the TMA copies (`emit_pipeline_warp_specialized`), `stages` 128-deep K steps in flight.
Per scale block a compute warpgroup runs its MMAs into a fresh accumulator (the tensor cores' own accumulation over
the block, as in the Triton kernel), waits for them and promotes the block into its float32 sum in registers:
sum += part * (row's activation scale * tile's weight scale), or for MX (part * row's scale) * column's scale
(powers of two: exact). While one warpgroup promotes, the others' MMAs keep the tensor cores busy (DeepGEMM's
overlap; the Triton kernel waits with its whole program). MX blocks are 32 bytes of each row: the operand tiles
are swizzled by 32 bytes so that each block is a whole tile of the wgmma's K.
Programs may run in clusters of 2 x 1, 1 x 2 or 2 x 2 tiles, where one TMA multicast brings a weight tile to the
cluster's row tiles and an activation tile to its column tiles: the kernel moves about 8 bytes from L2 per 1000
FLOP at 128 rows, near L2's bandwidth at FP8 rates (Nsight Compute: L2 throughput 81% of peak), and larger
tiles and multicast cut that. Where there are enough tiles the programs are persistent: one per SM's worth of
clusters, each running its tiles (every `programs`-th, in the grouped order) as one pipeline of pipelines, so the
pipeline's fill and the output's store overlap the neighbouring tiles' MMAs instead of idling the SM.

Operands as the kernel reads them (the wrappers prepare them): `a` (M, K) FP8 or int8, more than 8 rows padded to
a multiple of 8 (TMA's 8-row tiling; rows past the array read as zeros); `sa_t` (K / block, M') float32, the
activation scales transposed so that a tile's row scales for a block are one TMA row (M' = M rounded up to 4:
16-byte row strides); `b` (N, K) of a's dtype with N a multiple of 128; block FP8's `sb32` (N / 128, 32 K / 128)
float32, each block's scale followed by 31 zeros: a step reads its scale as the first value of a 128-byte TMA box
(every shared-memory slot a TMA writes must be 128-byte aligned; 16-byte slots of scales faulted with a misaligned
address); MX's `sb_t` (K / 32, N) float32, the weight scales transposed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend as _backend
from pallas_kernels.fp8_block_matmul import FP8_ELEMENTS

__all__ = ["BLOCK", "MX_BLOCK", "default_config", "default_programs", "fp8_block_matmul", "mx_matmul", "mx_supports",
           "tile_count"]

BLOCK = 128  # K per pipeline step (and block FP8's scale block), output columns per program
MX_BLOCK = 32  # K per MX scale block
_WG_ROWS = 64  # the wgmma M
_SB_BOX = 32  # float32 values per TMA box of weight scales: 128 bytes
_BARRIER_SMEM = 1024  # shared memory left to the pipeline's barriers when choosing stages
_GROUP = 8  # row tiles launched together over each column tile (they share its weights in L2)


def _kernel(a_gmem, sat_gmem, b_gmem, sb_gmem, o_gmem, *, block: int, steps: int, stages: int, wgs: int,
            cluster: tuple[int, int], m_tiles: int, n_tiles: int, units: int, programs: int, backend: str):
  import jax.experimental.pallas.mosaic_gpu as plgpu
  interpret = backend == "mosaic_interpret"
  cm, cn = cluster
  tile_m = wgs * _WG_ROWS
  wg = lax.axis_index("wg")
  rows = pl.ds(wg * _WG_ROWS, _WG_ROWS)
  mx = block == MX_BLOCK  # (else block FP8: one weight scale per tile and step)
  # a block of one-byte codes per tile of the wgmma's K: 128-byte rows (block FP8) or 32 (MX), swizzled as wide
  tiled = (plgpu.TilingTransform((8, block)), plgpu.SwizzleTransform(block))
  acc_dtype = jnp.int32 if jnp.issubdtype(a_gmem.dtype, jnp.integer) else jnp.float32

  def in_specs(mi, ni):
    return [
        # an activation tile is shared by the cluster's column tiles, a weight tile by its row tiles: one TMA
        # multicast to both halves the L2 reads of that operand
        plgpu.BlockSpec((tile_m, BLOCK), lambda k: (mi, k), transforms=tiled, collective_axes=("cn",) * (cn > 1)),
        plgpu.BlockSpec((BLOCK, BLOCK), lambda k: (ni, k), transforms=tiled, collective_axes=("cm",) * (cm > 1)),
        plgpu.BlockSpec((BLOCK // block, tile_m), lambda k: (k, mi)),
        plgpu.BlockSpec((BLOCK // block, BLOCK), lambda k: (k, ni)) if mx else
        plgpu.BlockSpec((1, _SB_BOX), lambda k: (ni, k)),
    ]

  def vector(ref, dim):  # a row (dim 0) or column (dim 1) vector of scales, for broadcasting over a tile
    if interpret:  # (the interpreter loads no register layouts)
      return ref[...]
    return _backend.register_load(ref, plgpu.Layout.WGMMA.reduce(1 - dim))

  def step(_, a_smem, b_smem, sa_smem, sb_smem, total, *, stash):
    if interpret:  # (the interpreter takes no transposed wgmma operand)
      stash[...] = b_smem[...].T

    def mma(acc, j):  # block j's product alone, accumulated by the tensor cores
      cols = pl.ds(j * block, block)
      plgpu.wgmma(acc, a_smem.at[rows, cols], stash.at[cols] if interpret else b_smem.at[:, cols].transpose((1, 0)))

    def promote(total, part, j):
      part = part.astype(jnp.float32)
      sa = vector(sa_smem.at[j, rows], 0)
      if not mx:
        return total + part * lax.broadcast_in_dim(sa * sb_smem[0, 0], part.shape, [0])
      part = part * lax.broadcast_in_dim(sa, part.shape, [0])
      return total + part * lax.broadcast_in_dim(vector(sb_smem.at[j], 1), part.shape, [1])

    def chain(j, prev, total):  # block j - 1's MMAs run in `prev`: start block j's, promote j - 1 meanwhile
      if j == BLOCK // block:
        return promote(total, plgpu.wgmma_accumulator_load(prev, wait_n=0), j - 1)

      def issue(acc):
        mma(acc, j)
        return chain(j + 1, acc, promote(total, plgpu.wgmma_accumulator_load(prev, wait_n=1), j - 1))
      return pl.run_scoped(issue, plgpu.ACC((_WG_ROWS, BLOCK), acc_dtype))

    def first(acc):
      mma(acc, 0)
      return chain(1, acc, total)
    total = pl.run_scoped(first, plgpu.ACC((_WG_ROWS, BLOCK), acc_dtype))
    if not interpret:  # every warp has read this stage's scales before one thread releases its slots (the MX
      # kernel's last promotion ran late enough, in clusters, to read the next stage's: BENCHMARKS.md)
      _backend.warpgroup_barrier()
    return total

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


@_backend.jit_op("out_dtype", "backend", "stages", "wgs", "cluster", "programs")
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
  sb = jnp.pad(sb.astype(jnp.float32)[:, :, None], ((0, 0), (0, 0), (0, _SB_BOX - 1))).reshape(sb.shape[0], -1)
  return _launch(a, sa.astype(jnp.float32), b, sb, BLOCK, out_dtype=out_dtype, backend=backend, stages=stages,
                 wgs=wgs, cluster=cluster, programs=programs)


@_backend.jit_op("out_dtype", "backend", "stages", "wgs", "cluster", "programs")
def mx_matmul(a: jax.Array, sa: jax.Array, b: jax.Array, sb: jax.Array, *, out_dtype, backend: str,
              stages: int = 4, wgs: int = 2, cluster: tuple[int, int] = (1, 1),
              programs: int | None = None) -> jax.Array:
  """(M, N) out_dtype: the OCP dot of MX operands, `a` (M, K) with E8M0 scales `sa` (M, K / 32) and K-major `b`
  (N, K) with `sb` (N, K / 32), codes of one dtype: float8_e4m3fn, float8_e5m2 (MXFP8) or int8 (MXINT8, whose
  elements are the codes times 2^-6). K and N multiples of 128. `backend`, `stages`, `wgs`, `cluster` and
  `programs` as `fp8_block_matmul`'s, but `wgs` and `cluster` default to two warpgroups (tiles of 128 rows) and no
  cluster, the fastest on the H100 (three warpgroups spill: a thread holds two 64-register accumulators and the
  sum).

  Per 32-deep block the MMAs of the next block run while this one is promoted. On the H100 this ran at 400-440
  TFLOP/s for MXFP8, 0.56-0.61x XLA's bf16 GEMM (the promotion's CUDA-core work and its wait on each block's MMAs):
  slower than dequantizing MX operands exactly to bfloat16, which is what `lowbit_jax.dot_general` runs unless
  asked for this kernel (BENCHMARKS.md, "MX pairs on FP8 and int8 MMAs").

  Example (on Hopper; "mosaic_interpret" runs it anywhere):
    >>> import lowbit_jax as lb
    >>> qa = lb.quantize(jnp.ones((8, 128)), "mxfp8_e4m3", axis=1)
    >>> qb = lb.quantize(jnp.ones((128, 128)), "mxfp8_e4m3", axis=1)
    >>> y = mx_matmul(qa.data, qa.scale, qb.data, qb.scale, out_dtype=jnp.float32, backend="mosaic_interpret")
    >>> float(y[0, 0])
    128.0
  """
  power = -6 if jnp.issubdtype(a.dtype, jnp.integer) else 0  # MXINT8: each operand's 2^-6 into its scales
  sa, sb = (jnp.ldexp(s.astype(jnp.float32), power) for s in (sa, sb))
  return _launch(a, sa, b, sb.T, MX_BLOCK, out_dtype=out_dtype, backend=backend, stages=stages, wgs=wgs,
                 cluster=cluster, programs=programs)


def mx_supports(lhs, rhs, k: int, n: int) -> str | None:
  """None if `mx_matmul` takes activations in Format `lhs` times K-major (N, K) weights in Format `rhs`, K as
  stored (padded to whole blocks), else why not."""
  if not (lhs.rule == rhs.rule == "mx" and lhs.block == rhs.block == (MX_BLOCK,) and lhs.element == rhs.element
          and lhs.element in (*FP8_ELEMENTS, "int8")):
    return (f"{lhs.name} x {rhs.name}: the MX MMA kernel takes MXFP8 x MXFP8 of one element type or MXINT8 x "
            "MXINT8 (the wgmma's operands share a one-byte type)")
  if k % BLOCK or n % BLOCK:
    return f"the MX MMA kernel takes K and N multiples of {BLOCK}, got K = {k} and N = {n}"
  return None


def _launch(a, sa, b, sb, block: int, *, out_dtype, backend: str, stages: int, wgs: int | None,
            cluster: tuple[int, int] | None, programs: int | None) -> jax.Array:
  """The kernel on `a` (M, K), its float32 scales `sa` (M, K / block), `b` (N, K) and the weight scales `sb` as the
  kernel reads them (module docstring)."""
  (m, k), n = a.shape, b.shape[0]
  if a.dtype != b.dtype or jnp.dtype(a.dtype).itemsize != 1:
    raise ValueError(f"scaled_matmul_mosaic: a and b must share a one-byte dtype (the wgmma's), got {a.dtype} and "
                     f"{b.dtype}.")
  if k % BLOCK or b.shape[1] != k or n % BLOCK:
    raise ValueError(f"scaled_matmul_mosaic: a {a.shape} and b {b.shape} must share K, a multiple of {BLOCK}, and "
                     f"N must be one too.")
  default_wgs, default_cluster = default_config(m, n, backend)
  wgs, cluster = default_wgs if wgs is None else wgs, default_cluster if cluster is None else cluster
  cm, cn = cluster
  tile_m = wgs * _WG_ROWS
  # (with 2-row clusters an odd row tile count gets one more tile, of zeros read past the array, rows dropped)
  m_tiles, n_tiles, steps = -(-m // (tile_m * cm)) * cm, n // BLOCK, k // BLOCK
  if wgs not in (2, 3):
    raise ValueError(f"scaled_matmul_mosaic: wgs={wgs} must be 2 or 3 (with four, a thread has 118 registers for "
                     "two 64-register float32 tiles).")
  if cm not in (1, 2) or cn not in (1, 2) or n_tiles % cn:
    raise ValueError(f"scaled_matmul_mosaic: cluster={cluster} must be 1 or 2 tiles each way, dividing N / 128 = "
                     f"{n_tiles} by the second.")
  free = _backend.HOPPER_SMEM - _BARRIER_SMEM - tile_m * BLOCK * jnp.dtype(out_dtype).itemsize  # less the output
  # a stage: the operand tiles, their scale rows (and block FP8's 128-byte box of one weight scale)
  scale_bytes = 4 * (BLOCK // block) * (tile_m + BLOCK) + (0 if block == MX_BLOCK else 4 * _SB_BOX)
  stages = min(stages, free // ((tile_m + BLOCK) * BLOCK + scale_bytes))
  a = _backend.tma_rows(a)
  sat = jnp.pad(sa.T, ((0, 0), (0, -m % 4)))
  units = tile_count(m, n, wgs, cluster)
  programs = default_programs(units, steps, stages, cluster, backend) if programs is None else programs
  if programs < units and backend != "mosaic":
    raise ValueError("scaled_matmul_mosaic: persistent programs (programs < tiles) need backend='mosaic': the "
                     "Mosaic GPU interpreter hangs in a pipeline of pipelines (JAX 0.10).")
  if not 0 < programs <= units or (programs < units and (steps % stages or units < 2 * programs)):
    raise ValueError(f"scaled_matmul_mosaic: programs={programs} must be the {units} clusters of tiles or at most "
                     f"half of them with K / 128 = {steps} a multiple of the stages ({stages}).")
  kernel = functools.partial(_kernel, block=block, steps=steps, stages=stages, wgs=wgs, cluster=cluster,
                             m_tiles=m_tiles, n_tiles=n_tiles, units=units, programs=programs, backend=backend)
  # On the GPU the output has M rows, or M rounded up to Mosaic's 8-row tiling: TMA stores only the rows inside the
  # array of a row tile that overhangs it (whole row tiles, then a slice to M, took one more pass over the output:
  # 9-13% of the call at M = 2048 and 8192). The interpreter drops such a store whole: there it has whole tiles.
  rows = a.shape[0] if backend == "mosaic" else m_tiles * tile_m
  out = _backend.call(kernel, backend=backend, out_shape=jax.ShapeDtypeStruct((rows, n), out_dtype),
                      grid=(programs,), in_specs=None, out_specs=None, threads=wgs + 1,
                      cluster=dict(cm=cm, cn=cn))(a, sat, b, sb)
  return out[:m]
