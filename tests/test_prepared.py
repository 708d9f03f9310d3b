"""Prepared K-major weights (`lb.prepare`): the stored order against a numpy statement of it, the round trip to the
canonical QArray, every path of `lb.dot_general` against the canonical weight, the Flax helpers and checkpoints.
(The kernel on prepared weights: tests/test_gemv_mosaic.py.)"""

import functools
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowbit_jax as lb
from lowbit_jax import QArray, checkpoint, dispatch
from lowbit_jax.flax import prepare_model, quantize_model
from lowbit_jax.flax.linen import QDotGeneral, prepare_variables, quantize_params
from pallas_kernels.backend import hopper_available
from reference import unpack_codes

KERNEL = "mosaic" if hopper_available() else "interpret"
FORMATS = ["int4_g128_sym", "int4_g32_sym", "mxfp4", "nvfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8_e4m3",
           "int8_channel_sym"]


def _weight(fmt, n=128, k=256, seed=0):
  return lb.quantize(jax.random.normal(jax.random.key(seed), (n, k), jnp.float32), fmt, axis=1)


def _stored_order(codes):
  """(..., K) codes in the prepared order: stored position 8t + 4e + j of every 32 along K holds weight column
  8j + 2t + e (j, t < 4; e < 2), the column the Mosaic kernel's register layout gives that code."""
  col = np.array([8 * j + 2 * t + e for t in range(4) for e in range(2) for j in range(4)])  # by stored position
  return codes.reshape(*codes.shape[:-1], -1, 32)[..., col].reshape(codes.shape)


