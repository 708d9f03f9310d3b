"""Weight-only matmul in Pallas Mosaic GPU: y = x @ dequantize(w).T on Hopper tensor cores, made for decode and
prefill: up to 256 activation rows in one tile, more in tiles of 256.

Layouts: `x` is (M, K) bfloat16; `w` is a K-major QArray of logical shape (N, K) blocked along K (axis 1), in the
canonical storage of REFERENCE section 3: int4 or E2M1 codes two per byte, low nibble first (the memory layout of
a `jnp.int4` (N, K) array), FP6 codes four per three bytes, or int8, E4M3 or E5M2 codes; symmetric integers with
bfloat16 scales (N, K / B) for blocks of B = 128 (int4 also 32 and 64), or (N, 1) per channel; MXFP4, MXFP6,
MXFP8 and MXINT8 with E8M0 scales (N, K / 32); NVFP4 with E4M3 scales (N, K / 16) and the float32 tensor scale g,
which multiplies each program's float32 sum (as dequant_matmul.py multiplies its sum) where dequantize rounds
v * s * g to bfloat16.

Swap-AB: out^T (N, R) = W (N, K) @ x^T (K, R), x read in tiles of R = 8 rows or the next power of two up to 256
(the wgmma N; TMA fills rows past the array with zeros, so x is padded at most to a multiple of 8 rows) and
handed to wgmma as a transposed shared-memory operand, so x stays row-major.
A program owns `tiles` x 64 weight rows (64: the wgmma M), a 1/split slice of K and one tile of R activation rows
(R = 256 for M > 256: more rows take more programs). Per pipeline step (`groups` slices of 128 along K) TMA brings
the code tiles in boxes of 128-byte rows, the slices' rows of scales and the (R, 128 * groups) activation tile into
shared memory; the scales come as stored, a 16-byte window of each row's (N, K / B) scales, and widen to bfloat16
in registers (`_scale_bf16`), so no XLA op transposes them per call.
Each (64, 128) code slice is widened to bfloat16 in registers (int4: 8 codes per 32-bit load, K relabelled within
every 32 and the activations to match, or with `lowbit_jax.prepare`d weights the codes stored in that order and
the activations read as they are, E2M1 bits placed for a rotate-and-mask decode; FP6 the same order, from bytes
each thread loads; FP8: a byte permute, shift and mask per pair, prepared codes eight per 64-bit load in the
4-bit order; see `_widen`), multiplied by its scales (one bfloat16 rounding of v * s, which is exactly the weight
`lowbit_jax.dequantize` returns; the power of two a float decode leaves on its codes goes into the scales where
they take it, `_POWER`) and fed to wgmma as its register operand, accumulating in float32.
Programs apply NVFP4's g to their float32 sums. Without split-K they write the result, (M, N) in the output
dtype; with it, float32 (split, M, N) partials that XLA sums, or that the caller takes as they are (`partials`)
to add them inside its next kernel. With `swiglu` a program takes a gate tile and its up tile of a SwiGLU MLP's
fused (2F, K) weight and writes silu(gate) * up (`lowbit_jax.xla.swiglu`), saving the separate pass. With `wgs` >
1 (the default above 32 rows) a program is warp-specialized: that many compute warpgroups, each with its own
64-row weight tile over the shared activation tile and storing its R rows straight from registers, and one more
warpgroup that issues the TMA copies. Unlike the Pallas-Triton kernel of dequant_matmul.py, the weights stream
through TMA into shared memory instead of per-thread loads, which is what bound that kernel at small M
(BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lowbit_jax import elements, packing, xla
from lowbit_jax.formats import ELEMENTS, ElementType, Format
from lowbit_jax.prepared import PreparedWeight
from lowbit_jax.qarray import QArray
from pallas_kernels import backend as _backend

__all__ = ["Config", "MAX_M", "activation_rows", "dequant_gemv", "default_config", "folds_scales", "kernel_order",
           "smem_bytes", "supports", "swiglu_fits"]

# Float element types by the name of their code in `_widen`, and back.
_FLOAT_CODES = {"float4_e2m1fn": "e2m1", "float6_e2m3fn": "e2m3", "float6_e3m2fn": "e3m2", "float8_e4m3fn": "e4m3",
                "float8_e5m2": "e5m2"}
_CODE_ELEMENTS = {code: name for name, code in _FLOAT_CODES.items()}
_FP8, _FP6 = ("e4m3", "e5m2"), ("e2m3", "e3m2")
# Prepared MXINT8 codes whose scales fold (`folds_scales`) are stored as a sign bit and a 7-bit magnitude m
# (`kernel_order`), which read as the bf16 subnormal m * 2^-133 once the sign sits at bit 15: the element q / 64
# times 2^-127, the code's p below; two instructions per pair of codes where two's complement took four.
_SIGN_MAGNITUDE = "sm8"
_BYTE_CODES = (*_FP8, _SIGN_MAGNITUDE)  # one code per byte, decoded by bit arithmetic (`_byte_pair_ptx`)
# The decode of a float code v places its bits so that they read as the bfloat16 of v * 2^-p, subnormal codes as
# bf16 subnormals (`_pair_ptx`); p by code. Then either each pair is multiplied by 2^p, or the block scales are
# (`_scale_bf16`), which saves an instruction per pair where 2^p times every scale fits in bfloat16: always for
# NVFP4, whose elements then carry 2^-_NVFP4_SHIFT more and g 2^_NVFP4_SHIFT (E4M3 scales up to 448 times 2^118
# stay below bfloat16's largest, and at least 2^-9 times 2^-8 above its normals); for MX formats where every
# E8M0 scale is at most 2^(127 - p) (`folds_scales`, checked once by `lowbit_jax.prepare`).
_POWER = {"e2m1": 126, "e2m3": 126, "e3m2": 124, "e4m3": 120, "e5m2": 112, _SIGN_MAGNITUDE: 127}
_NVFP4_SHIFT = 8
# Prepared E2M1 words: the bit layout that decodes pair j (codes j and j + 4 of the word, the low and high bfloat16)
# by rotating the word right by _E2M1_ROTATE[j] and masking: bit i (m, e0, e1, s) of code c at its bf16 place
# (6, 7, 8, 15) + 16 * (c // 4) plus that rotation, mod 32. Four such pairs cannot tile a word, so pair 3 keeps its
# mantissa bits in place and rotates the other three by 8 (a mask, a rotate and a lop3).
_E2M1_PLACES = (6, 7, 8, 15)  # the bf16 bits of m, e0, e1 and s that make the bf16 of v * 2^-126
_E2M1_ROTATE = (2, 6, 12, 8)
_E2M1_BITS = tuple(tuple((place + 16 * (c // 4) + (0 if c % 4 == 3 and i == 0 else _E2M1_ROTATE[c % 4])) % 32
                         for i, place in enumerate(_E2M1_PLACES)) for c in range(8))
MAX_M = 256  # activation rows per program (one wgmma N tile of 8 to 256); more rows take more programs
# Activation row tiles per raster group (`_program_tiles`): programs running together share a weight tile and stay
# within 4 activation tiles (1024 rows, 16 MB of bf16 at K = 8192), which stay in L2 as every weight tile passes.
# Weight tiles fastest had each 256 rows stream all weights again: MXFP8 at M = 2048, (28672, 8192) ran 1598 us
# against 1494 in groups of 8 and 1435 in groups of 4 (2 tiles: 1455; 4096 rows: 2908 against 2983 for 8, 3083
# for 16; MXFP4 1.00x bf16 against 0.95x for 8 at 2048 rows; H100, BENCHMARKS.md).
_RASTER = 4
_BN, _TK = 64, 128  # weight rows per program (the wgmma M), K per pipeline step


@dataclasses.dataclass(frozen=True)
class Config:
  """split: programs sharing one row tile, each over 1/split of K (their float32 partials are summed after);
  groups: 128-wide K slices per pipeline step (one wgmma each, a single wait per step; int4 codes travel in
  TMA boxes of two where `groups` is even); stages: pipeline steps in flight (shared-memory buffers per
  operand); tiles: 64-row wgmma tiles per program (one accumulator each, sharing the activation tile); wgs: compute
  warpgroups per program (more than one: warp-specialized, each warpgroup with its own 64-row tile of the shared
  activation tile and one more warpgroup issuing the copies; `tiles` must then be 1)."""
  split: int = 1
  groups: int = 2
  stages: int = 4
  tiles: int = 1
  wgs: int = 1


def activation_rows(m: int) -> int:
  """Activation rows a program computes for M rows: 8, or the next power of two up to MAX_M (the wgmma N)."""
  return min(MAX_M, max(8, 1 << (m - 1).bit_length()))


def smem_bytes(cfg: Config, m: int, bits: int, block: int) -> int:
  """Shared memory the pipeline takes: per stage the code tiles, scale windows and activation tile (`block`: the
  scale block along K; scales counted as bfloat16 in windows of at least 16 bytes per row, `_scale_window`: an
  overestimate for one-byte scales and per-channel ones)."""
  cols = _TK * cfg.groups
  scales = max(16, 2 * (cols // block))
  return cfg.stages * (_BN * cfg.tiles * cfg.wgs * (cols * bits // 8 + scales) + activation_rows(m) * cols * 2)


def default_config(n: int, k: int, m: int = 1, bits: int = 4, max_split: int = 16) -> Config:
  """The configuration for an (n, k) weight of `bits`-bit codes and M activation rows, from the H100 sweeps in
  BENCHMARKS.md. M <= 16: two 128-wide slices per step, 4 stages, one 64-row tile per program, and K split until
  about 16 programs per SM (at most `max_split` ways): with 8 activation rows, many short programs beat two row
  tiles by 5-14%, and a second warpgroup ran up to 31% slower. With 16 rows, about 8 per SM, as the float32
  partials weigh twice as much (4-bit codes at (28672, 8192): split 4 ways 3-6% faster than 8). M = 17-32: the
  same, K split until about one 64-row tile per SM. M > 32: two compute warpgroups over one activation tile (6-35%
  faster than one at 64-256 rows), K split as at 17-32, two slices per step at 64 rows and one above, as many
  stages (up to 4) as fit.
  Except at M <= 16 with at least one 64-row tile per SM and K <= 4096 (a decode step's wide layers): no split
  and 2 stages, since there the pass that sums the partials costs more than splitting gains (H100, M = 1, weights
  streamed from HBM: (16384, 2048) 9.0 us against 11.1, (32000, 2048) 15.5 against 18.2; BENCHMARKS.md).
  And 8-bit codes at M <= 16 whose 64-row tiles about cover the SMs (0.9 per SM or more) are not split where one
  tile per SM covers them or where a split's float32 partials (written and read back: 2 x 8 ways x 4 bytes x M
  per weight row) would add more than 5% to the weight's K bytes per row: one program per SM streams 8-bit codes
  at 0.84-0.88 of the floor, and the partials' pass costs more than the balance splitting gains (H100, MXFP8, M =
  16: 8192^2 28.3 us against 33.2 split 16 ways, (28672, 8192) 94.0-94.8 against 98.8-98.9 split 8 ways)."""
  r = activation_rows(m)
  wgs = 2 if r > 32 and n % (2 * _BN) == 0 else 1
  groups = 1 if r > 64 or k % (2 * _TK) else 2
  tiles, sms = n // _BN, _backend.sm_count()
  if r <= 16 and tiles >= sms and k <= 4096:
    return Config(split=1, groups=groups, stages=2)
  if bits == 8 and r <= 16 and tiles >= 0.9 * sms and (tiles <= sms or 2 * 8 * 4 * m > 0.05 * k):
    return Config(split=1, groups=groups, stages=4)
  want = {8: 16 * sms, 16: 8 * sms}.get(r, sms)  # 64-row tiles (per warpgroup) to aim for
  split = 1
  while tiles * -(-m // r) * split < want and split < max_split and k % (_TK * groups * split * 2) == 0:
    split *= 2
  stages = 4
  while stages > 2 and smem_bytes(Config(split, groups, stages, 1, wgs), m, bits, 16) > _backend.HOPPER_SMEM:
    stages -= 1
  return Config(split=split, groups=groups, stages=stages, tiles=1, wgs=wgs)


def swiglu_fits(n: int, m: int) -> bool:
  """Whether `dequant_gemv(swiglu=True)` takes a fused gate/up weight of n rows at M = m: whole 64-row gate and up
  tiles, and at most 64 activation rows (a program holds two accumulators)."""
  return n % (2 * _BN) == 0 and m <= 64


def supports(fmt: Format, n: int, k: int) -> str | None:
  """None if the kernel takes a K-major (n, k) weight in `fmt`, else the reason it does not."""
  el = fmt.element_type
  mx = (el.name in _FLOAT_CODES or el.name == "int8") and fmt.rule == "mx" and not fmt.tensor_scale
  nv4 = el.name == "float4_e2m1fn" and fmt.rule == "nvfp4" and fmt.block == (16,)
  if not (mx or nv4 or el.kind == "int" and el.bits in (4, 8) and not fmt.zero_point and fmt.rule == "absmax"):
    return f"{fmt.name}: the Mosaic kernel takes symmetric int4 / int8, MXFP4, MXFP6, MXFP8, MXINT8 and NVFP4 weights"
  # 4- and 6-bit codes are relabelled within every 32 along K (`_widen`), which keeps blocks of 32 and up intact.
  wide = el.bits == 4 or mx
  if not nv4 and fmt.block not in (((32,), (64,), (_TK,), None) if wide else ((_TK,), None)):
    return f"{fmt.name}: the Mosaic kernel takes {'blocks of 32, 64 or' if wide else 'groups of'} {_TK} " \
           "or one scale per row"
  if not (mx or nv4) and fmt.scale != "bfloat16":
    return f"{fmt.name}: {fmt.scale} scales (the kernel takes bfloat16)"
  if n % _BN or k % _TK:
    return f"N = {n} and K = {k} must be multiples of {_BN} and {_TK}"
  return None


def _code(fmt: Format, folded: bool) -> str:
  """How the kernel decodes `fmt`'s codes: a float code (`_FLOAT_CODES`), "int4" / "int8", or for MXINT8 whose
  scales fold (`folds_scales`) sign and magnitude (`_SIGN_MAGNITUDE`)."""
  el = fmt.element_type
  if folded and el.name == "int8" and fmt.rule == "mx":
    return _SIGN_MAGNITUDE
  return _FLOAT_CODES.get(el.name, f"int{el.bits}")


def folds_scales(w: QArray) -> bool:
  """Whether the kernel may multiply the float decode's 2^p (`_POWER`) into the E8M0 block scales of `w`, an MX
  weight, instead of into every pair of codes: when every scale is at most 2^(127 - p) (2 for E2M1 and E2M3, 4 for
  E3M2, 2^7 for E4M3, 2^15 for E5M2) and none is NaN (a block of NaN or Inf: folded scales take no NaN check,
  `_scale_bf16`). MXINT8 folds where every scale is at most 1 and no code is -128 (which has no 7-bit magnitude):
  its prepared codes are then stored as sign and magnitude (`kernel_order`). It reads the values, so it is False
  for traced ones; False for the other integer formats and for NVFP4 (which the kernel folds regardless,
  `_NVFP4_SHIFT`)."""
  code = _code(w.format, folded=True)
  traced = any(isinstance(a, jax.core.Tracer) for a in (w.scale, w.data))
  if code not in _POWER or w.scale.dtype != jnp.float8_e8m0fnu or traced:
    return False
  if code == _SIGN_MAGNITUDE and bool(jnp.any(lax.bitcast_convert_type(w.data, jnp.int8) == -128)):
    return False
  e = lax.bitcast_convert_type(w.scale, jnp.uint8).astype(jnp.int32)
  return int(jnp.max(e, initial=0)) + _POWER[code] <= 254


def _sign_magnitude(data: jax.Array, inverse: bool = False) -> jax.Array:
  """int8 codes (as bytes of any one-byte dtype) from two's complement to a sign bit and a 7-bit magnitude
  (`inverse`: back); -128 has no such form (`folds_scales` keeps it out)."""
  b = lax.bitcast_convert_type(data, jnp.uint8).astype(jnp.int32)
  if inverse:
    q = jnp.where(b >= 128, -(b & 127), b)
  else:
    q = jnp.where(b >= 128, b - 256, b)
    q = jnp.where(q < 0, 128 - q, q)
  return lax.bitcast_convert_type((q & 255).astype(jnp.uint8), data.dtype)


def _program_tiles(pid, n_tiles: int, m_tiles: int, group: int = _RASTER):
  """(weight row tile, activation row tile) of program `pid` (a scalar) on a grid of n_tiles x m_tiles tiles, in
  raster groups of `group` activation tiles: within a group activation tiles run fastest, so the programs running
  together read few weight tiles (each once from HBM) while the group's activations stay in L2."""
  first = pid // (group * n_tiles) * group  # the group's first activation tile
  size = jnp.minimum(group, m_tiles - first)  # (the last group may be smaller)
  local = pid - first * n_tiles
  return local // size, first + local % size


