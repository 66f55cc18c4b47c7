"""GraphModule -> OptimizedModule: the runnable result of optimize().

The optimized graph's forward is plain generated Python calling aten, oneDNN and
``graphopt::`` ops; ``.code`` shows it, ``.portable`` is the graph before backend lowering.

It is for inference only: it runs under torch.no_grad(), so its outputs never require grad, and
it refuses (InputError) an input that requires grad while grad mode is on, rather than return
outputs whose gradients to that input would silently be None. (no_grad costs nothing measurable:
a 1x8 -> 8 linear + relu, one thread, 22.6 us a call without it, 21.3 us with it.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from graphopt.compiler.core.errors import InputError
from graphopt.compiler.core.fast_path import within


def finalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop the submodules and tensors the final graph no longer reads, and regenerate its code."""
    gm.delete_all_unused_submodules()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    # tensors of submodules the graph only reads some tensors of (fc.bias read, fc.weight replaced by its int8 copy)
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        if owner and name not in used and not any(owner == c or owner.startswith(c + ".") for c in called):
            delattr(gm.get_submodule(owner), leaf)
    for name in [b for b, _ in gm.named_buffers(recurse=False) if b not in used]:
        delattr(gm, name)
    for name in [a for a, v in vars(gm).items() if isinstance(v, torch.Tensor) and a not in used]:
        delattr(gm, name)
    gm.recompile()
    return gm


def input_specs(inputs: tuple, fixed_batch: Sequence[int] = ()) -> list[dict[str, Any] | None]:
    """Each input's shape, dtype and device; ``"batch": "fixed"`` on the inputs whose graph takes only the example's
    batch size (torch.export kept it static: compiler/core/export_capture.py)."""
    return [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "device": t.device.type,
             **({"batch": "fixed"} if i in fixed_batch else {})}
            if isinstance(t, torch.Tensor) else None for i, t in enumerate(inputs)]


