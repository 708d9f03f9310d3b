import os

# Host devices so sharding tests run on a CPU-only machine; must be set before JAX initialises its backend. Four,
# not two: the Mosaic GPU interpreter's warpgroups block each other in host callbacks, and a kernel of four
# warpgroups hung with one or two host devices (JAX 0.10, 2 cores) and ran with four.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import pallas_kernels.backend  # noqa: E402  (after XLA_FLAGS)

# Kernel outputs start poisoned in tests, so an element a kernel never writes cannot pass for a right answer.
pallas_kernels.backend.POISON = True
