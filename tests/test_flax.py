"""Flax integration: nnx layers and quantize_model, linen QDotGeneral / QEinsum / quantize_params, QAT, and
checkpoint round trips. Tiny models: the whole file runs in seconds on a CPU."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lowbit_jax as lb
from lowbit_jax import checkpoint
from lowbit_jax.flax import linen as qlinen
from lowbit_jax.flax.nnx import (QEinsum, QEmbed, QLinear, QLinearGeneral, QParam, quantize_model,
                                 weight_bytes)

DN = lambda nd: (((nd - 1,), (0,)), ((), ()))


def eq(a, b):
  np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def normal(seed, shape, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def init(key, shape, dtype=jnp.float32):
  """A kernel initializer drawing with numpy: compiling jax.random for every shape would dominate the run time."""
  return normal(sum(shape), shape, dtype) / np.sqrt(shape[0])


KW = dict(kernel_init=init, rngs=nnx.Rngs(0))


class Block(nnx.Module):
  def __init__(self, d, rngs):
    self.attn = nnx.Linear(d, d, use_bias=False, kernel_init=init, rngs=rngs)
    self.mlp = nnx.Linear(d, 2 * d, kernel_init=init, rngs=rngs)
    self.out = nnx.Linear(2 * d, d, kernel_init=init, rngs=rngs)

  def __call__(self, h):
    h = h + self.attn(h)
    return h + self.out(jax.nn.silu(self.mlp(h)))


class TinyLM(nnx.Module):
  def __init__(self, rngs, d=64, vocab=48, n=2):
    self.embed = nnx.Embed(vocab, d, embedding_init=init, rngs=rngs)
    self.layers = nnx.List([Block(d, rngs) for _ in range(n)])
    self.lm_head = nnx.Linear(d, vocab, kernel_init=init, rngs=rngs)

  def __call__(self, tokens):
    h = self.embed(tokens)
    for b in self.layers:
      h = b(h)
    return self.lm_head(h)


TOKENS = jnp.array([[1, 5, 7, 2], [3, 3, 0, 47]])


# nnx layers -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int4_g32_asym"])
def test_qlinear_equals_dot_general(fmt):
  layer = QLinear(64, 24, weight_format=fmt, **KW)
  x = normal(1, (2, 3, 64))
  w = layer.kernel.get_value()
  assert isinstance(layer.kernel, QParam) and isinstance(w, lb.QArray) and w.format.name == fmt
  eq(layer(x), lb.dot_general(x, w, DN(3)) + layer.bias.get_value())


def test_qlinear_from_float_matches_linear_on_dequantized_weights():
  lin = nnx.Linear(64, 16, **KW)
  q = QLinear.from_float(lin, "mxfp4")
  x = normal(1, (5, 64))
  ref = x @ lb.dequantize(q.kernel.get_value()) + lin.bias.get_value()
  np.testing.assert_allclose(q(x), ref, rtol=1e-5, atol=1e-5)
  # bf16 compute: the QArray is dequantized to the input's dtype.
  qb = QLinear.from_float(lin, "mxfp4")
  qb.dtype = jnp.bfloat16
  assert qb(x).dtype == jnp.bfloat16


def test_k_major_layers_hold_the_transposed_kernel_and_compute_the_same():
  lin = nnx.Linear(256, 64, **KW)
  q, qk = QLinear.from_float(lin, "int4_g128_sym"), QLinear.from_float(lin, "int4_g128_sym", k_major=True)
  w, wk = q.kernel.get_value(), qk.kernel.get_value()
  assert wk.shape == (64, 256) and wk.axis == 1
  eq(lb.dequantize(wk), lb.dequantize(w).T)  # same blocks, transposed
  x = normal(1, (2, 3, 256))
  eq(qk(x), lb.dot_general(x, wk, (((2,), (1,)), ((), ()))) + lin.bias.get_value())
  np.testing.assert_allclose(qk(x), q(x), rtol=1e-5, atol=1e-5)
  lg = nnx.LinearGeneral((2, 128), 64, axis=(-2, -1), **KW)
  g, gk = QLinearGeneral.from_float(lg, "int8_channel_sym"), QLinearGeneral.from_float(lg, "int8_channel_sym",
                                                                                      k_major=True)
  assert gk.kernel.get_value().shape == (64, 256)
  np.testing.assert_allclose(gk(x.reshape(2, 3, 2, 128)), g(x.reshape(2, 3, 2, 128)), rtol=1e-5, atol=1e-5)
  model = nnx.List([lin])
  quantize_model(model, {"0": "int8_channel_sym"}, k_major=True, verbose=False)
  assert model[0].k_major and model[0].kernel.get_value().shape == (64, 256)


def test_qlinear_general_and_einsum_equal_dot_general():
  lg = nnx.LinearGeneral((4, 16), (2, 8), axis=(-2, -1), **KW)
  q = QLinearGeneral.from_float(lg, "mxfp4")
  x = normal(1, (3, 4, 16))
  w = q.kernel.get_value()
  assert w.shape == (64, 16)
  eq(q(x), lb.dot_general(x.reshape(3, 64), w, DN(2)).reshape(3, 2, 8) + lg.bias.get_value())
  lg.kernel.set_value(lb.dequantize(w).reshape(4, 16, 2, 8))
  np.testing.assert_allclose(q(x), lg(x), rtol=1e-5, atol=1e-5)

  es = nnx.Einsum("btd,dnh->btnh", (64, 2, 8), (2, 8), **KW)
  qe = QEinsum.from_float(es, "mxfp4")
  x = normal(2, (2, 3, 64))
  eq(qe(x), lb.einsum("btd,dnh->btnh", x, qe.kernel.get_value()) + es.bias.get_value())
  # Contracting two kernel axes: quantized along the last of them.
  qe2 = QEinsum("btnh,nhd->btd", (2, 32, 16), (16,), weight_format="mxfp4", **KW)
  assert qe2.kernel.get_value().axis == 1
  x = normal(3, (2, 3, 2, 32))
  eq(qe2(x), lb.einsum("btnh,nhd->btd", x, qe2.kernel.get_value()) + qe2.bias.get_value())


@pytest.mark.parametrize("fmt", ["nvfp4", "int4_g32_asym"])
def test_qembed_gathers_rows_and_attends(fmt):
  emb = nnx.Embed(40, 64, embedding_init=init, rngs=nnx.Rngs(0))
  q = QEmbed.from_float(emb, fmt)
  table = lb.dequantize(q.embedding.get_value())
  idx = jnp.array([[0, 39, -1], [7, 7, 3]])
  eq(q(idx), jnp.take(table, idx, axis=0))
  query = normal(1, (2, 64))
  eq(q.attend(query), lb.dot_general(query, q.embedding.get_value(), (((1,), (1,)), ((), ()))))
  with pytest.raises(ValueError, match="integers"):
    q(jnp.ones((2,)))


def test_activation_format_runs_the_quantized_pair():
  layer = QLinear(64, 8, weight_format="mxfp4", activation_format="mxfp8_e4m3", use_bias=False, **KW)
  x = normal(1, (3, 64))
  eq(layer(x), lb.dot_general(lb.quantize(x, "mxfp8_e4m3", axis=-1), layer.kernel.get_value(), DN(2)))
  a8w8 = QLinear(64, 8, weight_format="int8_channel_sym", activation_format="int8_channel_sym", use_bias=False, **KW)
  eq(a8w8(x), lb.dot_general(lb.quantize(x, "int8_channel_sym", axis=-1), a8w8.kernel.get_value(), DN(2)))
  # in QAT the activation is fake-quantized (straight-through gradients for x and the float kernel)
  qat = QLinear(64, 8, weight_format="mxfp4", activation_format="mxfp8_e4m3", qat=True, use_bias=False, **KW)
  xq = lb.dequantize(lb.quantize(x, "mxfp8_e4m3", axis=-1))
  eq(qat(x), xq @ lb.fake_quant(qat.kernel.get_value(), "mxfp4", axis=0))


def test_layer_errors_name_the_layer_and_rule():
  with pytest.raises(ValueError, match="QLinear weight_format: format 'mxfp4' has blocks of 32 .* length 48"):
    QLinear(48, 8, weight_format="mxfp4", **KW)
  with pytest.raises(ValueError, match="2-D blocks"):
    QLinear(256, 8, weight_format="fp8_block_128x128", **KW)
  with pytest.raises(ValueError, match="batch_axis"):
    QLinearGeneral(64, 8, batch_axis={0: 2}, weight_format="mxfp4", **KW)


# quantize_model ---------------------------------------------------------------------------------------------------

def test_quantize_model_rules_and_untouched_layers():
  model = TinyLM(nnx.Rngs(0))
  ref = model(TOKENS)
  head, head_kernel = model.lm_head, model.lm_head.kernel.get_value()
  before = weight_bytes(model)
  report = quantize_model(model, [("layers/0/", "nvfp4"), ("attn", {"weight": "int4_g32_asym"}),
                                  ("mlp|out", "mxfp4"), ("lm_head", None)], verbose=False)
  # First matching rule wins; unmatched (embed) and None-mapped (lm_head) layers are the same objects.
  assert model.layers[0].mlp.weight_format.name == "nvfp4"
  assert model.layers[1].attn.weight_format.name == "int4_g32_asym"
  assert model.layers[1].out.weight_format.name == "mxfp4"
  assert model.lm_head is head and type(model.embed) is nnx.Embed
  eq(model.lm_head.kernel.get_value(), head_kernel)
  assert sorted(r.path for r in report.skipped) == ["embed", "lm_head"]
  assert len(report.converted) == 6
  assert report.bytes_before == before and report.bytes_after == weight_bytes(model) < before
  assert "6 layers converted" in str(report) and "skipped lm_head" in str(report)
  y = model(TOKENS)
  assert y.shape == ref.shape and float(jnp.max(jnp.abs(y - ref))) < 0.5 * float(jnp.max(jnp.abs(ref)))


def test_quantize_model_names_layers_a_hopper_gpu_runs_faster_k_major(monkeypatch):
  """On a Hopper GPU the summary counts the weight-only QLinear layers held (in, out) that its decode kernel takes
  K-major (a format it decodes, out a multiple of 64, in of 128); with k_major=True, or on any other device, none."""
  import pallas_kernels.backend

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.up, self.down, self.gate = (nnx.Linear(128, 128, rngs=rngs), nnx.Linear(128, 128, rngs=rngs),
                                       nnx.Linear(128, 96, rngs=rngs))

  rules = {"up": "mxfp4", "down": "int4_g32_asym", "gate": "int4_g128_sym"}  # (asym ints: no; 96 outputs: no)
  pair = {"up": {"weight": "int8_channel_sym", "activation": "int8_channel_sym"}, "down|gate": None}
  assert quantize_model(MLP(nnx.Rngs(0)), rules, verbose=False).k_major_faster == (
      1 if pallas_kernels.backend.hopper_available() else 0)
  monkeypatch.setattr(pallas_kernels.backend, "hopper_available", lambda: True)
  report = quantize_model(MLP(nnx.Rngs(0)), rules, verbose=False)
  assert report.k_major_faster == 1 and "1 QLinear layers hold (in, out) kernels" in str(report)
  assert quantize_model(MLP(nnx.Rngs(0)), rules, k_major=True, verbose=False).k_major_faster == 0
  assert quantize_model(MLP(nnx.Rngs(0)), pair, verbose=False).k_major_faster == 0  # (A8W8: not the decode kernel)


def test_quantize_model_bad_rules_name_rule_and_layer():
  model = TinyLM(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"rule 'decoder' matches no layer; the layers are: embed, "):
    quantize_model(model, {"mlp": "mxfp4", "decoder": "mxfp4"}, verbose=False)
  with pytest.raises(ValueError, match=r"rule 'mlp\|out' matches layer 'layers/0/mlp' \(Linear\).*blocks of 256 "
                     r".* length 64"):
    quantize_model(model, {"mlp|out": Format256}, verbose=False)
  with pytest.raises(ValueError, match=r"rule '\(' is not a valid regex"):
    quantize_model(model, {"(": "mxfp4"}, verbose=False)
  with pytest.raises(ValueError, match=r"rule 'mlp': Unknown format 'mxfp5'"):
    quantize_model(model, {"mlp": "mxfp5"}, verbose=False)
  # Nothing was changed by the failed calls.
  assert all(type(b.mlp) is nnx.Linear for b in model.layers)


Format256 = lb.Format("int4_g256", "int4", (256,), "bfloat16")


def test_quantize_model_progress_and_summary(capsys):
  model = TinyLM(nnx.Rngs(0))
  quantize_model(model, {"lm_head": None, ".*": "mxfp4"})
  err = capsys.readouterr().err
  assert "quantize_model: 7 layers converted (mxfp4: 7), 1 skipped" in err and "MiB" in err


def test_jit_split_merge_preserve_qarrays():
  model = TinyLM(nnx.Rngs(0))
  quantize_model(model, {"lm_head": None, ".*": "mxfp4"}, verbose=False)
  eager = model(TOKENS)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
  close(nnx.jit(lambda m, t: m(t))(model, TOKENS), eager)
  graphdef, state = nnx.split(model)
  qparams = jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, QParam))
  assert sum(isinstance(v, QParam) and isinstance(v.get_value(), lb.QArray) for v in qparams) == 7
  close(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, TOKENS), eager)
  eq(nnx.merge(graphdef, state)(TOKENS), eager)


# QAT --------------------------------------------------------------------------------------------------------------

def test_qat_gradients_then_freeze():
  model = TinyLM(nnx.Rngs(0))
  quantize_model(model, {"lm_head": None, ".*": "mxfp4"}, qat=True, verbose=False)
  assert isinstance(model.layers[0].mlp.kernel, nnx.Param) and model.layers[0].mlp.qat

  def loss(m):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(m(TOKENS), TOKENS))

  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  step = nnx.jit(lambda m, o: (lambda l, g: (o.update(m, g), l)[1])(*nnx.value_and_grad(loss)(m)))
  losses = [float(step(model, opt)) for _ in range(5)]
  assert losses[-1] < losses[0]
  # Straight-through: the kernel's gradient is the float layer's gradient at the fake-quantized kernel.
  layer = model.layers[0].mlp
  x = normal(1, (3, 64))
  g = nnx.grad(lambda l: jnp.sum(l(x) ** 2))(layer)["kernel"].get_value()
  fq = lb.dequantize(lb.quantize(layer.kernel.get_value(), "mxfp4", axis=0))
  g_ref = jax.grad(lambda w: jnp.sum((x @ w + layer.bias.get_value()) ** 2))(fq)
  np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)
  # Freezing gives quantized layers computing exactly what QAT's forward pass computed.
  y_qat = model(TOKENS)
  quantize_model(model, {"lm_head": None, ".*": "mxfp4"}, verbose=False)
  assert isinstance(model.layers[0].mlp.kernel, QParam)
  eq(model(TOKENS), y_qat)


def test_frozen_qparams_are_not_trained():
  model = TinyLM(nnx.Rngs(0))
  quantize_model(model, {"layers/0": "mxfp4"}, verbose=False)
  frozen = model.layers[0].mlp.kernel.get_value().data
  opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  grads = nnx.grad(lambda m: jnp.mean(m(TOKENS) ** 2))(model)
  opt.update(model, grads)
  eq(model.layers[0].mlp.kernel.get_value().data, frozen)


# checkpoints ------------------------------------------------------------------------------------------------------

def test_checkpoint_round_trip_nnx(tmp_path):
  rules = {"lm_head": "int8_channel_sym", "embed": "int4_g32_asym", ".*": "nvfp4"}  # tensor scale, zero point

  def build():
    m = TinyLM(nnx.Rngs(0))
    quantize_model(m, rules, verbose=False)
    return m

  model = build()
  ref = model(TOKENS)
  n = checkpoint.save(tmp_path / "q", model)
  n_float = checkpoint.save(tmp_path / "f", TinyLM(nnx.Rngs(0)))
  assert 0 < n < n_float
  # An abstract target computes no weights; the restored model runs without re-quantizing.
  restored = checkpoint.restore(tmp_path / "q", nnx.eval_shape(build))
  q0 = restored.layers[0].attn.kernel.get_value()
  assert isinstance(q0, lb.QArray) and q0.format.name == "nvfp4"
  eq(q0.data, model.layers[0].attn.kernel.get_value().data)
  eq(restored(TOKENS), ref)


# linen ------------------------------------------------------------------------------------------------------------

class LinenMLP(nn.Module):
  fmt: str = "mxfp4"
  qat: bool = False

  @nn.compact
  def __call__(self, x):
    dg = functools.partial(qlinen.QDotGeneral, weight_format=self.fmt, qat=self.qat)
    h = nn.Dense(64, dot_general_cls=dg, kernel_init=init)(x)
    h = nn.DenseGeneral((2, 32), dot_general_cls=dg, kernel_init=init)(jax.nn.relu(h))
    h = qlinen.QEinsum((2, 32, 16), "bnh,nhd->bd", weight_format=self.fmt, qat=self.qat, kernel_init=init)(h)
    return nn.Dense(4, kernel_init=init)(h)  # left in float


def test_linen_layers_equal_dot_general_and_quantize_params():
  model = LinenMLP()
  x = normal(1, (3, 32))
  variables = model.init(jax.random.key(0), x)
  assert set(variables) == {"params"}
  on_the_fly = model.apply(variables, x)
  qvars = qlinen.quantize_params(model, variables, x)
  q = qvars[qlinen.COLLECTION]
  k0 = q["Dense_0"]["QDotGeneral_0"]["kernel"]
  assert isinstance(k0, lb.QArray) and k0.shape == (32, 64) and k0.axis == 0
  assert q["DenseGeneral_0"]["QDotGeneral_0"]["kernel"].shape == (64, 2, 32)
  assert q["QEinsum_0"]["kernel"].axis == 1
  p = qvars["params"]
  assert all(isinstance(p[k]["kernel"], qlinen.KernelPlaceholder) for k in ("Dense_0", "DenseGeneral_0", "QEinsum_0"))
  assert isinstance(p["Dense_1"]["kernel"], jax.Array)
  eq(model.apply(qvars, x), on_the_fly)
  # The layers compute lb.dot_general on the stored QArray.
  h = lb.dot_general(x, k0, DN(2)) + variables["params"]["Dense_0"]["bias"]
  eq(nn.Dense(64, dot_general_cls=functools.partial(qlinen.QDotGeneral, weight_format="mxfp4"))
     .apply({"params": {"kernel": p["Dense_0"]["kernel"], "bias": p["Dense_0"]["bias"]},
             qlinen.COLLECTION: {"QDotGeneral_0": {"kernel": k0}}}, x), h)
  with pytest.raises(ValueError, match="no quantized kernel"):
    model.apply({"params": qvars["params"]}, x)


def test_linen_k_major_dense():
  x = normal(1, (3, 256))
  dense = lambda **kw: nn.Dense(64, kernel_init=init, dot_general_cls=functools.partial(
      qlinen.QDotGeneral, weight_format="int4_g128_sym", **kw))
  variables = dense().init(jax.random.key(0), x)
  qvars = qlinen.quantize_params(dense(k_major=True), variables, x)
  k = qvars[qlinen.COLLECTION]["QDotGeneral_0"]["kernel"]
  assert k.shape == (64, 256) and k.axis == 1
  assert isinstance(qvars["params"]["kernel"], qlinen.KernelPlaceholder)
  np.testing.assert_allclose(dense(k_major=True).apply(qvars, x), dense().apply(variables, x), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="k_major takes a 2-D kernel"):
    nn.DenseGeneral((2, 32), dot_general_cls=functools.partial(qlinen.QDotGeneral, weight_format="int4_g128_sym",
                                                               k_major=True)).init(jax.random.key(0), x)


def test_linen_qat_and_checkpoint(tmp_path):
  model = LinenMLP(qat=True)
  x = normal(1, (3, 32))
  variables = model.init(jax.random.key(0), x)
  g = jax.grad(lambda v: jnp.sum(model.apply(v, x) ** 2))(variables)
  assert all(float(jnp.abs(leaf).sum()) > 0 for leaf in jax.tree_util.tree_leaves(g))
  served = LinenMLP()
  qvars = qlinen.quantize_params(served, variables, x)
  eq(served.apply(qvars, x), model.apply(variables, x))
  checkpoint.save(tmp_path / "l", qvars)
  restored = checkpoint.restore(tmp_path / "l", jax.eval_shape(lambda: qvars))
  eq(served.apply(restored, x), served.apply(qvars, x))
