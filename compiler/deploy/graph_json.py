"""An fx graph as JSON, and back, checked and bounded before anything is built from it.

Writing: every call is named by ``registry.name_of`` (a graph calling anything else is refused,
naming the node). Reading treats the file as hostile:

    size       graph.json at most MAX_JSON_BYTES, MAX_NODES nodes, arguments nested MAX_DEPTH deep,
               lists of at most MAX_ITEMS, strings of at most MAX_STRING printable ASCII characters,
               ints within +-MAX_INT
    names      node names, get_attr parts and keyword names are plain identifiers (no leading
               underscore, no keyword, no name the generated code uses itself), so no file-supplied
               text ever reaches generated code except as such an identifier
    calls      call_function targets from registry.FUNCTIONS, call_method targets from
               registry.METHODS on a graph value, getattr only of registry.ATTRIBUTES
    values     dtype, memory format and device from closed sets; graphopt ops' activations parsed

Every failure is a LoadError naming graph.json and the node.
"""

from __future__ import annotations

import builtins
import keyword
import math
import re
from typing import Any

import torch
import torch.fx as fx

from graphopt.compiler.core.errors import GraphoptError, LoadError, node_source
from graphopt.compiler.deploy import registry
from graphopt.kernels.reference import parse_act

FORMAT_VERSION = 1
MAX_JSON_BYTES = 64 << 20
MAX_NODES = 200_000
MAX_DEPTH = 8
MAX_ITEMS = 4096
MAX_STRING = 256
MAX_INT = 1 << 63
MAX_NAME = 128
MAX_ATTR_PARTS = 16

_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
_DEVICE = re.compile(r"(cpu|meta|cuda(:[0-9]{1,2})?)\Z")
# names the generated forward itself uses: a node may not shadow them
_RESERVED = frozenset({"self", "torch", "operator", "math", "builtins", "inf", "nan", "device", "fx_pytree", "pytree",
                       "getattr", "graphopt", "NoneType", "wrap", "annotations"}) | frozenset(dir(builtins))
_MODULE_ATTRIBUTES = frozenset(dir(torch.nn.Module()))  # a weight may not be named like one (training, forward...)
_DTYPES = {name: getattr(torch, name) for name in (
    "float32", "float64", "float16", "bfloat16", "int8", "uint8", "int16", "int32", "int64", "bool", "complex64",
    "float", "double", "half", "int", "long", "short", "bool")}
_MEMORY_FORMATS = {str(f).removeprefix("torch."): f for f in
                   (torch.contiguous_format, torch.channels_last, torch.preserve_format, torch.channels_last_3d)}


# ---------------------------------------------------------------- writing


def target_name(node: fx.Node) -> str:
    name = registry.name_of(node.target)
    if name is None:
        called = getattr(node.target, "__name__", node.target)
        raise GraphoptError(f"cannot save node {node.name}: it calls {called!r}, which is not among the ops a saved "
                            "graph may call", node=node.format_node(),
                            module=node.meta.get("module"), source=node_source(node),
                            hint="saved graphs call only the torch / aten / graphopt ops graphopt's loader accepts "
                                 "(graphopt.compiler.deploy.registry); keep this module unsaved, or ask for the op")
    return name