class OptimizedModule(nn.Module):
    """An nn.Module whose forward is the optimized graph."""

    def __init__(self, gm: fx.GraphModule, report: list, specs: list, backend: str,
                 portable: fx.GraphModule | None = None):
        super().__init__()
        self.graph_module = gm
        # the pipeline's result before backend lowering (graphopt ops, plain weights): what is saved and exported
        object.__setattr__(self, "portable", portable if portable is not None else gm)
        self.report = report
        self.input_specs = specs
        self.backend = backend
        self._forward = gm.forward
        self.fast_graph_module: fx.GraphModule | None = None  # see compiler/core/fast_path.py
        self._fast, self._fast_limit = None, None
        self.engine_plan = None  # which library runs the graph: compiler/core/engines.py
        self._engine = None
        self.nan_checks = "fast"  # as optimize() was told: saved, so that a reload makes the same plan
        # {int8 conv whose own sum another library's int8 graph quantizes (compiler/int8/plans.py summed): the
        # (scale, zero point) it quantizes that sum on (plans.conv_sums)}; saved with the engine plan
        self.int8_sums: dict[str, tuple[float, int]] = {}
        self._checks = [(i, len(s["shape"]), getattr(torch, s["dtype"]), s["device"])
                        for i, s in enumerate(specs) if s is not None]
        self._fixed = [(i, s["shape"][0]) for i, s in enumerate(specs) if s is not None and s.get("batch") == "fixed"]
        self.eval()

    @property
    def code(self) -> str:
        return self.graph_module.code

    def use_fast_path(self, gm: fx.GraphModule, limit: float | None) -> None:
        """Run ``gm`` (relu / clamps fused into oneDNN) on calls whose inputs are finite with max |x| <= limit
        (on every call where limit is None: nan_checks="off")."""
        self.fast_graph_module, self._fast, self._fast_limit = gm, gm.forward, limit

    def use_engine(self, plan, runner) -> None:
        """Run ``runner`` (another library's session over the whole graph) on every call it takes; graphopt's own
        graph on the others. It returns None where a call is not its (anything but float32 CPU tensors of the plan's
        input shapes, or of another batch size where ONNX Runtime's free-batch session takes those, or grad wanted)
        or its range checks fail (an input not finite within plan.limit, or a checked value past its limit):
        compiler/core/engines.py, compiler/core/engine_batches.py."""
        self.engine_plan = plan
        if runner is not None:
            self._engine = runner

    @property
    def engine(self) -> str:
        """The library that runs the graph on calls within its plan ("graphopt": graphopt's own kernels)."""
        return self.engine_plan.engine if self.engine_plan is not None else "graphopt"

    @property
    def op_counts(self) -> dict[str, int]:
        """What the final graph calls, by op: fused kernels and everything left as it was."""
        from collections import Counter

        from graphopt.passes.lib.describe import describe_target

        return dict(Counter(describe_target(n) for n in self.graph_module.graph.nodes
                            if n.op in ("call_function", "call_method", "call_module")))

    def save(self, path: str | Path) -> Path:
        """Write the module to a folder: graph.json, weights.safetensors, code.py, manifest.json (no pickle)."""
        from graphopt.compiler.deploy.save import save

        return save(self.portable, path, backend=self.backend, input_specs=self.input_specs, report=self.report,
                    extra={"engine": self.engine, "nan_checks": self.nan_checks, **self._engine_manifest()})

    def _engine_manifest(self) -> dict:
        """What load() needs to run the same engine plan: its threads, whether ONNX Runtime runs other batch sizes,
        whether its graph has its gates spread and, where guarded, its range limits."""
        plan = self.engine_plan
        if plan is None or plan.engine == "graphopt":
            return {"engine_threads": "torch", "engine_limits": None, "engine_int8_sums": None,
                    "engine_other_batches": False, "engine_gates_spread": False}
        limits = {"inputs": plan.limit, "checks": plan.checks} if plan.limit is not None else None
        sums = {name: [scale, zp] for name, (scale, zp) in self.int8_sums.items()} or None
        return {"engine_threads": plan.threads, "engine_limits": limits, "engine_int8_sums": sums,
                "engine_other_batches": plan.other_batches, "engine_gates_spread": plan.spread}

    def forward(self, *args: Any) -> Any:
        if self._engine is not None:
            out = self._engine(*args)  # (another library: no autograd either way)
            if out is not None:
                return out  # (None: not a call it takes, or a range check inside it failed: graphopt's graph runs it)
        if len(args) != len(self.input_specs):
            raise InputError(f"expected {len(self.input_specs)} inputs, got {len(args)}",
                             hint="call the optimized module with the same inputs as the example inputs")
        for i, rank, dtype, device in self._checks:
            x = args[i]
            if not isinstance(x, torch.Tensor) or x.dim() != rank or x.dtype != dtype or x.device.type != device:
                got = f"{x.dim()}-d {x.dtype} on {x.device.type}" if isinstance(x, torch.Tensor) else type(x).__name__
                raise InputError(f"input {i}: expected a {rank}-d {dtype} tensor on {device} (like the example "
                                 f"{self.input_specs[i]['shape']}), got {got}",
                                 hint="the batch size may change; rank, dtype and device may not. "
                                      "optimize() again for other inputs")
        for i, size in self._fixed:
            if args[i].shape[0] != size:
                raise InputError(f"input {i}: this module takes batch size {size} only (torch.export, which "
                                 f"captured the model, kept the example's batch size fixed in its graph), got "
                                 f"{args[i].shape[0]}",
                                 hint="optimize() with an example at the batch size you call with; with a batch of 2 "
                                      "or more torch.export keeps the batch free where the model allows it")
        if torch.is_grad_enabled():
            wants_grad = [i for i, x in enumerate(args) if isinstance(x, torch.Tensor) and x.requires_grad]
            if wants_grad:
                raise InputError(f"input {wants_grad[0]} requires grad, and an optimized module computes no "
                                 "gradients (its fused kernels have no backward)",
                                 hint="train the eager model; call the optimized one for inference, under "
                                      "torch.no_grad() or torch.inference_mode(), or on x.detach()")
        # no autograd graph: outputs never require grad (and recording nothing is cheaper than recording)
        forward = self._forward
        if self._fast is not None and (self._fast_limit is None or within(self._fast_limit, args)):
            forward = self._fast
        with torch.no_grad():
            return forward(*args)  # the generated code itself: no module-call machinery per call
