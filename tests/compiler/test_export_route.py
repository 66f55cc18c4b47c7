"""Models symbolic tracing cannot follow take the torch.export route: optimized, eager's answers at
another batch size, saved and reloaded bitwise, exported to ONNX, quantized to int8."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from graphopt import CaptureError, load, optimize
from graphopt.compiler.core.capture import capture
from tests.helpers import graphopt_calls, randomize_bn
from tests.zoo_transformers import TRANSFORMER_ZOO


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(TRANSFORMER_ZOO[name][0]()).eval()


def _close(got, want) -> None:
    got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", TRANSFORMER_ZOO)
def test_route_eager_answers_and_bitwise_reload(name, tmp_path):
    model, inputs = _model(name), TRANSFORMER_ZOO[name][1]
    opt = optimize(model, inputs(2))
    route = capture(model, inputs(2)).meta["capture_route"]
    assert route == ("symbolic_trace" if name == "timm_style_cnn" else "torch.export")
    assert opt.report[0].name == f"capture ({route})"
    with torch.no_grad():
        for n in (2, 3):
            x = inputs(n)
            _close(opt(*x), model(*x))
        loaded = load(opt.save(tmp_path / "saved"))
        x = inputs(3)
        got, want = loaded(*x), opt(*x)
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert torch.equal(g, w)


@pytest.mark.parametrize("name", ["bert_style", "vit_style"])
def test_linear_layers_fuse_on_the_export_route(name):
    model, inputs = _model(name), TRANSFORMER_ZOO[name][1]
    rewrites = {r.name: r.rewrites for r in optimize(model, inputs(2)).report}
    assert rewrites["fuse_linear_act"] >= 4


def test_gpt2s_written_out_gelu_fuses_into_its_linear_on_the_export_route():
    model, inputs = _model("gpt2_style"), TRANSFORMER_ZOO["gpt2_style"][1]
    opt = optimize(model, inputs(2))
    assert {r.name: r.rewrites for r in opt.report}["recognize_activations"] == 2  # one per block
    assert [n.args[3] for n in graphopt_calls(opt.portable, "linear_act")].count("gelu:tanh") == 2
    x = inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(opt(*x), model(*x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["bert_style", "gpt2_style"])
def test_export_route_models_export_to_onnx(name, tmp_path):
    pytest.importorskip("onnxruntime")
    from graphopt import export_onnx

    model, inputs = _model(name), TRANSFORMER_ZOO[name][1]
    opt = optimize(model, inputs(2))
    export_onnx(opt, inputs(2), tmp_path / "m.onnx")  # checked in ONNX Runtime against PyTorch inside
    assert (tmp_path / "m.onnx").stat().st_size > 0


@pytest.mark.parametrize("name", ["bert_style", "vit_style"])
def test_export_route_models_quantize_to_int8(name, monkeypatch):
    from graphopt.compiler.core.verify import sqnr

    monkeypatch.setattr("graphopt.compiler.int8.quantize.MIN_INT8_MACS", 0)
    model, inputs = _model(name), TRANSFORMER_ZOO[name][1]
    q = optimize(model, inputs(2), quantize="int8", calibration=[inputs(2) for _ in range(8)], progress=False)
    assert any(layer["int8"] for layer in q.int8_report.layers)
    x = inputs(2)
    with torch.no_grad():
        got, want = q(*x), model(*x)
    got, want = (got[0], want[0]) if isinstance(want, tuple) else (got, want)
    assert sqnr(want, got) >= 25.0


def test_a_move_to_the_inputs_device_is_raised_to_a_call_tensor_to_takes(tmp_path):
    # Hugging Face's GPT-2: position_embeds.to(inputs_embeds.device); torch.export records aten.to.dtype_layout,
    # whose layout= Tensor.to does not take, and an aten._assert_tensor_metadata check beside it, which the saver
    # refused (the module checks its inputs' dtype and device itself)
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.positions = nn.Embedding(10, 4)

        def forward(self, x):
            shape = list(x.shape)  # (item assignment: the export route)
            shape[-1] = 4
            return (x + self.positions(torch.arange(x.shape[1])).to(x.device)).reshape(shape)

    m, x = M().eval(), torch.randn(2, 3, 4)
    opt = optimize(m, (x,))
    torch.testing.assert_close(opt(x), m(x))
    other = torch.randn(5, 3, 4)  # another batch size
    torch.testing.assert_close(opt(other), m(other))
    assert not [n for n in opt.portable.graph.nodes if "assert" in str(n.target)]
    loaded = load(opt.save(tmp_path / "saved"))
    assert torch.equal(loaded(other), opt(other))


def test_a_model_neither_route_captures_names_both_reasons():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:          # control flow on a value: neither route can follow it
                return x.relu()
            return x.sigmoid()

    with pytest.raises(CaptureError) as info:
        optimize(DataDependent().eval(), (torch.randn(2, 3),))
    assert "cannot trace" in str(info.value) and "torch.export cannot capture it either" in str(info.value)


class DynamicCache:
    """Stands in for transformers' cache object, no pytree: GPT-2 and the other decoders return one by default."""

    def __init__(self, *tensors):
        self.layers = list(tensors)


