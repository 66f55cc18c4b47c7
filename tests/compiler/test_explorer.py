"""The pass explorer page, loaded from disk in a real browser (Debian's chromium, headless)."""

import os
import shutil

import pytest

from graphopt import optimize
from graphopt.compiler.ui.cli import main
from graphopt.compiler.ui.explorer import render
from graphopt.compiler.ui.graph_svg import graphviz_svg, layered_svg
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
        assert graphviz_svg(nodes).count("<title>y</title>") == 1


def test_report_command(tmp_path, capsys):
    _dumps("seed_convnet", tmp_path)
    (tmp_path / "index.html").unlink()
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "index.html").exists() and "offline" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nothing")]) == 1


def test_render_needs_dumps(tmp_path):
    with pytest.raises(FileNotFoundError):
        render(tmp_path)
