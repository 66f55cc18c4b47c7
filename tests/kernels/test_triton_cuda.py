"""The Triton kernels compiled on a real GPU, in fp32 / fp16 / bf16 (run by bench/gpu_check.sh with
TRITON_INTERPRET=0; skipped where there is no CUDA device)."""

import os

import pytest
import torch

from graphopt.kernels.activations import EXAMPLES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs a CUDA device and TRITON_INTERPRET=0")

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=4e-2, atol=4e-2)}
ACTS = list(EXAMPLES)
CONVS = [  # (N, C, H, W, K, kernel, stride, padding, groups)
    (1, 3, 224, 224, 64, 7, 2, 3, 1), (2, 64, 56, 56, 64, 3, 1, 1, 1), (1, 144, 56, 56, 144, 3, 1, 1, 144),
    (3, 17, 13, 7, 33, 3, 2, 1, 1), (1, 24, 9, 9, 36, 1, 1, 0, 3),
]


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("case", CONVS)
def test_conv2d_act_on_cuda(dtype, case):
    import graphopt.kernels.triton as kt
    from graphopt.kernels import reference

    n, c, h, w, k, r, s, p, g = case
    x = torch.randn(n, c, h, w, device="cuda", dtype=dtype)
    weight = torch.randn(k, c // g, r, r, device="cuda", dtype=dtype) * (1.0 / (c // g * r * r)) ** 0.5
    bias = torch.randn(k, device="cuda", dtype=dtype)
    args = ([s, s], [p, p], [1, 1], g)
    y = reference.conv2d_act(x.float(), weight.float(), bias.float(), *args, "none", None)
    residual = torch.randn_like(y).to(dtype)
    for act in ACTS:
        want = reference.conv2d_act(x.float(), weight.float(), bias.float(), *args, act, residual.float())
        got = kt.conv2d_act(x, weight, bias, *args, act, residual)
        torch.testing.assert_close(got.float(), want, **TOL[dtype], msg=lambda m: f"{act}: {m}")


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("m,k,n", [(1, 512, 1000), (512, 512, 2048), (512, 2048, 512), (127, 129, 17)])
def test_linear_act_on_cuda(dtype, m, k, n):
    import graphopt.kernels.triton as kt
    from graphopt.kernels import reference

    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype) * k ** -0.5
    b = torch.randn(n, device="cuda", dtype=dtype)
    for act in ACTS:
        want = reference.linear_act(x.float(), w.float(), b.float(), act)
        torch.testing.assert_close(kt.linear_act(x, w, b, act).float(), want, **TOL[dtype])


def test_custom_ops_dispatch_cuda_tensors_to_triton():
    import graphopt.kernels.ops  # noqa: F401
    from graphopt import optimize
    from tests.helpers import randomize_bn
    from tests.zoo import ZOO

    make, inputs = ZOO["resnet_blocks"]
    model = randomize_bn(make()).eval().cuda()
    x = inputs(2).cuda()
    opt = optimize(model, (x,))
    assert opt.backend == "triton"
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("m,k,n", [(1, 512, 1000), (512, 2048, 512), (4096, 4096, 4096)])
def test_qlinear_act_on_cuda(m, k, n):
    import graphopt.kernels.triton as kt
    from graphopt.kernels import reference

    x = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    w_scale, bias = torch.rand(n, device="cuda") * 1e-3 + 1e-4, torch.randn(n, device="cuda")
    got = kt.qlinear_act(x, 0.02, 3, w, w_scale, bias, "relu", 0.05, -2)
    want = reference.qlinear_act(x.cpu(), 0.02, 3, w.cpu(), w_scale.cpu(), bias.cpu(), "relu", 0.05, -2)
    assert (got.cpu().int() - want.int()).abs().max() <= 1


def test_qconv2d_act_on_cuda():
    import graphopt.kernels.triton as kt
    from graphopt.kernels import reference

    x = torch.randint(-128, 128, (2, 64, 28, 28), dtype=torch.int8, device="cuda")
    w = torch.randint(-127, 128, (64, 64, 3, 3), dtype=torch.int8, device="cuda")
    w_scale, bias = torch.rand(64, device="cuda") * 1e-3 + 1e-4, torch.randn(64, device="cuda")
    args = ([1, 1], [1, 1], [1, 1], 1)
    got = kt.qconv2d_act(x, 0.02, -4, w, w_scale, bias, *args, "relu", None, 0.05, 0)
    want = reference.qconv2d_act(x.cpu(), 0.02, -4, w.cpu(), w_scale.cpu(), bias.cpu(), *args, "relu", None, 0.05, 0)
    assert (got.cpu().int() - want.int()).abs().max() <= 1
