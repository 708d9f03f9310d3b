"""Block FP8 (DeepSeek-V3 style): y = sum over 128-deep K blocks of (a_blk @ b_blk) * s_a * s_b.

Layouts: `a` (M, K) FP8 activation codes with one float32 scale per row and 128-column block, `sa` (M, K / 128);
`b` FP8 weight codes, K-major (N, K) (the kernel's layout) or (K, N), with one float32 scale per 128 x 128 block,
`sb` (N / 128, K / 128) or (K / 128, N / 128) to match. K and the weight's N are padded to multiples of 128 (as the
QArrays store them); `n` is the logical N of the output.

Implementations of the same blocking, in which each 128-deep block is one run of FP8 MMAs with the tensor cores'
own accumulation, promoted to a float32 accumulator with its two scales: `mosaic`, a Pallas Mosaic GPU kernel for
Hopper (scaled_matmul_mosaic.py: warp-specialized, each warpgroup's promotion overlapping the others' MMAs;
`mosaic_interpret` runs it in the Mosaic GPU interpreter on any device); `jax_triton`, a Triton kernel
(fp8_block_matmul_triton.py; it needs Triton's default FP8 accumulation, which Pallas's Triton lowering does not
expose: REFERENCE section 5); and `interpret`, the XLA twin for any device, which forms each block's partial
product exactly in float32 and promotes it the same way.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from lowbit_jax.formats import Format
from pallas_kernels import backend as _backend

__all__ = ["BACKENDS", "FP8_ELEMENTS", "Fp8BlockConfig", "default_config", "fp8_block_matmul", "supports"]

FP8_ELEMENTS = ("float8_e4m3fn", "float8_e5m2")  # the element types of FP8 MMAs
BACKENDS = ("jax_triton", "mosaic", "mosaic_interpret", "interpret")


@dataclasses.dataclass(frozen=True)
class Fp8BlockConfig:
  """Tiles (BK is the 128 of the scale blocks) and launch parameters."""
  bm: int = 128
  bn: int = 128
  num_warps: int = 8
  num_stages: int = 4
  group_m: int = 8


def default_config(m: int, n: int) -> Fp8BlockConfig:
  """From the sweep in BENCHMARKS.md (H100): 128 x 128 tiles on 8 warps from M = 65 on (wider tiles spill the
  second float32 tile the promotion needs); 64-row tiles on 4 warps below, narrower columns where N alone
  leaves SMs idle."""
  if m > 64:
    return Fp8BlockConfig()
  return Fp8BlockConfig(64, 64 if n <= 8192 else 128, num_warps=4)


def supports(lhs: Format, rhs: Format) -> str | None:
  """None if the kernel takes activations in `lhs` times weights in `rhs`, else why not."""
  if lhs.element not in FP8_ELEMENTS or rhs.element not in FP8_ELEMENTS:
    return f"{lhs.name} x {rhs.name}: block FP8 needs FP8 elements on both sides"
  if lhs.block != (128,) or rhs.block != (128, 128):
    return f"{lhs.name} x {rhs.name}: block FP8 takes 1x128 activation blocks and 128x128 weight blocks"
  if lhs.scale != "float32" or rhs.scale != "float32" or lhs.tensor_scale or rhs.tensor_scale:
    return f"{lhs.name} x {rhs.name}: block FP8 takes float32 block scales and no tensor scale"
  return None


@_backend.jit_op("n", "k_major", "out_dtype", "backend", "config")
def fp8_block_matmul(a: jax.Array, sa: jax.Array, b: jax.Array, sb: jax.Array, *, n: int, k_major: bool,
                     out_dtype=jnp.bfloat16, backend: str = "jax_triton",
                     config: Fp8BlockConfig | None = None) -> jax.Array:
  """(M, n) out_dtype: the block-FP8 product of `a` and `b` (layouts in the module docstring).

  `k_major`: `b` is (N, K); else (K, N), which the kernels transpose first (one pass over the weight): the FP8
  MMA reads its second operand K-major, and Triton's own relayout of a (K, N) FP8 tile ran 5x slower (BENCHMARKS.md).
  `backend`: one of BACKENDS: "mosaic" (Hopper), "jax_triton" (NVIDIA GPU), "mosaic_interpret" or "interpret" (any
  device). `config` applies to the Triton kernel.
  """
  m, k = a.shape
  bk, bn_ = (b.shape[1], b.shape[0]) if k_major else b.shape
  if k % 128 or bk != k or bn_ % 128 or n > bn_:
    raise ValueError(f"fp8_block_matmul: a {a.shape} and {'K-major ' if k_major else ''}b {b.shape} must share "
                     f"a K padded to a multiple of 128, with N = {n} padded to one.")
  want_sb = (bn_ // 128, k // 128) if k_major else (k // 128, bn_ // 128)
  if sa.shape != (m, k // 128) or sb.shape != want_sb:
    raise ValueError(f"fp8_block_matmul: scales {sa.shape} and {sb.shape} do not match {(m, k // 128)} and "
                     f"{want_sb}.")
  if backend == "interpret":
    return _blocks_xla(a, sa, b if not k_major else b.T, sb if not k_major else sb.T)[:, :n].astype(out_dtype)
  if backend not in BACKENDS:
    raise ValueError(f"fp8_block_matmul: backend must be one of {BACKENDS}, got {backend!r}.")
  if not k_major:
    b, sb = b.T, sb.T
  if backend.startswith("mosaic"):
    from pallas_kernels import scaled_matmul_mosaic
    return scaled_matmul_mosaic.fp8_block_matmul(a, sa, b, sb, out_dtype=out_dtype, backend=backend)[:, :n]
  from pallas_kernels import fp8_block_matmul_triton as tk
  cfg = config or default_config(m, n)
  grid = (-(-m // cfg.bm) * -(-n // cfg.bn),)
  return _backend.triton_call(
      tk.kernel, tk.kernel_aliased, a, sa.astype(jnp.float32), b, sb.astype(jnp.float32),
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype), grid=grid, num_warps=cfg.num_warps,
      num_stages=cfg.num_stages, name="fp8_block_matmul", M=m, N=n, K=k, BM=cfg.bm, BN=cfg.bn, GROUP_M=cfg.group_m)


def _blocks_xla(a, sa, b, sb):
  """The kernel's blocking in XLA for b (K, N): float32 partial products per 128-deep block (exact products,
  float32 sums), each times its activation and weight block scales, summed over the blocks."""
  m, k = a.shape
  n = b.shape[1]
  a3 = a.astype(jnp.float32).reshape(m, k // 128, 128)
  b3 = b.astype(jnp.float32).reshape(k // 128, 128, n)
  part = jnp.einsum("mjc,jcn->jmn", a3, b3, precision=lax.Precision.HIGHEST)
  scale = sa.astype(jnp.float32).T[:, :, None] * jnp.repeat(sb.astype(jnp.float32), 128, axis=1)[:, None, :]
  return jnp.sum(part * scale, axis=0)
