import os

# Two host devices so sharding tests run on a CPU-only machine; must be set before JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import pallas_kernels.backend  # noqa: E402  (after XLA_FLAGS)

# Kernel outputs start poisoned in tests, so an element a kernel never writes cannot pass for a right answer.
pallas_kernels.backend.POISON = True
