"""Bad checkpoints, end to end, on real tiny LLaVA folders (mmjax.testing.save_tiny_llava).

Source checkpoints are broken by editing their bytes and converted both through the API
(`convert`, to assert the error TYPE) and the CLI (`main`, exit code and stderr); converted
folders are broken before `mmjax.load`. Every case asserts the type, that the message names the
file / tensor / parameter, that no output appeared (or an existing one is unchanged), and that
the source is untouched: sha256 of every file before and after.

Synthetic versions of the reader cases (one per malformed-header kind) are in
tests/test_converter_readers.py, the toy-family CLI guarantees in tests/test_converter_cli.py;
here each appears once more on a real model folder. docs/refusals.md lists all of them.
"""
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import converters.torch2flax as t2f
import converters.writer as writer
import mmjax
from converters.torch2flax import convert, main
from mmjax.errors import CheckpointError, ConversionError, LoadError, UnknownModelError
from mmjax.testing.checkpoints import save_tiny_llava

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- helpers

def digest(folder) -> dict:
    """relative path -> sha256 of every file under folder."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def leftovers(parent) -> list:
    return sorted(n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n)


def copy(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def refused(capsys, src, out, err_type, pattern, *flags):
    """The API raises err_type matching pattern; the CLI exits 1 printing it; nothing written."""
    before, out_before = digest(src), digest(out) if out.exists() else None
    kw = {"overwrite": "--overwrite" in flags, "strict": "--strict" in flags}
    with pytest.raises(err_type, match=pattern) as ei:
        convert(src, out, progress=False, **kw)
    assert main([str(src), "--out", str(out), "--quiet", *flags]) == 1
    err = capsys.readouterr().err
    assert re.search(pattern, err), err
    assert digest(src) == before, "the source checkpoint was modified"
    assert (digest(out) if out.exists() else None) == out_before, "the output path was written"
    parent = out.parent
    while not parent.is_dir():
        parent = parent.parent
    assert leftovers(parent) == []
    return str(ei.value)


def st_parts(path):
    """(header dict, data section bytes) of a safetensors file."""
    blob = open(path, "rb").read()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def st_write(path, header, data, header_len=None):
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)


def tensors_of(header):
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def llava(tmp_path_factory, tiny_llava):
    """(single-file safetensors LLaVA, sharded LLaVA, converted folder); tests copy before damaging."""
    root = tmp_path_factory.mktemp("llava")
    save_tiny_llava(root / "sharded", max_shard_size="200KB")
    return tiny_llava.hf, root / "sharded", tiny_llava.flax


# ---------------------------------------------------------------- malformed safetensors

def _truncate(path):
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: int(len(blob) * 0.6)])
    header, _ = st_parts(path)
    last = tensors_of(header)[-1]
    return rf"model\.safetensors: invalid safetensors header:\n[\s\S]*tensor '{re.escape(last)}': data_offsets .* out of range"


def _header_beyond_file(path):
    blob = bytearray(open(path, "rb").read())
    size = len(blob)
    blob[:8] = struct.pack("<Q", size)
    open(path, "wb").write(bytes(blob))
    return rf"model\.safetensors: header length {size} exceeds the file size of {size} bytes"


def _header_not_json(path):
    blob = bytearray(open(path, "rb").read())
    blob[8] = ord("X")
    open(path, "wb").write(bytes(blob))
    return r"model\.safetensors: header is not valid UTF-8 JSON"


def _overlap(path):
    header, data = st_parts(path)
    names = tensors_of(header)
    size = lambda n: header[n]["data_offsets"][1] - header[n]["data_offsets"][0]  # noqa: E731
    a, b = next((a, b) for i, a in enumerate(names) for b in names[i + 1:] if size(a) == size(b))
    header[b]["data_offsets"] = list(header[a]["data_offsets"])
    st_write(path, header, data)
    return rf"model\.safetensors: invalid safetensors header:\n  tensors '{re.escape(a)}' .* and '{re.escape(b)}' .* overlap"


def _out_of_range(path):
    header, data = st_parts(path)
    name = tensors_of(header)[3]
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + 10**9, end + 10**9]
    st_write(path, header, data)
    return rf"tensor '{re.escape(name)}': data_offsets \[{begin + 10**9}, {end + 10**9}\] out of range"


def _unknown_dtype(path):
    header, data = st_parts(path)
    name = tensors_of(header)[1]
    header[name]["dtype"] = "F31"
    st_write(path, header, data)
    return rf"tensor '{re.escape(name)}': unknown dtype 'F31' \(known: BOOL, .*BF16"


@pytest.mark.parametrize("edit", [_truncate, _header_beyond_file, _header_not_json, _overlap, _out_of_range,
                                  _unknown_dtype], ids=lambda f: f.__name__.strip("_"))
def test_malformed_safetensors_through_the_cli(llava, tmp_path, capsys, edit):
    src = copy(llava[0], tmp_path)
    pattern = edit(src / "model.safetensors")
    msg = refused(capsys, src, tmp_path / "out", CheckpointError, pattern)
    assert str(src / "model.safetensors") in msg


def test_index_naming_a_missing_shard(llava, tmp_path, capsys):
    src = copy(llava[1], tmp_path)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    name = sorted(index["weight_map"])[5]
    index["weight_map"][name] = "model-00009-of-00004.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(capsys, src, tmp_path / "out", CheckpointError,
            rf"model\.safetensors\.index\.json:\n  tensor '{re.escape(name)}' \(and 0 more\): "
            r"shard 'model-00009-of-00004\.safetensors' does not exist")


def test_index_naming_a_tensor_not_in_its_shard(llava, tmp_path, capsys):
    src = copy(llava[1], tmp_path)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    name = sorted(wm)[5]
    home, other = wm[name], next(s for s in sorted(set(wm.values())) if s != wm[name])
    wm[name] = other
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    msg = refused(capsys, src, tmp_path / "out", CheckpointError,
                  rf"tensor '{re.escape(name)}': the index puts it in '{re.escape(other)}', which does not contain it")
    assert f"tensor '{name}': '{home}' contains it but the index does not list it there" in msg


# ---------------------------------------------------------------- torch .bin

class _Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


@pytest.mark.parametrize("layout", ["zip", "raw_pickle"])
def test_code_running_bin_is_refused_and_never_runs(llava, tmp_path, capsys, layout):
    src = copy(llava[0], tmp_path)
    sd = load_file(str(src / "model.safetensors"))
    os.remove(src / "model.safetensors")
    torch.save(sd, src / "pytorch_model.bin")
    # control: the same weights as a plain .bin convert fine, so the refusal is about the payload
    convert(src, tmp_path / "plain", progress=False)
    marker = tmp_path / "MARKER"
    if layout == "zip":
        torch.save({**sd, "language_model.extra": _Payload(str(marker))}, src / "pytorch_model.bin")
    else:  # the pre-zip layout is a bare pickle stream: the same weights-only unpickler reads it
        import pickle

        with open(src / "pytorch_model.bin", "wb") as f:
            pickle.dump({"language_model.extra": _Payload(str(marker))}, f, protocol=2)
    refused(capsys, src, tmp_path / "out", CheckpointError,
            r"pytorch_model\.bin: refusing to unpickle pytorch_model\.bin: it contains code/objects beyond tensors")
    assert not marker.exists(), "the pickle payload ran"


# ---------------------------------------------------------------- NaN / Inf

def _poison(path, name, index, value):
    header, data = st_parts(path)
    assert header[name]["dtype"] == "F32"
    begin = header[name]["data_offsets"][0]
    data = bytearray(data)
    data[begin + 4 * index: begin + 4 * index + 4] = np.float32(value).tobytes()
    st_write(path, header, bytes(data))


def test_nonfinite_weights_warn_and_fail_with_strict(llava, tmp_path, capsys):
    src = copy(llava[0], tmp_path)
    q, bias = "language_model.model.layers.1.self_attn.q_proj.weight", "multi_modal_projector.linear_1.bias"
    _poison(src / "model.safetensors", q, 7, np.nan)
    _poison(src / "model.safetensors", bias, 0, np.inf)
    _poison(src / "model.safetensors", bias, 3, -np.inf)
    q_line = r"\n  decoder/layers_1/attn/q/kernel \(from " + re.escape(q) + r"\): 1 NaN, 0 Inf"
    bias_line = r"\n  projector/\S+ \(from " + re.escape(bias) + r"\): 0 NaN, 2 Inf"
    msg = refused(capsys, src, tmp_path / "out", CheckpointError, r"non-finite values \(--strict\):" + r"[\s\S]*" + q_line,
                  "--strict")
    assert re.search(bias_line, msg), msg
    before = digest(src)
    with pytest.warns(UserWarning, match=r"non-finite values in converted parameters") as rec:
        assert main([str(src), "--out", str(tmp_path / "lenient"), "--quiet"]) == 0
    text = "\n".join(str(w.message) for w in rec)
    assert re.search(q_line, text) and re.search(bias_line, text), text
    assert (tmp_path / "lenient" / "params").is_dir() and digest(src) == before


# ---------------------------------------------------------------- config.json

def test_config_json_missing_invalid_or_unknown(llava, tmp_path, capsys):
    src = copy(llava[0], tmp_path)
    cfg = (src / "config.json").read_text()
    os.remove(src / "config.json")
    refused(capsys, src, tmp_path / "out", CheckpointError, r"config\.json: missing; the converter needs")
    (src / "config.json").write_text(cfg[: len(cfg) // 2])
    refused(capsys, src, tmp_path / "out", CheckpointError, r"config\.json: not valid JSON")
    (src / "config.json").write_text(json.dumps(dict(json.loads(cfg), model_type="llava_next_xl")))
    msg = refused(capsys, src, tmp_path / "out", UnknownModelError,
                  r"unknown model_type 'llava_next_xl'; supported: .*llava.*mmjax\.registry\.register")
    assert "--model my_pkg.my_module:FAMILY" in msg


# ---------------------------------------------------------------- the output path

def test_existing_output_is_refused_and_kept(llava, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    refused(capsys, llava[0], out, ConversionError, r"out: already exists; pass --overwrite")
    assert (out / "mine.txt").read_text() == "precious"


def test_unwritable_output_fails_before_any_read(llava, tmp_path, capsys, monkeypatch):
    # chmod 555 does not stop root (CI runs as root): a path under a regular FILE fails for everyone
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(t2f, "open_checkpoint", lambda *a: pytest.fail("read the checkpoint before checking --out"))
    for out in (blocker / "out", blocker / "deeper" / "out"):
        refused(capsys, llava[0], out, ConversionError,
                rf"{re.escape(str(out))}: cannot create the output folder: {re.escape(str(blocker))} is not a directory")
    assert blocker.read_text() == "not a folder"


class _FullDiskCheckpointer:
    """Stands in for orbax: writes part of the checkpoint, then the disk is full."""

    def save(self, path, tree, *, save_args=None):  # orbax StandardCheckpointer.save's signature
        os.makedirs(os.path.join(path, "d"))
        with open(os.path.join(path, "d", "chunk"), "wb") as f:
            f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(path, "d", "chunk"))

    def close(self):
        pass


def test_write_error_mid_way_leaves_nothing(llava, tmp_path, capsys, monkeypatch):
    import mmjax.checkpoint

    src, out = llava[0], tmp_path / "out"
    monkeypatch.setattr(mmjax.checkpoint, "_checkpointer", _FullDiskCheckpointer)
    refused(capsys, src, out, LoadError, r"params: writing the orbax checkpoint failed: OSError: \[Errno 28\] "
                                        r"No space left on device: .*chunk")
    monkeypatch.undo()
    # later: params are on disk, copying the tokenizer hits the full disk (a plain OSError)
    real_copy = writer.shutil.copyfile

    def full_disk_copy(a, b, *args, **kw):
        if a.endswith("tokenizer.json"):
            assert os.path.isdir(os.path.join(os.path.dirname(b), "params"))
            raise OSError(errno.ENOSPC, "No space left on device", b)
        return real_copy(a, b, *args, **kw)

    monkeypatch.setattr(writer.shutil, "copyfile", full_disk_copy)
    before = digest(src)
    with pytest.raises(OSError, match="No space left on device"):
        convert(src, out, progress=False)
    assert main([str(src), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert re.search(r"error: \[Errno 28\] No space left on device: .*tokenizer\.json'; no output folder was written", err)
    assert not out.exists() and leftovers(tmp_path) == [] and digest(src) == before


_SLOW_CLI = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
# A shell that starts us in the background may have set SIGINT to "ignore"; a user's terminal
# does not: restore Python's normal Ctrl-C handling.
signal.signal(signal.SIGINT, signal.default_int_handler)
import converters.writer as writer
real_save = writer.save_params

def slow_save(path, params):  # a slow disk: params are written, the rest of the folder is not
    real_save(path, params)
    print("STAGED", os.path.dirname(path), flush=True)
    time.sleep(120)

writer.save_params = slow_save
from converters.torch2flax import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("existing", [False, True], ids=["new_out", "overwrite"])
def test_sigint_mid_conversion_leaves_no_partial_output(llava, tmp_path, existing):
    src, out = llava[0], tmp_path / "out"
    if existing:
        shutil.copytree(llava[2], out)
    out_before, src_before = (digest(out) if existing else None), digest(src)
    script = tmp_path / "slow_cli.py"
    script.write_text(_SLOW_CLI.format(repo=REPO))
    cmd = [sys.executable, str(script), str(src), "--out", str(out), "--quiet"] + (["--overwrite"] if existing else [])
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu"))
    try:
        line = proc.stdout.readline()  # blocks until the child is mid-write (or exits)
        assert line.startswith("STAGED "), (line, proc.stderr.read() if proc.poll() is not None else "")
        staged = line.split(" ", 1)[1].strip()
        assert os.path.isdir(os.path.join(staged, "params")) and ".tmp-" in staged
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted: no output folder was written" in err
    assert not os.path.exists(staged), "the staging folder was left behind"
    assert (digest(out) if existing else out.exists()) == (out_before if existing else False)
    assert leftovers(tmp_path) == [] and digest(src) == src_before


# ---------------------------------------------------------------- mmjax.load on broken folders

def _rm(rel):
    def edit(folder):
        p = folder / rel
        shutil.rmtree(p) if p.is_dir() else os.remove(p)
    return edit


def _write(rel, text):
    def edit(folder):
        (folder / rel).write_text(text)
    return edit


def _truncate_largest_params_file(folder):
    files = [os.path.join(r, f) for r, _, fs in os.walk(folder / "params") for f in fs]
    big = max(files, key=os.path.getsize)
    blob = open(big, "rb").read()
    open(big, "wb").write(blob[: len(blob) // 2])


def _edit_config(fn):
    def edit(folder):
        meta = json.loads((folder / "mmjax_config.json").read_text())
        fn(meta)
        (folder / "mmjax_config.json").write_text(json.dumps(meta))
    return edit


def _edit_image_processor(**changes):
    def edit(folder):
        cfg = json.loads((folder / "processor_config.json").read_text())
        cfg["image_processor"].update(changes)
        (folder / "processor_config.json").write_text(json.dumps(cfg))
    return edit


LOAD_CASES = {
    "no_mmjax_config": (_rm("mmjax_config.json"), LoadError, r"mmjax_config\.json: missing; is this a folder written by converters\.torch2flax"),
    "no_params": (_rm("params"), LoadError, r"/params: no orbax checkpoint folder here"),
    "no_tokenizer": (_rm("tokenizer.json"), LoadError, r"no tokenizer\.json"),
    "truncated_params_data": (_truncate_largest_params_file, LoadError,
                              r"/params: parameter '(decoder|vision|projector)[./]\S+' cannot be read"),
    "garbage_orbax_metadata": (_write("params/_METADATA", "{garbage"), LoadError,
                               r"/params: .*metadata .*(missing|corrupt)"),
    "garbage_mmjax_config": (_write("mmjax_config.json", '{"family": "llava", "config": {'), LoadError,
                             r"mmjax_config\.json: not valid JSON"),
    "deeply_nested_mmjax_config": (_write("mmjax_config.json", "[" * 100_000), LoadError,
                                   r"mmjax_config\.json: not valid JSON"),
    "garbage_tokenizer": (_write("tokenizer.json", "{garbage"), LoadError, r"tokenizer\.json: cannot parse"),
    "deeply_nested_tokenizer_config": (_write("tokenizer_config.json", "[" * 100_000), LoadError,
                                       r"tokenizer_config\.json: not valid JSON"),
    "deeply_nested_processor_config": (_write("processor_config.json", '{"a": ' + "[" * 100_000), LoadError,
                                       r"processor_config\.json: not valid JSON"),
    "processor_value_not_a_number": (_edit_image_processor(rescale_factor="1/255"), LoadError,
                                     r": image processor config: rescale_factor: expected a number, got '1/255'"),
    "processor_zero_image_std": (_edit_image_processor(image_std=[0.5, 0.0, 0.5]), LoadError,
                                 r": image processor config: image_std: every entry must be finite and non-zero"),
    "deeply_nested_chat_template_json": (_write("chat_template.json", "[" * 100_000), LoadError,
                                         r"chat_template\.json: not valid JSON"),
    "hidden_size_edited": (_edit_config(lambda m: (m["config"]["decoder"].update(hidden_size=48),
                                                         m["config"]["projector"].update(out_features=48))), LoadError,
                           r"params do not match mmjax_config\.json:\n  decoder/embed/embedding: config expects "
                           r"shape \(512, 48\), checkpoint has \(512, 64\)"),
    "num_layers_edited": (_edit_config(lambda m: m["config"]["decoder"].update(num_layers=3)), LoadError,
                          r"decoder/layers_2/\S+: missing from the checkpoint"),
    "config_value_wrong_type": (_edit_config(lambda m: m["config"]["decoder"].update(hidden_size="64")), LoadError,
                                r"mmjax_config\.json: config does not fit llava: LlamaConfig\.hidden_size: expected int, got .64."),
    "unknown_family": (_edit_config(lambda m: m.update(family="llava_next_xl")), UnknownModelError,
                       r"mmjax_config\.json: unknown model_type 'llava_next_xl'; supported: .*llava"),
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_load_refuses_broken_folder(llava, tmp_path, case):
    edit, err_type, pattern = LOAD_CASES[case]
    folder = copy(llava[2], tmp_path, "flax")
    edit(folder)
    before = digest(folder)
    with pytest.raises(err_type, match=pattern) as ei:
        mmjax.load(folder)
    assert str(folder) in str(ei.value)
    assert digest(folder) == before, "load wrote into the folder"


def test_load_control_copy_loads(llava, tmp_path):
    # the copies above fail because of their edits: an unedited copy loads and runs
    model = mmjax.load(copy(llava[2], tmp_path, "flax"))
    assert model.config.text.hidden_size == 64 and model.tokenizer.vocab_size == 512


@pytest.mark.parametrize("layout", ["module", "package"])
def test_load_never_imports_code_shipped_in_the_model_folder(llava, tmp_path, monkeypatch, layout):
    # mmjax_config.json's family_spec is imported; a downloaded folder must not bring that code
    # along (with the folder as cwd, python -c / a notebook would have it on sys.path)
    folder = copy(llava[2], tmp_path, "flax")
    marker = tmp_path / "MARKER"
    code = f"open({str(marker)!r}, 'w').write('code ran')\nFAMILY = None\n"
    if layout == "module":
        (folder / "acme_vlm.py").write_text(code)
    else:
        (folder / "acme_vlm").mkdir()
        (folder / "acme_vlm" / "__init__.py").write_text(code)
    _edit_config(lambda m: m.update(family_spec="acme_vlm.model:FAMILY" if layout == "package" else "acme_vlm:FAMILY"))(folder)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.chdir(folder)
    with pytest.raises(LoadError, match=r"mmjax_config\.json: family_spec 'acme_vlm[.:].*' would import .*acme_vlm.*, "
                                        r"inside the model folder; mmjax does not run code shipped with a model"):
        mmjax.load(folder)
    assert not marker.exists(), "code from the model folder ran"


def test_load_refuses_a_non_string_family(llava, tmp_path):
    folder = copy(llava[2], tmp_path, "flax")
    _edit_config(lambda m: m.update(family=["llava"]))(folder)
    with pytest.raises(LoadError, match=r"mmjax_config\.json: family must be a string, got \['llava'\]"):
        mmjax.load(folder)
