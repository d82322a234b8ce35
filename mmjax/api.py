"""The public entry points: load, forward, generate (and Model.preprocess); encode is in
mmjax.encode. This module only checks arguments and moves data: the host-side input work is the
family's processor and prepare step (mmjax.preprocess), the steps and the loop are the engine's
(mmjax.generation)."""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import registry
from mmjax.bucketing import DEFAULT_BUCKETS, Buckets, pick
from mmjax.errors import InputError, LoadError, MmjaxError, UnknownModelError
from mmjax.generation.engine import Engine
from mmjax.generation.sampling import SamplingParams
from mmjax.generation.state import StepArgs
from mmjax.jsonfile import read_json
from mmjax.kernels.kv_cache import check_kv_cache_dtype
from mmjax.kernels.policy import KernelPolicy, with_kernels
from mmjax.models.base import param_shapes
from mmjax.preprocess.buffers import release_aliased, to_device
from mmjax.preprocess.processor import is_one_row
from mmjax.sharding import encoder_input_sharding, make_mesh, param_shardings, shard_batch, state_shardings, to_host
from mmjax.tree import flatten_params

__all__ = ["Model", "GenerationOutput", "load", "forward", "generate"]

MAX_STOP_IDS = 8  # fixed slot count, so different stop sets share one compiled program


@dataclasses.dataclass
class Model:
    """A loaded bundle: what mmjax.forward / mmjax.generate take."""

    path: str
    family: registry.Family
    config: Any
    module: Any
    params: Any
    processor: Any
    dtype: Any
    buckets: Buckets = DEFAULT_BUCKETS
    mesh: Any = None
    mm_encoder_tp_mode: str = "weights"  # with a mesh: split the vision tower's weights, or its images
    kv_cache_dtype: str = "auto"  # the KV cache's storage: auto (= dtype), float32, bfloat16, int8
    engine: Engine = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        state_sharding = encoder_sharding = None
        if self.mesh is not None:  # the generation state's layout on the mesh (docs/sharding.md)
            self.mesh = make_mesh(self.mesh)
            state_sharding = functools.partial(state_shardings, self.mesh)
            encoder_sharding = functools.partial(encoder_input_sharding, self.mesh, mode=self.mm_encoder_tp_mode)
        self.engine = Engine(self.module, state_sharding, encoder_sharding, self.kv_cache_dtype)

    def checkpoint_params(self):
        """`params` in the checkpoint's layout: a kernel mmjax.load packed into panels
        (`kernel_panels`, for the CPU matmul) comes back as its `kernel`, a new unpacked array."""
        from mmjax.kernels.cpu import panels
        from mmjax.layers import fusion
        from mmjax.models.base import abstract_init

        _, contractions, groups = abstract_init(self.module)
        shapes = {k: v.shape for k, v in param_shapes(self.module).items()}
        unpacked = panels.unpack_params(self.params, {**shapes, **fusion.fused_shapes(self.params, groups, shapes,
                                                                                      contractions)})
        return fusion.unfuse_params(unpacked, groups, shapes)

    @property
    def tokenizer(self):
        """The folder's tokenizer; None for a model with its own tokenization (no tokenizer files)."""
        return None if self.processor is None else self.processor.tokenizer

    def preprocess(self, images=None, prompt: str | Sequence[str] = "", *, chat_template: bool | None = None,
                   mm_processor_kwargs: dict | None = None, prompt_token_ids=None) -> dict:
        """HF-named numpy arrays: input_ids [B, T] (right-padded), attention_mask [B, T], pixel_values, ...
        mm_processor_kwargs: per-request image settings the family's processor takes (Qwen2-VL:
        min_pixels / max_pixels, as vLLM's).
        prompt_token_ids: instead of prompt, the ids of a model's own tokenization (one list, or one
        per row); an image goes where they hold the image token id (first when they hold none)."""
        if self.processor is None:
            raise LoadError(f"{self.path}: no tokenizer/processor files were converted with this model")
        if prompt_token_ids is not None:
            if prompt not in ("", None):
                raise InputError("give a text prompt or prompt_token_ids, not both")
            _check_token_ids(prompt_token_ids, getattr(self.config.text, "vocab_size", None))
        return self.processor(images, prompt, chat_template=chat_template, mm_processor_kwargs=mm_processor_kwargs,
                              prompt_token_ids=prompt_token_ids)


