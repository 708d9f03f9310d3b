"""A decoder-only transformer LM in flax.nnx, quantized with `lowbit_jax.flax.quantize_model` and compared with bf16.

The model: token embedding, pre-norm blocks (RMSNorm; grouped-query attention with RoPE and a KV cache; SwiGLU
MLP), a final RMSNorm and an untied LM head; bf16 weights and activations. Generation is greedy: one prefill of the
prompt, then a decode loop (`lax.fori_loop`, one token per step, inside one jit). On a GPU a decode step runs
three kernels per layer around its matmuls, for bf16 and quantized models alike (`Transformer.decode_step`): the
attention (RoPE, the KV-cache update, softmax attention; `pallas_kernels/decode_attention.py`) and two residual
adds each with the RMSNorm after it (`pallas_kernels/rms_norm.py`), which also add up the quantized matmuls'
split-K partials (`lowbit_jax.matmul_summands`); a quantized MLP's SwiGLU runs in its gate/up kernel
(`lowbit_jax.matmul_swiglu`).

For bf16 and each format the report gives the weight memory, the size of its orbax checkpoint on disk (each
quantized model is saved, and the model measured is the one restored from disk into an abstract model, so nothing
is re-quantized; tests/test_flax.py checks that a restored model is bit-identical), decode tokens/s, and agreement
with bf16 on the bf16 model's own greedy continuation (teacher-forced): top-1 token agreement and the mean KL
divergence KL(p_bf16 || p_quantized) of the next-token distributions.

Weights are random (seeded): this checks the pipeline and shows how much each format perturbs a network's
outputs; it is not a quality benchmark. A random model's logits are nearly flat, so its top-1 token is decided by
small margins and top-1 agreement is a harsh measure here; KL is the steadier one. examples/pretrained.py runs
real weights. The default config runs on a CPU in under a minute; on a CPU the quantized matmul is the XLA
reference (dequantize, then dot), so tokens/s there say nothing about the GPU kernel (benchmarks/e2e_decode.py).

Usage:
  PYTHONPATH=. python examples/lm.py [--d-model 256 --layers 2 --heads 8 --kv-heads 2 --ffn 768 --vocab 1024]
      [--batch 2 --prompt 32 --new 32] [--formats mxfp4,nvfp4,mxfp8_e4m3,int4_g128_sym] [--k-major]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from lowbit_jax import checkpoint, matmul_summands, matmul_swiglu
from lowbit_jax.flax import QLinear, prepare_model, quantize_model, weight_bytes
from pallas_kernels.backend import on_gpu
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.rms_norm import add_rms_norm

DEFAULT_FORMATS = "mxfp4,nvfp4,mxfp8_e4m3,int4_g128_sym"
# Mixed precision by rules: attention in MXFP8, MLP in MXFP4, embedding and LM head left in bf16.
MIXED_RULES = {"embed|lm_head": None, "attn": "mxfp8_e4m3", "mlp": "mxfp4"}


@dataclasses.dataclass(frozen=True)
class Config:
  vocab: int = 1024
  d_model: int = 256
  n_layers: int = 2
  n_heads: int = 8
  n_kv_heads: int = 2
  head_dim: int = 32
  ffn: int = 768
  rope_theta: float = 10000.0
  dtype: str = "bfloat16"  # activations
  param_dtype: str = "bfloat16"  # weights (float32 master weights for training: examples/qat.py)
  # One-token (decode) steps: "auto" runs the decode kernels (`Transformer.decode_step`) on a GPU and XLA's ops
  # elsewhere; "xla", "triton" or "interpret" pick one. Steps of several tokens (prefill) always run XLA's ops.
  decode_kernels: str = "auto"

  def __post_init__(self):
    if self.decode_kernels not in ("auto", "xla", "triton", "interpret"):
      raise ValueError("Config.decode_kernels must be 'auto', 'xla', 'triton' or 'interpret', got "
                       f"{self.decode_kernels!r}.")

  @property
  def params(self) -> int:
    d, hd = self.d_model, self.head_dim
    attn = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
    return 2 * self.vocab * d + self.n_layers * (attn + 3 * d * self.ffn + 2 * d) + d


def rope_angles(positions: jax.Array, dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """(cos, sin), each (T, dim / 2) float32: the rotation at positions (T,) of the pairs (i, i + dim/2), by angle
  pos * theta^(-2i/dim)."""
  half = dim // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[:, None] * freq[None, :]
  return jnp.cos(angle), jnp.sin(angle)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding of x (B, T, H, D) at positions (T,) (`rope_angles`)."""
  half = x.shape[-1] // 2
  cos, sin = (a[None, :, None, :] for a in rope_angles(positions, x.shape[-1], theta))
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _linear(n_in: int, n_out: int, cfg: Config, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(n_in, n_out, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)


class Attention(nnx.Module):
  """Grouped-query attention: n_heads query heads share n_kv_heads key/value heads; a (B, L, n_kv, head_dim) KV
  cache per layer, written at positions [pos, pos + T). (One-token steps with the decode kernels:
  `Block.decode_step`.)"""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.cfg = cfg
    # Queries, keys and values from one matmul (fewer kernel launches per decode step).
    self.qkv_proj = _linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, cfg, rngs)
    self.o_proj = _linear(cfg.n_heads * cfg.head_dim, cfg.d_model, cfg, rngs)

  def __call__(self, x, cache, pos):
    cfg = self.cfg
    b, t, _ = x.shape
    kv, g, hd = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    positions = pos + jnp.arange(t)
    qkv = self.qkv_proj(x).reshape(b, t, kv * g + 2 * kv, hd)
    q, k, v = jnp.split(qkv, [kv * g, kv * g + kv], axis=2)
    q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
    ck = lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, pos, 0, 0))
    cv = lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, pos, 0, 0))
    q = q.reshape(b, t, kv, g, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, ck, preferred_element_type=jnp.float32) / jnp.sqrt(hd)
    visible = jnp.arange(ck.shape[1])[None, :] <= positions[:, None]  # (T, L): causal over the cache
    scores = jnp.where(visible, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(cv.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, cv).reshape(b, t, kv * g * hd)
    return self.o_proj(out), (ck, cv)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)), gate and up from one matmul."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.gate_up = _linear(cfg.d_model, 2 * cfg.ffn, cfg, rngs)
    self.down = _linear(cfg.ffn, cfg.d_model, cfg, rngs)

  def __call__(self, x):
    gate, up = jnp.split(self.gate_up(x), 2, axis=-1)
    return self.down(jax.nn.silu(gate) * up)


