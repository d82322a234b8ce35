"""mmjax.kernels.cpu.hugepages: params moved into one huge-page arena keep every value, dtype and
shape, become zero-copy views of it, and the arena is advised MADV_HUGEPAGE."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.kernels.cpu import hugepages


def _tree():
    rng = np.random.default_rng(0)
    return {"a": {"kernel": jnp.asarray(rng.standard_normal((300, 70)), jnp.float32),
                  "bias": jnp.asarray(rng.standard_normal((70,)), jnp.bfloat16)},
            "q": {"kernel": jnp.asarray(rng.integers(-127, 128, (5, 33, 64)), jnp.int8),
                  "kernel_scale": jnp.asarray(rng.random(33), jnp.float32)},
            "step": jnp.asarray(3, jnp.int32)}


def _vma_of(address: int) -> list[str]:
    """The /proc/self/smaps lines of the mapping holding `address`."""
    lines, out = open("/proc/self/smaps").read().splitlines(), []
    for i, line in enumerate(lines):
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            if lo <= address < hi:
                out = [line]
                for more in lines[i + 1:]:
                    if "-" in more.split()[0] and all(c in "0123456789abcdef-" for c in more.split()[0]):
                        break
                    out.append(more)
                return out
    return out


@pytest.mark.skipif(not hugepages.supported(), reason="needs Linux transparent huge pages (not 'never')")
def test_place_keeps_values_and_uses_one_advised_arena():
    tree = _tree()
    want = jax.tree.map(np.asarray, tree)
    out = hugepages.place(tree)
    assert out is tree
    got = jax.tree.leaves(tree)
    for g, w in zip(got, jax.tree.leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g), w)
    pointers = sorted(a.unsafe_buffer_pointer() for a in got)
    assert all(p % hugepages.ALIGN == 0 for p in pointers)
    vma = _vma_of(pointers[0])
    assert vma and all(p < int(vma[0].split()[0].split("-")[1], 16) for p in pointers), "one mapping for all"
    flags = next(line for line in vma if line.startswith("VmFlags")).split()
    assert "hg" in flags, f"arena not advised MADV_HUGEPAGE: {flags}"
    # the moved arrays work in programs like any other
    assert float(jax.jit(lambda t: t["a"]["kernel"].sum())(tree)) == pytest.approx(float(want["a"]["kernel"].sum()),
                                                                                   rel=1e-5)


def test_place_leaves_other_trees_alone():
    tree = {"a": {"kernel": jnp.ones((4, 4))}, "x": np.ones(3)}  # a numpy leaf: not ours to move
    before = tree["a"]["kernel"].unsafe_buffer_pointer()
    assert hugepages.place(tree) is tree
    assert tree["a"]["kernel"].unsafe_buffer_pointer() == before
    assert hugepages.place({}) == {}


@pytest.mark.skipif(not hugepages.supported(), reason="needs Linux transparent huge pages (not 'never')")
def test_load_with_huge_pages_generates_the_same(tiny_llava):
    import mmjax
    from PIL import Image

    from mmjax.tree import flatten_params

    huge, plain = mmjax.load(tiny_llava.flax, huge_pages=True), mmjax.load(tiny_llava.flax)
    h, p = flatten_params(huge.params), flatten_params(plain.params)
    assert set(h) == set(p) and all(h[k].dtype == p[k].dtype and np.array_equal(h[k], p[k]) for k in p)
    lo = min(a.unsafe_buffer_pointer() for a in h.values())
    assert "hg" in next(line for line in _vma_of(lo) if line.startswith("VmFlags")).split()
    image = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8))
    kw = dict(max_new_tokens=12, min_new_tokens=12)
    a = mmjax.generate(huge, [[image]] * 2, ["describe it", "hi"], **kw)
    b = mmjax.generate(plain, [[image]] * 2, ["describe it", "hi"], **kw)
    assert a.token_ids == b.token_ids
