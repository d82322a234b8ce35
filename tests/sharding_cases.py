"""Subprocess workers for tests/test_sharding.py, and the constants both sides share: this file
run as a script (`sharding_cases.py meshes|process FOLDERS_JSON`) with XLA_FLAGS set to 8 (or 4)
host devices loads the tiny models on every mesh, generates, measures loading peaks, counts
collectives in the compiled programs and runs docs/sharding.md's examples, then prints one
`RESULT {json}` line that the tests in test_sharding.py check.
"""
from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MESHES = ("model:2", "model:4", "model:8", "data:2,model:4")
PROMPTS = ["<image>\nWhat is this?", "<image>\nhello there general kenobi"]
NEW_TOKENS = 12
# meshes that do not divide C's / Q's heads; the vision tower data parallel on one of them
ODD_MESHES = ("model:8", "data:4,model:2", "data:2,model:4")
ENCODER_DATA_MESH = "data:2,model:4"


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_during(fn):
    """(result, peak RSS increase in MiB) of fn(); VmHWM is reset first (Linux clear_refs 5).
    Freed heap goes back to the OS first: otherwise what the run before left free in the heap is
    reused without raising RSS, and the comparison of two loads depends on their order (seen:
    host-then-shard 155 MiB after the sharded load freed its arrays, 212 MiB in another run)."""
    import gc

    from mmjax.preprocess.buffers import release_free_heap

    gc.collect()
    release_free_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss("VmRSS")
    out = fn()
    return out, (_rss("VmHWM") - base) / 2**20


def _image():
    from PIL import Image

    return Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 40, 3), np.uint8))


def _generate(model):
    import mmjax

    img = _image()
    out = mmjax.generate(model, [[img], [img]], PROMPTS, max_new_tokens=NEW_TOKENS, chat_template=False)
    return out.token_ids


def _logits(model):
    import mmjax

    img = _image()
    inp = model.preprocess([[img], [img]], PROMPTS, chat_template=False)
    return mmjax.forward(model, **inp)  # Qwen2-VL's image_grid_thw too


def _prefill_state(model):
    """The state prefill returns for 2 rows, a 32-token bucket and 16 new tokens (what
    _generate compiles), and the rest of the decode_steps arguments."""
    import jax.numpy as jnp

    from mmjax.api import _on_mesh
    from mmjax.generation.sampling import SamplingParams
    from mmjax.generation.state import StepArgs

    B, T, M = 2, 32, 16
    batch = _on_mesh(model, {"input_ids": jnp.zeros((B, T), jnp.int32)})
    lens = _on_mesh(model, {"lens": jnp.full((B,), 5, jnp.int32)})["lens"]
    args = StepArgs.make(SamplingParams(0.0, 0, 1.0, 0), [], 0, M, 8)
    return model.engine.prefill(model.params, batch, lens, args, cache_len=T + M, token_slots=M, greedy=True), args


def _collectives(model):
    state, args = _prefill_state(model)
    import jax.numpy as jnp

    from mmjax.models.base import decode_params

    # the program generate runs: SYNC_EVERY steps in one call, on the decoder's params
    steps = model.engine.decode_steps.lower(decode_params(model.module, model.params), state, args, jnp.int32(8),
                                            greedy=True)
    return _count_collectives(steps.compile().as_text(), model.config.text.hidden_size)


def _generate_and_prefill_hlo(model):
    """(_generate's tokens, the compiled text of the prefill program it ran): the arguments are
    caught on the way in, then lowered again."""
    jitted, seen = model.engine.prefill, []
    model.engine.prefill = lambda *a, **k: seen.append((a, k)) or jitted(*a, **k)
    try:
        tokens = _generate(model)
    finally:
        model.engine.prefill = jitted
    a, k = seen[0]
    return tokens, jitted.lower(*a, **k).compile().as_text()


