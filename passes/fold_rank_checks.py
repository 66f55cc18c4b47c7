"""Fold the rank checks a model makes on its own values, where the answer holds at every batch size.

    torch._assert(x.ndim == 4, "expected 4D input")     (timm's BatchNormAct2d, on every conv's output)
        ->  nothing, where x's rank is 4 whatever the batch size

A check like this reads the conv's output a second time, so the conv has two readers and neither
fold_conv_bn nor fuse_conv_act may take it: on timm's EfficientNet-Lite0 every batch norm stayed a
separate op. Folded, the conv's output has its one reader again.

A rank is known where it follows from the graph's inputs, whose rank the optimized module checks on
every call (compiler/core/module.py): an input's rank, a constant's, and what ops that keep their input's
rank (convolutions, norms, activations, pooling, linears) or broadcast two ranks (+ - * /) make of
them. A squeeze, a reshape, an index and anything else unknown ends the chain: its rank could depend on
the batch size, and a read of it stays. Then comparisons of two known numbers are decided, and a
``torch._assert`` whose condition is decided True is erased. One decided False stays, to raise as eager
does.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.passes import PassContext, register
from graphopt.passes.lib.query import arg, constant_value, module_of, tensor_meta

# modules and functions whose output has the rank of their first argument
_KEEP_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                 nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.Linear,
                 nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
                 nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Identity,
                 nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                 nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_KEEP_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.batch_norm, F.layer_norm, F.group_norm, F.linear,
                   F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu, F.elu,
                   F.mish, F.sigmoid, F.tanh, F.dropout, F.avg_pool2d, F.adaptive_avg_pool2d,
                   torch.relu, torch.sigmoid, torch.tanh, torch.clamp, torch.conv2d, torch.batch_norm}
_KEEP_METHODS = {"relu", "sigmoid", "tanh", "clamp", "contiguous", "clone", "float"}
# elementwise ops of two operands: the broadcast rank, the larger of the two (a Python number's is 0)
_BROADCAST_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv,
                        torch.add, torch.sub, torch.mul, torch.div}
_BROADCAST_METHODS = {"add", "sub", "mul", "div"}
_COMPARE = {operator.eq: operator.eq, operator.ne: operator.ne, operator.lt: operator.lt, operator.le: operator.le,
            operator.gt: operator.gt, operator.ge: operator.ge}


class _Ranks:
    """The rank of each value that has one at every batch size (None: not known)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm, self.known = gm, {}

    def of(self, v: Any) -> int | None:
        if isinstance(v, bool) or not isinstance(v, (int, float, fx.Node)):
            return None
        if not isinstance(v, fx.Node):
            return 0
        if v not in self.known:
            self.known[v] = self._rank(v)
        return self.known[v]

    def _rank(self, node: fx.Node) -> int | None:
        if node.op == "placeholder":  # the module checks each tensor input's rank on every call
            meta = tensor_meta(node)
            return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None
        if node.op == "get_attr":
            value = constant_value(self.gm, node)
            return value.dim() if value is not None else None
        first = node.args[0] if node.args else None
        if node.op == "call_module":
            keeps = type(module_of(self.gm, node)) in _KEEP_MODULES  # (exact types: a subclass may do anything)
            return self.of(first) if keeps and isinstance(first, fx.Node) else None
        function, method = node.op == "call_function", node.op == "call_method"
        if node.kwargs.get("out") is not None or not (function or method):
            return None
        if (function and node.target in _BROADCAST_FUNCTIONS or method and node.target in _BROADCAST_METHODS) \
                and len(node.args) == 2 and set(node.kwargs) <= {"alpha"}:
            ranks = [self.of(a) for a in node.args]
            return None if None in ranks else max(ranks)
        keeps = node.target in _KEEP_FUNCTIONS if function else node.target in _KEEP_METHODS
        reduces = node.target in ((torch.mean, torch.sum) if function else ("mean", "sum"))
        if keeps or reduces and arg(node, 2, "keepdim", False) is True:
            return self.of(first) if isinstance(first, fx.Node) else None
        return None


def _rank_read(node: fx.Node) -> fx.Node | None:
    """The tensor whose rank ``node`` reads (``x.ndim``, ``x.dim()``), else None."""
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2 and node.args[1] == "ndim":
        return node.args[0] if isinstance(node.args[0], fx.Node) else None
    if node.op == "call_method" and node.target == "dim" and len(node.args) == 1 and not node.kwargs:
        return node.args[0]
    return None


def _substitute(node: fx.Node, value: Any) -> None:
    """Every reader of ``node`` takes ``value`` (a Python constant) in its place; the node is erased."""
    for user in list(node.users):
        user.args = fx.node.map_arg(user.args, lambda a: value if a is node else a)
        user.kwargs = fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)
    node.graph.erase_node(node)


@register("exact")
def fold_rank_checks(gm: fx.GraphModule, ctx: PassContext) -> int:
    ranks, rewrites = _Ranks(gm), 0
    for node in list(gm.graph.nodes):
        x = _rank_read(node)
        if x is not None:
            rank = ranks.of(x)
            if rank is None:
                ctx.miss("rank may depend on the batch size", node)
                continue
            _substitute(node, rank)
            rewrites += 1
        elif node.op == "call_function" and node.target in _COMPARE and len(node.args) == 2 and not node.kwargs \
                and all(type(a) is int for a in node.args):
            _substitute(node, _COMPARE[node.target](*node.args))
            rewrites += 1
        elif node.op == "call_function" and node.target is torch._assert and not node.users \
                and arg(node, 0, "condition", None) is True:
            gm.graph.erase_node(node)
            rewrites += 1
    return rewrites
