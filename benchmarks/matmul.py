"""Weight-only quantized matmul on the GPU against XLA's own paths, measured in the same run.

For each (N, K) weight shape, activation rows M and weight format: the Pallas kernel's time, TFLOP/s, GB/s and
fraction of the roofline floor (REFERENCE section 4, bandwidth from a device copy timed in this run), and speed-ups
over XLA bf16 `jnp.dot`, XLA dequantize-then-dot and (mxfp8) `jax.nn.scaled_dot_general`; last, what `lb.matmul`
runs by default (the kernel below `lowbit_jax.dispatch.xla_from_m` rows, dequantize-then-dot from there) over bf16.

Usage:
  python benchmarks/matmul.py [--shapes 8192x8192,28672x8192] [--ms 1,16,64] [--formats mxfp4,int4_g128_sym]
  python benchmarks/matmul.py --sweep 16:64:256:4:4,16:128:128:4:3 ...   # time kernel tile configs instead
  python benchmarks/matmul.py --pairs int8_channel_sym:int8_channel_sym,mxfp8_e4m3:mxfp8_e4m3 --ms 2048,8192
  python benchmarks/matmul.py --k-major --ms 1,16,64 [--sweep 2:2:4:2,4:2:4:1]  # K-major weights: the Mosaic kernel
  python benchmarks/matmul.py --k-major --prepared ...   # the same, on weights from lb.prepare
  python benchmarks/matmul.py --check ...   # and check each timed call's output (`benchmarks.common.check`)
Shapes are N x K (output features x input features). `--pairs act:weight,...` times matmuls with both operands
quantized: pre-quantized, and with the activation quantized inside the call (`act_format`), against XLA bf16.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp

import lowbit_jax as lb
from benchmarks.common import BF16_PEAK, check, copy_bandwidth, header, time_calls
from lowbit_jax.dispatch import mx_mma_pair, xla_from_m
from pallas_kernels import Config, dequant_matmul
from pallas_kernels import dequant_gemv_mosaic
from pallas_kernels.backend import hopper_available

DEFAULT_FORMATS = ("mxfp4,nvfp4,int4_g128_sym,int4_g128_asym,int4_g32_sym,mxfp6_e2m3,mxfp6_e3m2,mxfp8_e4m3,"
                   "mxfp8_e5m2,int8_channel_sym")


def _weight_sets(count, make):
  return [make(jax.random.key(100 + i)) for i in range(count)]


def _xs(m, k):
  reps = 8 if m <= 256 else 2
  return [jax.random.normal(jax.random.key(i), (m, k), jnp.float32).astype(jnp.bfloat16) for i in range(reps)]


def _sdg(x, w_nk):
  cfg = jax.nn.get_scaled_dot_general_config("mxfp8")
  return jax.nn.scaled_dot_general(x, w_nk, (((1,), (1,)), ((), ())), preferred_element_type=jnp.bfloat16,
                                   configs=[cfg, cfg, cfg])


def _cases(args):
  """(n, k, m, activations, bf16 weights) for every shape and M of the command line."""
  for shape in args.shapes.split(","):
    n, k = map(int, shape.split("x"))
    for m in map(int, args.ms.split(",")):
      xs = _xs(m, k)
      yield n, k, m, xs, _weight_sets(len(xs), lambda key: (jax.random.normal(key, (k, n), jnp.float32) * 0.02)
                                      .astype(jnp.bfloat16))


def _config(text: str) -> Config:
  """bm:bn:bk:warps:stages[:split_k]."""
  return Config(*map(int, text.split(":")))


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--shapes", default="8192x8192,28672x8192,8192x28672")
  p.add_argument("--ms", default="1,16,64,128,256,2048,8192")
  p.add_argument("--formats", default=DEFAULT_FORMATS)
  p.add_argument("--sweep", default="", help="bm:bn:bk:warps:stages[:split_k],... to time kernel configs")
  p.add_argument("--backend", default="pallas", help="'interpret' for a dry run of this script on a CPU")
  p.add_argument("--pairs", default="", help="act:weight format pairs, comma-separated (both operands quantized)")
  p.add_argument("--k-major", action="store_true", help="K-major (N, K) weights: the Mosaic GPU kernel")
  p.add_argument("--prepared", action="store_true",
                 help="with --k-major or --pairs: the kernel reads lb.prepare's layout")
  p.add_argument("--check", action="store_true",
                 help="a last column checks the first timed call's output: the same twice, and near the float32 dot")
  args = p.parse_args()
  if args.pairs:
    return pairs(args)
  if args.k_major:
    return k_major(args)
  bw = copy_bandwidth()
  print(header())
  print(f"device copy: {bw / 1e9:.0f} GB/s; floor = max(bytes / copy bandwidth, 2MNK / {BF16_PEAK / 1e12:.0f} "
        "TFLOP/s); speed-ups are XLA time / kernel time from this run\n")
  sweep = [_config(c) for c in args.sweep.split(",") if c]
  if sweep:
    print("| format | M | N | K | bm:bn:bk:warps:stages:split_k | us | of floor |")
    print("|---|---|---|---|---|---|---|")
  else:
    print("| format | M | N | K | kernel us | TFLOP/s | GB/s | of floor | vs bf16 dot | vs dequant+dot | "
          "vs scaled_dot_general | lb.matmul vs bf16 dot |" + " check |" * args.check)
    print("|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * args.check)
  for n, k, m, xs, bf16_ws in _cases(args):
    t_bf16 = None if sweep else time_calls(jnp.dot, xs, bf16_ws)
    t_sdg = None
    for name in args.formats.split(","):
      qws = [lb.quantize(w, name, axis=0) for w in bf16_ws]
      nbytes = qws[0].nbytes + 2 * m * k + 2 * m * n
      floor = max(nbytes / bw, 2 * m * n * k / BF16_PEAK)
      if sweep:
        for cfg in sweep:
          try:
            t = time_calls(lambda x, w, cfg=cfg: dequant_matmul(
                x, w, config=cfg, backend="triton" if args.backend == "pallas" else args.backend), xs, qws)
            tiles = f"{cfg.bm}:{cfg.bn}:{cfg.bk}:{cfg.num_warps}:{cfg.num_stages}:{cfg.split_k}"
            print(f"| {name} | {m} | {n} | {k} | {tiles} | {t * 1e6:.1f} | {floor / t:.2f} |", flush=True)
          except Exception as e:  # a config that does not compile (e.g. too much shared memory) is reported
            print(f"| {name} | {m} | {n} | {k} | {cfg} | failed: {type(e).__name__} | |", flush=True)
        continue
      kernel = lambda x, w: lb.matmul(x, w, backend=args.backend)
      t_k = time_calls(kernel, xs, qws)
      t_x = time_calls(lambda x, w: lb.matmul(x, w, backend="xla"), xs, qws)
      sdg = ""
      if name.startswith("mxfp8_e4m3"):
        if t_sdg is None:
          try:
            t_sdg = time_calls(_sdg, xs, [jnp.transpose(w) for w in bf16_ws])
          except Exception as e:  # not lowered on every platform (e.g. CPU)
            t_sdg = f"n/a ({type(e).__name__})"
        sdg = f"{t_sdg / t_k:.2f}x" if isinstance(t_sdg, float) else t_sdg
      t_d = t_x if m >= xla_from_m(lb.get_format(name)) else t_k  # what lb.matmul's dispatch runs on a GPU
      print(f"| {name} | {m} | {n} | {k} | {t_k * 1e6:.1f} | {2 * m * n * k / t_k / 1e12:.1f} | "
            f"{nbytes / t_k / 1e9:.0f} | {floor / t_k:.2f} | {t_bf16 / t_k:.2f}x | {t_x / t_k:.2f}x | {sdg} | "
            f"{t_bf16 / t_d:.2f}x |" + _checked(args, kernel, xs[0], qws[0]), flush=True)
      del qws


def k_major(args) -> None:
  """Weight-only with K-major (N, K) weights, the layout of the Mosaic GPU kernel: its time, fraction of
  the floor (as in `main`) and speed-ups over XLA bf16, XLA dequantize-then-dot and `lb.matmul` on the same weights
  stored (K, N), all from this run. `--sweep split:groups:stages:tiles:wgs,...` times kernel configs instead;
  `--prepared` times the kernel on `lb.prepare`d weights (no per-call permutation of the activations)."""
  bw = copy_bandwidth()
  print(header())
  print(f"device copy: {bw / 1e9:.0f} GB/s; floor = max(bytes / copy bandwidth, 2MNK / {BF16_PEAK / 1e12:.0f} "
        "TFLOP/s)\n")
  sweep = [dequant_gemv_mosaic.Config(*map(int, c.split(":"))) for c in args.sweep.split(",") if c]
  print("| format | M | N | K | split:groups:stages:tiles:wgs | kernel us | GB/s | of floor | vs bf16 dot | "
        "vs dequant+dot | vs lb.matmul, (K, N) weights |" + " check |" * args.check)
  print("|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * args.check)
  dn = (((1,), (1,)), ((), ()))
  backend = "mosaic" if args.backend == "pallas" else "mosaic_interpret"
  for n, k, m, xs, bf16_ws in _cases(args):
    t_bf16 = time_calls(jnp.dot, xs, bf16_ws)
    for name in args.formats.split(","):
      qws = [lb.quantize(w.T, name, axis=1) for w in bf16_ws]
      kws = [lb.prepare(q) for q in qws] if args.prepared else qws
      label = name + (" (prepared)" if args.prepared else "")
      nbytes = qws[0].nbytes + 2 * m * k + 2 * m * n
      floor = max(nbytes / bw, 2 * m * n * k / BF16_PEAK)
      bits = qws[0].format.element_type.bits
      for cfg in sweep or [dequant_gemv_mosaic.default_config(n, k, m, bits)]:
        c = ":".join(map(str, dataclasses.astuple(cfg)))
        kernel = lambda x, w, cfg=cfg: dequant_gemv_mosaic.dequant_gemv(x, w, config=cfg, backend=backend)
        try:
          t = time_calls(kernel, xs, kws)
        except ValueError as e:  # a config that does not tile the shape or fit shared memory is reported
          print(f"| {label} | {m} | {n} | {k} | {c} | failed: {e} |", flush=True)
          continue
        rest = ""
        if not sweep:
          t_x = time_calls(lambda x, w: lb.dot_general(x, w, dn, backend="xla"), xs, qws)
          kn = [lb.quantize(w, name, axis=0) for w in bf16_ws]
          t_kn = time_calls(lambda x, w: lb.matmul(x, w, backend=args.backend), xs, kn)
          rest = f" {t_x / t:.2f}x | {t_kn / t:.2f}x |"
          del kn
        print(f"| {label} | {m} | {n} | {k} | {c} | {t * 1e6:.1f} | {nbytes / t / 1e9:.0f} | {floor / t:.2f} | "
              f"{t_bf16 / t:.2f}x |{rest or ' | |'}" + _checked(args, kernel, xs[0], kws[0], k_major=True),
              flush=True)
      del qws, kws


def _checked(args, fn, x, w, k_major: bool = False) -> str:
  """With --check, the row's check cell for fn(x, w) (`benchmarks.common.check`)."""
  return f" {check(fn, x, w, k_major)} |" if args.check else ""


