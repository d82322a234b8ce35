"""Host memory of generation's inputs: the pixel values exist once at the prefill (issue 15's
peak-memory target). The prepare step pads into one aligned buffer that XLA:CPU aliases instead
of copying; the buffer is released when the request ends (mmjax.preprocess.buffers)."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from mmjax.bucketing import Buckets
from mmjax.families.qwen2vl import Qwen2VLConfig
from mmjax.preprocess.buffers import ALIGN, aligned_zeros, padded_rows, release_aliased, to_device
from mmjax.preprocess.composed import prepare_composed
from mmjax.preprocess.qwen2vl import prepare
from mmjax.testing.qwen_checkpoints import tiny_qwen2vl_config

cpu = pytest.mark.skipif(jax.default_backend() != "cpu", reason="host aliasing is XLA:CPU's")


def test_padded_rows_is_one_aligned_copy_with_zero_padding():
    a = np.arange(5 * 7, dtype=np.float32).reshape(5, 7)
    p = padded_rows(a, 8)
    assert p.shape == (8, 7) and p.ctypes.data % ALIGN == 0
    assert np.array_equal(p[:5], a) and not p[5:].any()
    assert padded_rows(p, 8) is p  # already padded and aligned: no second copy
    assert aligned_zeros((3, 5), np.int32).ctypes.data % ALIGN == 0


@cpu
def test_device_array_aliases_the_padded_buffer_and_keeps_it_alive():
    p = padded_rows(np.ones((100, 1176), np.float32), 256)
    ptr = p.ctypes.data
    d = to_device(p, np.float32)
    assert d.unsafe_buffer_pointer() == ptr  # no device copy
    del p
    release_aliased()
    assert float(d.sum()) == 100 * 1176  # the device array still owns the buffer
    # a dtype change or an unaligned array is copied, as jnp.asarray does
    u = np.ones((64, 9), np.float32)[:, 1:]
    assert to_device(u, np.float32).unsafe_buffer_pointer() != u.ctypes.data


@cpu
@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen2vl_prepare_pads_pixels_once_into_what_prefill_reads(variant):
    cfg = Qwen2VLConfig.from_hf(tiny_qwen2vl_config(variant).to_dict())
    v = cfg.vision
    grid = np.array([[1, 8, 8]])
    n_tok = 64 // v.spatial_merge_size**2
    ids = np.array([[1, 2] + [cfg.image_token_id] * n_tok + [3]], np.int32)
    px = np.random.default_rng(0).standard_normal((64, v.patch_dim)).astype(np.float32)
    out = prepare(cfg, {"input_ids": ids, "pixel_values": px, "image_grid_thw": grid}, Buckets(patches=(128,)))
    got = out["pixel_values"]
    assert got.shape == (128, v.patch_dim) and got.ctypes.data % ALIGN == 0
    assert np.array_equal(got[:64], px) and not got[64:].any()
    assert to_device(got, np.float32).unsafe_buffer_pointer() == got.ctypes.data


def test_composed_prepare_pads_images_into_an_aligned_buffer():
    class Cfg:  # what prepare_composed reads
        image_seq_length, image_token_id, fusion, prefix_attention = 2, 9, "tokens", None
    px = np.ones((3, 3, 4, 4), np.float32)
    ids = np.array([[9, 9, 9, 9, 9, 9, 1]])
    got = prepare_composed(Cfg, {"input_ids": ids, "pixel_values": px}, Buckets(images=(4,)))["pixel_values"]
    assert got.shape == (4, 3, 4, 4) and got.ctypes.data % ALIGN == 0 and not got[3:].any()
