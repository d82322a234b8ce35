"""Convert a PyTorch / HF checkpoint folder into an mmjax model folder.

    python -m converters.torch2flax CKPT [--out OUT] [--dtype bfloat16] [--dry-run] [--overwrite]
                                    [--quantize int8 [--quantize-lm-head]]
                                    [--model pkg.mod:FAMILY] [--rules my_rules.py] [--strict]
                                    [--autoport [KIND:]PREFIX=pkg.mod:Class(k=v)]

Flow: CKPT/config.json -> family (--model, else registry.get(config["model_type"])) ->
cfg = family.config_from_hf(config) -> target parameter shapes (model_param_shapes, nothing
allocated) -> rules (converters.families.rules_for(family), or RULES of a --rules file) -> build_plan (every tensor
and every parameter checked before any data is read) -> one step at a time: read, transform,
NaN/Inf check, write (mmjax.checkpoint.save_params streams) -> OUT renamed into place
(converters.writer). OUT defaults to CKPT-flax beside CKPT.

--quantize int8: weight-only int8 kernels (converters.quantize, mmjax/quantization.py); CKPT
may then also be an mmjax folder already converted (default OUT: CKPT-int8).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import sys
import time
import warnings
from typing import Any, Sequence

from converters.readers import nonfinite, open_checkpoint
from converters.families import rules_for as family_rules
from converters.quantize import METHODS as QUANT_METHODS, is_mmjax_folder, plan_quantization, quantize_folder
from converters.quantize import quantized_stream
from converters.rules import Plan, Rule, build_plan, flatten, resolve_dtype
from converters.writer import check_out, staged_output, write_model_folder
from mmjax import registry
from mmjax.errors import CheckpointError, ConversionError, MmjaxError
from mmjax.jsonfile import read_json

__all__ = ["convert", "main", "model_param_shapes", "load_rules", "default_out", "Summary"]

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass
class Summary:
    family: str
    tensors: int          # source tensors read
    dropped: int          # source tensors dropped by rules
    arrays: int           # parameter arrays written
    parameters: int       # elements, all arrays together
    bytes: int            # at the output dtype
    seconds: float
    out: str | None
    dtype: str | None
    dry_run: bool = False
    table: str = ""
    nonfinite: list = dataclasses.field(default_factory=list)  # [(target, n_nan, n_inf)]

    def __str__(self) -> str:
        return self.line()

    def line(self) -> str:
        verb = "would convert" if self.dry_run else "converted"
        dest = "nothing written (dry run)" if self.dry_run else f"-> {self.out}"
        return (f"{verb} {self.tensors} tensors ({self.dropped} dropped) into {self.arrays} arrays: "
                f"{self.parameters:,} parameters, {self.bytes:,} bytes ({self.bytes / 2**20:.1f} MiB), "
                f"{self.seconds:.1f} s; {dest}")


def model_param_shapes(family: registry.Family, cfg: Any) -> dict:
    """Flat {"a/b/kernel": jax.ShapeDtypeStruct} of the model's params, allocating nothing.

    Contract with the model modules: the module returned by family.build(cfg) has a method
    `param_shapes() -> dict` giving path -> jax.ShapeDtypeStruct (flat "/"-joined, or nested),
    without a leading "params" level; typically
    `jax.eval_shape(self.init, jax.random.key(0), *example_inputs)["params"]`, since only the
    module knows what example inputs its init needs. flax metadata boxes (logical partitioning)
    are unboxed here."""
    import flax.linen as nn

    module = family.build(cfg)
    if not hasattr(module, "param_shapes"):
        raise ConversionError(f"family {family.name!r}: its module {type(module).__name__} has no "
                              "param_shapes() method, which the converter needs to learn the target shapes")
    shapes = nn.meta.unbox(module.param_shapes())
    if set(shapes) == {"params"}:
        shapes = shapes["params"]
    return flatten(shapes)


def load_rules(spec, cfg: Any) -> list[Rule]:
    """spec: a list of Rule, a callable cfg -> list, or the path of a python file whose `RULES`
    is either of those."""
    origin = "rules"
    if isinstance(spec, (str, os.PathLike)):
        origin = path = os.fspath(spec)
        if not os.path.isfile(path):
            raise ConversionError(f"{path}: no such rules file")
        mod_spec = importlib.util.spec_from_file_location(f"_mmjax_rules_{abs(hash(path))}", path)
        mod = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(mod)
        except Exception as e:
            raise ConversionError(f"{path}: importing the rules file failed: {type(e).__name__}: {e}") from e
        if not hasattr(mod, "RULES"):
            raise ConversionError(f"{path}: defines no RULES (a list of converters.rules.Rule, "
                                  "or a function config -> list)")
        spec = mod.RULES
    rules = spec(cfg) if callable(spec) else spec
    if not isinstance(rules, (list, tuple)) or not all(isinstance(r, Rule) for r in rules):
        raise ConversionError(f"{origin}: RULES must be a list of converters.rules.Rule")
    return list(rules)


def _read_config(ckpt: str) -> dict:
    return read_json(os.path.join(ckpt, "config.json"), what="the converter needs the checkpoint's config.json",
                     error=CheckpointError)


def _family(model, hf_config: dict, ckpt: str) -> registry.Family:
    if isinstance(model, registry.Family):
        return model
    if model:
        return registry.resolve(model)
    mt = hf_config.get("model_type")
    if not isinstance(mt, str):
        raise CheckpointError(f"{os.path.join(ckpt, 'config.json')}: has no \"model_type\"; name the family "
                              "with --model pkg.module:FAMILY")
    return registry.get(mt)


def default_out(ckpt) -> str:
    """Where a conversion of `ckpt` goes without an explicit output: CKPT-flax beside it."""
    return os.path.abspath(os.fspath(ckpt)).rstrip(os.sep) + "-flax"


def convert(ckpt, out=None, dtype: str | None = None, overwrite: bool = False, model=None, rules=None,
            strict: bool = False, dry_run: bool = False, progress: bool = True, autoport=(),
            quantize: str | None = None, quantize_lm_head: bool = False) -> Summary:
    """Convert checkpoint folder `ckpt` into mmjax folder `out` (default: default_out(ckpt),
    CKPT-flax beside it); returns a Summary.

    model: "pkg.mod:FAMILY", a registered name, or a Family (default: config.json's model_type).
    rules: list of Rule, callable cfg -> list, or a rules .py file (default: the family's registered rules, converters.families).
    dtype: "float32" / "bfloat16" for floating params (None keeps the checkpoint's dtypes).
    strict: NaN/Inf in any converted parameter is an error (otherwise a warning).
    dry_run: build and check the plan, fill Summary.table, write nothing.
    autoport: "[KIND:]PREFIX=pkg.mod:Class(k=v)" entries: that prefix is a torch module, ported with
    mmjax.autoport into the composed model's "autoport" component (converters/autoport.py).
    quantize: "int8" stores the kernels the default rule table selects (every Linear of the decoder
    and vision tower; the LM head too with quantize_lm_head) as int8 + per-channel scale
    (converters/quantize.py). `ckpt` may then be an mmjax folder already converted.

    Each parameter is written as soon as it is converted (mmjax.checkpoint.save_params), so
    memory holds about one step's tensors, not the model."""
    t0 = time.perf_counter()
    ckpt = os.path.abspath(os.fspath(ckpt))
    if not os.path.isdir(ckpt):
        raise CheckpointError(f"{ckpt}: not a checkpoint folder")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if quantize is not None and is_mmjax_folder(ckpt):
        if dry_run or model or rules or autoport:
            raise ConversionError(f"{ckpt}: an mmjax folder is re-written as it is; --dry-run, --model, --rules "
                                  "and --autoport apply to a torch checkpoint")
        return quantize_folder(ckpt, out, quantize, quantize_lm_head, dtype, overwrite)
    if quantize_lm_head and quantize is None:
        raise ConversionError("--quantize-lm-head needs --quantize int8")
    out = os.path.abspath(os.fspath(out)) if out is not None else default_out(ckpt)
    if not dry_run:
        check_out(out, ckpt, overwrite)  # fail before any slow work

    hf_config = _read_config(ckpt)
    family = _family(model, hf_config, ckpt)
    try:
        cfg = family.config_from_hf(hf_config)
    except MmjaxError:
        raise
    except Exception as e:
        raise CheckpointError(f"{os.path.join(ckpt, 'config.json')}: family {family.name!r} cannot read it: "
                              f"{type(e).__name__}: {e}") from e
    ported_rules = []
    if autoport:
        from converters.autoport import port_prefixes

        cfg, ported_rules = port_prefixes(cfg, autoport, ckpt)
    targets = model_param_shapes(family, cfg)
    if rules is None:
        rules = family_rules(family.name)
        if rules is None:
            raise ConversionError(f"family {family.name!r} has no registered converter rules: pass --rules "
                                  "my_rules.py, or call converters.families.register_rules in the family's module")
    rule_list = load_rules(rules, cfg) + ported_rules
    quant = None
    if quantize is not None:  # checked against the model before any data is read
        cfg_out, quant, einsums = plan_quantization(family, cfg, quantize, quantize_lm_head, shapes=targets)

    if isinstance(rules, (str, os.PathLike)):
        rules_origin = os.path.abspath(os.fspath(rules))
    else:
        rules_origin = "custom" if rules is not None else f"family {family.name}"
    # A custom family is found again at load time through the spec it was converted with.
    spec = model if isinstance(model, str) and ":" in model else None
    with open_checkpoint(ckpt) as reader:
        plan = build_plan(reader.tensors(), rule_list, targets)
        if dry_run:
            return _summary(plan, family, out, dtype, t0, dry_run=True)
        source = {"path": ckpt, "format": reader.format, "files": [os.path.relpath(p, ckpt) for p in reader.paths],
                  "model_type": hf_config.get("model_type"), "rules": rules_origin,
                  **({"autoport": [str(a) for a in autoport]} if autoport else {})}
        with _progress_bar(plan, progress) as bar, staged_output(out, overwrite) as tmp:
            if quant is None:
                arrays = _Converted(plan.arrays(reader, dtype=dtype, progress=bar.update))
            else:  # kernels quantized from the checkpoint's values, the rest cast to dtype
                arrays = _Converted(quantized_stream(plan.arrays(reader, progress=bar.update), quant, einsums, dtype))
            write_model_folder(tmp, arrays, family.name, cfg if quant is None else cfg_out, ckpt, source, dtype,
                               family_spec=spec)
            bad = arrays.nonfinite
            if bad and strict:  # raised inside staged_output: the folder written so far goes away
                raise CheckpointError(f"{ckpt}: non-finite values (--strict):\n  " + _nonfinite_lines(plan, bad))
    if bad:
        warnings.warn("non-finite values in converted parameters:\n  " + _nonfinite_lines(plan, bad), stacklevel=2)
    summary = _summary(plan, family, out, dtype, t0, converted=arrays)
    summary.nonfinite = bad
    return summary


class _Converted:
    """plan.arrays() on its way to the writer: counted, and checked for NaN/Inf one at a time."""

    def __init__(self, arrays):
        self._arrays = arrays
        self.parameters = self.bytes = self.count = 0
        self.nonfinite: list[tuple[str, int, int]] = []

    def __iter__(self):
        for target, a in self._arrays:
            self.parameters, self.bytes = self.parameters + a.size, self.bytes + a.nbytes
            self.count += 1
            self.nonfinite += nonfinite([(target, a)])
            yield target, a


def _nonfinite_lines(plan: Plan, bad) -> str:
    return "\n  ".join(f"{t} (from {', '.join(plan.origin[t][:2])}{', ...' if len(plan.origin[t]) > 2 else ''}): "
                       f"{n} NaN, {i} Inf" for t, n, i in bad)


def _progress_bar(plan: Plan, progress: bool):
    from tqdm import tqdm

    return tqdm(total=plan.num_sources, unit="tensor", desc="converting", disable=None if progress else True)


def _summary(plan: Plan, family, out, dtype, t0, converted: _Converted | None = None, dry_run=False) -> Summary:
    if converted is not None:
        n, nbytes = converted.parameters, converted.bytes
    else:  # dry run: estimate at the output dtype (checkpoint dtype when dtype is None)
        n = nbytes = 0
        dt = resolve_dtype(dtype)
        for s in plan.steps:
            src_dt = resolve_dtype(plan.sources[s.names[0]][1])
            item = (dt if dt is not None and src_dt.kind in "fV" else src_dt).itemsize
            for shp in s.target_shapes:
                k = math.prod(shp)
                n, nbytes = n + k, nbytes + k * item
    arrays = converted.count if converted is not None else len(plan.targets)  # int8 kernels bring a scale
    return Summary(family.name, plan.num_sources, len(plan.dropped), arrays, n, nbytes,
                   time.perf_counter() - t0, out, dtype, dry_run, plan.table() if dry_run else "")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m converters.torch2flax",
        description="Convert a PyTorch/HF checkpoint folder (safetensors, sharded safetensors, "
                    "pytorch_model.bin loaded weights-only) into an mmjax model folder: an orbax "
                    "params checkpoint, mmjax_config.json and the tokenizer/processor files.")
    p.add_argument("ckpt", help="checkpoint folder with config.json and weights")
    p.add_argument("--out", help="output folder, written atomically (default: CKPT-flax beside CKPT)")
    p.add_argument("--dtype", choices=DTYPES, help="dtype of floating parameters (default: as in the checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new one is complete")
    p.add_argument("--dry-run", action="store_true", help="check every tensor and shape, print the mapping table, write nothing")
    p.add_argument("--model", help="family to use: a registered name or pkg.module:FAMILY (default: config.json model_type)")
    p.add_argument("--rules", help="python file whose RULES (list of Rule, or cfg -> list) replaces the family's "
                   "rules (the contract: docs/converters.md, 'A rules file')")
    p.add_argument("--strict", action="store_true", help="NaN/Inf in a converted parameter is an error, not a warning")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--autoport", action="append", default=[], metavar="[KIND:]PREFIX=pkg.mod:Class(k=v)",
                   help="the checkpoint's PREFIX* tensors are this torch module: port it with mmjax.autoport into "
                        "the model's 'autoport' component (repeatable; docs/autoport.md)")
    p.add_argument("--quantize", choices=QUANT_METHODS,
                   help="weight-only quantization of every Linear in the decoder and vision tower (symmetric, "
                        "per output channel); CKPT may also be an mmjax folder already converted")
    p.add_argument("--quantize-lm-head", action="store_true", help="with --quantize: the LM head too")
    a = p.parse_args(argv)
    out = a.out
    if out is None:
        out = a.ckpt.rstrip(os.sep) + f"-{a.quantize}" if a.quantize and is_mmjax_folder(a.ckpt) else default_out(a.ckpt)
    try:
        s = convert(a.ckpt, out, dtype=a.dtype, overwrite=a.overwrite, model=a.model, rules=a.rules,
                    strict=a.strict, dry_run=a.dry_run, progress=not a.quiet, autoport=a.autoport,
                    quantize=a.quantize, quantize_lm_head=a.quantize_lm_head)
    except MmjaxError as e:
        partial = getattr(e, "partial_plan", None)
        if a.dry_run and partial is not None:  # what did map, so the missing rules are easy to write
            print(partial.table())
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, I/O error: the message names the file; OUT was not written
        print(f"error: {e}; no output folder was written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no output folder was written", file=sys.stderr)
        return 130
    if s.dry_run:
        print(s.table)
        if os.path.lexists(out) and not a.overwrite:
            print(f"note: {out} exists; a real run needs --overwrite", file=sys.stderr)
    print(s.line())  # ends with "-> OUT": where it went, also when OUT was the default
    return 0


if __name__ == "__main__":
    sys.exit(main())