def _relabel_k(a: jax.Array, axis: int, inverse: bool = False) -> jax.Array:
  """`a` with `axis` (a multiple of 32) reordered the way `_widen` lays out an int4 tile: within every 32, logical
  position 8j + 2t + e holds physical position 8t + 4e + j (j, t < 4; e < 2). `inverse` undoes it."""
  a = jnp.moveaxis(a, axis, 0)
  k, rest = a.shape[0], a.shape[1:]
  # Physical order is (t, e, j), logical (j, t, e): transpose one view into the other.
  split, perm = ((4, 4, 2), (0, 2, 3, 1)) if inverse else ((4, 2, 4), (0, 3, 1, 2))
  a = a.reshape(k // 32, *split, *rest).transpose(*perm, *range(4, 4 + len(rest)))
  return jnp.moveaxis(a.reshape(k, *rest), 0, axis)


def _e2m1_bits(codes: jax.Array, inverse: bool = False) -> jax.Array:
  """4-bit codes (..., K), K a multiple of 8, from the bit layout of prepared E2M1 words to plain codes, each 8
  consecutive codes one 32-bit word (`inverse`: plain codes into that layout). Bit i (0: m, 1: e0, 2: e1, 3: s) of
  code c (c < 8; pair c % 4, half c // 4) sits at `_E2M1_BITS[c][i]`."""
  w = codes.astype(jnp.uint32).reshape(*codes.shape[:-1], -1, 8)
  bit = lambda c, i: (w[..., c] >> i) & 1  # bit i of code c as the array holds it
  out = [0] * 8
  for c in range(8):
    for i, p in enumerate(_E2M1_BITS[c]):
      if inverse:
        out[p // 4] = out[p // 4] | bit(c, i) << (p % 4)
      else:
        out[c] = out[c] | bit(p // 4, p % 4) << i
  return jnp.stack(out, axis=-1).reshape(codes.shape).astype(codes.dtype)


def kernel_order(data: jax.Array, element: ElementType, *, inverse: bool = False,
                 folded: bool = False) -> jax.Array:
  """Packed (..., N, K') codes of `element` (its `bits` and `name`), packed along the last axis (K; REFERENCE
  section 3), from the kernel's storage order to the canonical one (`inverse`: into the kernel's;
  `lowbit_jax.prepare`). 4- and 6-bit codes are permuted within every 32 along K so that the code `_widen` places
  at register column c is the weight's column c: stored position 8t + 4e + j holds column 8j + 2t + e. E2M1 codes
  then have their bits moved within each 32-bit word (`_E2M1_BITS`) so that 3 of its 4 bfloat16 pairs decode by a
  rotate and a mask. FP8 codes, and the int8 ones of a `folded` weight (MXINT8, `folds_scales`) stored as sign
  and magnitude, are permuted as 4-bit ones are (`_widen` reads them eight to a 64-bit load); other int8 codes
  (converted in place) are read in order."""
  bits = element.bits
  k = data.ndim - 1  # (leading axes: weights stacked over layers)
  if bits == 8:
    if element.kind == "int":
      if not folded:
        return data
      data = _sign_magnitude(data, inverse=not inverse)
    return _relabel_k(data, axis=k, inverse=inverse)
  codes = packing.unpack(data, bits, axis=k)
  e2m1 = _FLOAT_CODES.get(element.name) == "e2m1"
  if e2m1 and not inverse:
    codes = _e2m1_bits(codes)
  codes = _relabel_k(codes, axis=k, inverse=inverse)
  if e2m1 and inverse:
    codes = _e2m1_bits(codes, inverse=True)
  return packing.pack(codes, bits, axis=k)


def _in_order(code: str, prepared: bool) -> bool:
  """Whether the kernel reads one-byte codes in their stored order, two to a 16-bit load in the wgmma layout:
  those of a canonical weight (prepared ones are stored relabelled and loaded eight at a time, `kernel_order`)."""
  return code in _BYTE_CODES and not prepared


def _widen(w_smem, code: str, width: int, interpret: bool, folded: bool, prepared: bool) -> list[jax.Array]:
  """A (64, box) code tile in shared memory as bfloat16 values in the wgmma register layout, one (64, width) array
  per `width` columns (`width`: a scale block of 32 to 128 columns, or two of 16). `code`: "int8", "e4m3",
  "e5m2" (8-bit codes, arriving as int8), "e2m3", "e3m2" (6-bit codes, arriving as their bytes), "int4" or "e2m1"
  (arriving as int4; `prepared` E2M1 words in the bit layout of `_E2M1_BITS`). Float codes come as their values
  v, or with `folded` (on the GPU) as v * 2^-p (`_POWER`).

  int8 codes convert in place; FP8 codes and sign-magnitude int8 ones ("sm8", as v * 2^-127) a pair at a time
  (`_byte_pair_ptx`); 6-bit codes as 4-bit ones, with the loads of `_six_bit_pairs`. 4-bit codes are loaded 8 to
  a 32-bit register (where the wgmma layout would take 2 codes, one byte, per load) and each register becomes 4
  bf16 pairs, codes (j, j + 4) for j < 4, that the wgmma layout places at columns 8m + 2t, 8m + 2t + 1 (m the
  register's 8-column tile, t the thread's column pair). That relabels K within every 32 (`_relabel_k`); the
  caller applies the same relabelling to the activations, which leaves the dot product unchanged and saves the
  shuffles a true relayout would take. `prepared` one-byte codes, stored relabelled (`kernel_order`), are loaded
  the same way, 8 to a 64-bit register (their wgmma layout takes 2 per 16-bit load).
  """
  six = code in _FP6
  box = w_smem.shape[1] * 4 // 3 if six else w_smem.shape[1]  # (6-bit codes arrive as their bytes)
  if code == "int8":  # (MXINT8: blocks of 32 in a box of 128)
    return _split_columns(w_smem[...].astype(jnp.bfloat16), width, interpret)
  if interpret:  # the same values and relabelling, as array ops
    v = w_smem[...]
    if code in _FP8:
      v = lax.bitcast_convert_type(v, jnp.dtype(_CODE_ELEMENTS[code]))
    elif code == _SIGN_MAGNITUDE:
      v = lax.bitcast_convert_type(_sign_magnitude(v, inverse=True), jnp.int8).astype(jnp.float32) / 64
    elif code in _CODE_ELEMENTS:
      v = packing.unpack(v, 6, axis=1) if six else v.astype(jnp.int32) & 15
      v = _e2m1_bits(v) if code == "e2m1" and prepared else v
      v = elements.decode(v, ELEMENTS[_CODE_ELEMENTS[code]])
    v = v.astype(jnp.bfloat16)
    a = v if _in_order(code, prepared) else _relabel_k(v, axis=1)
    return [a[:, i:i + width] for i in range(0, box, width)]
  import jax.experimental.pallas.mosaic_gpu as plgpu
  part = plgpu.ShapeDtypeStruct((_BN, width), jnp.bfloat16, layout=plgpu.Layout.WGMMA)
  if six:  # loaded by the threads themselves: no register layout holds 6-bit codes
    return plgpu.inline_mgpu(arg_types=(plgpu.RefType(),), return_type=[part] * (box // width))(
        functools.partial(_six_bit_pairs, code=code, width=width, folded=folded))(w_smem)
  layout = plgpu.Layout.WGMMA if _in_order(code, prepared) else plgpu.Layout.WGMMA_UPCAST_4X
  codes = _backend.register_load(w_smem, layout)
  return plgpu.inline_mgpu(arg_types=(layout,), return_type=[part] * (box // width))(
      functools.partial(_code_pairs, code=code, width=width, folded=folded, prepared=prepared))(codes)


def _times_power(code: str, folded: bool) -> str:
  """PTX that ends a float pair's decode: $0 = t, the bf16 pair of v * 2^-p, times 2^p exactly (`_POWER`), or as it
  is where the scales carry 2^p (`folded`)."""
  if folded:
    return "mov.b32 $0, t;"
  bits = (_POWER[code] + 127) << 7  # (bf16 bits of 2^p)
  return f"mov.b32 m, 0x{bits:04X}{bits:04X}; mul.rn.bf16x2 $0, t, m;"


def _six_bit_ptx(code: str, off: int, folded: bool) -> str:
  """PTX for one bf16 pair from $1, which holds two FP6 codes at bit `off` of its 16-bit halves: the magnitude to
  bf16 bits 4-8 (E2M3) or 5-9 (E3M2) and the sign to bit 15 make the bf16 of v * 2^-126 (E2M3) or v * 2^-124
  (E3M2), subnormal codes as bf16 subnormals; then `_times_power` (as `_pair_ptx` does for E2M1)."""
  low, mask = (4, "0x01F001F0") if code == "e2m3" else (5, "0x03E003E0")
  d = low - off
  mag = f"shl.b32 m, $1, {d};" if d > 0 else f"shr.u32 m, $1, {-d};" if d < 0 else "mov.b32 m, $1;"
  return (mag + f" and.b32 m, m, {mask}; shl.b32 t, $1, {10 - off}; lop3.b32 t, m, t, 0x80008000, 0xF8; "
          + _times_power(code, folded))


def _asm(ptx: str, *words):
  """A 32-bit result $0 of inline PTX on 32-bit registers $1, $2, ... (scratch registers t and m)."""
  from jaxlib.mlir import ir
  from jaxlib.mlir.dialects import llvm
  return llvm.inline_asm(ir.IntegerType.get_signless(32), list(words), "{ .reg .b32 t, m; " + ptx + " }",
                         ",".join(["=r"] + ["r"] * len(words)))


def _six_bit_pairs(_, ref, *, code: str, width: int, folded: bool):
  """Mosaic GPU (lane level): a (64, 3C / 4) byte tile of FP6 codes in shared memory (four codes per three bytes,
  REFERENCE section 3) to bf16 in the WGMMA layout, split into `width`-column arrays.

  Each thread takes the codes the WGMMA_UPCAST_4X layout gives it, 8t..8t + 7 of every 32 of its two rows (t its
  column group): the 6 bytes at 24c + 6t of 32-column chunk c, in two aligned 32-bit loads. The pairs of `_widen`,
  codes (j, j + 4), sit 24 bits (three bytes) apart, so a byte permute puts them in the two halves of a word at the
  same bit offset (pairs 0 and 1 share one); the same relabelling of K as for 4-bit codes follows."""
  import numpy as np
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import utils
  from jaxlib.mlir import ir
  from jaxlib.mlir.dialects import arith, llvm
  i32 = ir.IntegerType.get_signless(32)
  pair = ir.VectorType.get((2,), ir.BF16Type.get())
  c = lambda v: arith.constant(i32, v)
  rows, nbytes = ir.MemRefType(ref.type).shape
  shape = (rows, nbytes * 4 // 3)
  base = llvm.ptrtoint(i32, utils.memref_ptr(ref))

  layout = mgpu.WGMMA_LAYOUT_UPCAST_4X
  out = np.empty(mgpu.WGMMA_LAYOUT.registers_shape(shape), dtype=object)
  for idx, (row, col) in zip(np.ndindex(layout.registers_shape(shape)), layout.thread_idxs(shape)):
    row, col = arith.index_cast(i32, row), arith.index_cast(i32, col)
    first = arith.divui(arith.muli(col, c(3)), c(4))  # the first byte, 24c + 6t: 2 past a word where t is odd
    addr = arith.addi(base, arith.addi(arith.muli(row, c(nbytes)), arith.andi(first, c(~3))))
    lo, hi = _asm("ld.shared.b32 $0, [$1];", addr), _asm("ld.shared.b32 $0, [$1+4];", addr)
    skip = arith.muli(arith.andi(first, c(2)), c(0x1111))  # byte selectors moved past those 2 bytes
    # Code j (j < 4) at bit 6j of the 6 bytes, code j + 4 three bytes later: halves from bytes (a, a + 1) and
    # (a + 3, a + 4), a = 6j // 8, put both at bit 6j % 8 (a selector past byte 7 picks a byte no mask keeps).
    words = [_asm("prmt.b32 $0, $1, $2, $3;", lo, hi, arith.addi(c(sel), skip)) for sel in (0x4310, 0x5421, 0x6532)]
    for j, (w, off) in enumerate(zip((0, 0, 1, 2), (0, 6, 4, 2))):
      out[(idx[0], 4 * idx[1] + j, *idx[2:])] = utils.bitcast(_asm(_six_bit_ptx(code, off, folded), words[w]), pair)
  return _wgmma_parts(out, width)


def _byte_pair_ptx(code: str, folded: bool, j: int | None = None) -> str:
  """PTX for one bf16 pair of FP8 or sign-magnitude int8 codes: those in bits 0-15 of $1, or (`j`) byte j of $1
  and byte j of $2. Each code sign-extended into its 16-bit half by one byte permute, then shifted so its
  exponent and mantissa bits sit at the bottom of the bf16 exponent field and the top of its mantissa (sign at bit
  15), gives the bf16 of v * 2^-120 (E4M3) or v * 2^-112 (E5M2): subnormal codes become bf16 subnormals, kept by
  bf16 arithmetic; then `_times_power`. NaN and Inf codes, which the quantizer stores only in blocks whose scale
  is NaN (REFERENCE section 2), become finite. A sign-magnitude code needs no shift: its magnitude m is the
  mantissa of the bf16 subnormal m * 2^-133 (v * 2^-127 for v = +-m / 64), only ever with its scales folded."""
  # (prmt selectors: bytes 0-3 of $1, 4-7 of the second operand; 8 + i: byte i's sign repeated)
  permute = "prmt.b32 t, $1, 0, 0x9180;" if j is None else \
      f"prmt.b32 t, $1, $2, 0x{j | (8 + j) << 4 | (4 + j) << 8 | (12 + j) << 12:04X};"
  if code == _SIGN_MAGNITUDE:
    return permute + " and.b32 $0, t, 0x807F807F;"
  shift, mask = (4, "0x87F087F0") if code == "e4m3" else (5, "0x8FE08FE0")
  return f"{permute} shl.b32 t, t, {shift}; and.b32 t, t, {mask}; " + _times_power(code, folded)


def _pair_ptx(code: str, j: int, folded: bool, prepared: bool) -> str:
  """PTX for one bf16 pair from a 32-bit register $1 of codes 0-7: codes j and j + 4, at bits 4j and 16 + 4j (or,
  for prepared E2M1 weights, where `_E2M1_BITS` puts them).

  int4: shift the pair to bits 0 and 16, OR each nibble into the mantissa of 0x4300 (128.0) with its sign bit
  flipped (lop3 (a & b) ^ c), giving 136 + q exactly, then subtract 136. E2M1: the magnitude bits to bf16 bits 6-8
  and the sign to bit 15 make the bf16 of v * 2^-126 (0.5 is a bf16 subnormal, kept by bf16 arithmetic), then
  `_times_power`: each by its own shift of $1 (no shift of the pair first), or, prepared, one rotate of $1 and a
  mask (pair 3: its mantissa bits masked in place, the rest rotated in by a lop3)."""
  if code == "e2m1" and prepared:
    mask = lambda places: f"0x{sum(1 << (p + h) for p in places for h in (0, 16)):08X}"  # (both halves)
    rot = f"shf.r.wrap.b32 t, $1, $1, {_E2M1_ROTATE[j]};"
    if j < 3:
      return rot + f" and.b32 t, t, {mask(_E2M1_PLACES)}; " + _times_power(code, folded)
    return (f"and.b32 m, $1, {mask(_E2M1_PLACES[:1])}; " + rot
            + f" lop3.b32 t, m, t, {mask(_E2M1_PLACES[1:])}, 0xF8; " + _times_power(code, folded))

  def shift(dst, n):  # $1 moved left by n bits (right for negative n)
    return f"shl.b32 {dst}, $1, {n};" if n > 0 else f"shr.u32 {dst}, $1, {-n};" if n < 0 else f"mov.b32 {dst}, $1;"
  if code == "int4":
    return (shift("t", -4 * j) + " lop3.b32 t, t, 0x000F000F, 0x43084308, 0x6A; mov.b32 m, 0x43084308; "
            "sub.bf16x2 $0, t, m;")
  return (shift("m", 6 - 4 * j) + " and.b32 m, m, 0x01C001C0; " + shift("t", 12 - 4 * j) +
          " lop3.b32 t, m, t, 0x80008000, 0xF8; " + _times_power(code, folded))


def _code_pairs(_, codes, *, code: str, width: int, folded: bool, prepared: bool):
  """Mosaic GPU (lane level): codes to bf16 in the WGMMA layout, split into `width`-column arrays. One-byte codes
  (FP8, sign-magnitude int8) come in the WGMMA layout itself, two per register, or `prepared` in the
  WGMMA_UPCAST_4X layout, 8 per register (`_byte_pair_ptx`); 4-bit codes in the WGMMA_UPCAST_4X layout, 8 per
  register, as `_widen` describes (`_pair_ptx` per pair)."""
  import numpy as np
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import utils
  from jaxlib.mlir import ir
  from jaxlib.mlir.dialects import arith
  i32, i64 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64)
  pair = ir.VectorType.get((2,), ir.BF16Type.get())

  if _in_order(code, prepared):
    i16 = ir.IntegerType.get_signless(16)
    ptx = _byte_pair_ptx(code, folded)
    out = np.empty(codes.registers.shape, dtype=object)
    for idx, reg in np.ndenumerate(codes.registers):
      out[idx] = utils.bitcast(_asm(ptx, arith.extui(i32, utils.bitcast(reg, i16))), pair)
    return _wgmma_parts(out, width)
  out = np.empty(mgpu.WGMMA_LAYOUT.registers_shape(codes.shape), dtype=object)
  for idx, reg in np.ndenumerate(codes.registers):  # idx[1]: the register's 32-column tile
    if code in _BYTE_CODES:  # (codes 0-3 in the low word, 4-7 in the high one)
      v = utils.bitcast(reg, i64)
      words = (arith.trunci(i32, v), arith.trunci(i32, arith.shrui(v, arith.constant(i64, 32))))
      ptxs = [_byte_pair_ptx(code, folded, j) for j in range(4)]
    else:
      words = (utils.bitcast(reg, i32),)
      ptxs = [_pair_ptx(code, j, folded, prepared) for j in range(4)]
    for j, ptx in enumerate(ptxs):
      out[(idx[0], 4 * idx[1] + j, *idx[2:])] = utils.bitcast(_asm(ptx, *words), pair)
  return _wgmma_parts(out, width)


def _wgmma_parts(registers, width: int) -> list:
  """(64, width) bfloat16 FragmentedArrays in the wgmma register layout from a grid of its registers whose axis 1
  runs over 8-column tiles."""
  from jax.experimental.mosaic import gpu as mgpu
  per = width // 8
  return [mgpu.FragmentedArray(_registers=registers[:, i:i + per], _layout=mgpu.WGMMA_LAYOUT, _is_signed=None)
          for i in range(0, registers.shape[1], per)]


def _split_columns(a: jax.Array, width: int, interpret: bool) -> list[jax.Array]:
  """A (64, c) bfloat16 array in the wgmma register layout as (64, width) arrays, its registers taken as they are
  (the inverse of `_columns`)."""
  if width == a.shape[1]:
    return [a]
  if interpret:
    return [a[:, i:i + width] for i in range(0, a.shape[1], width)]
  import jax.experimental.pallas.mosaic_gpu as plgpu
  part = plgpu.ShapeDtypeStruct((_BN, width), jnp.bfloat16, layout=plgpu.Layout.WGMMA)

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,), return_type=[part] * (a.shape[1] // width))
  def split(_, a):
    return _wgmma_parts(a.registers, width)

  return split(a)


def _columns(parts: list[jax.Array], interpret: bool) -> jax.Array:
  """(64, c) bfloat16 arrays in the wgmma register layout side by side as one (64, c * len(parts)) array: their
  registers taken as they are (the layout's registers run over 8-column tiles), so a wgmma takes 128 columns of
  blocks of 32 at once instead of one instruction group per block."""
  if len(parts) == 1:
    return parts[0]
  if interpret:
    return jnp.concatenate(parts, axis=1)
  import jax.experimental.pallas.mosaic_gpu as plgpu
  out = plgpu.ShapeDtypeStruct((_BN, sum(p.shape[1] for p in parts)), jnp.bfloat16, layout=plgpu.Layout.WGMMA)

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,) * len(parts), return_type=out)
  def join(_, *arrays):
    import numpy as np
    from jax.experimental.mosaic import gpu as mgpu
    return mgpu.FragmentedArray(_registers=np.concatenate([a.registers for a in arrays], axis=1),
                                _layout=mgpu.WGMMA_LAYOUT, _is_signed=None)

  return join(*parts)


def _load_column(ref, col) -> jax.Array:
  """Column `col` (a scalar) of a (64, C) shared-memory ref, in the wgmma row layout (each thread the values of its
  two accumulator rows). Scalar loads: Mosaic GPU's layout inference takes no strided (non-contiguous) refs."""
  import jax.experimental.pallas.mosaic_gpu as plgpu
  signed = False if jnp.issubdtype(ref.dtype, jnp.integer) else None  # (E8M0 scales arrive as uint8)

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.Layout.WG_SPLAT(())),
                     return_type=plgpu.ShapeDtypeStruct((_BN,), ref.dtype, layout=plgpu.Layout.WGMMA.reduce(1)))
  def load(_, ref, col):
    import numpy as np
    from jax.experimental.mosaic import gpu as mgpu
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, memref, vector
    layout = mgpu.WGMMA_ROW_LAYOUT
    col = arith.index_cast(ir.IndexType.get(), col.registers.item())
    dtype = ir.MemRefType(ref.type).element_type
    regs = np.empty(layout.registers_shape((_BN,)), dtype=object)
    for idx, (row,) in zip(np.ndindex(regs.shape), layout.thread_idxs((_BN,))):
      regs[idx] = vector.broadcast(ir.VectorType.get((1,), dtype), memref.load(ref, [row, col]))
    return mgpu.FragmentedArray(_registers=regs, _layout=layout, _is_signed=signed)

  return load(ref, jnp.asarray(col, jnp.int32))


def _store_transposed(acc, ref):
  """Stores a (64, R) float32 wgmma accumulator into an (R, 64) shared-memory ref as its transpose."""
  import jax.experimental.pallas.mosaic_gpu as plgpu

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()))
  def store(_, acc, ref):
    from jax.experimental.mosaic import gpu as mgpu
    acc.to_layout(mgpu.WGMMA_TRANSPOSED_LAYOUT).store_untiled(mgpu.memref_transpose(ref, (1, 0)), optimized=False)

  store(acc, ref)


