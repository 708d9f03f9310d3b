"""The seam between kernels and the backends that compile them.

Every backend-specific call goes through this module, so kernels are written once against `call` (Pallas) or
`triton_call` (Triton kernels through jax_triton) and dispatch picks a backend per format and shape.

Backends:
  `triton`: Pallas lowered through Triton (NVIDIA GPUs).
  `interpret`: the same Pallas kernel run by Pallas's interpreter on any device (tests on CPU).
  `mosaic`: Pallas lowered through Mosaic GPU (Hopper: TMA pipelines and wgmma), for what the Triton lowering
    leaves on the table (the weight stream of decode-sized matmuls).
  `mosaic_interpret`: a Mosaic GPU kernel run by the Mosaic GPU interpreter on any device (tests on CPU).
  `jax_triton`: a Triton kernel written in Triton's own language, launched by jax_triton (the optional
    `lowbit-jax[triton]` extra). It reaches what Pallas's lowering does not expose: FP8 MMAs with Triton's
    default accumulation (REFERENCE section 5). Its kernels have an XLA twin computing the same blocks for CPUs.

Each kernel's public function is jitted with its configuration as static arguments (`jit_op`), so a model's
identical calls (one per layer) share one traced, lowered and compiled kernel. Traced per call site instead, the
1.1B-parameter LM of examples/lm.py with int4 weights took 66 s to compile its prefill and 50 s its decode loop on
an H100; jitted, about 9 s and 6 s (BENCHMARKS.md, "Compile time").
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

__all__ = ["BACKENDS", "HOPPER_SMEM", "byte_bits", "call", "div_by", "div_rn", "dot", "fma", "gpu_available",
           "hopper_available", "in_bounds", "jax_triton_available", "jit_op", "load", "on_gpu", "program_id",
           "rcp_rn", "sm_count", "store", "tile_mask", "tma_rows", "triton_call"]

BACKENDS = ("triton", "interpret", "mosaic", "mosaic_interpret")
HOPPER_SMEM = 227 * 1024  # bytes of shared memory one thread block may take on Hopper (the Mosaic GPU kernels)

# Tests set this: every output buffer then starts as NaN (floats) or all-ones bits (integers) and is aliased into
# the kernel, so an element a kernel never writes shows up instead of passing as whatever memory held.
POISON = False


def _compiler_params(backend: str, num_warps: int, num_stages: int) -> Any:
  if backend == "interpret":
    return None
  if backend.startswith("mosaic"):
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)
  # JAX 0.10 and 0.11 both expose the Triton params here; older names are not supported.
  from jax.experimental.pallas import triton as pltriton
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def jit_op(*static_argnames: str) -> Callable[[Callable], Callable]:
  """Decorator for a kernel's public function: `jax.jit` with `static_argnames` static, one trace cache per value
  of POISON (which tests flip, and which a cached trace would otherwise carry into calls made under the other)."""
  def wrap(fn: Callable) -> Callable:
    def traced():  # a new function each time: jit's trace cache is keyed by the function
      @functools.wraps(fn)
      def f(*args, **kwargs):
        return fn(*args, **kwargs)
      return jax.jit(f, static_argnames=static_argnames)

    jitted = {poison: traced() for poison in (False, True)}

    @functools.wraps(fn)
    def op(*args, **kwargs):
      return jitted[POISON](*args, **kwargs)

    return op

  return wrap


def call(kernel: Callable, *, backend: str, out_shape, grid, in_specs, out_specs, num_warps: int = 4,
         num_stages: int = 3, name: str | None = None, threads: int = 1,
         cluster: dict[str, int] | None = None, input_output_aliases: dict[int, int] | None = None) -> Callable:
  """`pl.pallas_call` for `backend` (one of BACKENDS); `plgpu.kernel` for the Mosaic GPU ones.

  Mosaic GPU kernels ("mosaic", "mosaic_interpret") take every operand in global memory (in_specs and out_specs
  None), move tiles themselves and read their grid position through `program_id`; `threads` > 1 runs that many
  warpgroups per program, indexed by the axis "wg"; `cluster` {axis name: size} groups that many programs into a
  thread-block cluster (axes of size 1 are left out), each then one index of the grid. num_warps, num_stages and
  name apply to the Pallas-Triton kernels only, and so does `input_output_aliases` ({input index: output index},
  outputs updated in place: POISON leaves them as they come in).
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
  params = _compiler_params(backend, num_warps, num_stages)
  if backend.startswith("mosaic"):
    return _mosaic_call(kernel, backend, params, out_shape, grid, threads, cluster)
  return _call(kernel, backend == "interpret", params, out_shape, grid, in_specs, out_specs, name,
               input_output_aliases or {})


