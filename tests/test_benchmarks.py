"""The benchmarks' output check (`benchmarks.common.check`, what `benchmarks/matmul.py --check` prints per row on
the GPU)."""
import itertools

import jax
import jax.numpy as jnp

import lowbit_jax as lb
from benchmarks.common import check


def test_check_passes_a_kernel_and_finds_wrong_outputs_and_calls_that_differ():
  x = jax.random.normal(jax.random.key(0), (4, 256), jnp.float32).astype(jnp.bfloat16)
  w = lb.quantize(jax.random.normal(jax.random.key(1), (256, 64), jnp.float32), "mxfp4", axis=0)
  assert check(lambda x, w: lb.matmul(x, w), x, w) == "ok"
  assert check(lambda x, w: lb.matmul(x, w).at[1].multiply(2), x, w).endswith(f"of {4 * 64} wrong")
  calls = itertools.count()
  assert check(lambda x, w: lb.matmul(x, w) + next(calls) * 1e-3, x, w) == "ok (calls differ)"
