"""The activation table (kernels/activations.py) is complete and consistent, and each form it names
computes the reference's numbers: the in-place form, the oneDNN post-ops (fp32 and int8) and the
Triton code. The other kernel tests sweep ``EXAMPLES``, so a new record is tested everywhere."""

import math

import pytest
import torch
import torch.nn.functional as F

from graphopt.kernels import activations, cpu, reference
from graphopt.kernels.activations import ACTS, EXAMPLES, TABLE, TRITON_CODES
from graphopt.kernels.reference import apply_act, parse_act

# the post-op attrs torch's oneDNN ops accept (aten/src/ATen/native/mkldnn: fusion_unary_attr_map and the
# int8 ops' checks); the lowerings pass these strings through
ONEDNN_FP32_ATTRS = {"none", "relu", "sigmoid", "tanh", "hardswish", "swish", "leaky_relu", "hardtanh", "gelu"}
ONEDNN_QCONV_ATTRS = {"none", "relu", "hardtanh", "hardswish", "swish"}
ONEDNN_QLINEAR_ATTRS = {"none", "relu", "hardtanh", "hardswish", "swish", "tanh", "gelu", "leaky_relu"}
SPECIAL = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, -1.0, 2.5, 7.0, -7.0]


def _values() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.cat([torch.tensor(SPECIAL), torch.randn(64) * 4])


def test_every_record_is_complete():
    assert [a.name for a in TABLE] == list(ACTS) and len(ACTS) == len(TABLE)  # names are unique
    assert reference.ACTIVATIONS == tuple(sorted(ACTS))
    for a in TABLE:
        assert a.examples, a.name
        assert {parse_act(e)[0] for e in a.examples} == {a.name}
        assert a.postop is not None, a.name  # every activation has a oneDNN fp32 post-op (exact or not)
        assert a.name == "none" or a.inplace is not None
        assert a.name == "none" or (a.modules and a.calls), f"{a.name}: no spelling the matchers recognise"
        for e in a.examples:
            code, p0, p1 = a.triton(*parse_act(e)[1])
            assert code in TRITON_CODES.values() and isinstance(p0, float) and isinstance(p1, float), e
    assert set(EXAMPLES) >= {a.examples[0] for a in TABLE}


def test_triton_codes_are_all_used_and_distinct():
    used = {a.triton(*parse_act(e)[1])[0] for a in TABLE for e in a.examples}
    assert used == set(TRITON_CODES.values())
    assert len(set(TRITON_CODES.values())) == len(TRITON_CODES)


@pytest.mark.parametrize("act", EXAMPLES)
def test_inplace_form_equals_the_reference(act):
    x = _values()
    want = apply_act(x.clone(), act)
    found = cpu.inplace_act(act)
    got = x.clone() if found is None else found[0](x.clone(), *found[1], **found[2])
    torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-6, atol=1e-6)


def _conv_postop(x: torch.Tensor, postop: tuple[str, list, str]) -> torch.Tensor:
    """``postop`` applied by oneDNN's fp32 convolution to x itself (a depthwise 1x1 conv with weight 1)."""
    c = x.shape[0]
    w = torch.ones(c, 1, 1, 1)
    y = torch.ops.mkldnn._convolution_pointwise(x.view(1, c, 1, 1), w, None, [0, 0], [1, 1], [1, 1], c, *postop)
    return y.reshape(c)


@pytest.mark.parametrize("act", EXAMPLES)
def test_fp32_postop_is_exact_where_the_table_says(act):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN")
    name, params = parse_act(act)
    postop = ACTS[name].postop(*params)
    assert postop[0] in ONEDNN_FP32_ATTRS
    x = _values()
    finite = x[torch.isfinite(x)]
    torch.testing.assert_close(_conv_postop(finite, postop), apply_act(finite, act), rtol=1e-5, atol=1e-5)
    if ACTS[name].nan_exact:
        assert cpu.onednn_postop(act) == postop and cpu.clamp_postop(act) is None
        torch.testing.assert_close(_conv_postop(x, postop), apply_act(x, act), equal_nan=True, rtol=1e-5, atol=1e-5)
    else:  # the reason it is not: NaN comes out as a number
        assert cpu.onednn_postop(act) is None and cpu.clamp_postop(act) == postop
        assert not torch.isnan(_conv_postop(torch.tensor([float("nan")]), postop)).any()


