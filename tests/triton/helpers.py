"""What every Triton test module needs before it imports the kernels: the device the
kernels run on (a GPU, else the CPU through the interpreter that tests/conftest.py switches
on) and the `cuda` marker on GPU runs. Importing it skips the importing module when neither
is available. Holds no tests."""
from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
if not HAS_CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it)",
                allow_module_level=True)
CUDA_MARKS = [pytest.mark.cuda] if HAS_CUDA else []
