"""The ``graphopt`` command: optimize, demo."""

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
    from compiler import GraphoptError, optimize

    model = _load_class(args.model)().eval()
    inputs = tuple(torch.randn(*_shape(s)) for s in args.input_shape)
    try:
        opt = optimize(model, inputs, passes=args.passes.split(",") if args.passes else None,
                       backend=args.backend, dump_dir=args.dump_dir)
    except GraphoptError as e:
        print(f"graphopt: {e}", file=sys.stderr)
        return 1
    print_report(opt.report)
    if args.dump_dir:
        print(f"dumps written to {args.dump_dir}")
    if args.print_code:
        print(opt.code)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from compiler.demo import run_demo

    run_demo(args.out, epochs=args.epochs, quick=args.quick, seed=args.seed)
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
    p.set_defaults(fn=cmd_optimize)

    p = sub.add_parser("demo", help="train the seed ConvNet on digits, optimize it, compare")
    p.add_argument("--out", default="demo-out", help="folder for demo.json and the dumps")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="a small, fast run (for tests)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
