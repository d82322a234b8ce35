"""Counting compilations with JAX's own monitoring events (not by guess).

    with count_compiles() as c:
        mmjax.generate(...)
    c.by_function  # {"jit(_prefill)": 1, "jit(_decode_steps)": 1}
"""
from __future__ import annotations

import collections
import contextlib

from jax import monitoring

__all__ = ["count_compiles", "CompileCount"]

# Recorded once per XLA backend compilation (a persistent-cache hit records no such event).
_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCount:
    def __init__(self):
        self.by_function: collections.Counter = collections.Counter()
        self.seconds = 0.0
        self.active = True

    @property
    def total(self) -> int:
        return sum(self.by_function.values())

    def _listener(self, event: str, duration: float, **kw):
        if self.active and event == _EVENT:
            self.by_function[kw.get("fun_name", "?")] += 1
            self.seconds += duration


_listeners: list[CompileCount] = []
_installed = False


def _dispatch(event: str, duration: float, **kw):
    for c in _listeners:
        c._listener(event, duration, **kw)


@contextlib.contextmanager
def count_compiles():
    global _installed
    if not _installed:  # JAX has no unregister: install one dispatcher, once
        monitoring.register_event_duration_secs_listener(_dispatch)
        _installed = True
    c = CompileCount()
    _listeners.append(c)
    try:
        yield c
    finally:
        c.active = False
        _listeners.remove(c)
