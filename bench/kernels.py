"""Microbenchmarks of the fused ops on real layer shapes.

    python bench/kernels.py [--quick] [--dtype float16]        (or: graphopt bench kernels)

On a CUDA GPU: graphopt's Triton kernel against eager PyTorch (cuDNN / cuBLAS, then the bias,
residual and activation as separate ops) and torch.compile(mode="max-autotune") of that same
eager function, timed with triton.testing.do_bench; TFLOP/s and the fraction of the device's
dense peak. On the CPU: what graphopt's lowering runs (passes/lower_to_onednn.py: oneDNN convolutions on
reordered weights with post-ops; linears on MKL's packed GEMM, oneDNN's primitive or aten::linear, by
size and activation) against the aten reference, timed in interleaved rounds
(graphopt.compiler.workflow.timing), and for a large linear the other packed GEMM (MKL's or oneDNN's)
beside it. Writes
bench/results/kernels-<device>-<date>.json and a PNG chart.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graphopt.compiler.workflow.timing import median_ms  # noqa: E402
from graphopt.kernels import cpu, reference  # noqa: E402
from graphopt.passes.lower_to_onednn import linear_kernel  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# name: (N, C, H, W, K, kernel, stride, padding, groups, act, residual)
CONVS = {
    "resnet18.conv1 7x7/2": (1, 3, 224, 224, 64, 7, 2, 3, 1, "relu", False),
    "resnet18.layer1 3x3": (1, 64, 56, 56, 64, 3, 1, 1, 1, "relu", True),
    "resnet18.layer3 3x3": (1, 256, 14, 14, 256, 3, 1, 1, 1, "relu", True),
    "resnet18.layer4 3x3": (1, 512, 7, 7, 512, 3, 1, 1, 1, "relu", False),
    "resnet18.layer1 3x3 b32": (32, 64, 56, 56, 64, 3, 1, 1, 1, "relu", True),
    "mobilenetv2 expand 1x1": (1, 24, 56, 56, 144, 1, 1, 0, 1, "relu6", False),
    "mobilenetv2 depthwise 3x3": (1, 144, 56, 56, 144, 3, 1, 1, 144, "relu6", False),
}
# name: (M, K, N, act)
LINEARS = {
    "ffn.fc1 (4x128 tokens)": (512, 512, 2048, "gelu"),
    "ffn.fc2 (4x128 tokens)": (512, 2048, 512, "none"),
    "ffn.fc1 (32x512 tokens)": (16384, 1024, 4096, "gelu"),
    "classifier b1": (1, 512, 1000, "none"),
}
PEAK_TFLOPS = {  # dense, per dtype, from the vendors' data sheets
    "H100": {"float32": 67.0, "float16": 989.0, "bfloat16": 989.0},
    "H200": {"float32": 67.0, "float16": 989.0, "bfloat16": 989.0},
    "A100": {"float32": 19.5, "float16": 312.0, "bfloat16": 312.0},
}


def conv_flops(n, c, h, w, k, r, s, p, g) -> float:
    out_h, out_w = (h + 2 * p - r) // s + 1, (w + 2 * p - r) // s + 1
    return 2.0 * n * k * out_h * out_w * (c // g) * r * r


def cpu_rows(quick: bool) -> list[dict]:
    rows, reps = [], 5 if quick else 30
    for name, (n, c, h, w, k, r, s, p, g, act, res) in CONVS.items():
        if quick and n > 1:
            continue
        x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
        weight, bias = torch.randn(k, c // g, r, r) * 0.1, torch.randn(k)
        args = ([s, s], [p, p], [1, 1], g)
        residual = reference.conv2d_act(x, weight, bias, *args, "none", None) if res else None
        packed = cpu.pack_conv_weight(weight, [p, p], [s, s], [1, 1], g, list(x.shape))
        post = cpu.onednn_postop(act)
        after = cpu.inplace_act(act) if post is None or res else None

        def graphopt_cpu():
            if residual is None:
                attr, scalars, algo = post or ("none", [], "")
                y = torch.ops.mkldnn._convolution_pointwise(x, packed, bias, [p, p], [s, s], [1, 1], g, attr,
                                                             scalars, algo)
            else:
                y = torch.ops.mkldnn._convolution_pointwise.binary(x, residual, packed, bias, [p, p], [s, s], [1, 1],
                                                                    g, "add", None, None, [], None)
            return after[0](y, *after[1], **after[2]) if after else y

        ms = median_ms({"reference": lambda: reference.conv2d_act(x, weight, bias, *args, act, residual),
                        "graphopt": graphopt_cpu}, rounds=reps)
        ref_ms, opt_ms = ms["reference"], ms["graphopt"]
        gflop = conv_flops(n, c, h, w, k, r, s, p, g) / 1e9
        rows.append({"op": "conv2d_act", "shape": name, "reference_ms": ref_ms, "graphopt_ms": opt_ms,
                     "graphopt_gflops": gflop / opt_ms * 1e3, "speedup": ref_ms / opt_ms})
    for name, (m, k, n, act) in LINEARS.items():
        if quick and m > 1024:
            continue
        x, w, b = torch.randn(m, k), torch.randn(n, k) * 0.05, torch.randn(n)
        kernel = linear_kernel(w, m, act)  # what the lowering runs it on (passes/lower_to_onednn.py)
        timed = {"reference": lambda: reference.linear_act(x, w, b, act),
                 "graphopt": _lowered_linear(kernel, x, w, b, act)}
        if kernel == "mkl" or cpu.has_mkl_linear() and kernel == "onednn":  # (the other packed GEMM, beside it)
            timed["other"] = _lowered_linear("onednn" if kernel == "mkl" else "mkl", x, w, b, act)
        ms = median_ms(timed, rounds=reps)
        ref_ms, opt_ms = ms["reference"], ms["graphopt"]
        rows.append({"op": "linear_act", "shape": name, "kernel": kernel, "reference_ms": ref_ms, "graphopt_ms": opt_ms,
                     "graphopt_gflops": 2.0 * m * k * n / 1e9 / opt_ms * 1e3, "speedup": ref_ms / opt_ms,
                     "other_kernel_ms": ms.get("other")})
    return rows


def _lowered_linear(kernel: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, act: str):
    """A linear with its activation as the lowering writes it on ``kernel`` (weights packed once, here)."""
    after = cpu.inplace_act(act)

    def then_act(y):
        return after[0](y, *after[1], **after[2]) if after else y
    rows = x.shape[0]
    if kernel == "mkl":
        packed = cpu.pack_linear_weight_mkl(w, rows)
        return lambda: then_act(torch.ops.mkl._mkl_linear(x, packed, w, b, rows))
    if kernel == "onednn":
        packed, post = cpu.pack_linear_weight(w, rows), cpu.onednn_postop(act)
        if post is None:
            return lambda: then_act(torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], ""))
        return lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, *post)
    return lambda: then_act(F.linear(x, w, b))


def gpu_rows(dtype: torch.dtype, quick: bool) -> list[dict]:
    import triton.testing

    import graphopt.kernels.triton as kt
    name = torch.cuda.get_device_name()
    peak = next((v[str(dtype).removeprefix("torch.")] for key, v in PEAK_TFLOPS.items() if key in name), None)
    rows = []

    def eager_conv(x, w, b, s, p, g, act, r):
        y = F.conv2d(x, w, None, s, p, 1, g) + b[None, :, None, None]
        return reference.apply_act(y + r if r is not None else y, act)

    def eager_linear(x, w, b, act):
        return reference.apply_act(x @ w.t() + b, act)

    compiled_conv = torch.compile(eager_conv, mode="max-autotune", dynamic=False)
    compiled_linear = torch.compile(eager_linear, mode="max-autotune", dynamic=False)
    for shape, (n, c, h, w_, k, r, s, p, g, act, res) in CONVS.items():
        x = torch.randn(n, c, h, w_, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
        wt, b = torch.randn(k, c // g, r, r, device="cuda", dtype=dtype) * 0.1, torch.randn(k, device="cuda",
                                                                                          dtype=dtype)
        resid = eager_conv(x, wt, b, s, p, g, "none", None) if res else None
        from graphopt.kernels.triton.conv2d_act import prepare_weight

        wg = prepare_weight(wt, g)
        times = {
            "triton": triton.testing.do_bench(lambda: kt.conv2d_act(x, wt, b, [s, s], [p, p], [1, 1], g, act, resid,
                                                                    w_gemm=wg)),
            "eager": triton.testing.do_bench(lambda: eager_conv(x, wt, b, s, p, g, act, resid)),
        }
        if not quick:
            times["compile_max_autotune"] = triton.testing.do_bench(lambda: compiled_conv(x, wt, b, s, p, g, act,
                                                                                          resid))
        flops = conv_flops(n, c, h, w_, k, r, s, p, g)
        rows.append(_gpu_row("conv2d_act", shape, dtype, flops, times, peak))
    for shape, (m, k, n, act) in LINEARS.items():
        x, w, b = (torch.randn(m, k, device="cuda", dtype=dtype), torch.randn(n, k, device="cuda", dtype=dtype) * 0.05,
                   torch.randn(n, device="cuda", dtype=dtype))
        times = {"triton": triton.testing.do_bench(lambda: kt.linear_act(x, w, b, act)),
                 "eager": triton.testing.do_bench(lambda: eager_linear(x, w, b, act))}
        if not quick:
            times["compile_max_autotune"] = triton.testing.do_bench(lambda: compiled_linear(x, w, b, act))
        rows.append(_gpu_row("linear_act", shape, dtype, 2.0 * m * k * n, times, peak))
    return rows


def gpu_int8_rows() -> list[dict]:
    """graphopt's int8 GEMM (int32 accumulation, requantizing epilogue) against fp16 cuBLAS."""
    import triton.testing

    import graphopt.kernels.triton as kt
    rows = []
    for m, k, n in ((4096, 4096, 4096), (8192, 8192, 8192), (16384, 1024, 4096), (512, 512, 2048)):
        xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
        wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
        scale, bias = torch.full((n,), 1e-4, device="cuda"), torch.zeros(n, device="cuda")
        xh, wh = xq.half(), wq.half()
        times = {"triton_int8": triton.testing.do_bench(lambda: kt.qlinear_act(xq, 0.02, 0, wq, scale, bias, "relu",
                                                                               0.05, 0)),
                 "cublas_fp16": triton.testing.do_bench(lambda: torch.relu(xh @ wh.t()))}
        rows.append({"op": "qlinear_act", "shape": f"{m}x{k}x{n}", "ms": times,
                     "int8_tops": 2.0 * m * k * n / (times["triton_int8"] * 1e-3) / 1e12,
                     "fp16_over_int8": times["cublas_fp16"] / times["triton_int8"]})
    return rows


