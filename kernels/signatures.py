"""The fused ops' arguments as records, one per op, in the order of its schema (kernels/ops.py).

Passes read and write these ops' arguments by name through a record, never by position:

    sig = ConvAct.from_node(node)             # node.args (and any node.kwargs) -> fields
    sig.act, sig.residual
    new_args = dataclasses.replace(sig, x=xf).as_args()

A field added to an op is added here in the schema's place (tests/kernels/test_signatures.py checks
the order against the registered schema), and every reader keeps working. Values are whatever the
graph holds: fx nodes for tensors, Python numbers, lists and strings for the rest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch


class _Signature:
    op: ClassVar[str]  # the op's name in OPS (kernels/ops.py)

    @classmethod
    def from_args(cls, args: tuple | list, kwargs: dict | None = None):
        """The record of a call's positional (and keyword) arguments; raises TypeError for a wrong count."""
        return cls(*args, **(kwargs or {}))

    @classmethod
    def from_node(cls, node: Any):
        """The record of an fx node calling this op."""
        return cls.from_args(node.args, dict(node.kwargs))

    def as_args(self) -> tuple:
        """The positional arguments of a call of this op, in schema order."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


@dataclass
class ConvAct(_Signature):
    """graphopt::conv2d_act: act(conv2d(x, weight, bias) + residual)."""
    op: ClassVar[str] = "conv2d_act"
    x: Any
    weight: Any
    bias: Any
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int
    act: str
    residual: Any = None


@dataclass
class LinearAct(_Signature):
    """graphopt::linear_act: act(x @ weight.T + bias)."""
    op: ClassVar[str] = "linear_act"
    x: Any
    weight: Any
    bias: Any
    act: str


@dataclass
class QConvAct(_Signature):
    """graphopt::qconv2d_act: the int8 conv (scheme: kernels/reference.py); fp32 out when out_scale is None."""
    op: ClassVar[str] = "qconv2d_act"
    x: Any
    x_scale: float
    x_zp: int
    weight: Any
    w_scale: Any
    bias: Any
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int
    act: str
    residual: Any = None
    out_scale: float | None = None
    out_zp: int = 0


@dataclass
class QLinearAct(_Signature):
    """graphopt::qlinear_act: the int8 linear; fp32 out when out_scale is None."""
    op: ClassVar[str] = "qlinear_act"
    x: Any
    x_scale: float
    x_zp: int
    weight: Any
    w_scale: Any
    bias: Any
    act: str
    out_scale: float | None = None
    out_zp: int = 0


SIGNATURES: dict[str, type[_Signature]] = {s.op: s for s in (ConvAct, LinearAct, QConvAct, QLinearAct)}


def signature_of(node: Any) -> _Signature | None:
    """The record of an fx node calling one of these ops (any overload name ``graphopt::<op>``), else None."""
    if getattr(node, "op", None) != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    namespace, _, name = node.target.name().partition("::")
    record = SIGNATURES.get(name) if namespace == "graphopt" else None
    return record.from_node(node) if record is not None else None
