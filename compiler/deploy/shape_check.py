"""The one run of a loaded graph that load() makes: on fake tensors, with every value bounded.

Fake tensors carry shapes and dtypes and no data, so nothing is computed or allocated however
large a shape the file asks for. Python numbers are real, though (``x.size(1) * 2``), so each
int the graph makes is checked, and a power of two ints is refused before it runs. A tensor
larger than MAX_ELEMENTS is refused: the lowering that follows runs the graph for real, on zeros of
the manifest's input shapes.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten

from graphopt.compiler.core.errors import LoadError, first_line

MAX_ELEMENTS = 1 << 28
MAX_INT = 1 << 63
MAX_EXPONENT = 64
MAX_SEQUENCE = 4096
_GROWS = {operator.mul, operator.imul, operator.add, operator.iadd}  # on sequences: repetition, concatenation


def _refuse(n: fx.Node, what: str) -> LoadError:
    return LoadError(f"graph.json node {n.name!r} {what}",
                     hint="the artifact was not written by graphopt, or was altered; do not load it")


class _Bounded(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_function" and n.target in (operator.pow, torch.pow):
            base, exponent = (tuple(self.map_nodes_to_values(n.args, n)) + (None, None))[:2]
            if isinstance(base, int) and isinstance(exponent, int) and abs(base) > 1 and exponent > MAX_EXPONENT:
                raise _refuse(n, f"raises an int to the power {exponent}")
        if n.op == "call_function" and n.target in _GROWS:
            a, b = (tuple(self.map_nodes_to_values(n.args, n)) + (None, None))[:2]
            sizes = [len(v) if isinstance(v, (str, list, tuple)) else v for v in (a, b)]
            if any(isinstance(v, (str, list, tuple)) for v in (a, b)) and all(isinstance(v, int) for v in sizes):
                grown = sizes[0] * sizes[1] if n.target in (operator.mul, operator.imul) else sizes[0] + sizes[1]
                if grown > MAX_SEQUENCE:
                    raise _refuse(n, f"builds a sequence of {grown} items")
        value = super().run_node(n)
        for leaf in tree_flatten(value)[0]:
            if isinstance(leaf, torch.Tensor) and leaf.numel() > MAX_ELEMENTS:
                raise _refuse(n, f"makes a tensor of {leaf.numel()} elements (at most {MAX_ELEMENTS} at the saved "
                                 "input shapes)")
            if isinstance(leaf, int) and not isinstance(leaf, bool) and abs(leaf) > MAX_INT:
                raise _refuse(n, "makes an integer out of range")
        return value


def check_shapes(gm: fx.GraphModule, inputs: tuple) -> None:
    """Run ``gm`` on fake copies of ``inputs`` (and of its weights); LoadError if it does not run within bounds."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with mode, torch.no_grad():
            fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs]
            _Bounded(gm).run(*fake)
    except LoadError:
        raise
    except Exception as e:  # any failure of a hostile or damaged graph is a LoadError, never another exception
        raise LoadError(f"the saved graph does not run on its own input specs: {first_line(e, 300)}",
                        hint="the artifact was not written by graphopt, or was altered; do not load it") from e
