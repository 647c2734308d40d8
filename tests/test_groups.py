"""Parameter groups: labels from paths, regimes, per-group learning rates, and frozen = not differentiated."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import growjax
from growjax import Growth, grow_params
from growjax.grow import flatten
from growjax.groups import merge, split
from growjax import steps

X = jnp.ones((2, 16, 16, 1))


def small_cnn(growth=None, num_classes=5, width=0.25):
    return growjax.models.get('small_cnn', num_classes=num_classes, width=width, growth=growth)


@pytest.fixture(scope='module')
def grown_wwa():
    pretrained = small_cnn().init(jax.random.key(0), X)
    grown = grow_params(pretrained, small_cnn(Growth.wwa(16), num_classes=7), jax.random.key(1), X,
                        reinit='^classifier/')
    order = growjax.forward_order(small_cnn(), jax.random.key(0), X)
    return pretrained, grown, order


def test_labels_follow_paths(grown_wwa):
    pretrained, grown, _ = grown_wwa
    labels = flatten(growjax.param_labels(grown['params'], pretrained['params'], reinit='^classifier/'))
    assert labels[('fc7', 'kernel')] == 'pretrained'
    assert labels[('conv1', 'bias')] == 'pretrained'
    for path in [('fc6_plus', 'kernel'), ('fc7_plus', 'from_fc6_plus', 'kernel'), ('classifier', 'kernel'),
                 ('classifier', 'from_fc7_plus', 'kernel'), ('classifier_norm', 'scale_1')]:
        assert labels[path] == 'new', path


@pytest.mark.parametrize('regime,trained_pretrained_layers', [
    ('new', set()), ('fc7_new', {'fc7'}), ('fc6_new', {'fc6', 'fc7'}), ('all', {'conv1', 'conv2', 'fc6', 'fc7'})])
def test_regimes(grown_wwa, regime, trained_pretrained_layers):
    pretrained, grown, order = grown_wwa
    labels = growjax.param_labels(grown['params'], pretrained['params'], reinit='^classifier/')
    mask = flatten(growjax.trainable_mask(labels, regime, order))
    for path, label in flatten(labels).items():
        assert mask[path] == (label == 'new' or path[0] in trained_pretrained_layers), (regime, path)


def test_unknown_regime_lists_valid_ones(grown_wwa):
    pretrained, grown, order = grown_wwa
    labels = growjax.param_labels(grown['params'], pretrained['params'])
    with pytest.raises(ValueError, match=r"Unknown regime 'fc9_new'.*'fc7_new'"):
        growjax.trainable_mask(labels, 'fc9_new', order)


def test_stage_prefix_regimes():
    order = ['stem_conv', 'stem_bn', 'stage1_block0', 'stage2_block0', 'stage2_block1', 'classifier']
    labels = {name: {'kernel': 'pretrained'} for name in order}
    mask = growjax.trainable_mask(labels, 'stage2_new', order)
    assert [mask[name]['kernel'] for name in order] == [False, False, False, True, True, True]
    assert 'stage2_new' in growjax.regime_names(order)


def test_split_merge_roundtrip(grown_wwa):
    pretrained, grown, order = grown_wwa
    labels = growjax.param_labels(grown['params'], pretrained['params'])
    trainable, frozen = split(grown['params'], growjax.trainable_mask(labels, 'fc7_new', order))
    assert 'conv1' not in trainable and 'conv1' in frozen
    jax.tree_util.tree_map(np.testing.assert_array_equal, merge(trainable, frozen), grown['params'])


def test_new_layers_get_their_multiplier():
    labels = {'old': {'kernel': 'pretrained'}, 'fresh': {'kernel': 'new'}}
    params = {'old': {'kernel': jnp.ones(3)}, 'fresh': {'kernel': jnp.ones(3)}}
    optimizer = optax.chain(optax.sgd(0.1, momentum=0.9), growjax.scale_by_group(labels, {'pretrained': 1.0, 'new': 10.0}))
    state = optimizer.init(params)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    for _ in range(3):  # with momentum, the ratio holds at every step
        updates, state = optimizer.update(grads, state, params)
        np.testing.assert_allclose(updates['fresh']['kernel'], 10 * updates['old']['kernel'], rtol=1e-6)
    with pytest.raises(ValueError, match=r"no multiplier for label\(s\) \['new'\]"):
        growjax.scale_by_group(labels, {'pretrained': 1.0})


def compiled_flops(regime, width=1.0):
    """FLOPs of the compiled train step of a WA-grown small CNN under `regime` (XLA cost analysis)."""
    x = jnp.ones((8, 16, 16, 1))
    pretrained = small_cnn(width=width).init(jax.random.key(0), x)
    model = small_cnn(Growth.wa(64), num_classes=7, width=width)
    grown = grow_params(pretrained, model, jax.random.key(1), x, reinit='^classifier/')
    labels = growjax.param_labels(grown['params'], pretrained['params'], reinit='^classifier/')
    mask = growjax.trainable_mask(labels, regime, growjax.forward_order(small_cnn(width=width), jax.random.key(0), x))
    trainable_labels, _ = split(labels, mask)
    optimizer = steps.make_optimizer(trainable_labels, learning_rate=0.01, momentum=0.9, weight_decay=5e-4,
                                     new_lr_multiplier=10.0)
    state = steps.create_state(grown, mask, optimizer)
    step = jax.jit(steps.make_train_step(model, optimizer, jax.random.key(2)))
    batch = {'image': x, 'label': jnp.zeros(8, jnp.int32)}
    analysis = step.lower(state, batch).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return analysis['flops']


def test_frozen_leaves_cost_no_gradient_flops():
    flops = {regime: compiled_flops(regime) for regime in ('new', 'fc7_new', 'all')}
    assert flops['new'] < flops['fc7_new'] < flops['all']
    # Regime 'new' skips the conv trunk's whole backward pass: far below 'all'.
    assert flops['new'] < 0.6 * flops['all'], flops
