"""Runs a pipeline: pass, lint, recompile, check numerics, dump, record.

Transactional: each pass runs on a copy of the graph (sharing the weights, which passes never
modify in place). The copy replaces the graph only once it has linted, run, kept the interface
and passed the numerics oracle for the pass's kind; otherwise the copy is dropped and a
PassError says which pass, after which passes, and the first node whose value went wrong.
The pipeline repeats until no pass rewrites anything, at most ``max_iterations`` times.

Each run of a pass gets its own record of misses (``ctx.miss``: why a candidate rewrite did not
fire); the pass's record keeps each (reason, node) once over all its runs, and the dump of a run that
changed the graph shows that run's misses. A pass that changed nothing still leaves no dump.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from graphopt.compiler.core.capture import fresh, propagate
from graphopt.compiler.core.errors import GraphoptError, PassError, node_source
from graphopt.compiler.core.verify import Oracle, first_divergence, same_bits
from graphopt.compiler.ui.dump import Dumper
from graphopt.passes import Misses
from graphopt.passes.lib.query import is_impure
from graphopt.passes.pipeline import REGISTRY, PassContext, PassFn, PassInfo, find

log = logging.getLogger("graphopt")

# The SQNR floors of the int8 checks: quantizing must not wreck the outputs (the accuracy budget is
# the user's, compiler/quantize.py), and lowering an int8 graph may differ from it by rounding only.
INT8_PASS_FLOOR_DB = 10.0
INT8_LOWERING_FLOOR_DB = 30.0
INT8_LOWERING_MARGIN_DB = 1.0  # ... or, under it, as accurate against fp32 as the int8 graph, to this (verify.py)
MISSED_NODES = 5  # node names a record keeps per miss reason


@dataclass
class PassRecord:
    name: str
    rewrites: int = 0
    seconds: float = 0.0
    nodes_before: int = 0
    nodes_after: int = 0
    max_error: float | None = None
    misses: dict[str, int] = field(default_factory=dict)  # why candidate rewrites did not fire: reason -> how many
    missed_nodes: dict[str, list[str]] = field(default_factory=dict)  # the first few of those nodes, by name

    def as_dict(self) -> dict:
        return asdict(self)


def clone(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of the graph; modules and tensors are shared, not copied."""
    return fx.GraphModule(gm, copy.deepcopy(gm.graph), gm.__class__.__name__)


def _dead(gm: fx.GraphModule) -> set[str]:
    """Names of nodes nobody reads that could be erased (in-place and other impure ops excepted)."""
    return {n.name for n in gm.graph.nodes if not n.users and not is_impure(gm, n)}