def _check_token_ids(prompt_token_ids, vocab: int | None) -> None:
    """Every id of one row (or of each row) in [0, vocab); the processor checks the form."""
    rows = [prompt_token_ids] if is_one_row(prompt_token_ids) else prompt_token_ids
    for r, row in enumerate(rows if isinstance(rows, (list, tuple, np.ndarray)) else ()):
        for t in row if is_one_row(row) else ():
            if not 0 <= int(t) < (vocab if vocab is not None else np.inf):
                raise InputError(f"prompt_token_ids row {r}: {int(t)} is not a token id in [0, {vocab})")


@dataclasses.dataclass
class GenerationOutput:
    text: Any  # str for a str prompt, list[str] for a batch; None without a tokenizer (prompt_token_ids)
    token_ids: Any  # list[int] / list[list[int]]; a row's stop token is included, as HF does
    prompt_tokens: Any
    timings: dict


def _check_family_spec(path: str, spec) -> None:
    """A "pkg.mod:ATTR" family is imported, but never from the (possibly downloaded) model folder
    itself: with that folder as the working directory, `import pkg` would run the code it ships."""
    if spec is None:
        return  # reported below as a missing key
    if not isinstance(spec, str):
        raise LoadError(f"{path}/mmjax_config.json: family must be a string, got {spec!r}")
    if ":" not in spec:
        return
    import importlib.util

    try:  # the top-level name only: finding it runs nothing, importing a parent package would
        found = importlib.util.find_spec(spec.split(":", 1)[0].split(".", 1)[0])
    except (ImportError, ValueError):
        return  # registry.resolve reports it
    places = [found.origin] if found is not None and found.origin else []
    places += list(found.submodule_search_locations or []) if found is not None else []
    root = os.path.realpath(path)
    for p in places:
        if os.path.realpath(p) == root or os.path.realpath(p).startswith(root + os.sep):
            raise LoadError(f"{path}/mmjax_config.json: family_spec {spec!r} would import {p}, inside the model "
                            "folder; mmjax does not run code shipped with a model (install the family's package)")