def _tower_rows(model, hlo: str) -> int:
    """Images (LLaVA) or patches (Qwen2-VL) that one device's vision tower runs on in a compiled
    program: the rows of LLaVA's hidden states [I, P+1, Dv], of Qwen2-VL's blocks' [P, Dv] matmuls."""
    v = model.config.vision
    v = getattr(v, "tower", v)  # LLaVA's clip component holds the CLIP tower's config
    if hasattr(v, "num_patches"):
        pattern = rf"f32\[(\d+),{v.num_patches + 1},{v.hidden_size}\]"
    else:
        pattern = rf"= f32\[(\d+),{v.hidden_size}\]\S* dot\(.*vision/layers_"
    return min(int(n) for n in re.findall(pattern, hlo))


def _count_collectives(hlo: str, D: int) -> dict:
    counts, hidden = {}, 0
    for line in hlo.splitlines():  # one instruction may reduce a tuple of arrays (XLA's combiner)
        m = re.search(r"= (.+?) (all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(?:-start)?\(", line)
        if m:
            arrays = re.findall(r"\w+\[[\d,]*\]", m.group(1))
            counts[m.group(2)] = counts.get(m.group(2), 0) + len(arrays)
            hidden += sum(m.group(2) == "all-reduce" and bool(re.fullmatch(rf"f32\[\d+,1,{D}\]", a)) for a in arrays)
    return {"counts": counts, "hidden_all_reduces": hidden}


def _meshes_worker(folders: dict) -> dict:
    import time

    import jax

    import mmjax
    from mmjax.bucketing import Buckets
    from mmjax.families.llava import FAMILY
    from mmjax.sharding import make_mesh, shard_params

    assert jax.device_count() == 8, jax.devices()
    res, report = {}, {}
    log = logging.getLogger("mmjax.sharding")
    log.setLevel(logging.INFO)

    def run(folder, mesh, extras=(), **load_kw):
        t0 = time.perf_counter()
        lines = []
        handler = logging.Handler()
        handler.emit = lambda rec: lines.append([rec.levelname, rec.getMessage()])
        log.addHandler(handler)
        try:
            m = mmjax.load(folder, mesh=mesh, **load_kw)
        finally:
            log.removeHandler(handler)
        r = {"log": lines}
        if "prefill" in extras:
            tokens, hlo = _generate_and_prefill_hlo(m)
            r["prefill_collectives"] = _count_collectives(hlo, m.config.text.hidden_size)["counts"]
            r["tower_rows"] = _tower_rows(m, hlo)
        else:
            tokens = _generate(m)
        r.update(tokens=tokens, logits=_logits(m), seconds=round(time.perf_counter() - t0, 2))
        if mesh is not None:
            p = m.params["decoder"]["layers_0"]["attn"]
            r["q_spec"], r["k_spec"] = str(p["q"]["kernel"].sharding.spec), str(p["k"]["kernel"].sharding.spec)
            r["vision_q_spec"] = str(m.params["vision"]["layers_0"]["attn"]["q"]["kernel"].sharding.spec)
            r["vision_fc1_spec"] = str(m.params["vision"]["layers_0"]["mlp"]["fc1"]["kernel"].sharding.spec)
        if "cache" in extras:
            r["cache_spec"] = str(_prefill_state(m)[0].cache[0]["k"].sharding.spec)
        if "shards" in extras:
            r["shards"] = {"/".join(k.key for k in path): [
                list(a.shape), [list(s) for s in sorted({x.data.shape for x in a.addressable_shards})],
                len({x.device for x in a.addressable_shards})] for path, a in jax.tree_util.tree_flatten_with_path(m.params)[0]}
        if "hlo" in extras:
            r["decode_collectives"] = _collectives(m)
        return r

    def compare(name, runs):
        """runs: (key, mesh, extras, load kwargs); each against one device's tokens and logits."""
        kw = runs[0][3]
        single = run(folders[name], None, **{k: v for k, v in kw.items() if k != "mm_encoder_tp_mode"})
        res[name] = {"single": {"tokens": single["tokens"]}}
        for key, spec, extras, kw in runs:
            r = run(folders[name], spec, extras, **kw)
            r["max_dlogit"] = float(np.abs(r.pop("logits") - single["logits"]).max())
            res[name][key] = r
            report[f"{name} {key}"] = {k: r[k] for k in ("max_dlogit", "seconds", "decode_collectives",
                                                         "prefill_collectives", "tower_rows", "log") if k in r}

    compare("A", [(spec, spec, ("cache",) + {"data:2,model:4": ("shards", "hlo"), "model:4": ("hlo",)}.get(spec, ()),
                   {}) for spec in MESHES])
    # Head counts 8 does not divide; the images are padded to 8 so that mm_encoder_tp_mode="data"
    # can split them over all 8 devices (Qwen2-VL's 64-patch bucket divides already).
    eight = {"buckets": Buckets(images=(8,))}
    for name in ("C", "Q"):
        runs = [(spec, spec, ("cache",) if spec == "model:8" else (), eight) for spec in ODD_MESHES]
        runs[ODD_MESHES.index(ENCODER_DATA_MESH)] = (ENCODER_DATA_MESH, ENCODER_DATA_MESH, ("prefill",), eight)
        runs.append((f"{ENCODER_DATA_MESH} data", ENCODER_DATA_MESH, ("prefill",),
                     dict(eight, mm_encoder_tp_mode="data")))
        compare(name, runs)

    # loading: the BIG model's 64 MiB embedding over model:8 (after a warm-up load of A, so
    # orbax / tensorstore start-up costs are not counted)
    mesh = make_mesh("model:8")
    jax.block_until_ready(mmjax.load(folders["A"], mesh=mesh).params)
    big, peak = _peak_during(lambda: jax.block_until_ready(mmjax.load(folders["BIG"], mesh=mesh)))
    emb = big.params["decoder"]["embed"]["embedding"]
    nbytes = sum(a.nbytes for a in jax.tree.leaves(big.params))
    del big

    def host_then_shard():
        m = mmjax.load(folders["BIG"])
        return jax.block_until_ready(shard_params(FAMILY, m.config, mesh, m.params))

    _, peak_host = _peak_during(host_then_shard)
    res["BIG"] = {"embed_shards": sorted({tuple(s.data.shape) for s in emb.addressable_shards}),
                  "embed_devices": len({s.device for s in emb.addressable_shards}),
                  "embed_mib": emb.nbytes / 2**20, "params_mib": round(nbytes / 2**20, 1),
                  "peak_sharded_mib": round(peak, 1), "peak_host_then_shard_mib": round(peak_host, 1)}
    report["BIG load"] = res["BIG"]
    res["report"] = report
    res["docs"] = _run_docs(folders["A"])
    return res


