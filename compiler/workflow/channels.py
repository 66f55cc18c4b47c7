"""Structured channel pruning: physically remove output channels, and everything that reads them.

Channels flow along the graph in *channel spaces*: a conv or linear output starts one; ops that
keep channels where they are (batch norm, activations, pooling, dropout, a depthwise conv) pass
it on; adding or multiplying two tensors ties their spaces together (a residual add, a
squeeze-excite gate), so their channels must be pruned as one; a concatenation along channels
makes a space of segments, each pruned as its own producer says; ``flatten`` of an (N, C, H, W)
tensor spreads channel c over columns c*H*W ... (c+1)*H*W for the linear that reads it. The
spaces, and which producers they tie together, are the connected components of a networkx graph
(``dependency_groups``). A space some op reads in a way this pass does not understand (a view
to a fixed shape, a graph output, a reduction over channels, ...) is left whole.

Within a group, each channel's importance is summed over the group's producers (``l1``: the L1
norm of its filter; ``bn_scale``: |gamma| of the batch norm right after the producer), and the
most important ``keep`` survive, with ``keep`` rounded up to a multiple of 8 so kernels stay fast.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.kernels import activations
from graphopt.passes.lib.query import tensor_meta

ROUND_TO = 8
CRITERIA = ("l1", "bn_scale")

# elementwise ops keep channels: every spelling of the fused ops' activations (kernels/activations.py), and more
_SAME_CHANNELS_MODULES = (*activations.MODULES, nn.BatchNorm1d, nn.BatchNorm2d, nn.Hardsigmoid, nn.Dropout,
                          nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.ELU,
                          nn.Mish)
_SAME_CHANNELS_FUNCTIONS = {*activations.FUNCTIONS, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                            F.adaptive_max_pool2d, F.hardsigmoid, F.elu, F.mish}
_SAME_CHANNELS_METHODS = {*activations.METHODS, "contiguous"}
_TIE_FUNCTIONS = {operator.add, operator.mul, torch.add, torch.mul, operator.iadd, operator.imul}
_TIE_METHODS = {"add", "add_", "mul", "mul_"}


@dataclass
class Space:
    """One channel space: who writes it (producers), what passes it on, and who reads it."""

    id: int
    channels: int
    producers: list[fx.Node] = field(default_factory=list)
    frozen: str | None = None  # why it cannot be pruned


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels and m.groups > 1


def _producer(gm: fx.GraphModule, node: fx.Node) -> bool:
    m = _module(gm, node)
    if isinstance(m, nn.Conv2d):
        return m.groups == 1
    return isinstance(m, nn.Linear)


def _channel_dim_reduction(node: fx.Node) -> bool:
    """mean / sum over the spatial dims only (dims 2, 3 of a 4-d tensor): channels stay at dim 1."""
    if node.op != "call_method" or node.target not in ("mean", "sum"):
        return False
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    return sorted(d % 4 for d in dims) == [2, 3]


def _flatten(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is torch.flatten:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        return start == 1 and len(node.args) <= 2 and "end_dim" not in node.kwargs
    if node.op == "call_method" and node.target == "flatten":
        return (node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)) == 1
    m = _module(gm, node)
    return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1


def _cat(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target is not torch.cat:
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim == 1 and all(isinstance(a, fx.Node) for a in node.args[0])


def dependency_groups(gm: fx.GraphModule) -> tuple[dict[fx.Node, tuple], list[Space]]:
    """Each node's channels (("space", id), ("flat", id, hw), ("cat", [(id, n), ...])) and the spaces.

    Spaces tied together (by adds, multiplies, depthwise convs) are merged: the connected
    components of a networkx graph whose vertices are the initial spaces."""
    carries: dict[fx.Node, tuple] = {}
    spaces: list[Space] = []
    ties = nx.Graph()
    frozen: dict[int, str] = {}

    def new_space(node: fx.Node, channels: int) -> int:
        spaces.append(Space(len(spaces), channels))
        ties.add_node(len(spaces) - 1)
        spaces[-1].producers.append(node)
        return len(spaces) - 1

    def freeze(value: tuple | None, why: str) -> None:
        if value is None:
            return
        ids = [value[1]] if value[0] in ("space", "flat") else [i for i, _ in value[1]]
        for i in ids:
            frozen.setdefault(i, why)

    for node in gm.graph.nodes:
        inputs = [carries.get(a) for a in node.all_input_nodes]
        m = _module(gm, node)
        meta = tensor_meta(node)
        if node.op == "output":
            for v in inputs:
                freeze(v, "it is a graph output")
            continue
        if _producer(gm, node):
            source = carries.get(node.args[0])
            x_meta = tensor_meta(node.args[0])
            if isinstance(m, nn.Linear) and source is not None and (
                    source[0] == "cat" or (source[0] == "space" and (x_meta is None or len(x_meta.shape) != 2))):
                freeze(source, "a linear reads it along another dim than channels")
            if isinstance(m, nn.Conv2d) and source is not None and source[0] == "flat":
                freeze(source, "a conv reads it flattened")
            carries[node] = ("space", new_space(node, m.out_channels if isinstance(m, nn.Conv2d)
                                                else m.out_features))
            if isinstance(m, nn.Linear) and (meta is None or len(meta.shape) != 2):
                freeze(carries[node], "a linear on more than 2 dims")
            continue
        first = carries.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if first is not None and first[0] == "space" and (
                isinstance(m, _SAME_CHANNELS_MODULES) or _is_depthwise(m)
                or (node.op == "call_function" and node.target in _SAME_CHANNELS_FUNCTIONS)
                or (node.op == "call_method" and node.target in _SAME_CHANNELS_METHODS)
                or _channel_dim_reduction(node)) and all(v is None or v == first for v in inputs[1:]):
            carries[node] = first
            continue
        if first is not None and first[0] == "flat" and (isinstance(m, (nn.Dropout, nn.Identity, nn.ReLU))
                                                         or node.target in (F.dropout, F.relu, torch.relu)):
            carries[node] = first
            continue
        if (node.op == "call_function" and node.target in _TIE_FUNCTIONS) or (
                node.op == "call_method" and node.target in _TIE_METHODS):
            tensors = [v for v in inputs if v is not None]
            if tensors and all(v[0] == "space" for v in tensors) and len(node.all_input_nodes) == len(tensors):
                for v in tensors[1:]:
                    ties.add_edge(tensors[0][1], v[1])
                carries[node] = tensors[0]
                continue
        if first is not None and first[0] == "space" and _flatten(gm, node):
            shape = tensor_meta(node.args[0]).shape if tensor_meta(node.args[0]) is not None else None
            if shape is not None and len(shape) >= 2:
                carries[node] = ("flat", first[1], math.prod(shape[2:]))
                continue
        if _cat(node) and all(carries.get(a) is not None and carries[a][0] == "space" for a in node.args[0]):
            carries[node] = ("cat", [(carries[a][1], spaces[carries[a][1]].channels) for a in node.args[0]])
            continue
        for v in inputs:
            freeze(v, f"{node.format_node()[:80]} reads it")
    # merge tied spaces: one representative per connected component
    merged: list[Space] = []
    index: dict[int, int] = {}
    for component in sorted(nx.connected_components(ties), key=min):
        ids = sorted(component)
        channels = {spaces[i].channels for i in ids}
        group = Space(len(merged), spaces[ids[0]].channels,
                      [p for i in ids for p in spaces[i].producers],
                      next((frozen[i] for i in ids if i in frozen), None))
        if len(channels) > 1:
            group.frozen = "tied spaces of different widths"
        for i in ids:
            index[i] = group.id
        merged.append(group)

    def remap(v: tuple) -> tuple:
        if v[0] == "space":
            return ("space", index[v[1]])
        if v[0] == "flat":
            return ("flat", index[v[1]], v[2])
        return ("cat", [(index[i], n) for i, n in v[1]])

    return {n: remap(v) for n, v in carries.items()}, merged


def _importance(gm: fx.GraphModule, group: Space, criterion: str) -> torch.Tensor:
    score = torch.zeros(group.channels, dtype=torch.float64)
    for node in group.producers:
        m = _module(gm, node)
        if criterion == "l1":
            score += m.weight.detach().abs().flatten(1).sum(1).double()
        else:
            bn = next((gm.get_submodule(u.target) for u in node.users if u.op == "call_module"
                       and isinstance(gm.get_submodule(u.target), (nn.BatchNorm1d, nn.BatchNorm2d))), None)
            if bn is None or bn.weight is None:
                score += m.weight.detach().abs().flatten(1).sum(1).double()  # no batch norm: fall back to l1
            else:
                score += bn.weight.detach().abs().double()
    return score


def kept_channels(channels: int, ratio: float) -> int:
    """How many of ``channels`` survive ``ratio``: rounded up to a multiple of 8, never more than there are."""
    keep = max(1, math.ceil(channels * (1.0 - ratio)))
    return min(channels, math.ceil(keep / ROUND_TO) * ROUND_TO)


def plan(gm: fx.GraphModule, ratio: float, criterion: str) -> tuple[dict, list[Space], dict[int, torch.Tensor]]:
    """(node channels, spaces, {space id: sorted indices to keep}) for the prunable spaces."""
    carries, spaces = dependency_groups(gm)
    keep = {}
    for group in spaces:
        if group.frozen or not group.producers:
            continue
        n = kept_channels(group.channels, ratio)
        if n >= group.channels:
            continue
        keep[group.id] = torch.sort(torch.topk(_importance(gm, group, criterion), n, sorted=False).indices).values
    return carries, spaces, keep


def _slice_param(module: nn.Module, name: str, index: torch.Tensor, dim: int) -> None:
    p = getattr(module, name, None)
    if p is None:
        return
    value = p.detach().index_select(dim, index).clone()
    if isinstance(p, nn.Parameter):
        setattr(module, name, nn.Parameter(value, requires_grad=p.requires_grad))
    else:
        module.register_buffer(name, value)


def _input_index(v: tuple, keep: dict[int, torch.Tensor], spaces: list[Space]) -> torch.Tensor | None:
    """Which input channels (or flattened columns) of a consumer survive; None when all do."""
    if v[0] == "space":
        return keep.get(v[1])
    if v[0] == "flat":
        index = keep.get(v[1])
        if index is None:
            return None
        return (index[:, None] * v[2] + torch.arange(v[2])[None, :]).flatten()
    parts, offset, changed = [], 0, False
    for sid, n in v[1]:
        index = keep.get(sid)
        changed |= index is not None
        parts.append((index if index is not None else torch.arange(n)) + offset)
        offset += n
    return torch.cat(parts) if changed else None


def apply(gm: fx.GraphModule, ratio: float, criterion: str = "l1") -> dict[str, tuple[int, int]]:
    """Prune the modules ``gm`` calls, in place; returns {module name: (channels before, after)}."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, not {criterion!r}")
    carries, spaces, keep = plan(gm, ratio, criterion)
    changed: dict[str, tuple[int, int]] = {}
    for node in gm.graph.nodes:
        m = _module(gm, node)
        if m is None:
            continue
        own = carries.get(node)
        inp = carries.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if _producer(gm, node):
            in_index = _input_index(inp, keep, spaces) if inp is not None else None
            if in_index is not None:
                _slice_param(m, "weight", in_index, 1)
                if isinstance(m, nn.Conv2d):
                    m.in_channels = len(in_index)
                else:
                    m.in_features = len(in_index)
            out_index = keep.get(own[1]) if own is not None and own[0] == "space" else None
            if out_index is not None:
                before = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
                _slice_param(m, "weight", out_index, 0)
                _slice_param(m, "bias", out_index, 0)
                if isinstance(m, nn.Conv2d):
                    m.out_channels = len(out_index)
                else:
                    m.out_features = len(out_index)
                changed[node.target] = (before, len(out_index))
            continue
        index = keep.get(own[1]) if own is not None and own[0] == "space" else None
        if index is None:
            continue
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.num_features != len(index):
            for name in ("weight", "bias", "running_mean", "running_var"):
                _slice_param(m, name, index, 0)
            m.num_features = len(index)
        elif _is_depthwise(m) and m.out_channels != len(index):
            _slice_param(m, "weight", index, 0)
            _slice_param(m, "bias", index, 0)
            m.in_channels = m.out_channels = m.groups = len(index)
    return changed