def load(path: str, *, mesh=None, mm_encoder_tp_mode: str = "weights", buckets: Buckets | None = None,
         kernels: KernelPolicy | None = None, compile_cache: bool | None = None, verify: bool = True,
         kv_cache_dtype: str = "auto", pack_weights: bool | None = None, huge_pages: bool = False) -> Model:
    """Load a converted folder: params (orbax) + mmjax_config.json + tokenizer/processor files.

    mesh: a jax Mesh or a spec such as "data:2,model:4" (docs/sharding.md); mm_encoder_tp_mode
    "weights" splits the vision tower's weights over `model`, "data" replicates them and splits
    the images instead (vLLM's mm_encoder_tp_mode).
    kernels: the KernelPolicy for every component (default: the one stored with the config); the
    MMJAX_CPU_GEMV / MMJAX_CPU_ATTENTION opt-outs apply on top, read here once (docs/kernels.md).
    compile_cache: JAX's persistent compilation cache (default on; MMJAX_COMPILE_CACHE=0 turns it off).
    verify: check every parameter's bytes against params/params_manifest.json first (docs/converters.md).
    kv_cache_dtype: "auto" (the model's dtype), "float32", "bfloat16" or "int8" (a scale per token
    and kv head; mmjax.kernels.kv_cache), for generate and the serving engine.
    pack_weights: fuse the decoder's q|k|v and gate|up kernels into one product each
    (mmjax.layers.fusion) and store its projection kernels in column panels for the CPU matmul
    kernel (mmjax.kernels.cpu.panels; faster decode steps). None (default): when the model runs
    on one CPU device with the policy's matmul_cpu="cpu", fuse, and pack the bfloat16 and int8
    kernels; True: float32 kernels too (benchmark: decode ~5% faster, prefill ~7% slower than
    XLA's GEMM on row-major kernels), refused with a mesh; False keeps the checkpoint layout
    (model.checkpoint_params() gives it back either way).
    huge_pages: on one CPU device (Linux), move the params into one buffer of 2 MiB pages
    (mmjax.kernels.cpu.hugepages): decode ~10-13% faster on the benchmark machine, but loading
    there paid ~5 ms per MB of params to fault the pages in, so it is opt-in."""
    from mmjax import checkpoint, compile_cache as cc
    from mmjax.sharding.rules import ENCODER_MODES

    check_kv_cache_dtype(kv_cache_dtype)
    if mm_encoder_tp_mode not in ENCODER_MODES:
        raise InputError(f"mm_encoder_tp_mode={mm_encoder_tp_mode!r} is not one of {', '.join(ENCODER_MODES)}")

    if pack_weights and mesh is not None:  # panels and fused kernels have no sharding rules
        raise InputError("pack_weights=True: the panel layout is for one CPU device; with a mesh the kernels "
                         "stay as stored (pack_weights=None or False)")
    if compile_cache if compile_cache is not None else cc.enabled_by_env():
        cc.enable()

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise LoadError(f"{path}: not a folder")
    meta = read_json(os.path.join(path, "mmjax_config.json"),
                     what="is this a folder written by converters.torch2flax?")
    _check_family_spec(path, meta.get("family_spec") or meta.get("family"))
    try:
        family = registry.resolve(meta.get("family_spec") or meta["family"])  # UnknownModelError names it
        cfg = family.config_cls.from_dict(meta["config"])
    except KeyError as e:
        raise LoadError(f"{path}/mmjax_config.json: missing key {e}") from None
    except UnknownModelError as e:
        raise UnknownModelError(f"{path}/mmjax_config.json: {e}") from None
    except MmjaxError:
        raise
    except (TypeError, ValueError) as e:
        raise LoadError(f"{path}/mmjax_config.json: config does not fit {family.name}: {e}") from None
    if kernels is not None and not isinstance(kernels, KernelPolicy):
        raise InputError(f"kernels: a mmjax.kernels.policy.KernelPolicy is needed, got {type(kernels).__name__}")
    # MMJAX_CPU_* read once, here (docs/kernels.md)
    cfg = with_kernels(cfg, KernelPolicy.from_env if kernels is None else KernelPolicy.from_env(kernels))
    if mesh is not None:  # a custom call has no sharding rule
        cfg = with_kernels(cfg, KernelPolicy.without_cpu_custom_calls)
    stored_tree = checkpoint.param_shapes(os.path.join(path, "params"))
    stored = flatten_params(stored_tree)
    dtypes = {np.dtype(s.dtype) for s in stored.values() if jnp.issubdtype(s.dtype, jnp.floating)}
    dtype = jnp.bfloat16 if np.dtype(jnp.bfloat16) in dtypes else jnp.float32
    try:
        module = family.build(cfg, dtype)
        want = param_shapes(module)
    except MmjaxError:
        raise
    except Exception as e:  # e.g. a hand-edited value of the wrong type ("hidden_size": "64")
        raise LoadError(f"{path}/mmjax_config.json: config cannot build {family.name}: {type(e).__name__}: {e}") from e
    problems = [f"{k}: missing from the checkpoint" for k in sorted(set(want) - set(stored))]
    problems += [f"{k}: in the checkpoint but not in the model" for k in sorted(set(stored) - set(want))]
    problems += [f"{k}: config expects shape {tuple(want[k].shape)}, checkpoint has {tuple(stored[k].shape)}"
                 for k in sorted(set(want) & set(stored)) if tuple(want[k].shape) != tuple(stored[k].shape)]
    if problems:
        raise LoadError(f"{path}: params do not match mmjax_config.json:\n  " + "\n  ".join(problems))
    target = stored_tree  # restored straight onto the (first) device
    if mesh is not None:  # each device reads only its own shards (docs/sharding.md)
        mesh = make_mesh(mesh)
        target = param_shardings(family, cfg, mesh, stored_tree, mm_encoder_tp_mode=mm_encoder_tp_mode)
    params = checkpoint.restore_params(os.path.join(path, "params"), target, verify=verify)
    if pack_weights if pack_weights is not None else _packs_by_default(cfg, mesh):
        params = _pack_decoder(module, params, float32=pack_weights is True)
    if huge_pages and mesh is None and jax.default_backend() == "cpu":
        from mmjax.kernels.cpu import hugepages

        params = hugepages.place(params)
    processor = family.processor(path, cfg) if family.processor is not None else None
    return Model(path, family, cfg, module, params, processor, dtype, buckets or DEFAULT_BUCKETS, mesh,
                 mm_encoder_tp_mode, kv_cache_dtype)


def _packs_by_default(cfg, mesh) -> bool:
    """Panels pay off where the CPU panel kernel runs the decode steps: one CPU device (no mesh,
    and no other device to shard onto later: shard_params has no rules for fused or packed
    kernels) and the decoder's policy asks for the CPU matmul."""
    from mmjax.kernels.cpu import ffi

    decoder = getattr(cfg, "decoder", None)
    policy = getattr(decoder, "kernels", None)
    return (mesh is None and decoder is not None and isinstance(policy, KernelPolicy) and policy.matmul_cpu == "cpu"
            and "cpu" in policy.platforms and jax.default_backend() == "cpu" and jax.device_count() == 1
            and ffi.available())