def count_nodes(gm: fx.GraphModule) -> int:
    """Nodes that compute something: inputs, outputs and weight reads do not count."""
    return sum(1 for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr"))


class PassManager:
    def __init__(self, passes: Sequence[str | PassFn], *, check: bool = True, dump_dir: str | None = None,
                 dumper: Dumper | None = None, max_iterations: int = 4, int8_reference: list | None = None,
                 int8_floor_db: float = INT8_PASS_FLOOR_DB):
        unknown = [p if isinstance(p, str) else getattr(p, "__name__", repr(p)) for p in passes if find(p) is None]
        if unknown:
            raise GraphoptError(f"unknown pass(es): {', '.join(unknown)}",
                                hint=f"available passes: {', '.join(sorted(REGISTRY))}")
        self.passes: list[PassInfo] = [find(p) for p in passes]
        self.check, self.max_iterations = check, max_iterations
        # int8 graphs: every pass is checked by SQNR, against these outputs (default: the captured model's)
        self.int8_reference, self.int8_floor_db = int8_reference, int8_floor_db
        self.dumper = dumper or (Dumper(dump_dir) if dump_dir else None)
        self.oracle: Oracle | None = None

    def run(self, gm: fx.GraphModule, ctx: PassContext, oracle: Oracle | None = None
            ) -> tuple[fx.GraphModule, list[PassRecord]]:
        """Run the pipeline on ``gm`` (the captured graph, or an earlier pipeline's result with its oracle)."""
        if self.check:
            self.oracle = oracle or Oracle.build(gm, ctx.example_inputs)
            # outputs of the graph as it stands, for the exact passes
            if oracle is None:
                self._previous = self.oracle.eager
            else:
                with torch.no_grad():
                    self._previous = tree_flatten(gm(*fresh(ctx.example_inputs)))[0]
        oracle, dumper = self.oracle, self.dumper
        if dumper and dumper.index == 0:
            dumper.captured(gm)
        records = {p.name: PassRecord(p.name) for p in self.passes}
        misses = {p.name: Misses() for p in self.passes}
        history: list[str] = []
        for _ in range(self.max_iterations):
            changed = False
            for info in self.passes:
                record = records[info.name]
                work, before = clone(gm), count_nodes(gm)
                if not history.count(info.name):
                    record.nodes_before = before
                start = time.perf_counter()
                run_ctx = replace(ctx, misses=Misses())
                try:
                    rewrites = info.fn(work, run_ctx)
                except Exception as e:
                    raise PassError(f"pass {info.name} raised {type(e).__name__}: {e}; the graph was left as it was",
                                    pass_name=info.name, passes_before=list(history),
                                    hint="this is a graphopt bug: please report it with the model; "
                                         f"passes=[...] without {info.name!r} works around it") from e
                if rewrites:
                    error = self._verify(gm, work, info, ctx, oracle, history)
                    if self.check:
                        self._check_deterministic(gm, work, info, ctx, history)
                    gm, changed = work, True
                    record.max_error = error if record.max_error is None else max(record.max_error, error or 0.0)
                record.seconds += time.perf_counter() - start
                record.rewrites += rewrites
                misses[info.name].update(run_ctx.misses)
                if rewrites or len(history) < len(self.passes):
                    record.nodes_after = count_nodes(gm)
                if rewrites and dumper:
                    dumper.after_pass(gm, info, rewrites, time.perf_counter() - start, before, count_nodes(gm), error,
                                      misses=run_ctx.misses)
                history.append(info.name)
            if not changed:
                break
        else:
            log.warning("the pipeline still rewrote the graph after %d iterations; stopping there",
                        self.max_iterations)
        for name, record in records.items():
            record.misses = misses[name].counts()
            record.missed_nodes = {reason: names[:MISSED_NODES] for reason, names in misses[name].nodes.items()}
        report = list(records.values())
        if dumper:
            dumper.report(report)
        return gm, report


    def _check_deterministic(self, before: fx.GraphModule, after: fx.GraphModule, info: PassInfo, ctx: PassContext,
                             history: list[str]) -> None:
        """The same pass on the same graph must write the same code (no dict-order or id-based choices)."""
        twin = clone(before)
        info.fn(twin, replace(ctx, misses=Misses()))
        twin.recompile()
        if twin.code != after.code:
            raise PassError(f"pass {info.name} is not deterministic: two runs on the same graph wrote different code; "
                            "the graph was rolled back to before it", pass_name=info.name,
                            passes_before=list(history), hint="this is a graphopt bug: please report it with the model")

    def _verify(self, before: fx.GraphModule, after: fx.GraphModule, info: PassInfo, ctx: PassContext,
                oracle: Oracle | None, history: list[str]) -> float | None:
        """Lint, recompile, rerun shape propagation and the oracle; raise PassError on any failure."""
        def fail(problem: str, node: fx.Node | None = None, cause: Exception | None = None) -> PassError:
            where = f" (first wrong value at node {node.name})" if node is not None else ""
            return PassError(
                f"pass {info.name} ({info.kind}) {problem}{where}; the graph was rolled back to before it",
                pass_name=info.name, passes_before=list(history),
                node=node.format_node() if node is not None else None,
                module=node.meta.get("module") if node is not None else None,
                source=node_source(node) if node is not None else None,
                hint=f"passes before it: {', '.join(history) or 'none'}. Run with passes=[...] without "
                     f"{info.name!r} to work around it, and please report the model")
        try:
            after.graph.lint()
            after.recompile()
            outputs = propagate(after, ctx.example_inputs)
        except Exception as e:
            problem = e.message if isinstance(e, GraphoptError) else f"{type(e).__name__}: {e}"
            raise fail(f"produced a graph that does not run: {problem}", cause=e) from e
        dead_before, dead_after = _dead(before), _dead(after)
        if len(dead_after) > len(dead_before):  # (a rewritten dead node may come back under a new name)
            raise fail(f"left unused nodes behind: {', '.join(sorted(dead_after - dead_before))}")
        if oracle is None:
            return None
        flat, spec = tree_flatten(outputs)
        problem = oracle.interface_error(flat, spec)
        if problem is None and info.kind == "exact":
            if not all(same_bits(a, b) for a, b in zip(flat, self._previous)):
                problem = "changed the outputs of a pass that must keep them bitwise equal"
        if problem is None and (info.kind == "int8" or self.int8_reference is not None):
            margin = INT8_LOWERING_MARGIN_DB if self.int8_reference is not None else None
            problem = oracle.int8_error(flat, self.int8_floor_db, self.int8_reference, margin_db=margin)
        elif problem is None and info.kind == "fp32":
            problem = oracle.fp32_error(flat)
        if problem is not None:
            node = first_divergence(before, after, ctx.example_inputs, exact=info.kind == "exact")
            raise fail(problem, node)
        self._previous = flat
        return oracle.max_error(flat)


def is_quantized(gm: fx.GraphModule) -> bool:
    from graphopt.kernels.ops import INT8_OPS, OPS

    targets = {OPS[name] for name in INT8_OPS}
    return any(n.op == "call_function" and n.target in targets for n in gm.graph.nodes)


def lower(portable: fx.GraphModule, ctx: PassContext, lowering: Sequence[str | PassFn], *, check: bool = True,
          manager: PassManager | None = None) -> tuple[fx.GraphModule, list]:
    """The backend's lowering on a copy of ``portable`` (an int8 graph is checked against itself, by SQNR)."""
    reference = None
    if check and is_quantized(portable):
        with torch.no_grad():
            reference = tree_flatten(portable(*fresh(ctx.example_inputs)))[0]
    lowering_manager = PassManager(lowering, check=check, dumper=manager.dumper if manager else None,
                                   int8_reference=reference, int8_floor_db=INT8_LOWERING_FLOOR_DB)
    return lowering_manager.run(clone(portable), ctx, oracle=manager.oracle if manager else None)


def run_pipeline(gm: fx.GraphModule, ctx: PassContext, passes: Sequence[str | PassFn],
                 lowering: Sequence[str | PassFn], *,
                 check: bool = True, dump_dir: str | None = None) -> tuple[fx.GraphModule, fx.GraphModule, list]:
    """The pipeline, then the backend's lowering on a copy: (portable graph, lowered graph, report)."""
    manager = PassManager(passes, check=check, dump_dir=dump_dir)
    portable, report = manager.run(gm, ctx)
    lowered, lowering_report = lower(portable, ctx, lowering, check=check, manager=manager)
    return portable, lowered, report + lowering_report
