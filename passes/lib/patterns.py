"""Recognizers for the ops the passes rewrite, in every spelling a graph can have.

symbolic_trace leaves ``call_module`` nodes (nn.Conv2d, nn.ReLU(inplace=True), ...);
torch.compile's graphs and functional models give ``call_function`` / ``call_method``
(torch.conv2d, F.relu, x.relu_(), operator.iadd, ...). Each recognizer returns a small record
or None, and never touches the graph.

None means "not this op". A record whose ``problem`` is set is this op in a form the rewrites cannot
take (a BatchNorm in training mode, a conv with asymmetric padding): the pass reports the problem
(``ctx.miss``) instead of skipping it in silence. The other fields of such a record may be None.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.kernels import activations
from graphopt.passes.lib.query import arg, attr_value, constant_value, module_of, number, tensor_meta

# A "ref" below is a graph value (fx.Node) or, for a module's parameter, its attribute path (str).


@dataclass
class Conv:
    node: fx.Node
    input: fx.Node
    dim: int
    weight: Any  # ref
    bias: Any  # ref or None
    stride: list[int]
    padding: list[int] | None
    dilation: list[int]
    groups: int
    owner: str | None  # the module's target for call_module, the weight's attribute for get_attr
    pad_mode: str = "zeros"  # reflect / replicate / circular: F.pad(input, pad, pad_mode) first, then padding 0
    pad: list[int] | None = None
    problem: str | None = None

    def padded_input(self, gm: fx.GraphModule) -> fx.Node:
        """The conv's input, padded as its module pads it; call inside ``graph.inserting_before``."""
        if self.pad_mode == "zeros":
            return self.input
        return gm.graph.call_function(F.pad, (self.input, self.pad, self.pad_mode))

    def weight_tensor(self, gm: fx.GraphModule) -> torch.Tensor | None:
        return _tensor(gm, self.weight)

    def bias_tensor(self, gm: fx.GraphModule) -> torch.Tensor | None:
        return _tensor(gm, self.bias)


@dataclass
class Linear:
    node: fx.Node
    input: fx.Node
    weight: Any
    bias: Any
    owner: str | None

    def weight_tensor(self, gm: fx.GraphModule) -> torch.Tensor | None:
        return _tensor(gm, self.weight)

    def bias_tensor(self, gm: fx.GraphModule) -> torch.Tensor | None:
        return _tensor(gm, self.bias)