def _pack_decoder(module, params, float32: bool):
    """The decoder's projections that read one input fused (q|k|v, gate|up: mmjax.layers.fusion),
    then its Einsum kernels as panels (mmjax.kernels.cpu.panels): those are the products of the
    decode steps; the vision tower's run once per image with many rows. float32 kernels only
    when asked: row-major, their prefill runs in XLA's GEMM, a little faster than the panel
    kernel, and their decode in cpu.gemv, a little slower (docs/cpu_kernels.md, "Weight
    panels"); bfloat16 and int8 run faster in the panel kernel either way."""
    from mmjax.kernels.cpu import panels
    from mmjax.layers import fusion
    from mmjax.models.base import abstract_init

    _, contractions, groups = abstract_init(module)
    params, fused = fusion.fuse_params(params, groups, contractions, select=lambda path: path.startswith("decoder/"))

    def select(path, array):
        return path.startswith("decoder/") and (float32 or array.dtype != np.float32)

    return panels.pack_params(params, {**contractions, **fused}, select=select)


def _lengths(input_ids, attention_mask) -> np.ndarray:
    ids = np.asarray(input_ids)
    if attention_mask is None:
        return np.full((ids.shape[0],), ids.shape[1], np.int32)
    m = np.asarray(attention_mask).astype(bool)
    lengths = m.sum(axis=1).astype(np.int32)
    right_padded = np.arange(m.shape[1])[None, :] < lengths[:, None]
    if not np.array_equal(m, right_padded):
        raise InputError("attention_mask: mmjax expects right-padded rows (1...1 0...0); got left or inner padding")
    if (lengths == 0).any():
        raise InputError(f"attention_mask: rows {np.flatnonzero(lengths == 0).tolist()} are empty")
    return lengths


def _require_decoder(model: Model, what: str) -> None:
    if not hasattr(model.module, "decode"):
        raise InputError(f"mmjax.{what}: family {model.family.name!r} has no decoder; use mmjax.encode(model, ...)")


def forward(model: Model, input_ids, attention_mask=None, pixel_values=None, **extra) -> np.ndarray:
    """Prefill logits [B, T, V] float32 on the exact (unpadded) shapes — what parity compares."""
    _require_decoder(model, "forward")
    lengths = _lengths(input_ids, attention_mask)
    batch = {"input_ids": jnp.asarray(input_ids, jnp.int32), "lengths": jnp.asarray(lengths)}
    if pixel_values is not None:
        batch["pixel_values"] = jnp.asarray(pixel_values, model.dtype)
    for k, v in extra.items():
        if v is not None:
            batch[k] = jnp.asarray(v)
    if model.family.prepare is not None:  # checks; host-built inputs (Qwen2-VL: M-RoPE positions), exact sizes
        host = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values, **extra}
        host = {k: np.asarray(v) for k, v in host.items() if v is not None}
        for k, v in model.family.prepare(model.config, host).items():
            batch[k] = jnp.asarray(v, model.dtype if k == "pixel_values" else None)
    return to_host(model.engine.forward(model.params, _on_mesh(model, batch)))


def _on_mesh(model: Model, batch: dict) -> dict:
    """Inputs onto the model's mesh, rows over `data` (unchanged without a mesh)."""
    return batch if model.mesh is None else shard_batch(model.mesh, batch)


