"""The pass contract: a pass is a plain function ``(gm, ctx) -> rewrites``, registered under its own name.

    @register("fp32")
    def fold_conv_bn(gm: fx.GraphModule, ctx: PassContext) -> int: ...

The kind names the numerics oracle the driver checks the pass with:

    exact   the pass moves or removes work but computes nothing new: outputs are bitwise equal
    fp32    the pass changes floating-point arithmetic: outputs within the fp32 tolerance rule
    int8    the pass quantizes: outputs within an SQNR floor of the fp32 ones (the accuracy budget
            itself is the driver's: compiler/int8/)

A candidate that a pass does not rewrite is reported, not skipped in silence: ``ctx.miss(reason,
node)``, as MLIR's ``notifyMatchFailure`` does. The driver counts the reasons per pass.

This module imports no pass. passes/pipeline.py imports them all, which fills the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.fx as fx


@dataclass
class Misses:
    """Why candidate rewrites did not fire: each reason with the names of the nodes it held back, in the
    order they were met, each node once per reason."""

    nodes: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, node: fx.Node) -> None:
        names = self.nodes.setdefault(reason, [])
        if node.name not in names:
            names.append(node.name)

    def update(self, other: Misses) -> None:
        for reason, names in other.nodes.items():
            for name in names:
                if name not in self.nodes.setdefault(reason, []):
                    self.nodes[reason].append(name)

    def counts(self) -> dict[str, int]:
        return {reason: len(names) for reason, names in self.nodes.items()}


@dataclass
class PassContext:
    example_inputs: tuple
    backend: str = "cpu"
    # quantize_int8's inputs, from compiler/int8/: {node name: (lo, hi)} measured by calibration (nothing to do
    # without them), and the node names that stay fp32 (the accuracy budget's fallbacks)
    int8_ranges: dict[str, tuple[float, float]] | None = None
    int8_skip: frozenset[str] = frozenset()
    # the int8 weights' range (kernels/reference.py SCHEMES): "s8", or "s7" where oneDNN's int8 would saturate
    int8_scheme: str = "s8"
    # the values are known NaN-free (the driver's guarded fast graph, compiler/core/fast_path.py): relu / relu6 /
    # hardtanh may then run as oneDNN post-ops, which map NaN to 0
    nan_free: bool = False
    misses: Misses = field(default_factory=Misses, repr=False, compare=False)

    def miss(self, reason: str, node: fx.Node) -> None:
        """A candidate rewrite at ``node`` did not fire, because of ``reason`` (a short phrase, the same for every
        node it holds back: it is what the report counts)."""
        self.misses.add(reason, node)


PassFn = Callable[[fx.GraphModule, PassContext], int]


@dataclass(frozen=True)
class PassInfo:
    name: str
    fn: PassFn
    kind: str


REGISTRY: dict[str, PassInfo] = {}
KINDS = ("exact", "fp32", "int8")


def register(kind: str) -> Callable[[PassFn], PassFn]:
    """Register a pass under its function's name, checked by the ``kind`` oracle."""
    if kind not in KINDS:
        raise ValueError(f"pass kind must be one of {KINDS}, not {kind!r}")

    def wrap(fn: PassFn) -> PassFn:
        REGISTRY[fn.__name__] = PassInfo(fn.__name__, fn, kind)
        return fn

    return wrap


def find(p: str | PassFn) -> PassInfo | None:
    """The registered pass for a name or a pass function; None if there is none."""
    if isinstance(p, str):
        return REGISTRY.get(p)
    info = REGISTRY.get(getattr(p, "__name__", ""))
    return info if info is not None and info.fn is p else None


__all__ = ["KINDS", "REGISTRY", "Misses", "PassContext", "PassFn", "PassInfo", "find", "register"]
