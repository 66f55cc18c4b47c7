"""Pass-by-pass dumps and the report.

    00_captured.py            the graph as traced
    NN_<pass>.py              after each pass that changed something, under a header
    NN_<pass>.diff            against the previous dump
    NN_<pass>.dot (.svg)      the graph, drawn from its networkx view (.svg where Graphviz is installed)
    report.md                 one row per pass
"""

from __future__ import annotations

import difflib
import json
import shutil
import subprocess
from pathlib import Path

import torch.fx as fx

from graphopt.passes.graph import describe_target, tensor_meta, to_networkx

_PRELUDE = ("import operator\n\nimport torch\n\n"
            "import graphopt.kernels.ops  # noqa: F401  (registers torch.ops.graphopt)\n\n")


def graph_source(gm: fx.GraphModule) -> str:
    return gm.print_readable(print_output=False, include_stride=False, include_device=False)


def to_dot(gm: fx.GraphModule) -> str:
    g = to_networkx(gm)
    lines = ["digraph graphopt {", '  rankdir=TB; node [shape=box, fontname="monospace", fontsize=10];']
    colors = {"placeholder": "#dbeafe", "output": "#dbeafe", "get_attr": "#f3f4f6", "call_module": "#fef3c7"}
    for name, data in g.nodes(data=True):
        fused = "graphopt" in data["target"]
        color = "#bbf7d0" if fused else colors.get(data["op"], "#ffffff")
        target = data["target"] if data["op"] != "placeholder" else "input"
        label = "\\n".join(x for x in (name, target, data["shape"]) if x)
        lines.append(f'  "{name}" [label="{_escape(label)}", style=filled, fillcolor="{color}"];')
    lines += [f'  "{a}" -> "{b}";' for a, b in g.edges]
    return "\n".join(lines + ["}"]) + "\n"


def _escape(s: str) -> str:
    return s.replace('"', '\\"')


def kernel_of(node: fx.Node) -> str:
    """Which implementation runs a node, for the explorer's kernel table."""
    target = describe_target(node)
    if "mkldnn" in target:
        return "oneDNN (CPU)"
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

    def _write(self, label: str, header: list[str], gm: fx.GraphModule, stats: dict | None = None) -> None:
        stem = self.root / f"{self.index:02d}_{label}"
        source = graph_source(gm)
        text = "".join(f"# {h}\n" for h in header) + "\n" + _PRELUDE + source
        stem.with_suffix(".py").write_text(text)
        if self.previous:
            diff = difflib.unified_diff(self.previous.splitlines(True), source.splitlines(True),
                                        f"{self.index - 1:02d}", f"{self.index:02d}_{label}")
            stem.with_suffix(".diff").write_text("".join(diff))
        stem.with_suffix(".json").write_text(json.dumps({"index": self.index, "label": label, "header": header,
                                                         "stats": stats or {}, "nodes": graph_record(gm),
                                                         "code": source}))
        dot = stem.with_suffix(".dot")
        dot.write_text(to_dot(gm))
        if shutil.which("dot"):
            subprocess.run(["dot", "-Tsvg", str(dot), "-o", str(stem.with_suffix(".svg"))], check=False,
                           timeout=120, capture_output=True)
        self.previous = source
        self.index += 1

    def captured(self, gm: fx.GraphModule) -> None:
        self._write("captured", ["graphopt dump 00: the graph as captured",
                                 f"nodes: {sum(1 for _ in gm.graph.nodes)}"], gm)

    def after_pass(self, gm, info, rewrites: int, seconds: float, before: int, after: int, error) -> None:
        err = "not checked" if error is None else f"{error:.3g}"
        self._write(info.name, [f"graphopt dump {self.index:02d}: after pass {info.name} ({info.kind})",
                                f"rewrites: {rewrites}", f"time: {seconds * 1e3:.1f} ms",
                                f"nodes: {before} -> {after}", f"max error against the captured model: {err}"], gm,
                    {"pass": info.name, "kind": info.kind, "rewrites": rewrites, "ms": seconds * 1e3,
                     "nodes_before": before, "nodes_after": after, "max_error": error})

    def report(self, records: list) -> None:
        self.records += records
        records = self.records
        rows = ["| pass | rewrites | ms | nodes before | nodes after | max error |", "|---|---:|---:|---:|---:|---:|"]
        for r in records:
            err = "" if r.max_error is None else f"{r.max_error:.3g}"
            cells = [r.name, r.rewrites, f"{r.seconds * 1e3:.1f}", r.nodes_before, r.nodes_after, err]
            rows.append("| " + " | ".join(map(str, cells)) + " |")
        (self.root / "report.md").write_text("# graphopt pass report\n\n" + "\n".join(rows) + "\n")
        (self.root / "report.json").write_text(json.dumps([r.as_dict() for r in records], indent=1))
        from graphopt.compiler.ui.explorer import render

        render(self.root)
