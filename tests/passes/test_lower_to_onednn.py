import pytest
import torch
import torch.nn as nn

from graphopt.kernels.activations import ACTS as ACTIVATION_TABLE
from graphopt.kernels.activations import EXAMPLES
from graphopt.kernels.reference import parse_act
from graphopt.passes.fuse_conv_act import fuse_conv_act
from graphopt.passes.fuse_linear_act import fuse_linear_act
from graphopt.passes.lib.onednn import CONV, CONV_ADD, LINEAR, MKL_LINEAR
from graphopt.passes.lower_to_onednn import lower_to_onednn
from tests.helpers import apply, close, graphopt_calls, traced


def _module(act: str) -> nn.Module:
    """The nn.Module spelling of an act string, e.g. 'hardtanh:-0.5:0.75' -> nn.Hardtanh(-0.5, 0.75)."""
    name, params = parse_act(act)
    cls = next(iter(ACTIVATION_TABLE[name].modules), nn.Identity)
    return cls(*(p if p == "tanh" else float(p) for p in params))


ACTS = [_module(act) for act in EXAMPLES]  # every activation (kernels/activations.py), as a module


class ConvRes(nn.Module):
    def __init__(self, act, residual):
        super().__init__()
        self.conv, self.act, self.residual = nn.Conv2d(6, 6, 3, padding=1, groups=2), act, residual

    def forward(self, x):
        y = self.conv(x)
        return self.act(y + x if self.residual else y)


def _fused(model, x):
    gm = traced(model, x)
    apply(fuse_conv_act, gm, x)
    apply(fuse_linear_act, gm, x)
    return gm


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("act", ACTS, ids=lambda a: repr(a))
@pytest.mark.parametrize("residual", [False, True])
def test_conv_lowering_four_ways(act, residual):
    m, x = ConvRes(act, residual).eval(), torch.randn(2, 6, 7, 9)
    x[0, 0, 1, 1] = float("nan")
    if not isinstance(act, nn.GELU):  # eager's own GELU of +-inf depends on the layout (README: guarantees)
        x[1, 2, 3, 3], x[0, 3, 0, 0] = float("inf"), -float("inf")
    gm = _fused(m, x)
    assert apply(lower_to_onednn, gm, x) == 1
    assert not graphopt_calls(gm, "conv2d_act")
    assert (CONV_ADD if residual else CONV) in _targets(gm)
    with torch.no_grad():
        close(gm(x), m(x), equal_nan=True)                       # NaN and inf where eager has them
        close(gm(x[:1]), m(x[:1]), equal_nan=True)               # another batch size
    assert apply(lower_to_onednn, gm, x) == 0


@pytest.mark.parametrize("features", [(12, 7), (256, 128), (512, 256), (1024, 1024)])
@pytest.mark.parametrize("rows", [2, 3, 2 * 9])
@pytest.mark.parametrize("act", [nn.Identity(), nn.ReLU(), nn.GELU(), nn.SiLU()], ids=repr)
@pytest.mark.parametrize("mkl", [True, False], ids=["mkl-fast", "mkl-slow-or-absent"])
def test_linear_lowering(features, rows, act, mkl, monkeypatch):
    """Where MKL's GEMM is the fast one (an Intel CPU), large linears run on it and the rest on aten; elsewhere
    oneDNN's primitive takes every linear of ONEDNN_MACS multiply-adds or more."""
    from graphopt.kernels import cpu
    from graphopt.passes.lower_to_onednn import FEW_ROWS, ONEDNN_MACS, SMALL_LINEAR

    if mkl and not cpu.has_mkl_linear():
        pytest.skip("this torch build has no MKL")
    monkeypatch.setattr(cpu, "mkl_gemm_fast", lambda: mkl)
    m = nn.Sequential(nn.Linear(*features), act).eval()
    x = torch.randn(rows // 9 if rows > FEW_ROWS else rows, *([9] if rows > FEW_ROWS else []), features[0])
    x.view(-1)[0] = float("nan")
    gm = _fused(m, x)
    assert apply(lower_to_onednn, gm, x) == 1
    assert not graphopt_calls(gm, "linear_act")
    weight_size = features[0] * features[1]
    packed = weight_size >= SMALL_LINEAR and rows > FEW_ROWS if mkl else rows * weight_size >= ONEDNN_MACS
    assert (MKL_LINEAR in _targets(gm)) == (packed and mkl)  # MKL's packed GEMM where it is the fast one
    assert (LINEAR in _targets(gm)) == (packed and not mkl)  # oneDNN's primitive elsewhere
    assert (torch.nn.functional.linear in _targets(gm)) == (not packed)
    if packed:  # the weight packed once, for the traced rows
        weights = [n for n in gm.graph.nodes if n.op == "get_attr"]
        suffix = "_mkl" if mkl else "_onednn"
        assert [getattr(gm, n.target).is_mkldnn for n in weights if n.target.endswith(suffix)] == [True]
    with torch.no_grad():
        close(gm(x), m(x), equal_nan=True)
        other = torch.randn(5, *x.shape[1:])  # (other rows run on the packed weight too)
        close(gm(other), m(other))
    assert apply(lower_to_onednn, gm, x) == 0


@pytest.mark.parametrize("vendor, fast", [("GenuineIntel", True), (None, True), ("AuthenticAMD", False),
                                          ("HygonGenuine", False)])
def test_mkls_gemm_is_chosen_only_on_intel_cpus_or_where_the_vendor_is_unknown(vendor, fast, monkeypatch):
    """MKL runs its AVX-512 kernels on Intel CPUs only (kernels/cpu.py: mkl_gemm_fast), and without MKL never."""
    from graphopt.kernels import cpu
    from graphopt.passes.lower_to_onednn import linear_kernel

    monkeypatch.setattr(cpu, "cpu_vendor", lambda: vendor)
    for has_mkl in (True, False):
        monkeypatch.setattr(cpu, "has_mkl_linear", lambda has_mkl=has_mkl: has_mkl)
        assert cpu.mkl_gemm_fast() is (fast and has_mkl)
        kernel = linear_kernel(torch.empty(3072, 768), 128, "gelu")  # (GPT-2's MLP at 128 tokens)
        assert kernel == ("mkl" if fast and has_mkl else "onednn")


def test_the_cpu_vendor_and_flags_are_read_from_proc_cpuinfo_or_the_platform(monkeypatch, tmp_path):
    from graphopt.kernels import cpu

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512f\n\n"
                    "processor\t: 1\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512f\n")
    monkeypatch.setattr(cpu.platform, "processor", lambda: "Intel64 Family 6 Model 85 Stepping 7, GenuineIntel")
    read = cpu._cpuinfo.__wrapped__  # (uncached)
    assert read(str(info)) == ("AuthenticAMD", {"fpu", "avx2", "avx512f"})
    assert read(str(tmp_path / "absent")) == ("GenuineIntel", set())  # (no /proc/cpuinfo: Windows names it)


