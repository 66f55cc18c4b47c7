"""Recognize an activation written out as arithmetic and make it the one op it is.

    0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x ** 3)))   ->  F.gelu(x, approximate="tanh")
    0.5 * x * (1 + tanh(x * sqrt(2 / pi) * (1 + 0.044715 * x * x)))  ->  F.gelu(x, approximate="tanh")
    x * sigmoid(x)                                                    ->  F.silu(x)
    x * relu6(x + 3) / 6                                              ->  F.hardswish(x)
    relu6(x + 3) / 6                                                  ->  F.hardsigmoid(x)

Models carry these as code: Hugging Face's GPT-2 family (``NewGELUActivation``, ``FastGELUActivation``),
hand-written Swish in EfficientNet ports, MobileNetV3's hard-swish and hard-sigmoid. Written out, each is
3-9 elementwise passes over memory that no fused op can absorb; as one op it is a single pass, or none where
fuse_conv_act / fuse_linear_act then fold it into the conv or linear before it.

The one op is not bit-equal to the arithmetic (it rounds once, where the expression rounds at each step: a
few ulps apart), so this is an fp32 pass. It keeps eager's NaN and +-inf: on NaN, +-inf and values whose
cube overflows, each op here gives what its expression gives (tested). GELU's erf form written out
(``x * 0.5 * (1 + erf(x / sqrt(2)))``) is left alone: at +inf it gives inf where F.gelu gives NaN.

Only float32 values are rewritten, only where the expression reads one value ``x`` of the result's own shape
(no broadcast) and owns every intermediate it looks through (passes/lib/expressions.py), and only where nothing
else is written in place between the expression's first op and its last (whatever a write there reaches, x
through a view, ``out=``, ...: none is allowed).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from graphopt.passes import PassContext, register
from graphopt.passes.lib.expressions import Term, act, add, badd, bmul, expand, is_product, leaf, leaves, mul, same
from graphopt.passes.lib.query import is_inplace, same_shape, tensor_meta
from graphopt.passes.lib.rewrite import replace_chain

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715


# Each formula groups its products as PyTorch's kernel does (aten/src/ATen/native/cpu: (0.5 * x) * (1 + tanh(..)),
# (x * relu6(x + 3)) / 6): another grouping can overflow where the op does not (expressions.py), and stays.

def _gelu_tanh(x: Term) -> Term:  # Hugging Face's NewGELUActivation (GPT-2), AccurateGELU
    return bmul(bmul(0.5, x), badd(1.0, act("tanh", mul(SQRT_2_OVER_PI, add(x, mul(GELU_CUBIC, x, x, x))))))


def _gelu_tanh_factored(x: Term) -> Term:  # Hugging Face's FastGELUActivation, Megatron's
    return bmul(bmul(0.5, x), badd(1.0, act("tanh", mul(SQRT_2_OVER_PI, x, add(1.0, mul(GELU_CUBIC, x, x))))))


def _silu(x: Term) -> Term:
    return bmul(x, act("sigmoid", x))


def _hardswish(x: Term) -> Term:
    return bmul(bmul(x, act("relu6", badd(x, 3.0))), 1.0 / 6.0)


def _hardsigmoid(x: Term) -> Term:
    return bmul(act("relu6", badd(x, 3.0)), 1.0 / 6.0)


# (the formula as a function of its input, the op it is, that op's keyword arguments)
RULES: list[tuple[Callable[[Term], Term], Callable, dict]] = [
    (_gelu_tanh, F.gelu, {"approximate": "tanh"}),
    (_gelu_tanh_factored, F.gelu, {"approximate": "tanh"}),
    (_silu, F.silu, {}),
    (_hardswish, F.hardswish, {}),
    (_hardsigmoid, F.hardsigmoid, {}),
]


def _match(gm: fx.GraphModule, node: fx.Node, order: dict[fx.Node, int]
           ) -> tuple[fx.Node, Callable, dict, list[fx.Node]] | None:
    """(x, the op, its kwargs, the nodes the expression spans) where ``node`` ends one of the RULES."""
    meta = tensor_meta(node)
    if not is_product(node) or meta is None or getattr(meta, "dtype", None) != torch.float32:
        return None
    term, inner = expand(gm, node, order)
    read = leaves(term)
    if term.op == "leaf" or len(read) != 1:
        return None
    (x,) = read
    if not same_shape(x, node):
        return None
    for formula, fn, kwargs in RULES:
        if same(term, formula(leaf(x))):
            return x, fn, kwargs, inner
    return None


def _writes_between(gm: fx.GraphModule, inner: list[fx.Node], span: list[fx.Node]) -> bool:
    """Does an op other than the expression's own write in place anywhere inside it? The one op runs where the
    expression ends, reading x there: any write in between might reach x (through a view, ``out=``, ...), so
    none is allowed, whatever it writes. (``span``: the nodes from the expression's first to its last.)"""
    own = set(inner)
    return any(is_inplace(gm, n) for n in span if n not in own)


@register("fp32")
def recognize_activations(gm: fx.GraphModule, ctx: PassContext) -> int:
    rewrites, erased = 0, set()
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}  # (the rewrites below only replace nodes the later ones never read)
    for node in reversed(nodes):  # last first: the whole expression, not a piece of it
        if node in erased:
            continue
        found = _match(gm, node, order)
        if found is None:
            continue
        x, fn, kwargs, inner = found
        if _writes_between(gm, inner, [n for n in nodes[order[inner[0]]:order[node]] if n not in erased]):
            ctx.miss("a value is written in place inside the expression", node)
            continue
        with gm.graph.inserting_before(node):
            op = gm.graph.call_function(fn, (x,), kwargs)
        replace_chain(gm, op, inner)
        erased.update(inner)
        rewrites += 1
    return rewrites
