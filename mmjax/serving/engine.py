"""Continuous batching over a paged KV cache: many requests, one running batch, one step at a time.

    eng = ServingEngine(mmjax.load("ckpt-flax/"), max_num_seqs=32)
    outs = eng.generate([eng.make_request([image], "<image> Describe it.", max_new_tokens=64), ...])

or, as the server drives it (mmjax.serving.async_engine), add_request / abort from any thread and
step() from one. Each step():
  1. takes new requests and aborts from the inbox;
  2. admits waiting requests while a row and pages are free (at most max_prefill_tokens of
     prompt per step, at least one request): encodes their images (or takes the features from
     the encoder cache), prefills each prompt, writes its keys into its pages and picks its
     first token;
  3. runs one decode step for every running sequence (a batch bucket of rows, a page bucket of
     block-table width), first giving each sequence the page its next token needs; when none
     is free, the newest running sequence is preempted (its pages freed, itself put back at the
     head of the queue, recomputed by a prefill later): never an error, never a lost request.
A sequence leaves the batch on its stop token or max_new_tokens (its pages are freed at once).

Axis legend: B rows, T tokens, L pages per row, Z page size, E stop-id slots.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.api import MAX_STOP_IDS, _bucketed_batch, _lengths, _stop_ids
from mmjax.bucketing import pick
from mmjax.components import get_component
from mmjax.errors import InputError, MmjaxError
from mmjax.generation.sampling import SamplingParams
from mmjax.kernels.attention import MaskSpec
from mmjax.kernels.kv_cache import check_kv_cache_dtype, storage_dtype
from mmjax.models.base import decode_params
from mmjax.serving.encoder_cache import EncoderCache, image_key
from mmjax.sharding.rules import logical_to_spec
from mmjax.serving.pages import NULL_PAGE, PagePool, pages_for, slot_mapping
from mmjax.serving.request import Request, RequestOutput
from mmjax.serving.steps import PagedSteps, RowArgs

__all__ = ["EngineFull", "ServingEngine"]


class EngineFull(MmjaxError):
    """The engine's waiting queue is full (the server answers 429)."""


def _pow2_upto(n: int) -> tuple[int, ...]:
    out, v = [], 1
    while v < n:
        out.append(v)
        v *= 2
    return tuple(out) + (n,)


def pool_sharding(mesh, shape):
    """One layer's page pool [K, P, Z, H] (or its int8 scales [K, P, Z]) on a mesh: kv heads over
    `model` (as the static cache's K), the rest replicated; heads that do not divide fall back to
    replicated."""
    from jax.sharding import NamedSharding

    return NamedSharding(mesh, logical_to_spec("serving page pool", shape, ("K",) + (None,) * (len(shape) - 1), mesh))


@dataclasses.dataclass(eq=False)  # identity: a sequence is itself, whatever its fields
class _Seq:
    req: Request
    stops: frozenset
    key: np.ndarray  # [2] uint32
    pages: list[int] = dataclasses.field(default_factory=list)
    tokens: list[int] = dataclasses.field(default_factory=list)  # generated so far
    index: int = 0  # cache slots holding keys (the next token's slot)
    pos_offset: int = 0
    reported: int = 0  # tokens already handed out in RequestOutputs
    finish_reason: str | None = None
    error: Exception | None = None  # why this request failed alone (finish_reason "abort")


