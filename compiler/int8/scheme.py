"""Which int8 weight scheme a graph uses, and whether a saved one runs exactly on this machine.

    s8   weight codes in [-127, 127]: exact wherever int8 dot products are exact (VNNI, AMX, CUDA)
    s7   weight codes in [-63, 63]:   exact on every x86 CPU, including those whose int8 arithmetic
         (vpmaddubsw, without VNNI / AMX) saturates an int16 sum of two uint8 x int8 products

optimize() picks the scheme once, from the backend and the CPU (``choose``), and the int8 report
names it. The weights themselves are the record in a saved module: every nonzero s8 channel has a
code of magnitude 127, no s7 code exceeds 63, so ``scheme_of`` reads the scheme off any portable
graph, saved, loaded or fresh. On a CPU without VNNI / AMX, an s8 layer cannot run on oneDNN's
int8 exactly: lower_int8_onednn runs it as the fp32 op on the dequantized weights instead (the
saved numbers to fp32 rounding, at fp32 speed), and the loader says so (``warn_on_load``).
"""

from __future__ import annotations

import warnings

import torch.fx as fx

from graphopt.kernels.ops import OPS
from graphopt.kernels.signatures import signature_of
from graphopt.passes.lib.query import constant_value

_INT8_LAYERS = ("qconv2d_act", "qlinear_act")


def choose(backend: str) -> str:
    """The scheme optimize() quantizes with for ``backend`` on this machine."""
    if backend != "cpu":
        return "s8"  # CUDA's int8 dot products (and the reference) are exact on the full range
    from graphopt.kernels.cpu import int8_scheme

    return int8_scheme()


def scheme_of(portable: fx.GraphModule) -> str | None:
    """"s8" or "s7" for a graph with int8 layers (read off their weight codes), None for an fp32 graph."""
    targets = {OPS[name] for name in _INT8_LAYERS}
    widest = None
    for node in portable.graph.nodes:
        if node.op == "call_function" and node.target in targets:
            weight = constant_value(portable, signature_of(node).weight)
            code = int(weight.abs().max()) if weight is not None and weight.numel() else 0
            widest = max(widest or 0, code)
    if widest is None:
        return None
    return "s8" if widest > 63 else "s7"


def check_loaded(scheme: str | None) -> str | None:
    """None if a module quantized with ``scheme`` runs exactly on this CPU's int8; else what to tell the user."""
    if scheme != "s8" or choose("cpu") == "s8":
        return None
    return ("this int8 module was quantized with 8-bit weights (scheme s8) for a CPU with int8 dot-product "
            "instructions (VNNI / AMX); this CPU's int8 arithmetic would saturate on them, so its int8 layers run "
            "as fp32 layers on the dequantized weights: the same numbers, at fp32 speed. Run optimize() on this "
            "machine again for int8 speed here (it picks 7-bit weights, scheme s7, which are exact on every CPU)")


def warn_on_load(portable: fx.GraphModule, backend: str = "cpu") -> str | None:
    """For the loader, before it lowers ``portable`` for ``backend``: warn (and return the text) when this CPU
    cannot run the saved int8 weights exactly; the lowering then runs those layers in fp32 by itself."""
    if backend != "cpu":
        return None
    text = check_loaded(scheme_of(portable))
    if text is not None:
        warnings.warn(text, UserWarning, stacklevel=2)
    return text

