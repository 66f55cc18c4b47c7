"""graphopt.prune: structured channel pruning of a trainable model (compiler/workflow/channels.py).

    pruned = prune(model, (x,), ratio=0.5, criterion="l1")   # a copy of model, narrower; model untouched
    pruned.pruning                                           # {module: (channels before, after)}

The result is the user's own class with narrower Conv2d / BatchNorm / Linear modules: it trains,
saves and optimizes like the original (optimize() and int8 work on it).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from graphopt.compiler.core.capture import capture, fresh, normalize_inputs
from graphopt.compiler.core.errors import GraphoptError


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def prune(model: nn.Module, example_inputs: Any, ratio: float = 0.5, criterion: str = "l1") -> nn.Module:
    from graphopt.compiler.workflow.channels import CRITERIA, apply

    if not 0.0 <= ratio < 1.0:
        raise GraphoptError(f"ratio must be in [0, 1), got {ratio}", hint="ratio=0.5 removes about half the channels")
    if criterion not in CRITERIA:
        raise GraphoptError(f"unknown criterion {criterion!r}", hint=f"use one of {', '.join(CRITERIA)}")
    inputs = normalize_inputs(example_inputs)
    pruned = copy.deepcopy(model)
    training = pruned.training
    gm = capture(pruned.eval(), inputs)
    changed = apply(gm, ratio, criterion)
    for name in sorted({n.target for n in gm.graph.nodes if n.op == "call_module"}):
        _set_submodule(pruned, name, gm.get_submodule(name))
    try:
        with torch.no_grad():
            pruned(*fresh(inputs))
    except Exception as e:
        raise GraphoptError(f"the pruned {type(model).__name__} no longer runs: {type(e).__name__}: {e}",
                            module=type(model).__name__,
                            hint="a shape written into forward (say x.view(-1, 64 * 8 * 8)) cannot follow the "
                                 "pruning; write torch.flatten(x, 1) instead") from e
    pruned.train(training)
    pruned.pruning = changed
    return pruned
