"""The test zoo end to end through optimize()."""

import hashlib

import pytest
import torch
import torch.nn as nn

from graphopt import OptimizedModule, optimize
from tests.helpers import close, randomize_bn
from tests.zoo import ZOO


def fingerprint(model: nn.Module) -> tuple:
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        digest.update(name.encode())
        digest.update(t.detach().contiguous().numpy().tobytes())
    return digest.hexdigest(), tuple(m.training for m in model.modules())


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_zoo_gives_eager_answers(name, backend, tmp_path):
    make, inputs = ZOO[name]
    model = randomize_bn(make()).eval()
    x = inputs(2)
    before = fingerprint(model)
    opt = optimize(model, (x,), backend=backend, dump_dir=tmp_path)
    assert isinstance(opt, OptimizedModule)
    with torch.no_grad():
        close(opt(x), model(x))
        x5 = inputs(5)
        close(opt(x5), model(x5))                       # another batch size
    assert fingerprint(model) == before                 # the user's model is untouched
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in opt.modules())
    assert "batch_norm" not in opt.code
    assert (tmp_path / "00_captured.py").exists() and (tmp_path / "report.md").exists()
    assert {r.name for r in opt.report} >= {"fold_conv_bn", "fuse_conv_act"}


def test_report_records_each_pass():
    make, inputs = ZOO["resnet_blocks"]
    opt = optimize(randomize_bn(make()).eval(), (inputs(1),))
    by_name = {r.name: r for r in opt.report}
    assert by_name["fold_conv_bn"].rewrites == 10     # all ten convs have a BN after them
    assert by_name["fuse_conv_act"].rewrites == 10
    assert by_name["fold_conv_bn"].nodes_after < by_name["fold_conv_bn"].nodes_before
    assert by_name["fold_conv_bn"].max_error < 1e-4
    assert all(r.seconds >= 0 for r in opt.report)


def test_passes_can_be_chosen():
    make, inputs = ZOO["seed_convnet"]
    opt = optimize(make().eval(), (inputs(1),), passes=["fold_conv_bn"])
    # the capture, the chosen pass, the lowering
    assert [r.name for r in opt.report] == ["capture (symbolic_trace)", "fold_conv_bn", "lower_int8_onednn",
                                            "lower_to_onednn", "plan_layout"]
    assert "graphopt" not in opt.code


def test_optimized_module_is_deterministic():
    make, inputs = ZOO["mobilenet_v2_blocks"]
    model = randomize_bn(make()).eval()
    assert optimize(model, (inputs(1),)).code == optimize(model, (inputs(1),)).code


def test_dump_env_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_DUMP", str(tmp_path))
    make, inputs = ZOO["seed_convnet"]
    optimize(make().eval(), (inputs(1),))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "00_captured.py" in names and "report.md" in names
    assert any(n.endswith("_fold_conv_bn.py") for n in names)
    assert any(n.endswith("_fold_conv_bn.diff") for n in names)
    assert any(n.endswith("_fold_conv_bn.dot") for n in names)
    for py in tmp_path.glob("*.py"):
        compile(py.read_text(), str(py), "exec")          # each dump is valid Python
    fold = next(tmp_path.glob("*_fold_conv_bn.py")).read_text()
    assert "rewrites: 2" in fold and "nodes:" in fold and "max error" in fold


class OptionalMask(nn.Module):
    """timm's attention: an optional mask passed straight to an op that takes None."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, attn_mask=None):
        y = self.fc(x)
        return nn.functional.scaled_dot_product_attention(y, y, y, attn_mask=attn_mask)


class OptionalArguments(nn.Module):
    """Hugging Face's forwards: optional arguments with plain defaults that decide branches."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, attn_mask=None, scale=2.0, residual=True, mode="sum"):
        y = self.fc(x)
        if attn_mask is not None:
            y = y + attn_mask
        y = y * scale
        return y + x if residual and mode == "sum" else y


@pytest.mark.parametrize("make", [OptionalMask, OptionalArguments])
def test_optional_arguments_take_their_defaults_and_the_module_saves_and_loads(make, tmp_path):
    """The graph keeps the example's inputs only, traced with the defaults' values. Before, an optional argument
    passed straight through became an input of its own with its default, which save() wrote and load()
    refused as a malformed input (timm's DeiT, found by a model-zoo run); one that decides a branch made
    symbolic tracing fail (torch.export then captured the model)."""
    from graphopt import load

    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(2, 3, 8)
    opt = optimize(model, (x,), engines="graphopt", progress=False)
    assert opt.report[0].name == "capture (symbolic_trace)"
    assert [n.name for n in opt.portable.graph.nodes if n.op == "placeholder"] == ["x"]
    assert not any(n.op == "call_function" and "assert" in getattr(n.target, "__name__", "")
                   for n in opt.portable.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))
        opt.save(tmp_path / "m")
        assert torch.equal(load(tmp_path / "m")(x), opt(x))


def test_an_example_input_given_for_an_optional_argument_stays_an_input():
    torch.manual_seed(0)
    model, x, mask = OptionalMask().eval(), torch.randn(2, 3, 8), torch.randn(3, 3)
    opt = optimize(model, (x, mask), engines="graphopt", progress=False)
    assert [n.name for n in opt.portable.graph.nodes if n.op == "placeholder"] == ["x", "attn_mask"]
    with torch.no_grad():
        other = torch.randn(3, 3)
        torch.testing.assert_close(opt(x, other), model(x, other))