def _scale_bf16(s: jax.Array, power: int = 0) -> jax.Array:
  """Block scales times 2^power as bfloat16, exactly where that fits (the caller's part, `_POWER`, or MXINT8's
  -6): bfloat16 ones as they are (power 0), E4M3 converted, E8M0 (as its uint8 bits: Hopper converts no E8M0) by
  bit arithmetic: 2^(e + power - 127) is bf16 bits (e + power) << 7, or below 2^-126 the bf16 subnormal
  1 << (e + power + 6) (power >= -6), e = 255 NaN. E8M0 scales with power > 0 are folded ones (`folds_scales`):
  none NaN, none subnormal once times 2^power, so their bits take one shift."""
  if s.dtype == jnp.uint8:
    e = s.astype(jnp.int32) + power
    if power > 0:
      return lax.bitcast_convert_type((e << 7).astype(jnp.int16), jnp.bfloat16)
    if power < 0:  # (MXINT8: 2^-133 ... 2^-127 are bf16 subnormals)
      tiny = jnp.left_shift(1, jnp.clip(e + 6, 0, 6))
    else:  # (only 2^-127 is: one fewer instruction on the scales' path)
      tiny = 0x40
    bits = jnp.where(e == 255 + power, 0x7FC0, jnp.where(e <= 0, tiny, e << 7))
    return lax.bitcast_convert_type(bits.astype(jnp.int16), jnp.bfloat16)
  if s.dtype == jnp.bfloat16:
    return s
  return (s.astype(jnp.float32) * 2.0 ** power).astype(jnp.bfloat16)


