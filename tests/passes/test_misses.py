"""Misses are explained: a fold or fusion that does not fire says why (``ctx.miss``), the driver counts the reasons
per pass into ``opt.report``, and they reach the dump header and report.md."""

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt import optimize
from graphopt.passes import PassContext
from graphopt.passes.fold_conv_bn import fold_conv_bn
from graphopt.passes.fold_linear_bn import fold_linear_bn
from graphopt.passes.fuse_conv_act import fuse_conv_act
from graphopt.passes.fuse_linear_act import fuse_linear_act
from tests.helpers import close, randomize_bn, traced


class TwoReaders(nn.Module):
    """The conv's output goes to its relu and to the caller."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(y), y


class BroadcastAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.shift = nn.Conv2d(3, 4, 3, padding=1), nn.Parameter(torch.randn(4, 1, 1))

    def forward(self, x):
        return torch.relu(self.conv(x) + self.shift)


class TrainingBN(nn.Module):
    """Batch statistics on every call: a BatchNorm in training mode, in a model in eval mode."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gamma, self.beta = nn.Parameter(torch.rand(4) + 0.5), nn.Parameter(torch.randn(4))

    def forward(self, x):
        return F.batch_norm(self.conv(x), None, None, self.gamma, self.beta, training=True)


class TiedWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.bn(self.a(x)) + self.b(x)


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


def _run(pass_fn, model, x):
    gm = traced(randomize_bn(model), x)
    ctx = PassContext((x,))
    return pass_fn(gm, ctx), ctx.misses.nodes, gm


IMAGE = (2, 3, 8, 8)
# (pass, model, input shape, rewrites it still makes, the reason, the node it is reported at)
CASES = {
    "conv with another reader": (fuse_conv_act, TwoReaders, IMAGE, 1, "conv output has another reader", "conv"),
    "broadcasting add": (fuse_conv_act, BroadcastAdd, IMAGE, 1, "broadcasting add is not a residual", "conv"),
    "training-mode BN": (fold_conv_bn, TrainingBN, IMAGE, 0, "BatchNorm in training mode", "batch_norm"),
    "tied weights": (fold_conv_bn, TiedWeights, (2, 4, 8, 8), 0, "weight shared with another layer", "bn"),
    "conv called twice": (fold_conv_bn, CalledTwice, (2, 4, 8, 8), 0, "layer called more than once", "bn"),
}


@pytest.mark.parametrize("case", CASES)
def test_the_pass_says_why(case):
    pass_fn, make, shape, rewrites, reason, node = CASES[case]
    model, x = make().eval(), torch.randn(shape)
    n, misses, gm = _run(pass_fn, model, x)
    assert n == rewrites
    assert misses == {reason: [node]}
    gm.recompile()
    close(gm(x), model(x))  # what fired is still right


def test_conv_fuses_without_the_relu_it_cannot_take():
    n, misses, gm = _run(fuse_conv_act, TwoReaders().eval(), torch.randn(IMAGE))
    (fused,) = [node for node in gm.graph.nodes if node.target is torch.ops.graphopt.conv2d_act.default]
    assert n == 1 and fused.args[7] == "none" and any(node.target is torch.relu for node in gm.graph.nodes)


def test_linear_misses():
    class LinearTwoReaders(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 5)

        def forward(self, x):
            y = self.fc(x)
            return F.gelu(y) + y

    class LinearBN3d(nn.Module):  # (N, C, L): the BN normalizes dim 1, the linear the last dim
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(5, 5), nn.BatchNorm1d(3)

        def forward(self, x):
            return self.bn(self.fc(x))

    assert _run(fuse_linear_act, LinearTwoReaders().eval(), torch.randn(4, 6))[1] == {
        "linear output has another reader": ["fc"]}
    assert _run(fold_linear_bn, LinearBN3d().eval(), torch.randn(2, 3, 5))[1] == {
        "BatchNorm over a linear output that is not (N, F)": ["bn"]}


