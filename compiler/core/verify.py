"""Numerics oracles, and the finder of the first node whose value went wrong.

    exact   every output bitwise equal to the graph before the pass (NaN where it had NaN)
    fp32    against a float64 run of the captured model:  |y - y64| <= 3 * |y_eager - y64| + 4 * eps * max|y64|
            per output, over the positions where eager's output is finite; where eager's output
            is NaN or +-inf the new one must be the same non-finite value.
    int8    signal-to-quantization-noise ratio against a reference run, per output, at least a floor (dB)

The float64 reference runs node by node: a node that cannot run in float64 (an op without a
float64 kernel, a forward that casts to float32 itself) runs at its own precision on rounded
inputs and its result is widened again. The rule then allows what a float32 step can add
(``REFERENCE_SLACK`` eps per such reference), and says so in its message.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from graphopt.compiler.core.capture import fresh


def _flat(outputs: Any) -> tuple[list, Any]:
    return tree_flatten(outputs)


def _double(v: Any) -> Any:
    return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


REFERENCE_SLACK = 64  # eps * max|y| more, where the float64 reference had to run some nodes in float32


def same_bits(a: Any, b: Any) -> bool:
    """Bitwise equality of two values of any kind: tensors (NaN equal to NaN), numbers, tuples and lists of them."""
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        fa, sa = tree_flatten(a)
        fb, sb = tree_flatten(b)
        return len(fa) == len(fb) and _structure(sa) == _structure(sb) and all(map(same_bits, fa, fb))
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return False
        return bool(a == b) if type(a) is type(b) else False
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        nan = a.isnan()
        return bool(torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan]))
    return bool(torch.equal(a, b))


def max_abs_diff(a: Any, b: Any) -> float:
    if not isinstance(a, torch.Tensor) or not a.is_floating_point() or a.numel() == 0:
        return 0.0
    finite = a.isfinite() & b.isfinite()
    return float((a[finite].double() - b[finite].double()).abs().max()) if finite.any() else 0.0


def _structure(spec: Any) -> str:
    """A pytree spec as text, fx's immutable containers read as the plain ones."""
    return str(spec).replace("immutable_dict", "dict").replace("immutable_list", "list")


