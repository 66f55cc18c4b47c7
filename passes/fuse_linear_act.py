"""Fuse linear [+ activation] into one ``graphopt::linear_act``.

    act(linear(x, W, b))        ->  linear_act(x, W, b, act)
    act(view(linear(x, W, b)))  ->  view(linear_act(x, W, b, act))

A linear with no activation after it becomes ``linear_act(..., "none")``, so that every GEMM
runs on the backend's kernel. An activation is elementwise, so it commutes with a reshape: where the
linear's output goes only through a view (or reshape) to the activation and nowhere else, the
activation moves before the view and fuses (Hugging Face's GPT-2 ``Conv1D`` returns its 2-d GEMM
through a view to 3-d, and its MLP's GELU follows it).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphopt.kernels.ops import OPS
from graphopt.kernels.signatures import LinearAct
from graphopt.passes import PassContext, register
from graphopt.passes.lib.epilogue import inputs_stable, match_epilogue
from graphopt.passes.lib.patterns import Linear, match_act, match_linear
from graphopt.passes.lib.query import mutated_between, only_user, tensor_meta
from graphopt.passes.lib.rewrite import as_node, copy_meta, replace_chain


def _unfusable(linear: Linear) -> str | None:
    """Why this linear has no fused op, or None."""
    x_meta, y_meta = tensor_meta(linear.input), tensor_meta(linear.node)
    if x_meta is None or y_meta is None:
        return "no shape recorded for the input or output"
    if len(x_meta.shape) == 0:
        return "0-d input"
    if not y_meta.dtype.is_floating_point or y_meta.dtype != x_meta.dtype:
        return "not a floating-point linear with equal input and output dtypes"
    return None


def _is_reshape(node: fx.Node) -> bool:
    """x.view(shape), x.reshape(shape) or torch.reshape(x, shape) (not ``view(dtype)``, which reinterprets bits)."""
    shaped = node.op == "call_method" and node.target in ("view", "reshape") or \
        node.op == "call_function" and node.target is torch.reshape
    return shaped and not any(isinstance(a, torch.dtype) for a in (*node.args, *node.kwargs.values()))


def _act_through_view(gm: fx.GraphModule, linear: Linear) -> bool:
    """act(view(y)) -> view(act(y)) for the linear's output y, where the view is y's only reader and the
    activation (with no other graph input) the view's: nothing else sees either value, so nothing can tell. Not
    where the linear's inputs are written in place before the view, where the activation would go (the fusion
    would not take it there)."""
    node = linear.node
    view = only_user(node)
    if view is None or not _is_reshape(view) or not view.args or view.args[0] is not node:
        return False
    act = only_user(view)
    found = match_act(gm, act) if act is not None else None
    if found is None or found[0] is not view or act.all_input_nodes != [view]:
        return False
    if mutated_between(gm, (linear.input, linear.weight, linear.bias), node, view):
        return False
    with gm.graph.inserting_before(view):
        moved = gm.graph.node_copy(act, lambda n: node if n is view else n)
    with gm.graph.inserting_before(act):
        reshaped = gm.graph.node_copy(view, lambda n: moved if n is node else n)
    copy_meta(moved, act, [act])
    if "tensor_meta" in node.meta:
        moved.meta["tensor_meta"] = node.meta["tensor_meta"]  # (the linear's shape: the view now follows)
    copy_meta(reshaped, act, [view])
    act.replace_all_uses_with(reshaped)
    gm.graph.erase_node(act)
    gm.graph.erase_node(view)
    return True


@register("fp32")
def fuse_linear_act(gm: fx.GraphModule, ctx: PassContext) -> int:
    rewrites = 0
    for node in list(gm.graph.nodes):
        linear = match_linear(gm, node)
        if linear is None:
            continue  # not a linear
        why = _unfusable(linear)
        if why is not None:
            ctx.miss(why, node)
            continue
        _act_through_view(gm, linear)
        ep = match_epilogue(gm, node, allow_residual=False, kind="linear")
        if not ep.last.users:
            continue  # dead work: eliminate_dead_code's, not ours to rewrite
        if not inputs_stable(gm, ep, [linear.input, linear.weight, linear.bias]):
            ctx.miss("an input is written in place between the linear and its activation", node)
            continue
        if ep.missed is not None:
            ctx.miss(ep.missed, node)  # the linear fuses; the activation after it stays apart
        with gm.graph.inserting_before(ep.last):
            sig = LinearAct(linear.input, as_node(gm, linear.weight), as_node(gm, linear.bias), ep.act)
            fused = gm.graph.call_function(OPS[sig.op], sig.as_args())
        replace_chain(gm, fused, ep.nodes)
        rewrites += 1
    return rewrites
