import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt import load, optimize
from graphopt.passes import PassContext
from graphopt.passes.decompose_attention import decompose_attention
from tests.helpers import apply, close, count, traced


class SelfAttention(nn.Module):
    """A pre-norm block around nn.MultiheadAttention, called as torchvision's ViT calls it (``call`` varies it)."""

    def __init__(self, batch_first: bool = True, call=None, **kw):
        super().__init__()
        self.ln = nn.LayerNorm(32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=batch_first, **kw)
        self.call = call or (lambda attn, y: attn(y, y, y, need_weights=False)[0])

    def forward(self, x):
        return x + self.call(self.attn, self.ln(x))


def _linears(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.linear]


@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_becomes_two_linears_around_sdpa_four_ways(batch_first):
    m, x = SelfAttention(batch_first).eval(), torch.randn(2, 7, 32)
    gm = traced(m, x)
    assert count(gm, nn.MultiheadAttention) == 1
    assert apply(decompose_attention, gm, x) == 1
    assert count(gm, nn.MultiheadAttention) == 0 and count(gm, F.scaled_dot_product_attention) == 1
    in_proj, out_proj = _linears(gm)
    assert in_proj.args[1].target == "attn.in_proj_weight" and out_proj.args[1].target == "attn.out_proj.weight"
    assert (in_proj.meta["layer"], out_proj.meta["layer"]) == ("attn.in_proj", "attn.out_proj")
    assert in_proj.args[0].target == "ln"  # (the linears read x itself, not a transposed view of it)
    with torch.no_grad():
        close(gm(x), m(x))
    assert apply(decompose_attention, gm, x) == 0


def test_the_attention_weights_may_be_computed_if_nobody_reads_them():
    m = SelfAttention(call=lambda attn, y: attn(y, y, y)[0]).eval()  # (need_weights defaults to True)
    x = torch.randn(3, 5, 32)
    gm = traced(m, x)
    assert apply(decompose_attention, gm, x) == 1
    with torch.no_grad():
        close(gm(x), m(x))


@pytest.mark.parametrize("call, kw, reason", [
    (lambda attn, y: attn(y, y * 2, y * 2, need_weights=False)[0], {},
     "query, key and value are not one tensor (cross-attention)"),
    (lambda attn, y: (lambda out: out[0] + out[1].sum())(attn(y, y, y)), {}, "the attention weights are read"),
    (lambda attn, y: attn(y, y, y, attn_mask=torch.ones(7, 7, dtype=torch.bool).triu(1))[0], {},
     "a mask or is_causal"),
    (lambda attn, y: attn(y, y, y)[0], {"add_bias_kv": True}, "separate key / value sizes, bias_k / bias_v or "
                                                              "add_zero_attn"),
])
def test_what_stays_the_module_is_a_miss(call, kw, reason):
    m, x = SelfAttention(call=call, **kw).eval(), torch.randn(2, 7, 32)
    gm = traced(m, x)
    ctx = PassContext((x,))
    assert apply(decompose_attention, gm, x, ctx=ctx) == 0
    assert count(gm, nn.MultiheadAttention) >= 1
    assert ctx.misses.counts() == {reason: count(gm, nn.MultiheadAttention)}


def test_optimize_runs_vit_attention_as_linears_saves_it_and_reloads_it_bit_for_bit(tmp_path):
    """torchvision's ViT could not be saved while nn.MultiheadAttention stayed a module in the graph."""
    m, x = SelfAttention().eval(), torch.randn(2, 7, 32)
    opt = optimize(m, (x,), engines="graphopt")
    assert "MultiheadAttention" not in opt.op_counts
    with torch.no_grad():
        close(opt(x), m(x))
        loaded = load(opt.save(tmp_path / "saved"))
        for batch in (x, torch.randn(3, 4, 32)):
            assert torch.equal(loaded(batch), opt(batch))
    assert m.attn.in_proj_weight.requires_grad  # (the user's module is untouched)


def test_int8_quantizes_the_attention_projections_under_their_own_names():
    m = nn.Sequential(SelfAttention(), nn.Linear(32, 8)).eval()
    batches = [(torch.randn(4, 16, 32),) for _ in range(4)]
    opt = optimize(m, batches[0], quantize="int8", calibration=batches, engines="graphopt", progress=False)
    names = {layer["name"] for layer in opt.int8_report.layers}
    assert {"0.attn.in_proj", "0.attn.out_proj"} <= names


class Encoded(nn.Module):
    """nn.TransformerEncoder inside a model (as the model itself, torch.export captures it instead)."""

    def __init__(self, batch_first=True, norm_first=False, activation="relu", call=None):
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=batch_first, norm_first=norm_first,
                                           activation=activation)
        self.embed = nn.Linear(16, 32)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(32), enable_nested_tensor=False)
        self.call = call or (lambda encoder, x: encoder(x))

    def forward(self, x):
        return self.call(self.encoder, self.embed(x))