@pytest.mark.parametrize("fmt", FORMATS)
def test_stored_order_and_round_trip(fmt):
  # Codes in `_stored_order`, except int8 ones (converted in place by the kernel, read in order; MXINT8 below).
  w = _weight(fmt)
  p = lb.prepare(w)
  el = w.format.element_type
  want = unpack_codes(w.data, el.name)
  if el.kind == "float" or el.bits < 8:
    want = _stored_order(want)
  if el.name == "float4_e2m1fn":
    # Then each 32-bit word of 8 codes (code c at bits 4c) has bit i (m, e0, e1, s) of code c moved to its place in
    # the bfloat16 pair the kernel makes, (6, 7, 8, 15) + 16 (c // 4), plus the rotation of pair c % 4 (2, 6, 12
    # or 8; pair 3's mantissa bits 0), mod 32.
    words = np.zeros(want.shape[:-1] + (want.shape[-1] // 8,), np.uint32)
    for c in range(8):
      for i, place in enumerate((6, 7, 8, 15)):
        rot = 0 if (c % 4, i) == (3, 0) else (2, 6, 12, 8)[c % 4]
        bit = (want[..., c::8].astype(np.uint32) >> i) & 1
        words |= bit << ((place + 16 * (c // 4) + rot) % 32)
    want = ((words[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 15).reshape(want.shape)
  np.testing.assert_array_equal(unpack_codes(p.data, el.name), want)
  assert p.shape == w.shape and p.format == w.format and p.dtype == w.dtype and p.nbytes == w.nbytes
  c = p.canonical()
  assert jax.tree_util.tree_structure(c) == jax.tree_util.tree_structure(w)
  for a, b in zip(jax.tree_util.tree_leaves(c), jax.tree_util.tree_leaves(w)):
    np.testing.assert_array_equal(np.atleast_1d(a).view(np.uint8), np.atleast_1d(b).view(np.uint8))
  np.testing.assert_array_equal(np.asarray(lb.dequantize(p)), np.asarray(lb.dequantize(w)))
  assert lb.prepare(p) is p


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp6_e2m3", "int4_g32_sym"])
def test_dot_general_paths_match_the_canonical_weight(fmt):
  # The XLA reference (bitwise the canonical weight's), leading dims under jit, the kernel (the interpreter off a
  # Hopper GPU; the order of its float32 sums differs), quantized activations and act_format, and act_format's
  # straight-through gradient.
  w = _weight(fmt, seed=1)
  p = lb.prepare(w)
  x = jax.random.normal(jax.random.key(2), (2, 3, 256), jnp.float32).astype(jnp.bfloat16)
  dn = (((2,), (1,)), ((), ()))
  f = jax.jit(lambda x, w: lb.dot_general(x, w, dn, backend="xla"))
  np.testing.assert_array_equal(np.asarray(f(x, p)), np.asarray(f(x, w)))
  y = lb.dot_general(x, p, dn, backend=KERNEL, preferred_element_type=jnp.float32)
  y0 = jnp.dot(x.astype(jnp.float32), lb.dequantize(w, jnp.float32 if fmt == "nvfp4" else jnp.bfloat16).T.astype(
      jnp.float32), precision="highest")  # the exact products of the kernel's weights (NVFP4: g on the sum)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y0), rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(y0))))
  # Quantized activations: few MX / NVFP4 rows stream a prepared weight through the kernel as it is (on a GPU its
  # products sit in other wgmma positions than the canonical weight's, so the float32 sums may round apart).
  qa = lb.quantize(x, "mxfp8_e4m3", axis=-1)
  for got, want in ((lb.dot_general(qa, p, dn), lb.dot_general(qa, w, dn)),
                    (lb.dot_general(x, p, dn, act_format="mxfp8_e4m3"),
                     lb.dot_general(x, w, dn, act_format="mxfp8_e4m3"))):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=0 if KERNEL == "interpret" else 1e-2 * np.abs(want).max())
  loss = lambda x, w: jnp.sum(lb.dot_general(x, w, dn, act_format="mxfp8_e4m3").astype(jnp.float32) ** 2)
  got, want = (np.asarray(jax.grad(loss)(x, v), np.float32) for v in (p, w))
  np.testing.assert_allclose(got, want, rtol=0, atol=0 if KERNEL == "interpret" else 2e-2 * np.abs(want).max())
  assert dispatch.choose(None, x, p, dn, 6) == dispatch.choose(None, x, w, dn, 6)


def test_folded_where_every_scale_takes_the_decode_power():
  # `prepare` moves the float decode's power of two into MX block scales where every scale takes it (E2M1 scales up
  # to 2: weights below 16): not for larger scales, traced ones (under jit), integer formats, or NVFP4 (whose
  # kernel folds it regardless).
  assert lb.prepare(_weight("mxfp4")).folded and lb.prepare(_weight("mxfp6_e3m2")).folded
  assert not lb.prepare(lb.quantize(jnp.full((128, 256), 24.0), "mxfp4", axis=1)).folded  # a scale of 4
  assert lb.prepare(lb.quantize(jnp.full((128, 256), 24.0), "mxfp8_e4m3", axis=1)).folded  # E4M3: up to 2^7
  assert not any(lb.prepare(_weight(f)).folded for f in ("int4_g128_sym", "int8_channel_sym", "nvfp4"))
  nan = lb.quantize(jnp.full((128, 256), 0.5).at[3, 7].set(jnp.nan), "mxfp8_e4m3", axis=1)
  assert not lb.prepare(nan).folded  # (a NaN scale: folded scales take no NaN check)
  seen = []
  jax.jit(lambda w: seen.append(lb.prepare(w).folded) or 0)(_weight("mxfp4"))
  assert seen == [False]


def test_mxint8_stored_as_sign_and_magnitude_where_its_scales_fold():
  # Folded MXINT8 (every scale at most 1, no code -128) stores each code q as a sign bit and |q| (the kernel reads
  # that byte as the bf16 subnormal |q| * 2^-133 with the sign at bit 15), in `_stored_order`; a scale above 1 or
  # a code -128 (no 7-bit magnitude) keeps two's complement, in order. Either way the canonical weight comes back
  # bit for bit.
  small = _weight("mxint8", seed=4)
  small = lb.quantize(lb.dequantize(small, jnp.float32) / 8, "mxint8", axis=1)  # (scales 2^-2 and below)
  large = lb.quantize(lb.dequantize(small, jnp.float32) * 16, "mxint8", axis=1)  # (scales 2 and above)
  (data, *rest), aux = small.tree_flatten()
  with_min = QArray.tree_unflatten(aux, (data.at[3, 7].set(-128), *rest))
  for w, folded in ((small, True), (large, False), (with_min, False)):
    p = lb.prepare(w)
    assert p.folded == folded
    q = np.asarray(w.data).astype(np.int64)
    want = _stored_order(np.where(q < 0, 128 - q, q)) if folded else q & 255
    np.testing.assert_array_equal(np.asarray(p.data).view(np.uint8), want)
    np.testing.assert_array_equal(np.asarray(p.canonical().data), np.asarray(w.data))
    np.testing.assert_array_equal(np.asarray(lb.dequantize(p)), np.asarray(lb.dequantize(w)))


def test_stacked_layers_map_and_scan():
  # Prepared weights stacked over layers (as nnx.vmap or a scan over layers makes them) keep their K axis last.
  ws = [_weight("mxfp6_e2m3", seed=s) for s in range(3)]
  stack = lambda *a: jnp.stack(a)
  p = jax.tree.map(stack, *[lb.prepare(w) for w in ws])
  assert p.shape == (3, 128, 256)
  np.testing.assert_array_equal(np.asarray(p.canonical().data), np.asarray(jax.tree.map(stack, *ws).data))
  x = jax.random.normal(jax.random.key(5), (4, 256), jnp.float32).astype(jnp.bfloat16)
  y = jax.vmap(lambda w: lb.dot_general(x, w, (((1,), (1,)), ((), ())), backend="xla"))(p)
  _, ys = jax.lax.scan(lambda c, w: (c, lb.dot_general(x, w, (((1,), (1,)), ((), ())), backend="xla")), 0, p)
  want = jnp.stack([lb.dot_general(x, w, (((1,), (1,)), ((), ())), backend="xla") for w in ws])
  np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(ys), np.asarray(want))


def test_bad_input():
  with pytest.raises(ValueError, match="K-major"):
    lb.prepare(lb.quantize(jnp.ones((256, 128)), "mxfp4", axis=0))
  with pytest.raises(ValueError, match="int8_g32_sym"):
    lb.prepare(_weight("int8_g32_sym"))
  with pytest.raises(ValueError, match="multiples of 64"):
    lb.prepare(_weight("mxfp4", n=96))
  with pytest.raises(TypeError, match="must be a QArray"):
    lb.prepare(jnp.ones((64, 128)))
  with pytest.raises(ValueError, match="not a contracting dimension"):
    lb.dot_general(jnp.ones((2, 128), jnp.bfloat16), lb.prepare(_weight("mxfp4")), (((1,), (0,)), ((), ())))


class _MLP(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(128, 256, rngs=rngs)
    self.gen = nnx.LinearGeneral(256, (2, 64), rngs=rngs)
    self.head = nnx.Linear(128, 96, rngs=rngs)  # (96 rows: not a layout the kernel takes; stays a QArray)

  def __call__(self, x):
    return self.head(self.gen(self.up(x)).reshape(x.shape[:-1] + (128,)))


def _mlp(prepared: bool):
  m = _MLP(nnx.Rngs(0))
  quantize_model(m, {".*": "mxfp4"}, k_major=True, verbose=False)
  return (m, prepare_model(m)) if prepared else (m, [])


def test_nnx_prepare_model_and_checkpoint():
  (m, paths), (m0, _) = _mlp(True), _mlp(False)
  assert paths == ["gen", "up"] and isinstance(m.up.kernel.get_value(), lb.PreparedWeight)
  assert isinstance(m.head.kernel.get_value(), lb.QArray)
  x = jax.random.normal(jax.random.key(3), (3, 128), jnp.float32)
  np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, x: m(x))(m, x)), np.asarray(m0(x)))
  with tempfile.TemporaryDirectory() as tmp:
    checkpoint.save(f"{tmp}/c", m)  # the canonical QArrays: a model that was never prepared restores them
    canon = checkpoint.restore(f"{tmp}/c", nnx.eval_shape(lambda: _mlp(False)[0]))
    again = checkpoint.restore(f"{tmp}/c", nnx.eval_shape(lambda: _mlp(True)[0]))
  assert isinstance(canon.up.kernel.get_value(), lb.QArray)
  np.testing.assert_array_equal(np.asarray(canon.up.kernel.get_value().data), np.asarray(m0.up.kernel.get_value().data))
  assert isinstance(again.up.kernel.get_value(), lb.PreparedWeight)
  # (prepared again from the restored values: its scales fold, where the abstract target's could not say)
  assert again.up.kernel.get_value().folded and m.up.kernel.get_value().folded
  np.testing.assert_array_equal(np.asarray(again.up.kernel.get_value().data), np.asarray(m.up.kernel.get_value().data))
  np.testing.assert_array_equal(np.asarray(again(x)), np.asarray(m0(x)))


def test_linen_prepare_variables():
  dense = nn.Dense(64, dot_general_cls=functools.partial(QDotGeneral, weight_format="mxfp6_e2m3", k_major=True))
  x = jax.random.normal(jax.random.key(4), (2, 128), jnp.float32)
  variables = quantize_params(dense, dense.init(jax.random.key(0), x), x)
  prepared = prepare_variables(variables)
  assert isinstance(prepared["quantized"]["QDotGeneral_0"]["kernel"], lb.PreparedWeight)
  np.testing.assert_array_equal(np.asarray(dense.apply(prepared, x)), np.asarray(dense.apply(variables, x)))
