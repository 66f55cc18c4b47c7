"""The epilogue a fused op can absorb after a conv or linear: an optional residual add, then an
optional activation. Shared by fuse_conv_act and fuse_linear_act.

    y = producer(x, w, b)        # the only reader of y is ...
    z = y + r   (or r + y, y += r, r += y when r has no other reader)    # same shape and dtype: no broadcast
    out = act(z)                 # relu / relu6 / hardtanh / clamp / silu / gelu / hardswish / ...

Where an add or activation follows but cannot be absorbed, ``Epilogue.missed`` says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from graphopt.passes.lib.patterns import match_act, match_add
from graphopt.passes.lib.query import mutated_between, only_user, same_shape


@dataclass
class Epilogue:
    nodes: list[fx.Node]  # the producer, then each absorbed node in order
    residual: fx.Node | None = None
    act: str = "none"
    missed: str | None = None  # why an add or activation after it stays a separate op

    @property
    def last(self) -> fx.Node:
        return self.nodes[-1]


def _absorbable(gm: fx.GraphModule, node: fx.Node, value: fx.Node, allow_residual: bool) -> bool:
    """Would ``node`` be absorbed after ``value`` if it were value's only reader?"""
    act = match_act(gm, node)
    add = match_add(node) if allow_residual else None
    return (act is not None and act[0] is value) or add is not None


def _residual(y: fx.Node) -> tuple[fx.Node, fx.Node] | str | None:
    """(the add, the residual), or why the add after ``y`` is not a residual, or None: no add."""
    user = only_user(y)
    add = match_add(user) if user is not None else None
    if add is None:
        return None
    a, b, writes_a = add
    other = b if a is y else a
    if other is y:
        return "add of the output to itself is not a residual"
    if not same_shape(other, user) or not same_shape(y, user):
        return "broadcasting add is not a residual"
    if writes_a and a is other and (len(other.users) != 1 or other.op == "placeholder"):
        return "residual add writes into a tensor that is read elsewhere"
    return user, other


def match_epilogue(gm: fx.GraphModule, producer: fx.Node, allow_residual: bool, kind: str) -> Epilogue:
    """What follows ``producer`` (a ``kind``: conv, linear) that its fused op can absorb."""
    ep = Epilogue([producer])
    if len(producer.users) > 1 and any(_absorbable(gm, u, producer, allow_residual) for u in producer.users):
        ep.missed = f"{kind} output has another reader"
        return ep
    found = _residual(producer) if allow_residual else None
    if isinstance(found, str):
        ep.missed = found
        return ep
    if found is not None:
        ep.nodes.append(found[0])
        ep.residual = found[1]
    if len(ep.last.users) > 1 and any(_absorbable(gm, u, ep.last, False) for u in ep.last.users):
        ep.missed = "residual add output has another reader"
        return ep
    user = only_user(ep.last)
    act = match_act(gm, user) if user is not None else None
    if act is not None and act[0] is ep.last:
        ep.nodes.append(user)
        ep.act = act[1]
    return ep


def inputs_stable(gm: fx.GraphModule, ep: Epilogue, values: list) -> bool:
    """The fused node runs where the epilogue's last node was: its inputs must not change in between."""
    return not mutated_between(gm, values, ep.nodes[0], ep.last)
