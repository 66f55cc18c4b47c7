import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt.passes.fuse_conv_act import fuse_conv_act
from graphopt.passes.lower_to_onednn import lower_to_onednn
from graphopt.passes.plan_layout import plan_layout
from tests.helpers import apply, close, traced


class ConvView(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = F.max_pool2d(F.relu(self.c1(x)), 2)
        y = F.relu(self.c2(y))
        return y.view(y.size(0), -1), y[:, :2]    # a view that needs the default strides, and a 4-d output


def _lowered(m, x):
    gm = traced(m, x)
    apply(fuse_conv_act, gm, x)
    apply(lower_to_onednn, gm, x)
    return gm


def _conversions(gm, fmt):
    return [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "contiguous"
            and n.kwargs.get("memory_format", torch.contiguous_format) == fmt]


def test_layout_four_ways():
    m, x = ConvView().eval(), torch.randn(2, 3, 10, 10)
    gm = _lowered(m, x)
    assert len(_conversions(gm, torch.contiguous_format)) == 2    # the lowering guarded the view and the 4-d output
    assert apply(plan_layout, gm, x) == 1                         # the input
    assert len(_conversions(gm, torch.channels_last)) == 1        # once, at the input: none between convs
    flat, four = gm(x)
    want_flat, want_four = m(x)
    close(flat, want_flat)
    close(four, want_four)
    assert four.is_contiguous()                                   # the caller gets eager's layout
    assert apply(plan_layout, gm, x) == 0


def test_activations_stay_channels_last_between_convs():
    m, x = ConvView().eval(), torch.randn(1, 3, 8, 8)
    gm = _lowered(m, x)
    apply(plan_layout, gm, x)
    convs = [n for n in gm.graph.nodes if n.op == "call_function" and "convolution" in str(n.target)]
    for conv in convs:
        assert conv.meta["tensor_meta"].memory_format == torch.channels_last


def test_input_written_in_place_keeps_its_layout():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            x.mul_(2)
            return self.conv(x)

    m = M().eval()
    gm = _lowered(m, torch.randn(1, 3, 4, 4))
    x1 = torch.randn(1, 3, 4, 4)
    x2 = x1.clone()
    apply(plan_layout, gm, x1.clone())
    assert not _conversions(gm, torch.channels_last)
    close(gm(x1), m(x2))
    close(x1, x2)                                                   # the input was written like eager writes it


def test_graph_without_onednn_convs_is_left_alone():
    m, x = nn.Sequential(nn.Linear(4, 4)).eval(), torch.randn(2, 4)
    gm = traced(m, x)
    assert apply(plan_layout, gm, x) == 0