_GRID_NAMES = ("grid0", "grid1", "grid2")


def _mosaic_call(kernel, backend, params, out_shape, grid, threads, cluster) -> Callable:
  """`plgpu.kernel` over a named grid (the Mosaic GPU interpreter's pallas_call keeps the writes of the first
  program only). With POISON the outputs are refs that start poisoned, which the kernel writes in place; the
  interpreter (which takes no such refs) starts every output as NaN itself."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  interpret = None
  if backend == "mosaic_interpret":
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    # Reads past an array's edge take whatever is there, as TMA's zero fill is not for the interpreter to promise
    # (kernels use such rows only for results they drop).
    interpret = InterpretGPUParams(out_of_bounds_reads="uninitialized")
  cluster = {name: size for name, size in (cluster or {}).items() if size > 1}
  warpgroups = dict(num_threads=threads, thread_name="wg") if threads > 1 else {}
  launch = functools.partial(plgpu.kernel, kernel, grid=grid, grid_names=_GRID_NAMES[:len(grid)],
                             cluster=tuple(cluster.values()), cluster_names=tuple(cluster), compiler_params=params,
                             interpret=interpret, **warpgroups)
  if not POISON or interpret is not None:
    return launch(out_type=out_shape)

  def poisoned(*args):
    refs = jax.tree.map(lambda o: jax.new_ref(_poison(o)), out_shape)
    launch(out_type=())(*args, *jax.tree.leaves(refs))
    return jax.tree.map(lambda r: r[...], refs)

  return poisoned


def tma_rows(x: jax.Array) -> jax.Array:
  """`x` (R, C) as a Mosaic GPU kernel's TMA copies read it in tiles of 8 rows: unchanged with at most 8 rows or a
  multiple of 8 (a box reaching past the array reads zeros there), else padded with zero rows to the next multiple
  (Mosaic's 8-row tiling takes no other row counts)."""
  r = x.shape[0]
  return x if r <= 8 or r % 8 == 0 else jnp.pad(x, ((0, -r % 8), (0, 0)))


@functools.cache
def _load_wants_index() -> bool:
  """Whether Mosaic GPU's `load` requires an index argument (JAX 0.10; 0.11 deprecates it)."""
  import jax.experimental.pallas.mosaic_gpu as plgpu
  idx = inspect.signature(plgpu.load).parameters.get("idx")
  return idx is not None and idx.default is inspect.Parameter.empty


def register_load(ref, layout) -> jax.Array:
  """A Mosaic GPU shared-memory ref, indexed already, loaded into registers in `layout`. JAX 0.11 takes the ref alone
  (an index argument is deprecated there); 0.10 requires one."""
  import jax.experimental.pallas.mosaic_gpu as plgpu
  return plgpu.load(ref, None, layout=layout) if _load_wants_index() else plgpu.load(ref, layout=layout)


def warpgroup_barrier() -> None:
  """In a Mosaic GPU kernel, every warp of the calling warpgroup waits here for the others (`bar.sync` over the
  warpgroup's 128 threads), their shared-memory reads done. Needed before a warp-specialized pipeline releases a
  stage's slots: Pallas arrives on the release barrier from one thread of the warpgroup, so another warp could still
  be loading from a slot that the next TMA copy overwrites."""
  import jax.experimental.pallas.mosaic_gpu as plgpu
  from jax.experimental.mosaic import gpu as mgpu

  @plgpu.inline_mgpu()
  def barrier(_):
    mgpu.warpgroup_barrier()

  barrier()


def program_id(axis: int, *, backend: str):
  """The program's index along grid axis `axis` (`pl.program_id`; the named grid axis of a Mosaic GPU kernel)."""
  if backend.startswith("mosaic"):
    return jax.lax.axis_index(_GRID_NAMES[axis])
  return pl.program_id(axis)


def _call(kernel, interpret, params, out_shape, grid, in_specs, out_specs, name, aliases) -> Callable:
  if not POISON:
    return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          interpret=interpret, compiler_params=params, name=name, input_output_aliases=aliases)
  outs = jax.tree_util.tree_leaves(out_shape)
  out_list = list(out_specs) if isinstance(out_specs, (tuple, list)) else [out_specs]
  fresh = [i for i in range(len(outs)) if i not in aliases.values()]  # outputs that get a poisoned buffer

  def poisoned(*args):
    n_in, n_poison = len(args), len(fresh)

    def body(*refs):  # drop the aliased poison inputs; the kernel sees its own refs
      kernel(*refs[:n_in], *refs[n_in + n_poison:])

    f = pl.pallas_call(body, out_shape=out_shape, grid=grid, in_specs=list(in_specs) + [out_list[i] for i in fresh],
                       out_specs=out_specs, interpret=interpret, compiler_params=params, name=name,
                       input_output_aliases={**aliases, **{n_in + j: i for j, i in enumerate(fresh)}})
    return f(*args, *(_poison(outs[i]) for i in fresh))

  return poisoned


