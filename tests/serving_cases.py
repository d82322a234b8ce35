"""Mixed request streams for the serving engine, and the check every family's serving test makes:
each request's tokens equal what mmjax.generate returns for that request alone."""
import numpy as np

import mmjax


def mixed_cases(images, prompts, n=32, seed=0, max_new=(3, 17)):
    """n request kwargs: images cycled (so some repeat: encoder-cache hits), some text-only, prompt
    lengths and max_new_tokens varied, every fifth one sampled with its own seed, some with
    min_new_tokens."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        kw = {"images": None if i % 7 == 3 else [images[i % len(images)]],
              "prompt": prompts[i % len(prompts)], "max_new_tokens": int(rng.integers(*max_new))}
        if kw["images"] is not None and "<image>" not in kw["prompt"]:
            kw["prompt"] = "<image>" + kw["prompt"]
        if i % 5 == 4:
            kw.update(temperature=0.8, top_k=int(rng.integers(0, 20)), top_p=0.9, seed=int(rng.integers(0, 1000)))
        if i % 6 == 5:
            kw["min_new_tokens"] = min(2, kw["max_new_tokens"])
        cases.append(kw)
    return cases


def alone(model, kw):
    kw = dict(kw)
    return mmjax.generate(model, kw.pop("images"), kw.pop("prompt"), **kw).token_ids


def serve_staggered(eng, cases, waves=4):
    """Add the requests in waves with decode steps between them (requests join a running batch),
    run to the end; -> final RequestOutputs in case order."""
    reqs = [eng.make_request(**kw) for kw in cases]
    final = {}
    per = -(-len(reqs) // waves)
    for w in range(waves):
        for r in reqs[w * per:(w + 1) * per]:
            eng.add_request(r)
        for _ in range(3):
            for out in eng.step():
                if out.finished:
                    final[out.request_id] = out
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                final[out.request_id] = out
    return [final[r.request_id] for r in reqs]


def assert_served_like_alone(model, eng, cases):
    outs = serve_staggered(eng, cases)
    bad = []
    for i, (kw, out) in enumerate(zip(cases, outs)):
        want = alone(model, kw)
        if out.token_ids != want:
            bad.append(f"request {i} ({kw}): served {out.token_ids}, alone {want}")
        assert out.finish_reason in ("stop", "length")
    assert not bad, "\n".join(bad)
    assert eng.stats()["pages_used"] == 0
    return outs
