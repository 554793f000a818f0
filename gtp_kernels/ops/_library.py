"""The ``gtp_kernels`` torch.library namespace: K1, K2, K3 as registered ops (torch.ops.gtp_kernels.*).

Registered so that torch.compile(fullgraph=True) and torch.export trace functions that call the
kernels (the op is one graph node; its fake kernel gives output shapes without running it), and so
that the schema tells compilers which arguments an op mutates.

Why ``Library.define`` + ``impl`` + ``register_fake`` and not ``torch.library.custom_op``: on this
torch (2.13) a custom_op whose schema mutates arguments runs two Python wrappers per eager call
(the autograd and ADInplaceOrView kernels; the latter rebuilds the schema's argument list for every
argument), which measured ~0.5 ms per lsq_update call on the shared CI machine against ~0.06 ms for
the same schema defined here (benchmarks/bench_registered_ops.py; the K3 CUDA kernel itself takes
tens of microseconds). The kernels are registered under CompositeExplicitAutograd (one body for
every device: each dispatches by device itself) and have no autograd formula: they are selection
ops on tensors that never require grad. ADInplaceOrView falls through, so version counters of the
mutated tensors are not bumped in eager mode; the schema still declares the mutation, which is what
torch.compile's functionalisation and torch.export use.
"""
from __future__ import annotations

from typing import Callable

import torch

NAMESPACE = "gtp_kernels"
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")


def register(schema: str, impl: Callable, fake: Callable) -> torch._ops.OpOverload:
    """Define ``gtp_kernels::<schema>`` with ``impl`` as its kernel and ``fake`` as its fake kernel;
    return the op's default overload (call that: it skips the OpOverloadPacket lookup)."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIB)
    return getattr(getattr(torch.ops, NAMESPACE), name).default
