"""What the numbers were measured on: instruction set, threads, versions."""

from __future__ import annotations

import platform

import torch


def cpu_features() -> dict:
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = [name for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("VNNI", "avx512_vnni"),
                                   ("AMX", "amx_int8")) if flag in flags]
    return {
        "isa": isa,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "model": model,
        "isa_flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))),
        "torch": torch.__version__,
    }


def gemm_gflops(n: int = 2048, calls: int = 10) -> float:
    """The fp32 multiply-add rate this machine reaches on a large square matrix product, in GFLOP/s: the faster
    of torch's own matmul (MKL's on this build) and oneDNN's packed-weight linear (graphopt's GEMM), each the
    median of ``calls`` timed calls in interleaved rounds (graphopt.compiler.workflow.timing), on torch's
    threads. The ceiling a compute-bound model meets in every engine: a conv or linear layer runs no faster than
    a GEMM of its size (direct convolution, as oneDNN, ONNX Runtime's MLAS and OpenVINO run fp32 convs here,
    does the same arithmetic as its GEMM)."""
    from graphopt.compiler.workflow.timing import median_ms
    from graphopt.kernels.cpu import pack_linear_weight

    a, b = torch.randn(n, n), torch.randn(n, n)
    packed = pack_linear_weight(b, n)
    ms = median_ms({"torch": lambda: a @ b,
                    "onednn": lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")},
                   rounds=calls, warmup=2)
    return 2 * n ** 3 / min(ms.values()) / 1e6


def model_gflop(model: torch.nn.Module, x: torch.Tensor) -> float:
    """One call's arithmetic, in GFLOP (a multiply-add is 2): convolutions, matrix products and attention, as
    torch.utils.flop_counter counts them on an eager call."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 1e9
