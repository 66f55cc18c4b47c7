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
      batch norm       (eval) <= (bound(x) + max |mean|) a + max |bias|, a = max(1, max over channels of
                       max(1, |w|) / sqrt(var + eps)): the output and every intermediate of either way a
                       library may compute it ((x - mean) / sqrt(var + eps) * w + bias, or x * a' + b')
      layer norm       <= 2 B' / sqrt(eps) max |w| + max |b|, B' = bound(x) (1 + (N + 16) 2^-23), eps at least
                       float32's smallest normal number, and N bound(x)^2 and 2 B' / sqrt(eps) under SAFE
                       (N: the normalized size): |x - mean| <= 2 B', and the variance, a mean of squares,
                       is >= 0 however a library sums it (two passes, or Welford's); it is not for
                       E[x^2] - E[x]^2 without a clamp, the form some ONNX Runtime CPU kernel sources show
                       (tests/compiler/test_finite_range.py runs ONNX Runtime's and OpenVINO's, the
                       installed releases, on rows made to break it: 1.32 and 2026.4 pass)
      attention        scaled_dot_product_attention with no mask, no dropout and a scale >= 0: <= 2 bound(v)
                       (MAX_KEYS), and d bound(q) bound(k) max(1, scale) under SAFE (the logits, d
                       products summed): every library's softmax subtracts its row's max before the exp, so
                       each weight is in [0, 1] and they sum to 1 within rounding (a softmax that did not
                       would overflow past logits of 88: tested on the libraries as the layer norm is)
      pooling, views (expand, unflatten too), flatten, cat, chunk, split, mean, dropout: <= the largest bound in
      sizes and the integers computed from them (``x.size(1) // 2``), torch._assert's None: no magnitude;
                       an add, a mul or a clamp that takes a number as a value is not bounded (it may change
                       with the batch)

``input_limit(gm)`` finds the largest B (by bisection, in powers of two) for which every bound
stays under SAFE (a factor 2^20 below float32's largest value: rounding in a long sum cannot close
that gap). An input that is finite with max |x| <= that B then cannot produce a NaN or an inf
anywhere: the fused post-ops give eager's bits. Any op not listed above makes the analysis give up
(None): the graph keeps its separate activations. A fused op's value before its activation must stay
under SAFE too (relu6 or sigmoid would hide an overflow inside the op).

On deep networks the sum-of-|w| gains multiply past float32's range however small B is (EfficientNet-B0:
no B works). ``checked_limits`` then also bounds a few intermediate values by a limit of their own,
checked when the graph runs (another kernel library computes max |v| of each as an extra output,
compiler/core/engines.py): each segment between two checked values is proven from the limit at its
start, and a checked value that is finite and within its limit starts the next one. Every value is then
provably finite on a call whose checks all pass; a call where one fails (a NaN or an inf fails too) is
rerun on graphopt's own graph. ``proves`` re-checks such a set of limits (load() does, for a saved plan).
"""

from __future__ import annotations

import logging
import math
import operator
from typing import Any, Callable

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.kernels.activations import ACTS
from graphopt.kernels.reference import parse_act
from graphopt.kernels.signatures import ConvAct, LinearAct, signature_of
from graphopt.passes.lib.patterns import match_batch_norm
from graphopt.passes.lib.query import arg, tensor_meta

log = logging.getLogger("graphopt")
SAFE = torch.finfo(torch.float32).max / 2 ** 20

_SAME = {  # ops whose output is bounded by their largest tensor input
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.flatten, torch.cat,
    torch.mean, F.dropout, torch.relu, F.relu, F.relu6, F.hardtanh, F.silu, F.gelu, F.hardswish,
    torch.clamp, torch.transpose, torch.permute, torch.reshape, torch.squeeze, torch.unsqueeze, torch.max_pool2d,
    operator.getitem, torch.nn.functional.max_pool1d, torch.nn.functional.avg_pool1d, getattr,
    torch.chunk, torch.split, torch.unflatten,
}
_METHODS_SAME = {"view", "reshape", "flatten", "unflatten", "expand", "expand_as", "mean", "permute", "transpose",
                 "contiguous", "relu", "relu_", "clamp", "squeeze", "unsqueeze", "size", "dim", "chunk", "split"}
_MODULES_SAME = {nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Dropout,
                 nn.Identity, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.GELU, nn.Hardswish,
                 nn.MaxPool1d, nn.AvgPool1d}
_MODULES_UNIT = {nn.Sigmoid, nn.Tanh, nn.Hardsigmoid}
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)  # (these types only: a subclass may add an act)
# what a size, a dim or shape arithmetic on them gives, and what torch._assert returns (timm's input-size checks)
_NUMBERS = (int, float, bool, torch.Size, type(None))
_VALUE_ARGS = {torch.clamp, F.hardtanh, "clamp"}  # _SAME ops whose number arguments are values, not shapes
_UNIT = {torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardsigmoid}  # outputs in [-1, 1]


def _tensor_bounds(values: list[Any], env: dict) -> list[float]:
    return [env[v] for v in values if isinstance(v, fx.Node) and v in env]


def _largest(node: fx.Node, env: dict) -> float:
    """The largest bound among every value ``node`` reads, those inside a list argument too (cat's tensors)."""
    return max((env[v] for v in node.all_input_nodes if v in env), default=0.0)


def _weight(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part)
        return value if isinstance(value, torch.Tensor) else None
    return None


def _magnitude(value: torch.Tensor) -> float:
    """max |v| of a tensor, exact (NaN if it holds a NaN; 0 if empty). Integer tensors too: a constant
    multiplied into a value carries its magnitude whatever its dtype (a bool's is 0 or 1)."""
    if not value.numel():
        return 0.0
    value = value.detach()
    return float(value.any()) if value.dtype == torch.bool else float(value.abs().amax())


def _row_l1_bound(weight: torch.Tensor) -> float:
    """At least the largest L1 norm of a weight's rows (one per output channel), without a float64 copy of it.
    n nonnegative terms added in any order in a precision of unit roundoff u come out at least (1 - u)^(n-1)
    times their exact sum, which is at least 1 - n u: so the sum divided by 1 - n u is above it. Summed in
    float32 while n u <= 1/2 (rows up to 2^23 elements), else (and for a float64 weight) in float64."""
    rows = weight.detach().abs().flatten(1)
    if not rows.shape[0]:
        return 0.0
    n = rows.shape[1]
    dtype = torch.float32 if weight.dtype != torch.float64 and n <= 2 ** 23 else torch.float64
    u = torch.finfo(dtype).eps / 2
    return float(rows.sum(1, dtype=dtype).max()) / (1.0 - n * u)


def _affine(gm: fx.GraphModule, w: Any, b: Any) -> tuple[float, float] | None:
    """(at least the max row L1 norm of w, max |b|) for a conv / linear weight, or None if not a constant."""
    weight, bias = _weight(gm, w), _weight(gm, b) if b is not None else None
    if weight is None or (b is not None and bias is None) or not weight.is_floating_point():
        return None
    return _row_l1_bound(weight), _magnitude(bias) if bias is not None else 0.0


def _numeric(node: Any) -> bool:
    """Is ``node`` a number or a size (as shape propagation recorded it), not a tensor?"""
    return isinstance(node, fx.Node) and node.meta.get("type") in _NUMBERS


def _batch_norm(gm: fx.GraphModule, node: fx.Node) -> Callable[[dict], float] | None:
    """An eval batch norm's bound (passes/lib/patterns.py reads it, as fold_conv_bn does), or None where it is not
    one with constant statistics."""
    bn = match_batch_norm(gm, node)
    if bn is None or bn.problem is not None:
        return None
    var, mean = bn.var.detach().double(), _magnitude(bn.mean)
    if not math.isfinite(mean) or not bool((var + bn.eps > 0).all()):
        return None
    w = torch.ones_like(var) if bn.weight is None else bn.weight.detach().double().abs().clamp(min=1.0)
    a = max(1.0, float((w / (var + bn.eps).sqrt()).max()))
    shift = mean * a + (_magnitude(bn.bias) if bn.bias is not None else 0.0)
    return lambda env: a * env[bn.input] + shift


def _layer_norm(gm: fx.GraphModule, node: fx.Node) -> Callable[[dict], float] | None:
    """A layer norm's bound (module docstring), or None where it is not one with constant weights and an eps that is
    a normal float32 number."""
    if node.op == "call_module":
        ln = gm.get_submodule(node.target)
        if len(node.args) != 1 or node.kwargs:
            return None
        x, shape, weight, bias, eps = node.args[0], ln.normalized_shape, ln.weight, ln.bias, ln.eps
    else:  # (F.layer_norm, or torch.layer_norm: the same first five arguments)
        x, shape, w_node, b_node = (arg(node, i, name) for i, name in
                                    enumerate(("input", "normalized_shape", "weight", "bias")))
        eps = arg(node, 4, "eps", 1e-5)
        weight, bias = (_weight(gm, v) if v is not None else None for v in (w_node, b_node))
        if w_node is not None and weight is None or b_node is not None and bias is None:
            return None
    if not isinstance(x, fx.Node) or not isinstance(eps, float):
        return None
    eps = float(torch.tensor(eps, dtype=torch.float32))  # (what float32 kernels add: a tiny eps rounds to 0)
    if not torch.finfo(torch.float32).tiny <= eps < math.inf:  # (nor one a library may flush to zero)
        return None
    if not isinstance(shape, (tuple, list, torch.Size)) or not all(type(d) is int for d in shape):
        return None
    w = _magnitude(weight) if weight is not None else 1.0
    b = _magnitude(bias) if bias is not None else 0.0
    if not (math.isfinite(w) and math.isfinite(b)):
        return None
    # |x - mean| <= 2 B (1 + (N + 16) 2^-23): the mean of N values rounded, then the subtraction and division
    size = math.prod(shape)
    reach = 2.0 * (1.0 + (size + 16) * 2.0 ** -23) / math.sqrt(eps)

    def bound(env: dict) -> float:
        normalized = reach * env[x]  # (before the weight: it must stay in range too)
        if size * env[x] ** 2 >= SAFE or normalized >= SAFE:  # (its sum of squares could overflow)
            return math.inf
        return normalized * w + b
    return bound


# The S weights' sum, rounded, is within (1 + u) / (1 - S u) of 1: under 2 up to 2^22 keys. The key length is read
# off the example; a session at another batch size could see another where it is the batch dimension, but 2^22
# keys would be 2^44 logits a row of queries, far past any memory: so the factor 2 holds for any call that runs.
MAX_KEYS = 2 ** 22


def _attention(node: fx.Node) -> Callable[[dict], float] | None:
    """scaled_dot_product_attention's bound (module docstring), or None where it has a mask or dropout, a scale that
    is negative or not a number, or more than MAX_KEYS keys."""
    q, k, v = (arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
    mask, dropout, causal = arg(node, 3, "attn_mask"), arg(node, 4, "dropout_p", 0.0), arg(node, 5, "is_causal", False)
    scale, gqa = arg(node, 6, "scale"), arg(node, 7, "enable_gqa", False)
    if mask is not None or dropout != 0 or not isinstance(causal, bool) or not isinstance(gqa, bool):
        return None
    shapes = [getattr(tensor_meta(t), "shape", None) for t in (q, k, v)]
    if any(shape is None for shape in shapes):
        return None
    depth, keys = shapes[0][-1], shapes[1][-2]
    if scale is None:
        scale = 1.0 / math.sqrt(depth) if depth else 1.0
    if type(scale) not in (int, float) or not 0.0 <= scale < math.inf or keys > MAX_KEYS:
        return None  # (a negative scale: the exporter takes its square root)
    gain = depth * max(1.0, float(scale))

    def bound(env: dict) -> float:
        if not gain * env[q] * env[k] < SAFE:  # (a logit could overflow)
            return math.inf
        return env[v] * 2.0
    return bound


def _rule(gm: fx.GraphModule, node: fx.Node) -> Callable[[dict], float | None] | None:
    """How to bound ``node``'s value from the bounds in ``env``; None where this analysis cannot."""
    target, args, sig = node.target, node.args, signature_of(node)
    if _numeric(node):  # (a size or shape arithmetic: it bounds no tensor, and the rules below never read it)
        return lambda env: 0.0
    if isinstance(sig, (ConvAct, LinearAct)):
        residual = sig.residual if isinstance(sig, ConvAct) else None
        affine = _affine(gm, sig.weight, sig.bias)
        if affine is None:
            return None
        gain, shift = affine
        name, params = parse_act(sig.act)
        cap = ACTS[name].cap(*params)
        slope = max(1.0, abs(float(params[0]))) if name == "leaky_relu" else 1.0  # (a slope above 1 grows)
        def fused(env: dict) -> float:
            before = slope * (gain * env[sig.x] + shift + (env[residual] if isinstance(residual, fx.Node) else 0.0))
            return min(cap, before) if before < SAFE else math.inf  # (a capped activation must not hide inf)
        return fused
    if (node.op == "call_module" and type(gm.get_submodule(target)) in _BATCH_NORMS
            or node.op == "call_function" and target is F.batch_norm):
        return _batch_norm(gm, node)
    if (node.op == "call_module" and type(gm.get_submodule(target)) is nn.LayerNorm
            or node.op == "call_function" and target in (F.layer_norm, torch.layer_norm)):
        return _layer_norm(gm, node)
    if node.op == "call_function" and target is F.scaled_dot_product_attention:
        return _attention(node)
    if node.op == "call_module":
        kind = type(gm.get_submodule(target))
        if kind in _MODULES_UNIT:
            return lambda env: 1.0
        if kind in _MODULES_SAME:
            return lambda env: _largest(node, env)
        return None
    if node.op == "call_function" and target in _UNIT:
        return lambda env: 1.0
    numbers = any(_numeric(a) for a in (*args, *node.kwargs.values()))
    if node.op == "call_function" and target in _SAME or node.op == "call_method" and target in _METHODS_SAME:
        if target in _VALUE_ARGS:  # (clamp's and hardtanh's limits are values the output can take)
            if numbers:
                return None
            limits = [abs(float(a)) for a in (*args[1:], *node.kwargs.values())
                      if isinstance(a, (int, float)) and not isinstance(a, bool)]
            return lambda env: max(_largest(node, env), *limits, 0.0)
        return lambda env: _largest(node, env)
    if numbers or node.kwargs:  # (a number computed in the graph, as a value: it may differ at another batch
        return None             # size; torch.add's alpha scales an operand)
    if node.op == "call_function" and target in (operator.add, torch.add, operator.iadd):
        return lambda env: sum(_tensor_bounds(args, env)) + sum(abs(a) for a in args if isinstance(a, (int, float)))
    if node.op == "call_function" and target in (operator.mul, torch.mul, operator.imul):
        return lambda env: math.prod(_tensor_bounds(args, env)) * math.prod(
            abs(a) for a in args if isinstance(a, (int, float)))
    return None


def _rules(gm: fx.GraphModule) -> dict[fx.Node, Callable[[dict], float]] | None:
    """Each value's bound rule, in graph order (placeholders and the output excepted), or None."""
    rules: dict[fx.Node, Callable] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "get_attr":
            value = _weight(gm, node)
            if value is None:
                return None
            bound = _magnitude(value)
            if not math.isfinite(bound):  # (a weight holding inf or NaN)
                return None
            rules[node] = lambda env, b=bound: b
            continue
        rule = _rule(gm, node)
        if rule is None:
            log.debug("finite_range: no bound for %s (%s)", node.name, node.format_node())
            return None
        rules[node] = rule
    return rules


def _propagate(gm: fx.GraphModule, rules: dict, limits: dict[str, float]) -> tuple[dict, fx.Node | None]:
    """(every value's bound, the first value whose bound reaches SAFE or None). ``limits`` holds a bound for
    each input and for each checked value (which its own rule must still keep under SAFE)."""
    env: dict[fx.Node, float] = {p: limits[p.name] for p in gm.graph.nodes if p.op == "placeholder"}
    for node, rule in rules.items():
        bound = rule(env)
        if not bound < SAFE:  # (inf and NaN bounds too)
            return env, node
        env[node] = limits.get(node.name, bound)
    return env, None


def input_limit(gm: fx.GraphModule) -> float | None:
    """The largest max |input| under which no value of ``gm`` can reach inf (so none can be NaN), or None."""
    rules = _rules(gm)
    if rules is None:
        return None
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]

    def worst(limit: float) -> float:
        env, overflow = _propagate(gm, rules, dict.fromkeys(placeholders, limit))
        return math.inf if overflow is not None else max(env.values(), default=0.0)

    if worst(1.0) >= SAFE:
        return None  # not even inputs within +-1 are provably safe
    low, high = 0, 120  # powers of two: 2^0 .. 2^120
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if worst(2.0 ** mid) < SAFE else (low, mid - 1)
    return 2.0 ** low


HEADROOM = 2.0 ** 8  # a checked value's limit: this many times its largest magnitude on the example
MAX_CHECKS = 64
LOOKAHEAD = 32  # checked_limits tries this many of an overflow's nearest dominators


def allowance(magnitude: float) -> float:
    """The limit for a value whose largest magnitude on the example was ``magnitude``: a power of two."""
    return 2.0 ** math.ceil(math.log2(max(magnitude, 1.0) * HEADROOM))


def magnitudes(gm: fx.GraphModule, inputs: tuple) -> dict[str, float]:
    """max |v| of every floating-point tensor value of ``gm`` on ``inputs``, by node name."""
    seen: dict[str, float] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
                seen[n.name] = float(value.detach().abs().max())
            return value

    with torch.no_grad():
        Recorder(gm).run(*inputs)
    return seen


def checked_limits(gm: fx.GraphModule, seen: dict[str, float],
                   checkable: Callable[[fx.Node], bool] = lambda node: True) -> dict[str, float] | None:
    """Limits for the inputs and for as few intermediate values as this greedy finds, under which every value is
    provably finite (see the module docstring), from the magnitudes ``seen`` on the example; or None.
    Only values for which ``checkable`` holds may be checked.

    The inputs get ``allowance`` of their magnitude; while some value's bound reaches SAFE, the one of its
    ancestors whose bound is the most above its own allowance is checked (the latest point before the
    overflow, on a chain), with that allowance as its limit; but first, of its dominators (values every path to
    it passes through, so the whole bound restarts there; the LOOKAHEAD nearest), the one under whose limit the
    bound gets furthest through the graph, where that is past the overflow. On a residual network that is a
    value on the residual stream: a check on a block's wider inner value leaves the bound that the skip
    connection carries around it, and the next block overflows again (EfficientNet-B0: four checks on
    1152-channel values of consecutive blocks with the ratio alone; one on a block's 192-channel output this
    way). A dominator held to its limit may still leave the overflow where it was (two branches that meet in
    a product, each too large alone): the ratio then chooses among all the ancestors."""
    rules = _rules(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if rules is None or any(p.name not in seen for p in placeholders):
        return None
    limits = dict.fromkeys((p.name for p in placeholders), allowance(max(seen[p.name] for p in placeholders)))
    idom, steps = _immediate_dominators(gm), list(rules.items())
    at = {node: i for i, (node, _) in enumerate(steps)}

    def reach(env: dict, checked: fx.Node, limit: float) -> int:
        """How many of ``steps`` the bound gets through with ``checked`` held to ``limit`` (``env``: the bounds as
        they stand, of every value up to the overflow)."""
        trial = {**env, checked: limit}
        for i in range(at[checked] + 1, len(steps)):
            node, rule = steps[i]
            bound = rule(trial)
            if not bound < SAFE:
                return i
            trial[node] = limits.get(node.name, bound)
        return len(steps)
    for _ in range(MAX_CHECKS + 1):
        env, overflow = _propagate(gm, rules, limits)
        if overflow is None:
            return limits
        ancestors, stack = set(), list(overflow.all_input_nodes)
        while stack:
            node = stack.pop()
            if node not in ancestors:
                ancestors.add(node)
                stack.extend(node.all_input_nodes)
        candidates = [n for n in ancestors if n.name not in limits and n.name in seen and n in rules
                      and n.op != "get_attr" and checkable(n) and env[n] > allowance(seen[n.name])]
        if not candidates or len(limits) - len(placeholders) >= MAX_CHECKS:
            return None
        dominators = _dominators(idom, overflow)
        nearest = sorted((n for n in candidates if n in dominators), key=at.__getitem__)[-LOOKAHEAD:]
        reaches = {n: reach(env, n, allowance(seen[n.name])) for n in nearest}
        gains = {n: r for n, r in reaches.items() if r > at[overflow]}  # (a check that moves the overflow on)
        pick = max(candidates, key=lambda n: (gains.get(n, 0), env[n] / allowance(seen[n.name])))
        limits[pick.name] = allowance(seen[pick.name])
    return None


def _immediate_dominators(gm: fx.GraphModule) -> dict[fx.Node, fx.Node | None]:
    """Each value's immediate dominator in the graph of values from the inputs (constants left out: their bounds
    are fixed), None for the inputs: the nearest value every path from an input to it passes through."""
    graph, root = nx.DiGraph(), object()
    graph.add_node(root)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            continue
        graph.add_node(node)
        if node.op == "placeholder":
            graph.add_edge(root, node)
        graph.add_edges_from((a, node) for a in node.all_input_nodes if a.op != "get_attr")
    return {n: (None if d is root else d) for n, d in nx.immediate_dominators(graph, root).items() if n is not root}


def _dominators(idom: dict[fx.Node, fx.Node | None], node: fx.Node) -> set[fx.Node]:
    """The values other than ``node`` that every path from an input to ``node`` passes through."""
    out, at = set(), idom.get(node)
    while at is not None:
        out.add(at)
        at = idom.get(at)
    return out


def proves(gm: fx.GraphModule, limits: dict[str, float]) -> bool:
    """Do ``limits`` (one for every input, and any for other values by node name) prove every value finite?"""
    rules = _rules(gm)
    if rules is None:
        return False
    placeholders = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
    if not placeholders <= set(limits) <= placeholders | {n.name for n in rules}:
        return False
    if not all(isinstance(v, float) and 0.0 < v < SAFE for v in limits.values()):
        return False
    return _propagate(gm, rules, limits)[1] is None