def _bucketed_batch(model: Model, inputs: dict, lengths: np.ndarray) -> dict:
    """Pad every array to its bucket: rows, prompt length, image count / patches (one compile per bucket)."""
    bk = model.buckets
    B, T = np.asarray(inputs["input_ids"]).shape
    Bb, Tb = pick(B, bk.batch, "batch size"), pick(int(lengths.max()), bk.prompt, "prompt length")
    ids = np.zeros((Bb, Tb), np.int32)
    ids[:B, :min(T, Tb)] = np.asarray(inputs["input_ids"], np.int32)[:, :Tb]
    batch = {"input_ids": ids}
    if model.family.prepare is not None:
        batch.update(model.family.prepare(model.config, inputs, bk, Bb, Tb))
    # the prepare step's padded pixels are aligned: on CPU the device array is that buffer (no copy)
    return {k: to_device(v, model.dtype if k == "pixel_values" else None) for k, v in batch.items()}


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def generate(model: Model, images=None, prompt: str | Sequence[str] = "", *, max_new_tokens: int = 64,
             min_new_tokens: int = 0, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, stop_token_ids: Sequence[int] | None = None, chat_template: bool | None = None,
             truncate: bool = False, mm_processor_kwargs: dict | None = None,
             prompt_token_ids=None) -> GenerationOutput:
    """Preprocess, prefill, then one jitted (donated) decode step per new token.

    images: one PIL image, a list (one prompt), a list of lists (a batch), or None.
    prompt_token_ids: instead of prompt, token ids of the model's own tokenization: one list (one
    prompt) or a list of lists (a batch). A model converted without tokenizer files takes only
    these; its output's text is then None (token_ids hold the result).
    truncate=True shortens max_new_tokens to fit the context instead of raising.
    mm_processor_kwargs: per-request image settings (Qwen2-VL: {"max_pixels": 448 * 448} for fewer tokens)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(min_new_tokens, int) or not 0 <= min_new_tokens <= max_new_tokens:
        raise InputError(f"min_new_tokens must be an integer in [0, max_new_tokens], got {min_new_tokens!r}")
    _require_decoder(model, "generate")
    sp = SamplingParams(temperature, top_k, top_p, seed)
    t0 = time.perf_counter()
    inputs = model.preprocess(images, prompt, chat_template=chat_template, mm_processor_kwargs=mm_processor_kwargs,
                              prompt_token_ids=prompt_token_ids)
    lengths = _lengths(inputs["input_ids"], inputs.get("attention_mask"))
    B = lengths.shape[0]
    limit = model.config.text.max_position_embeddings
    if int(lengths.max()) + max_new_tokens > limit:
        if not truncate or int(lengths.max()) >= limit:
            raise InputError(f"prompt of {int(lengths.max())} tokens + max_new_tokens={max_new_tokens} exceeds the "
                             f"context of {limit} tokens (pass truncate=True to shorten max_new_tokens)")
        max_new_tokens = limit - int(lengths.max())
        min_new_tokens = min(min_new_tokens, max_new_tokens)
    stops = _stop_ids(model, stop_token_ids)
    batch = _on_mesh(model, _bucketed_batch(model, inputs, lengths))
    inputs.pop("pixel_values", None)  # the batch holds the padded copy: the processor's can go before prefill
    Bb = batch["input_ids"].shape[0]
    lens = np.ones((Bb,), np.int32)  # padding rows: one token, never read
    lens[:B] = lengths
    slots = pick(max_new_tokens, model.buckets.token_slots, "max_new_tokens")
    args = StepArgs.make(sp, stops, min_new_tokens, max_new_tokens, MAX_STOP_IDS)
    t1 = time.perf_counter()
    res = model.engine.run(model.params, batch, _on_mesh(model, {"lens": jnp.asarray(lens)})["lens"], args, rows=B,
                           max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, stop_ids=stops,
                           cache_len=model.buckets.cache_length(int(lengths.max()), max_new_tokens),
                           token_slots=slots, greedy=sp.greedy, to_host=to_host)
    del batch
    release_aliased()  # the padded pixels' host buffer goes now, not at the next gc (preprocess.buffers)
    texts = None if model.tokenizer is None else [model.tokenizer.decode(r) for r in res.rows]
    steps = res.steps
    timings = {"preprocess_s": t1 - t0, "prefill_s": res.prefill_s, "decode_s": res.decode_s, "steps": steps,
               "decode_tok_s": (steps - 1) * B / res.decode_s if steps > 1 and res.decode_s > 0 else float("nan")}
    if prompt_token_ids is not None:
        single = is_one_row(prompt_token_ids)
    else:
        single = isinstance(prompt, (str, bytes, bytearray))  # bytes: one UTF-8 prompt, as in preprocess
    prompt_tokens = [np.asarray(inputs["input_ids"])[r, : lengths[r]].tolist() for r in range(B)]
    text = None if texts is None else texts[0] if single else texts
    return GenerationOutput(text, res.rows[0] if single else res.rows,
                            prompt_tokens[0] if single else prompt_tokens, timings)


def _stop_ids(model: Model, stop_token_ids) -> list[int]:
    """EOS ids of the tokenizer (generation_config.json's without one) + the caller's, checked (an
    out-of-range id would never match)."""
    vocab = getattr(model.config.text, "vocab_size", None)
    if stop_token_ids is not None and not isinstance(stop_token_ids, (list, tuple, set, frozenset)):
        raise InputError(f"stop_token_ids must be a list of token ids, got {type(stop_token_ids).__name__}")
    for t in stop_token_ids if stop_token_ids is not None else ():
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0 or (vocab is not None and t >= vocab):
            raise InputError(f"stop_token_ids: {t!r} is not a token id in [0, {vocab})")
    eos = model.processor.eos_token_ids if model.processor is not None else ()
    stops = sorted(set(eos) | set(stop_token_ids or ()))
    if len(stops) > MAX_STOP_IDS:
        raise InputError(f"stop_token_ids: at most {MAX_STOP_IDS} stop tokens, got {len(stops)}")
    return [int(t) for t in stops]
