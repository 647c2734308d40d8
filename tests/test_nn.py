"""NormScale against a NumPy reference, and its behaviour on all-zero groups."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from growjax import NormScale


def reference_norm_scale(x, group_sizes, scales):
    """Per example and position: each group divided by its L2 norm, times its per-unit scales."""
    out, start = [], 0
    for size, scale in zip(group_sizes, scales):
        group = x[..., start:start + size].astype(np.float64)
        norm = np.sqrt(np.sum(group ** 2, axis=-1, keepdims=True))
        out.append(np.where(norm > 0, group / np.maximum(norm, 1e-300), 0.0) * scale)
        start += size
    return np.concatenate(out, axis=-1)


@pytest.mark.parametrize('shape_prefix', [(4,), (2, 3, 5)])  # dense features and NHWC maps
def test_matches_numpy_reference(shape_prefix):
    group_sizes = (6, 3, 5)
    x = np.random.default_rng(0).normal(size=(*shape_prefix, sum(group_sizes))).astype(np.float32)
    module = NormScale(group_sizes, scale_init=10.0)
    params = module.init(jax.random.key(0), x)
    scales = [np.random.default_rng(i).uniform(0.5, 20, size) for i, size in enumerate(group_sizes)]
    params = {'params': {f'scale_{i}': jnp.asarray(s, jnp.float32) for i, s in enumerate(scales)}}
    np.testing.assert_allclose(module.apply(params, x), reference_norm_scale(x, group_sizes, scales),
                               rtol=1e-5, atol=1e-6)


def test_scale_starts_at_scale_init_and_has_one_leaf_per_group():
    params = NormScale((4, 2), scale_init=20.0).init(jax.random.key(0), jnp.ones((1, 6)))['params']
    assert set(params) == {'scale_0', 'scale_1'}
    np.testing.assert_array_equal(params['scale_0'], np.full(4, 20.0))
    np.testing.assert_array_equal(params['scale_1'], np.full(2, 20.0))


def test_each_group_has_norm_of_its_scale():
    x = np.abs(np.random.default_rng(1).normal(size=(3, 7))).astype(np.float32) * 100
    module = NormScale((4, 3), scale_init=10.0)
    y = module.apply(module.init(jax.random.key(0), x), x)
    np.testing.assert_allclose(np.linalg.norm(y[:, :4], axis=-1), 10.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(y[:, 4:], axis=-1), 10.0, rtol=1e-5)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_zero_group_gives_finite_outputs_and_gradients(dtype):
    x = jnp.concatenate([jnp.zeros((2, 4)), jnp.ones((2, 3))], axis=-1).astype(dtype)  # group 0 all zero
    module = NormScale((4, 3))
    params = module.init(jax.random.key(0), x)

    def loss(params, x):
        return jnp.sum(module.apply(params, x).astype(jnp.float32) ** 2)

    out = module.apply(params, x)
    assert out.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out[:, :4], np.float32), 0.0)
    grad_params, grad_x = jax.grad(loss, argnums=(0, 1))(params, x)
    for leaf in jax.tree_util.tree_leaves((grad_params, grad_x)):
        assert np.all(np.isfinite(np.asarray(leaf, np.float32)))


def test_bfloat16_close_to_float32():
    x = np.random.default_rng(2).normal(size=(4, 64)).astype(np.float32) * 50
    module = NormScale((48, 16))
    params = module.init(jax.random.key(0), x)
    y32 = module.apply(params, x)
    y16 = module.apply(params, jnp.asarray(x, jnp.bfloat16))
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.1, rtol=0.02)


def test_group_sizes_must_match_input():
    with pytest.raises(ValueError, match=r'sum to 5.*6 units'):
        NormScale((2, 3)).init(jax.random.key(0), jnp.ones((1, 6)))