def _times_g(y: jax.Array, g: jax.Array) -> jax.Array:
  """A float32 sum of NVFP4 products times its tensor scale g and the 2^8 its elements lack (`_NVFP4_SHIFT`)."""
  return y * (g * 2.0 ** _NVFP4_SHIFT)


def _scale_window(dtype, blocks: int) -> int:
  """Scale columns per TMA box: at least 16 bytes (TMA's narrowest box row) and a step's `blocks`."""
  return max(16 // jnp.dtype(dtype).itemsize, blocks)


def _kernel(w_gmem, s_gmem, x_gmem, *refs, code: str, block: int, win: int, steps: int, groups: int, stages: int,
            tiles: int, wgs: int, mp: int, n_tiles: int, m_tiles: int, prepared: bool, power: int, backend: str,
            pair: bool):
  import jax.experimental.pallas.mosaic_gpu as plgpu
  interpret = backend == "mosaic_interpret"
  # Grid axis 0 runs over (activation row tile, weight row tile) in raster groups (`_program_tiles`); axis 1 over
  # K slices.
  pid = _backend.program_id(0, backend=backend)
  # (a static 0 with one activation tile: the interpreter hung on a derived index with three compute warpgroups)
  ni, mi = _program_tiles(pid, n_tiles, m_tiles) if m_tiles > 1 else (pid, 0)
  si = _backend.program_id(1, backend=backend)
  k0 = si * steps
  six = code in _FP6
  bits = 6 if six else jnp.iinfo(w_gmem.dtype).bits
  # Code columns per TMA box: 128-byte rows (the widest swizzle) where a step holds whole ones, else 128; 6-bit
  # codes, whose threads load their own bytes (`_six_bit_pairs`), in one unswizzled box per step.
  box = groups * _TK if six else 1024 // bits if (groups * _TK) % (1024 // bits) == 0 else _TK
  w_sw = box * bits // 8
  boxes = groups * _TK // box
  bn = _BN * tiles * wgs
  width = max(block, 32)  # columns per scale multiply: one scale block, or two blocks of 16
  x_sw = plgpu.find_swizzle(_TK * 16, "rhs")  # one wgmma's activations (128 columns) per 8-row tile
  g_gmem, o_gmem = refs if len(refs) == 2 else (None, *refs)
  blocks = groups * _TK // block  # scale blocks per step
  per = width // block  # scale blocks per slice
  per_channel = win == 1  # the (1, N) row of per-channel scales (blocked ones come in windows of 8 or more)
  # `power`: the 2^p the scales take from the float decode (`_POWER`; 0: each pair multiplies by it). The
  # interpreter widens codes to their values, so its scales take 2^(power - p) instead.
  folded = power > 0
  scale_power = power - _POWER[code] if folded and interpret else power

  def scaled(acc):  # a float32 accumulator times NVFP4's g
    return acc if g_gmem is None else _times_g(acc, g_gmem[0])

  def finish(acc):  # an accumulator as the program writes it
    return scaled(acc).astype(o_gmem.dtype)

  # With `pair` the program's two 64-row tiles are gate rows ni and up rows n_tiles + ni of a (2 F, K) weight,
  # each with its own code and scale copies; otherwise its tiles are rows of one (bn, ...) copy.
  copies = 2 if pair else 1

  def step(idx, *refs, tiles, stash):  # tiles: (tile index, its rows in its copy, accumulator)
    w_all, s_all, x_smem = refs[:boxes * copies], refs[boxes * copies:-1], refs[-1]
    # This step's first scale column in its TMA window of `win` columns (0 where a window is one step's blocks).
    first = 0 if win == blocks else (k0 + idx[0]) * blocks % win
    if per > 1:  # blocks of 16: register column c holds a code of block (c % 8) // 4 of its 32 (`_relabel_k`),
      # or with prepared weights (codes stored in register order) of block c // 16
      col = lax.broadcasted_iota(jnp.int32, (_BN, width), 1)
      col = col if interpret else plgpu.layout_cast(col, plgpu.Layout.WGMMA)
      first_block = col < 16 if prepared else col % 8 < 4
    for t, rows, acc_ref in tiles:
      w_smems, s_smem = (w_all[t * boxes:(t + 1) * boxes], s_all[t]) if pair else (w_all, s_all[0])
      for b, w_smem in enumerate(w_smems):
        slices = []  # (this box's scaled slices, joined 128 columns per wgmma below)
        for h, a in enumerate(_widen(w_smem.at[rows], code, width, interpret, folded, prepared)):
          j = b * (box // width) + h  # the slice of this step

          def scale(i):  # (64, width): the step's scale column i along the slice's rows, as bfloat16
            if interpret:  # the GPU interpreter loads no register layouts and takes wgmma operands from shared memory
              s = s_smem[0, rows] if per_channel else s_smem[rows, first + i]
            elif per_channel:
              s = _backend.register_load(s_smem.at[0, rows], plgpu.Layout.WGMMA.reduce(1))
            else:
              s = _load_column(s_smem.at[rows], first + i)
            return lax.broadcast_in_dim(_scale_bf16(s, scale_power), a.shape, [0])

          if per_channel:
            a = a * scale(0)
          elif per == 1:
            a = a * scale(j)
          else:
            a = a * jnp.where(first_block, scale(2 * j), scale(2 * j + 1))
          slices.append(a)
        for q in range(box // _TK):  # one wgmma per 128 columns, whatever the scale block
          a = _columns(slices[q * (_TK // width):(q + 1) * (_TK // width)], interpret)
          xs = x_smem.at[:, pl.ds((b * (box // _TK) + q) * _TK, _TK)]
          if interpret:  # (and takes no transposed operand)
            a_smem, b_smem = stash
            a_smem[...], b_smem[...] = a, xs[...].T
            plgpu.wgmma(acc_ref, a_smem, b_smem)
          else:
            plgpu.wgmma(acc_ref, a, xs.transpose((1, 0)))
    plgpu.wgmma_wait(0)

  rows_per_copy = _BN if pair else bn
  row_block = lambda t: ni + t * n_tiles  # a copy's block index along N (t: 1 for the up tile of a pair)
  w_spec = lambda b, t: plgpu.BlockSpec(
      (rows_per_copy, w_sw), lambda kk: (row_block(t), k0 + kk)) if six else plgpu.BlockSpec(
      (rows_per_copy, box), lambda kk: (row_block(t), (k0 + kk) * boxes + b),
      transforms=(plgpu.TilingTransform((8, box)), plgpu.SwizzleTransform(w_sw)))
  in_specs = [
      *[w_spec(b, t) for t in range(copies) for b in range(boxes)],
      # Scales as stored, (N, K / B): a window of `win` columns, fetched again for each step it spans (per-channel
      # ones, (1, N), every step: the warp-specialized pipeline takes only inputs that follow the step).
      *[plgpu.BlockSpec((1, rows_per_copy), lambda kk, t=t: (kk * 0, row_block(t))) if per_channel else
        plgpu.BlockSpec((rows_per_copy, win), lambda kk, t=t: (row_block(t), (k0 + kk) * blocks // win))
        for t in range(copies)],
      plgpu.BlockSpec((mp, _TK * groups), lambda kk: (mi, k0 + kk),
                      transforms=(plgpu.TilingTransform((8, x_sw * 8 // 16)), plgpu.SwizzleTransform(x_sw))),
  ]
  operands = (*[w_gmem] * (boxes * copies), *[s_gmem] * copies, x_gmem)
  # (the interpreter's shared-memory copies of the wgmma operands, one pair per compute warpgroup)
  stash_types = (plgpu.SMEM((wgs, _BN, _TK), jnp.bfloat16), plgpu.SMEM((wgs, _TK, mp), jnp.bfloat16))
  # The accumulators are out^T tiles (64 weight rows, R activation rows); they go out as (M, N) rows so that
  # the split-K partials are summed over contiguous rows and nothing is transposed after the kernel.
  if wgs > 1:
    wg = lax.axis_index("wg")
    rows = pl.ds(wg * _BN, _BN)
    out = o_gmem.at[si, pl.ds(mi * mp, mp), pl.ds(ni * bn + wg * _BN, _BN)]  # (R, 64): stored directly

    def compute(eval_pipeline):
      @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((_BN, mp)))
      def _(acc_ref):
        eval_pipeline(acc_ref)
        if interpret:
          out[...] = finish(acc_ref[...]).T
        else:
          _store_transposed(finish(acc_ref[...]), out)

    def warp_specialized(*stash):
      stash = tuple(ref.at[wg] for ref in stash)
      plgpu.emit_pipeline_warp_specialized(  # (the body's last ref is the carry, this warpgroup's accumulator)
          lambda _, *refs: step(_, *refs[:-1], tiles=[(0, rows, refs[-1])], stash=stash) or refs[-1], grid=(steps,),
          memory_registers=40, in_specs=in_specs, max_concurrent_steps=stages, wg_axis="wg", num_compute_wgs=wgs,
          compute_context=compute)(*operands)

    if interpret:
      pl.run_scoped(warp_specialized, *stash_types, collective_axes="wg")
    else:
      warp_specialized()
    return

  def acc_scope(*accs, stash):
    plgpu.emit_pipeline(
        functools.partial(step, tiles=[(r, pl.ds(0 if pair else r * _BN, _BN), acc) for r, acc in enumerate(accs)],
                          stash=tuple(ref.at[0] for ref in stash)),
        grid=(steps,), in_specs=in_specs, max_concurrent_steps=stages)(*operands)
    return [acc_ref[...] for acc_ref in accs]

  def with_stash(*stash):
    return pl.run_scoped(functools.partial(acc_scope, stash=stash), *[plgpu.ACC((_BN, mp))] * tiles)

  accs = pl.run_scoped(with_stash, *stash_types) if interpret else with_stash()
  written = min(o_gmem.shape[1], mp)  # (rows this program writes: M with one row tile, else whole tiles)

  # The output tiles: each accumulator in the output dtype, or a pair's silu(gate) * up.
  results = [xla.swiglu(*map(scaled, accs), o_gmem.dtype)] if pair else list(map(finish, accs))
  out_bn = _BN if pair else bn  # output columns per program

  @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((len(results), mp, _BN), o_gmem.dtype))
  def _store(o_smem):
    for r, y in enumerate(results):
      if interpret:
        o_smem[r] = y.T
      else:
        _store_transposed(y, o_smem.at[r])
    plgpu.commit_smem()
    for r in range(len(results)):
      plgpu.copy_smem_to_gmem(o_smem.at[r, pl.ds(0, written)],
                              o_gmem.at[si, pl.ds(mi * mp, written), pl.ds(ni * out_bn + r * _BN, _BN)])
    plgpu.wait_smem_to_gmem(0)


@_backend.jit_op("out_dtype", "backend", "config", "partials", "swiglu")
def dequant_gemv(x: jax.Array, w: QArray | PreparedWeight, *, out_dtype=None, backend: str = "mosaic",
                 config: Config | None = None, partials: bool = False, swiglu: bool = False) -> jax.Array:
  """x (M, K) @ dequantize(w).T with w a K-major (N, K) QArray blocked along axis 1, or the same weight prepared
  (`lowbit_jax.prepare`: codes stored in the kernel's order, so x is not permuted per call); float32 accumulation.

  Returns (M, N) in `out_dtype` (default x.dtype), or with `partials` the summands (S, M, N) whose sum over axis 0
  is the product: float32 split-K partial sums (S = the configuration's split), or where K is not split the one
  product in `out_dtype` (S = 1). `backend`: "mosaic" (Hopper GPUs) or "mosaic_interpret" (the Mosaic GPU
  interpreter, any device).

  With `swiglu`, w holds a gate and an up projection, rows [0, N / 2) and [N / 2, N), and the result is
  silu(gate) * up, (M, N / 2): each product rounded to `out_dtype` as the unfused matmul writes it, then the
  SwiGLU in float32, rounded once. A program then takes a 64-row gate tile and its up tile, K unsplit, one
  warpgroup (`config` with split, tiles and wgs 1), and M <= 64 (two accumulators of up to 64 rows).
  """
  fmt = w.format
  prepared = isinstance(w, PreparedWeight)
  if w.ndim != 2 or w.axis != 1:
    raise ValueError(f"dequant_gemv: w must be a 2-D QArray blocked along axis 1 (K-major), got {w}.")
  n, k = w.shape
  reason = supports(fmt, n, k)
  if reason:
    raise ValueError(f"dequant_gemv does not support {reason}.")
  m = x.shape[0]
  if x.ndim != 2 or x.shape[1] != k or m == 0:
    raise ValueError(f"dequant_gemv: x must be (M > 0, K = {k}), got {x.shape}.")
  if x.dtype != jnp.bfloat16:
    raise TypeError(f"dequant_gemv: x must be bfloat16, got {x.dtype}.")
  bits = fmt.element_type.bits
  block = fmt.block[0] if fmt.block else _TK
  # A caller taking the partials adds them in one program per row: at most 8 of them, which cost a decode step's
  # norm kernel 1.8 us against 2.2 for 16 where the down projection's kernel times the same (H100, BENCHMARKS.md).
  cfg = config or default_config(n, k, m, bits, max_split=8 if partials else 16)
  if swiglu:
    if config is None:  # (the gate/up tile pair counts as the program's two tiles below)
      cfg = Config(split=1, groups=cfg.groups, stages=2)
    if not swiglu_fits(n, m) or partials or (cfg.split, cfg.tiles, cfg.wgs) != (1, 1, 1):
      raise ValueError(f"dequant_gemv(swiglu=True) takes N a multiple of {2 * _BN}, M <= 64, no partials and a "
                       f"config with split, tiles and wgs 1; got N = {n}, M = {m}, {cfg}.")
    cfg = dataclasses.replace(cfg, tiles=2)
  bn = _BN * cfg.tiles * cfg.wgs
  if k % (_TK * cfg.groups * cfg.split) or n % bn or cfg.wgs > 1 and cfg.tiles > 1:
    raise ValueError(f"dequant_gemv: {cfg} does not tile N = {n}, K = {k} (steps of {cfg.groups} x {_TK}, "
                     f"{bn} rows per program; one tile per warpgroup with wgs > 1).")
  if smem_bytes(cfg, m, bits, block) > _backend.HOPPER_SMEM:
    raise ValueError(f"dequant_gemv: {cfg} at M = {m} takes {smem_bytes(cfg, m, bits, block)} bytes of shared "
                     f"memory (at most {_backend.HOPPER_SMEM}): fewer stages, groups or tiles.")
  # x is the wgmma B operand, transposed: activation_rows(M) rows per tile (wgmma's N is a multiple of 8), those past
  # M read beyond the array (TMA fills zeros), each feeding only an output row that is dropped.
  xp = _backend.tma_rows(x)
  if bits == 4:  # two codes per byte, low nibble first: the bytes of a jnp.int4 (N, K) array
    data = lax.bitcast_convert_type(w.data, jnp.int4).reshape(n, k)
  else:  # (6-bit codes: four per three bytes, as stored)
    data = w.data if bits == 6 else lax.bitcast_convert_type(w.data, jnp.int8)
  if bits < 8 and not prepared:
    xp = _relabel_k(xp, axis=1)  # K in the order _widen gives 4- and 6-bit codes
  code = _code(fmt, folded=prepared and w.folded)
  g = w.tensor_scale.astype(jnp.float32).reshape(1) if w.tensor_scale is not None else None
  if g is not None:  # NVFP4: scales times 2^(126 - 8), elements 2^-8 of their value, sums times g 2^8 (`_POWER`)
    power = _POWER[code] - _NVFP4_SHIFT
  elif code == "int8" and fmt.rule == "mx":  # MXINT8: the code q is 2^6 times the element (1.6 fixed point)
    power = -fmt.element_type.mantissa
  else:  # MX weights prepared with scales that take 2^p (`folds_scales`)
    power = _POWER[code] if prepared and w.folded else 0
  if fmt.block is None:  # (N, 1) per-channel scales are the row (1, N)
    scale, win = w.scale.reshape(1, n), 1
  else:  # (N, K / B) as stored; E8M0 as its bits, columns padded to whole TMA windows
    scale = lax.bitcast_convert_type(w.scale, jnp.uint8) if w.scale.dtype == jnp.float8_e8m0fnu else w.scale
    win = _scale_window(scale.dtype, cfg.groups * _TK // block)
    scale = jnp.pad(scale, ((0, 0), (0, -scale.shape[1] % win)))
  r = activation_rows(m)  # (the kernel's mp: activation rows per program)
  mt = -(-m // r)  # activation row tiles
  kernel = functools.partial(_kernel, code=code, block=block, win=win,
                             steps=k // (_TK * cfg.groups * cfg.split), groups=cfg.groups, stages=cfg.stages,
                             tiles=cfg.tiles, wgs=cfg.wgs, mp=r, n_tiles=n // bn, m_tiles=mt, prepared=prepared,
                             power=power, backend=backend, pair=swiglu)
  # Warp-specialized programs store all R rows straight from registers; the others, M rows through TMA (R with
  # more than one row tile). A single K split writes the result in out_dtype; more write float32 partials.
  out_rows = m if cfg.wgs == 1 and mt == 1 else mt * r
  out_dtype = out_dtype or x.dtype
  final = cfg.split == 1
  parts = _backend.call(
      kernel, backend=backend,
      out_shape=jax.ShapeDtypeStruct((cfg.split, out_rows, n // 2 if swiglu else n),
                                     out_dtype if final else jnp.float32),
      grid=(n // bn * mt, cfg.split), in_specs=None, out_specs=None, name=f"dequant_gemv_{fmt.name}",
      threads=cfg.wgs + 1 if cfg.wgs > 1 else 1)(data, scale, xp, *([] if g is None else [g]))[:, :m]
  if partials:
    return parts
  return parts[0] if final else jnp.sum(parts, axis=0).astype(out_dtype)
