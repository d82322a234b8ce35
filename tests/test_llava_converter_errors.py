"""Converter failures on a real LLaVA checkpoint: each names the tensor, and no output exists."""
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from converters.torch2flax import convert, main
from mmjax.errors import ConversionError, UnknownModelError

Q0 = "language_model.model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def source(tiny_llava):
    return tiny_llava.hf  # read-only: every test copies it


def _edited(source, tmp_path, edit):
    ck = tmp_path / "ckpt"
    shutil.copytree(source, ck)
    tensors = load_file(ck / "model.safetensors")
    edit(tensors)
    save_file(tensors, ck / "model.safetensors", metadata={"format": "pt"})
    return ck


@pytest.mark.parametrize("case,named", [
    ("missing", [Q0, "decoder/layers_0/attn/q/kernel"]),
    ("extra", ["language_model.model.layers.0.self_attn.q_norm.weight"]),
    ("wrong_shape", [Q0, "decoder/layers_0/attn/q/kernel", "(64, 4, 16)"]),
])
def test_bad_tensors_are_named_and_nothing_is_written(source, tmp_path, case, named):
    edits = {
        "missing": lambda t: t.pop(Q0),
        "extra": lambda t: t.__setitem__("language_model.model.layers.0.self_attn.q_norm.weight",
                                         np.ones(16, np.float32)),
        "wrong_shape": lambda t: t.__setitem__(Q0, np.ones((60, 64), np.float32)),
    }
    ck = _edited(source, tmp_path, edits[case])
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as e:
        convert(ck, out, progress=False)
    for name in named:
        assert name in str(e.value)
    assert not out.exists()
    assert main([str(ck), "--out", str(out), "--quiet"]) == 1 and not out.exists()


def test_unknown_architecture(source, tmp_path):
    ck = tmp_path / "ckpt"
    shutil.copytree(source, ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["model_type"] = "llava_next_video_xl"
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnknownModelError) as e:
        convert(ck, tmp_path / "out", progress=False)
    assert "llava_next_video_xl" in str(e.value) and "llava" in str(e.value)
    assert not (tmp_path / "out").exists()
