import os

# Triton reads this when it is first imported (torch.compile imports it too): the kernel tests run
# graphopt's Triton kernels in Triton's interpreter, on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")
# optimize() picks the kernel library (graphopt's own, ONNX Runtime, OpenVINO) by timing them: the suite
# pins graphopt's own kernels so that what a test checks does not depend on the machine's speed.
# tests/compiler/test_engines.py tests the choice itself, with engines=... and its outcome forced.
os.environ.setdefault("GRAPHOPT_ENGINES", "graphopt")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
