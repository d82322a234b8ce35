"""int8 weight-only quantization for the converter (mmjax/quantization.py has the format).

Two doors, one stream:
  * `python -m converters.torch2flax CKPT --quantize int8`: the converter's (target, array)
    stream passes through quantize_params before the writer, so each kernel is quantized as
    soon as its transform is done and memory holds one parameter (the converter's own bound).
  * `python -m converters.torch2flax MMJAX_FOLDER --quantize int8`: a folder already converted
    (float32 or bfloat16) is read back a parameter at a time (mmjax.checkpoint.iter_params) and
    written the same way; its tokenizer files and source config come along.
Either way the rule table (default_rules, LM head with --quantize-lm-head) is checked against the
model before any data is read, and stored in mmjax_config.json as the config's `quant`.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from converters.rules import _cast, resolve_dtype
from converters.writer import check_out, staged_output, write_model_folder
from mmjax import registry
from mmjax.errors import ConversionError
from mmjax.jsonfile import read_json
from mmjax.quantization import METHODS, QuantConfig, default_rules, einsum_contractions, quantize_params
from mmjax.quantization import quantized_layout

__all__ = ["METHODS", "plan_quantization", "quantized_stream", "quantize_folder", "is_mmjax_folder"]


def is_mmjax_folder(path) -> bool:
    """A folder written by this converter (mmjax_config.json + params/), not a torch checkpoint."""
    return os.path.isfile(os.path.join(path, "mmjax_config.json")) and os.path.isdir(os.path.join(path, "params"))


def plan_quantization(family: registry.Family, cfg: Any, method: str, lm_head: bool = False,
                      shapes: dict | None = None) -> tuple[Any, QuantConfig, dict[str, int]]:
    """(cfg with `quant` set, the QuantConfig, {kernel path: contracted axes}); checks, before
    any data is read, that the family can hold it and that every selected parameter is an
    Einsum kernel. `cfg` is the float model's config."""
    if method not in METHODS:
        raise ConversionError(f"--quantize {method!r}: choose one of {', '.join(METHODS)}")
    if not dataclasses.is_dataclass(cfg) or "quant" not in {f.name for f in dataclasses.fields(cfg)}:
        raise ConversionError(f"family {family.name!r}: its config has no `quant` field, so it cannot store "
                              "quantized weights (composed VLM families have one: mmjax/models/composed.py)")
    if getattr(cfg, "quant", None) is not None:
        raise ConversionError(f"family {family.name!r}: the model is already quantized ({cfg.quant.method})")
    quant = QuantConfig(method, default_rules(lm_head))
    module = family.build(cfg)
    einsums = einsum_contractions(module)
    if shapes is None:
        shapes = module.param_shapes()
    quantized_layout(shapes, quant, einsums)  # raises, naming it, for a rule on a non-Einsum parameter
    return dataclasses.replace(cfg, quant=quant), quant, einsums


def quantized_stream(arrays, quant: QuantConfig, einsums: dict[str, int], dtype: str | None):
    """The float model's (path, array) stream -> the quantized model's; parameters left float are
    cast to `dtype` (None keeps theirs). Kernels are quantized from their values before any cast."""
    dt = resolve_dtype(dtype)
    return quantize_params(arrays, quant, einsums, cast=lambda a: _cast(a, dt))


def quantize_folder(src, out=None, method: str = "int8", lm_head: bool = False, dtype: str | None = None,
                    overwrite: bool = False, verify: bool = True):
    """Quantize mmjax folder `src` (float32 or bfloat16) into `out` (default SRC-int8 beside it).
    Returns a converters.torch2flax.Summary."""
    from converters.torch2flax import Summary
    from mmjax.checkpoint import iter_params, param_shapes
    from mmjax.tree import flatten_params

    t0 = time.perf_counter()
    src = os.path.abspath(os.fspath(src))
    out = os.path.abspath(os.fspath(out)) if out is not None else src.rstrip(os.sep) + f"-{method}"
    check_out(out, src, overwrite)
    meta = read_json(os.path.join(src, "mmjax_config.json"), what="is this a folder written by converters.torch2flax?")
    family = registry.resolve(meta.get("family_spec") or meta["family"])
    cfg = family.config_cls.from_dict(meta["config"])
    stored = flatten_params(param_shapes(os.path.join(src, "params")))
    cfg_q, quant, einsums = plan_quantization(family, cfg, method, lm_head, shapes=stored)
    n = nbytes = 0
    with staged_output(out, overwrite) as tmp:
        def counted(stream):
            nonlocal n, nbytes
            for path, a in stream:
                n, nbytes = n + a.size, nbytes + a.nbytes
                yield path, a

        stream = quantized_stream(iter_params(os.path.join(src, "params"), verify=verify), quant, einsums, dtype)
        source = {**meta.get("source", {}), "quantized_from": src}
        write_model_folder(tmp, counted(stream), family.name, cfg_q, src, source, dtype or meta.get("dtype"),
                           family_spec=meta.get("family_spec"), source_config="source_config.json")
    arrays = len(stored) + sum(1 for p in stored if p in einsums and quant.method_for(p))
    return Summary(family.name, len(stored), 0, arrays, n, nbytes, time.perf_counter() - t0, out, dtype)