class Block(nnx.Module):
  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    norm = functools.partial(nnx.RMSNorm, cfg.d_model, epsilon=1e-6, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.attn_norm, self.mlp_norm = norm(rngs=rngs), norm(rngs=rngs)
    self.attn = Attention(cfg, rngs)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, cache, pos):
    h, cache = self.attn(self.attn_norm(x), cache, pos)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), cache

  def decode_step(self, x, pending, cache, pos, rope, backend: str):
    """One token per batch row through the decode kernels. x (B, d_model) is the residual stream without the
    last block's MLP output, which `pending` holds as summands (S, B, d_model) (None before the first block);
    `rope` the (cos, sin) at pos. Returns the residual stream after this block's attention, this block's MLP
    output as summands, and the cache."""
    cfg = self.attn.cfg
    b, n_heads, hd = x.shape[0], cfg.n_heads, cfg.head_dim
    if pending is None:
      normed = self.attn_norm(x)
    else:
      x, normed = add_rms_norm(x, pending, self.attn_norm.scale[...], eps=self.attn_norm.epsilon, backend=backend)
    qkv = _summands(self.attn.qkv_proj, normed)
    out, k_cache, v_cache = decode_attention(qkv.reshape(*qkv.shape[:2], -1, hd), *cache, *rope, pos,
                                             n_heads=n_heads, backend=backend)
    x, normed = add_rms_norm(x, _summands(self.attn.o_proj, out.reshape(b, n_heads * hd)), self.mlp_norm.scale[...],
                             eps=self.mlp_norm.epsilon, backend=backend)
    return x, _summands(self.mlp.down, _swiglu(self.mlp.gate_up, normed)), (k_cache, v_cache)


