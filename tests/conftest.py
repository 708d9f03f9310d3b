import os

# Host devices so sharding tests run on a CPU-only machine; must be set before JAX initialises its backend. Four,
# not two: the Mosaic GPU interpreter's warpgroups block each other in host callbacks, and a kernel of four
# warpgroups hung with one or two host devices (JAX 0.10, 2 cores) and ran with four.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

import pallas_kernels.backend  # noqa: E402

# Kernel outputs start poisoned in tests, so an element a kernel never writes cannot pass for a right answer.
pallas_kernels.backend.POISON = True


@pytest.fixture
def cuda_lowering(monkeypatch):
  """`lower(f, *args)`: the text of `jax.jit(f)` lowered for CUDA, so kernels' GPU-only code (which the
  interpreters do not run) meets its Python-side errors on any machine. Without poisoned outputs: their in-place
  refs are a run-time device, not part of the kernel's code."""
  monkeypatch.setattr(pallas_kernels.backend, "POISON", False)
  return lambda f, *args: jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
