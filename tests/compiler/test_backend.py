"""torch.compile(model, backend="graphopt") runs the pipeline on torch.compile's graphs."""

import pytest
import torch

import compiler  # noqa: F401  (registers the backend)
from compiler.backend import freeze
from tests.helpers import close, randomize_bn
from tests.zoo import ZOO


@pytest.mark.parametrize("name", ["resnet_blocks", "functional_only", "mlp_bn_gelu_layernorm"])
def test_torch_compile_backend_matches_eager(name):
    torch._dynamo.reset()
    make, inputs = ZOO[name]
    model = randomize_bn(make()).eval()
    compiled = torch.compile(model, backend="graphopt")
    with torch.no_grad():
        for n in (2, 3):
            x = inputs(n)
            close(compiled(x), model(x))


def test_backend_folds_and_fuses_the_functional_graph():
    seen = {}
    from compiler import backend as backend_module

    original = backend_module.PassManager.run

    def spy(self, gm, ctx):
        gm, report = original(self, gm, ctx)
        seen["code"], seen["report"] = gm.code, {r.name: r.rewrites for r in report}
        return gm, report

    backend_module.PassManager.run = spy
    try:
        torch._dynamo.reset()
        make, inputs = ZOO["resnet_blocks"]
        model = randomize_bn(make()).eval()
        with torch.no_grad():
            torch.compile(model, backend="graphopt")(inputs(1))
    finally:
        backend_module.PassManager.run = original
    assert seen["report"]["fold_conv_bn"] == 10 and seen["report"]["fuse_conv_act"] == 10
    assert "batch_norm" not in seen["code"] and "graphopt.conv2d_act" in seen["code"]


def test_freeze_keeps_user_inputs_only():
    import torch.fx as fx

    class M(torch.nn.Module):
        def forward(self, w, x):
            return x * w

    gm = fx.symbolic_trace(M())
    gm, kept = freeze(gm, [torch.nn.Parameter(torch.ones(3)), torch.randn(3)])
    assert kept == [1] and sum(n.op == "placeholder" for n in gm.graph.nodes) == 1
