"""The epilogue a fused op can absorb after a conv or linear: an optional residual add, then an
optional activation. Shared by fuse_conv_act and fuse_linear_act.

    y = producer(x, w, b)        # the only reader of y is ...
    z = y + r   (or r + y, y += r, r += y when r has no other reader)    # same shape and dtype: no broadcast
    out = act(z)                 # relu / relu6 / hardtanh / clamp / silu / gelu / hardswish / ...
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from graphopt.passes.graph import mutated_between, only_user, same_shape
from graphopt.passes.patterns import match_act, match_add


@dataclass
class Epilogue:
    nodes: list[fx.Node]  # the producer, then each absorbed node in order
    residual: fx.Node | None = None
    act: str = "none"

    @property
    def last(self) -> fx.Node:
        return self.nodes[-1]


def _residual(y: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    user = only_user(y)
    add = match_add(user) if user is not None else None
    if add is None:
        return None
    a, b, writes_a = add
    other = b if a is y else a if b is y else None
    if other is None or other is y or not same_shape(other, user) or not same_shape(y, user):
        return None  # y + y, or a broadcasting add: not a residual
    if writes_a and a is other and (len(other.users) != 1 or other.op == "placeholder"):
        return None  # r += y writes r, and someone else still reads r
    return user, other


def match_epilogue(gm: fx.GraphModule, producer: fx.Node, allow_residual: bool) -> Epilogue:
    ep = Epilogue([producer])
    found = _residual(producer) if allow_residual else None
    if found is not None:
        ep.nodes.append(found[0])
        ep.residual = found[1]
    user = only_user(ep.last)
    act = match_act(gm, user) if user is not None else None
    if act is not None and act[0] is ep.last:
        ep.nodes.append(user)
        ep.act = act[1]
    return ep


def inputs_stable(gm: fx.GraphModule, ep: Epilogue, values: list) -> bool:
    """The fused node runs where the epilogue's last node was: its inputs must not change in between."""
    return not any(isinstance(v, fx.Node) and mutated_between(gm, v, ep.nodes[0], ep.last) for v in values)
