"""Remove nodes that return their input unchanged.

    dropout (eval)   identity   x.contiguous() of a contiguous x
    torchvision's stochastic_depth(x, p, mode, training=False) (eval)
    x.to(dtype/device x already has)   x.view(shape)/x.reshape(shape) to x's own shape, for every batch size

Each rule maps a node to the value it forwards, or None for no match.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.passes import PassContext, register
from graphopt.passes.lib.query import arg, module_of, tensor_meta

_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                      # aten's spellings, what the torch.export route gives (their flag is ``train``)
                      torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout)


def _first(node: fx.Node) -> Any:
    return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None


def _module_noop(gm: fx.GraphModule, node: fx.Node) -> Any:
    m = module_of(gm, node)
    if isinstance(m, nn.Identity) or (isinstance(m, _DROPOUT_MODULES) and not m.training):
        return _first(node) if len(node.args) == 1 else None
    return None


def _dropout_noop(gm: fx.GraphModule, node: fx.Node) -> Any:
    return _first(node) if arg(node, 2, "training", node.kwargs.get("train", True)) is False else None


def _is_stochastic_depth(target: Any) -> bool:
    """torchvision.ops.stochastic_depth (EfficientNet, ConvNeXt, Swin, MaxViT): a function torchvision wraps for
    torch.fx, so symbolic tracing keeps the call, opaque, where the module form traces through to it. Known by
    name, so that graphopt needs no torchvision."""
    return getattr(target, "__module__", None) == "torchvision.ops.stochastic_depth" \
        and getattr(target, "__name__", None) == "stochastic_depth"


def _stochastic_depth_noop(gm: fx.GraphModule, node: fx.Node) -> Any:
    """stochastic_depth(input, p, mode, training=True) returns its input when not training or when p is 0."""
    if not _is_stochastic_depth(node.target):
        return None
    return _first(node) if arg(node, 3, "training", True) is False or arg(node, 1, "p", None) == 0.0 else None


def _contiguous_noop(gm: fx.GraphModule, node: fx.Node) -> Any:
    x, meta = _first(node), tensor_meta(_first(node))
    format_ok = arg(node, 1, "memory_format", torch.contiguous_format) == torch.contiguous_format
    if meta is None or not format_ok or meta.memory_format != torch.contiguous_format:
        return None
    return x


def _to_noop(gm: fx.GraphModule, node: fx.Node) -> Any:
    x, meta = _first(node), tensor_meta(_first(node))
    if meta is None or node.kwargs.get("copy") or node.kwargs.get("memory_format") not in (None, torch.preserve_format):
        return None
    rest = list(node.args[1:]) + [v for k, v in node.kwargs.items() if k in ("dtype", "device")]
    dtypes = [a for a in rest if isinstance(a, torch.dtype)]
    others = [a for a in rest if not isinstance(a, torch.dtype)]
    if others or len(dtypes) != 1 or dtypes[0] != meta.dtype:
        return None  # a device move or a copy we cannot prove to be a no-op
    return x


def _float_noop(gm: fx.GraphModule, node: fx.Node) -> Any:
    meta = tensor_meta(_first(node))
    return _first(node) if meta is not None and len(node.args) == 1 and meta.dtype == torch.float32 else None


def _shape_args(node: fx.Node) -> tuple:
    rest = node.args[1:] or (node.kwargs.get("shape"),)
    return tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else tuple(rest)


def _reshape_noop(gm: fx.GraphModule, node: fx.Node) -> Any:
    """A view to the input's own shape that stays one for any batch size: (-1 or x.size(0), *rest)."""
    x, meta = _first(node), tensor_meta(_first(node))
    shape = _shape_args(node)
    if meta is None or not shape or len(shape) != len(meta.shape):
        return None
    b = shape[0]
    batch_ok = b == -1 or (isinstance(b, fx.Node) and b.op == "call_method" and b.target == "size" and b.args == (x, 0))
    rest_ok = all(isinstance(s, int) and s == d for s, d in zip(shape[1:], meta.shape[1:]))
    return x if batch_ok and rest_ok else None


RULES: list[tuple[str, Any, Callable[[fx.GraphModule, fx.Node], Any]]] = [
    ("call_module", None, _module_noop),
    *[("call_function", f, _dropout_noop) for f in _DROPOUT_FUNCTIONS],
    ("call_function", None, _stochastic_depth_noop),
    ("call_method", "contiguous", _contiguous_noop),
    ("call_method", "to", _to_noop),
    ("call_method", "float", _float_noop),
    ("call_method", "view", _reshape_noop),
    ("call_method", "reshape", _reshape_noop),
    ("call_function", torch.reshape, _reshape_noop),
]


@register("exact")
def remove_noops(gm: fx.GraphModule, ctx: PassContext) -> int:
    rewrites = 0
    for node in list(gm.graph.nodes):
        for op, target, rule in RULES:
            if node.op != op or (target is not None and node.target != target):
                continue
            forwarded = rule(gm, node)
            if forwarded is None:
                continue
            node.replace_all_uses_with(forwarded)
            gm.graph.erase_node(node)
            rewrites += 1
            break
    return rewrites
