"""The benchmark model set: the seed ConvNet, ResNet-18, MobileNetV2, EfficientNet-B0 (torchvision's
architectures, written out here so the bench needs nothing beyond torch), a transformer FFN block,
GPT-2's MLP block as Hugging Face writes it, a BERT-base-width encoder layer stack and a small MLP with
BatchNorm1d."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt.compiler.workflow.demo import ConvNet


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    def __init__(self, classes: int = 1000):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        self.relu, self.maxpool = nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(512, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(inplace=True), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, classes: int = 1000):
        super().__init__()
        layers = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(inplace=True)]
        cin = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class FFNBlock(nn.Module):
    """A pre-norm transformer MLP block: x + W2 gelu(W1 LN(x))."""

    def __init__(self, d: int = 512, hidden: int = 2048):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 linear: the weight stored (in, out), x @ W + b through torch.addmm on a 2-d view."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.n_out = n_out
        self.weight, self.bias = nn.Parameter(torch.randn(n_in, n_out) * 0.02), nn.Parameter(torch.randn(n_out) * 0.02)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.n_out,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class GPT2MLP(nn.Module):
    """GPT-2's MLP block (768 wide, 3072 hidden) as Hugging Face's transformers writes it: pre-norm, its Conv1D
    linears and NewGELUActivation's written-out tanh GELU, plus the residual."""

    def __init__(self, d: int = 768, hidden: int = 3072):
        super().__init__()
        self.ln, self.c_fc, self.c_proj = nn.LayerNorm(d), Conv1D(d, hidden), Conv1D(hidden, d)

    def forward(self, x):
        h = self.c_fc(self.ln(x))
        h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))
        return x + self.c_proj(h)


class MBConv(nn.Module):
    """EfficientNet's block: 1x1 expand, depthwise kxk, squeeze-excite, 1x1 project, SiLU, residual."""

    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int):
        super().__init__()
        mid, squeeze = cin * expand, max(1, cin // 4)
        layers = [] if expand == 1 else [nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.SiLU()]
        layers += [nn.Conv2d(mid, mid, k, stride, k // 2, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.SiLU()]
        self.expand = nn.Sequential(*layers)
        self.se_reduce, self.se_expand = nn.Conv2d(mid, squeeze, 1), nn.Conv2d(squeeze, mid, 1)
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.expand(x)
        y = y * torch.sigmoid(self.se_expand(F.silu(self.se_reduce(F.adaptive_avg_pool2d(y, 1)))))
        y = self.project(y)
        return x + y if self.residual else y


class EfficientNetB0(nn.Module):
    # (expand, channels, repeats, stride, kernel), as in torchvision's efficientnet_b0
    STAGES = [(1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3), (6, 112, 3, 1, 5),
              (6, 192, 4, 2, 5), (6, 320, 1, 1, 3)]

    def __init__(self, classes: int = 1000):
        super().__init__()
        layers, cin = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.SiLU()], 32
        for expand, cout, repeats, stride, k in self.STAGES:
            for i in range(repeats):
                layers.append(MBConv(cin, cout, expand, k, stride if i == 0 else 1))
                cin = cout
        layers += [nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.SiLU()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, classes)

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class EncoderLayers(nn.Module):
    """Two BERT-base-width post-norm encoder layers (768 wide, 12 heads, 3072 MLP) on (B, T, 768)."""

    def __init__(self, d: int = 768, heads: int = 12, layers: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.ModuleList(nn.Linear(d, 3 * d) for _ in range(layers))
        self.out = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.fc1 = nn.ModuleList(nn.Linear(d, 4 * d) for _ in range(layers))
        self.fc2 = nn.ModuleList(nn.Linear(4 * d, d) for _ in range(layers))
        self.ln1 = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.ln2 = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))

    def forward(self, x):
        b, t, d = x.shape
        for qkv, out, fc1, fc2, ln1, ln2 in zip(self.qkv, self.out, self.fc1, self.fc2, self.ln1, self.ln2):
            q, k, v = (y.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for y in qkv(x).chunk(3, -1))
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
            x = ln1(x + out(a))
            x = ln2(x + fc2(F.gelu(fc1(x))))
        return x


class MLPBN(nn.Module):
    """A small tabular MLP: Linear -> BatchNorm1d -> ReLU, three times, then a 10-way head."""

    def __init__(self, d: int = 64, hidden: int = 256):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                  nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                  nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.head(self.body(x))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


# name -> (model factory, input shape)
MODELS = {
    "convnet_b1": (ConvNet, (1, 1, 32, 32)),
    "convnet_b64": (ConvNet, (64, 1, 32, 32)),
    "resnet18_b1": (ResNet18, (1, 3, 224, 224)),
    "resnet18_b8": (ResNet18, (8, 3, 224, 224)),
    "mobilenetv2_b1": (MobileNetV2, (1, 3, 224, 224)),
    "efficientnet_b0_b1": (EfficientNetB0, (1, 3, 224, 224)),
    "ffn_b4x128": (FFNBlock, (4, 128, 512)),
    "gpt2_mlp_b1x128": (GPT2MLP, (1, 128, 768)),
    "encoder_b1x128": (EncoderLayers, (1, 128, 768)),
    "mlp_bn_b1": (MLPBN, (1, 64)),
}
