"""Where the time goes, op by op: graphopt's optimized module (torch.profiler) next to ONNX Runtime's
session (its own profiler), on the same bench model and input.

    python bench/op_profile.py --model mobilenetv2_b1 [--calls 50]

Prints, per op kind, milliseconds per forward for each engine (graphopt's ops by aten / oneDNN name,
ONNX Runtime's nodes by ONNX op type) and the end-to-end medians, and writes
bench/results/profile-<model>-<date>.json. ONNX Runtime's profile file goes to a temporary folder,
never into the working tree.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import cpu_features  # noqa: E402
from bench.zoo import MODELS, randomize_bn  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def profile_graphopt(model: torch.nn.Module, x: torch.Tensor, calls: int) -> tuple[dict, float]:
    from torch.profiler import ProfilerActivity, profile

    from graphopt import optimize

    opt = optimize(model, (x,))
    with torch.no_grad():
        for _ in range(5):
            opt(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                opt(x)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            opt(x)
            times.append(time.perf_counter() - start)
    per_op = collections.Counter()
    ours = ("aten::", "mkldnn::", "mkl::", "graphopt::", "onednn::")
    for event in prof.key_averages():
        if event.key.startswith(ours) and event.self_cpu_time_total > 0:
            per_op[event.key] += event.self_cpu_time_total / 1e3 / calls
    return dict(per_op.most_common()), statistics.median(times) * 1e3


def profile_onnxruntime(model: torch.nn.Module, x: torch.Tensor, calls: int) -> tuple[dict, float]:
    import onnxruntime as ort

    folder = tempfile.mkdtemp(prefix="graphopt-profile-")
    path = os.path.join(folder, "model.onnx")
    with torch.no_grad():
        torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["y"], dynamo=False, opset_version=17)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    timed = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(folder, "ort")
    profiled = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    for _ in range(5):
        profiled.run(None, feed)
        timed.run(None, feed)
    for _ in range(calls):
        profiled.run(None, feed)
    events = json.loads(Path(profiled.end_profiling()).read_text())
    per_op = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            per_op[event["args"].get("op_name", "?")] += event["dur"] / 1e3 / (calls + 5)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        timed.run(None, feed)
        times.append(time.perf_counter() - start)
    return dict(per_op.most_common()), statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenetv2_b1", choices=sorted(MODELS))
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    make, shape = MODELS[args.model]
    torch.manual_seed(0)
    model, x = randomize_bn(make()).eval(), torch.randn(shape)
    ours, ours_ms = profile_graphopt(model, x, args.calls)
    theirs, theirs_ms = profile_onnxruntime(model, x, args.calls)
    print(f"{args.model}: graphopt {ours_ms:.3f} ms (ops {sum(ours.values()):.3f}), "
          f"onnxruntime {theirs_ms:.3f} ms (nodes {sum(theirs.values()):.3f})")
    width = max(map(len, [*ours, *theirs, "op"]))
    print(f"\n{'graphopt op':{width}}  ms/forward        {'onnxruntime op':{width}}  ms/forward")
    rows = max(len(ours), len(theirs))
    a, b = list(ours.items()), list(theirs.items())
    for i in range(min(rows, 20)):
        left = f"{a[i][0]:{width}}  {a[i][1]:10.3f}" if i < len(a) else " " * (width + 12)
        right = f"{b[i][0]:{width}}  {b[i][1]:10.3f}" if i < len(b) else ""
        print(f"{left}        {right}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"profile-{args.model}-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps({"machine": cpu_features(), "model": args.model, "calls": args.calls,
                                "graphopt_ms": ours_ms, "onnxruntime_ms": theirs_ms, "graphopt_ops_ms": ours,
                                "onnxruntime_ops_ms": theirs}, indent=1) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
