"""Number formats as data: element types, the `Format` spec, and the registry of named formats.

A format is a frozen dataclass, not a class per format: the element type, the block shape, the scale storage type,
and whether there is a tensor scale or a zero point. The quantization rule follows from those (see `Format.rule`).
Constants are those of REFERENCE section 1.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import ml_dtypes
import numpy as np

from lowbit_jax import packing

__all__ = ["ElementType", "Format", "ELEMENTS", "formats", "get_format", "register_format"]


@dataclasses.dataclass(frozen=True)
class ElementType:
  """An element type described by its grid.

  Floats: `mantissa` bits, smallest normal exponent `emin`, largest `emax`, largest value `max` (all finite).
  Integers: two's complement of `bits`; in MX blocks they are fixed point with `bits - 2` fraction bits
  (MXINT8), elsewhere plain integers.
  """

  name: str
  bits: int
  kind: Literal["float", "int"]
  mantissa: int = 0
  emin: int = 0
  emax: int = 0
  max: float = 0.0

  @property
  def int_max(self) -> int:
    """Largest symmetric integer code, 2^(bits-1) - 1."""
    return 2 ** (self.bits - 1) - 1

  @property
  def storage_dtype(self) -> np.dtype:
    """The dtype `QArray.data` holds (sub-byte codes are packed into uint8)."""
    if self.kind == "float" and self.bits == 8:
      return np.dtype(getattr(ml_dtypes, self.name))
    if self.bits == 8:
      return np.dtype(np.int8)
    return np.dtype(np.uint8)


def _float_element(name: str) -> ElementType:
  info = ml_dtypes.finfo(getattr(ml_dtypes, name, None) or np.dtype(name))
  return ElementType(
      name=name, bits=info.bits, kind="float", mantissa=int(info.nmant),
      emin=int(info.minexp), emax=int(info.maxexp) - 1, max=float(info.max))


ELEMENTS: dict[str, ElementType] = {
    **{n: _float_element(n) for n in
       ("float8_e4m3fn", "float8_e5m2", "float6_e2m3fn", "float6_e3m2fn", "float4_e2m1fn")},
    # MX view of an integer: 1.(bits-2) fixed point, emax 0, largest value (2^(bits-1)-1) / 2^(bits-2).
    "int8": ElementType("int8", 8, "int", mantissa=6, emin=0, emax=0, max=127 / 64),
    "int4": ElementType("int4", 4, "int", mantissa=2, emin=0, emax=0, max=7 / 4),
    "int3": ElementType("int3", 3, "int", mantissa=1, emin=0, emax=0, max=3 / 2),
    "int2": ElementType("int2", 2, "int", mantissa=0, emin=0, emax=0, max=1.0),
}

SCALE_TYPES = ("float8_e8m0fnu", "float8_e4m3fn", "bfloat16", "float16", "float32")
# Grids of the float scale types, for rounding scales exactly as stored (see scales.py).
SCALE_GRIDS: dict[str, ElementType] = {n: _float_element(n) for n in ("float8_e4m3fn", "bfloat16", "float16")}

Rule = Literal["mx", "nvfp4", "absmax", "asym"]


@dataclasses.dataclass(frozen=True)
class Format:
  """A block-scaled number format.

  Attributes:
    name: registry name, or any label for a custom format.
    element: element type name, a key of `ELEMENTS` (`float4_e2m1fn`, `int4`, ...).
    block: block extent along the blocked axes, `(32,)` or `(128, 128)`; `None` blocks the whole axis
      (per-channel).
    scale: scale storage dtype name: `float8_e8m0fnu` (MX), `float8_e4m3fn` (NVFP4), or a float type.
    tensor_scale: whether a float32 per-tensor scale multiplies the block scales (NVFP4).
    zero_point: whether integer groups are asymmetric, with a zero point stored in the scale dtype.

  Example:
    >>> import lowbit_jax as lb
    >>> mxfp4_16 = lb.Format("mxfp4_b16", "float4_e2m1fn", (16,), "float8_e8m0fnu")
    >>> mxfp4_16.bits_per_element
    4.5
  """

  name: str
  element: str
  block: tuple[int, ...] | None
  scale: str
  tensor_scale: bool = False
  zero_point: bool = False

  def __post_init__(self):
    if self.element not in ELEMENTS:
      raise ValueError(f"Format {self.name!r}: element must be one of {sorted(ELEMENTS)}, got {self.element!r}.")
    if self.scale not in SCALE_TYPES:
      raise ValueError(f"Format {self.name!r}: scale must be one of {SCALE_TYPES}, got {self.scale!r}.")
    if self.block is not None:
      object.__setattr__(self, "block", tuple(int(b) for b in self.block))
      if not 1 <= len(self.block) <= 2 or any(b < 1 for b in self.block):
        raise ValueError(f"Format {self.name!r}: block must be 1 or 2 positive sizes or None, got {self.block}.")
    el = ELEMENTS[self.element]
    per_byte = packing.codes_per_group(el.bits)
    if self.block is not None and self.block[-1] % per_byte:
      raise ValueError(f"Format {self.name!r}: {el.bits}-bit codes pack {per_byte} to a group, so the block "
                       f"along the packed axis must be a multiple of {per_byte}, got {self.block[-1]}.")
    if self.zero_point and (el.kind != "int" or self.scale not in ("bfloat16", "float16", "float32")):
      raise ValueError(f"Format {self.name!r}: a zero point needs an integer element and a float scale.")
    if self.tensor_scale and self.scale != "float8_e4m3fn":
      raise ValueError(f"Format {self.name!r}: a tensor scale needs float8_e4m3fn block scales.")
    if self.scale == "float8_e4m3fn" and el.kind != "float":
      raise ValueError(f"Format {self.name!r}: E4M3 block scales need a float element.")

  @property
  def element_type(self) -> ElementType:
    return ELEMENTS[self.element]

  @property
  def rule(self) -> Rule:
    """Which quantizer applies: read off the scale type and zero point (REFERENCE section 2)."""
    if self.scale == "float8_e8m0fnu":
      return "mx"
    if self.scale == "float8_e4m3fn":
      return "nvfp4"
    return "asym" if self.zero_point else "absmax"

  @property
  def block_size(self) -> int | None:
    """Elements per block, or None for per-channel."""
    return None if self.block is None else math.prod(self.block)

  @property
  def bits_per_element(self) -> float | None:
    """Storage bits per element including scales and zero points (None for per-channel, which depends on the
    axis length); a tensor scale is not counted."""
    if self.block is None:
      return None
    scale_bits = np.dtype(getattr(ml_dtypes, self.scale, None) or np.dtype(self.scale)).itemsize * 8
    side = scale_bits * (2 if self.zero_point else 1)
    return self.element_type.bits + side / self.block_size

  def __repr__(self) -> str:
    return f"Format({self.name!r})"


def _registry() -> dict[str, Format]:
  fs = [
      Format("mxfp8_e4m3", "float8_e4m3fn", (32,), "float8_e8m0fnu"),
      Format("mxfp8_e5m2", "float8_e5m2", (32,), "float8_e8m0fnu"),
      Format("mxfp6_e2m3", "float6_e2m3fn", (32,), "float8_e8m0fnu"),
      Format("mxfp6_e3m2", "float6_e3m2fn", (32,), "float8_e8m0fnu"),
      Format("mxfp4", "float4_e2m1fn", (32,), "float8_e8m0fnu"),
      Format("mxint8", "int8", (32,), "float8_e8m0fnu"),
      Format("nvfp4", "float4_e2m1fn", (16,), "float8_e4m3fn", tensor_scale=True),
  ]
  # 2- and 3-bit integers (HQQ-style weights) come in groups only, no per-channel variants.
  for bits, groups in ((4, (32, 64, 128, None)), (8, (32, 64, 128, None)), (2, (32, 64, 128)), (3, (32, 64, 128))):
    for group in groups:
      for sym in ("sym", "asym"):
        g = "channel" if group is None else f"g{group}"
        fs.append(Format(f"int{bits}_{g}_{sym}", f"int{bits}", None if group is None else (group,), "bfloat16",
                         zero_point=sym == "asym"))
  fs += [
      Format("fp8_block_1x128", "float8_e4m3fn", (128,), "float32"),
      Format("fp8_block_128x128", "float8_e4m3fn", (128, 128), "float32"),
  ]
  return {f.name: f for f in fs}


_FORMATS: dict[str, Format] = _registry()


def formats() -> tuple[str, ...]:
  """Names of the registered formats.

  >>> import lowbit_jax as lb
  >>> "mxfp4" in lb.formats()
  True
  """
  return tuple(_FORMATS)


def register_format(fmt: Format) -> Format:
  """Adds a custom format to the registry so that it can be named by string."""
  if not isinstance(fmt, Format):
    raise TypeError(f"register_format: fmt must be a lowbit_jax.Format, got {type(fmt).__name__}.")
  _FORMATS[fmt.name] = fmt
  return fmt


def get_format(fmt: str | Format) -> Format:
  """Resolves a format name (or passes a `Format` through).

  >>> import lowbit_jax as lb
  >>> lb.get_format("nvfp4").block
  (16,)
  """
  if isinstance(fmt, Format):
    return fmt
  if isinstance(fmt, str):
    try:
      return _FORMATS[fmt]
    except KeyError:
      raise ValueError(f"Unknown format {fmt!r}; valid names: {', '.join(_FORMATS)}.") from None
  raise TypeError(f"fmt must be a format name or a lowbit_jax.Format, got {type(fmt).__name__}.")
