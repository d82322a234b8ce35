"""Which keys each query may attend to: MaskSpec (data, not a [T, S] matrix) and its readings.

Axis legend: B batch, T query length, S key/value length.

Every attention path reads a MaskSpec through one of these, so they all mean the same thing:
  * `visible(pos, kpos, ...)`: the predicate itself, on broadcastable operands (the Triton
    kernel's body calls it on one tile);
  * `make_mask(mask, T, S)`: bool [B|1, 1, T, S] (the jnp references and the XLA path);
  * `query_ranges(mask, B, T, S)`: each query's key interval [start, end), for every mask
    without segment ids or whose segments are contiguous runs (the CPU kernels, the decode
    kernels, the XLA path's and the flash kernel's per-segment work);
  * `decode_range`: query_ranges for one query token.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from mmjax.errors import InputError

__all__ = ["NEG_INF", "MaskSpec", "decode_range", "has_ranges", "make_mask", "query_ranges", "segment_runs",
           "visible"]

NEG_INF = float("-inf")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["q_offset", "kv_lengths", "prefix_lengths", "q_segment_ids", "kv_segment_ids"],
    meta_fields=["causal", "sliding_window", "contiguous_segments", "max_segment_length"],
)
@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Which keys each query may attend to, described by data instead of a [T, S] matrix.

    Query t of row b sits at absolute position `q_offset[b] + t`; key s sits at position s
    (keys are the KV cache, 0..S-1). Key s is visible to query t iff all of these hold:
      * `s < kv_lengths[b]`                                  (key padding / cache fill)
      * causal: `s <= pos` and, with a window, `pos - s < sliding_window`; OR, with a
        prefix, `s < prefix_lengths[b]` while `pos < prefix_lengths[b]` (prefix-LM: the
        prefix attends bidirectionally within itself, later queries are causal)
      * not causal (bidirectional), with a window: `|pos - s| < sliding_window`
      * segments: `q_segment_ids[b, t] == kv_segment_ids[b, s]` and the id is >= 0; a
        negative id marks padding (packed sequences, Qwen2.5-VL window attention).
        `kv_segment_ids=None` reuses `q_segment_ids` (self-attention, needs T == S).
    A query row that sees no key at all gets output 0 (never NaN).

    `contiguous_segments=True` is a promise about the data, for self-attention segments: every
    id >= 0 occurs in ONE run of consecutive positions (packed images, Qwen2.5-VL windows after
    their reorder; padding, id < 0, may be anywhere). Then each query sees one key interval,
    its run intersected with the other terms (`query_ranges`), and the kernels work per segment:
    cost Σ segment² instead of T·S. `max_segment_length` (optional) bounds every run's length;
    the XLA path sizes its key windows by it. If the promise is broken, an id's other runs are
    not seen by the interval paths (the dense mask would see them): the caller must keep it.

    Arrays are pytree leaves (traced under jit); `causal`, `sliding_window`,
    `contiguous_segments` and `max_segment_length` are static.
    """

    causal: bool = True
    q_offset: jax.Array | None = None  # [B] int32, default 0
    kv_lengths: jax.Array | None = None  # [B] int32, default S
    prefix_lengths: jax.Array | None = None  # [B] int32, used only when causal
    sliding_window: int | None = None
    q_segment_ids: jax.Array | None = None  # [B, T] int32
    kv_segment_ids: jax.Array | None = None  # [B, S] int32
    contiguous_segments: bool = False  # each segment id >= 0 is one run of positions (self-attention)
    max_segment_length: int | None = None  # static bound on a run's length (contiguous segments only)

    def __post_init__(self):
        if self.sliding_window is not None and self.sliding_window < 1:
            raise InputError(f"MaskSpec: sliding_window={self.sliding_window} must be >= 1 or None")
        if self.kv_segment_ids is not None and self.q_segment_ids is None:
            raise InputError("MaskSpec: kv_segment_ids given without q_segment_ids")
        if self.contiguous_segments and (self.q_segment_ids is None or self.kv_segment_ids is not None):
            raise InputError("MaskSpec: contiguous_segments=True needs q_segment_ids and no kv_segment_ids "
                             "(self-attention segments)")
        if self.max_segment_length is not None and (not self.contiguous_segments or self.max_segment_length < 1):
            raise InputError(f"MaskSpec: max_segment_length={self.max_segment_length} needs "
                             f"contiguous_segments=True and a value >= 1")

    @property
    def bidirectional(self) -> bool:
        return not self.causal

    @property
    def is_trivial(self) -> bool:
        """True when every query sees every key (nothing to mask)."""
        return (
            not self.causal
            and self.sliding_window is None
            and self.kv_lengths is None
            and self.q_segment_ids is None
        )

    def segments(self):
        """(q_segment_ids [B, T], kv_segment_ids [B, S]) or (None, None)."""
        if self.q_segment_ids is None:
            return None, None
        kv = self.q_segment_ids if self.kv_segment_ids is None else self.kv_segment_ids
        return self.q_segment_ids, kv

    def check(self, batch: int, q_len: int, kv_len: int) -> None:
        """Raises InputError naming the field whose shape does not fit [B, T] / [B, S]."""
        want = {
            "q_offset": (batch,),
            "kv_lengths": (batch,),
            "prefix_lengths": (batch,),
            "q_segment_ids": (batch, q_len),
            "kv_segment_ids": (batch, kv_len),
        }
        for name, shape in want.items():
            x = getattr(self, name)
            if x is not None and tuple(x.shape) != shape:
                raise InputError(f"MaskSpec.{name}: expected shape {shape}, got {tuple(x.shape)}")
        if self.q_segment_ids is not None and self.kv_segment_ids is None and q_len != kv_len:
            raise InputError(
                f"MaskSpec: q_segment_ids alone needs T == S ({q_len=}, {kv_len=}); pass kv_segment_ids"
            )


