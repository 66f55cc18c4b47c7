"""Fold the rank checks a model makes on its own values, where the answer holds at every batch size.

    torch._assert(x.ndim == 4, "expected 4D input")     (timm's BatchNormAct2d, on every conv's output)
        ->  nothing, where x's rank is 4 whatever the batch size

A check like this reads the conv's output a second time, so the conv has two readers and neither
fold_conv_bn nor fuse_conv_act may take it: on timm's EfficientNet-Lite0 every batch norm stayed a
separate op. Folded, the conv's output has its one reader again.

A rank is known where it follows from the graph's inputs, whose rank the optimized module checks on
every call (compiler/core/module.py): an input's rank, a constant's, and what ops that keep their input's
rank (convolutions, norms, activations, pooling, linear modules, padding, a cat, a slice, a piece of a chunk
or split) or broadcast two ranks (+ - * /) make of them; each answer must also be the rank the value had at
the example. A squeeze, a reshape, an integer index and anything else unknown ends the chain (its rank could
depend on the batch size, or on an argument), and a read of it stays; where the graph changes a rank in place
(``x.squeeze_()``, or a write through ``out=``), every read stays. Then comparisons of two known numbers are
decided, and a ``torch._assert`` whose condition is decided True is erased, with what only it read. One
decided False stays, to raise as eager does. (What only an erased check read goes with it, as dead code
goes: an error eager would raise computing it, at some other input, is not raised.)
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import TensorMetadata

from graphopt.passes import PassContext, register
from graphopt.passes.lib.query import arg, constant_value, is_impure, module_of, tensor_meta

# modules and functions whose output has the rank of their first argument
_KEEP_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                 nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.Linear,
                 nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
                 nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Identity,
                 nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                 nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
# (not F.linear: a 1-d weight drops a dimension; not clamp: a tensor bound broadcasts)
_KEEP_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.batch_norm, F.layer_norm, F.group_norm,
                   F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu, F.elu,
                   F.mish, F.sigmoid, F.tanh, F.dropout, F.avg_pool2d, F.adaptive_avg_pool2d,
                   F.pad, F.interpolate, torch.relu, torch.sigmoid, torch.tanh, torch.conv2d, torch.batch_norm}
_KEEP_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "float"}
# elementwise ops of two operands: the broadcast rank, the larger of the two (a Python number's is 0)
_BROADCAST_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv,
                        torch.add, torch.sub, torch.mul, torch.div}
_BROADCAST_METHODS = {"add", "sub", "mul", "div"}
_SPLITS = {torch.chunk, torch.split, torch.tensor_split, "chunk", "split", "tensor_split"}  # (pieces of one rank)
_RESHAPES_IN_PLACE = {"squeeze_", "unsqueeze_", "resize_", "resize_as_", "set_", "as_strided_", "sparse_resize_",
                      "sparse_resize_and_clear_"}
_COMPARE = {operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge}


def _ranks(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """The rank of each value that has one at every batch size, in one pass over the graph in its order. A rule's
    answer must also be the rank the value had at the example (its shape metadata): a table entry that is wrong for
    some call form (a broadcasting bound, a 1-d weight, ...) then leaves the value unknown instead of folding a
    wrong constant."""
    known: dict[fx.Node, int] = {}

    def of(v: Any) -> int | None:
        if isinstance(v, bool) or not isinstance(v, (int, float, fx.Node)):
            return None
        return known.get(v) if isinstance(v, fx.Node) else 0

    for node in gm.graph.nodes:
        rank = _rank(gm, node, of)
        meta = tensor_meta(node)
        if rank is not None and isinstance(meta, TensorMetadata) and len(meta.shape) == rank:
            known[node] = rank
    return known


def _rank(gm: fx.GraphModule, node: fx.Node, of) -> int | None:
    if node.op == "placeholder":  # the module checks each tensor input's rank on every call
        meta = tensor_meta(node)
        return len(meta.shape) if isinstance(meta, TensorMetadata) else None
    if node.op == "get_attr":
        value = constant_value(gm, node)
        return value.dim() if value is not None else None
    first = node.args[0] if node.args else None
    if node.op == "call_module":
        keeps = type(module_of(gm, node)) in _KEEP_MODULES  # (exact types: a subclass may do anything)
        return of(first) if keeps and isinstance(first, fx.Node) else None
    function, method = node.op == "call_function", node.op == "call_method"
    if node.kwargs.get("out") is not None or not (function or method):
        return None
    if (function and node.target in _BROADCAST_FUNCTIONS or method and node.target in _BROADCAST_METHODS) \
            and len(node.args) == 2 and set(node.kwargs) <= {"alpha"}:
        ranks = [of(a) for a in node.args]
        return None if None in ranks else max(ranks)
    if function and node.target in (torch.cat, torch.concat):  # (cat takes tensors of one rank and keeps it)
        parts = first if isinstance(first, (list, tuple)) and first else [None]
        ranks = {of(p) for p in parts}
        return ranks.pop() if len(ranks) == 1 and None not in ranks else None
    if function and node.target is operator.getitem and len(node.args) == 2:
        return _item_rank(*node.args, of)
    keeps = node.target in _KEEP_FUNCTIONS if function else node.target in _KEEP_METHODS
    reduces = node.target in ((torch.mean, torch.sum) if function else ("mean", "sum"))
    if keeps or reduces and arg(node, 2, "keepdim", False) is True:
        return of(first) if isinstance(first, fx.Node) else None
    return None


def _item_rank(source: Any, index: Any, of) -> int | None:
    """The rank of ``source[index]``: a piece of a chunk or split has its tensor's; slices keep a tensor's."""
    if not isinstance(source, fx.Node):
        return None
    if source.op in ("call_function", "call_method") and source.target in _SPLITS and isinstance(index, int):
        return of(source.args[0]) if source.args and isinstance(source.args[0], fx.Node) else None
    slices = index if isinstance(index, tuple) else (index,)
    return of(source) if all(isinstance(i, slice) or i is Ellipsis for i in slices) else None


def _reshapes_in_place(node: fx.Node) -> bool:
    """An op that may change a tensor's rank in place (``x.squeeze_()``, or any write through ``out=``, which
    resizes its target): after it, a value's rank need not be its producer's."""
    if node.op not in ("call_function", "call_method"):
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name.split(".")[0] in _RESHAPES_IN_PLACE or "out" in node.kwargs


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
    _erase(node)


def _erase(node: fx.Node) -> None:
    """Erase ``node``, then whatever it alone read that nothing else reads now and that may go (a weight read only
    for its rank, the operands of a check's message)."""
    graph, gm = node.graph, node.graph.owning_module
    stack, erased = list(node.all_input_nodes), {node}
    graph.erase_node(node)
    while stack:
        operand = stack.pop()
        if operand not in erased and not operand.users and not is_impure(gm, operand):
            stack.extend(operand.all_input_nodes)
            erased.add(operand)
            graph.erase_node(operand)


@register("exact")
def fold_rank_checks(gm: fx.GraphModule, ctx: PassContext) -> int:
    reads = [n for n in gm.graph.nodes if _rank_read(n) is not None]
    if not reads:
        return 0
    moved = next((n for n in gm.graph.nodes if _reshapes_in_place(n)), None)
    if moved is not None:  # (where one is, each read stays: which values it changes is an alias question)
        for node in reads:
            ctx.miss(f"the graph changes a rank in place ({moved.name})", node)
        return 0
    ranks, rewrites = _ranks(gm), 0
    for node in list(gm.graph.nodes):
        x = _rank_read(node)
        if x is not None:
            if x not in ranks:
                ctx.miss("rank not known at every batch size", node)
                continue
            _substitute(node, ranks[x])
            rewrites += 1
        elif node.op == "call_function" and node.target in _COMPARE and len(node.args) == 2 and not node.kwargs \
                and all(type(a) is int for a in node.args):
            _substitute(node, node.target(*node.args))
            rewrites += 1
        elif node.op == "call_function" and node.target is torch._assert and not node.users \
                and arg(node, 0, "condition", None) is True:
            _erase(node)
            rewrites += 1
    return rewrites
