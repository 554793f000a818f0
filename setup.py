"""Install gtp_kernels.

Install without build isolation (``pip install --no-build-isolation -e .``): the C++/CUDA
extension is built against the torch already installed, and an isolated build would fetch a
second (CUDA, multi-GB) torch just to compile.
"""
import os
import shutil
import sys

from setuptools import find_packages, setup

# ---------------------------------------------------------------------------------------------
# The optional compiled extension gtp_kernels._C (K3 least-squares update, csrc/; see csrc/README.md).
# CPU op: built wherever torch's cpp_extension finds a C++ compiler. CUDA kernel: added when torch is
# a CUDA build and nvcc is found (CUDA_HOME). Any failure leaves a working install: a clear message is
# printed and gtp_kernels/ops/lsq.py falls back to plain torch. GTP_NO_EXT=1 skips the extension,
# GTP_NO_CUDA=1 builds the CPU op only.
_CSRC = "csrc"
_CPU_SOURCES = [
    f"{_CSRC}/bindings.cpp",
    f"{_CSRC}/lsq_update_cpu.cpp",
    f"{_CSRC}/cpu_vector.cpp",
    f"{_CSRC}/cpu_rows_dot.cpp",
]
_CUDA_SOURCES = [f"{_CSRC}/lsq_update.cu"]
_CXX_FLAGS = ["-O3"]  # the C++ standard is left to torch (its headers need their own)
_LINK_FLAGS = []
if sys.platform.startswith("linux"):
    # at::parallel_for is a header template: without OpenMP here it runs on one thread
    # (torch's Linux wheels use the OpenMP backend; the runtime is the one torch loads)
    _CXX_FLAGS.append("-fopenmp")
    _LINK_FLAGS.append("-fopenmp")
_NVCC_FLAGS = [
    "-O3",
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",  # PTX, so newer GPUs can JIT it
]


def _say(msg: str) -> None:
    print(f"gtp_kernels: {msg}", file=sys.stderr, flush=True)


def _extension_setup() -> dict:
    """ext_modules/cmdclass for setup(), or {} when the extension cannot or should not be built."""
    if os.environ.get("GTP_NO_EXT", "0") == "1":
        _say("GTP_NO_EXT=1: not building the C++/CUDA extension; the pure-torch fallback is used")
        return {}
    # Only for build/install commands: plain metadata queries must not need torch.
    if not any(a.startswith(("build", "install", "develop", "bdist", "editable")) for a in sys.argv[1:]):
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # noqa: BLE001 - any import failure means "no extension"
        _say(f"torch not importable ({exc}); extension not built, the pure-torch fallback is used")
        return {}

    nvcc = None
    if cpp_extension.CUDA_HOME is not None:
        candidate = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
        nvcc = candidate if os.path.exists(candidate) else shutil.which("nvcc")
    want_cuda = (
        os.environ.get("GTP_NO_CUDA", "0") != "1" and torch.version.cuda is not None and nvcc is not None
    )

    def cpu_extension():
        return cpp_extension.CppExtension(
            "gtp_kernels._C", _CPU_SOURCES, extra_compile_args={"cxx": _CXX_FLAGS}, extra_link_args=_LINK_FLAGS
        )

    if want_cuda:
        _say(f"building the CPU op and the CUDA kernel (torch CUDA {torch.version.cuda}, nvcc {nvcc})")
        ext = cpp_extension.CUDAExtension(
            "gtp_kernels._C",
            _CPU_SOURCES + _CUDA_SOURCES,
            define_macros=[("GTP_WITH_CUDA", "1")],
            extra_compile_args={"cxx": _CXX_FLAGS, "nvcc": _NVCC_FLAGS},
            extra_link_args=_LINK_FLAGS,
        )
    else:
        why = "torch is a CPU build" if torch.version.cuda is None else "nvcc/CUDA_HOME not found"
        _say(f"building the CPU op only ({why}); CUDA tensors use the pure-torch fallback")
        ext = cpu_extension()

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Never fails the install: CUDA build failure -> CPU-only retry -> no extension.

        Wraps build_extensions (not build_extension): torch checks nvcc against torch's CUDA version
        there, before compiling anything.
        """

        def build_extensions(self) -> None:
            try:
                super().build_extensions()
                return
            except Exception as exc:  # noqa: BLE001
                _say(f"building gtp_kernels._C failed: {type(exc).__name__}: {exc}")
            if any(src.endswith(".cu") for e in self.extensions for src in e.sources):
                _say("retrying with the CPU op only (CUDA tensors will use the pure-torch fallback)")
                self.extensions = [cpu_extension()]
                try:
                    super().build_extensions()
                    return
                except Exception as exc:  # noqa: BLE001
                    _say(f"CPU-only build failed too: {type(exc).__name__}: {exc}")
            _say("extension NOT built; gtp_kernels uses its pure-torch fallback (see csrc/README.md)")
            self.extensions = []  # nothing for the install/inplace steps to copy

    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}}


setup(
    name="gtp_kernels",
    version="0.1.0",
    description="Triton/CUDA kernels for training-data selection by Gradient Trajectory Pursuit",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["gtp_kernels", "gtp_kernels.*"]),
    python_requires=">=3.10",
    # Ranges, not pins: the GPU machine runs torch 2.11; requirements.txt pins CI's versions.
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tqdm>=4.66",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "collect": ["transformers>=4.45", "peft>=0.12"],
        "plot": ["matplotlib>=3.7"],
        # integrations (gtp_kernels.integrations): install TRAK without its dependencies
        # (pip install --no-deps traker): it needs only torch, numpy, tqdm, already required here
        "trak": ["traker>=0.3.2"],
        # dattri: its projector needs only torch, numpy, scipy, pyyaml, tqdm; its pretty_midi (music
        # examples) is not imported by gtp_kernels.integrations.dattri, so --no-deps is enough too
        "dattri": ["dattri>=0.3.0"],
        "datasets": ["datasets>=2.14"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "scikit-learn>=1.3", "scipy>=1.10", "hypothesis>=6"],
    },
    entry_points={"console_scripts": ["gtp=gtp_kernels.cli:main"]},
    **_extension_setup(),
)
