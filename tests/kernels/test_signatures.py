"""The fused-op records (kernels/signatures.py) follow the registered schemas field for field, and
round-trip a node's arguments."""

import dataclasses

import pytest
import torch
import torch.fx as fx

from graphopt.kernels.ops import OPS
from graphopt.kernels.signatures import SIGNATURES, ConvAct, LinearAct, QConvAct, QLinearAct, signature_of


@pytest.mark.parametrize("name", SIGNATURES)
def test_fields_are_the_schema_in_order(name):
    schema = OPS[name]._schema
    record = SIGNATURES[name]
    assert [f.name for f in dataclasses.fields(record)] == [a.name for a in schema.arguments]
    assert record.op == name


def test_every_fused_op_has_a_record():
    assert set(SIGNATURES) == {n for n in OPS if n.endswith("_act")}


def test_from_node_and_as_args_round_trip():
    graph = fx.Graph()
    x, w, b, r = (graph.placeholder(n) for n in ("x", "w", "b", "r"))
    conv = graph.call_function(OPS["conv2d_act"], (x, w, b, [1, 1], [0, 0], [1, 1], 2, "relu", r))
    linear = graph.call_function(OPS["linear_act"], (x, w, None, "gelu:tanh"))
    qlinear = graph.call_function(OPS["qlinear_act"], (x, 0.5, 3, w, b, None, "none", 0.25, -4))
    sig = signature_of(conv)
    assert isinstance(sig, ConvAct) and sig.groups == 2 and sig.residual is r and sig.act == "relu"
    assert sig.as_args() == conv.args
    assert signature_of(linear) == LinearAct(x, w, None, "gelu:tanh")
    q = QLinearAct.from_node(qlinear)
    assert (q.out_scale, q.out_zp, q.weight) == (0.25, -4, w) and q.as_args() == qlinear.args
    assert signature_of(x) is None and signature_of(graph.call_function(torch.relu, (x,))) is None


def test_defaults_and_wrong_arity():
    q = QConvAct("x", 1.0, 0, "w", "s", None, [1, 1], [0, 0], [1, 1], 1, "relu")
    assert (q.residual, q.out_scale, q.out_zp) == (None, None, 0)
    assert len(q.as_args()) == len(OPS["qconv2d_act"]._schema.arguments)
    assert dataclasses.replace(q, act="silu").as_args()[10] == "silu"
    with pytest.raises(TypeError):
        LinearAct.from_args(("x", "w", None, "relu", "extra"))
