"""Structured channel pruning: dependency groups, the surgery, and what must stay runnable."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt import GraphoptError, optimize
from graphopt.compiler.core.capture import capture
from graphopt.compiler.workflow.channels import dependency_groups, kept_channels
from graphopt.compiler.workflow.prune import prune
from tests.helpers import randomize_bn
from tests.zoo import ZOO


def _groups(model, x):
    """{frozenset of producer module names} for the prunable groups, and the frozen ones."""
    gm = capture(model.eval(), (x,))
    _, spaces = dependency_groups(gm)
    prunable = {frozenset(p.target for p in s.producers) for s in spaces if not s.frozen}
    frozen = {frozenset(p.target for p in s.producers) for s in spaces if s.frozen}
    return prunable, frozen


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a1, self.a2 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 24, 1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.bn(self.a2(F.relu(self.a1(x)))) + x)
        return self.fc(F.relu(self.head(x)).mean((2, 3)))


def test_a_residual_add_ties_its_producers_into_one_group():
    prunable, frozen = _groups(Residual(), torch.randn(1, 3, 8, 8))
    assert frozenset({"stem", "a2"}) in prunable  # both write the tensor the add sums
    assert frozenset({"a1"}) in prunable and frozenset({"head"}) in prunable
    assert frozenset({"fc"}) in frozen  # a graph output


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(3, 24, 1)
        self.c = nn.Conv2d(40, 8, 3, padding=1)

    def forward(self, x):
        return self.c(torch.cat([F.relu(self.a(x)), self.b(x)], 1))


def test_a_concatenation_keeps_each_input_its_own_group_and_the_reader_follows():
    model, x = Concat().eval(), torch.randn(2, 3, 6, 6)
    prunable, _ = _groups(model, x)
    assert frozenset({"a"}) in prunable and frozenset({"b"}) in prunable
    pruned = prune(model, (x,), ratio=0.5)
    assert pruned.a.out_channels == 8 and pruned.b.out_channels == 16
    assert pruned.c.in_channels == 24 and pruned.c.out_channels == 8  # c writes the output: kept whole
    assert pruned(x).shape == model(x).shape


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.expand, self.bn1 = nn.Conv2d(8, 32, 1), nn.BatchNorm2d(32)
        self.dw, self.bn2 = nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32)
        self.project = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        y = F.relu6(self.bn1(self.expand(x)))
        y = F.relu6(self.bn2(self.dw(y)))
        return self.project(y) + x


def test_a_depthwise_conv_follows_the_channels_of_its_input():
    model, x = randomize_bn(Depthwise()).eval(), torch.randn(2, 8, 5, 5)
    prunable, frozen = _groups(model, x)
    assert frozenset({"expand"}) in prunable
    assert frozenset({"project"}) in frozen  # tied to the input x by the residual: not a producer's to prune
    pruned = prune(model, (x,), ratio=0.5)
    assert pruned.expand.out_channels == pruned.dw.in_channels == pruned.dw.out_channels == pruned.dw.groups == 16
    assert pruned.bn1.num_features == pruned.bn2.num_features == 16 and pruned.project.in_channels == 16
    assert pruned(x).shape == x.shape


def test_flatten_then_linear_drops_the_columns_of_pruned_channels():
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 3)).eval()
    x = torch.randn(2, 1, 4, 4)
    pruned = prune(model, (x,), ratio=0.5)
    keep = [c for c in range(16) if any(torch.equal(pruned[0].weight[i], model[0].weight[c]) for i in range(8))]
    assert pruned[3].in_features == 8 * 16
    expected_cols = torch.cat([model[3].weight[:, c * 16:(c + 1) * 16] for c in keep], 1)
    torch.testing.assert_close(pruned[3].weight, expected_cols, rtol=0, atol=0)
    # and the same function of the kept channels: zero the others in the original, compare
    with torch.no_grad():
        ablated = nn.Sequential(*[m for m in model])
        mask = torch.zeros(16)
        mask[keep] = 1
        ref = ablated[3](torch.flatten(F.relu(ablated[0](x)) * mask.view(1, -1, 1, 1), 1))
        torch.testing.assert_close(pruned(x), ref)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_ratio_zero_changes_nothing(name):
    factory, make = ZOO[name]
    model, x = randomize_bn(factory()).eval(), make(3)
    pruned = prune(model, (x,), ratio=0.0)
    with torch.no_grad():
        assert torch.equal(pruned(x), model(x))
    assert pruned.pruning == {}


@pytest.mark.parametrize("name", ["seed_convnet", "resnet_blocks", "mobilenet_v2_blocks"])
def test_pruned_models_run_train_optimize_and_quantize(name, monkeypatch):
    factory, make = ZOO[name]
    model = randomize_bn(factory()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = make(2)
    pruned = prune(model, (x,), ratio=0.5, criterion="bn_scale")
    assert pruned.pruning and all(after % 8 == 0 and after < b for b, after in pruned.pruning.values())
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model is untouched
    pruned.train()
    F.cross_entropy(pruned(make(4)), torch.zeros(4, dtype=torch.long)).backward()  # trainable
    pruned.eval()
    with torch.no_grad():
        torch.testing.assert_close(optimize(pruned, (x,))(x), pruned(x), rtol=1e-4, atol=1e-4)
    monkeypatch.setattr("graphopt.compiler.int8.quantize.MIN_INT8_MACS", 0)
    q = optimize(pruned, (x,), quantize="int8", calibration=[(make(4),) for _ in range(4)], progress=False)
    assert q(x).shape == pruned(x).shape and q.int8_report.output_sqnr_db > 25


def test_kept_channels_round_up_to_multiples_of_8():
    assert [kept_channels(64, r) for r in (0.0, 0.3, 0.5, 0.9, 0.99)] == [64, 48, 32, 8, 8]
    assert kept_channels(12, 0.5) == 8 and kept_channels(6, 0.5) == 6  # never more than there are


class HardCodedView(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 16, 3, padding=1), nn.Linear(16 * 4 * 4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).view(-1, 16 * 4 * 4))


def test_a_shape_written_into_forward_freezes_the_channels_it_reads():
    model, x = HardCodedView().eval(), torch.randn(2, 1, 4, 4)
    _, frozen = _groups(model, x)
    assert frozenset({"conv"}) in frozen
    assert prune(model, (x,), ratio=0.5).pruning == {}


def test_bad_arguments_are_refused():
    model, x = Residual().eval(), torch.randn(1, 3, 8, 8)
    with pytest.raises(GraphoptError, match="ratio"):
        prune(model, (x,), ratio=1.0)
    with pytest.raises(GraphoptError, match="criterion"):
        prune(model, (x,), ratio=0.5, criterion="random")
