"""The ``graphopt`` command: optimize, export, run, report, bench, fuzz, demo, finetune."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch


def _load_class(spec: str):
    """'path/to/file.py:ClassName' -> the class (the file runs, as with python path/to/file.py)."""
    path, _, name = spec.rpartition(":")
    if not path or not name:
        raise SystemExit(f"graphopt: expected path/to/file.py:ClassName, got {spec!r}")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    if module_spec is None or not Path(path).exists():
        raise SystemExit(f"graphopt: no such file {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    if not hasattr(module, name):
        raise SystemExit(f"graphopt: {path} defines no {name!r}")
    return getattr(module, name)


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(","))


def print_report(report, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="graphopt passes")
    for col in ("pass", "rewrites", "ms", "nodes before", "nodes after", "max error"):
        table.add_column(col, justify="left" if col == "pass" else "right")
    for r in report:
        err = "" if r.max_error is None else f"{r.max_error:.3g}"
        table.add_row(r.name, str(r.rewrites), f"{r.seconds * 1e3:.1f}", str(r.nodes_before), str(r.nodes_after), err)
    (console or Console()).print(table)


def cmd_optimize(args: argparse.Namespace) -> int:
    from graphopt import GraphoptError, optimize

    model = _load_class(args.model)().eval()
    inputs = tuple(torch.randn(*_shape(s)) for s in args.input_shape)
    int8 = {}
    if args.int8:
        if not args.calibration:
            raise SystemExit("graphopt: --int8 needs --calibration data.safetensors (input_0, input_1, ...: "
                             "one tensor per model input, batches along dim 0)")
        int8 = dict(quantize="int8", calibration=_calibration_batches(args.calibration, len(inputs),
                                                                      args.calibration_batch),
                    calibration_method=args.calibration_method)
    try:
        opt = optimize(model, inputs, passes=args.passes.split(",") if args.passes else None,
                       backend=args.backend, dump_dir=args.dump_dir, **int8)
    except GraphoptError as e:
        print(f"graphopt: {e}", file=sys.stderr)
        return 1
    print_report(opt.report)
    if opt.int8_report is not None:
        print(opt.int8_report.table())
    print("runs: " + ", ".join(f"{op} x{n}" for op, n in sorted(opt.op_counts.items())))
    if args.dump_dir:
        print(f"dumps written to {args.dump_dir}")
    if args.out:
        print(f"saved to {opt.save(args.out)} (load with graphopt.load; no pickle)")
    if args.print_code:
        print(opt.code)
    return 0


def _calibration_batches(path: str, n_inputs: int, batch: int) -> list[tuple]:
    """Calibration batches from a safetensors file (read without pickle): input_0, ... split along dim 0."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    names = [f"input_{i}" for i in range(n_inputs)]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise SystemExit(f"graphopt: {path} has no {', '.join(missing)} (it has {', '.join(sorted(tensors))})")
    chunks = [tensors[n].split(batch) for n in names]
    return list(zip(*chunks))


def _load_any(source: str, shapes: list[str] | None):
    """A saved folder (compiler.load) or path/to/file.py:ClassName, with example inputs."""
    from graphopt import load

    if Path(source).is_dir():
        module = load(source)
        specs = module.input_specs
        shapes = shapes or [",".join(map(str, s["shape"])) for s in specs]
        return module, tuple(torch.randn(*_shape(s)) for s in shapes)
    if not shapes:
        raise SystemExit("graphopt: --input-shape is needed for a model file")
    return _load_class(source)().eval(), tuple(torch.randn(*_shape(s)) for s in shapes)


