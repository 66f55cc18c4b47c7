"""Pass-by-pass dumps and the report.

    00_captured.py            the graph as traced
    NN_<pass>.py              after each pass that changed something, under a header
    NN_<pass>.diff            against the previous dump
    NN_<pass>.dot (.svg)      the graph in Graphviz's language (graph_svg.dot_source), drawn (.svg) where
                              Graphviz is installed: it runs once per graph, and the explorer reuses the drawing
    report.md                 one row per pass, then why the rewrites that did not fire were skipped
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import torch.fx as fx

from graphopt.compiler.ui.graph_svg import Drawing, dot_source, draw
from graphopt.passes.lib.describe import describe_target
from graphopt.passes.lib.query import tensor_meta

_PRELUDE = ("import operator\n\nimport torch\n\n"
            "import graphopt.kernels.ops  # noqa: F401  (registers torch.ops.graphopt)\n\n")


def graph_source(gm: fx.GraphModule) -> str:
    return gm.print_readable(print_output=False, include_stride=False, include_device=False)


def _miss_lines(missed: dict[str, list[str]], shown: int = 5) -> list[str]:
    """Header lines: why each candidate rewrite of this run did not fire, with the first few nodes."""
    lines = []
    for reason, names in missed.items():
        more = f", +{len(names) - shown} more" if len(names) > shown else ""
        lines.append(f"not rewritten, {reason}: {len(names)} ({', '.join(names[:shown])}{more})")
    return lines


def _miss_table(records: list) -> str:
    """report.md's second table: every pass's misses, also those of passes that changed nothing."""
    rows = [f"| {r.name} | {reason} | {count} | {', '.join(r.missed_nodes.get(reason, []))} |"
            for r in records for reason, count in r.misses.items()]
    if not rows:
        return ""
    return ("\n## Rewrites that did not fire, and why\n\n| pass | reason | nodes | first nodes |\n|---|---|---:|---|\n"
            + "\n".join(rows) + "\n")


def kernel_of(node: fx.Node) -> str:
    """Which implementation runs a node, for the explorer's kernel table."""
    target = describe_target(node)
    if "mkldnn" in target:
        return "oneDNN (CPU)"
    if target.startswith("mkl."):
        return "MKL (CPU)"
    if "graphopt" in target:
        return "graphopt op (CPU kernel: aten + in-place epilogue; reference elsewhere)"
    module = getattr(node.target, "__module__", "") or ""
    if module == "graphopt.kernels.reference":
        return "reference (aten)"
    if module.startswith("graphopt.kernels.triton"):
        return "Triton"
    return "aten"


def graph_record(gm: fx.GraphModule) -> list[dict]:
    """The graph as data for the explorer: one entry per node."""
    out = []
    for node in gm.graph.nodes:
        meta = tensor_meta(node)
        shape = "x".join(map(str, meta.shape)) if meta is not None and hasattr(meta, "shape") else ""
        out.append({"name": node.name, "op": node.op, "target": describe_target(node),
                    "inputs": [i.name for i in node.all_input_nodes], "shape": shape,
                    "module": node.meta.get("module", ""), "replaces": node.meta.get("replaces", []),
                    "fused": kernel_of(node) != "aten",
                    "kernel": kernel_of(node)})
    return out


class Dumper:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for old in self.root.glob("[0-9][0-9]_*"):
            old.unlink()
        self.index, self.previous = 0, ""
        self.records: list = []  # every pipeline's records, for one report
        self.drawings: dict[str, Drawing] = {}  # by dump file name: the explorer draws none of these again

    def _write(self, label: str, header: list[str], gm: fx.GraphModule, stats: dict | None = None) -> None:
        stem = self.root / f"{self.index:02d}_{label}"
        source = graph_source(gm)
        text = "".join(f"# {h}\n" for h in header) + "\n" + _PRELUDE + source
        stem.with_suffix(".py").write_text(text)
        if self.previous:
            diff = difflib.unified_diff(self.previous.splitlines(True), source.splitlines(True),
                                        f"{self.index - 1:02d}", f"{self.index:02d}_{label}")
            stem.with_suffix(".diff").write_text("".join(diff))
        nodes = graph_record(gm)
        stem.with_suffix(".json").write_text(json.dumps({"index": self.index, "label": label, "header": header,
                                                         "stats": stats or {}, "nodes": nodes, "code": source}))
        stem.with_suffix(".dot").write_text(dot_source(nodes)[0] + "\n", encoding="utf-8")
        drawing = self.drawings[stem.with_suffix(".json").name] = draw(nodes)
        if drawing.layout == "graphviz":
            stem.with_suffix(".svg").write_text(drawing.svg, encoding="utf-8")
        self.previous = source
        self.index += 1

    def captured(self, gm: fx.GraphModule) -> None:
        self._write("captured", ["graphopt dump 00: the graph as captured",
                                 f"nodes: {sum(1 for _ in gm.graph.nodes)}"], gm)

    def after_pass(self, gm, info, rewrites: int, seconds: float, before: int, after: int, error,
                   misses=None) -> None:
        err = "not checked" if error is None else f"{error:.3g}"
        missed = misses.nodes if misses is not None else {}
        self._write(info.name, [f"graphopt dump {self.index:02d}: after pass {info.name} ({info.kind})",
                                f"rewrites: {rewrites}", f"time: {seconds * 1e3:.1f} ms",
                                f"nodes: {before} -> {after}", f"max error against the captured model: {err}",
                                *_miss_lines(missed)], gm,
                    {"pass": info.name, "kind": info.kind, "rewrites": rewrites, "ms": seconds * 1e3,
                     "nodes_before": before, "nodes_after": after, "max_error": error,
                     "misses": {reason: len(names) for reason, names in missed.items()}})

    def report(self, records: list) -> None:
        self.records += records
        records = self.records
        rows = ["| pass | rewrites | ms | nodes before | nodes after | max error |", "|---|---:|---:|---:|---:|---:|"]
        for r in records:
            err = "" if r.max_error is None else f"{r.max_error:.3g}"
            cells = [r.name, r.rewrites, f"{r.seconds * 1e3:.1f}", r.nodes_before, r.nodes_after, err]
            rows.append("| " + " | ".join(map(str, cells)) + " |")
        (self.root / "report.md").write_text("# graphopt pass report\n\n" + "\n".join(rows) + "\n"
                                             + _miss_table(records))
        (self.root / "report.json").write_text(json.dumps([r.as_dict() for r in records], indent=1))
        from graphopt.compiler.ui.explorer import render

        # (a dump_dir given as a symlink is the caller's choice; render refuses links)
        render(self.root.resolve(), self.drawings)
