"""pytest over the repository: the README's test command also runs the docstring examples of lowbit_jax and
pallas_kernels. The Triton kernel's module imports Triton, an optional extra, so it is collected only where Triton
is installed."""
import importlib.util

collect_ignore = [] if importlib.util.find_spec("triton") else ["pallas_kernels/fp8_block_matmul_triton.py"]
