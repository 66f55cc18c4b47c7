"""Saved modules: no pickle, no torch.load, nothing from the folder is executed.

    DIR/graph.json          the portable graph (graphopt ops, aten ops), see compiler/serialize.py
    DIR/weights.safetensors every tensor the graph reads
    DIR/code.py             the generated forward, for people to read (never run by load)
    DIR/manifest.json       versions, backend, input specs, the op set, and a sha256 of every file above

``load`` checks the manifest, every hash, the JSON against the allow-list of ops, reads the
weights with safetensors, rebuilds the graph and lowers it again for the backend (oneDNN
weights are reordered again on load, as at optimize time).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from compiler.capture import propagate
from compiler.errors import LoadError
from compiler.serialize import FORMAT_VERSION, graph_from_json, graph_to_json, inline_modules

FILES = ("graph.json", "weights.safetensors", "code.py")
MANIFEST_VERSION = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("graphopt")
    except PackageNotFoundError:
        return "unknown"


def save(portable: fx.GraphModule, path: str | Path, *, backend: str, input_specs: list, report: list) -> Path:
    from safetensors.torch import save_file

    from compiler.pass_manager import clone

    gm = inline_modules(clone(portable))  # (raises before anything is written, if it cannot)
    graph = graph_to_json(gm)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {n.target: _get(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    (out / "graph.json").write_text(json.dumps(graph, indent=1) + "\n")
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(out / "weights.safetensors"))
    (out / "code.py").write_text("# The generated forward, for reading. compiler.load never runs this file.\n"
                                 + gm.code)
    ops = sorted({n["target"] for n in graph["nodes"] if n["op"] in ("call_function", "call_method")})
    manifest = {
        "format": "graphopt-module", "version": MANIFEST_VERSION, "graph_version": FORMAT_VERSION,
        "graphopt": _version(), "torch": torch.__version__, "backend": backend, "inputs": input_specs,
        "ops": ops, "passes": [{"name": r.name, "rewrites": r.rewrites} for r in report],
        "sha256": {name: _sha256(out / name) for name in FILES},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def _get(module: nn.Module, target: str) -> torch.Tensor:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"{path.name} is not valid JSON: {e}", hint="the artifact is damaged or was altered") from e


def _check_manifest(root: Path) -> dict:
    if not root.is_dir():
        raise LoadError(f"{root} is not a folder saved by OptimizedModule.save")
    for name in ("manifest.json", *FILES):
        if not (root / name).is_file():
            raise LoadError(f"{name} is missing from {root}", hint="copy the whole folder that save() wrote")
    manifest = _read_json(root / "manifest.json")
    if not isinstance(manifest, dict) or manifest.get("format") != "graphopt-module":
        raise LoadError("manifest.json is not a graphopt manifest")
    if manifest.get("version") != MANIFEST_VERSION:
        raise LoadError(f"manifest.json has version {manifest.get('version')!r}; this graphopt reads "
                        f"{MANIFEST_VERSION}", hint="save the model again with this version of graphopt")
    hashes = manifest.get("sha256")
    if not isinstance(hashes, dict) or set(hashes) != set(FILES):
        raise LoadError("manifest.json does not list a sha256 for every file")
    for name in FILES:
        if _sha256(root / name) != hashes[name]:
            raise LoadError(f"{name} does not match its sha256 in manifest.json",
                            hint="the file was changed after it was saved; do not load it")
    if manifest.get("backend") not in ("cpu", "reference", "triton") or not isinstance(manifest.get("inputs"), list):
        raise LoadError("manifest.json has no valid backend or input specs")
    return manifest


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        # copies in torch's own (aligned) memory: kernels pick their code path, and so the summation order,
        # by alignment, and a reloaded module must give the same bits as the one that was saved
        return {k: v.clone() for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoadError(f"{path.name} is not a safetensors file: {e}", hint="the artifact is damaged or was altered"
                        ) from e


def _example(spec: Any) -> torch.Tensor:
    try:
        return torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]), device=spec["device"])
    except (KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise LoadError(f"manifest.json has a malformed input spec: {spec!r}") from e


def load(path: str | Path):
    """Rebuild an OptimizedModule saved with ``.save(path)``."""
    from compiler.codegen import OptimizedModule, finalize
    from compiler.pass_manager import PassManager, clone
    from passes import LOWERING, PassContext

    root = Path(path)
    manifest = _check_manifest(root)
    graph = graph_from_json(_read_json(root / "graph.json"))
    weights = _weights(root / "weights.safetensors")
    holder = nn.Module()
    for node in graph.nodes:
        if node.op == "get_attr":
            if node.target not in weights:
                raise LoadError(f"weights.safetensors has no tensor {node.target!r}, which graph.json reads")
            *parents, leaf = node.target.split(".")
            owner = holder
            for part in parents:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            owner.register_buffer(leaf, weights[node.target])
    portable = fx.GraphModule(holder, graph, "Loaded")
    inputs = tuple(_example(s) if s is not None else None for s in manifest["inputs"])
    try:
        propagate(portable, inputs)
    except Exception as e:
        raise LoadError(f"the saved graph does not run on its own input specs: {e}") from e
    backend = manifest["backend"]
    ctx = PassContext(inputs, backend=backend)
    lowered, report = PassManager(LOWERING[backend], check=False).run(clone(portable), ctx)
    return OptimizedModule(finalize(lowered), report, manifest["inputs"], backend, portable=finalize(portable))
