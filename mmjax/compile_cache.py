"""JAX's persistent compilation cache, on by default for mmjax programs.

A fresh process that has run the same shapes before loads the compiled executables from disk
instead of recompiling (time to first token drops from compile time to load time).
Opt out with MMJAX_COMPILE_CACHE=0 (or `mmjax.load(..., compile_cache=False)`); choose the
folder with MMJAX_COMPILE_CACHE_DIR (default: $XDG_CACHE_HOME/mmjax/jax, i.e. ~/.cache/mmjax/jax).
"""
from __future__ import annotations

import os

import jax

__all__ = ["cache_root", "default_dir", "enable", "enabled_by_env"]

_enabled_dir: str | None = None


def cache_root() -> str:
    """$XDG_CACHE_HOME/mmjax (default ~/.cache/mmjax): where mmjax keeps what it builds."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mmjax")


def default_dir() -> str:
    return os.environ.get("MMJAX_COMPILE_CACHE_DIR") or os.path.join(cache_root(), "jax")


def enabled_by_env() -> bool:
    return os.environ.get("MMJAX_COMPILE_CACHE", "1").lower() not in ("0", "false", "off", "no")


def enable(path: str | None = None) -> str | None:
    """Turn the cache on (idempotent). Returns the folder, or None when it could not be created."""
    global _enabled_dir
    path = path or default_dir()
    if _enabled_dir == path:
        return path
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None  # an unwritable cache folder must not stop inference
    jax.config.update("jax_compilation_cache_dir", path)
    # Cache every program: mmjax's are few and each saves a whole compile.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _enabled_dir = path
    return path