class ServingEngine:
    def __init__(self, model, *, max_num_seqs: int = 32, max_model_len: int | None = None, page_size: int = 16,
                 num_pages: int | None = None, kv_cache_mb: int = 1024, max_waiting: int = 256,
                 max_prefill_tokens: int = 2048, encoder_cache_mb: int = 256, kv_cache_dtype: str | None = None):
        if not hasattr(model.module, "decode"):
            raise InputError(f"ServingEngine: family {model.family.name!r} has no decoder")
        for name, v in (("max_num_seqs", max_num_seqs), ("page_size", page_size), ("max_waiting", max_waiting),
                        ("max_prefill_tokens", max_prefill_tokens)):
            if not isinstance(v, int) or v <= 0:
                raise InputError(f"ServingEngine: {name} must be a positive integer, got {v!r}")
        self.model = model
        limit = min(model.config.text.max_position_embeddings, model.buckets.prompt[-1])
        self.max_model_len = limit if max_model_len is None else int(max_model_len)
        if not 0 < self.max_model_len <= limit:
            raise InputError(f"ServingEngine: max_model_len {max_model_len} must be in [1, {limit}] (the model's "
                             "context and the largest prompt bucket)")
        self.max_num_seqs, self.page_size = max_num_seqs, page_size
        self.max_waiting, self.max_prefill_tokens = max_waiting, max_prefill_tokens
        self.max_pages_per_seq = pages_for(self.max_model_len, page_size)
        self.page_buckets = _pow2_upto(self.max_pages_per_seq)
        self.batch_buckets = tuple(b for b in model.buckets.batch if b < max_num_seqs) + (max_num_seqs,)

        layers = self._kv_layout()  # [(K, H)] per layer
        self.kv_cache_dtype = check_kv_cache_dtype(kv_cache_dtype or model.kv_cache_dtype)
        store = storage_dtype(self.kv_cache_dtype, model.dtype)
        quantized = self.kv_cache_dtype == "int8"  # + a float32 scale per token and kv head
        per_page = sum(2 * K * (H * store.itemsize + 4 * quantized) for K, H in layers) * page_size
        if num_pages is None:
            want = max_num_seqs * self.max_pages_per_seq + 1
            num_pages = max(2, min(want, int(kv_cache_mb * 2**20 // per_page)))
        self.pool = PagePool(int(num_pages), page_size)
        self.kv_bytes = per_page * self.pool.num_pages
        P = self.pool.num_pages
        layout = [{"k": ((K, P, page_size, H), store), "v": ((K, P, page_size, H), store),
                   **({"k_scale": ((K, P, page_size), jnp.float32), "v_scale": ((K, P, page_size), jnp.float32)}
                      if quantized else {})} for K, H in layers]
        self.pool_shardings = None if model.mesh is None else \
            [{n: pool_sharding(model.mesh, shp) for n, (shp, _) in lay.items()} for lay in layout]
        self.pools = [{n: self._zeros(shp, dt, i, n) for n, (shp, dt) in lay.items()} for i, lay in enumerate(layout)]
        # one set of jitted programs per loaded model and cache dtype, shared by its engines
        # (compiled once); with a mesh the pools are split over kv heads like the static cache
        self.steps = model.__dict__.setdefault(f"_serving_steps_{self.kv_cache_dtype}",
                                               PagedSteps(model.module, self.pool_shardings))
        self.encoder_cache = EncoderCache(encoder_cache_mb * 2**20)
        vision_type = getattr(model.config, "vision_type", None)
        self._vision_keys = None if vision_type is None or not hasattr(model.module, "image_features") else \
            {"pixel_values", *get_component("vision", vision_type).inputs}

        self._lock = threading.Lock()
        self._inbox: list[Request] = []
        self._aborts: set[str] = set()
        self.waiting: collections.deque[_Seq] = collections.deque()
        self.running: list[_Seq] = []
        self.preemptions = 0

    def _zeros(self, shape, dtype, layer, name):
        if self.pool_shardings is None:
            return jnp.zeros(shape, dtype)
        return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=self.pool_shardings[layer][name])()

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def _kv_layout(self) -> list[tuple[int, int]]:
        """(kv heads, head dim) of each layer, read off an abstract prefill of 8 tokens."""
        batch = {"input_ids": jnp.zeros((1, 8), jnp.int32)}

        def run(mod):
            x, positions, _ = mod.embed(batch)
            return mod.decode(x, positions, MaskSpec(causal=True, kv_lengths=jnp.full((1,), 8, jnp.int32)))[1]

        kv = jax.eval_shape(lambda p: self.model.module.apply({"params": p}, method=run), self.model.params)
        return [(c["k"].shape[2], c["k"].shape[3]) for c in kv]

    # --- requests ---------------------------------------------------------------------------
    def make_request(self, images=None, prompt: str = "", *, prompt_token_ids: Sequence[int] | None = None,
                     chat_template: bool | None = None, mm_processor_kwargs: dict | None = None,
                     max_new_tokens: int | None = 64, min_new_tokens: int = 0, temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, seed: int = 0, stop_token_ids: Sequence[int] | None = None,
                     request_id: str | None = None) -> Request:
        """One request, checked on the host (InputError names the field). Preprocessing is the
        model's own (Model.preprocess), so a request sees exactly what mmjax.generate would.
        max_new_tokens=None: up to the end of max_model_len (vLLM's default without max_tokens).
        Host work only: safe to call from any thread while another runs step()."""
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                           or max_new_tokens <= 0):
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int) \
                or not 0 <= min_new_tokens <= (max_new_tokens or self.max_model_len):
            raise InputError(f"min_new_tokens must be an integer in [0, max_new_tokens], got {min_new_tokens!r}")
        sampling = SamplingParams(temperature, top_k, top_p, seed)
        if prompt_token_ids is not None:  # a model's own tokenization; images at its image token ids
            if isinstance(prompt_token_ids, (list, tuple)) and prompt_token_ids and \
                    isinstance(prompt_token_ids[0], (list, tuple)):
                raise InputError("prompt_token_ids: one request takes one list of token ids")
            if prompt not in ("", None):
                raise InputError("prompt_token_ids: give a text prompt or prompt_token_ids, not both")
            if not images and (not isinstance(prompt_token_ids, (list, tuple)) or not prompt_token_ids):
                raise InputError("prompt_token_ids: a non-empty list of token ids is needed")
            inputs = self.model.preprocess(images, prompt_token_ids=list(prompt_token_ids),
                                           mm_processor_kwargs=mm_processor_kwargs)
        else:
            if not isinstance(prompt, str):
                raise InputError(f"prompt must be a str, got {type(prompt).__name__}")
            inputs = self.model.preprocess(images, prompt, chat_template=chat_template,
                                           mm_processor_kwargs=mm_processor_kwargs)
        n = int(_lengths(inputs["input_ids"], inputs.get("attention_mask"))[0])
        ids = np.asarray(inputs["input_ids"])[0, :n].tolist()
        mm = {k: np.asarray(v) for k, v in inputs.items() if k not in ("input_ids", "attention_mask")
              and v is not None}
        if max_new_tokens is None:
            if len(ids) >= self.max_model_len:
                raise InputError(f"prompt: {len(ids)} tokens leave no room in max_model_len={self.max_model_len}")
            max_new_tokens = self.max_model_len - len(ids)
            if min_new_tokens > max_new_tokens:
                raise InputError(f"min_new_tokens={min_new_tokens}: only {max_new_tokens} tokens fit after the prompt")
        if len(ids) + max_new_tokens > self.max_model_len:
            raise InputError(f"max_tokens: prompt of {len(ids)} tokens + max_new_tokens={max_new_tokens} exceeds "
                             f"max_model_len={self.max_model_len}")
        if pages_for(len(ids) + max_new_tokens, self.page_size) > self.pool.capacity:
            raise InputError(f"max_tokens: prompt of {len(ids)} tokens + max_new_tokens={max_new_tokens} needs more "
                             f"KV-cache pages than the pool has ({self.pool.capacity} of {self.page_size} tokens)")
        stops = tuple(_stop_ids(self.model, stop_token_ids))
        kw = {} if request_id is None else {"request_id": str(request_id)}
        return Request([int(t) for t in ids], mm, sampling, max_new_tokens, min_new_tokens, stops, **kw)

    def add_request(self, req: Request) -> None:
        """Queue a request (thread-safe). EngineFull when max_waiting requests already wait."""
        with self._lock:
            if len(self._inbox) + len(self.waiting) >= self.max_waiting:
                raise EngineFull(f"the queue is full ({self.max_waiting} requests waiting)")
            req.arrival = time.monotonic()
            self._inbox.append(req)

    def abort(self, request_id: str) -> None:
        """Stop a request (thread-safe): its pages are freed at the next step, which reports it
        finished with finish_reason "abort". Unknown or finished ids are ignored."""
        with self._lock:
            self._aborts.add(request_id)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._inbox or self._aborts or self.waiting or self.running)

    def stats(self) -> dict:
        """A snapshot of the engine's counters; safe to read from any thread (sizes only)."""
        return {"waiting": len(self.waiting) + len(self._inbox), "running": len(self.running),
                "pages_used": self.pool.num_used, "pages_total": self.pool.capacity,
                "encoder_cache_hits": self.encoder_cache.hits, "encoder_cache_misses": self.encoder_cache.misses,
                "encoder_cache_bytes": self.encoder_cache.bytes, "preemptions": self.preemptions}

    def generate(self, requests: Sequence[Request]) -> list[RequestOutput]:
        """Run requests to completion (offline); their final outputs, in the order given."""
        final: dict[str, RequestOutput] = {}
        with self._lock:
            for r in requests:
                r.arrival = time.monotonic()
                self._inbox.append(r)
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[r.request_id] for r in requests]

    # --- one iteration ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        with self._lock:
            new, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, set()
        for r in new:
            self.waiting.append(_Seq(r, frozenset(r.stop_token_ids),
                                     np.asarray(jax.random.key_data(jax.random.PRNGKey(r.sampling.seed)), np.uint32)))
        if aborts:
            self._abort(aborts, outputs)
        self._admit(outputs)
        if self.running:
            self._decode(outputs)
        return outputs

    def _output(self, seq: _Seq) -> RequestOutput:
        new = seq.tokens[seq.reported:]
        seq.reported = len(seq.tokens)
        return RequestOutput(seq.req.request_id, new, list(seq.tokens), seq.req.num_prompt_tokens,
                             seq.finish_reason is not None, seq.finish_reason, seq.error)

    def _release(self, seq: _Seq) -> None:
        self.pool.free(seq.pages)
        seq.pages = []

    def _abort(self, ids: set, outputs: list) -> None:
        for seq in [s for s in self.running if s.req.request_id in ids]:
            self.running.remove(seq)
            self._release(seq)
            seq.finish_reason = "abort"
            outputs.append(self._output(seq))
        for seq in [s for s in self.waiting if s.req.request_id in ids]:
            self.waiting.remove(seq)
            self._release(seq)
            seq.finish_reason = "abort"
            outputs.append(self._output(seq))

    def _append(self, seq: _Seq, tok: int) -> None:
        """Record a generated token; finish on a stop token (once min_new_tokens are out) or at
        max_new_tokens, as mmjax.generate does."""
        seq.tokens.append(tok)
        n = len(seq.tokens)
        if tok in seq.stops and n > seq.req.min_new_tokens:
            seq.finish_reason = "stop"
        elif n >= seq.req.max_new_tokens:
            seq.finish_reason = "length"

    def _rows(self, seqs: list[_Seq], rows: int) -> RowArgs:
        def col(f, dtype, pad):
            return np.asarray([f(s) for s in seqs] + [pad] * (rows - len(seqs)), dtype)

        stops = np.full((rows, MAX_STOP_IDS), -1, np.int32)
        for i, s in enumerate(seqs):
            stops[i, :len(s.stops)] = sorted(s.stops)
        keys = np.zeros((rows, 2), np.uint32)
        keys[:len(seqs)] = [s.key for s in seqs]
        return RowArgs(col(lambda s: s.req.sampling.temperature, np.float32, 0.0),
                       col(lambda s: s.req.sampling.top_k, np.int32, 0), col(lambda s: s.req.sampling.top_p, np.float32, 1.0),
                       keys, col(lambda s: len(s.tokens), np.int32, 0), stops,
                       col(lambda s: s.req.min_new_tokens, np.int32, 0))

    # --- admission and prefill ----------------------------------------------------------------
    def _admit(self, outputs: list) -> None:
        budget = self.max_prefill_tokens
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            known = seq.req.num_prompt_tokens + max(len(seq.tokens) - 1, 0)  # tokens whose keys prefill writes
            if known > budget and budget < self.max_prefill_tokens:
                break  # the next step's budget takes it
            pages = self.pool.alloc(pages_for(known + 1, self.page_size))  # + the first decode token's slot
            if pages is None:
                break  # waits for pages (running sequences free theirs as they finish)
            self.waiting.popleft()
            seq.pages = pages
            budget -= known
            try:
                self._prefill(seq, known)
            except Exception as e:  # this request's inputs failed on the device: it alone ends
                seq.finish_reason, seq.error = "abort", e
            if seq.finish_reason is not None:
                self._release(seq)
            else:
                self.running.append(seq)
            if seq.tokens[seq.reported:] or seq.finish_reason:
                outputs.append(self._output(seq))

    def _prefill(self, seq: _Seq, known: int) -> None:
        """Keys of the prompt (and, after a preemption, of the tokens generated before it) into
        the sequence's pages; a fresh request also gets its first token here."""
        ids = np.asarray([seq.req.prompt_token_ids + seq.tokens[:known - seq.req.num_prompt_tokens]], np.int32)
        lengths = np.asarray([known], np.int32)
        batch = _bucketed_batch(self.model, {"input_ids": ids, **seq.req.mm_inputs}, lengths)
        if batch.get("pixel_values") is not None and self._vision_keys is not None:
            batch = self._with_image_features(seq.req, batch)
        T = batch["input_ids"].shape[1]
        slots = slot_mapping(seq.pages, 0, known, self.page_size, width=T)[None]
        greedy = seq.req.sampling.greedy
        self.pools, tok, pos_offset = self.steps.prefill(self.model.params, self.pools, batch, jnp.asarray(lengths),
                                                         jnp.asarray(slots), self._rows([seq], 1), greedy=greedy)
        seq.index, seq.pos_offset = known, int(pos_offset[0])
        if not seq.tokens:  # a fresh request: its first token (a recomputed one keeps its own)
            self._append(seq, int(tok[0]))

    def _with_image_features(self, req: Request, batch: dict) -> dict:
        """The batch with the encoder's inputs replaced by their features, taken from the encoder
        cache when the same inputs were encoded before (the key is the hash of exactly what the
        encoder reads, so a prompt-dependent array never splits the entry)."""
        vision = {k: v for k, v in batch.items() if k in self._vision_keys}
        key = image_key(self.model.path, {k: np.asarray(v) for k, v in vision.items()})
        feats = self.encoder_cache.get(key)
        if feats is None:
            feats = self.steps.encode(self.model.params, vision)
            self.encoder_cache.put(key, feats)
        return {**{k: v for k, v in batch.items() if k not in vision}, "image_features": feats}

    # --- decode -------------------------------------------------------------------------------
    def _grow(self) -> None:
        """Give each running sequence the page its next token's keys go to, preempting the
        newest sequence when the pool is empty."""
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if seq.index // self.page_size < len(seq.pages):
                i += 1
                continue
            page = self.pool.alloc(1)
            if page is not None:
                seq.pages += page
                i += 1
                continue
            victim = self.running.pop()  # the newest; recomputed from its tokens when readmitted
            self._release(victim)
            self.waiting.appendleft(victim)
            self.preemptions += 1

    def _decode(self, outputs: list) -> None:
        self._grow()
        seqs = self.running
        if not seqs:
            return
        B = pick(len(seqs), self.batch_buckets, "running sequences")
        L = pick(max(len(s.pages) for s in seqs), self.page_buckets, "pages per sequence")
        last = np.zeros((B,), np.int32)
        index = np.zeros((B,), np.int32)
        offset = np.zeros((B,), np.int32)
        slots = np.zeros((B,), np.int32)  # padding rows write into the null page
        tables = np.full((B, L), NULL_PAGE, np.int32)
        for i, s in enumerate(seqs):
            last[i], index[i], offset[i] = s.tokens[-1], s.index, s.pos_offset
            slots[i] = s.pages[s.index // self.page_size] * self.page_size + s.index % self.page_size
            tables[i, :len(s.pages)] = s.pages
        greedy = all(s.req.sampling.greedy for s in seqs)
        params = decode_params(self.model.module, self.model.params)  # only what a decode step reads
        self.pools, tok = self.steps.decode(params, self.pools, jnp.asarray(last), jnp.asarray(index),
                                            jnp.asarray(offset), jnp.asarray(slots), jnp.asarray(tables),
                                            self._rows(seqs, B), greedy=greedy)
        tok = np.asarray(tok)
        still = []
        for i, s in enumerate(seqs):
            s.index += 1
            self._append(s, int(tok[i]))
            if s.finish_reason is not None:
                self._release(s)
            else:
                still.append(s)
            outputs.append(self._output(s))
        self.running = still



