"""End-to-end greedy decoding of the examples/lm.py transformer: bf16 weights against each quantized format.

A ~1.1B-parameter Llama-style config (vocab 32000, d_model 2048, 16 layers, 32 query / 8 KV heads of 64, SwiGLU
8192) with random bf16 weights; every linear layer and the embedding quantized by `quantize_model`. For batch 1 and
8, a 128-token prompt and 128 generated tokens (one prefill, then 127 decode steps in one jitted loop): decode
tokens/s (median of 3 runs after a warm-up), ms per decode step, prefill time, and the weight memory. The target
of issue 4 is >= 2.5x bf16 decode tokens/s at batch 1 with mxfp4 or int4 weights. A last row runs the model with
its linear layers replaced by zeros: the rest of the step, which bounds what any weight format can gain. On a GPU
every row's decode steps run the LM's decode kernels (attention, residual adds with RMSNorm, and the split-K
partials added inside them: `examples/lm.py`, `Transformer.decode_step`).

A format named with "+kmajor" (int4_g128_sym+kmajor) holds the linear layers' kernels (out, in): the layout of
the Mosaic GPU decode kernel (Hopper, int4 / int8 / MXFP4 / MXFP6 / MXFP8 / NVFP4 weights); "+prepared" also stores
them in the kernel's register order (`lowbit_jax.flax.prepare_model`), so no call permutes its activations.

Usage (from the repository root):
  PYTHONPATH=. python benchmarks/e2e_decode.py [--formats mxfp4,int4_g128_sym+kmajor,...] [--batches 1,8]
  PYTHONPATH=. python benchmarks/e2e_decode.py --tiny    # a small config: a smoke test on a CPU
  PYTHONPATH=. python benchmarks/e2e_decode.py --backend xla    # XLA dequantize-then-dot instead of the kernel
  PYTHONPATH=. python benchmarks/e2e_decode.py --profile    # also where a decode step's GPU time goes, by kernel
"""

from __future__ import annotations

import argparse
import gc

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import gpu_us_by_kernel, header
from examples.lm import Config, Transformer, compile_steps, decode_tokens_per_s, quantized_copy
from lowbit_jax.flax import weight_bytes

FORMATS = ("mxfp4,nvfp4,mxfp8_e4m3,int4_g128_sym,int4_g32_sym,int4_g128_sym+kmajor,int4_g128_sym+prepared,"
           "int8_channel_sym+kmajor")
CONFIG_1B = Config(vocab=32000, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, ffn=8192)
CONFIG_TINY = Config(vocab=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn=256)


