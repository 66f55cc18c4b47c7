"""Read-only questions about a graph: constants, shapes, purity, aliasing, readers.

Nothing here changes the graph: passes check everything with these first and mutate only once a
match is certain (the helpers that mutate are in rewrite.py).
"""

from __future__ import annotations

import operator
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn as nn

# ---------------------------------------------------------------- attributes


def attr_value(gm: fx.GraphModule, target: str) -> Any:
    """The object behind a get_attr target (``gm.graph.get_attr`` is the other thing: it makes a node)."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def constant_value(gm: fx.GraphModule, arg: Any) -> torch.Tensor | None:
    """The tensor behind a get_attr node, or None for anything computed at run time."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = attr_value(gm, arg.target)
        return value if isinstance(value, torch.Tensor) else None
    return None


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def tensor_meta(node: Any):
    return node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None


def same_shape(a: fx.Node, b: fx.Node) -> bool:
    ma, mb = tensor_meta(a), tensor_meta(b)
    return ma is not None and mb is not None and hasattr(ma, "shape") and hasattr(mb, "shape") \
        and ma.shape == mb.shape and ma.dtype == mb.dtype


def number(v: Any) -> float | None:
    """A Python int or float argument as a float (not a bool); None for anything else."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """An argument given by position or keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


# ---------------------------------------------------------------- purity and aliasing

_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul, operator.setitem}
_INPLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
                    "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__"}
_RANDOM = {"rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "bernoulli", "multinomial",
           "normal", "poisson", "randperm", "dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d",
           "dropout2d", "dropout3d", "rrelu", "uniform_", "normal_", "bernoulli_", "exponential_", "random_"}
_VIEWS = {"view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "squeeze", "unsqueeze",
          "expand", "expand_as", "narrow", "select", "detach", "contiguous", "as_strided", "chunk", "split",
          "unbind", "view_as", "reshape_as", "movedim", "swapaxes", "diagonal", "unfold", "real", "imag",
          "getitem", "T", "mT", "to", "type_as", "float", "squeeze_", "unsqueeze_",
          "ravel", "broadcast_to", "tensor_split", "split_with_sizes", "hsplit", "vsplit", "dsplit", "unsafe_split",
          "unsafe_chunk", "swapdims", "moveaxis", "adjoint", "atleast_1d", "atleast_2d", "atleast_3d", "view_as_real",
          "view_as_complex", "conj", "resolve_conj", "resolve_neg", "H", "mH",
          # these return their input itself when nothing is to be done (x.cpu() on the CPU, x.type(x.dtype), +x)
          "cpu", "type", "positive", "getattr",
          # these return their input itself when they do nothing (eval dropout, identity)
          "dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d", "identity"}
_ALIAS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                  nn.FeatureAlphaDropout, nn.Flatten, nn.Unflatten)


def _name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def is_inplace(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Does this node write into one of its inputs?"""
    if node.op == "call_module":
        return bool(getattr(module_of(gm, node), "inplace", False))
    if node.op not in ("call_function", "call_method"):
        return False
    if node.kwargs.get("inplace") is True or node.target in _INPLACE_OPERATORS or "out" in node.kwargs:
        return True
    name = _name(node)
    if (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_DUNDERS:
        return True
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def is_random(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        m = module_of(gm, node)
        return m.training and isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout))
    if node.op in ("call_function", "call_method"):
        name = _name(node)
        if name in _RANDOM:
            training = arg(node, 2, "training", True) if "dropout" in name else True
            return bool(training)
    return False


def is_impure(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A node that may not be removed, merged or evaluated ahead of time."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "call_module" and not isinstance(module_of(gm, node), nn.Module):
        return True
    return is_inplace(gm, node) or is_random(gm, node) or (node.op == "call_function" and node.is_impure())


def written(node: fx.Node) -> fx.Node | None:
    """The value an in-place node writes into: ``out=``, else its first argument (given by position or as
    ``input=`` / ``self=`` / ``tensor=``); None where that is not a graph value."""
    v = node.kwargs.get("out")
    if v is None:
        v = node.args[0] if node.args else next((node.kwargs[k] for k in ("input", "self", "tensor")
                                                  if k in node.kwargs), None)
    return v if isinstance(v, fx.Node) else None


def _is_view(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and _name(node) in _VIEWS


def alias_roots(graph: fx.Graph) -> dict[fx.Node, fx.Node]:
    """Map each node to a representative of the set of nodes that may share its storage."""
    gm = graph.owning_module
    parent: dict[fx.Node, fx.Node] = {}

    def find(n: fx.Node) -> fx.Node:
        while parent.get(n, n) is not n:
            n = parent[n]
        return n

    for node in graph.nodes:
        parent.setdefault(node, node)
        # views share storage with their base; in-place ops return their (mutated) input, out= ops their out
        base = written(node) if node.op != "call_module" else \
            node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        module = module_of(gm, node) if node.op == "call_module" and gm is not None else None
        module_alias = module is not None and (isinstance(module, _ALIAS_MODULES) or getattr(module, "inplace", False))
        if base is not None and (_is_view(node) or _returns_self(node) or module_alias):
            parent[find(node)] = find(base)
    return {n: find(n) for n in graph.nodes}


def _returns_self(node: fx.Node) -> bool:
    name = _name(node)
    return node.target in _INPLACE_OPERATORS or (name.endswith("_") and not name.endswith("__")) \
        or name in _INPLACE_DUNDERS or node.kwargs.get("inplace") is True or "out" in node.kwargs


def mutated_roots(gm: fx.GraphModule) -> set[fx.Node]:
    """Alias roots of every value that some in-place op writes to."""
    roots = alias_roots(gm.graph)
    out = set()
    for node in gm.graph.nodes:
        target = written(node) if is_inplace(gm, node) else None
        if target is not None:
            out.add(roots[target])
    return out


def mutated_between(gm: fx.GraphModule, values: Iterable[Any], first: fx.Node, last: fx.Node) -> bool:
    """Is any of ``values`` (graph values; anything else is skipped), or anything sharing its storage, written in
    place strictly between two nodes?"""
    nodes = [v for v in values if isinstance(v, fx.Node)]
    if first is last or not nodes:
        return False  # (nothing is between a node and itself)
    roots = alias_roots(gm.graph)  # (once for all the values)
    watched = {roots[v] for v in nodes}
    node = first.next
    while node is not last and node.op != "root":
        target = written(node) if is_inplace(gm, node) else None
        if target is not None and roots[target] in watched:
            return True
        node = node.next
    return False


# ---------------------------------------------------------------- traversal


def only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def call_sites(gm: fx.GraphModule, target: str) -> int:
    """How many nodes use a submodule or attribute (shared modules are called more than once)."""
    return sum(1 for n in gm.graph.nodes if n.op in ("call_module", "get_attr") and n.target == target)


def shares_tensor(gm: fx.GraphModule, tensor: torch.Tensor, owner: str) -> bool:
    """Is ``tensor`` also reachable from a module or attribute other than ``owner``?"""
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target != owner:
            if any(p is tensor for p in gm.get_submodule(n.target).parameters()):
                return True
        if n.op == "get_attr" and n.target != owner and not n.target.startswith(owner + "."):
            if attr_value(gm, n.target) is tensor:
                return True
    return False


def calls(gm: fx.GraphModule, *targets: Any) -> list[fx.Node]:
    """The call_function nodes of these targets, in graph order."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]
