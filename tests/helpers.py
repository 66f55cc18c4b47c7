"""Shared test helpers: run one pass the way the pass manager does, and count node kinds."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from graphopt.compiler.core.capture import capture, propagate
from graphopt.passes import PassContext


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, so folding is really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(c, generator=g) - 0.5)
    return model


def traced(model: nn.Module, *inputs: torch.Tensor) -> fx.GraphModule:
    return capture(model.eval(), inputs)


def apply(pass_fn, gm: fx.GraphModule, *inputs: torch.Tensor, ctx: PassContext | None = None) -> int:
    """Run a pass, then lint, recompile and re-propagate shapes: the pass manager's bookkeeping, not its oracle
    (the tests compare the numbers themselves). Pass ``ctx`` to read the misses it records."""
    n = pass_fn(gm, ctx or PassContext(tuple(inputs)))
    gm.graph.lint()
    gm.recompile()
    propagate(gm, tuple(inputs))
    return n


def count(gm: fx.GraphModule, *kinds) -> int:
    """How many nodes are of these kinds: module classes (call_module) or call targets."""
    total = 0
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), tuple(k for k in kinds
                                                                                         if isinstance(k, type))):
            total += 1
        elif node.op in ("call_function", "call_method") and node.target in kinds:
            total += 1
    return total


def graphopt_calls(gm: fx.GraphModule, name: str) -> list[fx.Node]:
    op = getattr(torch.ops.graphopt, name).default
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is op]


def close(a, b, **kw):
    kw.setdefault("rtol", 1e-4)
    kw.setdefault("atol", 1e-5)
    torch.testing.assert_close(a, b, **kw)
