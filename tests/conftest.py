import os

# Two host devices so sharding tests run on a CPU-only machine; must be set before JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