@pytest.mark.parametrize("avx512", [True, False], ids=["avx512", "avx2"])
@pytest.mark.parametrize("rows", [16, 512])
@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU()], ids=repr)
def test_mkl_runs_a_linear_with_its_activation_in_place_after_it_but_gelu_tanh_keeps_onednns_postop(act, rows, avx512,
                                                                                                   monkeypatch):
    """MKL's GEMM and torch's in-place activation beat oneDNN's GEMM with the activation as a post-op, on few rows
    and many, except for GELU's tanh form (POSTOP_FASTER) where oneDNN has AVX-512."""
    from graphopt.kernels import cpu

    if not cpu.has_mkl_linear():
        pytest.skip("this torch build has no MKL")
    monkeypatch.setattr(cpu, "mkl_gemm_fast", lambda: True)  # (as on an Intel CPU)
    monkeypatch.setattr(cpu, "onednn_avx512", lambda: avx512)
    m, x = nn.Sequential(nn.Linear(256, 256), act).eval(), torch.randn(rows, 256)
    x[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    gm = _fused(m, x)
    assert apply(lower_to_onednn, gm, x) == 1
    on_onednn = isinstance(act, nn.GELU) and act.approximate == "tanh" and avx512
    assert (LINEAR in _targets(gm)) == on_onednn and (MKL_LINEAR in _targets(gm)) == (not on_onednn)
    if on_onednn:
        (call,) = [n for n in gm.graph.nodes if n.target is LINEAR]
        assert call.args[3:] == ("gelu", [], "tanh")  # (the post-op)
    else:  # the activation in place on MKL's output
        (gemm,) = [n for n in gm.graph.nodes if n.target is MKL_LINEAR]
        (after,) = gemm.users
        assert after.target is torch.ops.aten.gelu_.default if isinstance(act, nn.GELU) else after.kwargs["inplace"]
    with torch.no_grad():
        close(gm(x), m(x), equal_nan=True)
    assert apply(lower_to_onednn, gm, x) == 0


def test_float64_graph_keeps_the_portable_op():
    m = ConvRes(nn.ReLU(), False).double().eval()
    x = torch.randn(1, 6, 5, 5, dtype=torch.float64)
    gm = _fused(m, x)
    assert apply(lower_to_onednn, gm, x) == 0
    assert graphopt_calls(gm, "conv2d_act")


def test_weights_given_at_run_time_keep_the_portable_op():
    class M(nn.Module):
        def forward(self, x, w):
            return torch.relu(torch.conv2d(x, w, None, 1, 1))

    m, x, w = M().eval(), torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3)
    gm = traced(m, x, w)
    apply(fuse_conv_act, gm, x, w)
    assert apply(lower_to_onednn, gm, x, w) == 0
    close(gm(x, w), m(x, w))
