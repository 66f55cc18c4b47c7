"""An fx graph as JSON, and back, without executing anything from the file.

Targets are written as dotted names and read back through an allow-list: aten and graphopt
ops, the aten bindings on ``torch`` itself, ``torch.nn.functional``, ``torch._C._nn``,
``operator`` and ``math``; methods must be public Tensor methods. Names are resolved by
walking attributes from those modules (no import of anything the file names). Leaf modules
(nn.LayerNorm, nn.MaxPool2d, ...) are first inlined into functional calls on their tensors,
so that a saved graph is only calls and tensors.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx

from compiler.errors import GraphoptError, LoadError

FORMAT_VERSION = 1
_ROOTS = {"torch": torch, "operator": operator, "math": math}
_DENY = {"torch.from_file", "torch.load", "torch.save", "torch.set_default_device", "torch.set_default_dtype",
         "torch.manual_seed", "torch.seed", "torch.set_num_threads"}
_MEMORY_FORMATS = {str(f).removeprefix("torch."): f for f in
                   (torch.contiguous_format, torch.channels_last, torch.preserve_format, torch.channels_last_3d)}


def target_name(target: Any) -> str:
    """The dotted name a call_function target is saved under; raises if it would not load back."""
    if isinstance(target, torch._ops.OpOverload):
        name = f"torch.ops.{target.namespace}.{target._opname}.{target._overloadname}"
    else:
        module = {"_operator": "operator"}.get(getattr(target, "__module__", None), getattr(target, "__module__", ""))
        name = f"{module}.{getattr(target, '__name__', '')}"
    if resolve_target(name, strict=False) is not target:
        raise GraphoptError(f"cannot save a graph that calls {target!r}: it is not an allow-listed torch op",
                            hint="saved graphs call only torch / aten / graphopt ops")
    return name


def _allowed(name: str, obj: Any) -> bool:
    if name in _DENY or not callable(obj):
        return False
    if name.startswith(("torch.ops.aten.", "torch.ops.graphopt.")):
        return isinstance(obj, torch._ops.OpOverload)
    if name.startswith("torch.nn.functional."):
        return getattr(obj, "__module__", None) == "torch.nn.functional"
    if name.startswith(("torch._C._nn.", "operator.", "math.")):
        return name.count(".") == (3 if name.startswith("torch._C._nn.") else 1)
    # the aten bindings on torch itself (torch.conv2d, torch.relu_, torch.flatten, ...)
    return name.count(".") == 1 and type(obj).__name__ == "builtin_function_or_method" and obj.__module__ == "torch"


def resolve_target(name: str, strict: bool = True) -> Any:
    parts = name.split(".")
    obj = _ROOTS.get(parts[0])
    for part in parts[1:]:
        if obj is None or part.startswith("__"):
            obj = None
            break
        obj = getattr(obj, part, None)
    if obj is None or not _allowed(name, obj):
        if strict:
            raise LoadError(f"graph.json calls {name!r}, which is not on the allow-list of torch ops",
                            hint="the artifact was not written by graphopt, or was altered")
        return None
    return obj


def _allowed_method(name: str) -> bool:
    return not name.startswith("_") and callable(getattr(torch.Tensor, name, None))


# ---------------------------------------------------------------- arguments


def encode(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, (list, tuple)):
        items = [encode(v) for v in value]
        return items if isinstance(value, list) else {"tuple": items}
    if isinstance(value, dict):
        return {"dict": {k: encode(v) for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, slice):
        return {"slice": [encode(value.start), encode(value.stop), encode(value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    raise GraphoptError(f"cannot save an argument of type {type(value).__name__}: {value!r}")


def decode(value: Any, nodes: dict[str, fx.Node]) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [decode(v, nodes) for v in value]
    if not isinstance(value, dict) or len(value) != 1:
        raise LoadError(f"graph.json holds a malformed argument: {value!r}")
    (kind, v), = value.items()
    if kind == "node":
        if v not in nodes:
            raise LoadError(f"graph.json refers to node {v!r} before defining it")
        return nodes[v]
    if kind == "tuple":
        return tuple(decode(x, nodes) for x in v)
    if kind == "dict":
        return {k: decode(x, nodes) for k, x in v.items()}
    if kind == "float" and v in ("inf", "-inf", "nan"):
        return float(v)
    if kind == "dtype" and isinstance(getattr(torch, str(v), None), torch.dtype):
        return getattr(torch, v)
    if kind == "memory_format" and v in _MEMORY_FORMATS:
        return _MEMORY_FORMATS[v]
    if kind == "device":
        return torch.device(str(v))
    if kind == "slice":
        return slice(*(decode(x, nodes) for x in v))
    if kind == "ellipsis":
        return Ellipsis
    raise LoadError(f"graph.json holds an argument of unknown kind {kind!r}")


# ---------------------------------------------------------------- graphs


class _InlineTracer(fx.Tracer):
    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return False


def _batch_norm(gm: fx.GraphModule, node: fx.Node, module: torch.nn.Module) -> fx.Node:
    """An inference BatchNorm as F.batch_norm (its forward checks input.dim(), which does not trace)."""
    def attr(name: str):
        return gm.graph.get_attr(f"{node.target}.{name}") if getattr(module, name) is not None else None

    args = (node.args[0], attr("running_mean"), attr("running_var"), attr("weight"), attr("bias"), False, 0.0,
            module.eps)
    return gm.graph.call_function(torch.nn.functional.batch_norm, args)


_CONV_TRANSPOSE = {torch.nn.ConvTranspose1d: torch.conv_transpose1d, torch.nn.ConvTranspose2d: torch.conv_transpose2d,
                   torch.nn.ConvTranspose3d: torch.conv_transpose3d}


def _conv_transpose(gm: fx.GraphModule, node: fx.Node, module: torch.nn.Module) -> fx.Node | None:
    """A transposed convolution without output_size as torch.conv_transposeNd (its forward checks
    the input's rank, which does not trace)."""
    if len(node.args) != 1 or node.kwargs or module.padding_mode != "zeros":
        return None
    weight = gm.graph.get_attr(f"{node.target}.weight")
    bias = gm.graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
    args = (node.args[0], weight, bias, module.stride, module.padding, module.output_padding, module.groups,
            module.dilation)
    return gm.graph.call_function(_CONV_TRANSPOSE[type(module)], args)


def _attention(gm: fx.GraphModule, node: fx.Node, module: torch.nn.MultiheadAttention) -> bool:
    """nn.MultiheadAttention as F.multi_head_attention_forward (its forward branches on the inputs).

    Its numbers are the functional path's, close to but not bitwise those of the module's fused
    fast path: used for ONNX export, where the check is a tolerance, not for saved modules."""
    q, k, v = (node.args + (None, None, None))[:3]
    plain = (module._qkv_same_embed_dim and module.bias_k is None and set(node.kwargs) <= {"need_weights"}
             and all(isinstance(t, fx.Node) for t in (q, k, v)) and not module.training
             and all(u.op == "call_function" and u.target is operator.getitem for u in node.users))
    if not plain:
        return False
    g = gm.graph
    with g.inserting_before(node):
        if module.batch_first:
            q, k, v = (g.call_method("transpose", (t, 1, 0)) for t in (q, k, v))
        attr = lambda name: g.get_attr(f"{node.target}.{name}")  # noqa: E731
        out = g.call_function(torch.nn.functional.multi_head_attention_forward, (
            q, k, v, module.embed_dim, module.num_heads, attr("in_proj_weight"), attr("in_proj_bias"), None, None,
            module.add_zero_attn, module.dropout, attr("out_proj.weight"), attr("out_proj.bias")),
            {"training": False, "need_weights": node.kwargs.get("need_weights", True)})
        result = g.call_function(operator.getitem, (out, 0))
        if module.batch_first:
            result = g.call_method("transpose", (result, 1, 0))
        weights = g.call_function(operator.getitem, (out, 1))
    for user in list(node.users):
        user.replace_all_uses_with(result if user.args[1] == 0 else weights)
        g.erase_node(user)
    g.erase_node(node)
    return True


def inline_modules(gm: fx.GraphModule, attention: bool = False) -> fx.GraphModule:
    """Replace each call_module by the functional graph of that module's forward
    (``attention=True``: nn.MultiheadAttention too, through its functional path)."""
    for node in [n for n in gm.graph.nodes if n.op == "call_module"]:
        module = gm.get_submodule(node.target)
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not module.training \
                and module.running_mean is not None:
            with gm.graph.inserting_before(node):
                node.replace_all_uses_with(_batch_norm(gm, node, module))
            gm.graph.erase_node(node)
            continue
        if attention and isinstance(module, torch.nn.MultiheadAttention) and _attention(gm, node, module):
            continue
        if type(module) in _CONV_TRANSPOSE:
            with gm.graph.inserting_before(node):
                functional = _conv_transpose(gm, node, module)
            if functional is not None:
                node.replace_all_uses_with(functional)
                gm.graph.erase_node(node)
                continue
        try:
            sub = _InlineTracer().trace(module)
        except Exception as e:
            raise GraphoptError(f"cannot save: module {node.target} ({type(module).__name__}) does not trace to "
                                f"functional calls: {e}", node=node.format_node()) from e
        placeholders = [n for n in sub.nodes if n.op == "placeholder"]
        env = dict(zip(placeholders, node.args))
        for p in placeholders[len(node.args):]:
            env[p] = node.kwargs.get(p.target, p.args[0] if p.args else None)
        with gm.graph.inserting_before(node):
            for inner in sub.nodes:
                if inner.op == "placeholder":
                    continue
                if inner.op == "output":
                    node.replace_all_uses_with(fx.node.map_arg(inner.args[0], lambda n: env[n]))
                    break
                target = f"{node.target}.{inner.target}" if inner.op in ("get_attr", "call_module") else inner.target
                env[inner] = gm.graph.create_node(inner.op, target, fx.node.map_arg(inner.args, lambda n: env[n]),
                                                  fx.node.map_arg(inner.kwargs, lambda n: env[n]))
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def graph_to_json(gm: fx.GraphModule) -> dict:
    nodes = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            raise GraphoptError(f"inline modules before saving (node {node.name})")
        target = target_name(node.target) if node.op == "call_function" else node.target
        nodes.append({"name": node.name, "op": node.op, "target": target, "args": encode(node.args),
                      "kwargs": encode(node.kwargs)})
    return {"format": "graphopt-graph", "version": FORMAT_VERSION, "nodes": nodes}


def graph_from_json(data: Any) -> fx.Graph:
    if not isinstance(data, dict) or data.get("format") != "graphopt-graph" or not isinstance(data.get("nodes"), list):
        raise LoadError("graph.json is not a graphopt graph")
    if data.get("version") != FORMAT_VERSION:
        raise LoadError(f"graph.json has format version {data.get('version')!r}; this graphopt reads {FORMAT_VERSION}",
                        hint="save the model again with this version of graphopt")
    graph, nodes = fx.Graph(), {}
    for entry in data["nodes"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise LoadError(f"graph.json holds a malformed node: {entry!r}")
        op, target = entry.get("op"), entry.get("target")
        if op == "call_function":
            target = resolve_target(str(target))
        elif op == "call_method" and not (isinstance(target, str) and _allowed_method(target)):
            raise LoadError(f"graph.json calls the method {target!r}, which is not a public Tensor method")
        elif op not in ("placeholder", "get_attr", "output", "call_method") or not isinstance(target, str):
            raise LoadError(f"graph.json holds a node of kind {op!r}, which a saved graph never has")
        args, kwargs = decode(entry.get("args", {"tuple": []}), nodes), decode(entry.get("kwargs", {"dict": {}}), nodes)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise LoadError(f"graph.json node {entry['name']!r} has malformed arguments")
        nodes[entry["name"]] = graph.create_node(op, target, args, kwargs, name=entry["name"])
    graph.lint()
    return graph
