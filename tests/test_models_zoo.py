"""AlexNet, VGG16, ResNet-18/50: names, shapes, growth keeping pretrained leaves, function preservation.

Tiny versions (width 1/16, the smallest inputs, batch 2) so the file runs quickly on a CPU; its time
is almost all XLA compiling each op shape once.
Shape-only checks trace with jax.eval_shape and allocate nothing.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from growjax import models
from growjax.grow import graft
from growjax.models.growth import Growth

WIDTH = 1 / 16
NUM_CLASSES = 5
INPUT_SIZE = {'alexnet': 63, 'vgg16': 32, 'resnet18': 32, 'resnet50': 32}
HEAD_MODELS = ('alexnet', 'vgg16')
RESNETS = ('resnet18', 'resnet50')
FC7_UNITS = 256  # 4096 * WIDTH


def _key(seed: int) -> jax.Array:
    # 'rbg' keys: XLA:CPU compiles an rbg draw in about half the time of a threefry one, and compiling
    # each kernel size's draw once is much of this file's run time; the models do not depend on the impl.
    return jax.random.key(seed, impl='rbg')


def _model(name: str, growth: Growth | None = None, **kwargs):
    return models.get(name, num_classes=NUM_CLASSES, growth=growth, width=WIDTH, **kwargs)


@functools.cache
def _inputs(name: str, size: int | None = None) -> jax.Array:
    size = size or INPUT_SIZE[name]
    return jnp.asarray(np.random.default_rng(1).standard_normal((2, size, size, 3), dtype=np.float32))


def _shapes(model, x) -> dict[tuple[str, ...], tuple[int, ...]]:
    variables = jax.eval_shape(model.init, _key(0), x)
    return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(variables).items()}


@functools.cache
def _plain_shapes(name: str) -> dict[tuple[str, ...], tuple[int, ...]]:
    return _shapes(_model(name), _inputs(name))


def _path_shapes(shapes) -> dict[str, tuple[int, ...]]:
    return {'/'.join(path): shape for path, shape in shapes.items()}


# Eager init and apply, shared across tests: XLA then compiles each op shape once for the whole file,
# and a grown model compiles only its new layers. (grow_params jits the whole init, right for real
# models but a full recompile per variant here; grafting an eager init is the same "init, then graft".)
@functools.cache
def _init(name: str) -> dict:
    return _model(name).init(_key(0), _inputs(name))


@functools.cache
def _train_step(name: str) -> tuple[jax.Array, dict]:
    """Logits and batch-stats updates of one training-mode forward pass of the plain ResNet."""
    return _model(name).apply(_init(name), _inputs(name), train=True, mutable=['batch_stats'])


def _pretrained(name: str) -> dict:
    """Plain-model variables; a ResNet's batch stats come from a training pass, so they are not trivial."""
    if name in RESNETS:
        return {**_init(name), **_train_step(name)[1]}
    return _init(name)


# Deepened heads use fc_a of fc7's width, so the classifier keeps its shape (see the last head test).
HEAD_GROWTHS = {
    'wa': Growth.wa(8),
    'da': Growth.da(FC7_UNITS),
    'dwa': Growth(widen={'fc7': 8}, deepen={'fc7': FC7_UNITS}),
    'wwa': Growth.wwa(8),
}
RESNET_GROWTHS = {
    'deepen': Growth(deepen={'stage3': 2}),
    'widen_deepen': Growth(widen={'stage1': 2, 'stage4': 3}, deepen={'stage1': 1, 'stage4': 1}),
}


def _with_norm(growth: Growth, norm_scale: bool) -> Growth:
    return dataclasses.replace(growth, norm_scale=norm_scale)


def _growth_cases(names, growths, norm_scales=(True, False)):
    return [pytest.param(name, _with_norm(growth, norm_scale), id=f'{name}-{key}-{"norm" if norm_scale else "ori"}')
            for name in names for key, growth in growths.items() for norm_scale in norm_scales]


@pytest.mark.parametrize('name', HEAD_MODELS + RESNETS)
def test_init_and_apply_shape(name):
    variables = _init(name)
    logits = _model(name).apply(variables, _inputs(name))
    assert logits.shape == (2, NUM_CLASSES)
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert set(variables) == ({'params', 'batch_stats'} if name in RESNETS else {'params'})


