"""One decode step of grouped-query attention over a KV cache, in one kernel: RoPE on the new query and key, the
new key and value written into the cache in place, and softmax(q k^T / sqrt(D)) v over the cache's positions
0..pos.

Outside the kernel XLA runs this as about ten small ops per layer (a RoPE concatenate, two cache updates, two
einsums, the softmax's two reductions, converts) at 1-3 us each, more than the layer's weight matmuls take once
they are quantized (BENCHMARKS.md, "End-to-end decode"). The example LM (`examples/lm.py`) calls this for
one-token steps on a GPU; prefill and CPUs keep XLA's attention.

Layouts:
  qkv: (B, H + 2 KV, D), one token per batch row: H query heads, then KV key heads, then KV value heads (the
    output of a fused query/key/value projection, reshaped); or that projection as summands (S, B, H + 2 KV, D),
    its split-K partial sums (`lowbit_jax.matmul_summands`), which the kernel adds in float32 and rounds to the
    cache dtype as the projection would have rounded its output (saving the separate pass that sums them).
  k_cache, v_cache: (B, L, KV, D); updated in place at position `pos` (the call donates nothing itself: under
    jit, XLA aliases them when the caller's buffers allow, as a decode loop's carry does).
  cos, sin: (D / 2,) float32, the rotation at `pos` of the pairs (i, i + D / 2).
  returns out (B, H, D) in qkv's dtype (the cache dtype for summands), and the two caches.
Query head j uses key/value head j // (H / KV). Scores and the softmax run in float32 (online softmax over
chunks of the cache); the query and key are rounded to the cache dtype after RoPE, as XLA's path does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import backend as _backend

__all__ = ["decode_attention"]


def _chunk(length: int) -> int:
  """Cache positions per step of the kernel's loop: the largest power of two up to 256 dividing L (Triton blocks
  are powers of two; a divisor keeps every block inside the cache). Each step waits for its loads (Triton does
  not pipeline this loop), so larger steps are faster: on an H100 at L = 256, 3.8 us per call in one step of
  256 against 4.3 us in two of 128 and 5.6 us in four of 64 (BENCHMARKS.md)."""
  return min(256, length & -length)


def _kernel(pos_ref, cos_ref, sin_ref, q_ref, knew_ref, vnew_ref, k_ref, v_ref, out_ref, kout_ref, vout_ref, *,
            half: int, group: int, chunk: int, summands: bool):
  """One query head: RoPE, the cache row at pos (written by the first query head of its group), then an online
  softmax over the cache in chunks. 2-D tiles throughout: (chunk, D) keys and values times a (1, D) query; the
  query, key and value rows are (1, D), or (S, D) summands."""
  del k_ref, v_ref  # aliased to kout_ref / vout_ref, which the kernel reads and writes
  pos = pos_ref[0]
  cos, sin = cos_ref[...], sin_ref[...]  # (1, half)
  dtype = kout_ref.dtype

  def row(ref, cols):  # (1, len) of a new row: summands added in float32 and rounded to the cache dtype
    v = ref[:, cols]
    return jnp.sum(v.astype(jnp.float32), axis=0, keepdims=True).astype(dtype) if summands else v

  def rope(ref):  # float32 rotation, rounded to the cache dtype as the XLA path rounds it
    lo, hi = row(ref, pl.ds(0, half)).astype(jnp.float32), row(ref, pl.ds(half, half)).astype(jnp.float32)
    return (lo * cos - hi * sin).astype(dtype), (hi * cos + lo * sin).astype(dtype)

  q1, q2 = rope(q_ref)  # (1, half) each
  k1, k2 = rope(knew_ref)
  v_new = row(vnew_ref, slice(None))  # (1, D)

  @pl.when(pl.program_id(1) % group == 0)
  def _():
    kout_ref[pl.ds(pos, 1), pl.ds(0, half)] = k1
    kout_ref[pl.ds(pos, 1), pl.ds(half, half)] = k2
    vout_ref[pl.ds(pos, 1), :] = v_new

  # The query takes 1 / sqrt(D) instead of every score (exact for D a power of 4, else a 2^-24 relative change).
  scale = jnp.float32(1.0) / jnp.sqrt(jnp.float32(2 * half))
  q1, q2 = q1.astype(jnp.float32) * scale, q2.astype(jnp.float32) * scale
  k1, k2, v_new = k1.astype(jnp.float32), k2.astype(jnp.float32), v_new.astype(jnp.float32)

  def step(c, carry):
    m, l, acc = carry
    rows = c * chunk + lax.broadcasted_iota(jnp.int32, (chunk, 1), 0)
    new = rows == pos  # the new position reads the values just computed, not the cache's memory
    c1 = jnp.where(new, k1, kout_ref[pl.ds(c * chunk, chunk), pl.ds(0, half)].astype(jnp.float32))
    c2 = jnp.where(new, k2, kout_ref[pl.ds(c * chunk, chunk), pl.ds(half, half)].astype(jnp.float32))
    v = jnp.where(new, v_new, vout_ref[pl.ds(c * chunk, chunk), :].astype(jnp.float32))  # (chunk, D)
    s = jnp.sum(c1 * q1, axis=1, keepdims=True) + jnp.sum(c2 * q2, axis=1, keepdims=True)  # (chunk, 1)
    s = jnp.where(rows <= pos, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=0, keepdims=True))  # (1, 1)
    p = jnp.exp(s - m_new)
    alpha = jnp.exp(m - m_new)
    return m_new, l * alpha + jnp.sum(p, axis=0, keepdims=True), acc * alpha + jnp.sum(p * v, axis=0, keepdims=True)

  init = (jnp.full((1, 1), -jnp.inf, jnp.float32), jnp.zeros((1, 1), jnp.float32),
          jnp.zeros((1, 2 * half), jnp.float32))
  _, l, acc = lax.fori_loop(0, pos // chunk + 1, step, init)  # chunks past pos are all masked: skipped
  out_ref[...] = (acc / l).astype(out_ref.dtype)


@_backend.jit_op("n_heads", "backend", "chunk", "num_warps")
def decode_attention(qkv: jax.Array, k_cache: jax.Array, v_cache: jax.Array, cos: jax.Array, sin: jax.Array,
                     pos, *, n_heads: int, backend: str = "triton", chunk: int | None = None,
                     num_warps: int = 4) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Attention of one new token per batch row over a KV cache (layouts in the module docstring).

  `qkv` may be summands (S, B, H + 2 KV, D), S a power of two. `pos` (an int32 scalar, traced or not) is the new
  token's position: keys and values at positions <= pos take part. Returns (out (B, H, D), k_cache, v_cache)
  with the caches' row `pos` replaced by the new key (after RoPE) and value. `backend` is one of
  `pallas_kernels.backend.BACKENDS` other than the Mosaic ones. One program per (batch row, query head); `chunk`
  (cache positions per loop step, a power of two dividing L; default up to 256) and `num_warps` tune it. A `pos`
  outside [0, L) is clamped into it, as `lax.dynamic_update_slice` clamps (the cache's last row then takes the new
  key and value, and every position takes part).

  Example (B = 1, 4 query heads over 2 KV heads of 8, a cache of 16 positions):
    >>> qkv = jnp.ones((1, 4 + 2 * 2, 8), jnp.bfloat16)
    >>> kc = vc = jnp.zeros((1, 16, 2, 8), jnp.bfloat16)
    >>> cos, sin = jnp.ones(4), jnp.zeros(4)
    >>> out, kc, vc = decode_attention(qkv, kc, vc, cos, sin, 0, n_heads=4, backend="interpret")
    >>> out.shape, float(out[0, 0, 0])
    ((1, 4, 8), 1.0)
  """
  if qkv.ndim not in (3, 4):
    raise ValueError(f"qkv must be (B, H + 2 KV, D) or summands (S, B, H + 2 KV, D), got {qkv.shape}.")
  parts = qkv.shape[0] if qkv.ndim == 4 else None
  if parts is not None and parts & (parts - 1):
    raise ValueError(f"qkv holds {parts} summands: the kernel takes a power of two (Triton's blocks).")
  b, rows, d = qkv.shape[-3:]
  _, length, kv, _ = k_cache.shape
  if rows != n_heads + 2 * kv or n_heads % kv:
    raise ValueError(f"qkv holds {rows} heads: expected n_heads ({n_heads}) + 2 x the cache's {kv} KV heads, "
                     f"n_heads a multiple of them.")
  if k_cache.shape != (b, length, kv, d) or v_cache.shape != k_cache.shape:
    raise ValueError(f"k_cache and v_cache must both be (B, L, KV, D) = {(b, length, kv, d)}, got "
                     f"{k_cache.shape} and {v_cache.shape}.")
  g, half = n_heads // kv, d // 2
  if d % 2 or cos.shape != (half,) or sin.shape != (half,):
    raise ValueError(f"cos and sin must be ({half},) for heads of {d}, got {cos.shape} and {sin.shape}.")
  if backend.startswith("mosaic"):
    raise ValueError(f"decode_attention runs on the Pallas-Triton or interpret backend, not {backend!r}.")
  chunk = chunk or _chunk(length)
  if length % chunk or chunk & (chunk - 1):
    raise ValueError(f"chunk must be a power of two dividing the cache length {length}, got {chunk}.")
  cache_spec = pl.BlockSpec((None, length, None, d), lambda i, h: (i, 0, h // g, 0))
  row_spec = lambda index: pl.BlockSpec((None, 1, d), lambda i, h: (i, index(h), 0))
  in_row_spec = row_spec if parts is None else (  # a row's summands, (S, D)
      lambda index: pl.BlockSpec((parts, None, None, d), lambda i, h: (0, i, index(h), 0)))
  vec_spec = pl.BlockSpec((1, half), lambda i, h: (0, 0))
  out_dtype = qkv.dtype if parts is None else k_cache.dtype
  out_shape = (jax.ShapeDtypeStruct((b, n_heads, d), out_dtype), jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
               jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype))
  call = _backend.call(
      functools.partial(_kernel, half=half, group=g, chunk=chunk, summands=parts is not None), backend=backend,
      out_shape=out_shape,
      grid=(b, n_heads), in_specs=[pl.BlockSpec((1,), lambda i, h: (0,)), vec_spec, vec_spec,
                                   in_row_spec(lambda h: h), in_row_spec(lambda h: n_heads + h // g),
                                   in_row_spec(lambda h: n_heads + kv + h // g), cache_spec, cache_spec],
      out_specs=(row_spec(lambda h: h), cache_spec, cache_spec), num_warps=num_warps, num_stages=1,
      name="decode_attention", input_output_aliases={6: 1, 7: 2})
  pos = jnp.clip(jnp.asarray(pos, jnp.int32), 0, length - 1).reshape(1)
  cos, sin = (jnp.asarray(a, jnp.float32).reshape(1, half) for a in (cos, sin))
  return call(pos, cos, sin, qkv, qkv, qkv, k_cache, v_cache)
