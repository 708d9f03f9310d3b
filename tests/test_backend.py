"""pallas_kernels.backend: the seam's own behaviour (the kernels' tests cover what runs through it)."""

import jax.numpy as jnp

from pallas_kernels import backend as _backend


def test_jit_op_traces_again_when_poison_changes(monkeypatch):
  """A kernel op reads POISON while it is traced: a trace cached under one value must not serve the other."""
  traces = []

  @_backend.jit_op("k")
  def op(x, *, k):
    traces.append(_backend.POISON)
    return x + k + (10 if _backend.POISON else 0)

  monkeypatch.setattr(_backend, "POISON", False)
  assert int(op(jnp.int32(1), k=2)) == 3
  monkeypatch.setattr(_backend, "POISON", True)
  assert int(op(jnp.int32(1), k=2)) == 13
  monkeypatch.setattr(_backend, "POISON", False)
  assert int(op(jnp.int32(5), k=2)) == 7
  assert traces == [False, True]  # one trace per value, then the cache


def test_jit_op_keeps_the_signature_and_static_positional_arguments():
  @_backend.jit_op("fmt")
  def op(x, fmt: str, *, scale: float = 1.0):
    """Doc."""
    return x * (2 if fmt == "double" else 1) * scale

  assert op.__doc__ == "Doc." and op.__name__ == "op"
  assert float(op(jnp.float32(3), "double")) == 6.0  # fmt passed by position is still static
  assert float(op(jnp.float32(3), fmt="single", scale=0.5)) == 1.5
