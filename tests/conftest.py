import os

# Triton reads this when it is first imported (torch.compile imports it too): the kernel tests run
# graphopt's Triton kernels in Triton's interpreter, on CPU tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
