"""pallas_kernels.decode_attention (the Triton kernel on a GPU, Pallas's interpreter on a CPU) against attention
computed in float64 by numpy, and the example LM's decode step with the kernel against its XLA ops."""

import dataclasses

import ml_dtypes
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from examples.lm import Config, Transformer, quantized_copy
from pallas_kernels.backend import gpu_available
from pallas_kernels.decode_attention import decode_attention

BACKEND = "triton" if gpu_available() else "interpret"


def _bf16(x):  # round to nearest even in bfloat16 (ml_dtypes), back to float64
  return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def reference(qkv, k_cache, v_cache, cos, sin, pos, n_heads):
  """(out, k_cache, v_cache) in float64: RoPE'd query and key rounded to bfloat16 (as both paths store them), the
  cache rows at pos replaced, softmax attention over positions 0..pos, query head h on KV head h // (H / KV)."""
  qkv, kc, vc = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (qkv, k_cache, v_cache))
  b, rows, d = qkv.shape
  kv, half = (rows - n_heads) // 2, d // 2
  cos, sin = np.asarray(cos, np.float64), np.asarray(sin, np.float64)

  def rope(x):
    lo, hi = x[..., :half], x[..., half:]
    return _bf16(np.concatenate([lo * cos - hi * sin, hi * cos + lo * sin], -1))

  q, kc[:, pos], vc[:, pos] = rope(qkv[:, :n_heads]), rope(qkv[:, n_heads:n_heads + kv]), qkv[:, n_heads + kv:]
  out = np.empty((b, n_heads, d))
  for i in range(b):
    for h in range(n_heads):
      j = h // (n_heads // kv)
      s = kc[i, :pos + 1, j] @ q[i, h] / np.sqrt(d)
      p = np.exp(s - s.max())
      out[i, h] = p @ vc[i, :pos + 1, j] / p.sum()
  return out, kc, vc