def test_a_model_returning_a_cache_object_is_told_to_return_tensors_only():
    """Neither route captures an output that holds an object torch.export cannot flatten (transformers 5's GPT2Model
    with its default use_cache=True, found by a model-zoo run): the hint names the object and the switch."""
    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lin = nn.Embedding(100, 16), nn.Linear(16, 16)

        def forward(self, ids):
            h = self.lin(self.emb(ids))
            return h, DynamicCache(h)

    with pytest.raises(CaptureError) as info:
        optimize(Decoder().eval(), (torch.randint(0, 100, (2, 8)),), progress=False)
    assert "output holds DynamicCache" in info.value.hint and "model.config.use_cache = False" in info.value.hint


class ShapeBranch(nn.Module):
    """Python on a size (symbolic tracing cannot follow it: the torch.export route), then a reshape by sizes:
    like timm's MobileViT unfold."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        x = self.conv(x)
        b, c, h, w = x.shape
        if h % 2:
            raise ValueError("odd")
        return x.reshape(b, c, h // 2, 2, w // 2, 2).sum((3, 5))


def test_a_batch_torch_export_keeps_fixed_is_refused_by_name_at_another_size_and_after_a_reload(tmp_path):
    """torch.export keeps a batch of 1 static (and a model may fix its batch): the graph then reshapes to the
    example's batch, and another batch size failed inside the generated code with a RuntimeError (Hugging
    Face's ViT and CLIP, Whisper's encoder, timm's MobileViT at batch 1, found by a model-zoo run)."""
    from graphopt import InputError

    torch.manual_seed(0)
    model = ShapeBranch().eval()
    one = optimize(model, (torch.randn(1, 3, 8, 8),), progress=False)
    assert one.report[0].name == "capture (torch.export)"
    assert one.input_specs[0]["batch"] == "fixed"
    one.save(tmp_path / "one")
    for module in (one, load(tmp_path / "one")):
        x = torch.randn(1, 3, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(module(x), model(x))
            with pytest.raises(InputError, match="batch size 1 only"):
                module(torch.randn(2, 3, 8, 8))
    if one.engine_plan is not None and one.engine_plan.engine != "graphopt":
        assert not one.engine_plan.other_batches and "fixed" in one.engine_plan.fixed_batch
    two = optimize(model, (torch.randn(2, 3, 8, 8),), engines="graphopt", progress=False)
    assert "batch" not in two.input_specs[0]
    with torch.no_grad():
        for batch in (1, 3):
            x = torch.randn(batch, 3, 8, 8)
            torch.testing.assert_close(two(x), model(x))


class ShapeBranchPooled(ShapeBranch):
    """The same branch on a size, then nothing that depends on the batch."""

    def forward(self, x):
        x = self.conv(x)
        if x.shape[2] % 2:
            raise ValueError("odd")
        return x.mean((2, 3))


def test_a_static_batch_whose_graph_runs_at_any_batch_size_is_not_fixed():
    """torch.export keeps a batch of 1 static whatever the model does with it; where the graph gives the model's
    answers at another batch size (checked at capture), every batch size runs, as before."""
    torch.manual_seed(0)
    model = ShapeBranchPooled().eval()
    opt = optimize(model, (torch.randn(1, 3, 8, 8),), engines="graphopt", progress=False)
    assert opt.report[0].name == "capture (torch.export)"
    assert "batch" not in opt.input_specs[0]
    with torch.no_grad():
        for batch in (1, 2, 5):
            x = torch.randn(batch, 3, 8, 8)
            torch.testing.assert_close(opt(x), model(x))


class Gather(nn.Module):
    """Tensor indexing on the export route (transformers' mask building: every Hugging Face text model)."""

    def forward(self, x):
        if x.shape[1] > 1:
            order = torch.arange(x.shape[1]).flip(0)
            return x[:, order] * 2 + x[order % 2][:, None, :3].sum()
        return x


def test_tensor_indexing_on_the_export_route_is_a_getitem_and_saves(tmp_path):
    """aten.index.Tensor stayed as it was, which save() refused (not an op a saved graph may call): Hugging
    Face's BERT, GPT-2, DistilBERT, RoBERTa and T5 encoder could not be saved (found by a model-zoo run)."""
    import operator

    model, x = Gather().eval(), torch.randn(3, 5)
    opt = optimize(model, (x,), engines="graphopt", progress=False)
    assert opt.report[0].name == "capture (torch.export)"
    calls = [n.target for n in opt.portable.graph.nodes if n.op == "call_function"]
    assert operator.getitem in calls and torch.ops.aten.index.Tensor not in calls
    opt.save(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))
        assert torch.equal(load(tmp_path / "m")(x), opt(x))