def _zeros_dot(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
  """Stands in for a linear layer's dot: zeros of its output shape, tied to lhs so XLA cannot fold them away."""
  del dimension_numbers, precision, kwargs  # an nnx.Linear: lhs (..., K) @ rhs (K, N)
  zero = (lhs[..., :1] * 0).astype(preferred_element_type or lhs.dtype)
  return jnp.broadcast_to(zero, lhs.shape[:-1] + rhs.shape[1:])


def without_matmuls(model: Transformer) -> Transformer:
  """A copy of `model` whose linear layers output zeros: its decode step times everything but the weight matmuls
  (attention over the cache, norms, RoPE, the embedding gather, argmax), the part no weight format speeds up."""
  graphdef, state = nnx.split(model)
  copy = nnx.merge(graphdef, state)
  for _, node in nnx.iter_graph(copy):
    if isinstance(node, nnx.Linear):
      node.dot_general = _zeros_dot
  return copy


def step_profile(model: Transformer, prompt: jax.Array, new: int, top: int = 6) -> str:
  """A table row: the GPU time of one decode step of `model` (the loop of `decode_tokens_per_s`, whose compiled
  steps it reuses), the kernels it launches, and the `top` kernel kinds by time (us per step, launches per step)."""
  graphdef, state = nnx.split(model)
  prefill, decode = compile_steps(graphdef)
  p, steps = prompt.shape[1], new - 1
  first, cache = prefill(state, prompt, p + new)
  by = gpu_us_by_kernel(lambda: decode(state, first, cache, p, steps), steps)
  ranked = sorted(by.items(), key=lambda kv: -kv[1][0])
  biggest = "; ".join(f"{name[:48]} {us:.1f} ({n:.0f})" for name, (us, n) in ranked[:top])
  return (f"{sum(us for us, _ in by.values()):.0f} | {sum(n for _, n in by.values()):.0f} | {biggest}")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--formats", default=FORMATS)
  p.add_argument("--batches", default="1,8")
  p.add_argument("--prompt", type=int, default=128)
  p.add_argument("--new", type=int, default=128)
  p.add_argument("--backend", default=None, help="lowbit_jax.dot_general backend: auto (default), pallas, xla, "
                 "interpret")
  p.add_argument("--profile", action="store_true", help="after the table, each model's decode step at the smallest "
                 "batch by kernel (jax.profiler GPU time)")
  p.add_argument("--tiny", action="store_true", help="small config, batches 1,2, prompt and new 16 (CPU smoke test)")
  a = p.parse_args()
  if a.profile and jax.devices()[0].platform != "gpu":
    p.error("--profile reads the GPU's kernel times from jax.profiler: it needs a GPU")
  cfg = CONFIG_TINY if a.tiny else CONFIG_1B
  batches = [1, 2] if a.tiny else [int(b) for b in a.batches.split(",")]
  b1 = min(batches)  # the batch of the summary lines and the profile
  prompt_len, new = (16, 16) if a.tiny else (a.prompt, a.new)

  print(header())
  print(f"\nconfig: {cfg.params / 1e6:.0f}M params, d_model {cfg.d_model}, {cfg.n_layers} layers, "
        f"{cfg.n_heads}/{cfg.n_kv_heads} heads of {cfg.head_dim}, ffn {cfg.ffn}, vocab {cfg.vocab}; prompt "
        f"{prompt_len}, {new} generated tokens (1 prefill + {new - 1} decode steps)\n")
  model = Transformer(cfg, nnx.Rngs(0))
  names = ["bf16"] + a.formats.split(",") + ["no weight matmuls (bound)"]
  rows, profiles = {}, {}
  print("| weights | weight MiB | batch | decode tok/s | vs bf16 | ms / step | prefill ms |")
  print("|---|---|---|---|---|---|---|", flush=True)
  for name in names:  # rows print as they are measured (bf16 first: the ratios need it)
    if name == "bf16":
      m = model
    elif name == names[-1]:
      m = without_matmuls(model)
    else:
      fmt, _, layout = name.partition("+")
      m = quantized_copy(model, {".*": fmt}, backend=a.backend, k_major=layout == "kmajor",
                         prepared=layout == "prepared")
    mib = weight_bytes(m) / 2**20
    for b in batches:
      prompt = jax.random.randint(jax.random.key(b), (b, prompt_len), 0, cfg.vocab)
      tps, t_pre = decode_tokens_per_s(m, prompt, new)
      rows[name, b] = tps
      print(f"| {name} | {mib:.1f} | {b} | {tps:.0f} | {tps / rows['bf16', b]:.2f}x | {b / tps * 1e3:.2f} | "
            f"{t_pre * 1e3:.1f} |", flush=True)
      if a.profile and b == b1:
        profiles[name] = step_profile(m, prompt, new)
    del m
    gc.collect()

  if profiles:
    print(f"\nA decode step's GPU time at batch {b1} (jax.profiler over {new - 1} steps; per step):\n\n"
          "| weights | GPU us / step | kernels / step | biggest kernel kinds, us (launches) |\n|---|---|---|---|")
    for name, row in profiles.items():
      print(f"| {name} | {row} |")
  print(f"\nWith free weight matmuls a decode step would still take {b1 / rows[names[-1], b1] * 1e3:.2f} ms at "
        f"batch {b1}: no weight format can beat bf16 by more than {rows[names[-1], b1] / rows['bf16', b1]:.2f}x.")
  best = max((n for n in names if n.startswith(("mxfp4", "int4"))), key=lambda n: rows[n, b1], default=None)
  if best:
    speedup = rows[best, b1] / rows["bf16", b1]
    print(f"\ntarget (batch {b1}, mxfp4 or int4 vs bf16 decode tokens/s >= 2.5x): {best} {speedup:.2f}x -> "
          f"{'met' if speedup >= 2.5 else 'not met'}")


if __name__ == "__main__":
  main()