def visible(pos, kpos, *, causal, window, kv_len=None, prefix=None, q_seg=None, kv_seg=None):
    """The mask predicate of MaskSpec, on broadcastable operands (e.g. pos [.., T, 1],
    kpos [.., 1, S]). Shared by make_mask and the kernel body so both mean the same thing.
    Returns None when nothing is masked."""
    ok = None

    def both(a, b):
        return b if a is None else a & b

    if kv_len is not None:
        ok = both(ok, kpos < kv_len)
    if causal:
        seen = kpos <= pos
        if window is not None:
            seen = seen & (pos - kpos < window)
        if prefix is not None:
            seen = seen | ((kpos < prefix) & (pos < prefix))
        ok = both(ok, seen)
    elif window is not None:
        ok = both(ok, (pos - kpos < window) & (kpos - pos < window))
    if q_seg is not None:
        ok = both(ok, (q_seg == kv_seg) & (q_seg >= 0))
    return ok


def make_mask(mask: MaskSpec, q_len: int, kv_len: int) -> jax.Array:
    """bool [B or 1, 1, T, S]: True where query t may attend to key s (broadcasts over heads)."""
    rows = lambda x: None if x is None else jnp.asarray(x, jnp.int32)[:, None, None]  # [B, 1, 1]
    q_off = rows(mask.q_offset)
    pos = jnp.arange(q_len, dtype=jnp.int32)[None, :, None]  # [1, T, 1]
    pos = pos if q_off is None else pos + q_off
    kpos = jnp.arange(kv_len, dtype=jnp.int32)[None, None, :]  # [1, 1, S]
    q_seg, kv_seg = mask.segments()
    ok = visible(
        pos,
        kpos,
        causal=mask.causal,
        window=mask.sliding_window,
        kv_len=rows(mask.kv_lengths),
        prefix=rows(mask.prefix_lengths) if mask.causal else None,
        q_seg=None if q_seg is None else jnp.asarray(q_seg, jnp.int32)[:, :, None],
        kv_seg=None if kv_seg is None else jnp.asarray(kv_seg, jnp.int32)[:, None, :],
    )
    if ok is None:
        ok = jnp.ones((1, q_len, kv_len), bool)
    ok = jnp.broadcast_to(ok, (ok.shape[0], q_len, kv_len))
    return ok[:, None]  # [B|1, 1, T, S]


def has_ranges(mask: MaskSpec) -> bool:
    """Whether query_ranges can state this mask: no segment ids, or contiguous ones."""
    return mask.q_segment_ids is None or mask.contiguous_segments


def segment_runs(seg):
    """seg [B, T] int32 -> (run_start [B, T], run_end [B, T]): the run of equal ids around each
    position, in O(T) (a cumulative max of run starts, a reversed cumulative min of run ends)."""
    T = seg.shape[1]
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), seg.shape)
    change = seg[:, 1:] != seg[:, :-1]  # [B, T-1]: position t+1 starts a run
    first = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), change], axis=1)
    last = jnp.concatenate([change, jnp.ones_like(seg[:, :1], bool)], axis=1)
    run_start = lax.cummax(jnp.where(first, idx, 0), axis=1)
    run_end = lax.cummin(jnp.where(last, idx + 1, T), axis=1, reverse=True)
    return run_start, run_end


def query_ranges(mask: MaskSpec, batch: int, q_len: int, kv_len: int):
    """Every MaskSpec without segments, or with contiguous ones (has_ranges), gives each query an
    interval of keys: returns (start [B, T], end [B, T]) int32 with visible keys start <= s < end
    for query t of row b. A query that sees nothing may get any empty interval."""
    if not has_ranges(mask):
        raise InputError("query_ranges: segment ids that are not contiguous_segments have no interval per query")
    rows = lambda x, default: default if x is None else jnp.asarray(x, jnp.int32)[:, None]
    zeros = jnp.zeros((batch, q_len), jnp.int32)
    pos = rows(mask.q_offset, jnp.zeros((batch, 1), jnp.int32)) + jnp.arange(q_len, dtype=jnp.int32)[None, :]
    end = rows(mask.kv_lengths, jnp.full((batch, 1), kv_len, jnp.int32)) + zeros
    start = zeros
    # A window wider than any distance is no window; capped so that pos + window stays in int32.
    window = None if mask.sliding_window is None else min(mask.sliding_window, 2**30)
    if mask.causal:
        c_end, c_start = pos + 1, (zeros if window is None else pos - window + 1)
        if mask.prefix_lengths is not None:  # inside the prefix: the whole prefix
            prefix = rows(mask.prefix_lengths, None)
            inside = pos < prefix
            c_end, c_start = jnp.where(inside, prefix, c_end), jnp.where(inside, 0, c_start)
        end, start = jnp.minimum(end, c_end), c_start
    elif window is not None:
        end, start = jnp.minimum(end, pos + window), pos - window + 1
    if mask.q_segment_ids is not None:  # contiguous: the query's own run (T == S), padding sees nothing
        seg = jnp.asarray(mask.q_segment_ids, jnp.int32)
        run_start, run_end = segment_runs(seg)
        start, end = jnp.maximum(start, run_start), jnp.where(seg >= 0, jnp.minimum(end, run_end), 0)
    return jnp.clip(start, 0, kv_len), jnp.clip(end, 0, kv_len)


def decode_range(mask: MaskSpec, batch: int, kv_len: int):
    """query_ranges for a single query (T == 1): (start [B], end [B]) int32."""
    start, end = query_ranges(mask, batch, 1, kv_len)
    return start[:, 0], end[:, 0]
