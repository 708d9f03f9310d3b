"""Per-block scale search for MX and NVFP4 formats: `quantize(x, fmt, calibrate="mse" | "mae")`.

Round-to-nearest under the default scale is one candidate among a few; each block keeps the candidate whose
dequantized values are closest to the input in squared ("mse") or absolute ("mae") error, so the result is never
worse than the default on that objective, block by block, and it is a standard QArray with standard bits.

- MX: the exponents e - 1, e, e + 1 around the OCP (floor) exponent e. e + 1 stops the largest elements of a
  block from saturating (a floor scale can clip them to the element max); e - 1 gives the small elements a finer
  grid when a few large ones would pay for it.
- NVFP4 ("four over six"): the block max mapped to 6 (the default) or to 4 on the E2M1 grid; near the top, 4
  leaves the steps 3 -> 4 instead of 4 -> 6 of the scaled grid.

Ties keep the default scale. Errors are summed in float32 over the finite values of a block.
"""

from __future__ import annotations

import jax.numpy as jnp

from lowbit_jax import elements, scales
from lowbit_jax.formats import ElementType

__all__ = ["METRICS", "mx", "nvfp4"]

METRICS = ("mse", "mae")


def _error(x, v, red, metric: str):
  d = jnp.where(jnp.isfinite(x), x - v, 0.0)
  return jnp.sum(d * d if metric == "mse" else jnp.abs(d), axis=red, keepdims=True)


def _keep_best(best, cand):
  """Per block, the candidate (error, *arrays) with the smaller error; `best` wins ties."""
  better = cand[0] < best[0]
  return tuple(jnp.where(better, c, b) for b, c in zip(best, cand))


def mx(x, red, el: ElementType, metric: str):
  """MX elements and E8M0 scales with the exponent of each block searched over floor - 1, floor, floor + 1."""
  amax, finite = scales._amax(x, red)
  floor = scales.mx_exponent(amax, el, "floor")
  best = None
  for step in (0, -1, 1):
    e = jnp.where(scales._positive(amax), jnp.clip(floor + step, -127, 127), -127)
    q = scales.mx_elements(x, e, amax, finite, el)
    cand = (_error(x, elements.ldexp(q, jnp.broadcast_to(e, q.shape)), red, metric), q, e)
    best = cand if best is None else _keep_best(best, cand)
  _, q, e = best
  return q, scales.mx_scale(e, finite), None


def nvfp4(x, red, el: ElementType, g, metric: str):
  """NVFP4 elements and E4M3 block scales with each block's max mapped to 6 or to 4 (whichever is closer)."""
  best = None
  for top in (el.max, el.max * 2 / 3):
    q, s, _ = scales.nvfp4(x, red, el, g, top=top)
    cand = (_error(x, q * s.astype(jnp.float32) * g, red, metric), q, s)
    best = cand if best is None else _keep_best(best, cand)
  _, q, s = best
  return q, s, None
