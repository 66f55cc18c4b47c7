"""Draw a dumped graph as SVG: with Graphviz's ``dot`` when it is installed, else with a small
layered layout of our own (longest-path layers, one barycenter sweep). Both give one
``<g class="node">`` per node with the node's name as its ``<title>``, which the explorer page
uses to highlight, search and label nodes. Weight reads (get_attr) are not drawn.

``dot_source`` is graphopt's only DOT writer: the dumps' ``NN_<pass>.dot`` files are its text, and
so is what Graphviz lays out here. ``draw`` gives both of the explorer's views of a graph (every node,
and one box per block) from one run of ``dot``; the dumper draws each graph once and hands the
drawings to the explorer, so Graphviz runs once per dumped graph.

The nodes come from a dump folder, which may be hostile: every string from it reaches the SVG
through ``escape`` (ours) or as a quoted, escaped Graphviz label; Graphviz sees node ids
``n0, n1, ...``, never the names, and the names are put back into the ``<title>``s escaped.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from dataclasses import dataclass

import networkx as nx

BOX_H, LAYER_GAP, NODE_GAP, CHAR_W = 34, 62, 18, 6.6
COLORS = {"placeholder": "#dbeafe", "output": "#dbeafe", "call_module": "#fef3c7", "fused": "#bbf7d0",
          "call_method": "#f5f5f4", "call_function": "#ffffff"}


_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_DOT_CONTROL = re.compile("[\x00-\x1f\x7f]")


def escape(value: object) -> str:
    """Any value from a dump as SVG/HTML text: markup escaped, characters XML cannot hold replaced."""
    return html.escape(_NOT_XML.sub("\ufffd", str(value)), quote=True)


def _dot_text(value: str) -> str:
    """A string for a double-quoted Graphviz label: quotes escaped; no control characters, and no backslash
    (one before the closing quote would escape it, others start label escapes), shown as U+2216 instead."""
    return _DOT_CONTROL.sub(" ", value).replace("\\", "\u2216").replace('"', '\\"')


def _drawn(nodes: list[dict]) -> list[dict]:
    return [n for n in nodes if n["op"] != "get_attr"]


def _label(n: dict) -> tuple[str, str]:
    target = "input" if n["op"] == "placeholder" else ("output" if n["op"] == "output" else n["target"])
    target = target.replace("torch.ops.", "").replace("torch.nn.functional.", "F.")
    second = target[:44] + (f"  {n['shape']}" if n["shape"] else "")
    return n["name"][:40], second


def _color(n: dict) -> str:
    return COLORS["fused"] if n.get("fused") else COLORS.get(n["op"], "#ffffff")


def _layers(nodes: list[dict], names: set[str]) -> dict[str, int]:
    """Longest-path layers. A collapsed graph can have cycles between blocks: each strongly
    connected component shares one layer (networkx's condensation makes the rest a DAG)."""
    g = nx.DiGraph()
    g.add_nodes_from(n["name"] for n in nodes)
    g.add_edges_from((i, n["name"]) for n in nodes for i in n["inputs"] if i in names and i != n["name"])
    dag = nx.condensation(g)
    depth: dict[int, int] = {}
    for c in nx.topological_sort(dag):
        depth[c] = 1 + max((depth[p] for p in dag.predecessors(c)), default=-1)
    return {name: depth[dag.graph["mapping"][name]] for name in g.nodes}


def layered_svg(nodes: list[dict]) -> str:
    nodes = _drawn(nodes)
    names = {n["name"] for n in nodes}
    layer = _layers(nodes, names)
    rows: dict[int, list[dict]] = {}
    for n in nodes:
        rows.setdefault(layer[n["name"]], []).append(n)
    width = {n["name"]: max(len(s) for s in _label(n)) * CHAR_W + 16 for n in nodes}
    x: dict[str, float] = {}
    for depth in sorted(rows):
        row = rows[depth]
        if depth > 0:  # order by the mean position of each node's inputs
            row.sort(key=lambda n: sum(x.get(i, 0) for i in n["inputs"]) / max(1, len(n["inputs"])))
        pos = 0.0
        for n in row:
            x[n["name"]] = pos + width[n["name"]] / 2
            pos += width[n["name"]] + NODE_GAP
        shift = -pos / 2
        for n in row:
            x[n["name"]] += shift
    left = min(x[n] - width[n] / 2 for n in x) - 10
    right = max(x[n] + width[n] / 2 for n in x) + 10
    height = (max(rows) + 1) * (BOX_H + LAYER_GAP)
    y = {n["name"]: 10 + layer[n["name"]] * (BOX_H + LAYER_GAP) for n in nodes}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="graph" viewBox="{left:.0f} 0 {right - left:.0f} '
           f'{height:.0f}" font-family="monospace" font-size="11">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="6" markerHeight="6" '
           'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#64748b"/></marker></defs><g class="edges">']
    for n in nodes:
        for i in n["inputs"]:
            if i in names:
                x1, y1, x2, y2 = x[i], y[i] + BOX_H, x[n["name"]], y[n["name"]]
                mid = (y1 + y2) / 2
                out.append(f'<path class="edge" d="M{x1:.1f},{y1:.1f} C{x1:.1f},{mid:.1f} {x2:.1f},{mid:.1f} '
                           f'{x2:.1f},{y2:.1f}" fill="none" stroke="#94a3b8" marker-end="url(#arrow)"/>')
    out.append("</g>")
    for n in nodes:
        first, second = _label(n)
        w, cx, top = width[n["name"]], x[n["name"]], y[n["name"]]
        out.append(f'<g class="node"><title>{escape(n["name"])}</title>'
                   f'<rect x="{cx - w / 2:.1f}" y="{top}" width="{w:.1f}" height="{BOX_H}" rx="5" '
                   f'fill="{_color(n)}" stroke="#475569"/>'
                   f'<text x="{cx:.1f}" y="{top + 14}" text-anchor="middle" font-weight="bold">'
                   f'{escape(first)}</text>'
                   f'<text x="{cx:.1f}" y="{top + 27}" text-anchor="middle" fill="#334155">{escape(second)}'
                   f'</text></g>')
    out.append("</svg>")
    return "".join(out)


