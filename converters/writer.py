"""Write a converted model folder atomically.

    OUT/params/             orbax-layout checkpoint of the params, written one parameter at a time
                            as they arrive, + params_manifest.json (mmjax.checkpoint.save_params)
    OUT/mmjax_config.json   {"family", "config", "dtype", "mmjax_version", "source"[, "family_spec"]}
    OUT/source_config.json  the checkpoint's config.json, unchanged
    OUT/tokenizer.json ...  tokenizer / processor / generation files copied from the checkpoint

Everything is written into a temporary folder beside OUT (`.OUT.tmp-XXXX`, same parent, so
the final rename stays on one filesystem) and renamed into place only at the very end. On any
error or KeyboardInterrupt the temporary folder is removed and OUT does not appear. An existing
OUT is replaced (with overwrite=True) only after the new folder is complete. The source
checkpoint is only ever read.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import uuid
from typing import Any, Iterable, Iterator, Mapping

from mmjax.checkpoint import save_params
from mmjax.errors import ConversionError

__all__ = ["COPIED_FILES", "staged_output", "check_out", "write_model_folder", "mmjax_version"]

# Files a runtime needs beside the weights; copied when present in the checkpoint folder.
COPIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json", "processor_config.json",
    "generation_config.json", "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt",
)


def check_out(out: str, ckpt: str, overwrite: bool) -> None:
    """Refuse an OUT that exists (without overwrite), overlaps the source folder, or cannot be created."""
    o, c = os.path.realpath(out), os.path.realpath(ckpt)
    if o == c or o.startswith(c + os.sep) or c.startswith(o + os.sep):
        raise ConversionError(f"{out}: the output folder must not be, contain, or lie inside the "
                              f"source checkpoint {ckpt} (the source is never modified)")
    if os.path.lexists(out) and not overwrite:
        raise ConversionError(f"{out}: already exists; pass --overwrite (overwrite=True) to replace it")
    # An output that cannot be created fails now, not after the whole conversion has run.
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConversionError(f"{out}: cannot create the output folder: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConversionError(f"{out}: cannot create the output folder: {parent} is not writable")


@contextlib.contextmanager
def staged_output(out: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a fresh temporary folder; on success it becomes `out`, on any failure it vanishes."""
    out = os.path.abspath(out)
    parent, name = os.path.dirname(out), os.path.basename(out)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    except OSError as e:  # what check_out cannot foresee (a full disk, a special filesystem such as /proc)
        raise ConversionError(f"{out}: cannot create the output folder: {e}") from e
    try:
        yield tmp
        _commit(tmp, out, overwrite)
    except BaseException:  # KeyboardInterrupt too: never leave a half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit(tmp: str, out: str, overwrite: bool) -> None:
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    if not overwrite:  # appeared while we were converting
        raise ConversionError(f"{out}: already exists; pass --overwrite (overwrite=True) to replace it")
    old = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)  # put the previous version back
        raise
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.remove(old)


def mmjax_version() -> str:
    try:
        from importlib.metadata import version

        return version("mmjax")
    except Exception:  # running from a source tree that is not installed
        import mmjax

        return getattr(mmjax, "__version__", "0+unknown")


def _jsonable(x):
    if hasattr(x, "tolist"):  # numpy scalars
        return x.tolist()
    return str(x)  # dtypes and enums: their name


def write_model_folder(folder: str, params: Mapping[str, Any] | Iterable[tuple[str, Any]], family: str, cfg: Any,
                       ckpt: str, source: dict, dtype: str | None, family_spec: str | None = None,
                       source_config: str = "config.json") -> list[str]:
    """Fill `folder` (a fresh staging folder); returns the names of the files copied from ckpt.

    params: a nested dict of arrays, or (path, array) pairs consumed one at a time.
    source_config: the file of ckpt kept as source_config.json (an mmjax folder's own
    source_config.json when a converted model is re-written, e.g. quantized)."""
    save_params(os.path.join(folder, "params"), params)
    if not dataclasses.is_dataclass(cfg):
        raise ConversionError(f"family {family!r}: config_from_hf returned a {type(cfg).__name__}, "
                              "expected a (frozen) dataclass")
    meta = {"family": family, "config": dataclasses.asdict(cfg), "dtype": dtype,
            "mmjax_version": mmjax_version(), "source": source}
    if family_spec is not None:  # "pkg.mod:FAMILY" of a custom family, for mmjax.load
        meta["family_spec"] = family_spec
    with open(os.path.join(folder, "mmjax_config.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, default=_jsonable)
        f.write("\n")
    copied = []
    for name in COPIED_FILES:
        src = os.path.join(ckpt, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(folder, name))
            copied.append(name)
    shutil.copyfile(os.path.join(ckpt, source_config), os.path.join(folder, "source_config.json"))
    return copied
