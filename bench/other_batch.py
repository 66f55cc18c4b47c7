"""Optimized at one batch size, called at another: graphopt against ONNX Runtime and eager, on the CPU.

    python bench/other_batch.py [--models a,b] [--batch 8] [--rounds 8]

A user optimizes with the example at hand (batch 1) and serves other batch sizes. Each model (bench/zoo.py) is
built at its table shape in bench/models.py, then timed on calls of ``--batch`` rows (interleaved rounds, median;
graphopt.compiler.workflow.timing), in a fresh process per model: eager; ``graphopt`` as a user calls it (the
kernel library chosen at the example's shape; other batch sizes in ONNX Runtime where its session measured
faster than graphopt's graph there: compiler/core/engines.py); ``graphopt_own`` (graphopt's own kernels: what
ran every call off the example's shape before that); ONNX Runtime over the model exported with its batch free
(the peer). Results:
bench/results/other-batch-<date>.json (with the CPU model and ISA flags) and a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engines import graphopt, graphopt_own, onnxruntime  # noqa: E402
from bench.machine import cpu_features  # noqa: E402
from bench.zoo import MODELS, randomize_bn  # noqa: E402
from graphopt.compiler.workflow import timing  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_MODELS = "convnet_b1,resnet18_b1,mobilenetv2_b1,efficientnet_b0_b1,mlp_bn_b1"
SETTLE_MS = 100.0  # (as bench/models.py: each block starts with untimed calls)


@torch.no_grad()
def bench_model(name: str, batch: int, rounds: int, per_round: int) -> dict:
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = randomize_bn(make()).eval()
    example, x = torch.randn(shape), torch.randn((batch, *shape[1:]))
    opt = graphopt(model, example)[0]
    built = {"eager": model, "onnxruntime": onnxruntime(model, example, dynamic_batch=True)[0], "graphopt_own":
             graphopt_own(model, example)[0], "graphopt": opt}
    reference = model(x)
    errors = {k: float((torch.as_tensor(f(x)) - reference).abs().max()) for k, f in built.items()}
    answered = opt._engine is not None and opt._engine(x) is not None  # (a library, not graphopt's graph)
    ms = timing.median_ms(built, (x,), rounds=rounds, per_round=per_round, settle_ms=SETTLE_MS)
    return {"model": name, "example_shape": list(shape), "called_shape": list(x.shape), "median_ms": ms,
            "max_abs_diff_vs_eager": errors, "engine": opt.engine_plan.label,
            "engine_batch_sizes": opt.engine_plan.batch_sizes(),
            "engine_answers_the_call": answered,
            "graphopt_vs_onnxruntime": ms["graphopt"] / ms["onnxruntime"],
            "graphopt_vs_graphopt_own": ms["graphopt"] / ms["graphopt_own"]}


def markdown(results: list[dict]) -> str:
    rows = ["| model | example | called | eager ms | onnxruntime ms | graphopt_own ms | graphopt ms | who runs which "
            "batch size | graphopt / onnxruntime | graphopt / graphopt_own |", "|" + "---|" * 10]
    for r in results:
        ms = r["median_ms"]
        ran = r["engine_batch_sizes"] + ("" if r["engine_answers_the_call"] else " (the call: graphopt's graph)")
        rows.append(f"| {r['model']} | {r['example_shape'][0]} | {r['called_shape'][0]} | {ms['eager']:.3f} | "
                    f"{ms['onnxruntime']:.3f} | {ms['graphopt_own']:.3f} | {ms['graphopt']:.3f} | {ran} | "
                    f"{r['graphopt_vs_onnxruntime']:.2f} | {r['graphopt_vs_graphopt_own']:.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=DEFAULT_MODELS)
    p.add_argument("--batch", type=int, default=8, help="rows per timed call")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--per-round", type=int, default=5)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: bench one model, write its JSON here
    args = p.parse_args(argv)
    if args.one:
        Path(args.one).write_text(json.dumps(bench_model(args.models, args.batch, args.rounds, args.per_round)))
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            one = Path(tmp) / f"{name}.json"
            subprocess.run([sys.executable, __file__, "--models", name, "--batch", str(args.batch), "--rounds",
                            str(args.rounds), "--per-round", str(args.per_round), "--one", str(one)], check=True)
            results.append(json.loads(one.read_text()))
            print(f"{name}: " + ", ".join(f"{e} {v:.3f} ms" for e, v in results[-1]["median_ms"].items()), flush=True)
    table = markdown(results)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"machine": cpu_features(), "batch": args.batch, "rounds": args.rounds, "per_round": args.per_round,
               "results": results, "table": table}
    (out / f"other-batch-{datetime.date.today().isoformat()}.json").write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