@dataclass
class BatchNorm:
    node: fx.Node
    input: fx.Node
    mean: torch.Tensor | None
    var: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    problem: str | None = None

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, t) in float64 with bn(y) = y * s + t per channel."""
        inv = torch.rsqrt(self.var.double() + self.eps)
        s = inv * (self.weight.double() if self.weight is not None else 1.0)
        t = (self.bias.double() if self.bias is not None else 0.0) - self.mean.double() * s
        return s, t


def _tensor(gm: fx.GraphModule, ref: Any) -> torch.Tensor | None:
    if ref is None:
        return None
    if isinstance(ref, str):
        return attr_value(gm, ref)
    return constant_value(gm, ref)


def _tuple(v: Any, dim: int) -> list[int] | None:
    if isinstance(v, int):
        return [v] * dim
    if isinstance(v, (tuple, list)) and len(v) == dim and all(isinstance(i, int) for i in v):
        return list(v)
    return None


def _padding(padding: Any, kernel: list[int], dilation: list[int], dim: int) -> list[int] | None:
    if padding == "valid":
        return [0] * dim
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return None if any(t % 2 for t in total) else [t // 2 for t in total]  # asymmetric: no match
    return _tuple(padding, dim)


_CONV_FUNCTIONS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def match_conv(gm: fx.GraphModule, node: fx.Node) -> Conv | None:
    if node.op == "call_module":
        m = module_of(gm, node)
        dim = next((d for cls, d in _CONV_MODULES.items() if type(m) is cls), None)
        if dim is None or not isinstance(node.args[0], fx.Node) or len(node.args) != 1:
            return None
        weight, bias = f"{node.target}.weight", (f"{node.target}.bias" if m.bias is not None else None)
        raw = (m.stride, m.padding if m.padding_mode == "zeros" else 0, m.dilation, m.groups)
        kernel, owner, x = list(m.kernel_size), node.target, node.args[0]
    elif node.op == "call_function" and node.target in _CONV_FUNCTIONS:
        dim = _CONV_FUNCTIONS[node.target]
        x, weight, bias = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")
        raw = (arg(node, 3, "stride", 1), arg(node, 4, "padding", 0), arg(node, 5, "dilation", 1),
               arg(node, 6, "groups", 1))
        meta = tensor_meta(weight)
        if not isinstance(x, fx.Node) or not isinstance(weight, fx.Node) or meta is None:
            return None
        if bias is not None and not isinstance(bias, fx.Node):
            return None
        kernel, owner = list(meta.shape[2:]), (weight.target if weight.op == "get_attr" else None)
    else:
        return None
    stride, dilation, groups = _tuple(raw[0], dim), _tuple(raw[2], dim), raw[3]
    if stride is None or dilation is None or not isinstance(groups, int):
        return None
    padding = _padding(raw[1], kernel, dilation, dim)
    if padding is None and raw[1] != "same":
        return None
    problem = "asymmetric padding (padding='same' with an even kernel)" if padding is None else None
    if node.op == "call_module" and m.padding_mode != "zeros":
        return Conv(node, x, dim, weight, bias, stride, padding, dilation, groups, owner, m.padding_mode,
                    list(m._reversed_padding_repeated_twice), problem)
    return Conv(node, x, dim, weight, bias, stride, padding, dilation, groups, owner, problem=problem)


def match_linear(gm: fx.GraphModule, node: fx.Node) -> Linear | None:
    if node.op == "call_module" and type(module_of(gm, node)) is nn.Linear:
        m = module_of(gm, node)
        if len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
            return None
        bias = f"{node.target}.bias" if m.bias is not None else None
        return Linear(node, node.args[0], f"{node.target}.weight", bias, node.target)
    if node.op == "call_function" and node.target is F.linear:
        x, weight, bias = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")
        if not isinstance(x, fx.Node) or not isinstance(weight, fx.Node):
            return None
        if bias is not None and not isinstance(bias, fx.Node):
            return None
        return Linear(node, x, weight, bias, weight.target if weight.op == "get_attr" else None)
    return None


def match_batch_norm(gm: fx.GraphModule, node: fx.Node) -> BatchNorm | None:
    """A batch norm; foldable (no ``problem``) in inference mode with constant statistics and affine parameters."""
    if node.op == "call_module":
        m = module_of(gm, node)
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) or len(node.args) != 1 \
                or not isinstance(node.args[0], fx.Node):
            return None
        problem = "BatchNorm in training mode" if m.training else \
            "BatchNorm without running statistics" if m.running_mean is None else None
        return BatchNorm(node, node.args[0], m.running_mean, m.running_var, m.weight, m.bias, m.eps, problem)
    if node.op == "call_function" and node.target is F.batch_norm:
        x = arg(node, 0, "input")
        if not isinstance(x, fx.Node):
            return None
        mean, var = constant_value(gm, arg(node, 1, "running_mean")), constant_value(gm, arg(node, 2, "running_var"))
        w, b = arg(node, 3, "weight"), arg(node, 4, "bias")
        training, eps = arg(node, 5, "training", False), arg(node, 7, "eps", 1e-5)
        weight, bias = constant_value(gm, w), constant_value(gm, b)
        problem = None
        if training is not False:
            problem = "BatchNorm in training mode"
        elif mean is None or var is None:
            problem = "BatchNorm statistics not constant"
        elif (w is not None and weight is None) or (b is not None and bias is None) or number(eps) is None:
            problem = "BatchNorm parameters computed at run time"
        return BatchNorm(node, x, mean, var, weight, bias, number(eps) or 0.0, problem)
    return None


# ---------------------------------------------------------------- activations (spellings: kernels/activations.py)


def match_act(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, str] | None:
    """(input, act string) for an elementwise activation the fused ops implement (not one writing into ``out=``:
    absorbing it would drop that write)."""
    if "out" in node.kwargs:
        return None
    act = None
    if node.op == "call_module":
        m = module_of(gm, node)
        found = activations.MODULES.get(type(m))
        if found is not None and len(node.args) == 1:
            record, attrs = found
            act = activations.spell(record, tuple(getattr(m, a) for a in attrs))
    else:
        found = activations.FUNCTIONS.get(node.target) if node.op == "call_function" else \
            activations.METHODS.get(node.target) if node.op == "call_method" else None
        if found is not None:
            record, call = found
            act = activations.spell(record, tuple(arg(node, i, key, default) for i, key, default in call.args))
    x = node.args[0] if node.args else node.kwargs.get("input")
    return (x, act) if act and isinstance(x, fx.Node) else None


def match_add(node: fx.Node) -> tuple[fx.Node, fx.Node, bool] | None:
    """(a, b, writes_a) for a + b with tensor operands and no alpha; writes_a for a += b."""
    if node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add):
        inplace = node.target is operator.iadd
    elif node.op == "call_method" and node.target in ("add", "add_"):
        inplace = node.target == "add_"
    else:
        return None
    if len(node.args) != 2 or any(k != "alpha" or v != 1 for k, v in node.kwargs.items()):
        return None
    a, b = node.args
    return (a, b, inplace) if isinstance(a, fx.Node) and isinstance(b, fx.Node) else None
