"""Test setup: without a GPU, Triton kernels run through the CPU interpreter.

TRITON_INTERPRET must be set before triton is imported anywhere, hence here, first.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
