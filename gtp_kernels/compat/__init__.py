"""Drop-in replacements for other libraries' sparse-coding entry points, on the package's pursuit.

* :mod:`gtp_kernels.compat.sklearn`: scikit-learn's ``orthogonal_mp``, ``orthogonal_mp_gram``
  and a thin ``OrthogonalMatchingPursuit`` estimator (atoms as columns of X, absolute squared
  ``tol``, dense coefficients, scikit-learn's shapes and warnings);
* :mod:`gtp_kernels.compat.cords`: CORDS / GRAD-MATCH's ``OrthogonalMP_REG_Parallel`` and
  ``OrthogonalMP_REG`` (atoms as columns of A, relative ``tol``, ridge ``lam``, a dense
  weight vector).

Neither needs scikit-learn or CORDS installed: both run :func:`gtp_kernels.select`.
"""
from .cords import OrthogonalMP_REG, OrthogonalMP_REG_Parallel, OrthogonalMP_REG_Parallel_V1
from .sklearn import OrthogonalMatchingPursuit, orthogonal_mp, orthogonal_mp_gram

__all__ = [
    "orthogonal_mp",
    "orthogonal_mp_gram",
    "OrthogonalMatchingPursuit",
    "OrthogonalMP_REG_Parallel",
    "OrthogonalMP_REG_Parallel_V1",
    "OrthogonalMP_REG",
]
