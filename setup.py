"""Build script: the Python package plus, when a compiler is present, the extension fused_s2s._C.

The `triton_kernels/` folder is installed as `fused_s2s.triton_kernels`: Triton's own
repository ships a top-level `triton_kernels` package, and ours must not shadow it.
"""
from setuptools import setup

setup(
    packages=["fused_s2s", "fused_s2s.triton_kernels"],
    package_dir={"fused_s2s": "fused_s2s", "fused_s2s.triton_kernels": "triton_kernels"},
)
