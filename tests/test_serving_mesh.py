"""The serving engine on a mesh (8 host devices in a subprocess, XLA_FLAGS set before JAX is
imported): page pools split over kv heads on `model`, answers equal to mmjax.generate on the same
mesh, request by request."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MESHES = ("data:2,model:2",)  # both axes in one mesh (a second mesh doubled the compile time)


@pytest.mark.slow
def test_engine_on_a_mesh_answers_as_generate_on_that_mesh(tiny_llava):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", HF_HUB_OFFLINE="1",
               MMJAX_COMPILE_CACHE="0", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    p = subprocess.run([sys.executable, __file__, str(tiny_llava.flax)], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads([x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1][7:])
    for mesh in MESHES:
        r = res[mesh]
        assert r["mismatches"] == [], r
        assert r["pool_spec"][0] == "model", r  # kv heads (2) split over model
        assert r["pages_used"] == 0


def _worker(folder):
    import jax
    import numpy as np
    from PIL import Image

    import mmjax
    from mmjax.serving import ServingEngine
    from serving_cases import alone, mixed_cases, serve_staggered

    assert len(jax.devices()) == 8
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (30 + 9 * i, 40, 3), np.uint8)) for i in range(3)]
    cases = mixed_cases(images, ["describe", "what is in the picture of the cat"], n=8, max_new=(3, 9))
    out = {}
    for mesh in MESHES:
        model = mmjax.load(folder, mesh=mesh)
        eng = ServingEngine(model, max_num_seqs=4, page_size=8)
        served = serve_staggered(eng, cases)
        bad = [i for i, (kw, o) in enumerate(zip(cases, served)) if o.token_ids != alone(model, kw)]
        spec = eng.pools[0]["k"].sharding.spec
        out[mesh] = {"mismatches": bad, "pool_spec": list(spec) + [None] * (4 - len(spec)),
                     "pages_used": eng.stats()["pages_used"]}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    _worker(sys.argv[1])