def _inputs(b, n_heads, kv, d, length, pos, seed=0):
  rng = np.random.default_rng(seed)
  qkv = jnp.asarray(rng.standard_normal((b, n_heads + 2 * kv, d)), jnp.bfloat16)
  kc, vc = (jnp.asarray(rng.standard_normal((b, length, kv, d)), jnp.bfloat16) for _ in range(2))
  angle = pos * 10000.0 ** (-np.arange(d // 2) / (d // 2))
  return qkv, kc, vc, np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


@pytest.mark.parametrize("b,n_heads,kv,d,length,pos,chunk", [
    (1, 8, 2, 16, 24, 0, None),  # the first position: a softmax over one key
    (2, 8, 2, 16, 24, 13, None),  # batch 2, L not a power of two (chunks of 8)
    (1, 32, 8, 64, 256, 200, None),  # the 1.1B LM's heads, one step over the cache
    (1, 32, 8, 64, 256, 200, 32),  # seven steps, the last partly masked, one skipped
    (1, 4, 4, 8, 128, 64, 64),  # multi-head (G = 1); pos the first row of a step
    (3, 4, 1, 8, 16, 15, None),  # multi-query (KV = 1); pos the cache's last row
])
def test_matches_float64(b, n_heads, kv, d, length, pos, chunk):
  qkv, kc, vc, cos, sin = _inputs(b, n_heads, kv, d, length, pos)
  f = jax.jit(lambda *a: decode_attention(*a, n_heads=n_heads, backend=BACKEND, chunk=chunk))
  _check(f(qkv, kc, vc, cos, sin, pos), reference(qkv, kc, vc, cos, sin, pos, n_heads), pos)


@pytest.mark.parametrize("s", [1, 4])
def test_summands(s):
  """qkv as summands (S, B, H + 2 KV, D), as a split-K projection leaves them: added in float32, rounded once."""
  b, n_heads, kv, d, length, pos = 2, 8, 2, 16, 32, 9
  rng = np.random.default_rng(3)
  parts = jnp.asarray(rng.integers(-128, 129, (s, b, n_heads + 2 * kv, d)) / 64, jnp.float32)  # exact sums
  _, kc, vc, cos, sin = _inputs(b, n_heads, kv, d, length, pos)
  f = jax.jit(lambda *a: decode_attention(*a, n_heads=n_heads, backend=BACKEND))
  qkv = jnp.sum(parts, 0).astype(jnp.bfloat16)  # the projection's output
  _check(f(parts, kc, vc, cos, sin, pos), reference(qkv, kc, vc, cos, sin, pos, n_heads), pos)


def _check(got, ref, pos):
  (out, k2, v2), (ref_out, ref_k, ref_v) = got, ref
  assert out.shape == ref_out.shape and out.dtype == jnp.bfloat16
  # float32 scores and softmax, then one rounding to bfloat16: within 2^-8 of |out| (plus float32 noise)
  np.testing.assert_allclose(np.asarray(out, np.float64), ref_out, rtol=2 ** -8, atol=1e-3)
  # every other row of the caches as it was; the new rows within a bfloat16 ulp (the GPU may fuse RoPE's
  # multiply-adds, which rounds once where numpy's float64 and XLA round twice)
  np.testing.assert_array_equal(np.delete(np.asarray(k2, np.float64), pos, 1), np.delete(ref_k, pos, 1))
  np.testing.assert_array_equal(np.asarray(v2, np.float64), ref_v)
  np.testing.assert_allclose(np.asarray(k2, np.float64)[:, pos], ref_k[:, pos], rtol=2 ** -7, atol=1e-6)


def test_traced_position_under_jit_reuses_one_compilation():
  qkv, kc, vc, _, _ = _inputs(1, 8, 2, 16, 32, 0)
  f = jax.jit(lambda qkv, kc, vc, pos: decode_attention(qkv, kc, vc, jnp.ones(8), jnp.zeros(8), pos, n_heads=8,
                                                         backend=BACKEND))
  for pos in (3, 17, 31):
    out, k2, v2 = f(qkv, kc, vc, pos)
    ref = reference(qkv, kc, vc, np.ones(8), np.zeros(8), pos, 8)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref[0], rtol=2 ** -8, atol=1e-3)
  assert f._cache_size() == 1


def test_lm_decode_step_matches_xla_ops():
  """A one-token step of the example LM (two blocks, cache filled by a prefill) through the decode kernels and
  through XLA's ops: bf16 attention layers, and MLP layers in int4 prepared for the Mosaic GPU kernel (on a Hopper
  GPU the gate/up kernel applies the SwiGLU, and the down projection splits K, its partials added inside the next
  block's norm kernel; elsewhere XLA's matmuls give one summand each)."""
  cfg = Config(vocab=128, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn=512)
  model = quantized_copy(Transformer(cfg, nnx.Rngs(0)), {"mlp": "int4_g128_sym"}, prepared=True)
  kernel_model = nnx.merge(*nnx.split(model))  # the same weights, run through the decode kernels
  kernel_model.cfg = dataclasses.replace(cfg, decode_kernels=BACKEND)
  prompt = jax.random.randint(jax.random.key(1), (2, 5), 0, cfg.vocab)
  _, cache = model(prompt, model.init_cache(2, 12), 0)
  tok = prompt[:, -1:]
  ref_logits, ref_cache = jax.jit(lambda t, c: model(t, c, 5))(tok, cache)
  step = jax.jit(lambda t, c: kernel_model(t, c, 5))
  assert "add_rms_norm" in str(step.trace(tok, cache).jaxpr)  # (the decode kernels' path)
  logits, new_cache = step(tok, cache)
  # (float32 sums in other orders may move a bf16 activation by an ulp, which later layers carry on)
  np.testing.assert_allclose(logits, ref_logits, rtol=0.05, atol=0.05)
  for got, want in zip(jax.tree.leaves(new_cache), jax.tree.leaves(ref_cache)):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_array_equal(np.delete(got, 5, 1), np.delete(want, 5, 1))  # the prefill's rows untouched
    np.testing.assert_allclose(got[:, 5], want[:, 5], rtol=0.05, atol=0.05)


def test_bad_input():
  qkv, kc, vc, cos, sin = _inputs(1, 8, 2, 16, 24, 0)
  with pytest.raises(ValueError, match="qkv holds 3 summands: the kernel takes a power of two"):
    decode_attention(jnp.stack([qkv] * 3), kc, vc, cos, sin, 0, n_heads=8, backend="interpret")
  with pytest.raises(ValueError, match="qkv holds 12 heads: expected n_heads \\(6\\)"):
    decode_attention(qkv, kc, vc, cos, sin, 0, n_heads=6, backend="interpret")
  with pytest.raises(ValueError, match="k_cache and v_cache must both be"):
    decode_attention(qkv, kc, vc[:, :8], cos, sin, 0, n_heads=8, backend="interpret")
  with pytest.raises(ValueError, match="cos and sin must be \\(8,\\)"):
    decode_attention(qkv, kc, vc, cos[:4], sin, 0, n_heads=8, backend="interpret")
  with pytest.raises(ValueError, match="chunk must be a power of two dividing the cache length 24, got 16"):
    decode_attention(qkv, kc, vc, cos, sin, 0, n_heads=8, backend="interpret", chunk=16)
  with pytest.raises(ValueError, match="Config.decode_kernels must be 'auto', 'xla', 'triton' or 'interpret', got "
                     "'cuda'"):
    Config(decode_kernels="cuda")