def encode(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, (list, tuple)):
        items = [encode(v) for v in value]
        return items if isinstance(value, list) else {"tuple": items}
    if isinstance(value, dict):
        return {"dict": {k: encode(v) for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, slice):
        return {"slice": [encode(value.start), encode(value.stop), encode(value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    raise GraphoptError(f"cannot save an argument of type {type(value).__name__}: {value!r}")


def is_plain(name: str) -> bool:
    """May the loader take ``name`` as a node, input or weight-part name?"""
    return (len(name) <= MAX_NAME and bool(_IDENTIFIER.match(name)) and not keyword.iskeyword(name)
            and name not in _RESERVED and name not in _MODULE_ATTRIBUTES)


def plain_names(gm: fx.GraphModule) -> dict[str, str]:
    """Rename nodes and weights whose names the loader would refuse (``_conv1_folded_weight``, ``_frozen_0``);
    returns {new weight name: old one}, for reading the tensors."""
    for node in gm.graph.nodes:
        if not is_plain(node.name):
            node._rename("v" + node.name.lstrip("_"))  # (fx keeps it unique and away from builtins)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    weights = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        parts = [p if is_plain(p) else "w" + p.lstrip("_") for p in node.target.split(".")]
        parts = [p if is_plain(p) else "w" for p in parts]
        new, k = ".".join(parts), 0
        while new != node.target and (new in used or new in weights):
            k, new = k + 1, ".".join(parts) + f"_{k + 1}"
        weights[new] = weights.get(new, node.target)
        node.target = new
    return weights


def graph_to_json(gm: fx.GraphModule) -> dict:
    nodes = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            raise GraphoptError(f"inline modules before saving (node {node.name})")
        target = target_name(node) if node.op == "call_function" else node.target
        nodes.append({"name": node.name, "op": node.op, "target": target, "args": encode(node.args),
                      "kwargs": encode(node.kwargs)})
    return {"format": "graphopt-graph", "version": FORMAT_VERSION, "nodes": nodes}


# ---------------------------------------------------------------- reading


class _Reader:
    """Decodes one node's arguments, with every bound checked; ``where`` names the node for errors."""

    def __init__(self, nodes: dict[str, fx.Node]):
        self.nodes, self.where = nodes, "graph.json"

    def fail(self, problem: str) -> LoadError:
        return LoadError(f"{self.where}: {problem}", hint="the artifact was not written by graphopt, or was altered; "
                                                          "do not load it")

    def value(self, v: Any, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise self.fail(f"arguments nested deeper than {MAX_DEPTH}")
        if v is None or isinstance(v, bool):
            return v
        if isinstance(v, int):
            if abs(v) > MAX_INT:
                raise self.fail(f"an integer argument out of range ({len(str(v))} digits)")
            return v
        if isinstance(v, float):
            return v
        if isinstance(v, str):
            return self.string(v)
        if isinstance(v, list):
            return [self.value(x, depth + 1) for x in self.items(v)]
        if not isinstance(v, dict) or len(v) != 1:
            raise self.fail(f"a malformed argument of type {type(v).__name__}")
        (kind, x), = v.items()
        if kind == "node":
            if not isinstance(x, str) or x not in self.nodes:
                raise self.fail(f"an argument refers to node {str(x)[:MAX_NAME]!r}, which is not defined before it")
            return self.nodes[x]
        if kind == "tuple" and isinstance(x, list):
            return tuple(self.value(y, depth + 1) for y in self.items(x))
        if kind == "dict" and isinstance(x, dict):
            return {self.identifier(k, "keyword"): self.value(y, depth + 1) for k, y in self.items(x).items()}
        if kind == "float" and x in ("inf", "-inf", "nan"):
            return float(x)
        if kind == "dtype" and x in _DTYPES:
            return _DTYPES[x]
        if kind == "memory_format" and x in _MEMORY_FORMATS:
            return _MEMORY_FORMATS[x]
        if kind == "device" and isinstance(x, str) and _DEVICE.match(x):
            return torch.device(x)
        if kind == "slice" and isinstance(x, list) and len(x) == 3:
            return slice(*(self.value(y, depth + 1) for y in x))
        if kind == "ellipsis" and x is True:
            return Ellipsis
        raise self.fail(f"an argument of unknown kind {str(kind)[:MAX_NAME]!r}")

    def items(self, v: list | dict) -> list | dict:
        if len(v) > MAX_ITEMS:
            raise self.fail(f"an argument with {len(v)} items (at most {MAX_ITEMS})")
        return v

    def string(self, s: str) -> str:
        if len(s) > MAX_STRING or not s.isascii() or not s.isprintable():
            raise self.fail(f"a string argument that is not short printable ASCII ({len(s)} characters)")
        return s

    def identifier(self, s: Any, what: str) -> str:
        if not isinstance(s, str) or len(s) > MAX_NAME or not _IDENTIFIER.match(s) or keyword.iskeyword(s):
            raise self.fail(f"a {what} that is not a plain identifier: {str(s)[:MAX_NAME]!r}")
        return s


def _check_call(reader: _Reader, op: str, name: str, args: tuple, kwargs: dict) -> Any:
    """The callable for a call node, after the checks that need its arguments."""
    if op == "call_method":
        if name not in registry.METHODS:
            raise reader.fail(f"calls the method {name[:MAX_NAME]!r}, which a saved graph never calls")
        if not args or not isinstance(args[0], fx.Node):
            raise reader.fail(f"calls the method {name!r} on something that is not a graph value")
        return name
    fn = registry.FUNCTIONS.get(name)
    if fn is None:
        raise reader.fail(f"calls {name[:MAX_NAME]!r}, which is not among the ops a saved graph may call")
    if fn is builtins.getattr:
        if len(args) != 2 or kwargs or not isinstance(args[0], fx.Node) or args[1] not in registry.ATTRIBUTES:
            raise reader.fail(f"reads an attribute other than {', '.join(sorted(registry.ATTRIBUTES))}")
    if name.startswith("torch.ops.graphopt.") and "act" in (s.name for s in fn._schema.arguments):
        position = [s.name for s in fn._schema.arguments].index("act")
        act = kwargs.get("act", args[position] if position < len(args) else None)
        try:
            parse_act(act)
        except Exception as e:
            raise reader.fail(f"names the activation {str(act)[:MAX_NAME]!r}, which graphopt does not have") from e
    return fn


def graph_from_json(data: Any) -> fx.Graph:
    """Build the fx graph of a parsed graph.json, refusing anything graphopt does not write."""
    if not isinstance(data, dict) or data.get("format") != "graphopt-graph" or not isinstance(data.get("nodes"), list):
        raise LoadError("graph.json is not a graphopt graph")
    if data.get("version") != FORMAT_VERSION:
        raise LoadError(f"graph.json has format version {str(data.get('version'))[:16]}; this graphopt reads "
                        f"{FORMAT_VERSION}", hint="save the model again with this version of graphopt")
    if len(data["nodes"]) > MAX_NODES:
        raise LoadError(f"graph.json has {len(data['nodes'])} nodes (at most {MAX_NODES})")
    graph, nodes = fx.Graph(), {}
    reader = _Reader(nodes)
    outputs = 0
    for i, entry in enumerate(data["nodes"]):
        reader.where = f"graph.json node {i}"
        if not isinstance(entry, dict) or set(entry) - {"name", "op", "target", "args", "kwargs"}:
            raise reader.fail("a malformed node")
        name = reader.identifier(entry.get("name"), "node name")
        reader.where = f"graph.json node {name!r}"
        if name.startswith("_") or name in _RESERVED or name in nodes:
            raise reader.fail("a node name that is reserved or used twice")
        op, target = entry.get("op"), entry.get("target")
        args = reader.value(entry.get("args", {"tuple": []}))
        kwargs = reader.value(entry.get("kwargs", {"dict": {}}))
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise reader.fail("malformed arguments")
        if not isinstance(target, str) or len(target) > MAX_STRING:
            raise reader.fail("a node without a valid target")
        if op in ("call_function", "call_method"):
            target = _check_call(reader, op, target, args, kwargs)
        elif op == "get_attr":
            parts = target.split(".")
            if len(parts) > MAX_ATTR_PARTS or args or kwargs:
                raise reader.fail("a malformed weight read")
            for part in parts:
                reader.identifier(part, "weight name part")
                if part in _MODULE_ATTRIBUTES:
                    raise reader.fail(f"a weight named {target!r}, which clashes with a module attribute")
        elif op == "placeholder":
            reader.identifier(target, "input name")
            if args or kwargs or outputs or target == "self":  # (the name of the forward's parameter)
                raise reader.fail("a malformed input")
        elif op == "output":
            outputs += 1
            if len(args) != 1 or kwargs or outputs > 1:
                raise reader.fail("a malformed output")
        else:
            raise reader.fail(f"a node of kind {str(op)[:MAX_NAME]!r}, which a saved graph never has")
        node = graph.create_node(op, target, args, kwargs, name=name)
        if node.name != name:  # (fx renames a name it cannot use as a variable)
            raise reader.fail("a node name the generated code cannot use")
        nodes[name] = node
    if outputs != 1:
        raise LoadError("graph.json has no output node")
    try:
        graph.lint()
    except Exception as e:
        raise LoadError(f"graph.json does not form a valid graph: {e}") from e
    return graph
