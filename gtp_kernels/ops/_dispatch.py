"""Backend choice shared by every op: Triton on CUDA tensors, plain torch on CPU tensors.

``backend="triton"`` on CPU tensors runs the Triton kernel through the interpreter
(``TRITON_INTERPRET=1`` must be set before triton is imported); the tests use this to check
kernels on machines without a GPU.
"""
from __future__ import annotations

import os

import torch

from ..validation import check_choice


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton missing or broken
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Return "triton" or "torch" for tensors living on one device."""
    check_choice(backend, "backend", ("auto", "triton", "torch"))
    on_cuda = any(t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' requested but triton cannot be imported")
        if not on_cuda and not interpreting():
            raise RuntimeError(
                "backend='triton' on CPU tensors needs the Triton interpreter: "
                "set TRITON_INTERPRET=1 before importing triton"
            )
    return backend