class ActAfterBranch(nn.Module):
    """A conv and an activation module behind Python on a size (the torch.export route)."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.conv, self.act = nn.Conv2d(3, 8, 3), act

    def forward(self, x):
        if x.shape[-1] % 2 == 0:
            x = x + 1
        return self.act(self.conv(x)).mean((2, 3))


@pytest.mark.parametrize("act, fused", [(nn.SiLU(), True), (nn.SiLU(inplace=True), True),
                                        (nn.Hardswish(inplace=True), True), (nn.ELU(inplace=True), False),
                                        (nn.LeakyReLU(0.2, inplace=True), True), (nn.Hardtanh(-2.0, 3.0), True),
                                        (nn.AdaptiveAvgPool2d(2), False)])
def test_activations_on_the_export_route_are_fs_calls_that_fuse_and_save(act, fused, tmp_path):
    """torch.export records aten.silu_ and the like, which had no torch-level spelling but torch._C._nn's: no op a
    saved graph may call (timm's MobileViT could not be saved, found by a model-zoo run), nor one the fusion
    passes knew (the conv ran its activation as a second op)."""
    torch.manual_seed(0)
    model, x = ActAfterBranch(act).eval(), torch.randn(2, 3, 8, 8)
    opt = optimize(model, (x,), engines="graphopt", progress=False)
    assert opt.report[0].name == "capture (torch.export)"
    assert not any(n.op == "call_function" and getattr(n.target, "__module__", "") == "torch._C._nn"
                   for n in opt.portable.graph.nodes)
    if fused:
        assert not any(n.op == "call_function" and n.target in (nn.functional.silu, nn.functional.hardswish,
                                                                 nn.functional.leaky_relu, nn.functional.hardtanh)
                       for n in opt.portable.graph.nodes)
    opt.save(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))
        assert torch.equal(load(tmp_path / "m")(x), opt(x))


class Resizes(nn.Module):
    """F.interpolate's bilinear, nearest and bicubic resizes, by size and by scale, behind Python on a size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        if x.shape[-1] % 2 == 0:  # (Python on a size: the torch.export route)
            x = x * 1.0
        y = self.conv(x)
        interpolate = nn.functional.interpolate
        a = interpolate(y, size=(8, 8), mode="bilinear", align_corners=False)
        b = interpolate(y, scale_factor=2.0, mode="nearest")
        c = interpolate(y, scale_factor=2, mode="bicubic", align_corners=True)
        return a + b + c


def test_resizes_on_the_export_route_are_f_interpolate_calls_and_save(tmp_path):
    """torch.export records aten.upsample_bilinear2d.vec, which had no torch-level spelling but torch._C._nn's: no
    op a saved graph may call (timm's MobileViT could not be saved, found by a model-zoo run)."""
    torch.manual_seed(0)
    model, x = Resizes().eval(), torch.randn(2, 3, 4, 4)
    opt = optimize(model, (x,), engines="graphopt", progress=False)
    assert opt.report[0].name == "capture (torch.export)"
    resizes = [n for n in opt.portable.graph.nodes if n.op == "call_function" and n.target is nn.functional.interpolate]
    assert sorted(n.kwargs["mode"] for n in resizes) == ["bicubic", "bilinear", "nearest"]
    assert not any(n.op == "call_function" and getattr(n.target, "__module__", "") == "torch._C._nn"
                   for n in opt.portable.graph.nodes)
    opt.save(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))
        assert torch.equal(load(tmp_path / "m")(x), opt(x))


class MaskOps(nn.Module):
    """What transformers' mask building and T5 / MobileViT record on the export route: masks combined with & and |,
    new_ones, an in-place add on an intermediate, a split into given sizes."""

    def forward(self, x):
        if x.shape[1] % 2 == 0:  # (Python on a size: the torch.export route)
            x = x * 1.0
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        keep = (x.sum(-1, keepdim=True) > -100) & causal[None] | x.new_ones(x.shape[0], 1, x.shape[1]).bool()
        h = x @ x.transpose(1, 2)
        h.add_(1.0)
        a, b, c = torch.split(x, [1, 2, 3], dim=2)
        return h.masked_fill(~keep, 0.0), a * b.sum(-1, keepdim=True) + c.mean(-1, keepdim=True)


def test_mask_building_ops_on_the_export_route_are_raised_and_save(tmp_path):
    """Each stayed an aten call the saver refused (Hugging Face's BERT, GPT-2, DistilBERT, RoBERTa, T5 encoder;
    timm's MobileViT), found one after another by a model-zoo run; now all five Hugging Face models it tried save
    and reload bitwise."""
    model, x = MaskOps().eval(), torch.randn(2, 4, 6)
    opt = optimize(model, (x,), engines="graphopt", progress=False)
    assert opt.report[0].name == "capture (torch.export)"
    left = [str(n.target) for n in opt.portable.graph.nodes
            if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "aten"]
    assert left == []
    opt.save(tmp_path / "m")
    with torch.no_grad():
        for got, want in zip(opt(x), model(x)):
            torch.testing.assert_close(got, want)
        for got, want in zip(load(tmp_path / "m")(x), opt(x)):
            assert torch.equal(got, want)


def test_the_capture_time_batch_check_prints_nothing(capfd):
    """The check runs the graph at another batch size, where it fails: quietly (GraphModule's call prints the
    failing line's traceback to stderr; found in the bench's log)."""
    optimize(ShapeBranch().eval(), (torch.randn(1, 3, 8, 8),), engines="graphopt", progress=False)
    assert "Traceback" not in capfd.readouterr().err
