"""The pass explorer page, loaded from disk in a real browser (Debian's chromium, headless)."""

import json
import os
import re
import shutil

import pytest

from graphopt import GraphoptError, optimize
from graphopt.compiler.ui.cli import main
from graphopt.compiler.ui.explorer import render
from graphopt.compiler.ui.graph_svg import dot_source, graphviz_svgs, layered_svg
from tests.helpers import randomize_bn
from tests.zoo import ZOO

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if os.environ.get("GRAPHOPT_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed (apt-get install chromium); CI requires the browser tests")
        pytest.skip("chromium is not installed")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _dumps(name, tmp_path):
    make, inputs = ZOO[name]
    optimize(randomize_bn(make()).eval(), (inputs(1),), dump_dir=tmp_path)
    return tmp_path / "index.html"


def test_page_is_self_contained(tmp_path):
    page = _dumps("seed_convnet", tmp_path).read_text()
    assert "<script src" not in page and "<link" not in page
    assert "http://" not in page.replace("http://www.w3.org/", "") and "https://" not in page


@pytest.mark.parametrize("name", ["seed_convnet", "resnet_blocks"])
def test_page_renders_and_each_pass_shows_its_graph_and_diff(browser, name, tmp_path):
    index = _dumps(name, tmp_path)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(index.as_uri())
    steps = page.locator("button.step")
    assert steps.count() == len(list(tmp_path.glob("[0-9][0-9]_*.json")))
    for label in ("fold_conv_bn", "fuse_conv_act"):
        page.click(f"button.step[data-pass='{label}']")
        assert page.evaluate("document.body.dataset.selected") == label
        assert page.locator("#after g.node").count() > 0 and page.locator("#before g.node").count() > 0
        assert page.locator("#before g.node.removed").count() > 0            # what the pass took out
        assert page.locator("#after g.node.added").count() > 0               # what it put in
        assert page.locator("#diff .add").count() > 0 and page.locator("#diff .del").count() > 0
    assert page.locator("#after .fusedlabel").count() > 0                    # fused ops say what they replace
    assert "conv2d_act" in page.locator("#after").inner_html()
    first = page.locator("#after g.node title").first.text_content()
    page.fill("#search", first)
    page.press("#search", "Enter")
    assert page.locator("#after g.node.found").count() == 1
    assert page.locator("#ops tr").count() > 3 and page.locator("#kernels tr").count() > 1
    page.check("#blocks")                                                    # one box per block
    blocks = page.locator("#after g.node").count()
    page.uncheck("#blocks")
    full = page.locator("#after g.node").count()
    assert 0 < blocks < full if name == "resnet_blocks" else 0 < blocks <= full  # the ConvNet has no blocks
    shot = tmp_path / f"{name}.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000
    assert errors == []
    page.close()


def test_both_layouts_draw_every_node():
    nodes = [{"name": "x", "op": "placeholder", "target": "x", "inputs": [], "shape": "1x3", "fused": False},
             {"name": "w", "op": "get_attr", "target": "w", "inputs": [], "shape": "", "fused": False},
             {"name": "y", "op": "call_function", "target": "graphopt.linear_act", "inputs": ["x", "w"],
              "shape": "1x4", "fused": True},
             {"name": "output", "op": "output", "target": "output", "inputs": ["y"], "shape": "", "fused": False}]
    svg = layered_svg(nodes)
    assert svg.count('<g class="node">') == 3 and "<title>w</title>" not in svg   # weights are not drawn
    if shutil.which("dot"):
        assert graphviz_svgs([nodes])[0].count("<title>y</title>") == 1


def test_report_command(tmp_path, capsys):
    _dumps("seed_convnet", tmp_path)
    (tmp_path / "index.html").unlink()
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "index.html").exists() and "offline" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nothing")]) == 1


def test_render_needs_dumps(tmp_path):
    with pytest.raises(GraphoptError, match="no graphopt dumps"):
        render(tmp_path)
    (tmp_path / "00_captured.json").write_text('{"nodes": [{"name": 1}]}')
    with pytest.raises(GraphoptError, match="not a graphopt dump"):
        render(tmp_path)


