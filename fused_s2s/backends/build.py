"""Building the compiled extension `fused_s2s._C`, ahead of time (setup.py) or on first use.

One place for the toolchain rules both paths share: which sources, which flags, whether the
CUDA part is built, where the CUDA toolkit is. This file imports nothing from the package (only
the standard library at import time, torch lazily), so that setup.py can load it by file path
before the package is installed.

Environment:
  FUSED_S2S_NO_EXTENSION=1   no extension at all (setup.py skips it; load_extension() refuses)
  FUSED_S2S_CUDA=0 / =1      never / always compile the CUDA kernels (=1 works without a GPU, as
                             CI does, and makes a failed build an error at install time); unset:
                             compiled when a GPU is visible (and torch has CUDA, and the toolkit
                             is found), so a machine without one builds only what it can run
  TORCH_CUDA_ARCH_LIST       GPU architectures (default: "8.0;9.0" plus the visible GPUs'; the
                             first-use build: the visible GPUs' only)
  MAX_JOBS                   parallel compile jobs (read by torch's ninja build)
  FUSED_S2S_PTXAS_VERBOSE=1  pass -Xptxas -v to nvcc (registers, spills per kernel)
  FUSED_S2S_BUILD_DIR        cache folder of the first-use build (default: torch's extensions dir)
  FUSED_S2S_VERBOSE_BUILD=1  show the compiler output of the first-use build
  CUDA_HOME                  the CUDA toolkit; when unset or wrong, found from `nvcc --dryrun`
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from types import ModuleType
from typing import Dict, Iterator, List, Optional, Tuple

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # fused_s2s/
DEFAULT_ARCH_LIST = "8.0;9.0"
EXTENSION_NAME = "fused_s2s._C"


def _env_flag(name: str) -> Optional[bool]:
    """True/False for an environment switch set to 1/0 (also yes/no, true/false), None if unset."""
    value = os.environ.get(name, "").strip().lower()
    if value == "":
        return None
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"{name} must be 0 or 1, got {os.environ[name]!r}")


# ------------------------------------------------------------------------------- sources


def source_dir() -> Optional[str]:
    """The `csrc` folder: beside the package in a checkout, or shipped inside an installed one."""
    for candidate in (os.path.join(os.path.dirname(PACKAGE_DIR), "csrc"),
                      os.path.join(PACKAGE_DIR, "csrc")):
        if os.path.isfile(os.path.join(candidate, "bindings.cpp")):
            return candidate
    return None


def source_hash(csrc: str) -> str:
    """A digest of every file under csrc/: the compiled module carries the one it was built
    from, so that an in-place build older than the sources is noticed (and rebuilt)."""
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(csrc)):
        dirs.sort()
        for name in sorted(files):
            if name.endswith((".h", ".cuh", ".cpp", ".cu")):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, csrc).encode() + b"\0")
                with open(path, "rb") as f:
                    digest.update(f.read() + b"\0")
    return digest.hexdigest()[:16]


def sources(csrc: str, with_cuda: bool) -> List[str]:
    files = [os.path.join(csrc, "bindings.cpp")] + sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    if with_cuda:
        files += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
    return files


# ---------------------------------------------------------------------------- CUDA toolkit


def _is_toolkit(path: Optional[str]) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and \
        os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))


def _nvcc_top(nvcc: str) -> Optional[str]:
    """The toolkit root that nvcc itself reports (`#$ TOP=...` of `nvcc --dryrun`): right even
    when the nvcc on PATH is a wrapper script or a symlink outside the toolkit."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "fused_s2s_probe.cu"], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.*)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


_cuda_home_cache: Dict[str, Optional[str]] = {}


