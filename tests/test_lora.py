"""LoRA adapters on fc6/fc7: new leaves beside the pretrained ones, the pretrained function at init."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import growjax
from growjax import Growth, config_lib, grow_params, steps
from growjax.families import cnn
from growjax.grow import flatten
from growjax.groups import split
from growjax.models.growth import GrowthError

X = jax.random.uniform(jax.random.key(3), (4, 16, 16, 1))
WIDTH = 0.25  # fc6 reads 4 x 4 x 16 = 256 features; fc6 and fc7 have 64 units
LORA_PATHS = {('fc6', 'lora_a'), ('fc6', 'lora_b'), ('fc7', 'lora_a'), ('fc7', 'lora_b')}


def small_cnn(growth=None, num_classes=5):
    return growjax.models.get('small_cnn', num_classes=num_classes, width=WIDTH, growth=growth)


@pytest.fixture(scope='module')
def pretrained():
    return small_cnn().init(jax.random.key(0), X)


def test_adapters_are_new_paths_with_low_rank_shapes(pretrained):
    grown = grow_params(pretrained, small_cnn(Growth.lora_preset(4)), jax.random.key(1), X)
    shapes = {path: leaf.shape for path, leaf in flatten(grown['params']).items()}
    assert shapes[('fc6', 'lora_a')] == (256, 4) and shapes[('fc6', 'lora_b')] == (4, 64)
    assert shapes[('fc7', 'lora_a')] == (64, 4) and shapes[('fc7', 'lora_b')] == (4, 64)
    assert set(shapes) - set(flatten(pretrained['params'])) == LORA_PATHS
    np.testing.assert_array_equal(grown['params']['fc7']['kernel'], pretrained['params']['fc7']['kernel'])
    assert not np.any(grown['params']['fc7']['lora_b']) and np.any(grown['params']['fc7']['lora_a'])


def test_zero_update_at_init_gives_the_pretrained_logits(pretrained):
    grown = grow_params(pretrained, small_cnn(Growth.lora_preset(4)), jax.random.key(1), X)
    np.testing.assert_allclose(small_cnn(Growth.lora_preset(4)).apply(grown, X), small_cnn().apply(pretrained, X),
                               rtol=1e-5, atol=1e-6)


def test_regime_new_trains_only_the_adapters_and_the_classifier(pretrained):
    model = small_cnn(Growth.lora_preset(2), num_classes=3)
    grown = grow_params(pretrained, model, jax.random.key(1), X, reinit='^classifier/')
    labels = growjax.param_labels(grown['params'], pretrained['params'], reinit='^classifier/')
    order = growjax.forward_order(small_cnn(), jax.random.key(0), X)
    mask = growjax.trainable_mask(labels, 'new', order)
    trained = {path for path, trains in flatten(mask).items() if trains}
    assert trained == LORA_PATHS | {('classifier', 'kernel'), ('classifier', 'bias')}

    # One step moves the adapters (lora_b first: A's gradient is zero while B is) and nothing pretrained.
    trainable_labels, _ = split(labels, mask)
    optimizer = steps.make_optimizer(trainable_labels, learning_rate=0.1, momentum=0.9, weight_decay=5e-4,
                                     new_lr_multiplier=10.0)
    state = steps.create_state(grown, mask, optimizer)
    step = jax.jit(steps.make_train_step(model, optimizer, jax.random.key(2)))
    state, _ = step(state, {'image': X, 'label': jnp.array([0, 1, 2, 0])})
    after = state.variables()['params']
    assert np.any(after['fc7']['lora_b']) and np.any(after['fc6']['lora_b'])
    for layer in ('conv1', 'conv2', 'fc6', 'fc7'):
        np.testing.assert_array_equal(after[layer]['kernel'], grown['params'][layer]['kernel'])


@pytest.mark.parametrize('spec,message', [
    ({'conv1': 4}, r"cannot add LoRA adapters to 'conv1'; adaptable layers are \['fc6', 'fc7'\]"),
    ({'fc7': 0}, r"Growth.lora\['fc7'\] must be a positive integer"),
])
def test_bad_adapter_specs_name_the_layer(pretrained, spec, message):
    with pytest.raises(GrowthError, match=message):
        small_cnn(Growth(lora=spec)).init(jax.random.key(0), X)


def test_config_method_lora():
    config = config_lib.base_config()
    config.growth.method = 'lora'
    config.growth.lora_rank = 6
    config_lib.validate(config)
    assert cnn.growth_spec(config) == Growth(lora={'fc6': 6, 'fc7': 6})
    config.growth.lora_rank = 0
    with pytest.raises(config_lib.ConfigError, match='growth.lora_rank'):
        config_lib.validate(config)