# a hostile dump folder: every string and number the page shows replaced by markup that runs script
XSS = '<img src=x onerror="window.__pwned=(window.__pwned||[]).concat([1])">'
SVG_XSS = '<svg onload="window.__pwned=[2]"></svg>'
SCRIPT_XSS = "</script><script>window.__pwned=[3]</script><!--<script>"


def _poison(folder):
    for path in sorted(folder.glob("[0-9][0-9]_*.json")):
        d = json.loads(path.read_text())
        rename = {n["name"]: n["name"] + XSS for n in d["nodes"]}
        for n in d["nodes"]:
            n["name"] = rename[n["name"]]
            n["inputs"] = [rename.get(i, i) for i in n["inputs"]]
            n["replaces"] = [r + XSS for r in n.get("replaces", [])]
            n["target"], n["shape"], n["module"] = n["target"] + SVG_XSS, XSS, "layer1." + XSS
            n["kernel"] = SCRIPT_XSS
        d["stats"] = {k: XSS for k in ("rewrites", "ms", "nodes_before", "nodes_after", "max_error")} if d[
            "stats"] else {}
        d["index"], d["label"], d["code"] = XSS, "../../" + XSS, SCRIPT_XSS + "\n" + XSS
        path.write_text(json.dumps(d))
        if path.with_suffix(".diff").exists():
            path.with_suffix(".diff").write_text(f"+{XSS}\n-{SCRIPT_XSS}\n@@ {SVG_XSS}\n")


def test_a_hostile_dump_folder_renders_as_text_and_runs_no_script(browser, tmp_path):
    folder = tmp_path / "dumps<img src=x onerror=window.__pwned=[4]>"
    _dumps("resnet_blocks", folder)
    _poison(folder)
    index = render(folder)
    assert "<img" not in index.read_text()  # not even inside the JSON: < > & are \u escapes
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors, dialogs = [], []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(index.as_uri())
    steps = page.locator("button.step")
    assert steps.count() == len(list(folder.glob("[0-9][0-9]_*.json"))) > 2
    for i in range(steps.count()):
        steps.nth(i).click()
        for blocks in (True, False):
            page.set_checked("#blocks", blocks)
            assert page.locator("#after g.node").count() > 0  # the graphs still draw, names and all
    page.wait_for_timeout(300)  # (an <img onerror> fires after its load fails)
    assert page.evaluate("window.__pwned") is None and dialogs == [] and errors == []
    assert page.locator("img, iframe, #timeline svg, #ops svg, #kernels script, #diff script").count() == 0
    assert XSS in page.locator("#timeline").inner_text()                   # the numbers, shown as text
    assert XSS in page.locator("#after g.node title").first.text_content()  # the names too
    assert SCRIPT_XSS in page.locator("#kernels").inner_text() and XSS in page.locator("#diff").inner_text()
    page.close()


def test_graphviz_sees_node_ids_and_escaped_labels_never_names(tmp_path, monkeypatch):
    nodes = [{"name": 'x" URL="javascript:alert(1)', "op": "placeholder", "target": "x", "inputs": [], "shape": "",
              "fused": False},
             {"name": "y\\", "op": "call_function", "target": '<b>"\\N\n', "inputs": ['x" URL="javascript:alert(1)'],
              "shape": "1x4", "fused": True}]
    source, names = dot_source(nodes)
    label = r'"(?:[^"\\]|\\["n])*"'  # a quoted string whose only escapes are \" and graphopt's own \n
    lines = source.splitlines()[1:-1]
    assert re.fullmatch(rf'n0 \[label={label}, fillcolor="#[0-9a-f]{{6}}"\];', lines[0])
    assert re.fullmatch(rf'n1 \[label={label}, fillcolor="#[0-9a-f]{{6}}"\];', lines[1])
    assert lines[2] == "n0 -> n1;" and names == [n["name"] for n in nodes]
    if not shutil.which("dot"):  # a stand-in that draws what Graphviz would: ids as titles
        fake = tmp_path / "dot"
        fake.write_text("#!/bin/sh\ncat >/dev/null\necho '<svg><g class=\"node\"><title>n0</title></g>"
                        "<g class=\"edge\"><title>n0&#45;&gt;n1</title></g></svg>'\n")
        fake.chmod(0o755)
        monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    (svg,) = graphviz_svgs([nodes])
    assert "<title>x&quot; URL=&quot;javascript:alert(1)</title>" in svg  # the name, back, as text
    assert "<a" not in svg and 'URL="' not in svg


