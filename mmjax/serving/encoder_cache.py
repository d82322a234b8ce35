"""Image features kept by the hash of the preprocessed pixels, bounded in bytes (LRU).

A follow-up turn that sends the same image again is not re-encoded: the key is a SHA-256 of
the encoder's input arrays (names, dtypes, shapes and bytes: the preprocessed pixels and the
vision component's own inputs, as bucketed) and of the model, the value the projector's output
on the device (what ComposedVLM.image_features returns). vLLM and SGLang
cache encoder outputs the same way; LMDeploy turns prefix caching off for VLMs instead.
The unit is one request's image set (all its images together).
"""
from __future__ import annotations

import collections
import hashlib

import numpy as np

__all__ = ["EncoderCache", "image_key"]


def image_key(model_id: str, arrays: dict) -> str:
    h = hashlib.sha256(model_id.encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class EncoderCache:
    def __init__(self, capacity_bytes: int):
        self.capacity = int(capacity_bytes)
        self._items: collections.OrderedDict[str, object] = collections.OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def get(self, key: str):
        feats = self._items.get(key)
        if feats is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return feats

    def put(self, key: str, feats) -> None:
        size = int(feats.nbytes)
        if size > self.capacity or key in self._items:
            return
        while self.bytes + size > self.capacity:
            _, old = self._items.popitem(last=False)
            self.bytes -= int(old.nbytes)
        self._items[key] = feats
        self.bytes += size

    def __len__(self) -> int:
        return len(self._items)
