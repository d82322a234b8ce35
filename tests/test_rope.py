"""RoPE tables: exact, and computed once per program on CPU (not once per head and layer)."""
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.config import RopeConfig
from mmjax.layers.rope import apply_rope, inv_frequencies, rope_tables


def test_tables_are_plain_cos_sin():
    rope = RopeConfig()
    pos = jnp.arange(37, dtype=jnp.int32)[None]
    cos, sin = jax.jit(lambda p: rope_tables(p, rope, 64, jnp.float32))(pos)
    freqs = np.arange(37, dtype=np.float32)[:, None] * np.asarray(inv_frequencies(rope, 64), np.float32)
    emb = np.concatenate([freqs, freqs], -1)
    np.testing.assert_array_equal(np.asarray(cos[0]), np.asarray(jnp.cos(jnp.asarray(emb))))
    np.testing.assert_array_equal(np.asarray(sin[0]), np.asarray(jnp.sin(jnp.asarray(emb))))


def test_cos_is_computed_once_for_all_heads_and_layers():
    rope = RopeConfig()

    def two_layers(q, k, pos):
        cos, sin = rope_tables(pos, rope, 64, jnp.float32)
        for _ in range(2):
            q, k = apply_rope(q, cos, sin) * 1.5, apply_rope(k, cos, sin) * 0.5
        return q, k

    q, k = jnp.ones((1, 40, 12, 64)), jnp.ones((1, 40, 4, 64))
    pos = jnp.arange(40, dtype=jnp.int32)[None]
    hlo = jax.jit(two_layers).lower(q, k, pos).compile().as_text()
    assert hlo.count("cosine(") == 1, hlo.count("cosine(")
