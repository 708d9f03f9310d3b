"""Quantization-aware training: the examples/lm.py transformer fine-tuned with MXFP4 fake-quantized weights, against
the same model trained in bf16, on a CPU.

Data: sequences from a fixed random Markov chain (each token has a few likely successors), so the best achievable
next-token loss is the chain's entropy rate, printed as the floor. Both runs start from the same weights, see the
same batches and use the same optimizer (AdamW, float32 master weights, bf16 compute). The QAT run converts every
linear layer and the embedding with `quantize_model(..., qat=True)`: the forward pass uses `fake_quant(w,
"mxfp4")` and the gradient passes straight through to the float weights.

At the end, held-out loss of: the bf16 model; the bf16 model quantized to MXFP4 after training (PTQ); and the QAT
model frozen to MXFP4 QArrays (`quantize_model` again, without qat), which computes exactly its training forward
pass.

Usage:
  PYTHONPATH=. python examples/qat.py [--steps 300] [--format mxfp4] [--batch 16] [--seq 64]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from examples.lm import Config, Transformer
from lowbit_jax.flax import quantize_model, weight_bytes

CONFIG = Config(vocab=64, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn=384,
                param_dtype="float32")


class MarkovChain:
  """A random chain over `vocab` tokens: each row puts its mass on `fanout` successors (Dirichlet weights)."""

  def __init__(self, vocab: int, fanout: int, seed: int):
    rng = np.random.default_rng(seed)
    self.p = np.zeros((vocab, vocab))
    for i in range(vocab):
      self.p[i, rng.choice(vocab, fanout, replace=False)] = rng.dirichlet(np.ones(fanout))
    self.cum = np.cumsum(self.p, axis=1)

  def entropy_rate(self) -> float:
    """Nats per token: the stationary average of the rows' entropies (the loss floor)."""
    w, v = np.linalg.eig(self.p.T)
    pi = np.abs(np.real(v[:, np.argmin(np.abs(w - 1))]))
    pi /= pi.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
      h = -np.nansum(np.where(self.p > 0, self.p * np.log(self.p), 0.0), axis=1)
    return float(pi @ h)

  def sample(self, rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    out = np.empty((batch, length), np.int32)
    out[:, 0] = rng.integers(0, self.p.shape[0], batch)
    for t in range(1, length):
      u = rng.random(batch)[:, None]
      out[:, t] = np.minimum((u > self.cum[out[:, t - 1]]).sum(1), self.p.shape[0] - 1)
    return out


def loss_fn(model: Transformer, tokens: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy of tokens (B, T)."""
  inputs = tokens[:, :-1]
  logits, _ = model(inputs, model.init_cache(*inputs.shape), 0)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]))


@nnx.jit
def train_step(model: Transformer, opt: nnx.Optimizer, tokens: jax.Array) -> jax.Array:
  loss, grads = nnx.value_and_grad(loss_fn)(model, tokens)
  opt.update(model, grads)
  return loss


eval_loss = nnx.jit(loss_fn)


def train(model: Transformer, chain: MarkovChain, steps: int, batch: int, seq: int, seed: int) -> list[float]:
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, steps // 10, steps), weight_decay=0.01)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  rng = np.random.default_rng(seed)
  return [float(train_step(model, opt, jnp.asarray(chain.sample(rng, batch, seq + 1)))) for _ in range(steps)]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--format", default="mxfp4")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq", type=int, default=64)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  chain = MarkovChain(CONFIG.vocab, fanout=4, seed=a.seed)
  rules = {".*": a.format}
  held_out = jnp.asarray(chain.sample(np.random.default_rng(a.seed + 1000), 64, a.seq + 1))

  t0 = time.perf_counter()
  bf16 = Transformer(CONFIG, nnx.Rngs(a.seed))
  bf16_losses = train(bf16, chain, a.steps, a.batch, a.seq, a.seed)
  t1 = time.perf_counter()
  qat = Transformer(CONFIG, nnx.Rngs(a.seed))
  quantize_model(qat, rules, qat=True, verbose=False)
  qat_losses = train(qat, chain, a.steps, a.batch, a.seq, a.seed)
  t2 = time.perf_counter()

  print(f"{a.steps} steps, batch {a.batch} x {a.seq} tokens, {jax.devices()[0].device_kind}: bf16 {t1 - t0:.1f} s, "
        f"QAT {a.format} {t2 - t1:.1f} s. Loss floor (chain entropy rate): {chain.entropy_rate():.3f}\n")
  print(f"| step | bf16 train loss | QAT {a.format} train loss |")
  print("|---|---|---|")
  every = max(1, a.steps // 10)
  for s in list(range(0, a.steps, every)) + [a.steps - 1]:
    lo = max(0, s - every // 2)  # mean over a window: single-batch losses are noisy
    print(f"| {s + 1} | {np.mean(bf16_losses[lo:s + 1]):.3f} | {np.mean(qat_losses[lo:s + 1]):.3f} |")

  ptq = nnx.merge(*nnx.split(bf16))
  quantize_model(ptq, rules, verbose=False)
  frozen = nnx.merge(*nnx.split(qat))
  quantize_model(frozen, rules, verbose=False)
  print("\n| model (held-out batch) | weight MiB | loss |")
  print("|---|---|---|")
  for name, m in [("bf16 training (float32 master weights)", bf16), (f"bf16 training, {a.format} PTQ", ptq),
                  (f"QAT {a.format}, fake-quantized", qat), (f"QAT {a.format}, frozen to {a.format}", frozen)]:
    print(f"| {name} | {weight_bytes(m) / 2**20:.2f} | {float(eval_loss(m, held_out)):.4f} |")


if __name__ == "__main__":
  main()
