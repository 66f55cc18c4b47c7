"""Saved modules: bitwise round trips, no pickle anywhere, and a clear LoadError for every bad artifact."""

import json
import pickle

import pytest
import torch

from graphopt import LoadError, load, optimize
from tests.fuzz.artifacts import rehash
from tests.helpers import randomize_bn
from tests.zoo import ZOO


def _saved(tmp_path, name="resnet_blocks", backend="auto"):
    make, inputs = ZOO[name]
    model = randomize_bn(make()).eval()
    opt = optimize(model, (inputs(2),), backend=backend)
    return opt, opt.save(tmp_path / "saved"), inputs


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_round_trip_is_bitwise(name, backend, tmp_path):
    opt, folder, inputs = _saved(tmp_path, name, backend)
    assert sorted(p.name for p in folder.iterdir()) == ["code.py", "graph.json", "manifest.json",
                                                        "weights.safetensors"]
    loaded = load(folder)
    for x in (inputs(2), inputs(3)):
        with torch.no_grad():
            assert torch.equal(loaded(x), opt(x))
    assert loaded.backend == opt.backend


def test_load_uses_no_pickle_and_no_torch_load(tmp_path, monkeypatch):
    opt, folder, inputs = _saved(tmp_path)

    def refuse(*a, **k):
        raise AssertionError("unpickling during load")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    x = inputs(2)
    with torch.no_grad():
        assert torch.equal(load(folder)(x), opt(x))


def test_manifest_records_versions_inputs_ops_and_hashes(tmp_path):
    _, folder, _ = _saved(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["torch"] == torch.__version__ and manifest["backend"] == "cpu"
    assert manifest["inputs"][0]["shape"][1:] == [3, 17, 15]
    assert "torch.ops.graphopt.conv2d_act.default" in manifest["ops"]
    assert set(manifest["sha256"]) == {"graph.json", "weights.safetensors", "code.py"}


def test_missing_file(tmp_path):
    _, folder, _ = _saved(tmp_path)
    (folder / "weights.safetensors").unlink()
    with pytest.raises(LoadError, match="weights.safetensors is missing"):
        load(folder)


def test_hash_mismatch(tmp_path):
    _, folder, _ = _saved(tmp_path)
    data = bytearray((folder / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(LoadError, match="weights.safetensors does not match its sha256"):
        load(folder)


def test_malformed_json(tmp_path):
    _, folder, _ = _saved(tmp_path)
    (folder / "graph.json").write_text('{"format": "graphopt-graph", "nodes": [')
    rehash(folder)
    with pytest.raises(LoadError, match="graph.json is not valid JSON"):
        load(folder)


@pytest.mark.parametrize("target", ["os.system", "torch.load", "torch.from_file", "builtins.eval",
                                    "torch.nn.functional.__builtins__", "subprocess.run"])
def test_op_outside_the_allow_list(tmp_path, target):
    _, folder, _ = _saved(tmp_path)
    graph = json.loads((folder / "graph.json").read_text())
    node = next(n for n in graph["nodes"] if n["op"] == "call_function")
    node["target"] = target
    (folder / "graph.json").write_text(json.dumps(graph))
    rehash(folder)
    with pytest.raises(LoadError, match="not among the ops a saved graph may call"):
        load(folder)


def test_private_method_is_refused(tmp_path):
    _, folder, _ = _saved(tmp_path, "seed_convnet")
    graph = json.loads((folder / "graph.json").read_text())
    graph["nodes"].insert(1, {"name": "evil", "op": "call_method", "target": "__reduce_ex__",
                              "args": {"tuple": [{"node": graph["nodes"][0]["name"]}, 2]}, "kwargs": {"dict": {}}})
    (folder / "graph.json").write_text(json.dumps(graph))
    rehash(folder)
    with pytest.raises(LoadError, match="which a saved graph never calls"):
        load(folder)


def test_unreadable_versions(tmp_path):
    _, folder, _ = _saved(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["version"] = 99
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LoadError, match="version 99"):
        load(folder)
    _, folder2, _ = _saved(tmp_path / "b")
    graph = json.loads((folder2 / "graph.json").read_text())
    graph["version"] = 7
    (folder2 / "graph.json").write_text(json.dumps(graph))
    rehash(folder2)
    with pytest.raises(LoadError, match="format version 7"):
        load(folder2)


class _Trap:
    """Unpickling this creates a file: the test checks that it never appears."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("victim", ["weights.safetensors", "graph.json", "manifest.json"])
def test_pickle_posing_as_an_artifact_file(tmp_path, victim):
    _, folder, _ = _saved(tmp_path)
    trap = tmp_path / "pwned"
    (folder / victim).write_bytes(pickle.dumps(_Trap(trap)))
    if victim != "manifest.json":
        rehash(folder)
    with pytest.raises(LoadError):
        load(folder)
    assert not trap.exists()


def test_code_py_is_never_run(tmp_path):
    opt, folder, inputs = _saved(tmp_path)
    trap = tmp_path / "ran"
    (folder / "code.py").write_text(f"open({str(trap)!r}, 'w')\n")
    rehash(folder)
    x = inputs(1)
    with torch.no_grad():
        assert torch.equal(load(folder)(x), opt(x))
    assert not trap.exists()


def test_not_a_folder(tmp_path):
    with pytest.raises(LoadError, match="not a folder"):
        load(tmp_path / "nothing-here")


def test_leaf_modules_that_do_not_trace_are_saved_through_their_functional_form(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), torch.nn.LayerNorm(8),
                                torch.nn.ConvTranspose2d(8, 4, 2, 2), torch.nn.Upsample(scale_factor=2)).eval()
    x = torch.randn(2, 3, 8, 8)
    opt = optimize(model, (x,))
    loaded = load(opt.save(tmp_path / "saved"))
    with torch.no_grad():
        assert torch.equal(loaded(x), opt(x))
    ops = json.loads((tmp_path / "saved" / "manifest.json").read_text())["ops"]
    assert "torch.conv_transpose2d" in ops


def test_a_linear_on_a_transposed_input_reloads_bit_for_bit_in_graphopts_own_graph(tmp_path):
    """aten::linear on a non-contiguous 3-d input sums in another order when its weight requires grad (even under
    no_grad); a loaded module's weights are plain tensors, so graphopt's own copy of the model holds plain ones
    too. (Here ONNX Runtime's session runs the example's shape: the graphs are compared directly, and at another
    batch size, which graphopt's graph runs.)"""
    class Transposed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(32, 96)

        def forward(self, x):
            return self.fc(x.transpose(0, 1))

    model, x = Transposed().eval(), torch.randn(2, 7, 32)
    opt = optimize(model, (x,))
    loaded = load(opt.save(tmp_path / "saved"))
    with torch.no_grad():
        assert torch.equal(loaded.graph_module(x), opt.graph_module(x))
        other = torch.randn(2, 5, 32)
        assert torch.equal(loaded(other), opt(other))
    assert model.fc.weight.requires_grad  # (the user's model keeps its own)