def _gpu_row(op, shape, dtype, flops, times, peak) -> dict:
    tflops = flops / (times["triton"] * 1e-3) / 1e12
    return {"op": op, "shape": shape, "dtype": str(dtype).removeprefix("torch."), "ms": times,
            "triton_tflops": tflops, "fraction_of_peak": tflops / peak if peak else None,
            "vs_eager": times["eager"] / times["triton"],
            "vs_compile": times["compile_max_autotune"] / times["triton"] if "compile_max_autotune" in times else None}


def table(rows: list[dict]) -> str:
    if rows and "reference_ms" in rows[0]:
        out = ["| op | shape | graphopt's kernel | reference ms | graphopt ms | GFLOP/s | speedup | other GEMM ms |",
               "|---|---|---|---:|---:|---:|---:|---:|"]
        out += [f"| {r['op']} | {r['shape']} | {r.get('kernel', 'onednn')} | {r['reference_ms']:.3f} | "
                f"{r['graphopt_ms']:.3f} | {r['graphopt_gflops']:.1f} | {r['speedup']:.2f} | "
                f"{'' if r.get('other_kernel_ms') is None else format(r['other_kernel_ms'], '.3f')} |" for r in rows]
        return "\n".join(out)
    out = ["| op | shape | dtype | triton ms | eager ms | compile ms | TFLOP/s | of peak | eager / triton |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        t = r["ms"]
        frac = f"{r['fraction_of_peak']:.0%}" if r["fraction_of_peak"] else "n/a"
        comp = f"{t['compile_max_autotune']:.3f}" if "compile_max_autotune" in t else "n/a"
        out.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {t['triton']:.3f} | {t['eager']:.3f} | {comp} | "
                   f"{r['triton_tflops']:.1f} | {frac} | {r['vs_eager']:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dtype", default="all", help="GPU only: float32, float16, bfloat16 or all")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if torch.cuda.is_available():
        dtypes = [torch.float32, torch.float16, torch.bfloat16] if args.dtype == "all" else [getattr(torch, args.dtype)]
        rows = [row for d in dtypes for row in gpu_rows(d, args.quick)]
        int8 = gpu_int8_rows()
        device = torch.cuda.get_device_name().replace(" ", "-")
    else:
        rows, int8, device = cpu_rows(args.quick), [], "cpu"
    text = table(rows)
    print(text)
    for r in int8:
        print(f"int8 GEMM {r['shape']}: {r['ms']['triton_int8']:.3f} ms ({r['int8_tops']:.0f} TOP/s), "
              f"fp16 cuBLAS {r['ms']['cublas_fp16']:.3f} ms: {r['fp16_over_int8']:.2f}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"kernels-{device}-{datetime.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows,
                                                     "int8": int8, "table": text}, indent=1) + "\n")
    try:
        _plot(rows, stem.with_suffix(".png"))
    except ImportError:
        pass
    return 0


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['shape']}" + (f" {r['dtype']}" if "dtype" in r else "") for r in rows]
    values = [r["speedup"] if "speedup" in r else r["vs_eager"] for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(rows) + 1))
    ax.barh(labels, values, color="#2563eb")
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("speedup of graphopt's kernel (higher is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
