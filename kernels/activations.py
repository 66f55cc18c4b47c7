"""Every activation the fused ops implement, one record each: add one here and nowhere else (then its
branch in each kernel: triton/activations.apply_act).

An activation lives in an fx graph, a dump and a saved artifact as a string, ``name`` or ``name:p1[:p2]``
(format_act below; parse_act in kernels/reference.py). A record holds everything known about one name:

    params      the numeric parameters after the name, in string order
    variants    or the values of its one optional string parameter (gelu:tanh)
    reference   the formula (the oracle), fn(y, *params)
    inplace     (fn, args, kwargs) from the params, with fn(y, *args, **kwargs) applying it in place where
                torch has an in-place form (gelu has none); torch functions only, as it goes into graphs
    postop      oneDNN's fp32 post-op (attr, scalars, algorithm) from the params, and
    nan_exact   whether that post-op gives eager's result on NaN and +-inf too. oneDNN's relu and clip
                post-ops compute max(x, 0) with NaN -> 0 where PyTorch keeps NaN: relu, relu6 and hardtanh are
                not NaN-exact, and the default lowering runs them as a separate in-place op instead; their
                post-op is used only on values proven NaN-free (compiler/core/fast_path.py).
    qconv       the post-op of oneDNN's int8 convolution, or False where it has none; int8 inputs carry no
    qlinear     NaN, so relu and clip are exact there. PyTorch's int8 oneDNN ops accept a fixed list of
                post-op names per primitive (the linear's is longer); sigmoid is in neither, so an int8 op
                with a sigmoid runs it after the primitive in fp32.
    triton      the constexpr code of triton/activations.apply_act's branch and its two float parameters
    modules     nn.Module classes, each with the attributes that hold the params
    calls       functional / method names (F.x, torch.x, Tensor.x; the in-place ``x_`` forms are found in
                code), each with its arguments after the input as (position, keyword, default)
    examples    strings the tests sweep
    cap         the largest |act(y)| for any y, or inf where only |act(y)| <= |y| holds (compiler/core/finite_range.py)

``spell`` turns the values a module or call carries into the canonical string, or None when this
spelling is not one the fused ops implement (a clamp with no bound, a slope computed at run time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

PostOp = tuple[str, list, str]  # (attr, scalars, algorithm), as mkldnn / onednn pointwise ops take them

# The Triton kernels' activation codes (triton/activations.apply_act has one branch per code).
TRITON_CODES = {"none": 0, "relu": 1, "clamp": 2, "silu": 3, "sigmoid": 4, "tanh": 5, "hardswish": 6, "gelu": 7,
                "gelu_tanh": 8, "leaky_relu": 9}


@dataclass(frozen=True)
class Call:
    """Functional and method spellings of one activation, with its arguments after the input."""
    name: str  # looked up in F, torch and on Tensor, with its in-place ``name_`` form
    args: tuple[tuple[int, str, Any], ...] = ()  # (position, keyword, default)
    method: bool = False  # also a Tensor method


@dataclass(frozen=True)
class Activation:
    name: str
    reference: Callable[..., torch.Tensor]
    inplace: Callable[..., tuple[Callable, tuple, dict]] | None  # None: nothing to do
    triton: Callable[..., tuple[int, float, float]]
    params: tuple[str, ...] = ()
    variants: tuple[str, ...] = ()  # the string parameter's values other than "none" (the default, dropped)
    postop: Callable[..., PostOp] | None = None
    nan_exact: bool = True
    qconv: Callable[..., PostOp] | bool = False  # True: the same as ``postop``
    qlinear: Callable[..., PostOp] | bool = False
    modules: dict[type, tuple[str, ...]] = field(default_factory=dict)
    calls: tuple[Call, ...] = ()
    spell: Callable[..., str | None] | None = None  # default: the name (no params)
    cap: Callable[..., float] = lambda *p: math.inf  # max |act(y)| over all y; inf: |act(y)| <= |y| instead
    examples: tuple[str, ...] = ()


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def format_act(name: str, *params: float | str) -> str:
    """The canonical string for an activation: format_act('hardtanh', 0, 6) -> 'hardtanh:0.0:6.0'."""
    if not params:
        return name
    return ":".join([name, *(p if isinstance(p, str) else repr(float(p)) for p in params)])


def _clamp(lo: Any, hi: Any) -> str | None:
    """hardtanh:LO:HI for a clamp, inf for a missing bound; None without any bound or with a non-number."""
    lo = -math.inf if lo is None else _number(lo)
    hi = math.inf if hi is None else _number(hi)
    if lo is None or hi is None or (math.isinf(lo) and math.isinf(hi)):
        return None
    return format_act("hardtanh", lo, hi)


def _gelu(approximate: Any = "none") -> str | None:
    return {"none": "gelu", "tanh": "gelu:tanh"}.get(approximate)


def _leaky_relu(slope: Any) -> str | None:
    return format_act("leaky_relu", slope) if _number(slope) is not None else None


def _plain(code: str) -> Callable[..., tuple[int, float, float]]:
    return lambda: (TRITON_CODES[code], 0.0, 0.0)


def _approx(p: tuple[str, ...]) -> str:
    return p[0] if p else "none"


TABLE: tuple[Activation, ...] = (
    Activation(
        "none", reference=lambda y: y, inplace=None,
        postop=lambda: ("none", [], ""), qconv=True, qlinear=True,
        triton=_plain("none"),
        examples=("none",)),
    Activation(
        "relu", reference=F.relu, inplace=lambda: (torch.relu_, (), {}),
        postop=lambda: ("relu", [], ""), nan_exact=False, qconv=True, qlinear=True,
        triton=_plain("relu"),
        modules={nn.ReLU: ()}, calls=(Call("relu", method=True),),
        examples=("relu",)),
    Activation(
        "relu6", reference=F.relu6, inplace=lambda: (torch.clamp_, (0.0, 6.0), {}),
        postop=lambda: ("hardtanh", [0.0, 6.0], ""), nan_exact=False, qconv=True, qlinear=True,
        triton=lambda: (TRITON_CODES["clamp"], 0.0, 6.0), cap=lambda: 6.0,
        modules={nn.ReLU6: ()}, calls=(Call("relu6"),),
        examples=("relu6",)),
    Activation(  # also every clamp with a bound (inf for the missing one)
        "hardtanh", params=("lo", "hi"), reference=lambda y, lo, hi: torch.clamp(y, float(lo), float(hi)),
        inplace=lambda lo, hi: (torch.clamp_, (float(lo), float(hi)), {}),
        postop=lambda lo, hi: ("hardtanh", [float(lo), float(hi)], ""), nan_exact=False, qconv=True, qlinear=True,
        triton=lambda lo, hi: (TRITON_CODES["clamp"], float(lo), float(hi)),
        cap=lambda lo, hi: max(abs(float(lo)), abs(float(hi))),
        modules={nn.Hardtanh: ("min_val", "max_val")}, spell=_clamp,
        calls=(Call("hardtanh", ((1, "min_val", -1.0), (2, "max_val", 1.0))),
               Call("clamp", ((1, "min", None), (2, "max", None)), method=True)),
        examples=("hardtanh:-0.5:0.75",)),
    Activation(
        "silu", reference=F.silu, inplace=lambda: (F.silu, (), {"inplace": True}),
        postop=lambda: ("swish", [], ""), qconv=True, qlinear=True,
        triton=_plain("silu"),
        modules={nn.SiLU: ()}, calls=(Call("silu"),),
        examples=("silu",)),
    Activation(
        "sigmoid", reference=torch.sigmoid, inplace=lambda: (torch.sigmoid_, (), {}),
        postop=lambda: ("sigmoid", [], ""),
        triton=_plain("sigmoid"), cap=lambda: 1.0,
        modules={nn.Sigmoid: ()}, calls=(Call("sigmoid", method=True),),
        examples=("sigmoid",)),
    Activation(
        "tanh", reference=torch.tanh, inplace=lambda: (torch.tanh_, (), {}),
        postop=lambda: ("tanh", [], ""), qlinear=True,
        triton=_plain("tanh"), cap=lambda: 1.0,
        modules={nn.Tanh: ()}, calls=(Call("tanh", method=True),),
        examples=("tanh",)),
    Activation(
        "hardswish", reference=F.hardswish, inplace=lambda: (F.hardswish, (), {"inplace": True}),
        postop=lambda: ("hardswish", [], ""), qconv=True, qlinear=True,
        triton=_plain("hardswish"),
        modules={nn.Hardswish: ()}, calls=(Call("hardswish"),),
        examples=("hardswish",)),
    Activation(  # "gelu" (erf) or "gelu:tanh"; in place through aten (F.gelu has no inplace flag)
        "gelu", variants=("tanh",), reference=lambda y, *p: F.gelu(y, approximate=_approx(p)),
        inplace=lambda *p: (torch.ops.aten.gelu_.default, (), {"approximate": _approx(p)}),
        postop=lambda *p: ("gelu", [], _approx(p)), qlinear=True,
        triton=lambda *p: (TRITON_CODES["gelu_tanh" if _approx(p) == "tanh" else "gelu"], 0.0, 0.0),
        modules={nn.GELU: ("approximate",)}, calls=(Call("gelu", ((1, "approximate", "none"),)),), spell=_gelu,
        examples=("gelu", "gelu:tanh")),
    Activation(
        "leaky_relu", params=("slope",), reference=lambda y, s: F.leaky_relu(y, float(s)),
        inplace=lambda s: (F.leaky_relu_, (float(s),), {}),
        postop=lambda s: ("leaky_relu", [float(s)], ""), qlinear=True,
        triton=lambda s: (TRITON_CODES["leaky_relu"], float(s), 0.0),
        modules={nn.LeakyReLU: ("negative_slope",)}, calls=(Call("leaky_relu", ((1, "negative_slope", 0.01),)),),
        spell=_leaky_relu,
        examples=("leaky_relu:0.1",)),
)
ACTS: dict[str, Activation] = {a.name: a for a in TABLE}
ACTIVATIONS = tuple(sorted(ACTS))
EXAMPLES: tuple[str, ...] = tuple(e for a in TABLE for e in a.examples)  # every kernel test sweeps these


# ---------------------------------------------------------------- spellings, generated from the records


def _spellings() -> tuple[dict[type, tuple[Activation, tuple[str, ...]]], dict[Callable, tuple[Activation, Call]],
                          dict[str, tuple[Activation, Call]]]:
    modules, functions, methods = {}, {}, {}
    for a in TABLE:
        for cls, attrs in a.modules.items():
            modules[cls] = (a, attrs)
        for call in a.calls:
            for name in (call.name, call.name + "_"):
                for namespace in (F, torch):
                    fn = getattr(namespace, name, None)
                    if callable(fn) and not name.startswith("_"):
                        functions[fn] = (a, call)
                if call.method and hasattr(torch.Tensor, name):
                    methods[name] = (a, call)
    return modules, functions, methods


MODULES, FUNCTIONS, METHODS = _spellings()


def spell(a: Activation, values: tuple) -> str | None:
    """The canonical act string of ``a`` for the values its spelling carries, or None."""
    return a.spell(*values) if a.spell is not None else a.name