@pytest.mark.parametrize("act", EXAMPLES)
def test_int8_postops_name_attrs_the_int8_ops_take(act):
    conv, linear = cpu.int8_postop(act, linear=False), cpu.int8_postop(act, linear=True)
    assert conv is None or conv[0] in ONEDNN_QCONV_ATTRS
    assert linear is None or linear[0] in ONEDNN_QLINEAR_ATTRS
    assert conv is None or linear == conv  # the conv's list is the shorter one
    assert parse_act(act)[0] != "sigmoid" or (conv is None and linear is None)


@pytest.mark.parametrize("act", EXAMPLES)
def test_int8_postops_match_the_reference(act):
    if not torch.backends.mkldnn.is_available() or not cpu.int8_postop(act, linear=True):
        pytest.skip("no oneDNN int8 post-op")
    torch.manual_seed(1)
    x = torch.randint(-128, 128, (5, 16), dtype=torch.int8)
    w = torch.randint(-60, 61, (8, 16), dtype=torch.int8)  # exact on any CPU (kernels/cpu.py: s7)
    ws, b = torch.rand(8) * 0.01 + 0.002, torch.randn(8)
    fp32 = reference.qlinear_act(x, 0.05, 3, w, ws, b, act)
    out_scale, out_zp = reference.activation_qparams(float(fp32.min()), float(fp32.max()))
    want = reference.qlinear_act(x, 0.05, 3, w, ws, b, act, out_scale, out_zp)
    got = cpu.qlinear_act(x, 0.05, 3, w, ws, b, act, out_scale, out_zp)  # requantized inside: the post-op path
    assert (got.int() - want.int()).abs().max() <= 1  # one int8 step (fp32 rounding before the requantize)
    if cpu.int8_postop(act, linear=False):
        xc, wc = x.view(5, 16, 1, 1), w.view(8, 16, 1, 1)
        want = reference.qconv2d_act(xc, 0.05, 3, wc, ws, b, [1, 1], [0, 0], [1, 1], 1, act, None, out_scale, out_zp)
        got = cpu.qconv2d_act(xc, 0.05, 3, wc, ws, b, [1, 1], [0, 0], [1, 1], 1, act, None, out_scale, out_zp)
        assert (got.int() - want.int()).abs().max() <= 1


def test_spellings_come_from_the_records():
    assert activations.FUNCTIONS[F.relu][0].name == "relu" and activations.FUNCTIONS[torch.relu_][0].name == "relu"
    assert activations.FUNCTIONS[torch.clamp_][0].name == "hardtanh"
    assert activations.METHODS["sigmoid_"][0].name == "sigmoid"
    for cls, (record, attrs) in activations.MODULES.items():
        assert record.modules[cls] == attrs
    for a in TABLE:
        for call in a.calls:
            assert any(r is a and c is call for r, c in activations.FUNCTIONS.values()), call.name


def test_spell_gives_canonical_strings():
    assert activations.spell(ACTS["hardtanh"], (None, 2)) == "hardtanh:-inf:2.0"
    assert activations.spell(ACTS["hardtanh"], (None, None)) is None
    assert activations.spell(ACTS["gelu"], ("tanh",)) == "gelu:tanh"
    assert activations.spell(ACTS["leaky_relu"], ("x",)) is None
    assert activations.spell(ACTS["relu"], ()) == "relu"
    for e in EXAMPLES:
        name, params = parse_act(e)
        assert activations.format_act(name, *params) == e


@pytest.mark.parametrize("act", EXAMPLES)
def test_cap_bounds_the_activation(act):
    name, params = parse_act(act)
    x = _values()
    x = x[torch.isfinite(x)]
    cap = ACTS[name].cap(*params)
    y = apply_act(x, act).abs()
    bound = torch.full_like(x, cap) if not math.isinf(cap) else x.abs()
    assert bool((y <= bound + 1e-6).all()), act
