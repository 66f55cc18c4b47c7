"""nn.Module + example inputs -> fx.GraphModule with shape/dtype metadata on every node.

The model is deep-copied first: tracing, and every pass after it, works on the copy, so the
user's parameters, buffers and training flags stay exactly as they were.

Thread safety: torch.fx's symbolic tracing patches ``nn.Module.__call__`` and ``__getattr__``
process-wide while it runs. So graphopt traces one model at a time (``locked_tracing``), and its
tracers hand module calls and attribute reads made by *other* threads straight to the original
methods: a model running eagerly in another thread while graphopt traces is not affected.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import linecache
import operator
import sys
import threading
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.utils._pytree import tree_flatten

from graphopt.compiler.core.errors import CaptureError, first_line, is_internal, node_source, user_frame
from graphopt.compiler.core.export_capture import export_capture

_TRACE_HINT = (
    "graphopt traces with torch.fx.symbolic_trace, which runs forward on symbolic values: Python control "
    "flow that depends on tensor values, and non-torch calls on them, cannot be followed. Move that logic "
    "out of forward, wrap the function with torch.fx.wrap, or use torch.compile(model, backend='graphopt'), "
    "which optimizes the graphs between the breaks."
)


_TRACING = threading.RLock()
_MODULE_CALL = nn.Module.__call__  # the original, for other threads while fx has it patched


@contextlib.contextmanager
def locked_tracing():
    """Hold while symbolically tracing: fx patches nn.Module process-wide, so one trace at a time."""
    with _TRACING:
        yield


class ThreadSafeTracer(fx.Tracer):
    """An fx tracer under which other threads' module calls and attribute reads run as usual."""

    def trace(self, root: Any, *args: Any, **kwargs: Any) -> fx.Graph:
        self._thread = threading.get_ident()
        with locked_tracing():
            return super().trace(root, *args, **kwargs)

    def _foreign(self) -> bool:
        return threading.get_ident() != getattr(self, "_thread", None)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        if self._foreign():
            return _MODULE_CALL(m, *args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self._foreign():
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


class _Tracer(ThreadSafeTracer):
    """Records which module was being traced, and stamps each node with its module's name."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.failed_in: str | None = None

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        if self._foreign():
            return _MODULE_CALL(m, *args, **kwargs)
        self.stack.append(self.path_of_module(m) or type(m).__name__)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            self.failed_in = self.failed_in or f"{self.stack[-1]} ({type(m).__name__})"
            raise
        finally:
            self.stack.pop()

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        if self.stack:
            node.meta["module"] = self.stack[-1]
        where = _user_line()
        if where is not None:
            node.meta["stack_trace"] = where
        return node


_TRACE_CODE = fx.Tracer.trace.__code__


def _user_line() -> str | None:
    """The innermost frame of the user's code (not torch's, not graphopt's), as a traceback line.

    Walks the live frames: fx's own stack traces (``record_stack_traces``) format the whole stack
    with source lines for every node, which costs more than the rest of the trace."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code is not _TRACE_CODE:  # (only frames inside the traced forward)
        filename = frame.f_code.co_filename
        if not is_internal(filename):
            code = linecache.getline(filename, frame.f_lineno).strip()
            return f'File "{filename}", line {frame.f_lineno}, in {frame.f_code.co_name}\n    {code}'
        frame = frame.f_back
    return None


def normalize_inputs(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise CaptureError(f"example_inputs must be a non-empty tuple of tensors, got {type(example_inputs).__name__}",
                           hint="pass example_inputs=(x,) for a model with one input")
    return tuple(example_inputs)


def capture(model: nn.Module, example_inputs: Any) -> fx.GraphModule:
    if not isinstance(model, nn.Module):
        raise CaptureError(f"optimize() takes an nn.Module, got {type(model).__name__}")
    inputs = normalize_inputs(example_inputs)
    if model.training:
        raise CaptureError(
            f"{type(model).__name__} is in training mode: graphopt optimizes inference graphs "
            "(BatchNorm would use batch statistics, dropout would be random)",
            module=type(model).__name__, hint="call model.eval() before optimize()")
    training = [name for name, m in model.named_modules() if m.training]
    if training:
        raise CaptureError(
            f"{type(model).__name__} is in eval mode but its submodule {training[0]} is in training mode: graphopt "
            "optimizes inference graphs", module=training[0],
            hint="call model.eval() (it sets every submodule) before optimize()")
    copied = copy.deepcopy(model)
    with torch.no_grad():
        try:
            eager = copied(*fresh(inputs))
        except Exception as e:
            raise CaptureError(f"{type(model).__name__} fails on the example inputs: {type(e).__name__}: {e}",
                               module=type(model).__name__, source=user_frame(e.__traceback__),
                               hint="check the example inputs' shapes and dtypes against what the model expects"
                               ) from e
    gm = _symbolic(model, copied, len(inputs))
    if isinstance(gm, CaptureError):
        refusal = gm
        try:
            gm = export_capture(copy.deepcopy(model), fresh(inputs))
        except Exception as e:  # neither route can capture the model: say why for both
            raise CaptureError(
                f"{refusal.message}; torch.export cannot capture it either: {first_line(e, 300)}",
                module=refusal.module, source=refusal.source, hint=_opaque_output_hint(model, eager) or refusal.hint
            ) from e
        gm.meta["capture_route"] = "torch.export"
        if gm.meta.get("fixed_batch") and _runs_at_another_batch(gm, copied, inputs):
            gm.meta["fixed_batch"] = []
    else:
        gm.meta["capture_route"] = "symbolic_trace"
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) < len(inputs):
        raise CaptureError(f"{type(model).__name__}.forward takes {len(placeholders)} inputs, "
                           f"{len(inputs)} example inputs were given")
    traced = propagate(gm, inputs)
    if not _same_results(traced, eager):
        raise CaptureError(
            f"the traced graph of {type(model).__name__} does not give the model's own results on the example inputs",
            module=type(model).__name__,
            hint="either the model is not deterministic (random ops, a forward that changes module state), or "
                 "symbolic tracing lost aliasing: `a = b; b += x` writes b in place in eager mode but not in the "
                 "trace. Write `b = b + x` (or b.add_(x)), or use torch.compile(model, backend='graphopt')")
    return gm


_PLAIN_DEFAULTS = (type(None), bool, int, float, str)


def _defaults_past(model: nn.Module, given: int) -> dict[str, Any]:
    """The forward's parameters past the ``given`` example inputs whose defaults are plain values (``attn_mask=None``,
    timm's and Hugging Face's optional arguments): name -> default. The trace takes those values (so the
    forward's ``if attn_mask is not None`` is decided as the example call decides it), and the graph keeps
    the example's inputs only: its call, the saved graph and the manifest agree."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
        return {}
    return {p.name: p.default for p in positional[given:]
            if p.default is not p.empty and type(p.default) in _PLAIN_DEFAULTS}


def _drop_baked(graph: fx.Graph, given: int) -> None:
    """Erase the placeholders fx keeps past the ``given`` inputs for parameters traced at a concrete value, with the
    checks it adds on them (``_assert_is_none``, ``torch._assert(x == value)``): nothing else reads them, since the
    trace saw the value. (Anything else reading one: left as traced.)"""
    baked = [n for n in graph.nodes if n.op == "placeholder"][given:]
    doomed, stack = set(baked), [u for n in baked for u in n.users]
    while stack:
        node = stack.pop()
        if node not in doomed:
            doomed.add(node)
            stack.extend(node.users)
    checks = (operator.eq, torch._assert, fx._symbolic_trace._assert_is_none)
    if any(n.op != "placeholder" and not (n.op == "call_function" and n.target in checks) for n in doomed):
        return
    for node in reversed(list(graph.nodes)):
        if node in doomed:
            graph.erase_node(node)


def _symbolic(model: nn.Module, copied: nn.Module, given: int) -> fx.GraphModule | CaptureError:
    """The model through torch.fx.symbolic_trace, or the CaptureError that says why it cannot be."""
    tracer = _Tracer()
    concrete = _defaults_past(copied, given)
    try:
        graph = tracer.trace(copied, concrete_args=concrete or None)
        if concrete:
            _drop_baked(graph, given)
    except Exception as e:
        error = CaptureError(f"cannot trace {type(model).__name__}: {type(e).__name__}: {e}",
                             module=tracer.failed_in or type(model).__name__, source=user_frame(e.__traceback__),
                             hint=_TRACE_HINT)
        error.__cause__ = e
        return error
    try:
        return fx.GraphModule(tracer.root, graph, type(model).__name__)
    except SyntaxError as e:  # fx pastes module and attribute names into its generated code
        raise CaptureError(f"the traced graph of {type(model).__name__} does not compile to Python: {e.msg}",
                           module=type(model).__name__,
                           hint="a submodule or attribute name holds a character Python names cannot (a quote, a "
                                "space...): give it a plain identifier as its name") from e


def _runs_at_another_batch(gm: fx.GraphModule, model: nn.Module, inputs: tuple) -> bool:
    """Does the graph give the model's results at the example's batch size + 1, though torch.export kept the batch
    static (as it does a batch of 1)? Then its ops do not depend on it (a conv net's): any batch size may run.
    Where they do (a reshape to the example's batch), a batch torch.export kept is the only one the module takes."""
    batches = {t.shape[0] for t in inputs if isinstance(t, torch.Tensor) and t.dim() > 0}
    if len(batches) != 1:
        return False
    rows = torch.arange(batches.pop() + 1)
    g = torch.Generator().manual_seed(0)

    def more(t: Any) -> Any:  # (floats: random rows; integers, such as token ids: the example's rows cycled)
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        if t.is_floating_point():
            return torch.randn((len(rows), *t.shape[1:]), generator=g).to(t.dtype)
        return t[rows % t.shape[0]]
    other = tuple(more(t) for t in inputs)
    try:
        with torch.no_grad():
            # (the generated forward itself: GraphModule's call prints a traceback to stderr when it fails)
            return _same_results(gm.forward(*fresh(other)), model(*fresh(other)))
    except Exception:
        return False


_PLAIN_LEAVES = (torch.Tensor, int, float, bool, complex, str, type(None), torch.dtype, torch.device)


def _opaque_output_hint(model: nn.Module, eager: Any) -> str | None:
    """A hint for a model whose output holds an object torch.export cannot flatten (transformers' DynamicCache, which
    GPT-2 and the other decoders return by default), or None."""
    leaves, _ = tree_flatten(eager)
    opaque = sorted({type(v).__name__ for v in leaves if not isinstance(v, _PLAIN_LEAVES)})
    if not opaque:
        return None
    cache = any("cache" in name.lower() for name in opaque)
    return (f"{type(model).__name__}'s output holds {', '.join(opaque)}, which is no tensor: make forward return "
            "tensors only" + ("; for a Hugging Face model, turn its cache off: model.config.use_cache = False"
                              if cache else ""))


def _same_results(a: Any, b: Any) -> bool:
    fa, _ = tree_flatten(a)  # (fx returns its own immutable list / dict types: compare the leaves)
    fb, _ = tree_flatten(b)
    if len(fa) != len(fb):
        return False
    for x, y in zip(fa, fb):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype:
                return False
            if x.is_floating_point():
                if not torch.allclose(x, y, rtol=1e-5, atol=1e-6, equal_nan=True):
                    return False
            elif not torch.equal(x, y):
                return False
    return True


def fresh(inputs: tuple) -> tuple:
    """Copies of the example inputs for one run: a model that writes its inputs in place must not
    change them for the next run (or for the user)."""
    return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in inputs)


def propagate(gm: fx.GraphModule, inputs: tuple) -> Any:
    """Run the graph once on real inputs, recording shape/dtype on each node; returns the outputs."""
    interp = _Recorder(gm)
    try:
        with torch.no_grad():
            return interp.propagate(*fresh(inputs))
    except Exception as e:
        node = interp.current
        raise CaptureError(
            f"the model fails on the example inputs at node {node.name if node else '?'}: {type(e).__name__}: {e}",
            node=node.format_node() if node else None, module=node.meta.get("module") if node else None,
            source=node_source(node) if node else None,
            hint="check the example inputs' shapes and dtypes against what the model expects") from e


class _Recorder(fx.Interpreter):
    """Shape propagation on real tensors (also inside torch.compile's fake mode), remembering the current node:
    each node gets ``meta['tensor_meta']`` as torch.fx's ShapeProp writes it. (ShapeProp itself prints a
    traceback to stderr for every failing node, which a refused graph must not do.)"""

    current: fx.Node | None = None

    def propagate(self, *args: Any) -> Any:
        return self.run(*args)

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        result = super().run_node(n)
        found = False

        def meta(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        value = fx.node.map_aggregate(result, meta)
        if found:
            n.meta["tensor_meta"] = value
        n.meta["type"] = type(result)
        return result