@functools.cache
def jax_triton_available() -> bool:
  """Whether jax_triton and Triton import (the `lowbit-jax[triton]` extra)."""
  try:
    for module in ("jax_triton", "triton"):
      importlib.import_module(module)
  except ImportError:
    return False
  return True


def triton_call(kernel, kernel_aliased, *args, out_shape: jax.ShapeDtypeStruct, grid: tuple[int, ...],
                num_warps: int, num_stages: int, name: str, **constexprs):
  """Launches the Triton kernel `kernel(*args, out, **constexprs)` through jax_triton; returns `out`.

  With POISON set, runs `kernel_aliased(*args, poisoned, out, **constexprs)` instead, the output buffer starting
  as poison and aliased to that extra input (jax_triton passes inputs, then outputs, as pointers).
  """
  import jax_triton
  kw = dict(out_shape=out_shape, grid=grid, num_warps=num_warps, num_stages=num_stages, name=name, **constexprs)
  if not POISON:
    return jax_triton.triton_call(*args, kernel=kernel, **kw)
  return jax_triton.triton_call(*args, _poison(out_shape), kernel=kernel_aliased,
                                input_output_aliases={len(args): 0}, **kw)


def _poison(out: jax.ShapeDtypeStruct) -> jax.Array:
  dtype = jnp.dtype(out.dtype)
  if jnp.issubdtype(dtype, jnp.floating):
    return jnp.full(out.shape, jnp.nan, dtype)
  return jnp.full(out.shape, -1 if jnp.issubdtype(dtype, jnp.signedinteger) else jnp.iinfo(dtype).max, dtype)


def dot(a, b, trans_b: bool = False):
  """In-kernel a @ b, or a @ b.T with `trans_b` (float32 result for 16-bit operands, int32 for int8)."""
  from jax.experimental.pallas import triton as pltriton
  return pltriton.dot(a, b, trans_b=trans_b)


def div_rn(a, b, *, backend: str):
  """In-kernel a / b for float32, correctly rounded (IEEE nearest even, subnormals kept).

  Triton lowers float division to PTX `div.full.f32`, which is 2 ulps off; quantization needs the IEEE quotient,
  so the Triton backend issues `div.rn.f32` itself. The interpreter runs `lowbit_jax.elements.div`.
  """
  if backend == "interpret":
    from lowbit_jax import elements
    return elements.div_any(a, b)
  return _asm("div.rn.f32 $0, $1, $2;", a, b)


def fma(a, b, c, *, backend: str):
  """In-kernel a * b + c, one rounding on the Triton backend (PTX `fma.rn.f32`: Triton left such sums as a multiply
  and an add); the interpreter rounds twice, so callers pass products a * b that are exact (b a power of two)."""
  if backend == "interpret":
    return a * b + c
  return _asm("fma.rn.f32 $0, $1, $2, $3;", a, b, c)


def rcp_rn(b, *, backend: str):
  """In-kernel 1 / b for float32, correctly rounded (PTX `rcp.rn.f32`: one reciprocal and its fix-up, where a
  division would also scale a numerator)."""
  if backend == "interpret":
    from lowbit_jax import elements
    return elements.div_any(jnp.float32(1.0), b)
  return _asm("rcp.rn.f32 $0, $1;", b)


def _asm(code: str, *args):
  from jax.experimental.pallas import triton as pltriton
  args = jnp.broadcast_arrays(*(jnp.asarray(a, jnp.float32) for a in args))
  [out] = pltriton.elementwise_inline_asm(code, args=args, constraints="=f" + ",f" * len(args), pack=1,
                                          result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, jnp.float32)])
  return out