def test_asymmetric_padding_is_a_reason():
    m, x = nn.Conv2d(3, 4, 4, padding="same").eval(), torch.randn(IMAGE)
    n, misses, _ = _run(fuse_conv_act, m, x)
    assert n == 0 and list(misses) == ["asymmetric padding (padding='same' with an even kernel)"]


def test_a_reason_belongs_to_the_pass_whose_pattern_it_is():
    # a training-mode BN after a conv is fold_conv_bn's miss, not fold_linear_bn's
    model, x = TrainingBN().eval(), torch.randn(IMAGE)
    assert _run(fold_linear_bn, model, x)[1] == {}
    assert _run(fold_conv_bn, TwoReaders().eval(), x)[1] == {}  # no BatchNorm: nothing to explain


class Net(nn.Module):
    """Two convs whose relu cannot fuse (another reader), a broadcasting add, a training-mode BN."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = (nn.Conv2d(3, 3, 3, padding=1) for _ in range(3))
        self.bn, self.shift = TrainingBN(), nn.Parameter(torch.randn(3, 1, 1))

    def forward(self, x):
        a = self.c1(x)
        b = self.c2(torch.relu(a) + a)
        c = torch.relu(b) * b
        d = torch.relu(self.c3(x) + self.shift)
        return self.bn(c)[:, :3] + d


def test_reasons_reach_the_report_the_dump_header_and_report_md(tmp_path):
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    opt = optimize(model, (x,), dump_dir=tmp_path)
    with torch.no_grad():
        close(opt(x), model(x))
    records = {r.name: r for r in opt.report}
    fuse, fold = records["fuse_conv_act"], records["fold_conv_bn"]
    assert fuse.rewrites == 4
    assert fuse.misses == {"conv output has another reader": 2, "broadcasting add is not a residual": 1}
    assert fuse.missed_nodes["conv output has another reader"] == ["c1", "c2"]
    # (fuse_conv_act fired, so the pipeline ran twice: each run met the BN, and it counts once)
    assert fold.rewrites == 0 and fold.misses == {"BatchNorm in training mode": 1}
    assert fold.missed_nodes == {"BatchNorm in training mode": ["batch_norm"]}
    assert records["fold_linear_bn"].misses == {} and records["remove_noops"].misses == {}

    # the dump of the pass that fired carries its misses in the header ...
    (dump,) = tmp_path.glob("[0-9][0-9]_fuse_conv_act.py")
    header = [line for line in dump.read_text().splitlines() if line.startswith("#")]
    assert "# not rewritten, conv output has another reader: 2 (c1, c2)" in header
    assert "# not rewritten, broadcasting add is not a residual: 1 (c3)" in header
    # ... a pass that changed nothing leaves no dump, and its misses are in report.md all the same
    assert not list(tmp_path.glob("[0-9][0-9]_fold_conv_bn.*"))
    report = (tmp_path / "report.md").read_text()
    assert re.search(r"\| fold_conv_bn \| BatchNorm in training mode \| 1 \| batch_norm \|", report)
    assert re.search(r"\| fuse_conv_act \| conv output has another reader \| 2 \| c1, c2 \|", report)
    # ... and the explorer page lists them all
    page = (tmp_path / "index.html").read_text()
    assert '<table id="misses">' in page
    for reason, count, nodes in [("BatchNorm in training mode", 1, "batch_norm"),
                                 ("conv output has another reader", 2, "c1, c2")]:
        assert f'"reason": "{reason}", "count": "{count}", "nodes": "{nodes}"' in page


def test_the_explorer_takes_misses_from_report_json_as_data(tmp_path):
    from graphopt.compiler.ui.explorer import _misses

    report = tmp_path / "report.json"
    report.write_text('[{"name": "p", "misses": {"<b>why</b>": 2}, "missed_nodes": {"<b>why</b>": ["a", 3]}},'
                      ' {"name": "q", "misses": [1]}, 7]')
    assert _misses(tmp_path) == [{"pass": "p", "reason": "<b>why</b>", "count": "2", "nodes": "a, 3"}]
    report.write_text("not json")
    assert _misses(tmp_path) == []