@pytest.mark.parametrize('name, expected', [
    ('alexnet', {'params/conv1/kernel': (11, 11, 3, 4), 'params/conv2/kernel': (5, 5, 4, 12),
                 'params/conv5/bias': (16,), 'params/fc6/kernel': (6 * 6 * 16, 256),
                 'params/fc7/kernel': (256, 256), 'params/classifier/kernel': (256, NUM_CLASSES)}),
    ('vgg16', {'params/conv1_1/kernel': (3, 3, 3, 4), 'params/conv2_2/kernel': (3, 3, 8, 8),
               'params/conv5_3/bias': (32,), 'params/fc6/kernel': (7 * 7 * 32, 256),
               'params/classifier/bias': (NUM_CLASSES,)}),
    ('resnet18', {'params/stem_conv/kernel': (7, 7, 3, 4), 'params/stem_bn/scale': (4,),
                  'params/stage1_block1/conv2/kernel': (3, 3, 4, 4),
                  'params/stage2_block0/downsample_conv/kernel': (1, 1, 4, 8),
                  'batch_stats/stage2_block0/downsample_bn/mean': (8,),
                  'params/stage4_block1/bn2/bias': (32,), 'params/classifier/kernel': (32, NUM_CLASSES)}),
    ('resnet50', {'params/stage1_block0/downsample_conv/kernel': (1, 1, 4, 16),
                  'params/stage3_block5/conv2/kernel': (3, 3, 16, 16),
                  'params/stage4_block2/conv3/kernel': (1, 1, 32, 128),
                  'batch_stats/stage4_block2/bn3/var': (128,), 'params/classifier/kernel': (128, NUM_CLASSES)}),
])
def test_plain_models_have_documented_names(name, expected):
    shapes = _path_shapes(_plain_shapes(name))
    assert {path: shapes.get(path) for path in expected} == expected
    assert not any('_plus' in path or 'from_' in path or '_norm' in path for path in shapes)


def test_resnet_blocks_have_torchvision_layout():
    shapes = _path_shapes(_plain_shapes('resnet18'))
    blocks = sorted({path.split('/')[1] for path in shapes if '_block' in path})
    assert blocks == [f'stage{s}_block{b}' for s in range(1, 5) for b in range(2)]
    # ResNet-18's first stage keeps its shape, so it has no downsample; every later stage's first block does.
    assert [s for s in range(1, 5) if f'params/stage{s}_block0/downsample_conv/kernel' in shapes] == [2, 3, 4]
    assert not any('bias' in path for path in shapes if 'conv' in path)


@pytest.mark.parametrize('name, growth',
                         _growth_cases(HEAD_MODELS, HEAD_GROWTHS) + _growth_cases(RESNETS, RESNET_GROWTHS))
def test_growth_keeps_every_pretrained_leaf(name, growth):
    plain, grown = _plain_shapes(name), _shapes(_model(name, growth), _inputs(name))
    assert {path: grown.get(path) for path in plain} == plain
    assert len(grown) > len(plain)
    uses_norm_scale = any('_norm' in '/'.join(path) for path in grown)
    assert uses_norm_scale == (growth.norm_scale and (name in HEAD_MODELS or bool(growth.widen)))


def test_head_deepened_to_another_width_changes_only_the_classifier():
    """fc_a of another width than fc7 feeds the classifier a different fan-in: grafting then needs
    reinit of the (source-task) classifier, as a new task does anyway."""
    plain, grown = _plain_shapes('alexnet'), _shapes(_model('alexnet', Growth.da(8)), _inputs('alexnet'))
    changed = {'/'.join(path): grown[path] for path in plain if grown.get(path) != plain[path]}
    assert changed == {'params/classifier/kernel': (8, NUM_CLASSES)}


@pytest.mark.parametrize('name, expected_new', [
    ('resnet18', {'params/stage2_block1/conv1_plus/kernel': (3, 3, 8, 2), 'params/stage2_block1/bn1_plus/scale': (2,),
                  'batch_stats/stage2_block0/bn1_plus/mean': (2,),
                  'params/stage2_block0/conv2/from_conv1_plus/kernel': (3, 3, 2, 8),
                  'params/stage2_block0/conv2_norm/scale_0': (8,), 'params/stage2_block0/conv2_norm/scale_1': (2,),
                  'params/stage3_extra0/conv2/kernel': (3, 3, 16, 16), 'params/stage3_extra1/bn2/scale': (16,)}),
    ('resnet50', {'params/stage2_block3/conv2_plus/kernel': (3, 3, 8, 2), 'params/stage2_block0/bn2_plus/bias': (2,),
                  'params/stage2_block0/conv3/from_conv2_plus/kernel': (1, 1, 2, 32),
                  'params/stage2_block0/conv3_norm/scale_1': (2,),
                  'params/stage3_extra1/conv3/kernel': (1, 1, 16, 64)}),
])
def test_resnet_growth_names(name, expected_new):
    growth = Growth(widen={'stage2': 2}, deepen={'stage3': 2})
    shapes = _path_shapes(_shapes(_model(name, growth), _inputs(name)))
    assert {path: shapes.get(path) for path in expected_new} == expected_new
    assert not any('downsample' in path or '_plus' in path for path in shapes if '_extra' in path)


