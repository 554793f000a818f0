"""gtp_kernels: select the training data that matters, by Gradient Trajectory Pursuit.

Public API::

    from gtp_kernels import select, METHODS
    sel = select(candidates, target, k=1000)        # (N, D) or (N, T, d); (D,) or (D, m)
    sel.indices, sel.weights, sel.residual_norms    # selection order, NNLS weights, history
"""
from .api import METHODS, MethodSpec, Selection, fit_residual, select
from .selection.common import EarlyStopWarning
from .validation import InputError

__all__ = ["select", "Selection", "METHODS", "MethodSpec", "InputError", "EarlyStopWarning", "fit_residual", "project", "select_sharded"]
__version__ = "0.1.0"


def __getattr__(name):
    # The projection op pulls in triton; import it only when asked for.
    if name == "project":
        from .ops.project import project

        return project
    if name == "select_sharded":  # torch.distributed users: rows sharded across ranks
        from .selection.distributed import select_sharded

        return select_sharded
    raise AttributeError(f"module 'gtp_kernels' has no attribute {name!r}")
