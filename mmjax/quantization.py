"""Weight-only int8 quantization: which kernels, how they are stored, how they are made.

Layout. A quantized projection keeps its kernel's path and shape, now int8, and gains one
float32 parameter beside it, the per-output-channel scale:

    decoder/layers_0/attn/q/kernel        int8    [D, N, H]
    decoder/layers_0/attn/q/kernel_scale  float32 [N, H]      (the kernel's output axes)

Symmetric, per output channel: scale = max |w| over the contracted axes / 127 (1 for an
all-zero channel), q = round(w / scale) clipped to [-127, 127], and w ~ q * scale. Keeping the
path means every converter rule, sharding rule and parity pairing of the kernel still names it;
the scale is split like the kernel's own output axes (mmjax.sharding.rules.param_specs).
The scale is float32 whatever the model dtype: it is N numbers a layer, and a bf16 scale would
add its own rounding (8 bits) to every output channel. Embeddings, norms, biases and every
unselected kernel stay in the model dtype.

Which kernels: a rule table, as the sharding tables are data (mmjax.sharding.rules): regex on
the parameter path -> "int8" or None, the first rule that fully matches wins, a path no rule
matches is an error. Only Einsum kernels (mmjax.layers.linear) can be quantized: a rule selecting
anything else is an error naming it. The table is stored in mmjax_config.json with the config
(ComposedConfig.quant), so mmjax.load builds exactly the layout that was converted.

At run time an Einsum whose params hold `kernel_scale` computes (x . q) * scale: the scale
factors out of the contraction, so the dot reads the int8 kernel converted to the compute
dtype (XLA fuses the convert into the dot's operand; the CPU gemv kernel widens in registers).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.config_base import ConfigBase
from mmjax.errors import ConversionError

__all__ = ["METHODS", "SCALE", "QuantConfig", "default_rules", "einsum_contractions", "quantize_int8",
           "dequantize", "quantized_layout", "quantize_params", "contracted_axes"]

METHODS = ("int8",)
SCALE = "kernel_scale"  # name of the scale beside a quantized `kernel`
QMAX = 127  # symmetric: -128 is never used, so -q is always representable


def default_rules(lm_head: bool = False) -> tuple:
    """Every Linear of the decoder blocks and of the vision tower (blocks and Qwen2-VL's patch
    merger); the LM head only when asked (it sets the logits directly, and a tied head is the
    embedding, which is never quantized). Projectors, embeddings and norms are left alone."""
    return (
        (r"(decoder|vision)/layers_\d+/attn/(q|k|v|qkv|o)/kernel", "int8"),
        (r"(decoder|vision)/layers_\d+/mlp/(gate|up|down|fc1|fc2)/kernel", "int8"),
        (r"vision/merger/mlp/(fc1|fc2)/kernel", "int8"),
        (r"decoder/lm_head/kernel", "int8" if lm_head else None),
        (r".*", None),
    )


@dataclasses.dataclass(frozen=True)
class QuantConfig(ConfigBase):
    """Stored as ComposedConfig.quant: `rules` is the table the checkpoint was made with."""

    method: str = "int8"
    rules: tuple[tuple[str, str | None], ...] = default_rules()

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"QuantConfig.method={self.method!r} is not one of {', '.join(METHODS)}")
        rules = tuple((str(p), m) for p, m in self.rules)  # JSON brings lists back
        for pattern, m in rules:
            if m not in (None, *METHODS):
                raise ValueError(f"QuantConfig.rules: {pattern!r} -> {m!r}: each rule gives one of "
                                 f"{', '.join(METHODS)} or None")
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"QuantConfig.rules: {pattern!r} is not a regex: {e}") from None
        object.__setattr__(self, "rules", rules)

    def method_for(self, path: str) -> str | None:
        """The table's choice for a parameter path; a path no rule matches is an error."""
        for pattern, m in self.rules:
            if re.fullmatch(pattern, path):
                return m
        raise ConversionError(f"{path}: no quantization rule matches it; end the table with ('.*', None)")