def dot_source(nodes: list[dict]) -> tuple[str, list[str]]:
    """(Graphviz source, node names by id): node ``i`` is ``n{i}``, its label the escaped name and target."""
    nodes = _drawn(nodes)
    ids = {n["name"]: f"n{i}" for i, n in enumerate(nodes)}
    lines = ['digraph g { rankdir=TB; node [shape=box, style="rounded,filled", fontname="monospace", fontsize=10];']
    for n in nodes:
        first, second = _label(n)
        lines.append(f'{ids[n["name"]]} [label="{_dot_text(first)}\\n{_dot_text(second)}", fillcolor="{_color(n)}"];')
        lines += [f"{ids[i]} -> {ids[n['name']]};" for i in n["inputs"] if i in ids]
    lines.append("}")
    return "\n".join(lines), [n["name"] for n in nodes]


def graphviz_svgs(graphs: list[list[dict]]) -> list[str] | None:
    """Each graph drawn by Graphviz, all of them in one run of ``dot``; None where it is not installed
    or fails (the caller falls back to ``layered_svg``)."""
    if not shutil.which("dot"):
        return None
    sources = [dot_source(nodes) for nodes in graphs]
    try:
        done = subprocess.run(["dot", "-Tsvg"], input="\n".join(source for source, _ in sources), capture_output=True,
                              encoding="utf-8", errors="replace", timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    svgs = re.findall(r"<svg\b.*?</svg>", done.stdout, re.S)  # dot writes one document per input graph, in order
    if done.returncode != 0 or len(svgs) != len(graphs):
        return None
    return [_with_names(svg, names) for svg, (_, names) in zip(svgs, sources)]


def _with_names(svg: str, names: list[str]) -> str:
    # the titles name the node ids; give them back their (escaped) names, which the page searches by
    svg = re.sub(r"<title>n(\d+)&#45;&gt;n(\d+)</title>",
                 lambda m: f"<title>{escape(names[int(m[1])])}&#45;&gt;{escape(names[int(m[2])])}</title>", svg)
    svg = re.sub(r"<title>n(\d+)</title>", lambda m: f"<title>{escape(names[int(m[1])])}</title>", svg)
    return svg.replace("<svg", '<svg class="graph"', 1)


def block_groups(nodes: list[dict], depth: int = 2) -> dict[str, str]:
    """Node name -> the block it belongs to: the deepest module (at most ``depth`` levels down) on
    its module path that contains other modules (layer1, layer1.0), or the node itself."""
    paths = {n.get("module") or "" for n in nodes} - {""}
    blocks = {".".join(p.split(".")[:k]) for p in paths for k in range(1, len(p.split(".")))}
    out = {}
    for n in nodes:
        parts = (n.get("module") or "").split(".") if n.get("module") else []
        prefixes = [".".join(parts[:k]) for k in range(1, min(depth, len(parts)) + 1)]
        out[n["name"]] = next((p for p in reversed(prefixes) if p in blocks), n["name"])
    return out


def collapse(nodes: list[dict]) -> list[dict]:
    """One node per block: repeated blocks (layer1.0, layer1.1, ...) become one box each."""
    nodes = _drawn(nodes)
    owner = block_groups(nodes)
    groups: dict[str, dict] = {}
    for n in nodes:
        key = owner[n["name"]]
        g = groups.setdefault(key, {"name": key, "op": n["op"] if key == n["name"] else "call_module",
                                    "target": n["target"], "inputs": [], "shape": n["shape"], "members": 0,
                                    "fused": False})
        g["members"] += 1
        g["shape"] = n["shape"]  # the block's last node's shape: its output
        for i in n["inputs"]:
            if i in owner and owner[i] != key and owner[i] not in g["inputs"]:
                g["inputs"].append(owner[i])
    for g in groups.values():
        if g["members"] > 1:
            g["target"] = f"block of {g['members']} ops"
    return list(groups.values())


@dataclass(frozen=True)
class Drawing:
    """A graph as the explorer shows it."""

    svg: str          # every node
    blocks_svg: str   # one box per block (``collapse``)
    layout: str       # "graphviz" or "layered"


def draw(nodes: list[dict]) -> Drawing:
    """Both views of a graph; where Graphviz is installed, one run of ``dot`` draws the two."""
    views = [nodes, collapse(nodes)]
    svgs = graphviz_svgs(views)
    if svgs is not None:
        return Drawing(svgs[0], svgs[1], "graphviz")
    return Drawing(layered_svg(views[0]), layered_svg(views[1]), "layered")
