"""Serving: continuous batching over a paged KV cache (engine.py), its jitted steps (steps.py),
the page table (pages.py), the encoder cache (encoder_cache.py) and requests (request.py).
docs/serving.md."""
from mmjax.serving.engine import EngineFull, ServingEngine
from mmjax.serving.request import Request, RequestOutput

__all__ = ["EngineFull", "ServingEngine", "Request", "RequestOutput"]