def contracted_axes(eqn: str) -> int:
    """How many leading kernel axes an Einsum equation contracts ("BTNH,NHD->BTD" -> 2)."""
    ins, out = eqn.replace(" ", "").split("->")
    xs, ws = ins.split(",")
    c = sum(1 for a in ws if a in xs and a not in out)
    if c == 0 or set(ws[:c]) & set(out) or any(a not in xs for a in ws[:c]):
        raise ValueError(f"einsum {eqn!r}: the kernel's contracted axes must lead it to be quantized per "
                         "output channel")
    return c


def einsum_contractions(module) -> dict[str, int]:
    """{"a/b/kernel": contracted leading axes} for every Einsum of a model module, found by running
    its init abstractly (nothing allocated) with the Einsum calls intercepted (one trace shared
    with param_shapes: mmjax.models.base.abstract_init)."""
    from mmjax.models.base import abstract_init

    return dict(abstract_init(module)[1])


def _selected(quant: QuantConfig, paths: Iterable[str], einsums: Mapping[str, int]) -> dict[str, int]:
    """{kernel path: contracted axes} of the parameters the table quantizes; checks the table."""
    out = {}
    for path in paths:
        if quant.method_for(path) is None:
            continue
        if path not in einsums:
            raise ConversionError(f"{path}: the quantization rules select it, but it is not an Einsum kernel "
                                  "(only projection kernels can be stored as int8)")
        out[path] = einsums[path]
    return out


def quantized_layout(shapes: Mapping[str, Any], quant: QuantConfig, einsums: Mapping[str, int]) -> dict:
    """Flat {path: ShapeDtypeStruct} of the float model -> the quantized model's: each selected
    kernel int8, its `kernel_scale` float32 of the output axes beside it."""
    sel = _selected(quant, shapes, einsums)
    out = {}
    for path, s in shapes.items():
        if path in sel:
            out[path] = jax.ShapeDtypeStruct(tuple(s.shape), np.int8)
            out[_scale_path(path)] = jax.ShapeDtypeStruct(tuple(s.shape[sel[path]:]), np.float32)
        else:
            out[path] = s
    return out


def _scale_path(kernel_path: str) -> str:
    return kernel_path[: -len("kernel")] + SCALE


def quantize_int8(w, contracted: int) -> tuple[np.ndarray, np.ndarray]:
    """w [*in, *out] (float) -> (q int8 [*in, *out], scale float32 [*out]), per output channel."""
    w32 = np.asarray(w, dtype=np.float32)
    amax = np.abs(w32).max(axis=tuple(range(contracted))) if contracted else np.abs(w32)
    scale = np.where(amax > 0, amax / np.float32(QMAX), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(w32 / scale), -QMAX, QMAX).astype(np.int8)
    return q, scale


def dequantize(q, scale) -> np.ndarray:
    """The float32 kernel an int8 one stands for: q * scale (broadcast over the contracted axes)."""
    return np.asarray(q, np.float32) * np.asarray(scale, np.float32)


def quantize_params(params: Iterable[tuple[str, Any]], quant: QuantConfig, einsums: Mapping[str, int],
                    cast: Callable[[Any], Any] | None = None) -> Iterator[tuple[str, Any]]:
    """A stream of (path, float array) -> the quantized model's stream, one parameter at a time
    (what converters hand to mmjax.checkpoint.save_params, so memory holds one tensor). Kernels
    are quantized from the values they arrive with; `cast` (e.g. to bfloat16) applies to every
    other parameter."""
    for path, a in params:
        if quant.method_for(path) is None:
            yield path, (a if cast is None else cast(a))
            continue
        _selected(quant, [path], einsums)
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise ConversionError(f"{path}: already {a.dtype}; quantization needs a float kernel")
        q, scale = quantize_int8(a, einsums[path])
        yield path, q
        yield _scale_path(path), scale
