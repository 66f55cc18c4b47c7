"""The second capture route: torch.export, for models symbolic tracing cannot follow.

torch.export runs the model with real Python control flow on fake tensors and records aten ops,
with the parameters as get_attr reads (``ep.module()``). The batch dimension of every input is
exported dynamic where the model allows it (``Dim.AUTO``). The aten graph is then *raised* to the
spellings symbolic tracing gives (``aten.conv2d`` -> ``torch.conv2d``, ``aten.linear`` ->
``F.linear``, ``aten.add.Tensor`` -> ``operator.add``, ``aten.view`` -> ``x.view(...)``, ``aten.index`` ->
``x[:, idx]``, ...), so every
pass, the saver and the ONNX exporter see one dialect. An aten op with no such spelling stays as it is.

Outputs come back as a tensor or a flat tuple of tensors (torch.export's output pytree, e.g. a
ModelOutput, is flattened).
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

aten = torch.ops.aten

# aten overload -> (torch-level callable, argument order or None for "as is")
_SPECIAL: dict[Any, tuple[Callable, tuple[int, ...] | None]] = {
    aten.batch_norm.default: (F.batch_norm, (0, 3, 4, 1, 2, 5, 6, 7)),  # F.batch_norm(x, mean, var, w, b, ...)
    aten.linear.default: (F.linear, None),
    aten.add.Tensor: (operator.add, None),
    aten.sub.Tensor: (operator.sub, None),
    aten.mul.Tensor: (operator.mul, None),
    aten.div.Tensor: (operator.truediv, None),
    # (transformers' mask building: masks combined with & and |; timm's MobileViT: a split into given sizes)
    aten.__and__.Tensor: (operator.and_, None),
    aten.__or__.Tensor: (operator.or_, None),
    aten.__xor__.Tensor: (operator.xor, None),
    aten.split_with_sizes.default: (torch.split, None),
}
_METHODS = {"view", "expand", "contiguous", "to", "size", "sym_size", "type_as", "repeat", "expand_as", "new_ones",
            "new_zeros", "add_", "sub_", "mul_", "div_"}
_PLAIN_OPS = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,  # operator.* only without kwargs
              aten.__and__.Tensor, aten.__or__.Tensor, aten.__xor__.Tensor}
_METADATA_ASSERTS = {aten._assert_tensor_metadata.default}


def _raised(node: fx.Node) -> tuple[str, Any, tuple, dict] | None:
    """(op, target, args, kwargs) of the torch-level spelling of an aten call, or None to keep it."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return None
    name = target._opname
    if target in (aten.slice.Tensor, aten.select.int) and not node.kwargs:
        return _indexing(node)
    indices = node.args[1] if target is aten.index.Tensor and len(node.args) == 2 else None
    if isinstance(indices, (list, tuple)) and not node.kwargs and all(i is None or isinstance(i, fx.Node)
                                                                        for i in indices):
        # x[:, idx] (transformers' mask building): the getitem symbolic tracing gives, which Python lowers to this call
        return "call_function", operator.getitem, (node.args[0], tuple(
            slice(None) if i is None else i for i in indices)), {}
    if target in _SPECIAL and not (target in _PLAIN_OPS and node.kwargs):
        fn, order = _SPECIAL[target]
        # (the order lists the arguments the torch-level call takes: aten's trailing cudnn_enabled flag is dropped)
        args = tuple(node.args[i] for i in order if i < len(node.args)) if order else node.args
        return "call_function", fn, args, dict(node.kwargs)
    if name in _METHODS:
        kwargs = dict(node.kwargs)
        if name in ("to", "new_ones", "new_zeros"):  # (aten.to.dtype_layout, aten.new_ones: the method's call
            # needs no layout, strided being all it makes, nor pin_memory)
            if kwargs.pop("layout", None) not in (None, torch.strided) or kwargs.pop("pin_memory", None):
                return None
        return "call_method", "size" if name == "sym_size" else name, node.args, kwargs
    if target in _INTERPOLATE:
        return _interpolate(node)
    f_call = _f_call(node, name)
    if f_call is not None:
        return f_call
    for namespace in (torch, torch._C._nn):
        fn = getattr(namespace, name, None)
        if fn is not None and callable(fn) and not name.startswith("_"):
            return "call_function", fn, node.args, dict(node.kwargs)
    return None


# ops whose torch-level spelling is F's (torch._C._nn.silu_ is no op a saved graph may call, nor one the fusion
# passes know): aten name -> how many positional arguments F's call takes (before ``inplace``)
_F_CALLS = {"silu": 1, "hardswish": 1, "hardsigmoid": 1, "mish": 1, "relu6": 1, "leaky_relu": 2,
                   "hardtanh": 3, "elu": 2, "gelu": 1, "softplus": 3, "adaptive_avg_pool2d": 2}
_NO_INPLACE = {"gelu", "softplus", "adaptive_avg_pool2d"}  # (F's call has no in-place form)


