"""torch.compile(model, backend="graphopt") runs the pipeline on torch.compile's graphs."""

import pytest
import torch

import graphopt.compiler  # noqa: F401  (registers the backend)
from graphopt.compiler.core.torch_compile import freeze
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


def test_backend_folds_and_fuses_the_functional_graph(monkeypatch):
    from graphopt.compiler.core import torch_compile as backend_module

    seen = {}
    original = backend_module.run_pipeline

    def spy(gm, ctx, passes, lowering, **kw):
        portable, lowered, report = original(gm, ctx, passes, lowering, **kw)
        seen["portable"], seen["lowered"] = portable.code, lowered.code
        seen["report"] = {r.name: r.rewrites for r in report}
        return portable, lowered, report

    monkeypatch.setattr(backend_module, "run_pipeline", spy)
    torch._dynamo.reset()
    make, inputs = ZOO["resnet_blocks"]
    model = randomize_bn(make()).eval()
    with torch.no_grad():
        torch.compile(model, backend="graphopt")(inputs(1))
    assert seen["report"]["fold_conv_bn"] == 10 and seen["report"]["fuse_conv_act"] == 10
    assert "batch_norm" not in seen["portable"] and "graphopt.conv2d_act" in seen["portable"]
    assert "mkldnn._convolution_pointwise" in seen["lowered"]


def test_freeze_keeps_user_inputs_only():
    import torch.fx as fx

    class M(torch.nn.Module):
        def forward(self, w, x):
            return x * w

    gm = fx.symbolic_trace(M())
    gm, kept = freeze(gm, [torch.nn.Parameter(torch.ones(3)), torch.randn(3)])
    assert kept == [1] and sum(n.op == "placeholder" for n in gm.graph.nodes) == 1


def test_dumps_one_folder_per_compiled_graph(tmp_path, monkeypatch):
    from tests.compiler.test_errors import DataDependent

    monkeypatch.setenv("GRAPHOPT_DUMP", str(tmp_path))
    torch._dynamo.reset()
    model, x = DataDependent().eval(), torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        close(torch.compile(model, backend="graphopt")(x), model(x))
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert folders and folders[0] == "graph_000"
    assert (tmp_path / "graph_000" / "index.html").exists() and (tmp_path / "graph_000" / "00_captured.py").exists()
