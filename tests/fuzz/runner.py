"""Run fuzz cases: each generated program through optimize(), save/load and each pass alone,
against eager. A failure is bisected to the pass that causes it, shrunk to a small program and
saved as JSON (spec + seed) under tests/fuzz/regressions/, which every CI run replays.

    python tests/fuzz/runner.py --cases 500 --seed 1000      (or: graphopt fuzz --cases 500 --seed 1000)
    python tests/fuzz/runner.py --artifacts 2000 --seed 0     hostile saved folders (tests/fuzz/artifacts.py)
    python tests/fuzz/runner.py --seed 1234 --cases 1 --debug every failure in full, with its traceback
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from graphopt import load, optimize  # noqa: E402
from graphopt.compiler.core.pipeline import PassManager  # noqa: E402
from graphopt.passes.pipeline import DEFAULT_PIPELINE, PassContext  # noqa: E402
from tests.fuzz.generator import generate  # noqa: E402
from tests.fuzz.spec_model import SpecModel  # noqa: E402

REGRESSIONS = Path(__file__).resolve().parent / "regressions"
DEBUG = False  # --debug: each failure carries its traceback, and every failure is printed in full
TRACEBACK = "Traceback (most recent call last):"


def _failure(where: str, e: BaseException) -> str:
    """One failure as "where: Error: message", its traceback appended under --debug."""
    line = f"{where}: {type(e).__name__}: {e}"
    return f"{line}\n{traceback.format_exc()}" if DEBUG else line


def build(spec: dict, seed: int) -> tuple[SpecModel, torch.Tensor]:
    """The model with BatchNorm statistics warmed in training mode, then eval; and an input."""
    torch.manual_seed(seed)
    model = SpecModel(spec)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn([4, *spec["input"][1:]]) * 2 + 0.5)  # BatchNorm needs a batch > 1 to train
    return model.eval(), torch.randn(spec["input"])


def _flat(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


def _compare(got, want, what: str) -> None:
    for g, w in zip(_flat(got), _flat(want), strict=True):
        scale = float(w.abs().max()) if w.numel() else 1.0
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * max(scale, 1.0), equal_nan=True,
                                   msg=lambda m: f"{what}: {m}")


def _state(model: torch.nn.Module) -> list:
    return [(k, v.clone()) for k, v in model.state_dict().items()] + [m.training for m in model.modules()]


def check_case(spec: dict, seed: int, each_pass: bool = True) -> list[str]:
    """Failures of one program, as readable strings (empty: it passed)."""
    model, x = build(spec, seed)
    before = _state(model)
    failures = []
    bigger = torch.randn([spec["input"][0] + 2, *spec["input"][1:]])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want, want_bigger = model(x.clone()), model(bigger.clone())
        try:
            opt = optimize(model, (x,))
            _compare(opt(x.clone()), want, "optimize()")
            _compare(opt(bigger.clone()), want_bigger, "optimize() at another batch size")
            assert optimize(model, (x,)).code == opt.code, "optimize() is not deterministic"
            again = PassManager(DEFAULT_PIPELINE).run(opt.portable, PassContext((x,)))[1]
            assert sum(r.rewrites for r in again) == 0, f"not idempotent: {[(r.name, r.rewrites) for r in again]}"
            with tempfile.TemporaryDirectory() as tmp:
                loaded = load(opt.save(tmp))
                assert torch.equal(torch.cat([t.flatten() for t in _flat(loaded(x.clone()))]),
                                   torch.cat([t.flatten() for t in _flat(opt(x.clone()))])), "reload changed bits"
        except Exception as e:
            failures.append(_failure("pipeline", e))
        for name in [fn.__name__ for fn in DEFAULT_PIPELINE] if each_pass else []:
            try:
                _compare(optimize(model, (x,), passes=[name])(x.clone()), want, f"pass {name} alone")
            except Exception as e:
                failures.append(_failure(name, e))
    after = _state(model)
    if any(not (torch.equal(a[1], b[1]) if isinstance(a, tuple) else a == b) for a, b in zip(before, after)):
        failures.append("the user's model was modified")
    return failures


INT8_FLOOR_DB = 15.0  # random programs, random data: lowest seen over 200 programs 20.3 dB


def check_int8_case(spec: dict, seed: int) -> list[str]:
    """int8 on one program (every layer quantized): it runs, stays near eager (SQNR), reloads bitwise."""
    import graphopt.compiler.int8.quantize
    from graphopt.compiler.core.verify import sqnr

    model, x = build(spec, seed)
    g = torch.Generator().manual_seed(seed)
    calibration = [(torch.randn(x.shape, generator=g),) for _ in range(6)]
    saved, graphopt.compiler.int8.quantize.MIN_INT8_MACS = graphopt.compiler.int8.quantize.MIN_INT8_MACS, 0
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = optimize(model, (x,), quantize="int8", calibration=calibration, progress=False)
            want, got = _flat(model(x.clone())), _flat(q(x.clone()))
            worst = min((sqnr(w, o) for w, o in zip(want, got) if w.is_floating_point()), default=float("inf"))
            if worst < INT8_FLOOR_DB:
                return [f"int8: output SQNR {worst:.1f} dB < {INT8_FLOOR_DB} dB"]
            with tempfile.TemporaryDirectory() as tmp:
                if not all(torch.equal(a, b) for a, b in zip(_flat(load(q.save(tmp))(x.clone())), got)):
                    return ["int8: reload changed bits"]
    except Exception as e:
        return [_failure("int8", e)]
    finally:
        graphopt.compiler.int8.quantize.MIN_INT8_MACS = saved
    return []


def _remove(spec: dict, i: int) -> dict | None:
    """The program without op i (value i + 1), its readers reading op i's input instead; None if invalid."""
    ops, removed = spec["ops"], spec["ops"][i]
    replacement = removed["x"]
    out = []
    for j, op in enumerate(ops):
        if j == i:
            continue
        op = dict(op)
        for key in ("x", "y"):
            if key in op:
                v = op[key]
                op[key] = replacement if v == i + 1 else (v - 1 if v > i + 1 else v)
        out.append(op)
    outputs = [replacement if v == i + 1 else (v - 1 if v > i + 1 else v) for v in spec["outputs"]]
    candidate = {"input": spec["input"], "ops": out, "outputs": outputs}
    try:
        model, x = build(candidate, 0)
        with torch.no_grad():
            model(x)
    except Exception:
        return None
    return candidate


