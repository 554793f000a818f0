"""The optional compiled extension ``gtp_kernels._C`` (csrc/): loaded once, shared by the ops."""
from __future__ import annotations


def _load_extension():
    """(module, None) or (None, reason)."""
    import importlib
    import importlib.util

    try:
        if importlib.util.find_spec("gtp_kernels._C") is None:
            return None, "gtp_kernels._C is not built (pip install --no-build-isolation -e .; see csrc/README.md)"
        return importlib.import_module("gtp_kernels._C"), None
    except Exception as exc:  # noqa: BLE001 - broken build (ABI, missing CUDA libs): fall back to torch
        return None, f"{type(exc).__name__}: {exc}"


# the module (None when unavailable) and why it is unavailable (None when loaded)
extension, extension_error = _load_extension()


def extension_status() -> str:
    """``"cpu+cuda"``, ``"cpu"`` (extension built without CUDA) or ``"unavailable: <reason>"``."""
    if extension is None:
        return f"unavailable: {extension_error}"
    return "cpu+cuda" if extension.has_cuda() else "cpu"
