"""Generation as a state plus pure jitted steps: prefill, decode_step(s), and the loop over them.

    engine = Engine(module)
    state = engine.prefill(params, batch, lengths, args, cache_len=..., token_slots=..., greedy=True)
    state = engine.decode_step(params, state, args, greedy=True)      # donated: cache updated in place
    state = engine.decode_steps(params, state, args, jnp.int32(8), greedy=True)  # 8 steps in one call
    result = engine.run(params, batch, lengths, args, ...)              # the whole loop (mmjax.generate)

Axis legend: B rows, T prompt tokens, S cache slots (prompt bucket + token slots), K kv heads,
H head dim, D model dim, V vocab, M token slots.

The state (DecodeState) and per-request arguments (StepArgs) are typed pytrees
(mmjax.generation.state). The serving engine has paged programs of its own
(mmjax.serving.steps); `run` is the static-batch loop: decode steps 8 to a call (`decode_steps`, given only the params they read), a host check
after each call to stop early, then each row's tokens trimmed after its first stop token (kept,
as HF does).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.generation.sampling import select_token
from mmjax.generation.state import DecodeState, StepArgs
from mmjax.kernels import kv_cache
from mmjax.kernels.attention import MaskSpec
from mmjax.kernels.kv_cache import check_kv_cache_dtype
from mmjax.models.base import decode_params
from mmjax.preprocess.buffers import release_free_heap

__all__ = ["Engine", "RunResult"]

SYNC_EVERY = 8  # decode steps per call, and between host checks for "every row is done"
# The prompt programs (vision tower + decoder) compile with XLA:CPU's classic elemental fusion
# emitters: its MLIR fusion emitters took ~100 MB of RSS to compile a Qwen2-VL prefill (2.7k
# HLO lines), the classic ones ~40 MB, the run time the same within noise (benchmarks/README.md,
# "Peak memory"). A DebugOptions field: other backends ignore it.
PROMPT_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


def _gather_last(h, lengths):  # h [B, T, D], lengths [B] -> [B, 1, D]
    return jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)


@contextlib.contextmanager
def _trim_after_compile(jitted):
    """When the call inside compiles a program, hand the compiler's freed heap back to the OS
    after it (preprocess.buffers.release_free_heap); a cached call pays nothing."""
    size = getattr(jitted, "_cache_size", lambda: 0)  # jax's count of this function's programs
    before = size()
    yield
    if size() != before:
        release_free_heap()


@dataclasses.dataclass
class RunResult:
    rows: list[list[int]]  # each row's tokens, up to and including its stop token
    steps: int  # decode steps run (incl. the token prefill picks)
    prefill_s: float
    decode_s: float


class Engine:
    """Holds the jitted prefill / decode_step of one module (one compile per shape bucket).

    The module's config carries the kernel policy (mmjax.kernels.policy), so which kernels a
    program uses is part of the module, hence of every jit cache key."""

    def __init__(self, module, state_sharding=None, encoder_sharding=None, kv_cache_dtype: str = "auto"):
        """state_sharding: None on one device; with a mesh, state -> matching tree of shardings
        (mmjax.sharding.state_shardings), pinned on every step's output so the donated state
        keeps one layout from step to step and the partitioner never gathers the cache."""
        self.module = module
        self.kv_cache_dtype = check_kv_cache_dtype(kv_cache_dtype)  # mmjax.kernels.kv_cache
        self.state_sharding = state_sharding
        self.encoder_sharding = encoder_sharding  # images' shape -> layout (mmjax.sharding.encoder_input_sharding)
        # With a mesh the module's KernelPolicy has no CPU custom calls (a custom call has no
        # sharding rule): mmjax.load builds it with KernelPolicy.without_cpu_custom_calls.
        self.prefill = jax.jit(self._prefill, static_argnames=("cache_len", "token_slots", "greedy"),
                               compiler_options=PROMPT_COMPILER_OPTIONS)
        self.decode_step = jax.jit(self._decode_step, static_argnames=("greedy",), donate_argnums=(1,))
        self.decode_steps = jax.jit(self._decode_steps, static_argnames=("greedy",), donate_argnums=(1,))
        self.forward = jax.jit(self._forward, compiler_options=PROMPT_COMPILER_OPTIONS)

    # --- pure functions ---------------------------------------------------------------------
    def _forward(self, params, batch):
        return self.module.apply({"params": params}, batch)

    def _prefill(self, params, batch, lengths, args: StepArgs, *, cache_len: int, token_slots: int,
                 greedy: bool) -> DecodeState:
        if self.encoder_sharding is not None and batch.get("pixel_values") is not None:
            batch = {**batch, "pixel_values": jax.lax.with_sharding_constraint(
                batch["pixel_values"], self.encoder_sharding(batch["pixel_values"].shape))}

        def run(mod):
            x, positions, pos_offset = mod.embed(batch)
            h, kv = mod.decode(x, positions, MaskSpec(causal=True, kv_lengths=lengths))
            return mod.logits(_gather_last(h, lengths))[:, 0], kv, pos_offset

        logits, kv, pos_offset = self.module.apply({"params": params}, method=run)  # logits [B, V]
        B, T = batch["input_ids"].shape
        # prefill's keys come as [B, T, K, H]; the cache is [B, K, S, H] (mmjax.layers.attention)
        cache = [self._cache_layer(c, cache_len) for c in kv]
        state = DecodeState(cache=cache, last=jnp.zeros((B,), jnp.int32), index=lengths.astype(jnp.int32),
                            pos_offset=pos_offset.astype(jnp.int32), tokens=jnp.zeros((B, token_slots), jnp.int32),
                            done=jnp.zeros((B,), bool), step=jnp.int32(0))
        return self._pin(self._emit(state, logits, args, greedy))

    def _cache_layer(self, kv, cache_len: int) -> dict:
        """One layer's prefill keys {"k","v": [B, T, K, H]} -> the cache layer [B, K, S, H] in the
        cache dtype (int8: + scales [B, K, S])."""
        out = {}
        for n in ("k", "v"):
            x = kv[n].swapaxes(1, 2)  # [B, K, T, H]
            pad = ((0, 0), (0, 0), (0, cache_len - x.shape[2]), (0, 0))
            if self.kv_cache_dtype == "int8":
                q, scale = kv_cache.quantize(x)
                out[n], out[f"{n}_scale"] = jnp.pad(q, pad), jnp.pad(scale, pad[:3], constant_values=1.0)
            else:
                out[n] = jnp.pad(x.astype(kv_cache.storage_dtype(self.kv_cache_dtype, x.dtype)), pad)
        return out

    def _decode_step(self, params, state: DecodeState, args: StepArgs, *, greedy: bool) -> DecodeState:
        index = state.index
        mask = MaskSpec(causal=True, kv_lengths=index + 1, q_offset=index)

        def run(mod):
            x = mod.embed_tokens(state.last[:, None])
            positions = (index + state.pos_offset)[:, None]
            h, cache = mod.decode(x, positions, mask, state.cache, index)
            return mod.logits(h)[:, 0], cache

        logits, cache = self.module.apply({"params": params}, method=run)
        state = state.replace(cache=cache, index=index + 1)
        return self._pin(self._emit(state, logits, args, greedy))

    def _decode_steps(self, params, state: DecodeState, args: StepArgs, n, *, greedy: bool) -> DecodeState:
        """`n` decode steps (traced: one program for any n) in one call, as vLLM's multi-step
        scheduling: the host dispatches a jitted call per n tokens instead of per token. On the
        2-core benchmark machine each dispatch took 0.26-0.39 ms of host time, taken from the
        step's kernels, and bunched after every early-stop check (one step in eight ran 6-9 ms
        instead of ~4). 8 steps per call: int8 + head decode at batch 1 170-190 -> 208-211 tok/s
        (docs/cpu_kernels.md, "Decode step")."""
        return jax.lax.fori_loop(0, n, lambda i, st: self._decode_step(params, st, args, greedy=greedy), state)

    def _pin(self, state):
        if self.state_sharding is None:
            return state
        return jax.lax.with_sharding_constraint(state, self.state_sharding(state))

    @staticmethod
    def _emit(state: DecodeState, logits, args: StepArgs, greedy: bool) -> DecodeState:
        """Pick this step's token, record it, update done."""
        step, stop_ids = state.step, args.stop_ids
        is_stop = jnp.zeros(logits.shape[-1], bool).at[jnp.maximum(stop_ids, 0)].set(stop_ids >= 0)
        # min_new_tokens: stop tokens are not eligible yet (HF MinNewTokensLengthLogitsProcessor)
        logits = jnp.where((step < args.min_new_tokens) & is_stop[None, :], -jnp.inf, logits)
        tok = select_token(logits, jax.random.fold_in(args.key, step), args, greedy)
        tok = jnp.where(state.done, 0, tok)
        tokens = jax.lax.dynamic_update_slice(state.tokens, tok[:, None], (0, step))
        done = state.done | is_stop[tok] | (step + 1 >= args.max_new_tokens)
        return state.replace(last=tok, tokens=tokens, done=done, step=step + 1)

    # --- the loop ---------------------------------------------------------------------------
    def run(self, params, batch, lengths, args: StepArgs, *, rows: int, max_new_tokens: int, min_new_tokens: int,
            stop_ids, cache_len: int, token_slots: int, greedy: bool, to_host=np.asarray) -> RunResult:
        """Prefill, then decode steps until every one of the first `rows` rows is done (checked
        every SYNC_EVERY steps; finished rows only emit padding meanwhile) or max_new_tokens.

        to_host: how to read a (possibly multi-process) array back (mmjax.sharding.to_host)."""
        t0 = time.perf_counter()
        with _trim_after_compile(self.prefill):
            state = self.prefill(params, batch, lengths, args, cache_len=cache_len, token_slots=token_slots,
                                 greedy=greedy)
        state.done.block_until_ready()
        t1 = time.perf_counter()
        step_params = decode_params(self.module, params)  # fewer leaves to dispatch per step
        i = 1  # the token prefill picked is the first
        while i < max_new_tokens:
            n = min(SYNC_EVERY, max_new_tokens - i)  # SYNC_EVERY steps per call (_decode_steps)
            with _trim_after_compile(self.decode_steps) if i == 1 else contextlib.nullcontext():
                state = self.decode_steps(step_params, state, args, jnp.int32(n), greedy=greedy)
            i += n
            # the host waits for this call's steps (the device then idles for one dispatch,
            # ~0.3 ms in SYNC_EVERY steps) and stops once every row is done
            if i < max_new_tokens and bool(to_host(state.done)[:rows].all()):
                break
        tokens = to_host(state.tokens)[:rows, :max_new_tokens]
        steps = int(state.step)
        t2 = time.perf_counter()
        stops = set(stop_ids)
        out = []
        for r in range(rows):
            row = []
            for t in tokens[r, :steps].tolist():
                row.append(t)
                if t in stops and len(row) > min_new_tokens:
                    break
            out.append(row)
        return RunResult(out, steps, t1 - t0, t2 - t1)