def shrink(spec: dict, seed: int, fails) -> dict:
    """Remove ops one at a time while the program still fails (greedy delta debugging)."""
    changed = True
    while changed:
        changed = False
        for i in reversed(range(len(spec["ops"]))):
            candidate = _remove(spec, i)
            if candidate is not None and candidate["ops"] and fails(candidate):
                spec, changed = candidate, True
    return spec


def record(spec: dict, seed: int, failures: list[str]) -> Path:
    culprit = next((f.split(":")[0] for f in failures if not f.startswith("pipeline")), "pipeline")

    def fails(candidate):
        return any(f.split(":")[0] == culprit for f in check_case(candidate, seed))

    small = shrink(spec, seed, fails)
    failures = [f.split(f"\n{TRACEBACK}")[0] for f in check_case(small, seed)[:3]]  # (not --debug's: local paths)
    data = {"seed": seed, "pass": culprit, "failures": failures, "spec": small}
    digest = hashlib.sha256(json.dumps(small, sort_keys=True).encode()).hexdigest()[:12]
    REGRESSIONS.mkdir(exist_ok=True)
    path = REGRESSIONS / f"{culprit}-{digest}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def fuzz_artifacts(cases: int, seed: int) -> int:
    """Load ``cases`` single-change mutants of a real saved module; any breach of the loader's promises fails."""
    from graphopt import optimize
    from tests.fuzz.artifacts import run_one
    from tests.zoo import ZOO

    make, inputs = ZOO["resnet_blocks"]
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pristine = optimize(make().eval(), (inputs(2),)).save(work / "pristine")
        outcomes, bad = {"loaded": 0, "refused": 0}, 0
        for case in range(seed, seed + cases):
            try:
                outcomes[run_one(pristine, work, case, inputs(2))] += 1
            except AssertionError as e:
                bad += 1
                print(f"FAILED {e}" + (f"\n{traceback.format_exc()}" if DEBUG else ""), flush=True)
    print(f"fuzz --artifacts: {cases - bad} passed, {bad} failed ({outcomes['refused']} refused, "
          f"{outcomes['loaded']} loaded and ran)")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="graphopt's differential fuzzer")
    p.add_argument("--cases", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-record", action="store_true", help="do not write reproducers")
    p.add_argument("--artifacts", type=int, default=0, help="instead: load N randomly altered saved folders")
    p.add_argument("--debug", action="store_true", help="print every failure in full, with its traceback")
    args = p.parse_args(argv)
    global DEBUG
    DEBUG = args.debug
    if args.artifacts:
        return fuzz_artifacts(args.artifacts, args.seed)
    bad = 0
    for seed in range(args.seed, args.seed + args.cases):
        spec = generate(seed)
        failures = check_case(spec, seed)
        if failures:
            bad += 1
            where = "" if args.no_record else f" -> {record(spec, seed, failures)}"
            shown = "\n".join(failures) if DEBUG else failures[0][:300]
            print(f"seed {seed}: FAILED {shown}{where}", flush=True)
    print(f"fuzz: {args.cases - bad} passed, {bad} failed (seeds {args.seed}..{args.seed + args.cases - 1})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
