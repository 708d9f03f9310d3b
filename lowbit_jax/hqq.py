"""HQQ: half-quadratic quantization of grouped asymmetric integer weights, with no calibration data.

Badri & Shaji (2023). For a group W with scale s and zero point z, the codes are Q = clamp(round(W / s + z)) and
the dequantized weights s (Q - z). HQQ minimises the lp error sum |W - s (Q - z)|^p with p < 1 (robust to the
few large errors that dominate a group) by splitting off the error E = W - s (Q - z) and alternating:

  E <- shrink_p(W - s (Q - z), beta)          proximal step of |E|^p: sign(e) max(|e| - |e|^(p-1) / beta, 0)
  z <- mean(Q - (W - E) / s)                  closed form for z given Q and E
  Q <- clamp(round(W / s + z))
  beta <- kappa * beta

With `optimize_scale`, the z step also refits s by least squares of W - E on Q (a line a Q + b: s = a, z = -b / a).
Every group keeps the best iterate of the solver and, after rounding s and z to their storage dtype, whichever of
that and round-to-nearest has the smaller lp error, so the result is never worse than round-to-nearest on the
objective (group by group) and is a standard QArray: codes, scales and zero points in the format's storage.
Zero points are real numbers here (stored in the scale dtype), not integers as round-to-nearest gives.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lowbit_jax import elements, scales
from lowbit_jax.formats import Format

__all__ = ["HQQ"]


@dataclasses.dataclass(frozen=True)
class HQQ:
  """Settings of the HQQ solver (module docstring); pass as `quantize(w, fmt, calibrate=lb.HQQ(...))`.

  Attributes:
    iters: solver iterations (>= 1).
    p: the lp exponent of the error, 0 < p <= 1 (HQQ's default 0.7).
    beta: initial weight of the quadratic split (> 0); kappa: its growth per iteration (>= 1).
    optimize_scale: refit the scales too, not only the zero points.

  Example:
    >>> import jax, lowbit_jax as lb
    >>> w = jax.random.normal(jax.random.key(0), (256, 64))
    >>> q = lb.quantize(w, "int4_g64_asym", axis=0, calibrate=lb.HQQ(iters=20))
    >>> q.format.name
    'int4_g64_asym'
  """

  iters: int = 20
  p: float = 0.7
  beta: float = 10.0
  kappa: float = 1.01
  optimize_scale: bool = False

  def __post_init__(self):
    if not isinstance(self.iters, int) or self.iters < 1:
      raise ValueError(f"HQQ: iters must be a positive integer, got {self.iters!r}.")
    if not 0 < self.p <= 1:
      raise ValueError(f"HQQ: p must be in (0, 1], got {self.p!r}.")
    if not self.beta > 0:
      raise ValueError(f"HQQ: beta must be positive, got {self.beta!r}.")
    if not self.kappa >= 1:
      raise ValueError(f"HQQ: kappa must be >= 1, got {self.kappa!r}.")

  def check(self, fmt: Format) -> None:
    """Raises ValueError unless HQQ applies to `fmt` (grouped asymmetric integers)."""
    if fmt.rule != "asym":
      raise ValueError(f"calibrate=HQQ applies to asymmetric integer formats (int*_asym); format {fmt.name!r} "
                       f"has {fmt.element} elements with {fmt.scale} scales"
                       f"{' and a zero point' if fmt.zero_point else ' and no zero point'}.")


def _lp(x, v, red, p):
  return jnp.sum(jnp.abs(x - v) ** p, axis=red, keepdims=True)


def _codes(x, s, z, top):
  return jnp.clip(jnp.round(elements.div(x, s) + z), 0, top)


def quantize_blocks(x, red, fmt: Format, cfg: HQQ):
  """(codes, scale, zero_point) of asymmetric integer blocks of float32 x (blocks along `red`), as
  `scales.asym` returns them, with zero points (and scales) chosen by HQQ."""
  top = 2 ** fmt.element_type.bits - 1
  dtype = jnp.dtype(fmt.scale)
  q0, s0, z0 = scales.asym(x, red, fmt.element_type, dtype)
  sf, zf = s0.astype(jnp.float32), z0.astype(jnp.float32)
  live = jnp.isfinite(sf) & (sf > 0)  # NaN blocks and all-zero blocks keep round-to-nearest
  xs = jnp.where(live, x, 0.0)
  s_init = jnp.where(live, sf, 1.0)

  def step(i, carry):
    s, z, q, beta, best = carry  # q: the codes under (s, z)
    e = xs - s * (q - z)
    e = jnp.sign(e) * jnp.maximum(jnp.abs(e) - jnp.abs(e) ** (cfg.p - 1) / beta, 0.0)
    t = xs - e
    if cfg.optimize_scale:
      qm, tm = jnp.mean(q, axis=red, keepdims=True), jnp.mean(t, axis=red, keepdims=True)
      cov = jnp.mean((q - qm) * (t - tm), axis=red, keepdims=True)
      var = jnp.mean((q - qm) ** 2, axis=red, keepdims=True)
      a = jnp.where(var > 0, cov / jnp.where(var > 0, var, 1.0), 0.0)
      s = jnp.where(a > 0, a, s)
      z = jnp.where(a > 0, qm - tm / s, z)
    else:
      z = jnp.mean(q - t / s, axis=red, keepdims=True)
    q = _codes(xs, s, z, top)
    err = _lp(xs, s * (q - z), red, cfg.p)
    better = err < best[0]
    best = (jnp.where(better, err, best[0]), jnp.where(better, s, best[1]), jnp.where(better, z, best[2]))
    return s, z, q, beta * cfg.kappa, best

  start = (_lp(xs, sf * (q0 - zf), red, cfg.p), s_init, zf)
  carry = (s_init, zf, _codes(xs, s_init, zf, top), jnp.float32(cfg.beta), start)
  *_, (_, s, z) = jax.lax.fori_loop(0, cfg.iters, step, carry)
  # Store s and z as the format does, recompute the codes with the stored values, keep the better of this and RTN.
  s, sq = scales._store(s, dtype)
  z = z.astype(dtype)
  zq = z.astype(jnp.float32)
  q = _codes(xs, sq, zq, top)
  better = live & (_lp(xs, sq * (q - zq), red, cfg.p) < start[0])
  return jnp.where(better, q, q0), jnp.where(better, s, s0), jnp.where(better, z, z0)
