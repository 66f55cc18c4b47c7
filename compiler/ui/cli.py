"""The ``graphopt`` command: optimize, export, run, report, bench, fuzz, demo, finetune.

Every failure is one line on stderr, ``graphopt: error: <what> (<where>) hint: <what to do>``,
and a non-zero exit (2 for a bad command line, 1 for the rest); ``--debug`` shows the traceback
instead (compiler/ui/cli_errors.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from graphopt.compiler.ui.cli_errors import OneLineParser, UsageError, report_error, source_checkout_file
from graphopt.compiler.ui.cli_inputs import calibration_batches, load_any, model_from_file, shape


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
    from graphopt import optimize

    shapes = [shape(s) for s in args.input_shape]
    if args.int8 and not args.calibration:
        raise UsageError("--int8 needs --calibration data.safetensors", source="--int8",
                         hint="input_0, input_1, ...: one tensor per model input, batches along dim 0")
    model = model_from_file(args.model)
    inputs = tuple(torch.randn(*s) for s in shapes)
    int8 = {}
    if args.int8:
        batches = calibration_batches(args.calibration, len(inputs), args.calibration_batch)
        int8 = dict(quantize="int8", calibration=batches, calibration_method=args.calibration_method)
    opt = optimize(model, inputs, passes=args.passes.split(",") if args.passes else None,
                   backend=args.backend, dump_dir=args.dump_dir, engines=args.engines, **int8)
    print_report(opt.report)
    if opt.int8_report is not None:
        print(opt.int8_report.table())
    print("runs: " + ", ".join(f"{op} x{n}" for op, n in sorted(opt.op_counts.items()))
          + (f"; on NaN-free inputs of the example's shapes, in {opt.engine}" if opt.engine != "graphopt" else ""))
    if args.dump_dir:
        print(f"dumps written to {args.dump_dir}")
    if args.out:
        print(f"saved to {opt.save(args.out)} (load with graphopt.load; no pickle)")
    if args.print_code:
        print(opt.code)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from graphopt import export_onnx

    module, inputs = load_any(args.source, args.input_shape)
    result = export_onnx(module, inputs, args.onnx, simplify=not args.no_simplify)
    before, after = sum(result["ops_before"].values()), sum(result["ops_after"].values())
    print(f"wrote {args.onnx}: {before} ONNX ops, {after} after onnx-simplifier; checked in ONNX Runtime "
          f"(max abs error {result['max_abs_error']:.3g})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from graphopt.compiler.workflow.timing import median_ms

    module, inputs = load_any(args.source, args.input_shape)
    with torch.no_grad():
        out = module(*inputs)
    latency = median_ms({"module": module}, inputs, rounds=args.repeat)["module"]
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    print(f"output {shape}; median latency {latency:.3f} ms over {args.repeat} runs")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    script = source_checkout_file("bench", "bench", f"{args.suite}.py")
    import subprocess

    return subprocess.run([sys.executable, str(script), *args.rest]).returncode


def cmd_report(args: argparse.Namespace) -> int:
    from graphopt.compiler.ui.explorer import render

    page = render(args.dump_dir)
    print(f"wrote {page}: open it in a browser (it works offline)")
    return 0


def cmd_fuzz(args: argparse.Namespace) -> int:
    script = source_checkout_file("fuzz", "tests", "fuzz", "runner.py")
    import subprocess

    extra = ["--artifacts", str(args.artifacts)] if args.artifacts else []
    extra += ["--debug"] if getattr(args, "debug", False) else []
    return subprocess.run([sys.executable, str(script), "--cases", str(args.cases), "--seed", str(args.seed), *extra]
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
        if not Path(args.init).is_file():
            raise UsageError(f"no such checkpoint {args.init!r}", source="--init", hint="give a .safetensors file")
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
    common = argparse.ArgumentParser(add_help=False)  # (so --debug works after the command too)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an error, show the full traceback instead of one line")
    parser = OneLineParser(prog="graphopt", description="A graph optimizer for PyTorch models.", parents=[common])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    def add(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kw)

    p = add("optimize", help="optimize a model class from a Python file and print the pass table")
    p.add_argument("model", help="path/to/file.py:ClassName (constructed with no arguments)")
    p.add_argument("--input-shape", action="append", required=True, help="e.g. 1,3,224,224; repeat for more inputs")
    p.add_argument("--dump-dir", help="write pass-by-pass dumps here")
    p.add_argument("--passes", help="comma-separated pass names (default: the default pipeline)")
    p.add_argument("--backend", default="auto", choices=["auto", "cpu", "triton", "reference"])
    p.add_argument("--engines", help="kernel libraries to measure: auto (default: the installed ones), graphopt "
                                     "(its own only), or onnxruntime,openvino")
    p.add_argument("--print-code", action="store_true", help="print the generated forward")
    p.add_argument("--out", help="save the optimized module to this folder (no pickle)")
    p.add_argument("--int8", action="store_true", help="quantize to int8 (needs --calibration)")
    p.add_argument("--calibration", help="a .safetensors file: input_0 (, input_1, ...) holding calibration data")
    p.add_argument("--calibration-batch", type=int, default=8, help="batch size to split the calibration data into")
    p.add_argument("--calibration-method", default="histogram", choices=["minmax", "percentile", "histogram"])
    p.set_defaults(fn=cmd_optimize)

    p = add("export", help="export a saved folder or a model file to ONNX, checked in ONNX Runtime")
    p.add_argument("source", help="a folder written by save / --out, or path/to/file.py:ClassName")
    p.add_argument("--onnx", required=True, help="the .onnx file to write")
    p.add_argument("--input-shape", action="append", help="needed for a model file")
    p.add_argument("--no-simplify", action="store_true", help="skip onnx-simplifier")
    p.set_defaults(fn=cmd_export)

    p = add("run", help="load a saved module (or a model file), run it and print its latency")
    p.add_argument("source")
    p.add_argument("--input-shape", action="append", help="default: the shapes it was optimized for")
    p.add_argument("--repeat", type=int, default=20)
    p.set_defaults(fn=cmd_run)

    p = add("bench", help="run a benchmark suite from bench/ (models, kernels)")
    p.add_argument("suite", choices=["models", "kernels"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the suite, e.g. --quick")
    p.set_defaults(fn=cmd_bench)

    p = add("report", help="render a dump folder as one offline HTML page (DUMP_DIR/index.html)")
    p.add_argument("dump_dir")
    p.set_defaults(fn=cmd_report)

    p = add("fuzz", help="differential fuzzing: random programs against eager; failures saved as JSON")
    p.add_argument("--cases", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--artifacts", type=int, default=0, metavar="N",
                   help="instead: load N randomly altered saved folders (the loader's fuzzer)")
    p.set_defaults(fn=cmd_fuzz)

    p = add("demo", help="train the seed ConvNet on digits, optimize it, compare")
    p.add_argument("--out", default="demo-out", help="folder for demo.json and the dumps")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="a small, fast run (for tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc", type=int, default=2, help="processes for the data-parallel fine-tune")
    p.add_argument("--trials", type=int, default=8, help="Optuna trials for the tuned stage")
    p.set_defaults(fn=cmd_demo)

    p = add("finetune", help="train / fine-tune the seed ConvNet on digits with DDP (gloo or NCCL)")
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
    """The command; returns its exit status (argparse's --help and usage errors included)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a one-line usage error (2), already printed
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.fn(args)
    except (Exception, KeyboardInterrupt) as e:
        if getattr(args, "debug", False):
            raise
        return report_error(e, f"graphopt {args.command}")


if __name__ == "__main__":
    sys.exit(main())