def pairs(args) -> None:
  """Both operands quantized (A8W8, A8W4, ...): time per call and speed-up over XLA bf16 from the same run.

  Rows: weights (K, N) as the weight-only benchmark stores them and, for int8, block FP8 and the weights the Mosaic
  kernel takes, K-major (N, K) weights (their MMAs read K-major; (K, N) weights pay a transpose per call; few rows
  of MX / NVFP4 activations stream K-major weights through the Mosaic kernel). "dispatch" is `lb.dot_general`'s
  choice (the int8 and block-FP8 kernels on a GPU), "XLA" forces the XLA path, "act_format" quantizes the bf16
  activation inside the call, "MMA kernel" forces the MX 8-bit pairs' FP8 / int8 MMA kernel (K-major weights; `auto`
  takes the bfloat16 route). With `--prepared`, weights the Mosaic kernel takes also run from `lb.prepare`."""
  print(header())
  print("| act x weight | weights | M | N | K | dispatch us | TFLOP/s | vs bf16 dot | XLA path vs bf16 | "
        "act_format vs bf16 | scaled_dot_general vs bf16 | vs XLA FP8 a @ b.T | MMA kernel vs bf16 |"
        + " check |" * args.check)
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * args.check)
  for n, k, m, xs, bf16_ws in _cases(args):
    t_bf16 = time_calls(jnp.dot, xs, bf16_ws)
    flops = 2 * m * n * k
    try:
      sdg = f"{t_bf16 / time_calls(_sdg, xs, [jnp.transpose(w) for w in bf16_ws]):.2f}x"
    except Exception as e:  # not lowered on every platform
      sdg = f"n/a ({type(e).__name__})"
    # XLA's per-tensor FP8 GEMM with K-major weights (its fastest FP8 layout, REFERENCE section 5)
    t_fp8 = time_calls(lambda a, b: jnp.einsum("mk,nk->mn", a, b, preferred_element_type=jnp.bfloat16),
                       [x.astype(jnp.float8_e4m3fn) for x in xs], [w.T.astype(jnp.float8_e4m3fn) for w in bf16_ws])
    for pair in args.pairs.split(","):
      fa, fw = pair.split(":")
      qxs = [lb.quantize(x, fa, axis=1) for x in xs]
      k_major = (fw in ("int8_channel_sym", "fp8_block_128x128")
                 or dequant_gemv_mosaic.supports(lb.get_format(fw), n, k) is None)
      layouts = [("(K, N)", 0)] + ([("(N, K)", 1)] if k_major else [])
      if args.prepared and dequant_gemv_mosaic.supports(lb.get_format(fw), n, k) is None:
        layouts.append(("(N, K) prepared", 1))
      two_d = len(lb.get_format(fw).block or ()) == 2
      for label, rc in layouts:
        qws = [lb.quantize(w if rc == 0 else w.T, fw, axis=1 if two_d or rc == 1 else 0) for w in bf16_ws]
        qws = [lb.prepare(q) for q in qws] if label.endswith("prepared") else qws
        dn = (((1,), (rc,)), ((), ()))
        kernel = lambda a, w, dn=dn: lb.dot_general(a, w, dn)
        t = time_calls(kernel, qxs, qws)
        t_x = time_calls(lambda a, w, dn=dn: lb.dot_general(a, w, dn, backend="xla"), qxs, qws)
        t_f = time_calls(lambda a, w, dn=dn, fa=fa: lb.dot_general(a, w, dn, act_format=fa), xs, qws)
        mma = "-"
        if label == "(N, K)" and mx_mma_pair(qxs[0], qws[0], dn) and hopper_available():
          mma = f"{t_bf16 / time_calls(lambda a, w, dn=dn: lb.dot_general(a, w, dn, backend='mosaic'), qxs, qws):.2f}x"
        print(f"| {fa} x {fw} | {label} | {m} | {n} | {k} | {t * 1e6:.0f} | {flops / t / 1e12:.0f} | "
              f"{t_bf16 / t:.2f}x | {t_bf16 / t_x:.2f}x | {t_bf16 / t_f:.2f}x | {sdg} | {t_fp8 / t:.2f}x | {mma} |"
              + _checked(args, kernel, qxs[0], qws[0], k_major=rc == 1), flush=True)
        del qws
      del qxs


if __name__ == "__main__":
  main()
