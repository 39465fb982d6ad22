"""Build script: the Python package plus, when a compiler is present, the extension fused_s2s._C.

Install with `pip install --no-build-isolation .` (or `-e .`): the extension compiles against
the torch already installed. The rules (CUDA part or not, toolkit discovery, flags, the
FUSED_S2S_* switches) live in fused_s2s/backends/build.py, shared with the build on first use; it is
loaded here by file path because the package itself is not importable yet.

The `triton_kernels/` folder is installed as `fused_s2s.triton_kernels`: Triton's own
repository ships a top-level `triton_kernels` package, and ours must not shadow it.
"""
import importlib.util
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _build_rules():
    path = os.path.join(HERE, "fused_s2s", "backends", "build.py")
    spec = importlib.util.spec_from_file_location("fused_s2s_build_rules", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


setup(
    packages=["fused_s2s", "fused_s2s.backends", "fused_s2s.demo", "fused_s2s.triton_kernels"],
    package_dir={"fused_s2s": "fused_s2s", "fused_s2s.triton_kernels": "triton_kernels"},
    **_build_rules().setup_kwargs(),
)
