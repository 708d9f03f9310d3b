"""The block-FP8 GEMM as a Triton kernel, launched through jax_triton (`backend.triton_call`).

Imported only where Triton is installed (the `lowbit-jax[triton]` extra on an NVIDIA GPU); the layouts and the
math are documented in `fp8_block_matmul.py`, whose XLA twin computes the same blocks on any device.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _body(a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
          BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
  # Grouped launch order: GROUP_M row tiles share each column tile while it is in L2.
  pid = tl.program_id(0)
  tiles_m = tl.cdiv(M, BM)
  tiles_n = tl.cdiv(N, BN)
  in_group = GROUP_M * tiles_n
  first_m = (pid // in_group) * GROUP_M
  size_m = min(tiles_m - first_m, GROUP_M)
  pid_m = first_m + (pid % in_group) % size_m
  pid_n = (pid % in_group) // size_m
  rm = pid_m * BM + tl.arange(0, BM)
  rn = pid_n * BN + tl.arange(0, BN)
  rk = tl.arange(0, 128)
  nk = K // 128
  row_ok = rm < M
  a_ptrs = a_ptr + rm[:, None] * K + rk[None, :]
  b_ptrs = b_ptr + rk[:, None] + rn[None, :] * K  # (128, BN) view of the K-major (N, K) weight
  sa_ptrs = sa_ptr + rm * nk
  sb_ptrs = sb_ptr + (rn // 128) * nk
  acc = tl.zeros((BM, BN), dtype=tl.float32)
  for k in range(nk):
    a = tl.load(a_ptrs + k * 128, mask=row_ok[:, None], other=0.0)
    b = tl.load(b_ptrs + k * 128)
    # One 128-deep block: FP8 MMAs with the tensor cores' own accumulation (Triton's default), then promoted to
    # the float32 accumulator with its two block scales (DeepSeek-V3's scheme).
    scale = tl.load(sa_ptrs + k, mask=row_ok, other=0.0)[:, None] * tl.load(sb_ptrs + k)[None, :]
    acc += tl.dot(a, b) * scale
  c_ptrs = c_ptr + rm[:, None] * N + rn[None, :]
  tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & (rn < N)[None, :])


@triton.jit
def kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
           BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
  _body(a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, M, N, K, BM, BN, GROUP_M)


@triton.jit
def kernel_aliased(a_ptr, sa_ptr, b_ptr, sb_ptr, c_in_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr,
                   K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
  """`kernel` with the output also passed in as an aliased input (the poisoned buffer of the tests)."""
  _body(a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr, M, N, K, BM, BN, GROUP_M)
