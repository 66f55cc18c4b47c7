"""Triton kernels for the fused ops, one file each (autotune configs, the @triton.jit kernel, the
launcher). Launchers take the reference's signature; on CUDA tensors they run compiled, and
under TRITON_INTERPRET=1 (set before this package is imported) on CPU tensors, which is how the
tests run without a GPU."""

from graphopt.kernels.triton.conv2d_act import conv2d_act
from graphopt.kernels.triton.linear_act import linear_act
from graphopt.kernels.triton.qconv2d_act import qconv2d_act
from graphopt.kernels.triton.qlinear_act import qlinear_act

__all__ = ["conv2d_act", "linear_act", "qconv2d_act", "qlinear_act"]
