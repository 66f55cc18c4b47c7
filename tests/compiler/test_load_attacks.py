"""A saved folder from someone else: every route to running code, touching files or changing
process state is refused with a LoadError, and runs nothing.

The gadget classes, and why each test is here:
  1. operator chains   attrgetter / methodcaller / call / itemgetter reach os.system from any object
  2. generated code    names fx pastes into the forward it generates: get_attr targets, node names,
                       keyword names, input names, method names
  3. files             aten.from_file (read any file; shared=True + copy_ writes one), torch.load / save
  4. process state     flush-denormal, autocast, anomaly mode, thread counts, seeds, default dtype, printing
  5. sizes             pow bombs, huge shapes in ops and in the manifest, huge strings, deep nesting
  6. malformed         wrong encodings, bad targets, duplicate names, no output, unknown backend
  7. the file system   symlinks for the folder or its files
Each folder is built from a real save, changed, and re-hashed (the attacker controls the hashes).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphopt import LoadError, load, optimize
from tests.fuzz.artifacts import GADGETS, METHOD_GADGETS, process_state, rehash, run_one, same_state
from tests.zoo import ZOO


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    make, inputs = ZOO["seed_convnet"]
    torch.manual_seed(0)
    opt = optimize(make().eval(), (inputs(2),))
    return opt.save(tmp_path_factory.mktemp("pristine") / "saved"), inputs(2)


@pytest.fixture
def folder(pristine, tmp_path):
    copy = tmp_path / "sent"
    shutil.copytree(pristine[0], copy)
    return copy


def _graph(folder: Path) -> dict:
    return json.loads((folder / "graph.json").read_text())


def _write(folder: Path, graph: dict) -> None:
    (folder / "graph.json").write_text(json.dumps(graph))
    rehash(folder)


def _first(graph: dict, op: str) -> dict:
    return next(n for n in graph["nodes"] if n["op"] == op)


def _insert(graph: dict, *nodes: dict) -> None:
    """Insert nodes right after the first input."""
    at = graph["nodes"].index(_first(graph, "placeholder")) + 1
    graph["nodes"][at:at] = list(nodes)


def _refused(folder: Path, match: str | None = None, marker: Path | None = None) -> None:
    before = process_state()
    with pytest.raises(LoadError, match=match):
        load(folder)
    assert same_state(before, process_state()) == []
    if marker is not None:
        assert not marker.exists(), "the attack ran"


# ---------------------------------------------------------------- 1. operator chains and other gadgets


@pytest.mark.parametrize("target", GADGETS)
def test_gadget_functions_are_refused(folder, target, tmp_path):
    graph = _graph(folder)
    x = _first(graph, "placeholder")["name"]
    _insert(graph, {"name": "evil", "op": "call_function", "target": target,
                    "args": {"tuple": [{"node": x}, str(tmp_path / "marker")]}, "kwargs": {"dict": {}}})
    _write(folder, graph)
    _refused(folder, "not among the ops a saved graph may call", tmp_path / "marker")


def test_the_attrgetter_chain_to_os_system_is_refused(folder, tmp_path):
    marker = tmp_path / "marker"
    graph = _graph(folder)
    x = _first(graph, "placeholder")["name"]
    _insert(graph,
            {"name": "g", "op": "call_function", "target": "operator.attrgetter",
             "args": {"tuple": ["__class__.__reduce_ex__.__globals__"]}, "kwargs": {"dict": {}}},
            {"name": "globs", "op": "call_function", "target": "operator.call", "args": {"tuple": [{"node": "g"},
                                                                                                   {"node": x}]},
             "kwargs": {"dict": {}}},
            {"name": "run", "op": "call_function", "target": "operator.methodcaller",
             "args": {"tuple": ["system", f"touch {marker}"]}, "kwargs": {"dict": {}}})
    _write(folder, graph)
    _refused(folder, marker=marker)


@pytest.mark.parametrize("method", METHOD_GADGETS)
def test_gadget_methods_are_refused(folder, method):
    graph = _graph(folder)
    x = _first(graph, "placeholder")["name"]
    _insert(graph, {"name": "evil", "op": "call_method", "target": method, "args": {"tuple": [{"node": x}]},
                    "kwargs": {"dict": {}}})
    _write(folder, graph)
    _refused(folder, "which a saved graph never calls")


def test_a_method_on_a_literal_is_refused(folder):
    graph = _graph(folder)
    _insert(graph, {"name": "evil", "op": "call_method", "target": "split", "args": {"tuple": ["a b"]},
                    "kwargs": {"dict": {}}})
    _write(folder, graph)
    _refused(folder, "not a graph value")


@pytest.mark.parametrize("attribute", ["__class__", "data", "grad_fn", "storage", "_cdata"])
def test_getattr_reads_only_shape_metadata(folder, attribute):
    graph = _graph(folder)
    x = _first(graph, "placeholder")["name"]
    _insert(graph, {"name": "evil", "op": "call_function", "target": "builtins.getattr",
                    "args": {"tuple": [{"node": x}, attribute]}, "kwargs": {"dict": {}}})
    _write(folder, graph)
    _refused(folder, "reads an attribute other than")


# ---------------------------------------------------------------- 2. text that would reach generated code


INJECTION = 'training")\nopen(MARKER, "w").close()\n_ = ("'


def _injected(marker: Path) -> str:
    return INJECTION.replace("MARKER", repr(str(marker)))


def test_get_attr_target_injection_is_refused(folder, tmp_path):
    from safetensors.torch import load_file, save_file

    marker = tmp_path / "marker"
    graph = _graph(folder)
    node = _first(graph, "get_attr")
    weights = load_file(str(folder / "weights.safetensors"))
    weights[_injected(marker)] = weights.pop(node["target"])
    save_file(weights, str(folder / "weights.safetensors"))
    node["target"] = _injected(marker)
    _write(folder, graph)
    _refused(folder, "not a plain identifier", marker)


@pytest.mark.parametrize("field", ["node name", "keyword", "input name"])
def test_names_that_would_reach_generated_code_are_refused(folder, tmp_path, field):
    marker = tmp_path / "marker"
    graph = _graph(folder)
    if field == "node name":
        old = _first(graph, "call_function")["name"]
        text = json.dumps(graph).replace(f'"{old}"', json.dumps(_injected(marker)))
        graph = json.loads(text)
    elif field == "keyword":
        _first(graph, "call_function")["kwargs"] = {"dict": {_injected(marker): 1}}
    else:
        _first(graph, "placeholder")["target"] = _injected(marker)
    _write(folder, graph)
    _refused(folder, "not a plain identifier", marker)


@pytest.mark.parametrize("name", ["self", "torch", "_private", "getattr", "operator"])
def test_names_that_would_shadow_the_generated_code_are_refused(folder, name):
    graph = _graph(folder)
    node = _first(graph, "get_attr")
    old = node["name"]
    graph = json.loads(json.dumps(graph).replace(f'"{old}"', json.dumps(name)))
    _write(folder, graph)
    _refused(folder)


# ---------------------------------------------------------------- 3. files


def test_reading_any_file_is_refused(folder, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"x" * 64)
    graph = _graph(folder)
    out = _first(graph, "output")
    _insert(graph, {"name": "leak", "op": "call_function", "target": "torch.ops.aten.from_file.default",
                    "args": {"tuple": [str(secret), False, 64]}, "kwargs": {"dict": {"dtype": {"dtype": "uint8"}}}})
    out["args"] = {"tuple": [{"node": "leak"}]}
    _write(folder, graph)
    _refused(folder, "not among the ops")


def test_writing_any_file_is_refused(folder, tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"\0" * 16)
    graph = _graph(folder)
    _insert(graph,
            {"name": "mapped", "op": "call_function", "target": "torch.from_file",
             "args": {"tuple": [str(victim), True, 16]}, "kwargs": {"dict": {"dtype": {"dtype": "uint8"}}}},
            {"name": "ones", "op": "call_function", "target": "torch.ones", "args": {"tuple": [16]},
             "kwargs": {"dict": {"dtype": {"dtype": "uint8"}}}},
            {"name": "write", "op": "call_method", "target": "copy_", "args": {"tuple": [{"node": "mapped"},
                                                                                        {"node": "ones"}]},
             "kwargs": {"dict": {}}})
    _write(folder, graph)
    _refused(folder)
    assert victim.read_bytes() == b"\0" * 16


@pytest.mark.parametrize("name", ["graph.json", "weights.safetensors", "manifest.json"])
def test_symlinked_files_are_refused(folder, tmp_path, name):
    real = tmp_path / f"elsewhere-{name}"
    shutil.move(folder / name, real)
    os.symlink(real, folder / name)
    _refused(folder, "not a regular file")


def test_a_symlinked_folder_is_refused(folder, tmp_path):
    link = tmp_path / "link"
    os.symlink(folder, link)
    _refused(link, "not a folder saved")


# ---------------------------------------------------------------- 4. process state


@pytest.mark.parametrize("target,args", [
    ("torch.set_flush_denormal", [True]), ("torch.set_autocast_cpu_enabled", [True]),
    ("torch.set_autocast_cpu_dtype", [{"dtype": "bfloat16"}]), ("torch.set_anomaly_enabled", [True]),
    ("torch.set_num_interop_threads", [1]), ("torch.set_num_threads", [1]), ("torch.manual_seed", [1]),
    ("torch.ops.aten._print.default", ["hello"]), ("torch.set_default_dtype", [{"dtype": "float64"}]),
    ("torch.set_grad_enabled", [False]), ("torch.use_deterministic_algorithms", [True]),
])
def test_process_state_ops_are_refused(folder, target, args):
    graph = _graph(folder)
    _insert(graph, {"name": "evil", "op": "call_function", "target": target, "args": {"tuple": args},
                    "kwargs": {"dict": {}}})
    _write(folder, graph)
    _refused(folder, "not among the ops")


# ---------------------------------------------------------------- 5. sizes


def _compute(folder: Path, *nodes: dict) -> None:
    graph = _graph(folder)
    x = _first(graph, "placeholder")["name"]
    nodes = json.loads(json.dumps(nodes).replace('{"node": "INPUT"}', json.dumps({"node": x})))
    _insert(graph, *nodes)
    _first(graph, "output")["args"] = {"tuple": [{"node": nodes[-1]["name"]}]}
    _write(folder, graph)


def test_an_int_power_bomb_is_refused_quickly(folder):
    _compute(folder, {"name": "bomb", "op": "call_function", "target": "operator.pow", "args": {"tuple": [7, 10 ** 9]},
                      "kwargs": {"dict": {}}})
    _refused(folder, "power")


def test_a_sequence_bomb_is_refused(folder):
    _compute(folder, {"name": "size", "op": "call_method", "target": "size",
                      "args": {"tuple": [{"node": "INPUT"}]}, "kwargs": {"dict": {}}},
             {"name": "bomb", "op": "call_function", "target": "operator.mul",
              "args": {"tuple": [{"node": "size"}, 10 ** 12]}, "kwargs": {"dict": {}}})
    _refused(folder, "sequence")


def test_a_huge_tensor_is_refused_without_allocating_it(folder):
    _compute(folder, {"name": "huge", "op": "call_function", "target": "torch.ones",
                      "args": {"tuple": [[2 ** 20, 2 ** 20]]}, "kwargs": {"dict": {}}})
    _refused(folder, "elements")


@pytest.mark.parametrize("shape", [[2 ** 40], [1] * 9, [-1, 3], [2 ** 15, 2 ** 15, 2], "1,2"])
def test_manifest_input_shapes_are_bounded(folder, shape):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["inputs"][0]["shape"] = shape
    (folder / "manifest.json").write_text(json.dumps(manifest))
    _refused(folder, "shape")


@pytest.mark.parametrize("spec", [{"batch": "free"}, {"batch": 1}, {"batch": "fixed", "shape": []},
                                  {"batches": "fixed"}])
def test_manifest_input_specs_take_only_the_batch_mark_graphopt_writes(folder, spec):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["inputs"][0].update(spec)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    _refused(folder, "malformed spec")


def test_a_long_string_is_refused(folder):
    node = {"name": "evil", "op": "call_function", "target": "operator.add", "args": {"tuple": ["x" * 100_000, "y"]},
            "kwargs": {"dict": {}}}
    _compute(folder, node)
    _refused(folder, "short printable")


def test_a_huge_graph_file_is_refused_before_it_is_read(folder):
    from graphopt.compiler.deploy import graph_json

    with open(folder / "graph.json", "ab") as f:
        f.truncate(graph_json.MAX_JSON_BYTES + 1)
    rehash(folder)
    _refused(folder, "more than a graphopt artifact")


@pytest.mark.parametrize("depth", [30, 100_000])
def test_deep_nesting_is_refused(folder, depth):
    graph = _graph(folder)
    text = json.dumps(graph).replace('"args": {"tuple": []}', '"args": ' + "[" * depth + "]" * depth, 1)
    (folder / "graph.json").write_text(text)
    rehash(folder)
    _refused(folder)


# ---------------------------------------------------------------- 6. malformed


@pytest.mark.parametrize("change", [
    "args_string", "unknown_kind", "bad_target", "forward_target", "duplicate_name", "no_output", "two_outputs",
    "node_before_defined", "unknown_op", "bad_dtype", "bad_device", "bad_act", "extra_field", "not_a_list",
])
def test_malformed_graphs_are_load_errors(folder, change):
    graph = _graph(folder)
    call, attr = _first(graph, "call_function"), _first(graph, "get_attr")
    if change == "args_string":
        call["args"] = "x"
    elif change == "unknown_kind":
        call["args"] = {"pickle": "x"}
    elif change == "bad_target":
        attr["target"] = "a..b"
    elif change == "forward_target":
        attr["target"] = "forward"
    elif change == "duplicate_name":
        graph["nodes"][2]["name"] = graph["nodes"][1]["name"]
    elif change == "no_output":
        graph["nodes"] = [n for n in graph["nodes"] if n["op"] != "output"]
    elif change == "two_outputs":
        graph["nodes"].append(dict(_first(graph, "output"), name="output2"))
    elif change == "node_before_defined":
        graph["nodes"].insert(1, {"name": "early", "op": "call_function", "target": "torch.relu",
                                  "args": {"tuple": [{"node": graph["nodes"][-2]["name"]}]}, "kwargs": {"dict": {}}})
    elif change == "unknown_op":
        call["op"] = "call_module"
    elif change == "bad_dtype":
        call["kwargs"] = {"dict": {"dtype": {"dtype": "object"}}}
    elif change == "bad_device":
        call["kwargs"] = {"dict": {"device": {"device": "file:/etc/passwd"}}}
    elif change == "bad_act":
        graphopt_op = next(n for n in graph["nodes"] if n["target"].startswith("torch.ops.graphopt."))
        graphopt_op["args"]["tuple"][7] = "rm -rf"
    elif change == "extra_field":
        call["code"] = "print(1)"
    else:
        graph["nodes"] = {"a": 1}
    _write(folder, graph)
    _refused(folder)


def test_a_manifest_for_a_missing_or_unknown_backend_is_a_load_error(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["backend"] = "../../etc"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    _refused(folder, "backend")


@pytest.mark.parametrize("engine", ["os.system", "../engine.onnx", ["onnxruntime"], {"path": "/etc/passwd"}])
def test_a_manifest_naming_an_unknown_engine_is_a_load_error(folder, engine):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["engine"] = engine  # (a saved folder never holds a model file for an engine: load exports its own)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    _refused(folder, "engine")


@pytest.mark.parametrize("limits", [[], {"inputs": 1.0}, {"inputs": -1.0, "checks": {}},
                                    {"inputs": float("inf"), "checks": {}}, {"inputs": True, "checks": {}},
                                    {"inputs": 1.0, "checks": {"x": "1"}}, {"inputs": 1.0, "checks": ["x"]},
                                    {"inputs": 1.0, "checks": {"v" * 1000: 1.0}},
                                    {"inputs": 1.0, "checks": {f"v{i}": 1.0 for i in range(10_000)}}])
def test_malformed_engine_range_limits_are_a_load_error(folder, limits):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["engine_limits"] = limits  # (well-formed limits are proven against the graph on load: test_engines.py)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    _refused(folder, "engine_limits")


@pytest.mark.parametrize("sums", [[], {"conv": 1.0}, {"conv": [1.0]}, {"conv": [0.0, 0]}, {"conv": [-1.0, 0]},
                                  {"conv": [float("inf"), 0]}, {"conv": ["1", 0]}, {"conv": [1.0, 128]},
                                  {"conv": [1.0, -129]}, {"conv": [1.0, True]}, {"conv": [1.0, 0.5]},
                                  {"v" * 1000: [1.0, 0]}, {f"v{i}": [1.0, 0] for i in range(10_000)},
                                  {"conv": [1.0, 0]}])  # (the last: no int8 conv of that name in the graph)
def test_malformed_engine_int8_sums_are_a_load_error(folder, sums):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["engine_int8_sums"] = sums  # (well-formed sums that wreck the answers: test_int8_plans.py)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    _refused(folder, "engine_int8_sums")


@pytest.mark.parametrize("threads", [64, "0", "all", None])
def test_a_manifest_naming_unknown_engine_threads_is_a_load_error(folder, threads):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["engine_threads"] = threads
    (folder / "manifest.json").write_text(json.dumps(manifest))
    _refused(folder, "engine threads")


@pytest.mark.parametrize("flag", ["engine_other_batches", "engine_gates_spread"])
@pytest.mark.parametrize("value", [1, "true", None, [True]])
def test_a_manifest_whose_engine_flag_is_not_a_boolean_is_a_load_error(folder, flag, value):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest[flag] = value
    (folder / "manifest.json").write_text(json.dumps(manifest))
    _refused(folder, flag)


@pytest.mark.parametrize("engine", ["graphopt", "openvino"])
def test_a_manifest_spreading_gates_for_another_engine_than_onnx_runtime_is_a_load_error(folder, engine):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["engine"], manifest["engine_gates_spread"] = engine, True
    (folder / "manifest.json").write_text(json.dumps(manifest))
    _refused(folder, "engine_gates_spread")


def test_a_hostile_safetensors_header_is_a_load_error(folder):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2 ** 40], "data_offsets": [0, 2 ** 42]}}).encode()
    (folder / "weights.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    rehash(folder)
    _refused(folder)


# ---------------------------------------------------------------- the mutator


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2 ** 31))
def test_mutated_folders_load_or_are_refused_and_never_breach(pristine, tmp_path, seed):
    """Hypothesis drives the mutator (tests/fuzz/artifacts.py) over a fixed budget of single random changes;
    ``graphopt fuzz --artifacts N`` runs more. Each must end in a LoadError or a module, never a breach."""
    folder, example = pristine
    assert run_one(folder, tmp_path, seed, example) in ("refused", "loaded")
