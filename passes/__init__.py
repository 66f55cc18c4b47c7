"""The pass registry and the default pipeline.

A pass is a plain function ``(gm, ctx) -> rewrites`` registered by name with the kind of
numerics oracle the driver checks it with:

    exact   the pass moves or removes work but computes nothing new: outputs are bitwise equal
    fp32    the pass changes floating-point arithmetic: outputs within the fp32 tolerance rule
    int8    the pass quantizes: outputs within an SQNR floor of the fp32 ones (the accuracy budget
            itself is the driver's: compiler/quantize.py)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch.fx as fx


@dataclass
class PassContext:
    example_inputs: tuple
    backend: str = "cpu"
    calibration: Iterable | None = None
    options: dict[str, Any] = field(default_factory=dict)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("graphopt"))


PassFn = Callable[[fx.GraphModule, PassContext], int]


@dataclass(frozen=True)
class PassInfo:
    name: str
    fn: PassFn
    kind: str


REGISTRY: dict[str, PassInfo] = {}
KINDS = ("exact", "fp32", "int8")


def register(name: str, kind: str) -> Callable[[PassFn], PassFn]:
    if kind not in KINDS:
        raise ValueError(f"pass kind must be one of {KINDS}, not {kind!r}")

    def wrap(fn: PassFn) -> PassFn:
        REGISTRY[name] = PassInfo(name, fn, kind)
        return fn

    return wrap


from graphopt.passes import (  # noqa: E402, F401  (each module registers itself)
    eliminate_common_subexpressions,
    eliminate_dead_code,
    fold_constants,
    fold_conv_bn,
    fold_linear_bn,
    fuse_conv_act,
    fuse_linear_act,
    lower_int8_onednn,
    lower_to_onednn,
    lower_to_reference,
    lower_to_triton,
    plan_layout,
    quantize_int8,
    remove_noops,
)

DEFAULT_PIPELINE = [
    "remove_noops",
    "eliminate_dead_code",
    "fold_constants",
    "eliminate_common_subexpressions",
    "fold_conv_bn",
    "fold_linear_bn",
    "fuse_conv_act",
    "fuse_linear_act",
]

# After the pipeline, the graph is lowered for the backend it will run on; the pipeline's own
# result (graphopt ops, plain weights) stays the portable form that is saved and exported.
LOWERING = {
    "cpu": ["lower_int8_onednn", "lower_to_onednn", "plan_layout"],
    "reference": ["lower_to_reference"],
    "triton": ["lower_to_triton"],
}

__all__ = ["DEFAULT_PIPELINE", "LOWERING", "REGISTRY", "PassContext", "PassInfo", "register"]