def _f_call(node: fx.Node, name: str) -> tuple[str, Any, tuple, dict] | None:
    """aten.silu(x) -> F.silu(x), aten.silu_(x) -> F.silu(x, inplace=True), and the like; None where F's call
    would not say the same (elu's scale and input_scale other than 1, more arguments than F takes)."""
    base = name[:-1] if name.endswith("_") else name
    if base not in _F_CALLS or hasattr(torch, name) or (name != base and base in _NO_INPLACE):
        return None
    args, kwargs = tuple(node.args), dict(node.kwargs)
    if base == "elu":
        if any(a != 1 for a in args[2:]) or set(kwargs) - {"alpha"}:
            return None
        args = args[:2]
    if len(args) > _F_CALLS[base]:
        return None
    if name != base:
        kwargs["inplace"] = True
    return "call_function", getattr(F, base), args, kwargs


# aten's resizes F.interpolate calls -> its mode (torch._C._nn.upsample_bilinear2d is no op a saved graph may call:
# timm's MobileViT could not be saved, found by a model-zoo run)
_INTERPOLATE = {aten.upsample_nearest2d.vec: "nearest", aten.upsample_bilinear2d.vec: "bilinear",
                aten.upsample_bicubic2d.vec: "bicubic"}


def _interpolate(node: fx.Node) -> tuple[str, Any, tuple, dict] | None:
    """aten.upsample_<mode>2d.vec(x, size, [align_corners,] scale_factors) -> F.interpolate(x, size= or
    scale_factor=, mode=, align_corners=): the call F.interpolate makes of it, so the same numbers."""
    mode = _INTERPOLATE[node.target]
    if node.kwargs:
        return None
    if mode == "nearest":
        x, size, scales = (tuple(node.args) + (None, None))[:3]
        kwargs = {"mode": mode}
    else:
        x, size, corners, scales = (tuple(node.args) + (None, None, None))[:4]
        kwargs = {"mode": mode, "align_corners": corners}
    if (size is None) == (scales is None):
        return None
    kwargs["size" if size is not None else "scale_factor"] = list(size if size is not None else scales)
    return "call_function", F.interpolate, (x,), kwargs


def _indexing(node: fx.Node) -> tuple[str, Any, tuple, dict] | None:
    """aten.slice / aten.select as the indexing they come from: x[:, a:b] / x[:, i]."""
    x, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
    if not isinstance(dim, int):
        return None
    if dim < 0:
        value = x.meta.get("val") if isinstance(x, fx.Node) else None
        if value is None:
            return None
        dim += value.dim()
    if node.target is aten.select.int:
        index = node.args[2]
    else:
        start, end, step = (tuple(node.args[2:]) + (None, None, 1))[:3]
        index = slice(None if start == 0 else start, None if end == 2 ** 63 - 1 else end, None if step == 1 else step)
    return "call_function", operator.getitem, (x, (slice(None),) * dim + (index,)), {}


def raise_aten(gm: fx.GraphModule) -> int:
    """Rewrite aten calls to their torch-level spellings, in place; returns how many were rewritten."""
    count = 0
    for node in list(gm.graph.nodes):
        # torch.export's input guards, and its record that a .to() found the dtype and device it was traced with
        # (the module checks its inputs' own: module.py)
        if node.op == "call_module" and node.target == "_guards_fn" or node.target in _METADATA_ASSERTS:
            gm.graph.erase_node(node)
            continue
        raised = _raised(node) if node.op == "call_function" else None
        if raised is None:
            continue
        op, target, args, kwargs = raised
        with gm.graph.inserting_before(node):
            new = gm.graph.create_node(op, target, args, kwargs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    return count


def _module_name(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return str(path).replace("L['self'].", "").replace("L__self___", "") or None


def export_capture(model: nn.Module, inputs: tuple) -> fx.GraphModule:
    """``model`` (a deep copy, in eval mode) through torch.export, raised to torch-level calls."""
    dims = tuple({0: torch.export.Dim.AUTO} if isinstance(t, torch.Tensor) and t.dim() > 0 else None
                 for t in inputs)
    program = torch.export.export(model, inputs, dynamic_shapes=dims, strict=False)
    exported = program.module()
    # (a batch torch.export kept static, as it does a batch of 1 or where the model fixes it: the module then
    # refuses another batch size by name, compiler/core/module.py, instead of failing inside its code)
    users = set(program.graph_signature.user_inputs)
    values = [n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder" and n.name in users]
    fixed = [i for i, (t, v) in enumerate(zip(inputs, values)) if isinstance(t, torch.Tensor) and t.dim() > 0
             and isinstance(getattr(v, "shape", (None,))[0], int)]
    graph, env = fx.Graph(), {}
    single = program.call_spec.out_spec is not None and program.call_spec.out_spec.is_leaf()
    for node in exported.graph.nodes:
        if node.op == "output":
            leaves = [env[n] if isinstance(n, fx.Node) else n for n in node.args[0]]
            graph.output(leaves[0] if single else tuple(leaves))
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
        module = _module_name(node)
        if module:
            env[node].meta["module"] = module
    gm = fx.GraphModule(exported, graph, type(model).__name__)
    gm.meta["fixed_batch"] = fixed
    raise_aten(gm)
    graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
