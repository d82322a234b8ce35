"""The host side of the paged KV cache: which pages of the pool each sequence owns.

Axis legend: P pages in the pool, Z page size (tokens per page), L pages per row.

The device holds, per layer, k/v pools [K, P, Z, H] (mmjax.kernels.paged_attention). A sequence
owns a list of page ids; its token t lives at page pages[t // Z], offset t % Z, i.e. at the
flat slot pages[t // Z] * Z + t % Z. Page 0 is the null page: never handed out, it is where
padding tokens and padding rows write, and what padding block-table entries point at.

Prefix caching (not built yet) fits this table as vLLM's does: a page would carry a refcount
and the hash of the tokens and image content up to its end, and a full page with a known hash
would be shared instead of recomputed. `PagePool` keeps a refcount per page for that reason.
"""
from __future__ import annotations

import numpy as np

__all__ = ["PagePool", "pages_for", "slot_mapping", "NULL_PAGE"]

NULL_PAGE = 0


def pages_for(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


def slot_mapping(pages: list[int], start: int, count: int, page_size: int, width: int | None = None) -> np.ndarray:
    """Flat slots of tokens start..start+count-1 of a sequence owning `pages`, padded with the
    null slot 0 up to `width` entries."""
    t = np.arange(start, start + count)
    table = np.asarray(pages, np.int64)
    out = np.zeros((width or count,), np.int32)
    out[:count] = table[t // page_size] * page_size + t % page_size
    return out


class PagePool:
    """Free list and refcounts of the pool's pages (page 0 reserved)."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"PagePool: num_pages must be >= 2 (page 0 is the null page), got {num_pages}")
        self.num_pages, self.page_size = num_pages, page_size
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first
        self._refs = np.zeros((num_pages,), np.int32)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - 1 - len(self._free)

    @property
    def capacity(self) -> int:
        return self.num_pages - 1

    def alloc(self, n: int) -> list[int] | None:
        """n pages, or None (nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        out = [self._free.pop() for _ in range(n)]
        self._refs[out] += 1
        return out

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if self._refs[p] <= 0:
                raise RuntimeError(f"PagePool: page {p} freed twice")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)
