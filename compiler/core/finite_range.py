"""When can a graph not make a NaN or an inf? A sound bound on every value, from the input's.

oneDNN's relu / clip post-ops map NaN to 0 where PyTorch keeps NaN, so by default graphopt runs those
activations as a separate pass over memory after the primitive. They are exact, though, on values
that are never NaN. A NaN inside a graph of convs, linears, pooling, adds and bounded activations
can only come from a NaN or an inf in the input or from an overflow to inf. So:

    bound(v) >= max |v| for every value v, propagated from the input's bound B:
      conv / linear    max over output channels of sum |w| * bound(x) + |b|  (+ bound(residual))
      activation       relu, silu, gelu, hardswish: <= bound(x); leaky_relu: <= max(1, |slope|) bound(x);
                       relu6: <= 6;
                       hardtanh(lo, hi): <= max(|lo|, |hi|); sigmoid, tanh: <= 1  (kernels/activations.py)
      add / mul        bound(a) + bound(b) / bound(a) * bound(b)
      pooling, views, flatten, cat, mean, dropout: <= the largest bound in

``input_limit(gm)`` finds the largest B (by bisection, in powers of two) for which every bound
stays under SAFE (a factor 2^20 below float32's largest value: rounding in a long sum cannot close
that gap). An input that is finite with max |x| <= that B then cannot produce a NaN or an inf
anywhere: the fused post-ops give eager's bits. Any op not listed above makes the analysis give up
(None): the graph keeps its separate activations.
"""

from __future__ import annotations

import logging
import math
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.kernels.activations import ACTS
from graphopt.kernels.reference import parse_act
from graphopt.kernels.signatures import ConvAct, LinearAct, signature_of

log = logging.getLogger("graphopt")
SAFE = torch.finfo(torch.float32).max / 2 ** 20

_SAME = {  # ops whose output is bounded by their largest tensor input
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.flatten, torch.cat,
    torch.mean, F.dropout, torch.relu, F.relu, F.relu6, F.hardtanh, F.silu, F.gelu, F.hardswish,
    torch.clamp, torch.transpose, torch.permute, torch.reshape, torch.squeeze, torch.unsqueeze, torch.max_pool2d,
    operator.getitem, torch.nn.functional.max_pool1d, torch.nn.functional.avg_pool1d, getattr,
}
_METHODS_SAME = {"view", "reshape", "flatten", "mean", "permute", "transpose", "contiguous", "relu", "relu_",
                 "clamp", "squeeze", "unsqueeze", "size", "dim"}
_MODULES_SAME = {nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Dropout,
                 nn.Identity, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.GELU, nn.Hardswish,
                 nn.MaxPool1d, nn.AvgPool1d}
_MODULES_UNIT = {nn.Sigmoid, nn.Tanh, nn.Hardsigmoid}
_UNIT = {torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardsigmoid}  # outputs in [-1, 1]


def _tensor_bounds(values: list[Any], env: dict) -> list[float]:
    return [env[v] for v in values if isinstance(v, fx.Node) and v in env]


def _weight(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part)
        return value if isinstance(value, torch.Tensor) else None
    return None


def _affine(gm: fx.GraphModule, w: Any, b: Any) -> tuple[float, float] | None:
    """(max row L1 norm of w, max |b|) for a conv / linear weight, or None if not a constant."""
    weight, bias = _weight(gm, w), _weight(gm, b) if b is not None else None
    if weight is None or (b is not None and bias is None) or not weight.is_floating_point():
        return None
    gain = float(weight.detach().double().abs().flatten(1).sum(1).max())
    return gain, float(bias.detach().double().abs().max()) if bias is not None and bias.numel() else 0.0


def _rule(gm: fx.GraphModule, node: fx.Node) -> Callable[[dict], float | None] | None:
    """How to bound ``node``'s value from the bounds in ``env``; None where this analysis cannot."""
    target, args, sig = node.target, node.args, signature_of(node)
    if isinstance(sig, (ConvAct, LinearAct)):
        residual = sig.residual if isinstance(sig, ConvAct) else None
        affine = _affine(gm, sig.weight, sig.bias)
        if affine is None:
            return None
        gain, shift = affine
        name, params = parse_act(sig.act)
        cap = ACTS[name].cap(*params)
        slope = max(1.0, abs(float(params[0]))) if name == "leaky_relu" else 1.0  # (a slope above 1 grows)
        return lambda env: min(cap, slope * (gain * env[sig.x] + shift
                                             + (env[residual] if isinstance(residual, fx.Node) else 0.0)))
    if node.op == "call_module":
        kind = type(gm.get_submodule(target))
        if kind in _MODULES_UNIT:
            return lambda env: 1.0
        if kind in _MODULES_SAME:
            return lambda env: max(_tensor_bounds(list(args), env), default=0.0)
        return None
    if node.op == "call_function" and target in _UNIT:
        return lambda env: 1.0
    if node.op == "call_function" and target in _SAME or node.op == "call_method" and target in _METHODS_SAME:
        return lambda env: max(_tensor_bounds(list(args) + list(node.kwargs.values()), env), default=0.0)
    if node.op == "call_function" and target in (operator.add, torch.add, operator.iadd):
        return lambda env: sum(_tensor_bounds(args, env)) + sum(abs(a) for a in args if isinstance(a, (int, float)))
    if node.op == "call_function" and target in (operator.mul, torch.mul, operator.imul):
        return lambda env: math.prod(_tensor_bounds(args, env)) * math.prod(
            abs(a) for a in args if isinstance(a, (int, float)))
    return None


def input_limit(gm: fx.GraphModule) -> float | None:
    """The largest max |input| under which no value of ``gm`` can reach inf (so none can be NaN), or None."""
    rules: dict[fx.Node, Callable] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "get_attr":
            value = _weight(gm, node)
            if value is None or (value.is_floating_point() and not bool(value.isfinite().all())):
                return None
            bound = float(value.detach().double().abs().max()) if value.numel() and value.is_floating_point() else 0.0
            rules[node] = lambda env, b=bound: b
            continue
        rule = _rule(gm, node)
        if rule is None:
            log.debug("finite_range: no bound for %s (%s)", node.name, node.format_node())
            return None
        rules[node] = rule
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]

    def worst(limit: float) -> float:
        env: dict[fx.Node, float] = {p: limit for p in placeholders}
        for node, rule in rules.items():
            env[node] = rule(env)
            if not env[node] < SAFE:  # (inf and NaN bounds too)
                return math.inf
        return max(env.values(), default=0.0)

    if worst(1.0) >= SAFE:
        return None  # not even inputs within +-1 are provably safe
    low, high = 0, 120  # powers of two: 2^0 .. 2^120
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if worst(2.0 ** mid) < SAFE else (low, mid - 1)
    return 2.0 ** low
