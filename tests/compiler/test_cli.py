"""The graphopt command, run as a user runs it."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from graphopt.compiler.ui.cli import main

MODEL = textwrap.dedent("""
    import torch.nn as nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()

        def forward(self, x):
            return self.act(self.bn(self.conv(x)))
""")


def test_optimize_command_prints_the_pass_table(tmp_path, capsys):
    path = tmp_path / "tiny.py"
    path.write_text(MODEL)
    dumps = tmp_path / "dumps"
    assert main(["optimize", f"{path}:Tiny", "--input-shape", "1,3,12,12", "--dump-dir", str(dumps)]) == 0
    out = capsys.readouterr().out
    assert "fold_conv_bn" in out and "fuse_conv_act" in out and str(dumps) in out
    assert (dumps / "report.md").exists()


def test_optimize_command_reports_errors_cleanly(tmp_path, capsys):
    path = tmp_path / "tiny.py"
    path.write_text(MODEL)
    assert main(["optimize", f"{path}:Tiny", "--input-shape", "1,5,12,12"]) == 1
    assert "fails on the example inputs" in capsys.readouterr().err


def test_console_script_runs_the_quick_demo(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "graphopt.compiler.ui.cli", "demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "demo.json").read_text())
    names = [s["name"] for s in result["stages"]]
    assert names == ["fp32", "optimized", "int8", "pruned", "tuned"]
    fp32, opt, int8, pruned, tuned = result["stages"]
    assert opt["accuracy"] == pytest.approx(fp32["accuracy"], abs=1e-9)   # same answers
    for stage in result["stages"]:
        assert 0.0 <= stage["accuracy"] <= 1.0 and stage["latency_ms"] > 0 and stage["params"] > 0
    assert fp32["params"] > 1_000_000 and int8["params"] == pytest.approx(opt["params"], rel=0.01)
    assert abs(int8["accuracy"] - fp32["accuracy"]) <= 0.05 and int8["output_sqnr_db"] > 20
    assert pruned["world_size"] == 2 and pruned["params"] <= 0.6 * fp32["params"]
    assert (out / "finetune" / "metrics.json").exists() and (out / "demo.png").stat().st_size > 1000
    assert tuned["trials"] == 2 and (out / "tune" / "tune.db").exists()
    if tuned["path"] is not None:  # a recipe met the budget: the saved model loads and runs (no pickle)
        import torch

        from graphopt import load

        assert load(out / tuned["path"])(torch.randn(1, 1, 32, 32)).shape == (1, 10)


def test_optimize_out_then_run_then_export(tmp_path, capsys):
    path = tmp_path / "tiny.py"
    path.write_text(MODEL)
    saved = tmp_path / "saved"
    assert main(["optimize", f"{path}:Tiny", "--input-shape", "2,3,12,12", "--out", str(saved)]) == 0
    assert (saved / "manifest.json").exists()
    assert main(["run", str(saved), "--repeat", "3"]) == 0
    assert "median latency" in capsys.readouterr().out
    pytest.importorskip("onnxsim")
    assert main(["export", str(saved), "--onnx", str(tmp_path / "m.onnx")]) == 0
    assert "checked in ONNX Runtime" in capsys.readouterr().out
    assert (tmp_path / "m.onnx").exists()


def test_bench_models_quick(tmp_path, capsys):
    assert main(["bench", "models", "--quick", "--models", "convnet_b1", "--engines", "eager,graphopt",
                 "--out", str(tmp_path)]) == 0
    result = json.loads(next(tmp_path.glob("models-*.json")).read_text())
    (row,) = result["results"]
    assert set(row["median_ms"]) == {"eager", "graphopt"}
    assert row["max_abs_diff_vs_eager"]["graphopt"] < 1e-3
    # the seed ConvNet's multiply-adds, by hand: conv1 32*32*64*9, conv2 16*16*64*64*9, fc1 4096*256, fc2 256*10
    assert row["gflop"] == pytest.approx(2e-9 * (32 * 32 * 64 * 9 + 16 * 16 * 64 * 64 * 9 + 4096 * 256 + 256 * 10),
                                         rel=1e-12)
    assert result["machine"]["gemm_gflops"] > 0
    assert "of GEMM rate" in result["table"] and "GEMM rate of this machine" in result["table"]


def test_bench_kernels_quick_on_the_cpu(tmp_path):
    assert main(["bench", "kernels", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads(next(tmp_path.glob("kernels-cpu-*.json")).read_text())
    assert {r["op"] for r in result["rows"]} == {"conv2d_act", "linear_act"}
    assert all(r["graphopt_ms"] > 0 and r["reference_ms"] > 0 for r in result["rows"])


def test_finetune_command_runs_data_parallel(tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["finetune", "--nproc", "2", "--epochs", "1", "--prune", "0.5", "--out", str(out)]) == 0
    history = json.loads((out / "metrics.json").read_text())
    assert history[0]["world_size"] == 2 and 0.0 <= history[0]["accuracy"] <= 1.0
    assert (out / "epoch_001.safetensors").exists()
    assert "test accuracy" in capsys.readouterr().out


def test_optimize_command_int8_with_calibration_from_safetensors(tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setattr("graphopt.compiler.int8.quantize.MIN_INT8_MACS", 0)
    path = tmp_path / "tiny.py"
    path.write_text(MODEL)
    save_file({"input_0": torch.randn(24, 3, 12, 12)}, str(tmp_path / "cal.safetensors"))
    assert main(["optimize", f"{path}:Tiny", "--input-shape", "2,3,12,12", "--int8", "--calibration",
                 str(tmp_path / "cal.safetensors"), "--out", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert "quantize_int8" in out and "histogram calibration on 3 batches" in out
    assert (tmp_path / "q" / "manifest.json").exists()
    assert main(["optimize", f"{path}:Tiny", "--input-shape", "2,3,12,12", "--int8"]) == 2
    assert "needs --calibration" in capsys.readouterr().err


# Every bad invocation: (argv with {model} / {tmp} placeholders, exit status, a phrase of the message)
BAD = [
    (["optimize", "{model}:Tiny", "--input-shape", "1,x,8"], 2, "bad input shape '1,x,8'"),
    (["optimize", "{model}:Tiny", "--input-shape", "1,-3"], 2, "bad input shape"),
    (["optimize", "{tmp}/missing.py:Tiny", "--input-shape", "1,3,8,8"], 2, "no such model file"),
    (["optimize", "{model}:Nope", "--input-shape", "1,3,8,8"], 2, "defines no nn.Module class 'Nope'"),
    (["optimize", "{model}", "--input-shape", "1,3,8,8"], 2, "expected path/to/file.py:ClassName"),
    (["optimize", "{tmp}/broken.py:Net", "--input-shape", "1,3,8,8"], 1, "running"),
    (["optimize", "{model}:Tiny", "--input-shape", "1,5,12,12"], 1, "fails on the example inputs"),
    (["optimize", "{model}:Tiny", "--input-shape", "1,3,8,8", "--int8"], 2, "needs --calibration"),
    (["optimize", "{model}:Tiny", "--input-shape", "1,3,8,8", "--int8", "--calibration", "{tmp}/none.safetensors"],
     2, "no such calibration file"),
    (["optimize", "{model}:Tiny", "--input-shape", "1,3,8,8", "--int8", "--calibration", "{model}"], 1,
     "cannot read"),
    (["run", "{tmp}"], 1, "manifest.json is missing"),
    (["export", "{tmp}/gone", "--onnx", "{tmp}/m.onnx"], 2, "no such folder or model file"),
    (["export", "{model}:Tiny", "--onnx", "{tmp}/m.onnx"], 2, "--input-shape is needed"),
    (["report", "{tmp}"], 1, "no graphopt dumps"),
    (["report", "{tmp}/gone"], 1, "is not a folder"),
    (["finetune", "--init", "{tmp}/none.safetensors"], 2, "no such checkpoint"),
    (["optimize"], 2, "the following arguments are required"),
    (["frobnicate"], 2, "invalid choice"),
    (["bench", "everything"], 2, "invalid choice"),
    (["run", "{tmp}", "--repeat", "many"], 2, "invalid int value"),
]


@pytest.mark.parametrize("argv, status, phrase", BAD, ids=[" ".join(a[:2]) + f" [{i}]" for i, (a, _, _) in
                                                         enumerate(BAD)])
def test_every_error_is_one_line_and_a_nonzero_exit(tmp_path, capsys, argv, status, phrase):
    (tmp_path / "tiny.py").write_text(MODEL)
    (tmp_path / "broken.py").write_text("raise RuntimeError('not a model file')\n")
    argv = [a.format(model=tmp_path / "tiny.py", tmp=tmp_path) for a in argv]
    assert main(argv) == status
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("graphopt: error: ") and " hint: " in lines[0] and phrase in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_debug_shows_the_traceback_and_the_console_command_exits_nonzero(tmp_path):
    command = [sys.executable, "-m", "graphopt.compiler.ui.cli", "report", str(tmp_path / "gone")]
    plain = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 1 and plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr
    debug = subprocess.run(command + ["--debug"], capture_output=True, text=True, timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "GraphoptError" in debug.stderr


@pytest.mark.parametrize("argv, needs", [(["bench", "models", "--quick"], "bench/models.py"),
                                         (["fuzz", "--cases", "1"], "tests/fuzz/runner.py")])
def test_bench_and_fuzz_outside_a_source_checkout_say_so(tmp_path, capsys, monkeypatch, argv, needs):
    monkeypatch.setattr("graphopt.compiler.ui.cli_errors.SOURCE_ROOT", tmp_path)  # as from a wheel: no bench/, tests/
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("graphopt: error: ") and "needs a source checkout" in line and needs in line
    assert "clone the graphopt repository" in line


def test_fuzz_passes_debug_to_its_runner(monkeypatch):
    """`graphopt fuzz --debug` reaches tests/fuzz/runner.py (which then prints failures with tracebacks)."""
    import subprocess

    seen = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: seen.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    assert main(["fuzz", "--cases", "3", "--seed", "7"]) == 0
    assert main(["fuzz", "--cases", "3", "--debug"]) == 0
    assert "--debug" not in seen[0] and seen[0][-4:] == ["--cases", "3", "--seed", "7"]
    assert seen[1][-1] == "--debug"