def _weight_only(layer) -> bool:
  """Whether `layer` is a plain weight-only quantized linear layer, which the decode step may run through the
  library's fused matmuls instead of its own call."""
  return isinstance(layer, QLinear) and not layer.qat and layer.activation_format is None and layer.bias is None


def _summands(layer, x):
  """A linear layer's output as summands (S, ..., out) for the next kernel to add: a quantized layer's split-K
  partials (`lowbit_jax.matmul_summands`), or the output of any other layer as the one summand."""
  if _weight_only(layer):
    return matmul_summands(x, layer.kernel.get_value(), backend=layer.backend)
  return layer(x)[None]


def _swiglu(layer, x):
  """silu(gate) * up from the MLP's gate/up layer: `lowbit_jax.matmul_swiglu` for a quantized layer (on the Mosaic
  GPU kernel the SwiGLU runs in its epilogue), else the layer's output through XLA's ops."""
  if _weight_only(layer):
    return matmul_swiglu(x, layer.kernel.get_value(), backend=layer.backend)
  gate, up = jnp.split(layer(x), 2, axis=-1)
  return jax.nn.silu(gate) * up


class Transformer(nnx.Module):
  """tokens (B, T) int32, a KV cache (one (k, v) pair per layer) and the position of tokens[:, 0] -> logits
  (B, T, vocab) float32 and the updated cache."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
    self.norm = nnx.RMSNorm(cfg.d_model, epsilon=1e-6, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.lm_head = _linear(cfg.d_model, cfg.vocab, cfg, rngs)

  def init_cache(self, batch: int, max_len: int):
    shape = (batch, max_len, self.cfg.n_kv_heads, self.cfg.head_dim)
    return [(jnp.zeros(shape, self.cfg.dtype), jnp.zeros(shape, self.cfg.dtype)) for _ in self.layers]

  def __call__(self, tokens, cache, pos):
    backend = self.cfg.decode_kernels
    if backend == "auto":
      backend = "triton" if on_gpu(tokens) else "xla"
    if tokens.shape[1] == 1 and backend != "xla":
      return self.decode_step(tokens, cache, pos, backend)
    x = self.embed(tokens)
    new_cache = []
    for block, c in zip(self.layers, cache):
      x, c = block(x, c, pos)
      new_cache.append(c)
    return self.lm_head(self.norm(x)).astype(jnp.float32), new_cache

  def decode_step(self, tokens, cache, pos, backend: str):
    """`__call__` for tokens (B, 1) through the decode kernels (`backend`: "triton" or "interpret"): the same
    logits and cache, with each block's residual adds fused into the RMSNorm after them and the matmuls' split-K
    partials added inside the kernels that take their outputs (`Block.decode_step`)."""
    cos, sin = rope_angles(jnp.reshape(pos, (1,)), self.cfg.head_dim, self.cfg.rope_theta)
    x, pending, new_cache = self.embed(tokens[:, 0]), None, []
    for block, c in zip(self.layers, cache):
      x, pending, c = block.decode_step(x, pending, c, pos, (cos[0], sin[0]), backend)
      new_cache.append(c)
    _, normed = add_rms_norm(x, pending, self.norm.scale[...], eps=self.norm.epsilon, backend=backend)
    return self.lm_head(normed)[:, None].astype(jnp.float32), new_cache


@functools.lru_cache(maxsize=4)
def compile_steps(graphdef) -> tuple[Callable, Callable]:
  """(prefill, decode), jitted for models of this graph definition, which they close over: passed as a static
  argument, jit would hash it on every call (1.8 ms for 16 layers on a CPU host, counted in a timed prefill).
  Cached per graph definition, so that timing and profiling one model compile it once.

  prefill(state, prompt (B, P), max_len): the first generated token (B,) and the KV cache of length max_len.
  decode(state, token, cache, start, steps): greedy decoding, `steps` forward passes of one token each from
  position `start`; the tokens (B, steps) they produce."""

  @functools.partial(jax.jit, static_argnums=(2,))
  def prefill(state, prompt, max_len: int):
    model = nnx.merge(graphdef, state)
    logits, cache = model(prompt, model.init_cache(prompt.shape[0], max_len), 0)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

  @functools.partial(jax.jit, static_argnums=(4,))
  def decode(state, token, cache, start, steps: int):
    model = nnx.merge(graphdef, state)

    def body(i, carry):
      tok, cache, out = carry
      logits, cache = model(tok[:, None], cache, start + i)
      tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
      return tok, cache, out.at[:, i].set(tok)

    out = jnp.zeros((token.shape[0], steps), jnp.int32)
    return lax.fori_loop(0, steps, body, (token, cache, out))[2]

  return prefill, decode


@functools.partial(jax.jit, static_argnums=(0,))
def forward(graphdef, state, tokens):
  """Teacher-forced logits (B, T, vocab) of a whole sequence."""
  model = nnx.merge(graphdef, state)
  return model(tokens, model.init_cache(*tokens.shape), 0)[0]


def generate(model: Transformer, prompt: jax.Array, new: int) -> jax.Array:
  """Greedy continuation of `prompt` (B, P): (B, new) tokens."""
  graphdef, state = nnx.split(model)
  prefill, decode = compile_steps(graphdef)
  first, cache = prefill(state, prompt, prompt.shape[1] + new)
  rest = decode(state, first, cache, prompt.shape[1], new - 1)
  return jnp.concatenate([first[:, None], rest], axis=1)


def decode_tokens_per_s(model: Transformer, prompt: jax.Array, new: int, repeats: int = 3) -> tuple[float, float]:
  """(decode tokens/s, prefill seconds): median of `repeats` timed runs after one warm-up (compilation)."""
  graphdef, state = nnx.split(model)
  prefill, decode = compile_steps(graphdef)
  b, p = prompt.shape
  steps = new - 1
  first, cache = jax.block_until_ready(prefill(state, prompt, p + new))
  jax.block_until_ready(decode(state, first, cache, p, steps))
  t_pre, t_dec = [], []
  for _ in range(repeats):
    t0 = time.perf_counter()
    first, cache = jax.block_until_ready(prefill(state, prompt, p + new))
    t1 = time.perf_counter()
    jax.block_until_ready(decode(state, first, cache, p, steps))
    t_pre.append(t1 - t0)
    t_dec.append(time.perf_counter() - t1)
  t_pre.sort()
  t_dec.sort()
  return b * steps / t_dec[len(t_dec) // 2], t_pre[len(t_pre) // 2]


def agreement(ref_logits: jax.Array, logits: jax.Array) -> tuple[float, float]:
  """(top-1 agreement, mean KL(p_ref || p)) over all positions."""
  top1 = jnp.mean(jnp.argmax(ref_logits, -1) == jnp.argmax(logits, -1))
  lp_ref, lp = jax.nn.log_softmax(ref_logits, -1), jax.nn.log_softmax(logits, -1)
  kl = jnp.mean(jnp.sum(jnp.exp(lp_ref) * (lp_ref - lp), -1))
  return float(top1), float(kl)


def quantized_copy(model: Transformer, rules, backend: str | None = None, k_major: bool = False,
                   prepared: bool = False) -> Transformer:
  """A copy of `model` (sharing its arrays) with `quantize_model(rules)` applied; `model` is unchanged.
  `k_major` holds the linear layers' kernels (out, in), the layout of the Mosaic GPU decode kernel; `prepared`
  also stores them in its register order (`prepare_model`)."""
  graphdef, state = nnx.split(model)
  copy = nnx.merge(graphdef, state)
  quantize_model(copy, rules, backend=backend, k_major=k_major or prepared, verbose=False)
  if prepared:
    prepare_model(copy)
  return copy


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--vocab", type=int, default=Config.vocab)
  p.add_argument("--d-model", type=int, default=Config.d_model)
  p.add_argument("--layers", type=int, default=Config.n_layers)
  p.add_argument("--heads", type=int, default=Config.n_heads)
  p.add_argument("--kv-heads", type=int, default=Config.n_kv_heads)
  p.add_argument("--head-dim", type=int, default=Config.head_dim)
  p.add_argument("--ffn", type=int, default=Config.ffn)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--prompt", type=int, default=32)
  p.add_argument("--new", type=int, default=32, help="tokens generated per sequence")
  p.add_argument("--formats", default=DEFAULT_FORMATS, help="each applied to every linear layer and the embedding")
  p.add_argument("--skip", default="", help="regex of layers to leave in bf16 for the per-format rows, e.g. lm_head")
  p.add_argument("--k-major", action="store_true", help="hold linear kernels (out, in), prepared for the Mosaic GPU "
                 "decode kernel (Hopper); checkpoints store them canonical, restore prepares them again")
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  cfg = Config(a.vocab, a.d_model, a.layers, a.heads, a.kv_heads, a.head_dim, a.ffn)
  model = Transformer(cfg, nnx.Rngs(a.seed))
  prompt = jax.random.randint(jax.random.key(a.seed + 1), (a.batch, a.prompt), 0, cfg.vocab, jnp.int32)
  print(f"config: {cfg} ({cfg.params / 1e6:.1f}M params), batch {a.batch}, prompt {a.prompt}, {a.new} new tokens, "
        f"{jax.devices()[0].device_kind}")

  ref_tokens = generate(model, prompt, a.new)
  seq = jnp.concatenate([prompt, ref_tokens], axis=1)
  ref_logits = forward(*nnx.split(model), seq)
  variants = [("bf16", [])]
  for fmt in a.formats.split(","):
    variants.append((fmt, ([(a.skip, None)] if a.skip else []) + [(".*", fmt)]))
  variants.append(("mixed: attn mxfp8_e4m3, mlp mxfp4", MIXED_RULES))

  print("| weights | weight MiB | checkpoint MiB | decode tok/s | vs bf16 | prefill ms | top-1 agreement | "
        "KL(bf16 \\|\\| q) |")
  print("|---|---|---|---|---|---|---|---|")
  base = None
  for name, rules in variants:
    # Quantize, save, and run the model restored from disk (into an abstract model: nothing is re-quantized).
    with tempfile.TemporaryDirectory() as tmp:
      disk = checkpoint.save(f"{tmp}/ckpt", quantized_copy(model, rules, prepared=a.k_major))
      abstract = nnx.eval_shape(lambda: quantized_copy(Transformer(cfg, nnx.Rngs(0)), rules, prepared=a.k_major))
      m = checkpoint.restore(f"{tmp}/ckpt", abstract)
    logits = forward(*nnx.split(m), seq)
    tps, t_pre = decode_tokens_per_s(m, prompt, a.new)
    base = base or tps
    top1, kl = agreement(ref_logits, logits)
    print(f"| {name} | {weight_bytes(m) / 2**20:.2f} | {disk / 2**20:.2f} | {tps:.0f} | {tps / base:.2f}x | "
          f"{t_pre * 1e3:.1f} | {top1:.3f} | {kl:.4f} |", flush=True)


if __name__ == "__main__":
  main()
