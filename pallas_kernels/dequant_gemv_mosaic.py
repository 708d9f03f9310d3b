"""Weight-only matmul for decode (M <= 16) in Pallas Mosaic GPU: y = x @ dequantize(w).T on Hopper tensor cores.

Layouts: `x` is (M, K) bfloat16; `w` is a K-major QArray of logical shape (N, K) blocked along K (axis 1), in the
canonical storage of REFERENCE section 3: int4 codes two per byte, low nibble first (the memory layout of a
`jnp.int4` (N, K) array), or int8 codes; symmetric, with bfloat16 scales (N, K / 128) for groups of 128, or (N, 1)
per channel.

Swap-AB: out^T (N, 16) = W (N, K) @ x^T (K, 16), x padded to 16 rows (the narrowest activation tile TMA swizzles).
A program owns BN = 64 weight rows (the wgmma M) and a 1/split slice of K. Per pipeline step (`groups` slices of
128 along K) TMA brings each slice's (64, 128) code tile, the slices' rows of scales and the (128 * groups, 16)
activation tile into shared memory; each code tile is widened to bfloat16 in registers, multiplied by its scales
(one bfloat16 rounding of v * s, which is exactly the weight `lowbit_jax.dequantize` returns) and fed to wgmma as
its register operand, accumulating in float32. The (split, N, 16) float32 partials are summed by XLA. Unlike the
Pallas-Triton kernel of dequant_matmul.py, the weights stream through TMA into shared memory instead of per-thread
loads, which is what bound that kernel at small M (BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lowbit_jax.formats import Format
from lowbit_jax.qarray import QArray
from pallas_kernels import backend as _backend

__all__ = ["Config", "MAX_M", "dequant_gemv", "supports", "default_config"]

MAX_M = 16  # activation rows the kernel takes (one 16-wide wgmma N tile)
_BN, _TK = 64, 128  # weight rows per program (the wgmma M), K per pipeline step


@dataclasses.dataclass(frozen=True)
class Config:
  """split: programs sharing one 64-row tile, each over 1/split of K (their float32 partials are summed after);
  groups: 128-wide K slices per pipeline step (one TMA copy and one wgmma each, a single wait per step);
  stages: pipeline steps in flight (shared-memory buffers per operand)."""
  split: int = 1
  groups: int = 2
  stages: int = 4


def default_config(n: int, k: int) -> Config:
  """Two 128-wide slices per step, and K split until the launch has about eight programs per SM (at most 8 ways,
  within whole steps). The H100 sweep (BENCHMARKS.md) found every split of 2-8, 1-4 slices and 3-6 stages within
  10% of each other; one program per SM was slowest."""
  cfg = Config()
  groups = cfg.groups if k % (_TK * cfg.groups) == 0 else 1
  split = 1
  while n // _BN * split < 8 * 132 and split < 8 and k % (_TK * groups * split * 2) == 0:
    split *= 2
  return dataclasses.replace(cfg, split=split, groups=groups)


def supports(fmt: Format, n: int, k: int) -> str | None:
  """None if the kernel takes a K-major (n, k) weight in `fmt`, else the reason it does not."""
  el = fmt.element_type
  if el.kind != "int" or el.bits not in (4, 8) or fmt.zero_point or fmt.rule != "absmax":
    return f"{fmt.name}: the Mosaic kernel takes symmetric int4 / int8 weights"
  if fmt.block not in ((_TK,), None):
    return f"{fmt.name}: the Mosaic kernel takes groups of {_TK} or one scale per row"
  if fmt.scale != "bfloat16":
    return f"{fmt.name}: {fmt.scale} scales (the kernel takes bfloat16)"
  if n % _BN or k % _TK:
    return f"N = {n} and K = {k} must be multiples of {_BN} and {_TK}"
  return None


def _kernel(w_gmem, s_gmem, x_gmem, o_gmem, *, steps: int, groups: int, stages: int, backend: str):
  import jax.experimental.pallas.mosaic_gpu as plgpu
  interpret = backend == "mosaic_interpret"
  ni, si = _backend.program_id(0, backend=backend), _backend.program_id(1, backend=backend)
  k0 = si * steps
  bits = jnp.iinfo(w_gmem.dtype).bits
  mp = x_gmem.shape[1]
  w_sw, x_sw = plgpu.find_swizzle(_TK * bits, "lhs"), plgpu.find_swizzle(mp * 16, "rhs")
  per_channel = s_gmem.shape[0] == 1

  def step(_, *refs, acc_ref, a_smem):
    w_smems, (s_smem, x_smem) = refs[:groups], refs[groups:]
    for j, w_smem in enumerate(w_smems):
      a = w_smem[...].astype(jnp.bfloat16)
      row = 0 if per_channel else j
      if interpret:  # the GPU interpreter loads no register layouts and takes wgmma operands from shared memory only
        s = s_smem[row]
      else:
        s = plgpu.load(s_smem, (row,), layout=plgpu.Layout.WGMMA.reduce(1))
      a = a * lax.broadcast_in_dim(s, a.shape, [0])
      if interpret:
        a_smem[0][...] = a
        a = a_smem[0]
      plgpu.wgmma(acc_ref, a, x_smem.at[pl.ds(j * _TK, _TK)])
    plgpu.wgmma_wait(0)

  # Each 128-wide slice of a step has its own code tile (a TMA box of one swizzle width), so the register loads
  # never split a swizzled row.
  w_specs = [plgpu.BlockSpec((_BN, _TK), lambda kk, j=j: (ni, (k0 + kk) * groups + j),
                             transforms=(plgpu.TilingTransform((8, w_sw * 8 // bits)), plgpu.SwizzleTransform(w_sw)))
             for j in range(groups)]

  def acc_scope(acc_ref, *a_smem):
    plgpu.emit_pipeline(
        functools.partial(step, acc_ref=acc_ref, a_smem=a_smem), grid=(steps,),
        in_specs=[
            *w_specs,
            plgpu.BlockSpec((1, _BN) if per_channel else (groups, _BN), lambda kk: (0 if per_channel else k0 + kk, ni)),
            plgpu.BlockSpec((_TK * groups, mp), lambda kk: (k0 + kk, 0),
                            transforms=(plgpu.TilingTransform((8, x_sw * 8 // 16)), plgpu.SwizzleTransform(x_sw))),
        ],
        max_concurrent_steps=stages)(*[w_gmem] * groups, s_gmem, x_gmem)
    return acc_ref[...]

  def with_stash(*a_smem):  # (the interpreter's shared-memory copy of the A operand: its own scope)
    return pl.run_scoped(lambda acc_ref: acc_scope(acc_ref, *a_smem), plgpu.ACC((_BN, mp)))

  acc = pl.run_scoped(with_stash, plgpu.SMEM((_BN, _TK), jnp.bfloat16)) if interpret else with_stash()

  @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((_BN, mp), jnp.float32))
  def _store(o_smem):
    o_smem[...] = acc
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[si, pl.ds(ni * _BN, _BN)])
    plgpu.wait_smem_to_gmem(0)


def dequant_gemv(x: jax.Array, w: QArray, *, out_dtype=None, backend: str = "mosaic",
                 config: Config | None = None) -> jax.Array:
  """x (M, K) @ dequantize(w).T with w a K-major (N, K) QArray blocked along axis 1, M <= 16; float32 accumulation.

  Returns (M, N) in `out_dtype` (default x.dtype). `backend`: "mosaic" (Hopper GPUs) or "mosaic_interpret" (the
  Mosaic GPU interpreter, any device).
  """
  fmt = w.format
  if w.ndim != 2 or w.axis != 1:
    raise ValueError(f"dequant_gemv: w must be a 2-D QArray blocked along axis 1 (K-major), got {w}.")
  n, k = w.shape
  reason = supports(fmt, n, k)
  if reason:
    raise ValueError(f"dequant_gemv does not support {reason}.")
  m = x.shape[0]
  if x.ndim != 2 or x.shape[1] != k or m > MAX_M:
    raise ValueError(f"dequant_gemv: x must be (M <= {MAX_M}, K = {k}), got {x.shape}.")
  if x.dtype != jnp.bfloat16:
    raise TypeError(f"dequant_gemv: x must be bfloat16, got {x.dtype}.")
  cfg = config or default_config(n, k)
  if k % (_TK * cfg.groups * cfg.split):
    raise ValueError(f"dequant_gemv: K = {k} does not split {cfg.split} ways into steps of {cfg.groups} x {_TK}.")
  data = w.data
  if fmt.element_type.bits == 4:  # two codes per byte, low nibble first: the bytes of a jnp.int4 (N, K) array
    data = lax.bitcast_convert_type(data, jnp.int4).reshape(n, k)
  else:
    data = lax.bitcast_convert_type(data, jnp.int8)
  xt = jnp.pad(x, ((0, MAX_M - m), (0, 0))).T  # (K, 16): the wgmma B operand
  kernel = functools.partial(_kernel, steps=k // (_TK * cfg.groups * cfg.split), groups=cfg.groups,
                             stages=cfg.stages, backend=backend)
  parts = _backend.call(
      kernel, backend=backend, out_shape=jax.ShapeDtypeStruct((cfg.split, n, MAX_M), jnp.float32),
      grid=(n // _BN, cfg.split), in_specs=None, out_specs=None, name=f"dequant_gemv_{fmt.name}")(
          data, w.scale.T, xt)
  return jnp.sum(parts, axis=0).T[:m].astype(out_dtype or x.dtype)
