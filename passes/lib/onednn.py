"""The oneDNN (and MKL) ops the CPU lowerings write (lower_to_onednn, lower_int8_onednn), named once for every pass
that looks for them afterwards (plan_layout)."""

from __future__ import annotations

import torch

CONV = torch.ops.mkldnn._convolution_pointwise.default
CONV_ADD = torch.ops.mkldnn._convolution_pointwise.binary
LINEAR = torch.ops.mkldnn._linear_pointwise.default
MKL_LINEAR = torch.ops.mkl._mkl_linear.default if hasattr(torch.ops.mkl, "_mkl_linear") else None
QCONV = torch.ops.onednn.qconv2d_pointwise.default
QCONV_SUM = torch.ops.onednn.qconv2d_pointwise.binary
QLINEAR = torch.ops.onednn.qlinear_pointwise.default
