"""The end-to-end test zoo: small versions of the architectures users bring."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.zoo import BasicBlock  # the same block the benchmark's ResNet-18 is made of
from graphopt.compiler.workflow.demo import ConvNet


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, stride: int = 1):
        super().__init__()
        cout = mid * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.downsample(x))


class ResNetish(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = BasicBlock(16, 32, stride=2)
        self.layer3 = Bottleneck(32, 8, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    def __init__(self, c: int, expand: int = 4, stride: int = 1):
        super().__init__()
        hidden = c * expand
        self.use_res = stride == 1
        self.block = nn.Sequential(
            nn.Conv2d(c, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c),
        )

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


class MobileNetish(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.Hardswish())
        self.blocks = nn.Sequential(InvertedResidual(8), InvertedResidual(8, stride=2), InvertedResidual(8))
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(8, classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class MLP(nn.Module):
    def __init__(self, d: int = 24, hidden: int = 48):
        super().__init__()
        self.fc1, self.bn = nn.Linear(d, hidden), nn.BatchNorm1d(hidden)
        self.act, self.norm = nn.GELU(), nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.fc2(self.norm(self.act(self.bn(self.fc1(x)))))


class Functional(nn.Module):
    """Only functional calls on parameters the module owns: the torch.compile spelling."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3), nn.Parameter(torch.randn(8) * 0.1)
        self.register_buffer("mean", torch.randn(8) * 0.1)
        self.register_buffer("var", torch.rand(8) + 0.5)
        self.gamma, self.beta = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.randn(8) * 0.1)
        self.w2 = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.2)
        self.fw, self.fb = nn.Parameter(torch.randn(10, 8) * 0.3), nn.Parameter(torch.randn(10) * 0.1)

    def forward(self, x):
        y = F.conv2d(x, self.w1, self.b1, padding=1)
        y = F.silu(F.batch_norm(y, self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-5))
        z = torch.relu(F.conv2d(y, self.w2, None, stride=1, padding=1) + y)
        return F.linear(z.mean((2, 3)), self.fw, self.fb).sigmoid()


# name -> (model factory, input factory taking a batch size)
ZOO = {
    "seed_convnet": (ConvNet, lambda n: torch.randn(n, 1, 32, 32)),
    "resnet_blocks": (ResNetish, lambda n: torch.randn(n, 3, 17, 15)),
    "mobilenet_v2_blocks": (MobileNetish, lambda n: torch.randn(n, 3, 19, 19)),
    "mlp_bn_gelu_layernorm": (MLP, lambda n: torch.randn(n, 24)),
    "functional_only": (Functional, lambda n: torch.randn(n, 3, 9, 11)),
}