def div_by(x, d, r, *, backend: str):
  """In-kernel x / d correctly rounded, given r = 1 / d correctly rounded (one per block, broadcast).

  Two Markstein steps on x * r, q <- q + (x - q * d) * r with fused multiply-adds: the first brings q within an
  ulp of x / d, where the residual is exact, and the second then rounds correctly (Markstein's theorem) at a few
  float operations per element instead of a division. Needs d and x / d in the normal range (callers check) and
  loses the sign of a zero x (callers take signs from x).
  """
  if backend == "interpret":
    from lowbit_jax import elements
    return elements.div(x, d)
  q = x * r
  for _ in range(2):
    res = _asm("{ .reg .f32 t; neg.f32 t, $1; fma.rn.f32 $0, t, $2, $3; }", q, d, x)  # x - q * d, rounded once
    q = _asm("fma.rn.f32 $0, $1, $2, $3;", res, r, q)
  return q


def byte_bits(a: jax.Array) -> jax.Array:
  """A 1-byte array (float8, int8) as its uint8 bits, other arrays as they are: kernels load 8-bit operands as
  uint8 (masked float8 loads with a fill value did not lower correctly on Triton) and reinterpret the bits."""
  return jax.lax.bitcast_convert_type(a, jnp.uint8) if a.dtype.itemsize == 1 else a


def load(ref, idx, mask=None, other=None, *, backend: str):
  """ref[idx] where `mask` is True, `other` elsewhere (memory there is not read).

  Pallas's Triton lowering does not mask blocks that overhang the array, so kernels mask ragged edges through
  this. The interpreter pads blocks instead, so there the mask is applied after an ordinary read.
  """
  if mask is None:
    return ref[idx]
  if backend == "interpret":
    return jnp.where(mask, ref[idx], other)
  from jax.experimental.pallas import triton as pltriton
  return pltriton.load(ref.at[idx], mask=mask, other=other)


def in_bounds(grid_axis: int, size: int, total: int, dim: int = 0):
  """Which of a tile's `size` indices along an array dimension of length `total` lie inside it, for the program at
  `pl.program_id(grid_axis)`: a bool mask shaped (size, 1) (`dim` 0) or (1, size) (`dim` 1); None when `size`
  divides `total` (every tile whole), so masks vanish statically for aligned shapes."""
  if total % size == 0:
    return None
  shape = (size, 1) if dim == 0 else (1, size)
  return pl.program_id(grid_axis) * size + jax.lax.broadcasted_iota(jnp.int32, shape, dim) < total


def tile_mask(row_ok, col_ok, shape):
  """The (rows, cols) mask of an output tile from its row mask (rows, 1) and column mask (1, cols), either None
  when every row (column) lies inside the array; None when the whole tile does."""
  masks = [jnp.broadcast_to(ok, shape) for ok in (row_ok, col_ok) if ok is not None]
  return masks[0] & masks[1] if len(masks) == 2 else (masks[0] if masks else None)


def store(ref, value, mask=None, *, backend: str, idx=...):
  """ref[idx] = value where `mask` is True (everywhere if None)."""
  if mask is None or backend == "interpret":
    ref[idx] = value
    return
  from jax.experimental.pallas import triton as pltriton
  pltriton.store(ref.at[idx], value, mask=mask)


@functools.cache
def gpu_available() -> bool:
  """Whether the default JAX backend is an NVIDIA GPU the Triton backend can compile for."""
  return jax.default_backend() == "gpu"


@functools.cache
def hopper_available() -> bool:
  """Whether the default JAX backend is a Hopper GPU (compute capability 9.x), which Mosaic GPU kernels need."""
  return gpu_available() and str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")


@functools.cache
def sm_count() -> int:
  """Streaming multiprocessors of the default device (what a persistent kernel launches programs for); 132, an
  H100 SXM's, where the device reports none (a CPU running the interpreter)."""
  return (getattr(jax.devices()[0], "core_count", None) if gpu_available() else None) or 132


def on_gpu(x) -> bool:
  """Whether `x` lives on a GPU: its device if it is a concrete array, else where new arrays go (a
  `jax.default_device(cpu)` context on a GPU machine keeps calls on the CPU)."""
  if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
    return next(iter(x.devices())).platform == "gpu"
  dev = jax.config.jax_default_device
  if dev is None:
    return gpu_available()
  return (dev if isinstance(dev, str) else dev.platform) == "gpu"
