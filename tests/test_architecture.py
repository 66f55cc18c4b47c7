"""The package's shape, checked: no import cycles, the arrows point down (compiler -> passes -> kernels), no pass
imports another pass, ``import graphopt`` stays light, and every registered pass is in a pipeline.

The import graph is read from the source (every ``import`` statement, function-local ones too), not from
sys.modules: an import that only runs on some path still counts. ``from a import b`` is an edge to the module
``a.b`` when there is one, else to ``a``; the parent packages Python runs first are not counted as edges.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_INIT = ROOT / "compiler" / "api" / "__init__.py"  # graphopt/__init__.py (pyproject's package-dir)
SOURCES = ("compiler", "passes", "kernels")


def _modules() -> dict[str, Path]:
    files = [p for d in SOURCES for p in sorted((ROOT / d).rglob("*.py")) if p != PACKAGE_INIT]
    out = {"graphopt": PACKAGE_INIT}
    for path in files:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(["graphopt", *parts])] = path
    return out


MODULES = _modules()


def _package(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _targets(module: str, node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = _package(module).split(".")
            base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    else:
        return []
    out = []
    for name in names:
        while name and name not in MODULES:  # `import graphopt.x.y` names a module; trim attributes off
            name = name.rpartition(".")[0]
        if name.startswith("graphopt"):
            out.append(name)
    return out


def import_graph() -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_nodes_from(MODULES)
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _targets(module, node):
                if target != module:
                    g.add_edge(module, target)
    return g


def _edges(g: nx.DiGraph, source: str, target: str) -> list[str]:
    def inside(m: str, pkg: str) -> bool:
        return m == pkg or m.startswith(pkg + ".")

    return sorted(f"{a} -> {b}" for a, b in g.edges if inside(a, source) and inside(b, target))


def test_the_import_graph_is_read():
    g = import_graph()
    assert len(MODULES) > 50 and "graphopt.passes.lib.query" in MODULES
    assert g.has_edge("graphopt.passes.pipeline", "graphopt.passes.fold_conv_bn")
    assert g.has_edge("graphopt.compiler.core.pipeline", "graphopt.passes.pipeline")


def test_no_import_cycles():
    cycles = [sorted(c) for c in nx.strongly_connected_components(import_graph()) if len(c) > 1]
    assert cycles == [], f"import cycles among graphopt modules: {cycles}"


def test_layering():
    g = import_graph()
    assert _edges(g, "graphopt.kernels", "graphopt.passes") == []
    assert _edges(g, "graphopt.kernels", "graphopt.compiler") == []
    assert _edges(g, "graphopt.passes", "graphopt.compiler") == []


def test_no_pass_imports_another_pass():
    g = import_graph()
    helpers = {"graphopt.passes", "graphopt.passes.pipeline"}
    passes = {m for m in MODULES if m.startswith("graphopt.passes.") and m.count(".") == 2} - helpers
    passes -= {m for m in MODULES if m.startswith("graphopt.passes.lib")}
    assert len(passes) >= 10
    leaks = sorted(f"{a} -> {b}" for a, b in g.edges
                   if b in passes and a.startswith("graphopt.passes") and a != "graphopt.passes.pipeline")
    assert leaks == [], "only passes/pipeline.py imports the passes; shared code goes to passes/lib/"


def test_import_graphopt_is_light():
    # `import torch` itself imports torch.distributed: what counts is what `import graphopt` adds after it
    probe = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import graphopt\n"
        "print('\\n'.join(sorted(set(sys.modules) - before)))\n"
    )
    added = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True,
                           cwd=ROOT.parent, timeout=300).stdout.split()
    heavy = ("optuna", "onnx", "onnxruntime", "graphopt.compiler.workflow", "graphopt.compiler.deploy.onnx")
    assert [m for m in added if m.split(".")[0] in heavy or m.startswith(heavy)] == []
    assert "graphopt" in added


def test_every_registered_pass_is_in_a_pipeline_or_listed_as_optional():
    from graphopt.passes.pipeline import DEFAULT_PIPELINE, LOWERING, OPTIONAL, REGISTRY

    listed = [*DEFAULT_PIPELINE, *(fn for lowering in LOWERING.values() for fn in lowering), *OPTIONAL]
    assert sorted(REGISTRY) == sorted({fn.__name__ for fn in listed})
    assert all(REGISTRY[fn.__name__].fn is fn for fn in listed)
    assert len(listed) == len({fn.__name__ for fn in listed}), "a pass listed twice"
