"""Builds the native extension; everything else is in pyproject.toml.

- ``pissa_svd._native``: the C++ algorithm over BLAS/LAPACK taken from SciPy at run time.
  Always built (a C++17 compiler is the only requirement).
- ``pissa_svd._native_cuda``: the same algorithm over cuBLAS/cuSOLVER, built only when nvcc and
  the cuBLAS/cuSOLVER headers are found (CUDA_HOME, or the ``nvidia-cublas``/``nvidia-cusolver``
  wheels). Otherwise the reason is printed and recorded; the install never fails for it.
- ``PISSA_SVD_NO_EXT=1`` builds nothing: the package then runs on its torch path alone.

What was built, and why not, is written to pissa_svd/_build_info.json (``pissa-svd env``).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = "csrc"  # setup() wants paths relative to this file
INFO = ROOT / "pissa_svd" / "_build_info.json"
BUILD_INFO: dict = {"cpu": None, "cuda": None}  # what was built, or why not (pissa-svd env)
# cuBLAS 13 / cuSOLVER 12 ship versioned sonames only (find_cuda adds the CUDA runtime).
CUDA_LIBS = ["-l:libcublas.so.13", "-l:libcusolver.so.12"]
# T4 (sm_75, the oldest CUDA 13 supports), A100 (80), H100/H200 (90); PTX of the last for newer.
DEFAULT_ARCHS = "75;80;90"


def log(msg: str) -> None:
    print(f"pissa-svd build: {msg}", file=sys.stderr, flush=True)


def site_dirs() -> list[Path]:
    """Where pip-installed NVIDIA wheels may live, including under an isolated build."""
    py = f"python{sys.version_info.major}.{sys.version_info.minor}"
    dirs = [Path(p) for p in sys.path if p]
    for prefix in {sys.prefix, sys.base_prefix, os.environ.get("VIRTUAL_ENV", "")}:
        if prefix:
            dirs += [Path(prefix) / "lib" / py / "site-packages"]
    dirs.append(Path(sysconfig.get_paths()["purelib"]))
    return [d for d in dict.fromkeys(dirs) if d.is_dir()]


def find_cuda() -> tuple[dict | None, str]:
    """(config, reason): config is None when the CUDA backend cannot be built, and why.

    Headers and libraries are taken as a pair from one place (an nvidia-cublas/-cusolver
    wheel first, then the toolkit), so that a CUDA 12 toolkit's headers are never paired with
    CUDA 13 wheels' libraries or the other way round."""
    if os.environ.get("PISSA_SVD_NO_CUDA") == "1":
        return None, "PISSA_SVD_NO_CUDA=1"
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = str(Path(home) / "bin" / "nvcc") if home else shutil.which("nvcc")
    if not nvcc or not Path(nvcc).exists():
        return None, "no nvcc (set CUDA_HOME or put nvcc on PATH)"
    roots = [Path(home)] if home else []
    roots += [Path(nvcc).resolve().parent.parent]
    roots += [Path(p) for p in sorted(glob.glob("/usr/local/cuda*"), reverse=True)]
    roots = list(dict.fromkeys(roots))
    wheels = [d / "nvidia" / "cu13" for d in site_dirs()]
    pairs = [(w / "include", w / "lib") for w in wheels]
    for r in roots:
        pairs += [(r / "include", r / "lib64"), (r / "targets/x86_64-linux/include", r / "lib64")]
        pairs += [(r / "targets/x86_64-linux/include", r / "targets/x86_64-linux/lib")]
    headers, sonames = ("cusolverDn.h", "cublas_v2.h"), ("libcublas.so.13", "libcusolver.so.12")
    with_headers = [p for p in pairs if all((p[0] / h).exists() for h in headers)]
    found = [p for p in with_headers if all((p[1] / so).exists() for so in sonames)]
    if not found:
        return None, (
            "no cusolverDn.h/cublas_v2.h beside libcublas.so.13/libcusolver.so.12 in the CUDA "
            "toolkit or the nvidia-cusolver/nvidia-cublas wheels (pip install nvidia-cusolver "
            f"nvidia-cublas); headers found in {[str(p[0]) for p in with_headers]}"
        )
    inc, lib = found[0]
    # The CUDA runtime: the toolkit's (unversioned, for -lcudart) or the runtime wheel's.
    libdirs = [lib] + [d for r in roots for d in (r / "lib64", r / "targets/x86_64-linux/lib")]
    libdirs += [w / "lib" for w in wheels]
    libdirs = [d for d in dict.fromkeys(libdirs) if d.is_dir()]
    cudart = next(
        (
            (d, flag)
            for d in libdirs
            for so, flag in (
                ("libcudart.so", "-lcudart"),
                ("libcudart.so.13", "-l:libcudart.so.13"),
            )
            if (d / so).exists()
        ),
        None,
    )
    if cudart is None:
        return None, f"nvcc at {nvcc} but no libcudart.so(.13) in {[str(d) for d in libdirs]}"
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    return {
        "nvcc": nvcc,
        "nvcc_version": version.strip().splitlines()[-1] if version.strip() else "?",
        "include": str(inc),
        "libdirs": [str(d) for d in dict.fromkeys([lib, cudart[0]])],
        "libs": [*CUDA_LIBS, cudart[1]],
        "archs": os.environ.get("PISSA_SVD_CUDA_ARCH", DEFAULT_ARCHS),
    }, "found"