def test_dot_text_has_one_node_per_drawn_node_with_escaped_names():
    names = ['a"b', "c\\", "d\ne\x7f", "plain"]
    nodes = [{"name": name, "op": "call_function", "target": "t", "inputs": names[:i], "shape": "", "fused": False}
             for i, name in enumerate(names)]
    nodes.insert(1, {"name": "w", "op": "get_attr", "target": "w", "inputs": [], "shape": "", "fused": False})
    source, ids = dot_source(nodes)
    statements = re.findall(r'^n(\d+) \[label="((?:[^"\\]|\\["n])*)\\n', source, re.M)
    assert [int(i) for i, _ in statements] == list(range(len(names))) and ids == names  # the weight is not drawn
    assert [first for _, first in statements] == ['a\\"b', "c\u2216", "d e ", "plain"]
    assert source.count(" -> ") == 6  # every edge between drawn nodes, none to the weight


def _fake_dot(folder, monkeypatch):
    """A ``dot`` first on PATH that logs each run and draws one SVG per graph it is given."""
    log = folder / "dot.log"
    fake = folder / "dot"
    fake.write_text(f"#!/bin/sh\necho run >> '{log}'\n"
                    "grep '^digraph' | while read -r _; do echo '<svg><g class=\"node\"><title>n0</title></g></svg>'; "
                    "done\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return lambda: len(log.read_text().splitlines()) if log.exists() else 0


def test_graphviz_runs_once_per_dumped_graph_and_its_dot_file_is_what_it_drew(tmp_path, monkeypatch):
    runs = _fake_dot(tmp_path, monkeypatch)
    folder = tmp_path / "dumps"
    _dumps("resnet_blocks", folder)  # two pipelines, so the explorer page is rendered twice
    dumps = sorted(folder.glob("[0-9][0-9]_*.json"))
    assert len(dumps) > 2 and runs() == len(dumps)  # the explorer reused the dumper's drawings
    for path in dumps:
        nodes = json.loads(path.read_text())["nodes"]
        assert path.with_suffix(".dot").read_text() == dot_source(nodes)[0] + "\n"
        assert path.with_suffix(".svg").read_text().startswith('<svg class="graph">')
    assert '"layout": "graphviz"' in (folder / "index.html").read_text()
    render(folder)  # graphopt report: nothing drawn in this process, so each graph is drawn once
    assert runs() == 2 * len(dumps)


def test_report_refuses_a_symlinked_index_and_writes_nothing_outside(tmp_path, capsys):
    folder = tmp_path / "dumps"
    _dumps("seed_convnet", folder)
    outside = tmp_path / "outside.html"
    outside.write_text("precious")
    (folder / "index.html").unlink()
    (folder / "index.html").symlink_to(outside)
    assert main(["report", str(folder)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("graphopt: error: refusing to write") and "symlink" in line
    assert outside.read_text() == "precious" and (folder / "index.html").is_symlink()
    assert not list(folder.glob(".index.html.*"))                            # no temporary file left either
    link = tmp_path / "link"
    link.symlink_to(folder, target_is_directory=True)
    (folder / "index.html").unlink()
    assert main(["report", str(link)]) == 1 and "symlink" in capsys.readouterr().err
    assert not (folder / "index.html").exists()
    assert main(["report", str(folder)]) == 0 and (folder / "index.html").is_file()  # a plain folder renders
