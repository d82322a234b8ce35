"""Build and register mmjax's CPU kernels (XLA FFI custom calls written in C++).

The sources below are compiled together with the system C++ compiler on first use into one
shared library in the mmjax cache folder (`<cache>/kernels/cpu_kernels-<key>.so`), keyed by the
sources' names and contents, the compiler command, jaxlib's version and the CPU's features
(`-march=native`), and their handlers are registered with XLA once per process. If the library
cannot be built (no compiler) mmjax warns once and every kernel's `eligible` says no: XLA's own
ops run instead, slower, same math.

Whether a program uses them at all is the KernelPolicy's business (mmjax/kernels/policy.py):
nothing here reads the environment or any other global while tracing.
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

from mmjax.compile_cache import cache_root

__all__ = ["HEADERS", "SOURCES", "TARGETS", "attention_with_reference_vjp", "available", "build", "error", "load"]

_HERE = os.path.dirname(__file__)
SOURCES = tuple(os.path.join(_HERE, f) for f in ("gemv.cc", "panels.cc", "decode_attention.cc",
                                                  "prefill_attention.cc", "write_rows.cc"))
HEADERS = tuple(os.path.join(_HERE, f) for f in ("simd.h", "pool.h", "rows.h"))
# XLA target name -> the handler symbol the library exports.
TARGETS = {"mmjax_gemv_f32": "MmjaxGemvF32", "mmjax_gemv_bf16": "MmjaxGemvBF16", "mmjax_gemv_s8": "MmjaxGemvS8",
           "mmjax_gemv_panels_f32": "MmjaxGemvPanelsF32", "mmjax_gemv_panels_bf16": "MmjaxGemvPanelsBF16",
           "mmjax_gemv_panels_s8": "MmjaxGemvPanelsS8",
           "mmjax_decode_attention_f32": "MmjaxDecodeAttentionF32",
           "mmjax_decode_attention_bf16": "MmjaxDecodeAttentionBF16", "mmjax_decode_attention_s8": "MmjaxDecodeAttentionS8",
           "mmjax_paged_decode_attention_f32": "MmjaxPagedDecodeAttentionF32",
           "mmjax_paged_decode_attention_bf16": "MmjaxPagedDecodeAttentionBF16",
           "mmjax_paged_decode_attention_s8": "MmjaxPagedDecodeAttentionS8",
           "mmjax_prefill_attention_f32": "MmjaxPrefillAttentionF32", "mmjax_write_rows": "MmjaxWriteRows",
           "mmjax_read_rows": "MmjaxReadRows"}
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
_lock = threading.Lock()
_state: dict = {}  # "lib": ctypes.CDLL | None, "error": str


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        import platform

        return platform.machine() + platform.processor()


def build(cache_dir: str | None = None) -> str:
    """Compile SOURCES (which include HEADERS) into one library unless already built; returns its path.
    Raises RuntimeError with the compiler's command and output when that fails."""
    import jaxlib

    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (install g++ or set CXX)")
    h = hashlib.sha256()
    for src in SOURCES + HEADERS:
        h.update(os.path.basename(src).encode())  # the #include lines name the headers
        with open(src, "rb") as f:
            h.update(f.read())
    # -march=native: the CPU's features are part of the key (a shared home folder may be seen
    # by machines of different kinds).
    h.update(" ".join([cxx, *FLAGS, jaxlib.__version__, _cpu_features()]).encode())
    folder = cache_dir or os.path.join(cache_root(), "kernels")
    path = os.path.join(folder, f"cpu_kernels-{h.hexdigest()[:16]}.so")
    if os.path.exists(path):
        return path
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=folder)
    os.close(fd)
    cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), *SOURCES, "-o", tmp]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load():
    """The built library with every target registered, or None (after one warning)."""
    with _lock:
        if "lib" not in _state:
            try:
                lib = ctypes.CDLL(build())
                for target, symbol in TARGETS.items():
                    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
                _state["lib"] = lib
            except (RuntimeError, OSError, AttributeError) as e:
                _state["lib"], _state["error"] = None, str(e)
                warnings.warn(f"mmjax: CPU kernels unavailable, using XLA's own ops: {e}", RuntimeWarning,
                              stacklevel=3)
        return _state["lib"]


def error() -> str | None:
    """Why the library could not be built or loaded (None when it was, or not yet tried)."""
    return _state.get("error")


def attention_with_reference_vjp(kernel, reference):
    """kernel(q, k, v, start, end, scale) as a custom_vjp whose backward pass is reference's
    (same arguments; scale static): the custom calls have no derivative of their own, so
    jax.grad through them takes the jnp reference's."""
    f = jax.custom_vjp(kernel, nondiff_argnums=(5,))

    def fwd(q, k, v, start, end, scale):
        return f(q, k, v, start, end, scale), (q, k, v, start, end)

    def bwd(scale, res, g):
        q, k, v, start, end = res
        dq, dk, dv = jax.vjp(lambda q, k, v: reference(q, k, v, start, end, scale), q, k, v)[1](g)
        return dq, dk, dv, None, None  # no cotangent for the integer intervals

    f.defvjp(fwd, bwd)
    return f


def available() -> bool:
    """The library built and registered (built on the first call)."""
    return load() is not None
