import torch
import torch.nn as nn

from graphopt.passes.fold_linear_bn import fold_linear_bn
from tests.helpers import apply, close, count, randomize_bn, traced


class LinearBN(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.fc, self.bn = nn.Linear(12, 20, bias=bias), nn.BatchNorm1d(20)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_fold_linear_bn_four_ways():
    for bias in (True, False):
        m, x = randomize_bn(LinearBN(bias)).eval(), torch.randn(5, 12)
        gm = traced(m, x)
        assert apply(fold_linear_bn, gm, x) == 1
        assert count(gm, nn.BatchNorm1d) == 0
        close(gm(x), m(x))
        assert apply(fold_linear_bn, gm, x) == 0


def test_bn_over_channels_of_a_sequence_is_not_folded():
    class M(nn.Module):  # (N, C, L): BN normalizes dim 1, the linear's features are dim 2
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(7, 7), nn.BatchNorm1d(5)

        def forward(self, x):
            return self.bn(self.fc(x))

    m, x = randomize_bn(M()).eval(), torch.randn(3, 5, 7)
    gm = traced(m, x)
    assert apply(fold_linear_bn, gm, x) == 0
    close(gm(x), m(x))


def test_linear_with_two_users_is_not_folded():
    class M(LinearBN):
        def forward(self, x):
            y = self.fc(x)
            return self.bn(y) + y

    m, x = randomize_bn(M()).eval(), torch.randn(5, 12)
    gm = traced(m, x)
    assert apply(fold_linear_bn, gm, x) == 0
