"""grow_params: exact grafting, strictness, purity under jit on sharded trees, function preservation."""
import copy
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import growjax
from growjax import GraftError, Growth, grow_params
from growjax.grow import flatten

X = jnp.ones((2, 16, 16, 1))


def small_cnn(growth=None, num_classes=5):
    return growjax.models.get('small_cnn', num_classes=num_classes, width=0.25, growth=growth)


@pytest.fixture(scope='module')
def pretrained():
    return small_cnn().init(jax.random.key(0), X)


GROWTHS = [Growth.wa(16), Growth.da(16), Growth.dwa(16), Growth.wwa(16), Growth.wa(16, norm_scale=False)]


@pytest.mark.parametrize('growth', GROWTHS, ids=str)
def test_every_pretrained_leaf_is_copied_unchanged(pretrained, growth):
    before = copy.deepcopy(jax.device_get(pretrained))
    reinit = '^classifier/' if growth.deepen else ()  # fc_a changes the classifier's fan-in
    grown = grow_params(pretrained, small_cnn(growth), jax.random.key(1), X, reinit=reinit)
    grown_flat = flatten(grown)
    for path, leaf in flatten(pretrained).items():
        if reinit and path[1] == 'classifier':
            continue
        assert grown_flat[path].dtype == leaf.dtype
        np.testing.assert_array_equal(grown_flat[path], leaf, err_msg='/'.join(path))
    # The input tree is not modified, and new leaves exist.
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(pretrained), before)
    assert growjax.new_paths(grown, pretrained)


def test_new_leaves_come_from_the_models_initialisers(pretrained):
    model = small_cnn(Growth.wa(16))
    grown = grow_params(pretrained, model, jax.random.key(1), X)
    fresh = model.init(jax.random.key(1), X)
    for path in growjax.new_paths(grown, pretrained):
        np.testing.assert_array_equal(flatten(grown)[path], flatten(fresh)[path])


def test_repeated_eager_calls_compile_once_and_match_model_init(pretrained, caplog):
    model = small_cnn(Growth.dwa(8))  # grown by no other test, so its first call compiles
    key = jax.random.key(1)

    def grow_and_count_compiles():
        caplog.clear()
        with jax.log_compiles(), caplog.at_level(logging.WARNING, logger='jax'):
            grown = grow_params(pretrained, model, key, X, reinit='^classifier/')
        return grown, [r.getMessage() for r in caplog.records if r.getMessage().startswith('Compiling')]

    first, compiles = grow_and_count_compiles()
    assert compiles, 'the first call compiles the init (else this test counts nothing)'
    second, compiles = grow_and_count_compiles()
    assert not compiles, compiles
    fresh, pretrained_flat = flatten(model.init(key, X)), flatten(pretrained)
    new = growjax.new_paths(second, pretrained, reinit='^classifier/')
    assert new and flatten(second).keys() == fresh.keys()
    for path, leaf in flatten(second).items():
        if path in new:
            np.testing.assert_array_equal(leaf, fresh[path], err_msg='/'.join(path))
        else:  # the caller's own array, neither copied nor changed
            assert leaf is pretrained_flat[path] is flatten(first)[path], '/'.join(path)


def test_unhashable_model_still_grows():
    class ListMLP(nn.Module):  # a list field makes a Flax module unhashable: no cached init, same result
        sizes: list

        @nn.compact
        def __call__(self, x):
            for size in self.sizes:
                x = nn.Dense(size)(x)
            return x

    x = jnp.ones((1, 3))
    pretrained = ListMLP([4]).init(jax.random.key(0), x)
    grown = grow_params(pretrained, ListMLP([4, 2]), jax.random.key(1), x)
    assert grown['params']['Dense_0']['kernel'] is pretrained['params']['Dense_0']['kernel']
    np.testing.assert_array_equal(grown['params']['Dense_1']['kernel'],
                                  ListMLP([4, 2]).init(jax.random.key(1), x)['params']['Dense_1']['kernel'])


def test_shape_mismatch_names_path_and_both_shapes(pretrained):
    with pytest.raises(GraftError, match=r'params/classifier/kernel: pretrained shape \(64, 5\) != grown shape \(64, 7\)'):
        grow_params(pretrained, small_cnn(num_classes=7), jax.random.key(1), X)


def test_missing_place_names_path(pretrained):
    extra = {'params': {**pretrained['params'], 'fc9': {'kernel': jnp.ones((3, 3))}}}
    with pytest.raises(GraftError, match=r'params/fc9/kernel: pretrained shape \(3, 3\) has no place'):
        grow_params(extra, small_cnn(), jax.random.key(1), X)


def test_reinit_drops_matching_leaves_only(pretrained):
    grown = grow_params(pretrained, small_cnn(Growth.wa(16), num_classes=7), jax.random.key(1), X,
                        reinit=['^classifier/'])
    assert grown['params']['classifier']['kernel'].shape == (64, 7)
    np.testing.assert_array_equal(grown['params']['fc7']['kernel'], pretrained['params']['fc7']['kernel'])
    with pytest.raises(ValueError, match='not a valid regex'):
        grow_params(pretrained, small_cnn(), jax.random.key(1), X, reinit='(')


