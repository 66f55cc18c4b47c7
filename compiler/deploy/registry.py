"""The closed set of callables a saved graph may name, and how each is checked.

A saved folder comes from someone else, who controls every byte of it. So the loader never
resolves a name by walking attributes or importing: every name in graph.json must be a key of
``FUNCTIONS`` (call_function) or ``METHODS`` (call_method), both written out below. What is here
computes on tensors and numbers only: no file, I/O, printing, process-state, random-seed or
thread-count op; no callable that takes or returns arbitrary objects (``operator.call``,
``attrgetter``, ``methodcaller``, ``setitem``, ...); the one attribute read, ``getattr``, takes a
name from ``ATTRIBUTES`` only, checked before the graph is built.
"""

from __future__ import annotations

import builtins
import math
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F

import graphopt.kernels.ops  # noqa: F401  (registers torch.ops.graphopt)

# torch.<name>: tensor math, shape and creation ops (creation sizes are bounded by the shape check on load)
_TORCH = """
abs absolute acos acosh adaptive_avg_pool1d adaptive_max_pool1d add addbmm addcdiv addcmul addmm addmv all amax amin
any arange argmax argmin argsort asin asinh atan atan2 atanh avg_pool1d baddbmm batch_norm bitwise_and bitwise_not
bitwise_or bitwise_xor bmm broadcast_to bucketize cat ceil celu channel_shuffle chunk clamp clamp_ clamp_max clamp_min
clip clone concat concatenate conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d cos cosh
cosine_similarity cummax cummin cumprod cumsum deg2rad diag diagonal diff div divide dot dropout dsplit einsum
embedding empty_like eq erf erfc exp exp2 expm1 eye flatten flip fliplr flipud float_power floor floor_divide fmax fmin
fmod frac full full_like gather ge gelu group_norm gt hardshrink heaviside hsplit hstack hypot index_select
instance_norm isclose isfinite isinf isnan kron layer_norm le lerp log log10 log1p log2 log_softmax logaddexp
logical_and logical_not logical_or logical_xor logit logsumexp lt masked_fill matmul max max_pool1d max_pool2d maximum
mean median min minimum mm moveaxis movedim mul multiply mv nan_to_num nanmean narrow ne neg negative norm numel ones
ones_like outer permute pixel_shuffle pixel_unshuffle polar pow prelu prod rad2deg ravel reciprocal relu relu_ remainder
repeat_interleave reshape roll rot90 round rsqrt rsub scatter scatter_add select selu sgn sigmoid sigmoid_ sign sin sinh
softmax sort split sqrt square squeeze stack std std_mean sub subtract sum swapaxes swapdims t take_along_dim tan tanh
tanh_ tensor_split threshold tile topk trace transpose tril triu true_divide trunc unbind unflatten unsqueeze var
var_mean vsplit vstack where xlogy zeros zeros_like
"""

# torch.nn.functional.<name>
_FUNCTIONAL = """
adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d
affine_grid alpha_dropout avg_pool1d avg_pool2d avg_pool3d batch_norm bilinear celu conv1d conv2d conv3d
conv_transpose1d conv_transpose2d conv_transpose3d cosine_similarity dropout dropout1d dropout2d dropout3d elu
embedding feature_alpha_dropout fold gelu glu grid_sample group_norm hardshrink hardsigmoid hardswish hardtanh
instance_norm interpolate layer_norm leaky_relu linear local_response_norm log_softmax logsigmoid lp_pool1d lp_pool2d
max_pool1d max_pool2d max_pool3d mish normalize one_hot pad pairwise_distance pixel_shuffle pixel_unshuffle prelu relu
relu6 rms_norm scaled_dot_product_attention selu sigmoid silu softmax softmin softplus softshrink softsign tanh
tanhshrink threshold unfold upsample upsample_bilinear upsample_nearest
"""

# Tensor methods (call_method); the receiver must be a graph value, never a literal
_METHODS = """
abs add add_ addmm all amax amin any argmax argmin bmm ceil chunk clamp clamp_ contiguous cos cumsum detach dim div
div_ double eq exp expand expand_as flatten flip float floor gather ge gelu gt half index_select int is_contiguous
le log log_softmax long lt masked_fill masked_fill_ matmul max mean min mm mul mul_ narrow ne neg new_ones new_zeros
norm numel permute
pow ravel relu relu_ repeat repeat_interleave reshape reshape_as roll round rsqrt select sigmoid sigmoid_ sign sin size
softmax split sqrt square squeeze std sub sub_ sum t tanh tanh_ tile to transpose tril triu type_as unbind unflatten
unsqueeze var view view_as where zero_
"""

# attributes a graph may read with getattr(x, "name"): shape metadata only
ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "T", "mT"})

# Python's operators on tensors and numbers; no shifts (they turn small ints into huge ones), and the
# load-time shape check refuses a pow of two ints with a large exponent and sequences grown past a bound
_OPERATORS = """
add sub mul truediv floordiv mod pow neg pos abs eq ne lt le gt ge and_ or_ xor not_ invert getitem matmul
iadd isub imul itruediv
"""
_MATH = "sqrt floor ceil exp log"


def _key(fn: Any) -> str:
    """The dotted name a callable is saved under."""
    if isinstance(fn, torch._ops.OpOverload):
        return f"torch.ops.{fn.namespace}.{fn._opname}.{fn._overloadname}"
    module = getattr(fn, "__module__", None) or ""
    return f"{'operator' if module == '_operator' else module}.{fn.__name__}"


def _build() -> dict[str, Callable]:
    table: dict[str, Callable] = {}

    def add(fn: Any, name: str | None = None) -> None:
        if fn is not None:
            table[name or _key(fn)] = fn

    for name in _TORCH.split():
        fn = getattr(torch, name, None)
        if fn is not None:
            table[f"torch.{name}"] = fn
            add(fn)  # (the same builtin may report another module, e.g. torch._C._VariableFunctions)
    for name in _FUNCTIONAL.split():
        add(getattr(F, name, None))
    for name in _OPERATORS.split():
        add(getattr(operator, name), f"operator.{name}")
    for name in _MATH.split():
        add(getattr(math, name), f"math.{name}")
    table["torch._assert"] = torch._assert
    table["builtins.getattr"] = builtins.getattr
    for name in dir(torch.ops.graphopt):
        packet = getattr(torch.ops.graphopt, name)
        if isinstance(packet, torch._ops.OpOverloadPacket):
            for overload in packet.overloads():
                add(getattr(packet, overload))
    return table


FUNCTIONS: dict[str, Callable] = _build()
_NAMES: dict[int, str] = {}
for _name, _fn in FUNCTIONS.items():
    _NAMES.setdefault(id(_fn), _name)
METHODS = frozenset(_METHODS.split())


def name_of(fn: Any) -> str | None:
    """The name ``fn`` is saved under, or None if a saved graph may not call it."""
    name = _NAMES.get(id(fn))
    return name if name is not None and FUNCTIONS[name] is fn else None
