"""Would Winograd F(2x2, 3x3) beat oneDNN's direct 3x3 convolution here, written as torch ops?

    python bench/winograd.py [--quick]

The compute-bound rows of bench/models.py (ResNet-18, the ConvNet at batch 64) run at 91-99% of the
machine's fp32 GEMM rate in the fastest peer and in graphopt, all of whose engines run a 3x3 conv as direct
convolution. Winograd's
F(2x2, 3x3) computes each 2x2 output tile from a 4x4 input tile with 16 multiplies per input and output
channel pair instead of 36: 2.25x less arithmetic, in 16 GEMMs of (tiles x C) by (C x K), between an input
transform (B^T d B, additions only) and an output transform (A^T m A). This script times, on ResNet-18's
3x3 shapes (channels-last, bias and relu included, torch's threads: 2 on the development machine):

    direct     what graphopt runs: oneDNN's convolution on a weight packed once (kernels/cpu.py
               pack_conv_weight), relu as its post-op
    winograd   the transforms as strided torch adds / subtracts into preallocated buffers, the GEMMs as one bmm
    fused      the same, each transform one loop nest (torch.compile of it: Inductor's C++ code), bias and
               relu in the output transform's loop
    gemms      the bmm alone: what Winograd would cost with free transforms

each checked against the direct conv (torch.testing.assert_close: Winograd rounds differently, within
1e-4 relative here), in interleaved rounds (graphopt.compiler.workflow.timing), and writes
bench/results/winograd-<date>.json. It is a question for the next kernel, not part of graphopt: the
transforms need a fused kernel to pay (README: "How near the machine's ceiling").
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

from bench.machine import cpu_features  # noqa: E402
from graphopt.compiler.workflow.timing import median_ms  # noqa: E402
from graphopt.kernels import cpu  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {  # name: (N, C, H, W); K = C, 3x3, stride 1, padding 1
    "resnet18.layer1": (1, 64, 56, 56),
    "resnet18.layer2": (1, 128, 28, 28),
    "resnet18.layer3": (1, 256, 14, 14),
    "resnet18.layer4": (1, 512, 7, 7),
    "resnet18.layer1 b8": (8, 64, 56, 56),
}
G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])


def transformed_weight(weight: torch.Tensor) -> torch.Tensor:
    """(K, C, 3, 3) -> (16, C, K): G g G^T for every channel pair, one (C, K) matrix per tile position."""
    u = G @ weight @ G.T
    return u.reshape(weight.shape[0], weight.shape[1], 16).permute(2, 1, 0).contiguous()


def _b_transform(d0, d1, d2, d3, out) -> None:
    """B^T along one axis: (d0 - d2, d1 + d2, d2 - d1, d1 - d3) into out[0..3]."""
    torch.sub(d0, d2, out=out[0])
    torch.add(d1, d2, out=out[1])
    torch.sub(d2, d1, out=out[2])
    torch.sub(d1, d3, out=out[3])


def winograd_conv3x3_relu(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """relu(conv2d(x, w, bias, padding=1)) for x (N, H, W, C) contiguous, u = transformed_weight(w);
    returns (N, H, W, K)."""
    n, h, w, c = x.shape
    k = u.shape[2]
    th, tw = (h + 1) // 2, (w + 1) // 2
    xp = F.pad(x, (0, 0, 1, 2 * tw - w + 1, 1, 2 * th - h + 1))
    rows = torch.empty(4, n, th, xp.shape[2], c)
    _b_transform(*(xp[:, i:i + 2 * th:2] for i in range(4)), rows)
    v = torch.empty(16, n * th * tw, c)
    tiles = v.view(4, 4, n, th, tw, c)
    for i in range(4):
        _b_transform(*(rows[i][:, :, j:j + 2 * tw:2] for j in range(4)), tiles[i])
    m = torch.bmm(v, u).view(4, 4, n, th, tw, k)
    s = torch.empty(2, 4, n, th, tw, k)  # A^T along the first axis: (m0 + m1 + m2, m1 - m2 - m3)
    torch.add(m[0], m[1], out=s[0]).add_(m[2])
    torch.sub(m[1], m[2], out=s[1]).sub_(m[3])
    y = torch.empty(n, 2 * th, 2 * tw, k)
    for a in range(2):  # ... and along the second, into the output's even / odd columns
        y[:, a::2, 0::2].copy_(s[a][0]).add_(s[a][1]).add_(s[a][2])
        y[:, a::2, 1::2].copy_(s[a][1]).sub_(s[a][2]).sub_(s[a][3])
    return y[:, :h, :w].add_(bias).relu_()


def _input_transform(xp: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    """B^T d B of every 4x4 tile (stride 2) of the padded (N, 2th+2, 2tw+2, C) input: (16, N*th*tw, C)."""
    def bt(d0, d1, d2, d3):
        return d0 - d2, d1 + d2, d2 - d1, d1 - d3
    d = [[xp[:, i:i + 2 * th:2, j:j + 2 * tw:2] for j in range(4)] for i in range(4)]
    cols = [bt(d[0][j], d[1][j], d[2][j], d[3][j]) for j in range(4)]
    tiles = [v for i in range(4) for v in bt(cols[0][i], cols[1][i], cols[2][i], cols[3][i])]
    return torch.stack(tiles).reshape(16, xp.shape[0] * th * tw, xp.shape[3])


def _output_transform(m: torch.Tensor, bias: torch.Tensor, n: int, th: int, tw: int, h: int, w: int) -> torch.Tensor:
    """relu(A^T m A + bias) of the (16, N*th*tw, K) GEMM outputs: (N, H, W, K)."""
    m = m.view(4, 4, n, th, tw, m.shape[2])
    s0, s1 = m[0] + m[1] + m[2], m[1] - m[2] - m[3]
    rows = [torch.stack([s[0] + s[1] + s[2], s[1] - s[2] - s[3]], -2) for s in (s0, s1)]  # (n, th, tw, 2, k)
    y = torch.stack(rows, 2).reshape(n, 2 * th, 2 * tw, -1)[:, :h, :w]
    return torch.relu(y + bias)


_fused_in, _fused_out = torch.compile(_input_transform, dynamic=False), torch.compile(_output_transform, dynamic=False)


def winograd_fused(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """winograd_conv3x3_relu with each transform compiled into one loop nest."""
    n, h, w, _ = x.shape
    th, tw = (h + 1) // 2, (w + 1) // 2
    xp = F.pad(x, (0, 0, 1, 2 * tw - w + 1, 1, 2 * th - h + 1))
    return _fused_out(torch.bmm(_fused_in(xp, th, tw), u), bias, n, th, tw, h, w)


def bench_shape(shape: tuple, rounds: int, per_round: int) -> dict:
    torch.manual_seed(0)
    n, c, h, w = shape
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(c, c, 3, 3) * (2.0 / (9 * c)) ** 0.5, torch.randn(c) * 0.1
    u, nhwc = transformed_weight(weight), x.permute(0, 2, 3, 1)
    want = torch.relu(F.conv2d(x, weight, bias, padding=1))
    got = winograd_conv3x3_relu(nhwc, u, bias).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    torch.testing.assert_close(winograd_fused(nhwc, u, bias).permute(0, 3, 1, 2), want, rtol=1e-4,
                               atol=1e-4 * float(want.abs().max()))
    v = torch.randn(16, n * ((h + 1) // 2) * ((w + 1) // 2), c)
    packed, (attr, scalars, algo) = cpu.pack_conv_weight(weight, [1, 1], [1, 1], [1, 1], 1, list(shape)), ("relu",
                                                                                                         [], "")
    direct = torch.ops.mkldnn._convolution_pointwise(x, packed, bias, [1, 1], [1, 1], [1, 1], 1, attr, scalars, algo)
    torch.testing.assert_close(direct, want)
    fns = {"direct": lambda: torch.ops.mkldnn._convolution_pointwise(x, packed, bias, [1, 1], [1, 1], [1, 1], 1, attr,
                                                                      scalars, algo),
           "winograd": lambda: winograd_conv3x3_relu(nhwc, u, bias),
           "fused": lambda: winograd_fused(nhwc, u, bias),
           "gemms": lambda: torch.bmm(v, u)}
    ms = median_ms(fns, rounds=rounds, per_round=per_round)
    return {"shape": list(shape), "median_ms": ms, "max_abs_diff": float((got - want).abs().max()),
            "gflop_direct": 2 * n * h * w * c * c * 9 / 1e9,
            "winograd_vs_direct": ms["winograd"] / ms["direct"], "fused_vs_direct": ms["fused"] / ms["direct"],
            "gemms_vs_direct": ms["gemms"] / ms["direct"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    rounds, per_round = (2, 2) if args.quick else (15, 10)
    rows = {}
    with torch.no_grad():
        for name, shape in SHAPES.items():
            rows[name] = bench_shape(shape, rounds, per_round)
            r = rows[name]
            ms = r["median_ms"]
            print(f"{name:20s} direct {ms['direct']:.3f} ms, winograd {ms['winograd']:.3f} "
                  f"({r['winograd_vs_direct']:.2f}x), fused {ms['fused']:.3f} ({r['fused_vs_direct']:.2f}x), "
                  f"its GEMMs alone {ms['gemms']:.3f} ({r['gemms_vs_direct']:.2f}x)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"winograd-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps({"machine": cpu_features(), "rounds": rounds, "per_round": per_round,
                                "results": rows}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