class ForeignMLP(nn.Module):
    """Not a growjax model: grow_params must work for any module with explicit layer names."""
    hidden: int
    extra: int = 0

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(self.hidden, name='hidden')(x))
        y = nn.Dense(3, name='out')(h)
        if self.extra:
            y = y + nn.Dense(3, name='out_extra')(nn.Dense(self.extra, name='hidden_extra')(x))
        return y


@settings(max_examples=10, deadline=None)
@given(inputs=st.integers(1, 4), hidden=st.integers(1, 4), other_hidden=st.integers(1, 4), extra=st.integers(0, 3))
def test_graft_strictness_property(inputs, hidden, other_hidden, extra):
    x = jnp.ones((1, inputs))
    pretrained = ForeignMLP(hidden).init(jax.random.key(0), x)
    grown_model = ForeignMLP(other_hidden, extra)
    if hidden == other_hidden:
        grown = grow_params(pretrained, grown_model, jax.random.key(1), x)
        np.testing.assert_array_equal(grown['params']['hidden']['kernel'], pretrained['params']['hidden']['kernel'])
        assert ('params', 'hidden_extra', 'kernel') in flatten(grown) or extra == 0
    else:
        with pytest.raises(GraftError, match=rf'params/hidden/kernel: pretrained shape \({inputs}, {hidden}\) '
                                             rf'!= grown shape \({inputs}, {other_hidden}\)'):
            grow_params(pretrained, grown_model, jax.random.key(1), x)


def test_batch_stats_are_grafted_too():
    class WithBN(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.BatchNorm(use_running_average=not train, name='bn')(nn.Dense(4, name='fc')(x))

    x = jnp.arange(12.0).reshape(3, 4)
    variables = WithBN().init(jax.random.key(0), x)
    _, updates = WithBN().apply(variables, x, train=True, mutable=['batch_stats'])
    trained = {**variables, **updates}
    grown = grow_params(trained, WithBN(), jax.random.key(1), x)
    np.testing.assert_array_equal(grown['batch_stats']['bn']['mean'], trained['batch_stats']['bn']['mean'])
    assert not np.allclose(grown['batch_stats']['bn']['mean'], 0)


@pytest.mark.parametrize('growth', [Growth.wa(16, norm_scale=False), Growth.wwa(16, norm_scale=False),
                                    Growth.dwa(64, norm_scale=False), Growth.da(64, norm_scale=False)], ids=str)
def test_preserve_function_keeps_logits(pretrained, growth):
    x = jax.random.normal(jax.random.key(3), X.shape)
    grown_model = small_cnn(growth)
    grown = grow_params(pretrained, grown_model, jax.random.key(1), X, preserve_function=True)
    np.testing.assert_allclose(grown_model.apply(grown, x), small_cnn().apply(pretrained, x), atol=1e-5)
    # Without preservation the function changes (the test would notice a no-op).
    changed = grow_params(pretrained, grown_model, jax.random.key(1), X)
    assert np.abs(grown_model.apply(changed, x) - small_cnn().apply(pretrained, x)).max() > 1e-3


def test_preserve_function_impossible_cases_raise(pretrained):
    with pytest.raises(ValueError, match='impossible with norm_scale=True'):
        grow_params(pretrained, small_cnn(Growth.wa(16)), jax.random.key(1), X, preserve_function=True)
    with pytest.raises(ValueError, match="fc_a to have fc7's width"):
        grow_params(pretrained, small_cnn(Growth.da(16, norm_scale=False)), jax.random.key(1), X,
                    preserve_function=True)
    with pytest.raises(TypeError, match='no `preserve_function` field'):
        grow_params(ForeignMLP(4).init(jax.random.key(0), jnp.ones((1, 2))), ForeignMLP(4), jax.random.key(0),
                    jnp.ones((1, 2)), preserve_function=True)


def test_sharded_tree_grows_on_its_devices_without_host_transfers(pretrained):
    devices = np.array(jax.devices())
    assert devices.size == 8, 'conftest.py asks XLA for 8 CPU devices'
    mesh = Mesh(devices, ('model',))

    def sharding_for(leaf):
        # Shard the last axis where it divides evenly; replicate the rest.
        spec = P(*([None] * (leaf.ndim - 1)), 'model') if leaf.ndim and leaf.shape[-1] % 8 == 0 else P()
        return NamedSharding(mesh, spec)

    model = small_cnn(Growth.wa(16))
    pretrained_sharded = jax.tree_util.tree_map(lambda a: jax.device_put(a, sharding_for(a)), pretrained)
    out_shardings = jax.tree_util.tree_map(sharding_for, jax.eval_shape(model.init, jax.random.key(0), X))
    rng = jax.device_put(jax.random.key(1), NamedSharding(mesh, P()))
    grow = jax.jit(lambda p, key: grow_params(p, model, key, jnp.zeros(X.shape)), out_shardings=out_shardings)
    with jax.transfer_guard('disallow'):
        grown = grow(pretrained_sharded, rng)
    assert grown['params']['fc7_plus']['bias'].sharding == out_shardings['params']['fc7_plus']['bias']
    assert len(grown['params']['fc7']['kernel'].sharding.device_set) == 8
    np.testing.assert_array_equal(grown['params']['fc7']['kernel'], pretrained['params']['fc7']['kernel'])