@pytest.mark.parametrize("batch_first, norm_first, activation",
                         [(True, False, "relu"), (True, True, "gelu"), (False, False, "gelu"), (False, True, "relu")])
def test_an_encoder_becomes_its_layers_norms_attention_and_linears_four_ways(batch_first, norm_first, activation):
    m, x = Encoded(batch_first, norm_first, activation).eval(), torch.randn(2, 7, 16)
    gm = traced(m, x)
    assert count(gm, nn.TransformerEncoder) == 1
    assert apply(decompose_attention, gm, x) == 5  # the encoder, its two layers, their two attentions
    assert count(gm, nn.TransformerEncoder, nn.TransformerEncoderLayer, nn.MultiheadAttention) == 0
    assert count(gm, F.scaled_dot_product_attention) == 2 and count(gm, nn.LayerNorm) == 5
    assert count(gm, nn.Linear) == 1 + 2 * 2 and len(_linears(gm)) == 2 * 2
    assert count(gm, F.relu if activation == "relu" else F.gelu) == 2
    with torch.no_grad():
        close(gm(x), m(x))
    assert apply(decompose_attention, gm, x) == 0


@pytest.mark.parametrize("make, reason", [
    (lambda: Encoded(call=lambda encoder, x: encoder(x, mask=torch.ones(7, 7, dtype=torch.bool).triu(1))),
     "a mask or is_causal"),
    (lambda: Encoded(activation=F.silu), "an activation other than relu or exact gelu"),
])
def test_what_stays_the_encoder_or_its_layer_is_a_miss(make, reason):
    m, x = make().eval(), torch.randn(2, 7, 16)
    gm = traced(m, x)
    ctx = PassContext((x,))
    apply(decompose_attention, gm, x, ctx=ctx)
    assert reason in ctx.misses.counts()
    assert count(gm, nn.TransformerEncoder, nn.TransformerEncoderLayer) >= 1
    with torch.no_grad():
        close(gm(x), m(x))


def test_optimize_saves_an_encoder_and_reloads_it_bit_for_bit(tmp_path):
    m, x = Encoded(norm_first=True).eval(), torch.randn(2, 7, 16)
    opt = optimize(m, (x,), engines="graphopt")
    with torch.no_grad():
        close(opt(x), m(x))
        loaded = load(opt.save(tmp_path / "saved"))
        assert torch.equal(loaded(x), opt(x))


class Custom(nn.TransformerEncoderLayer):
    """A layer of another type in an encoder (torch calls it with its masks as keywords)."""


@pytest.mark.parametrize("make, x, reason", [
    (lambda: SelfAttention(), torch.randn(7, 32), "an unbatched or unknown-rank input"),
    (lambda: Encoded(call=lambda encoder, x: encoder.layers[0](x)), torch.randn(7, 16),
     "an unbatched or unknown-rank input"),
    (lambda: Encoded(activation=nn.GELU(approximate="tanh")), torch.randn(2, 7, 16),
     "an activation other than relu or exact gelu"),
])
def test_unbatched_inputs_and_a_tanh_gelu_stay_the_module(make, x, reason):
    m = make().eval()
    gm = traced(m, x)
    ctx = PassContext((x,))
    apply(decompose_attention, gm, x, ctx=ctx)
    assert reason in ctx.misses.counts()
    with torch.no_grad():
        close(gm(x), m(x))


def test_the_encoder_holds_custom_layers_whole():
    m = nn.Sequential(nn.Linear(16, 32), nn.TransformerEncoder(Custom(32, 4, 64, batch_first=True), 1,
                                                               enable_nested_tensor=False)).eval()
    x = torch.randn(2, 7, 16)
    gm = traced(m, x)
    ctx = PassContext((x,))
    assert apply(decompose_attention, gm, x, ctx=ctx) == 0
    assert ctx.misses.counts() == {"a layer of another type (torch calls it with its masks)": 1}


def test_no_biases_no_final_norm_and_another_eps_are_written_out_as_they_are():
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, bias=False, layer_norm_eps=1e-2)
    m = nn.Sequential(nn.Linear(16, 32), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)).eval()
    x = torch.randn(2, 7, 16) * 3
    gm = traced(m, x)
    assert apply(decompose_attention, gm, x) == 5
    assert all(n.args[2] is None for n in _linears(gm))  # (no bias read where there is none)
    with torch.no_grad():
        close(gm(x), m(x))


def test_saving_an_encoder_given_a_mask_is_refused_with_what_would_write_it_out(tmp_path):
    from graphopt import GraphoptError

    mask = torch.ones(7, 7, dtype=torch.bool).triu(1)
    m, x = Encoded(call=lambda encoder, x: encoder(x, mask=mask)).eval(), torch.randn(2, 7, 16)
    opt = optimize(m, (x,), engines="graphopt")
    with pytest.raises(GraphoptError, match="encoder") as refused:
        opt.save(tmp_path / "saved")
    assert refused.value.module == "encoder" and "without a mask" in refused.value.hint
    assert not (tmp_path / "saved").exists()