def _depthwise64(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Any, padding: Any,
                 dilation: Any) -> torch.Tensor:
    """A depthwise conv (one filter per channel) in float64 as a sum of shifted slices: aten's float64 depthwise
    kernel is unvectorized and 50-100x slower than this."""
    pair = lambda v: (v, v) if isinstance(v, int) else (int(v[0]), int(v[-1]))  # noqa: E731
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    kh, kw = weight.shape[2:]
    n, c, h, w = x.shape
    p, q = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    xp = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    out = torch.zeros(n, c, p, q, dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            window = xp[:, :, i * dh: i * dh + sh * (p - 1) + 1: sh, j * dw: j * dw + sw * (q - 1) + 1: sw]
            out += window * weight[:, 0, i, j].view(1, c, 1, 1)
    return out + bias.view(1, c, 1, 1) if bias is not None else out


def _depthwise_args(interp: fx.Interpreter, n: fx.Node) -> tuple | None:
    """(x, weight, bias, stride, padding, dilation) when ``n`` is a float64 depthwise conv2d with zero padding."""
    if n.op == "call_module":
        m = interp.fetch_attr(n.target)
        if type(m) is not torch.nn.Conv2d or m.padding_mode != "zeros" or isinstance(m.padding, str):
            return None
        x = interp.env[n.args[0]] if isinstance(n.args[0], fx.Node) else None
        spec = (x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
    elif n.op == "call_function" and n.target is torch.conv2d:
        args, kwargs = interp.fetch_args_kwargs_from_env(n)
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        values = dict(zip(names, (None, None, None, 1, 0, 1, 1)), **dict(zip(names, args)), **kwargs)
        if isinstance(values["padding"], str):
            return None
        spec = tuple(values[k] for k in names)
    else:
        return None
    x, weight, groups = spec[0], spec[1], spec[6]
    if (not isinstance(x, torch.Tensor) or x.dtype != torch.float64 or x.dim() != 4 or groups == 1
            or groups != x.shape[1] or weight.shape[0] != groups or weight.dtype != torch.float64):
        return None
    return spec[:6]


class _Float64(fx.Interpreter):
    """Runs a graph in float64, node by node; a node that fails in float64 runs on its inputs rounded to the
    dtypes the float32 graph had there (``meta['tensor_meta']``, else float32), its result widened again."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.narrowed: list[str] = []

    def run_node(self, n: fx.Node) -> Any:
        depthwise = _depthwise_args(self, n)
        if depthwise is not None:
            return _depthwise64(*depthwise)
        try:
            return super().run_node(n)
        except Exception:
            if n.op not in ("call_function", "call_method", "call_module"):
                raise
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        narrow = lambda v: v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.float64 else v  # noqa: E731
        args, kwargs = fx.node.map_aggregate(args, narrow), fx.node.map_aggregate(kwargs, narrow)
        self.narrowed.append(n.name)
        out = getattr(self, n.op)(n.target, args, kwargs)
        return fx.node.map_aggregate(out, _double)


@dataclass
class Oracle:
    inputs: tuple
    eager: list  # flattened outputs of the captured model
    spec: Any
    ref64: list | None  # the same in float64 (see _Float64); None where even that could not run
    narrowed: list[str]  # the nodes the float64 reference had to run in float32

    @classmethod
    def build(cls, gm: fx.GraphModule, inputs: tuple) -> "Oracle":
        with torch.no_grad():
            eager, spec = _flat(gm(*fresh(inputs)))
            reference = _Float64(copy.deepcopy(gm).double())
            try:
                ref64, _ = _flat(reference.run(*[_double(i) for i in fresh(inputs)]))
            except Exception:  # not even node by node: eager is the reference, with the float32 slack
                ref64 = None
        return cls(inputs, eager, spec, ref64, reference.narrowed)

    @property
    def reference_name(self) -> str:
        if self.ref64 is None:
            return "eager (the model does not run in float64)"
        if self.narrowed:
            return f"float64 (with {len(self.narrowed)} node(s) in float32: {', '.join(self.narrowed[:3])})"
        return "float64"

    def interface_error(self, outputs: list, spec: Any) -> str | None:
        if _structure(spec) != _structure(self.spec):
            return f"the output structure changed: {spec} instead of {self.spec}"
        for i, (new, old) in enumerate(zip(outputs, self.eager)):
            if isinstance(old, torch.Tensor) and (not isinstance(new, torch.Tensor) or new.shape != old.shape
                                                  or new.dtype != old.dtype):
                got = f"{tuple(new.shape)} {new.dtype}" if isinstance(new, torch.Tensor) else type(new).__name__
                return f"output {i} changed from {tuple(old.shape)} {old.dtype} to {got}"
        return None

    def fp32_error(self, outputs: list) -> str | None:
        for i, (new, old) in enumerate(zip(outputs, self.eager)):
            if not isinstance(old, torch.Tensor) or not old.is_floating_point():
                if not same_bits(new, old):
                    return f"output {i} (not floating point) changed"
                continue
            ref = self.ref64[i] if self.ref64 is not None else old.double()
            finite = old.isfinite()
            if not torch.equal(new.isfinite(), finite) or not same_bits(new[~finite], old[~finite]):
                return f"output {i}: NaN/inf positions differ from eager's"
            if not finite.any():
                continue
            eps = torch.finfo(old.dtype).eps
            slack = 4 if self.ref64 is not None and not self.narrowed else 4 + REFERENCE_SLACK
            err_new = float((new[finite].double() - ref[finite]).abs().max())
            err_eager = float((old[finite].double() - ref[finite]).abs().max())
            allowed = 3 * err_eager + slack * eps * float(ref[finite].abs().max())
            if err_new > allowed:
                return (f"output {i}: error {err_new:.3g} against {self.reference_name} exceeds {allowed:.3g} "
                        f"(3x eager's {err_eager:.3g})")
        return None

    def int8_error(self, outputs: list, floor_db: float, reference: list | None = None,
                   margin_db: float | None = None) -> str | None:
        """Each floating output's SQNR against ``reference`` (default: the captured model's) must reach the floor.

        With ``margin_db`` (a lowering, checked against the int8 graph it lowers), an output under the floor still
        passes where it is as accurate as the reference: its SQNR against the captured model's output within
        ``margin_db`` of the reference's own. Two int8 kernels that round a requantization differently can only
        agree about as well as either agrees with fp32: on a model whose int8 output is itself at 24 dB (timm's
        EfficientNet-B0 with its random initialization), the lowering read 27 dB against the reference, under
        the floor, and 24.2 dB against fp32, where the reference read 23.9."""
        for i, (new, old) in enumerate(zip(outputs, reference or self.eager)):
            if isinstance(old, torch.Tensor) and old.is_floating_point():
                db = sqnr(old, new)
                if db >= floor_db:
                    continue
                problem = f"output {i}: SQNR {db:.1f} dB against the reference is below the floor of {floor_db:.1f} dB"
                if margin_db is None or reference is None:
                    return problem
                ours, theirs = sqnr(self.eager[i], new), sqnr(self.eager[i], old)
                if not (math.isfinite(theirs) and ours >= theirs - margin_db):  # (a non-finite reference: no pass)
                    return (f"{problem}, and {ours:.1f} dB against the fp32 model, where the reference reads "
                            f"{theirs:.1f} (more than {margin_db:.1f} dB better)")
            elif not same_bits(new, old):
                return f"output {i} (not floating point) changed"
        return None

    def max_error(self, outputs: list) -> float:
        return max((max_abs_diff(n, o) for n, o in zip(outputs, self.eager)), default=0.0)


def sqnr(reference: torch.Tensor, value: torch.Tensor) -> float:
    """10 log10(sum ref^2 / sum (ref - value)^2) in dB over the positions finite in both; inf when equal."""
    ref, val = reference.detach().double().flatten(), value.detach().double().flatten()
    finite = ref.isfinite() & val.isfinite()
    if not bool(torch.equal(finite, ref.isfinite())):
        return float("-inf")  # a value went non-finite where the reference is finite
    return sqnr_db(*sqnr_terms(ref[finite], val[finite]))


def sqnr_terms(reference: torch.Tensor, value: torch.Tensor) -> tuple[float, float]:
    """(sum ref^2, sum (ref - value)^2) in float64: add them up over batches, then ``sqnr_db``."""
    ref, val = reference.detach().double(), value.detach().double()
    return float((ref ** 2).sum()), float(((ref - val) ** 2).sum())


def sqnr_db(signal: float, noise: float) -> float:
    """The one SQNR formula: 10 log10(signal / noise) in dB, inf when the noise is 0."""
    return float("inf") if noise == 0.0 else 10.0 * math.log10(max(signal, 1e-30) / noise)


class _Recording(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n.name] = out
        return out


def record_values(gm: fx.GraphModule, inputs: tuple) -> dict[str, Any]:
    rec = _Recording(gm)
    with torch.no_grad():
        rec.run(*fresh(inputs))
    return rec.values


def _close(new: Any, old: Any, exact: bool) -> bool:
    if isinstance(new, (tuple, list)) or isinstance(old, (tuple, list)):
        fn, sn = tree_flatten(new)
        fo, so = tree_flatten(old)
        return len(fn) == len(fo) and _structure(sn) == _structure(so) and all(
            _close(a, b, exact) for a, b in zip(fn, fo))
    if exact or not isinstance(new, torch.Tensor) or not new.is_floating_point():
        return same_bits(new, old)
    if not isinstance(old, torch.Tensor) or new.shape != old.shape:
        return False
    new, old = new.detach(), old.detach()  # (a value that requires grad: float() of it warns)
    scale = float(old[old.isfinite()].abs().max()) if old.isfinite().any() else 1.0
    return bool(torch.isclose(new, old, rtol=1e-4, atol=1e-5 * scale + 1e-7, equal_nan=True).all())


def first_divergence(before: fx.GraphModule, after: fx.GraphModule, inputs: tuple, exact: bool) -> fx.Node | None:
    """The first node of ``after`` whose value differs from its counterpart in ``before``.

    A node's counterpart is the node of the same name, or, for a node a pass created, the last
    node it replaces (``meta['replaces']``)."""
    old, new = record_values(before, inputs), record_values(after, inputs)
    for node in after.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        name = node.name if node.name in old else (node.meta.get("replaces") or [None])[-1]
        if name in old and not _close(new[node.name], old[name], exact):
            return node
    return None