def cuda_home() -> Optional[str]:
    """The CUDA toolkit root, or None. CUDA_HOME/CUDA_PATH win when they hold a toolkit;
    otherwise the root is asked of the nvcc found there or on PATH."""
    if "home" not in _cuda_home_cache:
        found = None
        for var in ("CUDA_HOME", "CUDA_PATH"):
            if _is_toolkit(os.environ.get(var)):
                found = os.environ[var]
                break
        if found is None:
            candidates = [os.path.join(os.environ[v], "bin", "nvcc")
                          for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
            candidates += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
            for nvcc in candidates:
                if nvcc and os.path.isfile(nvcc):
                    top = _nvcc_top(nvcc)
                    if _is_toolkit(top):
                        found = top
                        break
        _cuda_home_cache["home"] = found
    return _cuda_home_cache["home"]


def _cpp_extension(with_cuda: bool) -> ModuleType:
    """torch.utils.cpp_extension, told where the CUDA toolkit is when the CUDA kernels are built
    (it reads CUDA_HOME once, at import, and guesses wrong when nvcc on PATH is a wrapper outside
    the toolkit)."""
    import logging

    home = cuda_home() if with_cuda else None
    if home is not None:
        os.environ["CUDA_HOME"] = home
    # On import it logs "No CUDA runtime is found" on every machine without a GPU: not news here.
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    if home is not None:
        cpp_extension.CUDA_HOME = home
    return cpp_extension


def _nvidia_wheel_dirs() -> Tuple[List[str], List[str]]:
    """(include dirs, library dirs) of the NVIDIA pip packages installed beside torch. A toolkit
    without the cuBLAS/cuSPARSE headers that torch's CUDA headers include takes them from there."""
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    major = (torch.version.cuda or "").split(".")[0]
    roots = [os.path.join(site, "nvidia", f"cu{major}")] if major else []
    if not (roots and os.path.isdir(roots[0])):  # older layout: one folder per library
        roots = sorted(glob.glob(os.path.join(site, "nvidia", "*")))
    includes = [os.path.join(r, "include") for r in roots if os.path.isdir(os.path.join(r, "include"))]
    libs = [os.path.join(r, "lib") for r in roots if os.path.isdir(os.path.join(r, "lib"))]
    return includes, libs


def default_arch_list(for_first_use: bool) -> str:
    """The first-use build targets the visible GPUs only (it is local by construction, and half
    the compile time of two architectures); an installed build "8.0;9.0" plus the visible GPUs."""
    import torch

    visible = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            visible.append(f"{major}.{minor}")
    archs = [] if (for_first_use and visible) else DEFAULT_ARCH_LIST.split(";")
    return ";".join(archs + [a for a in dict.fromkeys(visible) if a not in archs])


def plan_cuda() -> Tuple[bool, str]:
    """(build the CUDA kernels?, why). Raises RuntimeError when FUSED_S2S_CUDA=1 cannot be met."""
    import torch

    forced = _env_flag("FUSED_S2S_CUDA")
    if forced is False:
        return False, "FUSED_S2S_CUDA=0"
    if not torch.version.cuda:
        problem = f"torch {torch.__version__} has no CUDA"
    elif not forced and not torch.cuda.is_available():
        return False, "no GPU visible; FUSED_S2S_CUDA=1 compiles them anyway"
    elif cuda_home() is None:
        problem = "nvcc (the CUDA toolkit) was not found: set CUDA_HOME or put nvcc on PATH"
    else:
        return True, f"CUDA toolkit at {cuda_home()}"
    if forced:
        raise RuntimeError("FUSED_S2S_CUDA=1 but " + problem)
    return False, problem


# ----------------------------------------------------------------------------------- flags


def build_options(csrc: str, with_cuda: bool) -> Dict[str, object]:
    """Sources and flags of the extension, for setuptools and for torch's JIT `load` alike."""
    cxx = ["-O3", "-Wno-psabi",  # psabi: notes about 32-byte vector arguments of inline helpers
           f"-DFS2S_SOURCE_HASH={source_hash(csrc)}"]
    nvcc = ["-O3", "-lineinfo",
            # torch adds these defines for every .cu file; the kernels are written for CUDA's
            # own half/bfloat16 operators, as plain nvcc compiles them.
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_HALF2_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__"]
    library_dirs: List[str] = []
    if with_cuda:
        cxx.append("-DWITH_CUDA")
        nvcc.append("-DWITH_CUDA")
        if _env_flag("FUSED_S2S_PTXAS_VERBOSE"):
            nvcc.append("-Xptxas=-v")
        includes, library_dirs = _nvidia_wheel_dirs()
        for inc in includes:  # searched after the toolkit's own headers: only fills gaps
            cxx += ["-idirafter", inc]
    return {
        "sources": sources(csrc, with_cuda),
        "include_dirs": [os.path.join(csrc, "include"), csrc],
        "cxx": cxx,
        "nvcc": nvcc,
        "library_dirs": library_dirs,
    }


@contextlib.contextmanager
def _arch_list_env(for_first_use: bool) -> Iterator[None]:
    """TORCH_CUDA_ARCH_LIST as the user set it, else our default, for the duration of a build."""
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not old:
        os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list(for_first_use)
    try:
        yield
    finally:
        if not old:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)


def build_time(with_cuda: bool) -> str:
    """What a build costs, to say before one starts (measured with MAX_JOBS=2 on 2 CPU cores)."""
    return "several minutes: the CUDA kernels too" if with_cuda else "1-3 minutes on 2 cores"


# ------------------------------------------------------------------------------- setup.py


def setup_kwargs() -> Dict[str, object]:
    """`ext_modules` and `cmdclass` for setup(): the extension when it can be built here.

    A failed compile is reported and the package installs without the extension (first use
    then tries again and says why it cannot), except with FUSED_S2S_CUDA=1, where it is an error.
    """
    from setuptools.command.build_py import build_py

    class BuildPyWithSources(build_py):
        """Ship csrc/ inside the package, so the first-use build works from an installed copy."""

        def run(self) -> None:
            super().run()
            csrc = source_dir()
            if csrc is not None and not self.editable_mode:
                target = os.path.join(self.build_lib, "fused_s2s", "csrc")
                shutil.copytree(csrc, target, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("*.o", "__pycache__"))

    cmdclass: Dict[str, object] = {"build_py": BuildPyWithSources}

    def skip(reason: str) -> Dict[str, object]:
        print(f"fused_s2s: not building the C++ extension ({reason})", file=sys.stderr)
        return {"cmdclass": cmdclass}

    if _env_flag("FUSED_S2S_NO_EXTENSION"):
        return skip("FUSED_S2S_NO_EXTENSION=1")
    csrc = source_dir()
    if csrc is None:
        return skip("csrc/ not found")
    try:
        import torch  # noqa: F401
    except ImportError as e:
        return skip(f"torch is not importable: {e}; install with --no-build-isolation")
    with_cuda, why = plan_cuda()
    cpp_extension = _cpp_extension(with_cuda)
    opts = build_options(os.path.relpath(csrc), with_cuda)
    extension_class = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    extension = extension_class(
        name=EXTENSION_NAME,
        sources=opts["sources"],
        include_dirs=[os.path.abspath(d) for d in opts["include_dirs"]],
        library_dirs=opts["library_dirs"],
        extra_compile_args={"cxx": opts["cxx"], "nvcc": opts["nvcc"]} if with_cuda else opts["cxx"],
    )
    strict = _env_flag("FUSED_S2S_CUDA") is True

    class BuildExtension(cpp_extension.BuildExtension):
        def build_extensions(self) -> None:
            # said here, not when setup() is called: pip calls it three times, building once
            print(f"fused_s2s: building the C++ extension ({build_time(with_cuda)}), CUDA kernels: "
                  f"{'yes' if with_cuda else 'no'} ({why})", file=sys.stderr, flush=True)
            with _arch_list_env(for_first_use=False):
                try:
                    super().build_extensions()
                except Exception as e:  # noqa: BLE001 - any compiler failure
                    if strict:
                        raise
                    print(f"fused_s2s: WARNING: building the C++ extension failed "
                          f"({_first_error_line(str(e))}; compiler output above); installing "
                          f"without it", file=sys.stderr)

    cmdclass["build_ext"] = BuildExtension
    return {"ext_modules": [extension], "cmdclass": cmdclass}


# ------------------------------------------------------------------------------ first use


def _first_error_line(text: str) -> str:
    """The compiler's first error from a build log, else the log's first line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if re.search(r"\berror\b", line, re.IGNORECASE) and not line.startswith("Error building"):
            return line[:300]
    return (lines[0] if lines else "unknown error")[:300]


_load_lock = threading.Lock()
_loaded: Optional[ModuleType] = None
_load_error: Optional[str] = None


def _jit_build() -> ModuleType:
    if _env_flag("FUSED_S2S_NO_EXTENSION"):
        raise RuntimeError("the extension is disabled (FUSED_S2S_NO_EXTENSION=1)")
    csrc = source_dir()
    if csrc is None:
        raise RuntimeError("fused_s2s._C is not installed and the C++ sources (csrc/) are not "
                           "available to build it")
    with_cuda, _ = plan_cuda()
    cpp_extension = _cpp_extension(with_cuda)
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("fused_s2s._C is not installed and ninja (needed to build it) is missing")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"fused_s2s._C is not installed and no C++ compiler ({compiler}) was found")
    opts = build_options(csrc, with_cuda)
    name = "fused_s2s_C_cuda" if with_cuda else "fused_s2s_C_cpu"
    build_root = os.environ.get("FUSED_S2S_BUILD_DIR")
    if build_root:
        build_directory = os.path.join(build_root, name)
        os.makedirs(build_directory, exist_ok=True)
    else:
        build_directory = cpp_extension._get_build_directory(name, verbose=False)  # torch's default
    verbose = bool(_env_flag("FUSED_S2S_VERBOSE_BUILD"))
    compiles = _needs_compile(build_directory, name)
    if compiles:
        print(f"fused_s2s: compiling the C++ extension{' with CUDA kernels' if with_cuda else ''} "
              f"on first use ({build_time(with_cuda)}; cached afterwards in {build_directory})...",
              file=sys.stderr, flush=True)
    start = time.perf_counter()
    with _arch_list_env(for_first_use=True):
        try:
            module = cpp_extension.load(
                name=name,
                sources=opts["sources"],
                extra_include_paths=opts["include_dirs"],
                extra_cflags=opts["cxx"],
                extra_cuda_cflags=opts["nvcc"],
                extra_ldflags=[f"-L{d}" for d in opts["library_dirs"]],
                build_directory=build_directory,
                with_cuda=with_cuda,
                verbose=verbose,
            )
        except Exception as e:  # noqa: BLE001 - compiler, linker or import failure
            raise RuntimeError(f"building fused_s2s._C failed: {_first_error_line(str(e))}") from e
    if compiles:
        print(f"fused_s2s: compiled in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return module


def _needs_compile(build_directory: str, name: str) -> bool:
    """Whether torch's `load` is about to compile: no library built yet, or ninja, asked for a
    dry run of the last build, finds a source newer than its output."""
    if not os.path.isfile(os.path.join(build_directory, name + ".so")):
        return True
    try:
        out = subprocess.run(["ninja", "-n", "-C", build_directory], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return True
    return out.returncode != 0 or "no work to do" not in out.stdout


def load_extension() -> ModuleType:
    """The compiled module `fused_s2s._C`: the installed one, else built now (once, cached on
    disk; concurrent builders wait on torch's build-folder lock). Raises RuntimeError with a
    one-line reason when it can be neither imported nor built; the failure is remembered."""
    global _loaded, _load_error
    with _load_lock:
        if _loaded is not None:
            return _loaded
        if _load_error is not None:
            raise RuntimeError(_load_error)
        import importlib

        installed_error = None
        try:
            installed = importlib.import_module(EXTENSION_NAME)
            csrc = source_dir()
            if csrc is None or getattr(installed, "source_hash", None) == source_hash(csrc):
                _loaded = installed
                return _loaded
            print("fused_s2s: the installed fused_s2s._C was built from other sources than csrc/ "
                  "holds now; rebuilding", file=sys.stderr)
            installed_error = "the installed fused_s2s._C does not match csrc/"
        except ImportError as e:
            if not (isinstance(e, ModuleNotFoundError) and e.name == EXTENSION_NAME):
                installed_error = f"the installed fused_s2s._C does not import ({e})"
        try:
            _loaded = _jit_build()
        except Exception as e:  # noqa: BLE001
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            _load_error = f"{installed_error}; {reason}" if installed_error else reason
            raise RuntimeError(_load_error) from None
        # `import fused_s2s._C` now finds the module built here
        sys.modules[EXTENSION_NAME] = _loaded
        if "fused_s2s" in sys.modules:
            sys.modules["fused_s2s"]._C = _loaded
        return _loaded
