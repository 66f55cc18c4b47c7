"""Elementwise expressions in a normal form, so that a rule can name a formula once and match the ways models
write it.

Operands of a product or sum commute (``a * b`` is ``b * a`` in IEEE arithmetic, bit for bit), and ``a / c``
reads as ``a * (1 / c)``, ``a - c`` as ``a + (-c)`` for a number ``c``. Their grouping is kept as written:
``(x * r) / 6`` is not ``x * (r / 6)`` where ``x * r`` overflows (at x = 3e38 with r = 6 the first is inf, as
F.hardswish is, the second 3e38), so ``bmul(bmul(x, r), 1 / 6)`` matches only the first.

Below tanh and sigmoid, products and sums are flattened instead (``mul`` / ``add``: nested ones merged, their
one number the coefficient, resp. the constant term, a leaf's ``** 2`` and ``** 3`` repeating it), so that

    sqrt(2 / pi) * (x + 0.044715 * x ** 3)        (0.044715 * x * x * x + x) * 0.7978845608028654

read the same. What a rule matches there is a regrouping of its own terms, all of x's sign, with one number
each: a grouping changes only rounding, or a huge value into +-inf, which tanh and sigmoid map where they map the
huge value (the rules' tests run NaN, +-inf and overflowing inputs through every spelling). Two numbers in one
product or sum are not folded into one (``(x + 1e8) - 1e8`` is not x in float32): they match no rule.
Numbers compare to a relative 1e-6 (FastGELU writes 0.7978845608). Activations read through
patterns.match_act (every spelling: F.relu6, torch.clamp(y, 0, 6), nn.Tanh, ...).

``expand`` reads a node into this form. It looks through a node only where the expression is that node's one
reader (an intermediate value no one else needs); anything else (another reader, an op this form has no word
for, a tensor-valued constant) is a ``leaf``. An in-place op reads as a leaf too unless what it writes into is
one of the expression's own intermediates (``x * x.sigmoid_()`` overwrites x itself first: it is not
x * sigmoid(x)).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from graphopt.passes.lib.patterns import match_act
from graphopt.passes.lib.query import is_inplace, number, written

REL_TOL = 1e-6  # numbers in a rule against the model's: written to 8-10 digits (FastGELU's 0.7978845608)
MAX_OPS = 32  # an expression reads at most this many ops (the formulas here have 9 at most): the rest are leaves


@dataclass(frozen=True, eq=False)
class Term:
    op: str  # "leaf", "num", "mul", "add", "pow", or an activation string ("tanh", "sigmoid", "relu6")
    value: float = 0.0  # num: the number; flat mul / add: the coefficient / constant term; pow: the exponent
    args: tuple[Term, ...] = ()
    node: fx.Node | None = None  # leaf: the graph value


def num(v: float) -> Term:
    return Term("num", float(v))


def leaf(node: fx.Node) -> Term:
    return Term("leaf", node=node)


def mul(*operands: Term | float) -> Term:
    return _fold("mul", [o if isinstance(o, Term) else num(o) for o in operands])


def add(*operands: Term | float) -> Term:
    return _fold("add", [o if isinstance(o, Term) else num(o) for o in operands])


def bmul(a: Term | float, b: Term | float) -> Term:
    """a * b as written (grouping kept)."""
    return Term("mul", 1.0, tuple(o if isinstance(o, Term) else num(o) for o in (a, b)))


def badd(a: Term | float, b: Term | float) -> Term:
    """a + b as written (grouping kept)."""
    return Term("add", 0.0, tuple(o if isinstance(o, Term) else num(o) for o in (a, b)))


def act(name: str, x: Term) -> Term:
    return Term(name, args=(x,))


def _fold(op: str, operands: list[Term]) -> Term:
    """A product or sum in normal form: nested ones flattened, its number (at most one) the coefficient, resp.
    the constant term, one operand left alone. Two numbers or more are kept apart, as operands, and so match no
    rule: folding them in float64 is not what float32 computes ((x + 1e8) - 1e8 is not x there)."""
    unit, numbers, rest = (1.0 if op == "mul" else 0.0), [], []
    for o in operands:
        if o.op == op and o.value != unit:
            numbers.append(o.value)
        for part in (o.args if o.op == op else (o,)):
            if part.op == "num":
                numbers.append(part.value)
            else:
                rest.append(part)
    if len(numbers) > 1:
        return Term(op, unit, tuple(rest) + tuple(num(v) for v in numbers))
    value = numbers[0] if numbers else unit
    if not rest:
        return num(value)
    if len(rest) == 1 and value == unit:
        return rest[0]
    return Term(op, value, tuple(rest))


def same(a: Term, b: Term) -> bool:
    """Equal normal forms: the same ops, leaves the same node, numbers within REL_TOL, operands as multisets."""
    if a.op != b.op:
        return False
    if a.op == "leaf":
        return a.node is b.node
    if not math.isclose(a.value, b.value, rel_tol=REL_TOL, abs_tol=0.0):
        return False
    if a.op in ("mul", "add"):
        return len(a.args) == len(b.args) and _pairs(list(a.args), list(b.args))
    return len(a.args) == len(b.args) and all(same(x, y) for x, y in zip(a.args, b.args))


def _pairs(left: list[Term], right: list[Term]) -> bool:
    if not left:
        return True
    first, rest = left[0], left[1:]
    return any(same(first, r) and _pairs(rest, right[:i] + right[i + 1:]) for i, r in enumerate(right))


def leaves(t: Term) -> list[fx.Node]:
    """The graph values the expression reads, each once, in the order met (each shared term visited once)."""
    out: list[fx.Node] = []
    seen: set[int] = set()
    stack = [t]
    while stack:
        term = stack.pop()
        if id(term) in seen:
            continue
        seen.add(id(term))
        if term.op == "leaf":
            if term.node not in out:
                out.append(term.node)
        else:
            stack.extend(reversed(term.args))
    return out


# ---------------------------------------------------------------- reading a graph

_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_ADD = {operator.add, operator.iadd, torch.add, "add", "add_"}
_SUB = {operator.sub, operator.isub, torch.sub, "sub", "sub_"}
_DIV = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}
_POW = {operator.pow, torch.pow, "pow"}
_ARITHMETIC = _MUL | _ADD | _SUB | _DIV | _POW


def is_product(node: fx.Node) -> bool:
    """Is ``node`` a product or quotient (every formula's last op)?"""
    return node.op in ("call_function", "call_method") and node.target in _MUL | _DIV


FLATTENED_BELOW = ("tanh", "sigmoid")


def _operand(v: Any, expand_node: Any, flat: bool) -> Term | None:
    n = number(v)
    if n is not None:
        return num(n)
    return expand_node(v, flat) if isinstance(v, fx.Node) else None


def _arithmetic(node: fx.Node, expand_node: Any, flat: bool) -> Term | None:
    """The normal form of a binary arithmetic node (``flat``: below tanh or sigmoid), or None where it is not one
    this form reads."""
    target = node.target
    if node.op not in ("call_function", "call_method") or target not in _ARITHMETIC or len(node.args) != 2:
        return None
    if any(k not in ("alpha",) for k in node.kwargs) or node.kwargs.get("alpha", 1) != 1:
        return None  # (torch.div's rounding_mode, an add's alpha, an out=)
    a, b = node.args
    if target in _POW:
        exponent = number(b)
        if exponent is None or not isinstance(a, fx.Node):
            return None
        base = expand_node(a, flat)
        if flat and exponent in (2.0, 3.0) and base.op == "leaf":
            return mul(*[base] * int(exponent))  # (only a leaf: repeating a product would grow it exponentially)
        return Term("pow", exponent, (base,))
    left, right = _operand(a, expand_node, flat), _operand(b, expand_node, flat)
    if left is None or right is None:
        return None
    times, plus = (mul, add) if flat else (bmul, badd)
    if target in _MUL:
        return times(left, right)
    if target in _ADD:
        return plus(left, right)
    if right.op != "num":
        return None  # (a - b and a / b of two tensors: no rule needs them)
    if target in _SUB:
        return plus(left, -right.value)
    return None if right.value == 0.0 else times(left, 1.0 / right.value)


def _activation(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, str] | None:
    found = match_act(gm, node)
    if found is None:
        return None
    x, name = found
    return x, {"hardtanh:0.0:6.0": "relu6"}.get(name, name)


def expand(gm: fx.GraphModule, root: fx.Node, order: dict[fx.Node, int]) -> tuple[Term, list[fx.Node]]:
    """``root``'s normal form and the nodes it looked through, in graph order (``order``: each node's position),
    none where it is a leaf. Each node is read once (a value read twice by one op is
    one term, shared)."""
    inner: list[fx.Node] = []
    memo: dict[tuple[fx.Node, bool], Term] = {}

    def expand_node(node: fx.Node, flat: bool = False) -> Term:
        if (node, flat) in memo:
            return memo[node, flat]
        if (node is not root and len(node.users) != 1) or len(inner) >= MAX_OPS:
            return leaf(node)
        reads = _reads(gm, node)
        if reads is None:
            return leaf(node)
        mark = len(inner)
        inner.append(node)
        term = reads(expand_node, flat)
        if term is not None and is_inplace(gm, node) and written(node) not in inner[mark + 1:]:
            term = None  # it writes into a value the expression does not own
        if term is None:
            for n in inner[mark:]:
                memo.pop((n, True), None)
                memo.pop((n, False), None)
            del inner[mark:]
            return leaf(node)
        memo[node, flat] = term
        return term

    term = expand_node(root)
    return term, sorted(set(inner), key=order.__getitem__)


def _reads(gm: fx.GraphModule, node: fx.Node) -> Any:
    """A function of (``expand_node``, flat) that reads ``node`` into the normal form, or None: not an op this
    form has a word for."""
    if node.op in ("call_function", "call_method") and node.target in _ARITHMETIC:
        return lambda expand_node, flat: _arithmetic(node, expand_node, flat)
    found = _activation(gm, node)
    if found is not None:
        x, name = found
        return lambda expand_node, flat: act(name, expand_node(x, flat or name in FLATTENED_BELOW))
    return None


__all__ = ["Term", "act", "add", "badd", "bmul", "expand", "is_product", "leaf", "leaves", "mul", "num", "same"]
