"""The built wheel, installed (not editable) into a fresh virtual environment, next to unrelated
packages named ``kernels`` and ``compiler``: everything the command line offers works from it.

The fresh environment takes graphopt from the wheel and its dependencies (torch, ...) from the test
environment's site-packages through a path file, so the test installs nothing from the network.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(cmd, cwd=cwd, env={**env, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp), str(ROOT)],
         cwd=tmp)
    wheel = next(tmp.glob("graphopt-*.whl"))
    env_dir = tmp / "env"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp).stdout.strip())
    (site / "test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch & co.
    for name in ("kernels", "compiler"):  # unrelated packages that happen to use the generic names
        (site / name).mkdir()
        (site / name / "__init__.py").write_text(f"WHO = 'the other {name} package'\n")
    _run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], cwd=tmp)
    return python, wheel


def test_the_wheel_holds_every_subpackage_and_the_explorer_page(fresh):
    _, wheel = fresh
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ("graphopt/__init__.py", "graphopt/kernels/triton/conv2d_act.py",
                 "graphopt/kernels/triton/qlinear_act.py", "graphopt/compiler/ui/explorer_page.html",
                 "graphopt/compiler/deploy/load.py", "graphopt/passes/fold_conv_bn.py"):
        assert path in names, path
    assert not any(n.split("/")[0] in ("compiler", "passes", "kernels", "tests", "bench") for n in names)


def test_installed_graphopt_imports_beside_other_kernels_and_compiler_packages(fresh, tmp_path):
    python, _ = fresh
    code = (
        "import graphopt, kernels, compiler, sys\n"
        "assert 'site-packages' in graphopt.__file__, graphopt.__file__\n"
        f"assert {str(ROOT)!r} not in graphopt.__file__\n"
        "assert kernels.WHO == 'the other kernels package' and compiler.WHO == 'the other compiler package'\n"
        "import graphopt.kernels.triton.conv2d_act, graphopt.kernels.triton.qconv2d_act\n"
        "from graphopt import optimize, load, export_onnx, prune, finetune, tune, GraphoptError\n"
        "import graphopt.errors\n"
        "import torch\n"
        "m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()\n"
        "x = torch.randn(1, 3, 8, 8)\n"
        "opt = optimize(m, (x,))\n"
        "torch.testing.assert_close(load(opt.save('saved'))(x), m(x))\n"
        "c = torch.compile(m, backend='graphopt')\n"
        "with torch.no_grad(): torch.testing.assert_close(c(x), m(x))\n"
    )
    _run([str(python), "-c", code], cwd=tmp_path)


def test_the_installed_command_line_works(fresh, tmp_path):
    python, _ = fresh
    graphopt = python.parent / "graphopt"
    assert "demo" in _run([str(graphopt), "--help"], cwd=tmp_path).stdout
    _run([str(graphopt), "demo", "--quick", "--out", str(tmp_path / "demo")], cwd=tmp_path)
    assert (tmp_path / "demo" / "demo.json").is_file()
