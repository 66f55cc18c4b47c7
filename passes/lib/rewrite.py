"""The helpers that change a graph: new constants, carried metadata, replacing a matched chain.

Called only once a match is certain (every check done with query.py first), so that a rewrite is
never half applied.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx


def add_constant(gm: fx.GraphModule, hint: str, value: torch.Tensor, buffer: bool = True) -> str:
    """Store ``value`` on ``gm`` under a fresh name and return that name.

    A buffer (part of the state dict) by default; ``buffer=False`` for backend-specific tensors
    (prepacked weights) that are rebuilt from the buffers, never saved."""
    base = "_" + "".join(c if c.isalnum() else "_" for c in hint).strip("_")
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, value.detach(), persistent=buffer)
    return name


def as_node(gm: fx.GraphModule, ref: Any) -> Any:
    """A graph value for a recognizer's ref (patterns.py): a module's parameter path becomes a new get_attr
    node; call inside ``graph.inserting_before``."""
    return gm.graph.get_attr(ref) if isinstance(ref, str) else ref


def copy_meta(new: fx.Node, old: fx.Node, replaced: list[fx.Node]) -> None:
    """Carry shape, source and provenance over so that later passes and errors still see them."""
    for key in ("tensor_meta", "stack_trace", "module"):
        if key in old.meta:
            new.meta[key] = old.meta[key]
    for key in ("stack_trace", "module"):
        if key not in new.meta and key in replaced[0].meta:
            new.meta[key] = replaced[0].meta[key]
    new.meta["replaces"] = [r.name for r in replaced]
    # the module the fused op is named after: the first op's (the conv of conv + bn + relu)
    first = replaced[0]
    layer = first.meta.get("layer") or first.meta.get("module") or old.meta.get("layer")
    if layer:
        new.meta["layer"] = layer


def erase_chain(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Erase matched nodes last-first, once the match's output has been redirected, and the weight
    reads (get_attr) that only they used."""
    for node in reversed(nodes):
        if not node.users:
            inputs = node.all_input_nodes
            gm.graph.erase_node(node)
            for inp in inputs:
                if inp.op == "get_attr" and not inp.users:
                    gm.graph.erase_node(inp)


def replace_chain(gm: fx.GraphModule, new: fx.Node, chain: list[fx.Node]) -> None:
    """``new`` (already inserted) takes the place of a matched chain of nodes: its readers, its metadata; the
    chain goes."""
    copy_meta(new, chain[-1], chain)
    chain[-1].replace_all_uses_with(new)
    erase_chain(gm, chain)