def cmd_export(args: argparse.Namespace) -> int:
    from graphopt import GraphoptError, export_onnx

    try:
        module, inputs = _load_any(args.source, args.input_shape)
        result = export_onnx(module, inputs, args.onnx, simplify=not args.no_simplify)
    except GraphoptError as e:
        print(f"graphopt: {e}", file=sys.stderr)
        return 1
    before, after = sum(result["ops_before"].values()), sum(result["ops_after"].values())
    print(f"wrote {args.onnx}: {before} ONNX ops, {after} after onnx-simplifier; checked in ONNX Runtime "
          f"(max abs error {result['max_abs_error']:.3g})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import statistics
    import time

    from graphopt import GraphoptError

    try:
        module, inputs = _load_any(args.source, args.input_shape)
    except GraphoptError as e:
        print(f"graphopt: {e}", file=sys.stderr)
        return 1
    times = []
    with torch.no_grad():
        for i in range(args.repeat + 3):
            start = time.perf_counter()
            out = module(*inputs)
            if i >= 3:
                times.append(time.perf_counter() - start)
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    print(f"output {shape}; median latency {statistics.median(times) * 1e3:.3f} ms over {args.repeat} runs")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parents[2] / "bench" / f"{args.suite}.py"
    if not script.exists():
        raise SystemExit(f"graphopt: {script} not found; run from a clone of the repository")
    import subprocess

    return subprocess.run([sys.executable, str(script), *args.rest]).returncode


def cmd_report(args: argparse.Namespace) -> int:
    from graphopt.compiler.ui.explorer import render

    try:
        page = render(args.dump_dir)
    except FileNotFoundError as e:
        print(f"graphopt: {e}", file=sys.stderr)
        return 1
    print(f"wrote {page}: open it in a browser (it works offline)")
    return 0


def cmd_fuzz(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parents[2] / "tests" / "fuzz" / "runner.py"
    if not script.exists():
        raise SystemExit(f"graphopt: {script} not found; run from a clone of the repository")
    import subprocess

    return subprocess.run([sys.executable, str(script), "--cases", str(args.cases), "--seed", str(args.seed)]
                          ).returncode


def cmd_demo(args: argparse.Namespace) -> int:
    from graphopt.compiler.workflow.demo import run_demo

    run_demo(args.out, epochs=args.epochs, quick=args.quick, seed=args.seed, nproc=args.nproc, trials=args.trials)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """Train (or prune and fine-tune) the seed ConvNet on digits, data-parallel; works under torchrun too."""
    from graphopt.compiler.workflow.demo import ConvNet, accuracy, load_digits
    from graphopt.compiler.workflow.finetune import finetune, load_state
    from graphopt.compiler.workflow.prune import prune

    x_train, y_train, x_test, y_test = load_digits(args.seed)
    model = ConvNet()
    if args.init:
        load_state(model, Path(args.init))
    if args.prune:
        model = prune(model.eval(), (x_test[:1],), ratio=args.prune)
    tuned = finetune(model, (x_train, y_train), epochs=args.epochs, lr=args.lr, nproc=args.nproc, seed=args.seed,
                     out=args.out, held_out=(x_test, y_test))
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"test accuracy {accuracy(tuned, x_test, y_test):.4f}; checkpoints and metrics.json in {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphopt", description="A graph optimizer for PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("optimize", help="optimize a model class from a Python file and print the pass table")
    p.add_argument("model", help="path/to/file.py:ClassName (constructed with no arguments)")
    p.add_argument("--input-shape", action="append", required=True, help="e.g. 1,3,224,224; repeat for more inputs")
    p.add_argument("--dump-dir", help="write pass-by-pass dumps here")
    p.add_argument("--passes", help="comma-separated pass names (default: the default pipeline)")
    p.add_argument("--backend", default="auto", choices=["auto", "cpu", "triton", "reference"])
    p.add_argument("--print-code", action="store_true", help="print the generated forward")
    p.add_argument("--out", help="save the optimized module to this folder (no pickle)")
    p.add_argument("--int8", action="store_true", help="quantize to int8 (needs --calibration)")
    p.add_argument("--calibration", help="a .safetensors file: input_0 (, input_1, ...) holding calibration data")
    p.add_argument("--calibration-batch", type=int, default=8, help="batch size to split the calibration data into")
    p.add_argument("--calibration-method", default="histogram", choices=["minmax", "percentile", "histogram"])
    p.set_defaults(fn=cmd_optimize)

    p = sub.add_parser("export", help="export a saved folder or a model file to ONNX, checked in ONNX Runtime")
    p.add_argument("source", help="a folder written by save / --out, or path/to/file.py:ClassName")
    p.add_argument("--onnx", required=True, help="the .onnx file to write")
    p.add_argument("--input-shape", action="append", help="needed for a model file")
    p.add_argument("--no-simplify", action="store_true", help="skip onnx-simplifier")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("run", help="load a saved module (or a model file), run it and print its latency")
    p.add_argument("source")
    p.add_argument("--input-shape", action="append", help="default: the shapes it was optimized for")
    p.add_argument("--repeat", type=int, default=20)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("bench", help="run a benchmark suite from bench/ (models, kernels)")
    p.add_argument("suite", choices=["models", "kernels"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the suite, e.g. --quick")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("report", help="render a dump folder as one offline HTML page (DUMP_DIR/index.html)")
    p.add_argument("dump_dir")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("fuzz", help="differential fuzzing: random programs against eager; failures saved as JSON")
    p.add_argument("--cases", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_fuzz)

    p = sub.add_parser("demo", help="train the seed ConvNet on digits, optimize it, compare")
    p.add_argument("--out", default="demo-out", help="folder for demo.json and the dumps")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="a small, fast run (for tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc", type=int, default=2, help="processes for the data-parallel fine-tune")
    p.add_argument("--trials", type=int, default=8, help="Optuna trials for the tuned stage")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("finetune", help="train / fine-tune the seed ConvNet on digits with DDP (gloo or NCCL)")
    p.add_argument("--nproc", type=int, default=2, help="local processes (under torchrun: the launched ones)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--prune", type=float, default=0.0, help="prune this ratio of channels first")
    p.add_argument("--init", help="start from these weights (a .safetensors checkpoint)")
    p.add_argument("--out", default="finetune-out", help="checkpoints and metrics.json")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_finetune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
