"""Matrix-vector product for batch-1 decode on XLA:CPU (cpu_gemv.cc), with its reference.

Axis legend: K contracted, N output.

`gemv(x, w)` = x [1, K] @ w [K, N] in float32 through an XLA FFI custom call that streams w
once with the columns split over XLA's intra-op thread pool (docs/kernels.md, "CPU decode
matmul"). The C++ source is compiled with the system C++ compiler on first use into the
mmjax cache folder, keyed by the source, the compiler command, jaxlib's version and the CPU's
features, and
registered with XLA once per process.

`use_for(rows, dtype)` is the one place that decides whether a product goes through it: the
CPU backend, one row, float32, not disabled (MMJAX_CPU_GEMV=0, or tracing under `disabled()`,
which the engine does for programs partitioned over a mesh: a custom call has no sharding
rule), and the library built. If it cannot be built (no compiler) mmjax warns once and keeps
XLA's dot: slower, same math.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings

import jax
import jax.numpy as jnp

from mmjax.compile_cache import cache_root

__all__ = ["available", "build", "disabled", "gemv", "gemv_reference", "use_for"]

TARGET = "mmjax_gemv_f32"
SOURCE = os.path.join(os.path.dirname(__file__), "cpu_gemv.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
_lock = threading.Lock()
_state: dict = {}  # "lib": ctypes.CDLL | None, "error": str
_local = threading.local()  # .off: tracing under disabled()


def gemv_reference(x, w):
    """float32 reference: x [1, K] @ w [K, N] at full precision."""
    return jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        import platform

        return platform.machine() + platform.processor()


def build(cache_dir: str | None = None) -> str:
    """Compile cpu_gemv.cc unless already built; returns the shared library's path.
    Raises RuntimeError with the compiler's command and output when that fails."""
    import jaxlib

    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (install g++ or set CXX)")
    with open(SOURCE, "rb") as f:
        source = f.read()
    # -march=native: the CPU's features are part of the key (a shared home folder may be seen
    # by machines of different kinds).
    key = hashlib.sha256(source + " ".join([cxx, *FLAGS, jaxlib.__version__, _cpu_features()]).encode())
    key = key.hexdigest()[:16]
    folder = cache_dir or os.path.join(cache_root(), "kernels")
    path = os.path.join(folder, f"cpu_gemv-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=folder)
    os.close(fd)
    cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), SOURCE, "-o", tmp]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _load():
    with _lock:
        if "lib" not in _state:
            try:
                lib = ctypes.CDLL(build())
                jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.MmjaxGemvF32), platform="cpu")
                _state["lib"] = lib
            except (RuntimeError, OSError) as e:
                _state["lib"], _state["error"] = None, str(e)
                warnings.warn(f"mmjax: CPU decode matmul kernel unavailable, using XLA's dot: {e}",
                              RuntimeWarning, stacklevel=3)
        return _state["lib"]


def available() -> bool:
    """CPU backend, not turned off by MMJAX_CPU_GEMV=0, and the library built and registered."""
    if os.environ.get("MMJAX_CPU_GEMV", "1").lower() in ("0", "false", "off", "no"):
        return False
    return jax.default_backend() == "cpu" and _load() is not None


def use_for(rows: int, dtype) -> bool:
    """Whether a [rows, K] @ [K, N] product of `dtype` goes through this kernel."""
    return rows == 1 and jnp.dtype(dtype) == jnp.float32 and not getattr(_local, "off", False) and available()


class disabled:
    """Context manager: trace without this kernel (the engine uses it under a mesh)."""

    def __enter__(self):
        self._prev, _local.off = getattr(_local, "off", False), True

    def __exit__(self, *exc):
        _local.off = self._prev


def gemv(x, w):
    """x [1, K] float32 @ w [K, N] float32 -> [1, N] float32."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[0] != 1 or x.shape[1] != w.shape[0]:
        raise ValueError(f"gemv: expects x [1, K] and w [K, N], got {x.shape} and {w.shape}")
    if x.dtype != jnp.float32 or w.dtype != jnp.float32:
        raise ValueError(f"gemv: float32 only, got {x.dtype} and {w.dtype}")
    if _load() is None:
        raise RuntimeError(f"gemv: kernel unavailable ({_state.get('error')})")
    # Under vmap (a user's own composition) the call runs once per batch element.
    out = jax.ShapeDtypeStruct((1, w.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(x, w)