class BuildExt(build_ext):
    """Compiles .cu sources with nvcc; records what was built in _build_info.json.

    A failed extension never fails the install (the torch path always works); the failure is
    printed and recorded instead, and CI checks the record.
    """

    def run(self):
        self._failed: set[str] = set()
        try:
            super().run()
        finally:
            _write_info(BUILD_INFO)
            if not self.inplace:  # a wheel: build_py copied the package before this ran
                dest = Path(self.build_lib) / "pissa_svd"
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(INFO, dest / INFO.name)

    def build_extensions(self):
        super().build_extensions()
        # An extension that failed has no file: drop it before setuptools copies the built
        # files (in place for an editable install, into the wheel otherwise).
        self.extensions = [e for e in self.extensions if e.name not in self._failed]

    def build_extension(self, ext):
        kind = "cuda" if ext.name.endswith("_cuda") else "cpu"
        try:
            cu = [s for s in ext.sources if s.endswith(".cu")]
            if cu:
                ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
                ext.extra_objects = [self._nvcc(src, ext) for src in cu]
            super().build_extension(ext)
        except Exception as exc:  # compiler/linker errors: report, keep the install going
            self._failed.add(ext.name)
            BUILD_INFO[kind] = f"failed: {type(exc).__name__}: {exc}"
            log(f"{ext.name} FAILED to build ({exc}); the torch path still works")

    def _nvcc(self, src: str, ext) -> str:
        """Compile ``src`` to an object, unless the object was built by the same command from
        sources no newer than it (the next run of a GPU check on a warm machine)."""
        cfg = ext.cuda
        obj = Path(self.build_temp) / (Path(src).stem + ".o")
        obj.parent.mkdir(parents=True, exist_ok=True)
        gencode = []
        for arch in cfg["archs"].split(";"):
            gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        last = cfg["archs"].split(";")[-1]
        gencode += ["-gencode", f"arch=compute_{last},code=compute_{last}"]  # PTX for newer GPUs
        cmd = [cfg["nvcc"], "-std=c++17", "-O3", "-Xcompiler", "-fPIC,-fvisibility=hidden"]
        cmd += [f"-I{ROOT / CSRC}", f"-I{cfg['include']}", *gencode]
        cmd += ["-c", str(ROOT / src), "-o", str(obj)]
        stamp = obj.with_suffix(".cmd")
        inputs = [ROOT / src, *(ROOT / d for d in ext.depends)]
        built = obj.stat().st_mtime if obj.exists() else -1.0
        same = stamp.exists() and stamp.read_text() == " ".join(cmd)
        if same and not self.force and all(p.stat().st_mtime < built for p in inputs):
            log(f"{obj.name} is up to date")
            return str(obj)
        log("nvcc " + " ".join(cmd[1:]))
        stamp.unlink(missing_ok=True)
        subprocess.run(cmd, check=True)
        stamp.write_text(" ".join(cmd))
        return str(obj)


def extensions() -> list:
    info = BUILD_INFO
    if os.environ.get("PISSA_SVD_NO_EXT") == "1":
        log("PISSA_SVD_NO_EXT=1: building no extension (torch path only)")
        info["cpu"] = info["cuda"] = "skipped: PISSA_SVD_NO_EXT=1"
        _write_info(info)
        return []
    from pybind11.setup_helpers import Pybind11Extension

    flags = ["-O3", "-fvisibility=hidden"]
    # Headers: a change to any of them rebuilds both modules (setuptools only tracks sources).
    headers = sorted(str(p) for p in Path(CSRC).glob("*.h"))
    exts = [
        Pybind11Extension(
            "pissa_svd._native",
            [f"{CSRC}/bind.cpp", f"{CSRC}/cpu_backend.cpp"],
            include_dirs=[CSRC],
            depends=headers,
            define_macros=[("PISSA_WITH_CPU", "1"), ("PISSA_MODULE_NAME", "_native")],
            extra_compile_args=flags,
            libraries=["dl"],  # dlsym (rows.h), in libc itself only from glibc 2.34
            cxx_std=17,
        )
    ]
    info["cpu"] = "built: BLAS/LAPACK from scipy.linalg.cython_blas/cython_lapack at run time"
    cuda, reason = find_cuda()
    if cuda is None:
        log(f"CUDA backend skipped: {reason}")
        info["cuda"] = f"skipped: {reason}"
    else:
        log(f"CUDA backend: {cuda['nvcc_version']}, headers {cuda['include']}")
        ext = Pybind11Extension(
            "pissa_svd._native_cuda",
            [f"{CSRC}/bind.cpp", f"{CSRC}/cuda_backend.cu"],
            include_dirs=[CSRC],
            # build_extension compiles the .cu itself and links the object: setuptools must
            # still see it, or a change to it alone would not relink the module.
            depends=[*headers, f"{CSRC}/cuda_backend.cu"],
            define_macros=[("PISSA_WITH_CUDA", "1"), ("PISSA_MODULE_NAME", "_native_cuda")],
            extra_compile_args=flags,
            library_dirs=cuda["libdirs"],
            # libcusolver needs cusparse/nvjitlink, which are loaded with it at run time.
            extra_link_args=[*cuda["libs"], "-Wl,--allow-shlib-undefined"],
            runtime_library_dirs=["$ORIGIN/../nvidia/cu13/lib"],
            cxx_std=17,
        )
        ext.cuda = cuda
        exts.append(ext)
        info["cuda"] = f"built: {cuda['nvcc_version']}, sm {cuda['archs']}"
    return exts


def _write_info(info: dict) -> None:
    INFO.write_text(json.dumps(info, indent=1) + "\n")


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