def _run_docs(folder: str) -> dict:
    """Run every ```python block of docs/sharding.md marked `<!-- test: run -->`, in order, in one
    namespace that starts with `folder` (tiny LLaVA A) and `image`."""
    import contextlib
    import io

    text = (ROOT / "docs" / "sharding.md").read_text()
    blocks = re.findall(r"<!-- test: run -->\n```python\n(.*?)\n```", text, re.S)
    ns, buf = {"folder": folder, "image": _image()}, io.StringIO()
    with contextlib.redirect_stdout(buf):
        for code in blocks:
            exec(compile(code, "docs/sharding.md", "exec"), ns)
    return {"blocks": len(blocks), "stdout": buf.getvalue()}


def _process_worker(folders: dict) -> dict:
    from mmjax.sharding import initialize_distributed

    assert initialize_distributed()  # from MMJAX_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID
    import jax

    import mmjax

    out = {"pid": jax.process_index(), "process_count": jax.process_count(), "devices": jax.device_count(),
           "local_devices": jax.local_device_count()}
    out["tokens"] = _generate(mmjax.load(folders["A"], mesh="data:2,model:4"))
    big, peak = _peak_during(lambda: jax.block_until_ready(mmjax.load(folders["BIG"], mesh="model:8")))
    emb = big.params["decoder"]["embed"]["embedding"]
    out["embed_local_shards"] = [list(s.data.shape) for s in emb.addressable_shards]
    out["embed_fully_addressable"] = emb.is_fully_addressable
    out["peak_load_mib"] = round(peak, 1)
    return out


if __name__ == "__main__":
    mode, arg = sys.argv[1], json.loads(sys.argv[2])
    result = {"meshes": _meshes_worker, "process": _process_worker}[mode](arg)
    print("RESULT " + json.dumps(result, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)), flush=True)
