"""Install gtp_kernels.

Install without build isolation (``pip install --no-build-isolation -e .``): the C++/CUDA
extension is built against the torch already installed, and an isolated build would fetch a
second (CUDA, multi-GB) torch just to compile.
"""
from setuptools import find_packages, setup

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
        "test": ["pytest>=8", "pytest-benchmark>=4", "scikit-learn>=1.3", "scipy>=1.10", "hypothesis>=6"],
    },
    entry_points={"console_scripts": ["gtp=gtp_kernels.cli:main"]},
)
