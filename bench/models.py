"""End-to-end fp32 latency of graphopt against the peers, on the CPU.

    python bench/models.py [--quick] [--models a,b] [--engines eager,graphopt,...]
    python bench/models.py --int8 ...   int8: graphopt vs torch.ao FX x86 and ONNX Runtime QDQ, with SQNR
    graphopt bench models ...          (the same)

For each model, every engine runs in one process (a fresh one per model, so that one model's
compiler threads and caches do not slow the next); the engines take turns in interleaved rounds
(each round runs each engine ``per_round`` times; graphopt.compiler.workflow.timing), so drift in
the machine's speed hits all of them alike. The table gives median latency per engine, graphopt /
fastest peer, graphopt's optimize time and each engine's max abs difference from eager, and (fp32) each
model's arithmetic with the share of the machine's fp32 GEMM rate that the fastest peer and graphopt reach
(bench/machine.py gemm_gflops: a model near 100% is compute-bound in every engine). Results: a Markdown
table (printed), bench/results/models-<date>.json and bench/results/models-<date>.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engines import DEFAULT_ENGINES, ENGINES, INT8_ENGINES  # noqa: E402
from bench.machine import cpu_features, gemm_gflops, model_gflop  # noqa: E402
from bench.zoo import MODELS, randomize_bn  # noqa: E402
from graphopt.compiler.workflow import timing  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _max_diff(a, b) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a.double() - b.double()).abs().max())


def _sqnr(reference, value) -> float:
    from graphopt.compiler.core.verify import sqnr

    return sqnr(torch.as_tensor(reference), torch.as_tensor(value))


CALIBRATION_BATCHES = 32


MIN_BLOCK_MS = 20.0
SETTLE_MS = 100.0  # untimed calls at the start of each engine's block (compiler/workflow/timing.py)


def _block(built: dict, x: torch.Tensor, per_round: int) -> int:
    """Calls per engine per round: at least ``per_round``, and enough that the fastest engine's block lasts
    MIN_BLOCK_MS. Engines with their own thread pools (torch's OpenMP, ONNX Runtime's, OpenVINO's) leave
    threads spinning for a while after a call, which slows whichever engine runs next; on a 0.06 ms model a
    block of 5 calls would measure that handover more than the engine (steady-state serving has none)."""
    if not built:
        return per_round
    fastest = min(timing.call_ms(built, (x,)).values())
    return max(per_round, math.ceil(MIN_BLOCK_MS / max(fastest, 1e-3)))


@torch.no_grad()
def bench_model(name: str, engines: list[str], rounds: int, per_round: int, int8: bool = False,
                quick: bool = False) -> dict:
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = randomize_bn(make()).eval()
    x = torch.randn(shape)
    reference = model(x)
    # int8: every engine calibrates on the same batches (batch size 1), none of them the timed input
    calibration = [torch.randn((1, *shape[1:])) for _ in range(CALIBRATION_BATCHES)] if int8 else None
    table = INT8_ENGINES if int8 else ENGINES
    built, build_s, errors, skipped, sqnr_db, notes = {}, {}, {}, {}, {}, {}
    for engine in engines:
        try:
            if engine.endswith("_int8"):
                built[engine], build_s[engine] = table[engine](model, x, calibration)
            else:
                built[engine], build_s[engine] = table[engine](model, x)
            out = built[engine](x)
            errors[engine], sqnr_db[engine] = _max_diff(out, reference), _sqnr(reference, out)
            notes[engine] = getattr(built[engine], "bench_note", None)
            if int8 and engine.endswith("_int8") and engine != "graphopt_int8" and errors[engine] == 0.0:
                # (torch.ao's dynamic recipe on a model without nn.Linear: GPT-2's addmm linears)
                raise ValueError("it quantized nothing here: its output is the fp32 model's, bit for bit")
        except Exception as e:  # a peer that cannot run this model here: reported, not faked
            skipped[engine] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            built.pop(engine, None)
            errors.pop(engine, None)
            sqnr_db.pop(engine, None)
    per_round = per_round if quick else _block(built, x, per_round)
    median_ms = timing.median_ms(built, (x,), rounds=rounds, per_round=per_round,
                                 settle_ms=0.0 if quick else SETTLE_MS)
    if int8:
        peers = {e: v for e, v in median_ms.items() if e.endswith("_int8") and e != "graphopt_int8"}
        fastest = min(peers, key=peers.get) if peers else None
        ours = median_ms.get("graphopt_int8")
        best_peer_db = max((sqnr_db[e] for e in peers), default=None)
        return {
            "model": name, "input_shape": list(shape), "median_ms": median_ms, "build_s": build_s,
            "per_round": per_round, "sqnr_db_vs_fp32": sqnr_db, "skipped": skipped, "notes": notes,
            "fastest_peer": fastest,
            "calibration_batches": CALIBRATION_BATCHES,
            "int8_vs_fastest_int8_peer": ours / peers[fastest] if fastest and ours else None,
            "int8_vs_graphopt_fp32": ours / median_ms["graphopt"] if ours and "graphopt" in median_ms else None,
            "sqnr_gap_db_vs_best_peer": sqnr_db["graphopt_int8"] - best_peer_db
            if best_peer_db is not None and "graphopt_int8" in sqnr_db else None,
        }
    peers = {e: v for e, v in median_ms.items() if not e.startswith("graphopt") and e != "eager"}
    fastest = min(peers, key=peers.get) if peers else None
    return {
        "model": name, "input_shape": list(shape), "median_ms": median_ms, "build_s": build_s, "per_round": per_round,
        "gflop": model_gflop(model, x), "max_abs_diff_vs_eager": errors, "skipped": skipped,
        "fastest_peer": fastest, "notes": notes,
        "graphopt_vs_fastest_peer": (median_ms["graphopt"] / peers[fastest]) if fastest and "graphopt" in median_ms
        else None,
        "graphopt_vs_eager": median_ms["graphopt"] / median_ms["eager"] if {"graphopt", "eager"} <= set(median_ms)
        else None,
    }


def _of_gemm(result: dict, engine: str | None, gemm: float | None) -> str:
    """``engine``'s arithmetic rate on this model as a share of the machine's GEMM rate (machine.gemm_gflops)."""
    ms = result["median_ms"].get(engine) if engine else None
    if not ms or not gemm or "gflop" not in result:
        return "n/a"
    return f"{100 * result['gflop'] / (ms / 1e3) / gemm:.0f}%"


def markdown(results: list[dict], engines: list[str], gemm: float | None = None) -> str:
    head = ["model"] + [f"{e} ms" for e in engines] + ["graphopt ran in", "graphopt / fastest peer",
                                                         "graphopt / eager", "graphopt optimize s", "GFLOP",
                                                         "fastest peer, of GEMM rate", "graphopt, of GEMM rate"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["model"]] + [f"{r['median_ms'][e]:.3f}" if e in r["median_ms"] else "n/a" for e in engines]
        ratio = r["graphopt_vs_fastest_peer"]
        cells.append(((r.get("notes") or {}).get("graphopt") or {}).get("engine", "n/a"))
        cells.append(f"{ratio:.2f} ({r['fastest_peer']})" if ratio else "n/a")
        cells.append(f"{r['graphopt_vs_eager']:.2f}" if r["graphopt_vs_eager"] else "n/a")
        cells.append(f"{r['build_s'].get('graphopt', float('nan')):.2f}")
        cells.append(f"{r['gflop']:.4g}" if "gflop" in r else "n/a")
        cells += [_of_gemm(r, r["fastest_peer"], gemm), _of_gemm(r, "graphopt", gemm)]
        rows.append("| " + " | ".join(cells) + " |")
    ratios = [r["graphopt_vs_fastest_peer"] for r in results if r["graphopt_vs_fastest_peer"]]
    if ratios:
        geo = math.exp(sum(math.log(v) for v in ratios) / len(ratios))
        rows.append(f"\ngeomean graphopt / fastest peer: {geo:.2f}")
    if gemm:
        rows.append(f"GEMM rate of this machine (fp32, {torch.get_num_threads()} threads): {gemm:.0f} GFLOP/s")
    return "\n".join(rows)


def markdown_int8(results: list[dict], engines: list[str]) -> str:
    head = (["model"] + [f"{e} ms" for e in engines] + [f"{e} SQNR dB" for e in engines if e.endswith("_int8")]
            + ["int8 / fastest int8 peer", "int8 / graphopt fp32", "SQNR vs best peer dB", "calibration s",
               "graphopt int8 ran"])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["model"]] + [f"{r['median_ms'][e]:.3f}" if e in r["median_ms"] else "n/a" for e in engines]
        cells += [f"{r['sqnr_db_vs_fp32'][e]:.1f}" if e in r["sqnr_db_vs_fp32"] else "n/a"
                  for e in engines if e.endswith("_int8")]
        ratio = r["int8_vs_fastest_int8_peer"]
        cells.append(f"{ratio:.2f} ({r['fastest_peer']})" if ratio else "n/a")
        cells.append(f"{r['int8_vs_graphopt_fp32']:.2f}" if r["int8_vs_graphopt_fp32"] else "n/a")
        gap = r["sqnr_gap_db_vs_best_peer"]
        cells.append(f"{gap:+.1f}" if gap is not None else "n/a")
        note = (r.get("notes") or {}).get("graphopt_int8") or {}
        cells.append(f"{note['calibration_s']:.1f}" if "calibration_s" in note else "n/a")
        cells.append(note["plan"].split(" (measured")[0] if "plan" in note else "n/a")  # (compiler/int8/plans.py)
        rows.append("| " + " | ".join(cells) + " |")
    ratios = [r["int8_vs_fastest_int8_peer"] for r in results if r["int8_vs_fastest_int8_peer"]]
    if ratios:
        geo = math.exp(sum(math.log(v) for v in ratios) / len(ratios))
        rows.append(f"\ngeomean graphopt int8 / fastest int8 peer: {geo:.2f}")
    return "\n".join(rows)


def plot(results: list[dict], engines: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(engines)
    for i, engine in enumerate(engines):
        values = [r["median_ms"].get(engine, float("nan")) / r["median_ms"]["eager"] for r in results]
        ax.bar([j + i * width for j in range(len(results))], values, width, label=engine)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(results))], [r["model"] for r in results], rotation=15)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylabel("latency / eager (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--engines", default=None, help="default: every engine of the mode")
    p.add_argument("--int8", action="store_true", help="int8 engines (graphopt fp32 as the baseline), with SQNR")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--per-round", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="two rounds of two calls")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: bench one model, write its JSON here
    args = p.parse_args(argv)
    args.engines = args.engines or ",".join(INT8_ENGINES if args.int8 else DEFAULT_ENGINES)
    models, engines = args.models.split(","), args.engines.split(",")
    rounds, per_round = (2, 2) if args.quick else (args.rounds, args.per_round)
    if args.one:
        result = bench_model(models[0], engines, rounds, per_round, args.int8, args.quick)
        Path(args.one).write_text(json.dumps(result))
        return 0
    results = []
    # the machine's fp32 GEMM rate, before and after the models: the higher of the two (a neighbour's burst only
    # ever slows it), for each model's share of it in the table
    size = {"n": 512, "calls": 3} if args.quick else {}
    gemm_before = None if args.int8 else gemm_gflops(**size)
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            one = Path(tmp) / f"{name}.json"
            subprocess.run([sys.executable, __file__, "--models", name, "--engines", args.engines, "--rounds",
                            str(rounds), "--per-round", str(per_round), "--one", str(one)]
                           + (["--int8"] if args.int8 else []) + (["--quick"] if args.quick else []), check=True)
            results.append(json.loads(one.read_text()))
            print(f"{name}: " + ", ".join(f"{e} {v:.3f} ms" for e, v in results[-1]["median_ms"].items())
                  + "".join(f"; {e} skipped ({why})" for e, why in results[-1]["skipped"].items()), flush=True)
    gemm = None if gemm_before is None else max(gemm_before, gemm_gflops(**size))
    table = markdown_int8(results, engines) if args.int8 else markdown(results, engines, gemm)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = ("models-int8-" if args.int8 else "models-") + datetime.date.today().isoformat()
    machine = cpu_features() | ({"gemm_gflops": gemm} if gemm else {})
    payload = {"machine": machine, "rounds": rounds, "per_round": per_round, "results": results,
               "table": table}
    (out / f"{stamp}.json").write_text(json.dumps(payload, indent=2) + "\n")
    if args.int8 or "eager" not in engines:  # (the chart is latency / eager)
        return 0
    try:
        plot(results, engines, out / f"{stamp}.png")
    except ImportError:
        print("matplotlib not installed: no chart")
    return 0


if __name__ == "__main__":
    sys.exit(main())
