"""The pass explorer: ``graphopt report DUMP_DIR`` turns the dumps into ``DUMP_DIR/index.html``,
one self-contained page (no network: its script and style are inlined).

For each pass that changed the graph: its numbers on a timeline, the graph before and after
(removed nodes red, added green, changed amber; fused nodes labelled with what they replace),
pan / zoom / search, a view with one box per block (repeated blocks collapsed), and the code
diff. Below: op counts before and after the whole pipeline, and the kernel each fused op runs on.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from graphopt.compiler.ui.graph_svg import block_groups, collapse, draw

PAGE = Path(__file__).with_name("explorer_page.html")


def _changes(prev: list[dict], cur: list[dict]) -> dict:
    before = {n["name"]: n for n in prev if n["op"] != "get_attr"}
    after = {n["name"]: n for n in cur if n["op"] != "get_attr"}
    changed = [k for k in after.keys() & before.keys()
               if (after[k]["target"], after[k]["inputs"]) != (before[k]["target"], before[k]["inputs"])]
    return {"removed": sorted(before.keys() - after.keys()), "added": sorted(after.keys() - before.keys()),
            "changed": sorted(changed)}


def _fused_labels(prev: list[dict], cur: list[dict]) -> dict[str, str]:
    targets = {n["name"]: n["target"].rsplit(".", 1)[-1] for n in prev}
    return {n["name"]: " + ".join(targets.get(r, r) for r in n["replaces"]) for n in cur if n.get("replaces")}


def _op_counts(nodes: list[dict]) -> Counter:
    return Counter(n["target"] for n in nodes if n["op"] in ("call_function", "call_method", "call_module"))


def render(dump_dir: str | Path) -> Path:
    root = Path(dump_dir)
    dumps = [json.loads(p.read_text()) for p in sorted(root.glob("[0-9][0-9]_*.json"))]
    if not dumps:
        raise FileNotFoundError(f"no graphopt dumps in {root}")
    steps = []
    for i, d in enumerate(dumps):
        svg, layout = draw(d["nodes"])
        blocks_svg, _ = draw(collapse(d["nodes"]))
        diff = root / f"{d['index']:02d}_{d['label']}.diff"
        prev = dumps[i - 1]["nodes"] if i else []
        steps.append({"index": d["index"], "label": d["label"], "stats": d.get("stats", {}), "svg": svg,
                      "blocks_svg": blocks_svg, "groups": block_groups(d["nodes"]),
                      "layout": layout, "diff": diff.read_text() if diff.exists() else "", "code": d.get("code", ""),
                      "changes": _changes(prev, d["nodes"]) if i else {"removed": [], "added": [], "changed": []},
                      "fused": _fused_labels(prev, d["nodes"]) if i else {}})
    first, last = _op_counts(dumps[0]["nodes"]), _op_counts(dumps[-1]["nodes"])
    ops = [{"op": op, "before": first.get(op, 0), "after": last.get(op, 0)} for op in sorted(first | last)]
    kernels = [{"node": n["name"], "op": n["target"], "kernel": n["kernel"]} for n in dumps[-1]["nodes"]
               if n.get("fused")]
    data = {"title": root.name, "steps": steps, "ops": ops, "kernels": kernels}
    payload = json.dumps(data).replace("</", "<\\/")  # keep "</script>" inside strings harmless
    page = PAGE.read_text().replace("__GRAPHOPT_DATA__", payload)
    out = root / "index.html"
    out.write_text(page)
    return out