@pytest.mark.parametrize('name, growth', [
    *_growth_cases(HEAD_MODELS, HEAD_GROWTHS, norm_scales=(False,)),
    *_growth_cases(RESNETS, {'widen_deepen': Growth(widen={'stage2': 2}, deepen={'stage3': 2})}, norm_scales=(False,)),
    # Deepening alone never meets old and new channels, so NormScale does not stop preservation.
    *_growth_cases(['resnet18'], {'deepen': Growth(deepen={'stage2': 1})}, norm_scales=(True,)),
])
def test_preserve_function_gives_pretrained_logits(name, growth):
    x, pretrained = _inputs(name), _pretrained(name)
    grown_model = _model(name, growth, preserve_function=True)
    grown = graft(pretrained, grown_model.init(_key(2), x))
    expected = _model(name).apply(pretrained, x)
    np.testing.assert_allclose(grown_model.apply(grown, x), expected, atol=1e-5, rtol=1e-5)
    # Not vacuous: the new parameters are wired into the output.
    old_paths = set(traverse_util.flatten_dict(pretrained))
    nudged = traverse_util.unflatten_dict({
        path: leaf if path in old_paths or path[0] != 'params' else np.asarray(leaf) + 0.5
        for path, leaf in traverse_util.flatten_dict(grown).items()})
    assert not np.allclose(grown_model.apply(nudged, x), expected, atol=1e-3)


@pytest.mark.parametrize('name, growth', [('alexnet', Growth.wa(8)), ('vgg16', Growth.wwa(8)),
                                          ('resnet18', Growth(widen={'stage1': 2})),
                                          ('resnet50', Growth(widen={'stage3': 2}, deepen={'stage3': 1}))])
def test_preserve_function_with_norm_scale_raises(name, growth):
    with pytest.raises(ValueError, match='impossible with norm_scale=True'):
        jax.eval_shape(_model(name, growth, preserve_function=True).init, _key(0), _inputs(name))


@pytest.mark.parametrize('name, growth, valid', [
    ('alexnet', Growth(widen={'conv5': 8}), "['fc6', 'fc7']"),
    ('vgg16', Growth(deepen={'fc6': 8}), "['fc7']"),
    ('resnet18', Growth(widen={'stage5': 2}), "['stage1', 'stage2', 'stage3', 'stage4']"),
    ('resnet50', Growth(deepen={'layer1': 1}), "['stage1', 'stage2', 'stage3', 'stage4']"),
])
def test_unknown_layer_names_raise(name, growth, valid):
    with pytest.raises(ValueError) as error:
        jax.eval_shape(_model(name, growth).init, _key(0), _inputs(name))
    assert valid in str(error.value)


@pytest.mark.parametrize('name, too_small', [('alexnet', 62), ('vgg16', 31)])
def test_inputs_below_the_documented_minimum_raise(name, too_small):
    with pytest.raises(ValueError, match=f'at least {INPUT_SIZE[name]}x{INPUT_SIZE[name]}'):
        jax.eval_shape(_model(name).init, _key(0), _inputs(name, too_small))


def test_class_attributes_are_not_model_options():
    with pytest.raises(ValueError, match='no option'):
        models.get('resnet18', num_classes=NUM_CLASSES, stage_sizes=(1, 1, 1, 1))


@pytest.mark.parametrize('name', RESNETS)
def test_resnet_training_updates_batch_stats(name):
    logits, updates = _train_step(name)
    assert logits.shape == (2, NUM_CLASSES)
    before = traverse_util.flatten_dict(_init(name)['batch_stats'])
    after = traverse_util.flatten_dict(updates['batch_stats'])
    assert before.keys() == after.keys()
    assert all(not np.allclose(before[path], after[path]) for path in before if path[-1] == 'mean')
    # Eval mode reads the running averages, so the new statistics change its logits.
    assert not np.allclose(_model(name).apply(_init(name), _inputs(name)),
                           _model(name).apply(_pretrained(name), _inputs(name)))
