"""The models' initialisers: growjax's chunked truncated-normal draw is jax's own, bit for bit."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from growjax.nn import CHUNK, he_normal_flat, lecun_normal_flat, truncated_normal_flat


@pytest.mark.parametrize('size', [CHUNK - 1, CHUNK, 3 * CHUNK + 123])  # plain, one chunk, overlapping last chunk
@pytest.mark.parametrize('key', [jax.random.key(7), jax.random.PRNGKey(7)], ids=['typed', 'raw'])
def test_truncated_normal_flat_is_jax_truncated_normal(size, key):
    expected = jax.random.truncated_normal(key, -2.0, 2.0, (size,), jnp.float32)
    np.testing.assert_array_equal(truncated_normal_flat(key, size), expected)
    np.testing.assert_array_equal(jax.jit(truncated_normal_flat, static_argnums=1)(key, size), expected)


def test_lecun_and_he_normal_flat_are_flax_lecun_and_he_distributions():
    key, shape = jax.random.key(3), (3, 3, 64, 2 * CHUNK // 576 + 5)  # a conv kernel drawn in chunks
    np.testing.assert_array_equal(lecun_normal_flat(key, shape), nn.initializers.lecun_normal()(key, shape))
    he = he_normal_flat(key, shape)
    assert abs(float(jnp.std(he)) - np.sqrt(2 / (3 * 3 * 64))) < 0.01 * np.sqrt(2 / (3 * 3 * 64))
    assert float(jnp.abs(he).max()) < 2 * np.sqrt(2 / (3 * 3 * 64)) / .87962566103423978
