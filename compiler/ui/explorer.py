"""The pass explorer: ``graphopt report DUMP_DIR`` turns the dumps into ``DUMP_DIR/index.html``,
one self-contained page (no network: its script and style are inlined).

For each pass that changed the graph: its numbers on a timeline, the graph before and after
(removed nodes red, added green, changed amber; fused nodes labelled with what they replace),
pan / zoom / search, a view with one box per block (repeated blocks collapsed), and the code
diff. Below: op counts before and after the whole pipeline, the kernel each fused op runs on, and
why each candidate rewrite that did not fire was skipped (from report.json).

A dump folder may come from someone else, so everything read from it is data, never markup:
the SVG text is escaped here (graph_svg.escape), every value the page puts into HTML goes
through the page's ``esc``, and the JSON is embedded with ``<``, ``>`` and ``&`` as \\u escapes.
Which files are read comes from the folder's listing (``NN_<pass>.json`` and its ``.diff``),
never from the dumps' contents; the folder's ``.svg`` files are never read: the graphs are drawn here
from the dumps' nodes, or handed over by the dumper that drew them in this process. The page is
written through a temporary file in the folder and ``os.replace``; a folder or an ``index.html``
that is a symlink is refused, so nothing outside the folder is ever written.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Mapping

from graphopt.compiler.core.errors import GraphoptError
from graphopt.compiler.ui.graph_svg import Drawing, block_groups, draw

PAGE = Path(__file__).with_name("explorer_page.html")
_DUMP_NAME = re.compile(r"(\d\d)_([A-Za-z0-9_]+)\.json")
_NODE_KEYS = {"name": str, "op": str, "target": str, "inputs": list}
_HINT = "point graphopt report at a folder written by optimize(..., dump_dir=...) or GRAPHOPT_DUMP"


def _changes(prev: list[dict], cur: list[dict]) -> dict:
    before = {n["name"]: n for n in prev if n["op"] != "get_attr"}
    after = {n["name"]: n for n in cur if n["op"] != "get_attr"}
    changed = [k for k in after.keys() & before.keys()
               if (after[k]["target"], after[k]["inputs"]) != (before[k]["target"], before[k]["inputs"])]
    return {"removed": sorted(before.keys() - after.keys()), "added": sorted(after.keys() - before.keys()),
            "changed": sorted(changed)}


def _fused_labels(prev: list[dict], cur: list[dict]) -> dict[str, str]:
    targets = {n["name"]: n["target"].rsplit(".", 1)[-1] for n in prev}
    return {n["name"]: " + ".join(targets.get(str(r), str(r)) for r in n["replaces"])
            for n in cur if isinstance(n.get("replaces"), list) and n["replaces"]}


def _op_counts(nodes: list[dict]) -> Counter:
    return Counter(n["target"] for n in nodes if n["op"] in ("call_function", "call_method", "call_module"))


def _read_dump(path: Path) -> dict:
    """One dump file, checked for the shape the explorer reads; GraphoptError naming the file otherwise."""
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise GraphoptError(f"{path.name} is not a graphopt dump ({type(e).__name__})", source=str(path),
                            hint=_HINT) from e
    nodes = d.get("nodes") if isinstance(d, dict) else None
    ok = isinstance(nodes, list) and all(
        isinstance(n, dict) and all(isinstance(n.get(k), t) for k, t in _NODE_KEYS.items())
        and all(isinstance(i, str) for i in n["inputs"]) for n in nodes)
    if not ok or not isinstance(d.get("stats", {}), dict) or not isinstance(d.get("code", ""), str):
        raise GraphoptError(f"{path.name} is not a graphopt dump (unexpected structure)", source=str(path),
                            hint=_HINT)
    for n in nodes:
        n["shape"] = str(n.get("shape", ""))
        n["module"] = str(n.get("module", "") or "")
    return d


def _write_page(root: Path, page: str) -> Path:
    """index.html replaced atomically, never through a symlink."""
    out = root / "index.html"
    if root.is_symlink() or out.is_symlink() or (out.exists() and not out.is_file()):
        raise GraphoptError(f"refusing to write {out}: the folder or index.html is a symlink or not a plain file",
                            source=str(out), hint="render a plain dump folder (copy it, or remove the link)")
    fd, tmp = tempfile.mkstemp(prefix=".index.html.", suffix=".tmp", dir=root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _misses(root: Path) -> list[dict]:
    """Why each candidate rewrite that did not fire was skipped, pass by pass: report.json's misses. Like the
    dumps, the file is data from the folder: anything but the expected structure is left out."""
    report = root / "report.json"
    if not report.is_file() or report.is_symlink():
        return []
    try:
        records = json.loads(report.read_text(errors="replace"))
    except ValueError:
        return []
    out = []
    for r in records if isinstance(records, list) else []:
        misses, nodes = (r.get("misses"), r.get("missed_nodes")) if isinstance(r, dict) else (None, None)
        for reason, count in misses.items() if isinstance(misses, dict) else ():
            names = nodes.get(reason) if isinstance(nodes, dict) else None
            out.append({"pass": str(r.get("name", "")), "reason": str(reason), "count": str(count),
                        "nodes": ", ".join(map(str, names)) if isinstance(names, list) else ""})
    return out


def render(dump_dir: str | Path, drawings: Mapping[str, Drawing] | None = None) -> Path:
    """Write ``dump_dir/index.html``. ``drawings``: graphs already drawn in this process, by dump file name
    (the dumper's, so that Graphviz runs once per dumped graph); every other dump is drawn here."""
    root = Path(dump_dir)
    if root.is_symlink():
        raise GraphoptError(f"refusing to render {root}: the folder is a symlink", source=str(root),
                            hint="pass the folder the link points to")
    if not root.is_dir():
        raise GraphoptError(f"{root} is not a folder", source=str(root), hint=_HINT)
    files = sorted(p for p in root.iterdir() if _DUMP_NAME.fullmatch(p.name) and p.is_file() and not p.is_symlink())
    if not files:
        raise GraphoptError(f"no graphopt dumps (NN_<pass>.json) in {root}", source=str(root), hint=_HINT)
    dumps = [_read_dump(p) for p in files]
    steps = []
    for i, (path, d) in enumerate(zip(files, dumps)):
        index, label = _DUMP_NAME.fullmatch(path.name).groups()
        drawing = (drawings or {}).get(path.name) or draw(d["nodes"])
        diff = path.with_suffix(".diff")
        prev = dumps[i - 1]["nodes"] if i else []
        steps.append({"index": int(index), "label": label, "stats": d.get("stats", {}), "svg": drawing.svg,
                      "blocks_svg": drawing.blocks_svg, "groups": block_groups(d["nodes"]), "layout": drawing.layout,
                      "diff": diff.read_text(errors="replace") if diff.is_file() and not diff.is_symlink() else "",
                      "code": d.get("code", ""),
                      "changes": _changes(prev, d["nodes"]) if i else {"removed": [], "added": [], "changed": []},
                      "fused": _fused_labels(prev, d["nodes"]) if i else {}})
    first, last = _op_counts(dumps[0]["nodes"]), _op_counts(dumps[-1]["nodes"])
    ops = [{"op": op, "before": first.get(op, 0), "after": last.get(op, 0)} for op in sorted(first | last)]
    kernels = [{"node": n["name"], "op": n["target"], "kernel": str(n.get("kernel", ""))} for n in dumps[-1]["nodes"]
               if n.get("fused")]
    data = {"title": root.resolve().name, "steps": steps, "ops": ops, "kernels": kernels,
            "misses": _misses(root)}
    # inside <script>, "</script>" or "<!--" in a string would end or derail it: no <, > or & survives as itself
    payload = json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return _write_page(root, PAGE.read_text().replace("__GRAPHOPT_DATA__", payload))
