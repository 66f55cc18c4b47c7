"""The differential fuzzer in CI: 200 seeded random programs, and every saved reproducer."""

import json
from pathlib import Path

import pytest

from tests.fuzz.generator import generate
from tests.fuzz.runner import REGRESSIONS, check_case, check_int8_case

CASES = 200
PER_TEST = 20
INT8_CASES = 40


@pytest.mark.parametrize("start", range(0, CASES, PER_TEST))
def test_random_programs_match_eager(start):
    failures = {}
    for seed in range(start, start + PER_TEST):
        found = check_case(generate(seed), seed)  # the pipeline, save/load, and each pass alone
        if found:
            failures[seed] = found[:2]
    assert not failures, f"rerun with: python tests/fuzz/runner.py --seed S --cases 1\n{failures}"


@pytest.mark.parametrize("start", range(0, INT8_CASES, PER_TEST))
def test_random_programs_quantize_to_int8(start):
    failures = {}
    for seed in range(start, start + PER_TEST):
        found = check_int8_case(generate(seed), seed)
        if found:
            failures[seed] = found
    assert not failures, failures


@pytest.mark.parametrize("path", sorted(REGRESSIONS.glob("*.json")), ids=lambda p: p.stem)
def test_saved_reproducers_stay_fixed(path: Path):
    case = json.loads(path.read_text())
    assert check_case(case["spec"], case["seed"]) == []


def test_generator_is_deterministic_and_varied():
    assert generate(7) == generate(7)
    kinds = {op["kind"] for seed in range(200) for op in generate(seed)["ops"]}
    assert {"conv", "bn2d", "bn1d", "linear", "add", "add_", "cat", "permute_roundtrip", "view_flat"} <= kinds
    shared = sum(1 for seed in range(200) for op in generate(seed)["ops"] if op.get("module") and sum(
        o.get("module") == op["module"] for o in generate(seed)["ops"]) > 1)
    assert shared > 0                                                   # modules called at two sites


def test_debug_failures_carry_their_traceback(monkeypatch):
    """Under --debug a failure keeps its traceback; without, it is one line."""
    import tests.fuzz.runner as runner

    def broken(*args, **kwargs):
        raise ValueError("planted")

    monkeypatch.setattr(runner, "optimize", broken)
    plain = runner.check_case(generate(3), 3, each_pass=False)
    monkeypatch.setattr(runner, "DEBUG", True)
    debug = runner.check_case(generate(3), 3, each_pass=False)
    assert plain == ["pipeline: ValueError: planted"]
    assert debug[0].startswith(f"pipeline: ValueError: planted\n{runner.TRACEBACK}") and "in broken" in debug[0]


def test_a_reproducer_keeps_the_whole_message_but_no_traceback(monkeypatch, tmp_path):
    """record() under --debug: the saved failures keep a GraphoptError's hint lines, not the traceback (which names
    local paths)."""
    import json

    import tests.fuzz.runner as runner
    from graphopt import GraphoptError

    def broken(*args, **kwargs):
        raise GraphoptError("planted", hint="the hint")

    monkeypatch.setattr(runner, "optimize", broken)
    monkeypatch.setattr(runner, "DEBUG", True)
    monkeypatch.setattr(runner, "REGRESSIONS", tmp_path)
    spec = generate(3)
    saved = json.loads(runner.record(spec, 3, runner.check_case(spec, 3)).read_text())
    assert saved["failures"][0] == "pipeline: GraphoptError: planted\n  hint: the hint"
    assert not any(runner.TRACEBACK in f for f in saved["failures"])
