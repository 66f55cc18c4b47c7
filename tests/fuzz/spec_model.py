"""A model built from a JSON spec: the fuzzer's programs.

    {"input": [N, C, H, W], "ops": [{"kind": "conv", "x": 0, "module": "conv0", ...}, ...], "outputs": [i, ...]}

Value 0 is the input; op i produces value i + 1 and reads earlier values by index. Ops that
own parameters name a module; two ops naming the same module share it (one conv called at
two sites, one BatchNorm shared). The spec is plain JSON, so a failing case is saved as data.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

ACT_MODULES = {"relu": nn.ReLU, "relu_inplace": lambda: nn.ReLU(inplace=True), "relu6": nn.ReLU6,
               "hardtanh": lambda: nn.Hardtanh(-0.5, 1.5), "silu": nn.SiLU, "gelu": nn.GELU,
               "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "hardswish": nn.Hardswish, "sigmoid": nn.Sigmoid,
               "tanh": nn.Tanh, "leaky_relu": lambda: nn.LeakyReLU(0.1)}
ACT_CALLS = {"F.relu": F.relu, "torch.relu": torch.relu, "relu_": lambda x: x.relu_(), "F.relu6": F.relu6,
             "clamp": lambda x: torch.clamp(x, -1.0, 2.0), "clamp_min": lambda x: x.clamp(min=0.0),
             "F.silu": F.silu, "F.gelu": F.gelu, "F.hardswish": F.hardswish, "sigmoid": torch.sigmoid,
             "tanh_": lambda x: x.tanh_(), "F.leaky_relu": lambda x: F.leaky_relu(x, 0.2)}


def _module(op: dict) -> nn.Module:
    kind = op["kind"]
    if kind == "conv":
        return nn.Conv2d(op["cin"], op["cout"], op["k"], op["stride"], op["padding"], groups=op["groups"],
                         bias=op["bias"], padding_mode=op.get("padding_mode", "zeros"))
    if kind == "bn2d":
        return nn.BatchNorm2d(op["c"])
    if kind == "bn1d":
        return nn.BatchNorm1d(op["c"])
    if kind == "linear":
        return nn.Linear(op["fin"], op["fout"], bias=op["bias"])
    if kind == "act_module":
        return ACT_MODULES[op["act"]]()
    if kind == "pool_module":
        return nn.MaxPool2d(2) if op["pool"] == "max" else nn.AvgPool2d(2)
    if kind == "dropout":
        return nn.Dropout(0.3)
    if kind == "identity":
        return nn.Identity()
    if kind == "bias_add":
        return _Bias(op["c"])
    raise ValueError(kind)


class _Bias(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.shift = nn.Parameter(torch.randn(1, c, 1, 1) * 0.1)

    def forward(self, x):
        return x + self.shift  # broadcasting: not a residual


class SpecModel(nn.Module):
    def __init__(self, spec: dict):
        super().__init__()
        self.spec = spec
        self.mods = nn.ModuleDict()
        for op in spec["ops"]:
            if "module" in op and op["module"] not in self.mods:
                self.mods[op["module"]] = _module(op)

    def forward(self, x):
        vals = [x]
        for op in self.spec["ops"]:
            vals.append(self._apply(op, vals))
        outs = [vals[i] for i in self.spec["outputs"]]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _apply(self, op: dict, vals: list):
        kind, a = op["kind"], vals[op["x"]]
        if "module" in op:
            return self.mods[op["module"]](a)
        if kind == "act_call":
            return ACT_CALLS[op["act"]](a)
        if kind == "add":
            return a + vals[op["y"]]
        if kind == "add_":
            return a.add_(vals[op["y"]])  # writes a: a hazard when a is read again later
        if kind == "mul":
            return a * op["c"]
        if kind == "cat":
            return torch.cat([a, vals[op["y"]]], dim=1)
        if kind == "pool_call":
            return F.max_pool2d(a, 2) if op["pool"] == "max" else F.avg_pool2d(a, 2)
        if kind == "permute_roundtrip":
            return a.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        if kind == "flatten":
            return torch.flatten(a, 1)
        if kind == "view_flat":
            return a.view(a.size(0), -1)
        if kind == "mean_hw":
            return a.mean((2, 3))
        if kind == "dropout_call":
            return F.dropout(a, 0.2, training=False)
        raise ValueError(kind)
