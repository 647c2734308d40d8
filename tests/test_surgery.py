"""growjax.surgery on models written in plain Flax the way their authors write them (not with growjax
layers): a big_vision-style ViT, a flax-examples ResNet with BatchNorm, a GPT-style decoder."""
import functools
from typing import Any, Callable

import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import growjax
from growjax import surgery
from growjax.grow import flatten

# ---------------------------------------------------------------------------------------------
# Models as their authors write them


class MlpBlock(nn.Module):
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(self.mlp_dim)(x)
        y = nn.gelu(y)
        return nn.Dense(x.shape[-1])(y)


class Encoder1DBlock(nn.Module):
    mlp_dim: int = 24
    num_heads: int = 2

    @nn.compact
    def __call__(self, x, deterministic=True):
        y = nn.LayerNorm()(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(y, y, deterministic=deterministic)
        x = x + y
        y = nn.LayerNorm()(x)
        return x + MlpBlock(self.mlp_dim)(y)


class ViT(nn.Module):
    num_classes: int = 5
    width: int = 16
    depth: int = 2

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(self.width, (4, 4), strides=(4, 4), padding='VALID', name='embedding')(x)
        x = x.reshape(x.shape[0], -1, self.width)
        x = x + self.param('pos_embedding', nn.initializers.normal(0.02), (1, x.shape[1], self.width))
        for i in range(self.depth):
            x = Encoder1DBlock(name=f'encoderblock_{i}')(x, deterministic=not train)
        x = nn.LayerNorm(name='encoder_norm')(x)
        return nn.Dense(self.num_classes, name='head')(x.mean(axis=1))


ModuleDef = Any


class ResNetBlock(nn.Module):
    """flax examples/imagenet's block."""
    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = self.norm()(y)
        y = self.act(y)
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides, name='conv_proj')(residual)
            residual = self.norm(name='norm_proj')(residual)
        return self.act(residual + y)


class ResNet(nn.Module):
    """flax examples/imagenet's ResNet (tiny)."""
    stage_sizes: tuple[int, ...] = (1, 1)
    num_classes: int = 5
    num_filters: int = 8

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(nn.Conv, use_bias=False)
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
        x = conv(self.num_filters, (3, 3), name='conv_init')(x)
        x = norm(name='bn_init')(x)
        x = nn.relu(x)
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = ResNetBlock(self.num_filters * 2 ** i, strides=strides, conv=conv, norm=norm, act=nn.relu)(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


class DecoderBlock(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x, mask):
        y = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2)(y, mask=mask)
        y = nn.LayerNorm()(x)
        y = nn.gelu(nn.Dense(4 * self.width, name='fc')(y))
        return x + nn.Dense(self.width, name='proj')(y)


class GPT(nn.Module):
    vocab: int = 40
    width: int = 16
    depth: int = 2

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.width, name='wte')(tokens)
        x = x + self.param('wpe', nn.initializers.normal(0.02), (1, tokens.shape[1], self.width))
        mask = nn.make_causal_mask(tokens)
        for i in range(self.depth):
            x = DecoderBlock(self.width, name=f'h_{i}')(x, mask)
        return nn.Dense(self.vocab, name='lm_head')(nn.LayerNorm(name='ln_f')(x))


IMAGES = jax.random.normal(jax.random.key(0), (4, 16, 16, 1))
TOKENS = jax.random.randint(jax.random.key(0), (3, 8), 0, 40)

VIT_OPS = (
    surgery.Widen('encoderblock_1/MlpBlock_0/Dense_0', units=8, into='encoderblock_1/MlpBlock_0/Dense_1',
                  activation=nn.gelu),
    surgery.AddHeads('encoderblock_0/MultiHeadDotProductAttention_0', heads=2),
    surgery.InsertAfter('encoderblock_1', block=lambda: Encoder1DBlock(), residual=False,
                        zero='MultiHeadDotProductAttention_0/out|MlpBlock_0/Dense_1'),
    surgery.LoRA('encoderblock_0/MultiHeadDotProductAttention_0/(query|value)', rank=2),
)


@pytest.fixture(scope='module')
def vit():
    model = ViT()
    return model, model.init(jax.random.key(1), IMAGES)


def assert_pretrained_leaves_copied(pretrained, grown):
    grown_flat = flatten(grown)
    for path, leaf in flatten(pretrained).items():
        assert path in grown_flat, path
        assert grown_flat[path].dtype == leaf.dtype
        np.testing.assert_array_equal(grown_flat[path], leaf, err_msg='/'.join(path))


# ---------------------------------------------------------------------------------------------
# ViT: every operation


def test_vit_grows_with_every_operation(vit):
    model, pretrained = vit
    grown_model = surgery.grow(model, VIT_OPS)
    grown = growjax.grow_params(pretrained, grown_model, jax.random.key(2), IMAGES)
    assert_pretrained_leaves_copied(pretrained, grown)
    new = {'/'.join(p[1:]) for p in growjax.new_paths(grown, pretrained)}
    mlp, attention = 'encoderblock_1/MlpBlock_0', 'encoderblock_0/MultiHeadDotProductAttention_0'
    assert {f'{mlp}/Dense_0/plus/kernel', f'{mlp}/Dense_0/plus/bias', f'{mlp}/Dense_1/from_Dense_0_plus/kernel',
            f'{mlp}/Dense_1/norm/scale_0', f'{mlp}/Dense_1/norm/scale_1', f'{attention}/extra_heads/query/kernel',
            f'{attention}/out/from_extra_heads/kernel', f'{attention}/out/norm/scale_1',
            f'{attention}/query/lora_a', f'{attention}/value/lora_b',
            'encoderblock_1_inserted/MlpBlock_0/Dense_1/kernel'} <= new
    params = grown['params']
    assert params['encoderblock_1']['MlpBlock_0']['Dense_0']['plus']['kernel'].shape == (16, 8)
    assert params['encoderblock_0']['MultiHeadDotProductAttention_0']['extra_heads']['query']['kernel'].shape == (
        16, 2, 8)  # two new heads of the old head size (16 features / 2 heads)
    # The inserted block starts as the identity: its residual branches end at zero.
    inserted = params['encoderblock_1_inserted']
    assert not np.any(inserted['MlpBlock_0']['Dense_1']['kernel'])
    assert not np.any(inserted['MultiHeadDotProductAttention_0']['out']['kernel'])
    assert np.any(inserted['MlpBlock_0']['Dense_0']['kernel'])
    # Growth with NormScale changes the function at init (it rescales the old units): the paper's "grow".
    assert not np.allclose(grown_model.apply(grown, IMAGES), model.apply(pretrained, IMAGES), atol=1e-3)


def test_norm_scale_where_old_and_new_units_meet_is_the_papers(vit):
    """The consumer reads [old, new] groups, each L2-normalised per example, times a learned per-unit scale."""
    model, pretrained = vit
    op = VIT_OPS[0]
    grown_model = surgery.grow(model, [op])
    grown = growjax.grow_params(pretrained, grown_model, jax.random.key(2), IMAGES)
    params = grown['params']['encoderblock_1']['MlpBlock_0']
    scales = params['Dense_1']['norm']
    assert scales['scale_0'].shape == (24,) and scales['scale_1'].shape == (8,)
    np.testing.assert_array_equal(scales['scale_0'], 10.0)
    # The consumer's output, computed by hand from its input (captured) and the parameters.
    captured = {}

    def capture(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if '/'.join(context.module.path) in ('encoderblock_1/MlpBlock_0/Dense_0', 'encoderblock_1/MlpBlock_0/Dense_1'):
            captured['/'.join(context.module.path)] = (args[0], out)
        return out

    with nn.intercept_methods(capture):
        grown_model.apply(grown, IMAGES)
    x_in, _ = captured['encoderblock_1/MlpBlock_0/Dense_0']
    old_in, out = captured['encoderblock_1/MlpBlock_0/Dense_1']
    old = np.asarray(old_in, np.float64)
    assert old.shape[-1] == 24
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    new = np.asarray(nn.gelu(jnp.asarray(x_in @ p['Dense_0']['plus']['kernel'] + p['Dense_0']['plus']['bias'])),
                     np.float64)
    unit = lambda g: g / np.linalg.norm(g, axis=-1, keepdims=True)
    expected = (unit(old) * p['Dense_1']['norm']['scale_0']) @ p['Dense_1']['kernel'] + p['Dense_1']['bias'] + \
        (unit(new) * p['Dense_1']['norm']['scale_1']) @ p['Dense_1']['from_Dense_0_plus']['kernel']
    np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize('index', range(len(VIT_OPS)))
def test_each_operation_preserves_the_function_when_asked(vit, index):
    model, pretrained = vit
    grown_model = surgery.grow(model, [VIT_OPS[index]])
    grown = growjax.grow_params(pretrained, grown_model, jax.random.key(2), IMAGES, preserve_function=True)
    assert_pretrained_leaves_copied(pretrained, grown)
    preserving = grown_model.clone(preserve_function=True)
    np.testing.assert_allclose(preserving.apply(grown, IMAGES), model.apply(pretrained, IMAGES), atol=1e-5)
    if isinstance(VIT_OPS[index], (surgery.Widen, surgery.AddHeads)):  # without preserving, they change it
        free = growjax.grow_params(pretrained, grown_model, jax.random.key(2), IMAGES)
        assert not np.allclose(grown_model.apply(free, IMAGES), model.apply(pretrained, IMAGES), atol=1e-3)


def test_report_lists_leaves_and_checks_the_function(vit):
    model, pretrained = vit
    grown_model = surgery.grow(model, VIT_OPS)
    grown = growjax.grow_params(pretrained, grown_model, jax.random.key(2), IMAGES, reinit='^head/')
    report = surgery.report(grown_model, pretrained, grown, IMAGES, reinit='^head/', pretrained_model=model)
    assert report.max_abs_difference is not None and report.max_abs_difference <= 1e-5
    assert report.modules['head'] == {'reinitialised': ['bias', 'kernel']}
    assert report.modules['encoderblock_1/MlpBlock_0/Dense_0'] == {'copied': ['bias', 'kernel']}
    assert report.modules['encoderblock_1/MlpBlock_0/Dense_0/plus'] == {'new': ['bias', 'kernel']}
    assert report.matches[surgery.describe(VIT_OPS[3])] == [
        'encoderblock_0/MultiHeadDotProductAttention_0/query', 'encoderblock_0/MultiHeadDotProductAttention_0/value']
    assert 'encoderblock_1_inserted' in str(report)


class TwoLayerMlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(16)(x))
        h = nn.relu(nn.Dense(16)(h))
        return nn.Dense(3, name='head')(h)


class WidenedByHand(nn.Module):
    """TwoLayerMlp with 16 new units beside its first layer, written by hand without explicit names:
    the new layer is constructed second, so it takes the name Dense_1 (the old second layer's) and
    the old second layer becomes Dense_2. Every shape fits, so grafting is silent."""
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(16)(x))
        plus = nn.relu(nn.Dense(16)(x))
        h = nn.relu(nn.Dense(16)(h) + nn.Dense(16, use_bias=False, kernel_init=nn.initializers.zeros)(plus))
        return nn.Dense(3, name='head')(h)


def test_the_function_check_catches_the_silent_misgraft_that_surgery_avoids():
    x = jax.random.normal(jax.random.key(0), (4, 16))
    model = TwoLayerMlp()
    pretrained = model.init(jax.random.key(1), x)
    by_hand = WidenedByHand()
    grafted = growjax.grow_params(pretrained, by_hand, jax.random.key(2), x)  # strict, and silent
    with pytest.raises(surgery.SurgeryError, match='differs from the pretrained model'):
        surgery.check_function(model, pretrained, by_hand, grafted, x)
    grown_model = surgery.grow(model, [surgery.Widen('Dense_0', units=16, into='Dense_1')])
    grown = growjax.grow_params(pretrained, grown_model, jax.random.key(2), x)
    assert surgery.report(grown_model, pretrained, grown, x).max_abs_difference <= 1e-6


def test_training_step_after_growth_moves_new_and_old_leaves(vit):
    model, pretrained = vit
    grown_model = surgery.grow(model, VIT_OPS)
    grown = growjax.grow_params(pretrained, grown_model, jax.random.key(2), IMAGES)
    groups = growjax.param_groups(grown_model, pretrained['params'], 'all', IMAGES)
    optimizer = growjax.growth_optimizer(optax.adamw(1e-3), groups)
    state = optimizer.init(grown['params'])
    labels = jnp.arange(4) % 5

    def loss(params):
        logits = grown_model.apply({'params': params}, IMAGES, train=True, rngs={'dropout': jax.random.key(0)})
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads = jax.grad(loss)(grown['params'])
    updates, state = optimizer.update(grads, state, grown['params'])
    after = optax.apply_updates(grown['params'], updates)
    moved = {path for path, leaf in flatten(after).items() if not np.array_equal(leaf, flatten(grown['params'])[path])}
    assert ('encoderblock_1', 'MlpBlock_0', 'Dense_0', 'plus', 'kernel') in moved
    assert ('encoderblock_0', 'MultiHeadDotProductAttention_0', 'extra_heads', 'key', 'kernel') in moved
    assert ('embedding', 'kernel') in moved
    assert float(loss(after)) < float(loss(grown['params']))


def test_regimes_count_blocks_and_freeze_what_they_should(vit):
    model, pretrained = vit
    grown_model = surgery.grow(model, VIT_OPS)
    groups = growjax.param_groups(grown_model, pretrained['params'], 'encoderblock_new', IMAGES)
    assert groups.layer_order == ('embedding', 'pos_embedding', 'encoderblock_0', 'encoderblock_1', 'encoder_norm',
                                  'head')
    mask = flatten(groups.mask)
    assert not mask[('embedding', 'kernel')] and mask[('encoderblock_0', 'LayerNorm_0', 'scale')]
    frozen = growjax.param_groups(grown_model, pretrained['params'], 'new', IMAGES)
    trains = {path for path, t in flatten(frozen.mask).items() if t}
    shapes = jax.eval_shape(grown_model.init, jax.random.key(0), IMAGES)
    assert trains == {path[1:] for path in growjax.new_paths(shapes, pretrained)}
    assert trains and all(not path[0].startswith('embedding') for path in trains)


def test_sharded_vit_grows_under_jit_on_8_devices(vit):
    model, pretrained = vit
    devices = np.array(jax.devices())
    assert devices.size == 8, 'conftest.py asks XLA for 8 CPU devices'
    mesh = Mesh(devices, ('model',))

    def sharding_for(leaf):
        spec = P(*([None] * (leaf.ndim - 1)), 'model') if leaf.ndim and leaf.shape[-1] % 8 == 0 else P()
        return NamedSharding(mesh, spec)

    grown_model = surgery.grow(model, VIT_OPS)
    placed = jax.tree_util.tree_map(lambda a: jax.device_put(a, sharding_for(a)), pretrained)
    out_shardings = jax.tree_util.tree_map(sharding_for, jax.eval_shape(grown_model.init, jax.random.key(0), IMAGES))
    rng = jax.device_put(jax.random.key(3), NamedSharding(mesh, P()))
    grow = jax.jit(lambda p, key: growjax.grow_params(p, grown_model, key, jnp.zeros(IMAGES.shape), check=False),
                   out_shardings=out_shardings)
    with jax.transfer_guard('disallow'):
        grown = grow(placed, rng)
    grown_model.check_growth(grown, IMAGES)  # what grow_params checks outside jit, on the sharded result
    plus = grown['params']['encoderblock_1']['MlpBlock_0']['Dense_0']['plus']['kernel']
    assert plus.sharding == out_shardings['params']['encoderblock_1']['MlpBlock_0']['Dense_0']['plus']['kernel']
    assert len(plus.sharding.device_set) == 8
    assert_pretrained_leaves_copied(pretrained, jax.device_get(grown))


def test_growing_twice_keeps_round_one_and_its_optimiser_state(vit):
    model, pretrained = vit
    first = surgery.grow(model, VIT_OPS[:1])
    grown = growjax.grow_params(pretrained, first, jax.random.key(2), IMAGES)
    groups = growjax.param_groups(first, pretrained['params'], 'all', IMAGES)
    optimizer = growjax.growth_optimizer(optax.adamw(1e-3), groups)
    state = optimizer.init(grown['params'])
    grads = jax.tree_util.tree_map(jnp.ones_like, grown['params'])
    _, state = optimizer.update(grads, state, grown['params'])

    second = surgery.grow(first, [VIT_OPS[0], VIT_OPS[1]])  # the same producer widened again, and new heads
    assert second.ops == (VIT_OPS[0], VIT_OPS[0], VIT_OPS[1])
    regrown = growjax.grow_params(grown, second, jax.random.key(3), IMAGES)
    assert_pretrained_leaves_copied(grown, regrown)
    mlp = regrown['params']['encoderblock_1']['MlpBlock_0']
    assert mlp['Dense_0']['plus2']['kernel'].shape == (16, 8) and 'from_Dense_0_plus2' in mlp['Dense_1']
    new_groups = growjax.param_groups(second, grown['params'], 'new', IMAGES)
    new_optimizer = growjax.growth_optimizer(optax.adamw(1e-3), new_groups)
    new_state = growjax.grow_opt_state(state, grown['params'], regrown['params'], optimizer=new_optimizer)
    adam = new_state[0].inner_state[0]
    old_adam = state[0].inner_state[0]
    np.testing.assert_array_equal(adam.count, old_adam.count)
    # Regime 'new' freezes round one's leaves: their slots are dropped; the new leaves' slots start at zero.
    assert isinstance(adam.mu['encoderblock_1']['MlpBlock_0']['Dense_0']['plus']['kernel'], optax.MaskedNode)
    assert not np.any(adam.mu['encoderblock_1']['MlpBlock_0']['Dense_0']['plus2']['kernel'])
    # And with 'all', every old slot is kept bit for bit.
    all_optimizer = growjax.growth_optimizer(optax.adamw(1e-3), growjax.param_groups(second, grown['params'], 'all',
                                                                                       IMAGES))
    kept = growjax.grow_opt_state(state, grown['params'], regrown['params'], optimizer=all_optimizer)
    np.testing.assert_array_equal(kept[0].inner_state[0].nu['encoderblock_1']['MlpBlock_0']['Dense_0']['plus']['kernel'],
                                  old_adam.nu['encoderblock_1']['MlpBlock_0']['Dense_0']['plus']['kernel'])
    updates, _ = all_optimizer.update(jax.tree_util.tree_map(jnp.ones_like, regrown['params']), kept, regrown['params'])
    assert np.all(np.isfinite(updates['encoderblock_1']['MlpBlock_0']['Dense_0']['plus2']['kernel']))


# ---------------------------------------------------------------------------------------------
# ResNet with BatchNorm


@pytest.fixture(scope='module')
def resnet():
    model = ResNet()
    variables = model.init(jax.random.key(1), IMAGES, train=False)
    # Non-trivial running statistics, as a pretrained network has.
    variables['batch_stats'] = jax.tree_util.tree_map(lambda a: a + 0.3, variables['batch_stats'])
    return model, variables


RESNET_OPS = (
    surgery.Widen('ResNetBlock_1/Conv_0', units=4, into='ResNetBlock_1/Conv_1', through='ResNetBlock_1/BatchNorm_0'),
    surgery.InsertAfter('ResNetBlock_0', block='copy', residual=False, zero='BatchNorm_1'),
    surgery.Deepen('Dense_0', units=16),
)


def test_resnet_grows_through_its_batch_norms(resnet):
    model, pretrained = resnet
    grown_model = surgery.grow(model, RESNET_OPS)
    grown = growjax.grow_params(pretrained, grown_model, jax.random.key(2), IMAGES, False)
    assert_pretrained_leaves_copied(pretrained, grown)
    block = grown['params']['ResNetBlock_1']
    assert block['Conv_0']['plus']['kernel'].shape == (3, 3, 8, 4)
    assert block['BatchNorm_0']['plus']['scale'].shape == (4,)
    assert grown['batch_stats']['ResNetBlock_1']['BatchNorm_0']['plus']['mean'].shape == (4,)
    # The copied block (stacking) starts from ResNetBlock_0's pretrained weights and statistics, except
    # its last BatchNorm, which starts at zero so the block passes its (non-negative) input through.
    copy = grown['params']['ResNetBlock_0_inserted']
    np.testing.assert_array_equal(copy['Conv_0']['kernel'], pretrained['params']['ResNetBlock_0']['Conv_0']['kernel'])
    np.testing.assert_array_equal(grown['batch_stats']['ResNetBlock_0_inserted']['BatchNorm_0']['mean'],
                                  pretrained['batch_stats']['ResNetBlock_0']['BatchNorm_0']['mean'])
    assert not np.any(copy['BatchNorm_1']['scale'])
    # Train mode: BatchNorm statistics (new ones included) update.
    logits, updates = grown_model.apply(grown, IMAGES, True, mutable=['batch_stats'])
    assert logits.shape == (4, 5)
    assert not np.array_equal(updates['batch_stats']['ResNetBlock_1']['BatchNorm_0']['plus']['mean'],
                              grown['batch_stats']['ResNetBlock_1']['BatchNorm_0']['plus']['mean'])


def test_resnet_preserving_variant_computes_the_pretrained_function(resnet):
    model, pretrained = resnet
    # Deepen changes the classifier's input width unless it starts as the identity of the same width.
    ops = (*RESNET_OPS[:2], surgery.Deepen('Dense_0', units=16))
    grown_model = surgery.grow(model, ops)
    grown = growjax.grow_params(pretrained, grown_model, jax.random.key(2), IMAGES, False, preserve_function=True)
    report = surgery.report(grown_model, pretrained, grown, IMAGES, False)
    assert report.max_abs_difference <= 1e-5
    np.testing.assert_allclose(grown_model.clone(preserve_function=True).apply(grown, IMAGES, False),
                               model.apply(pretrained, IMAGES, False), atol=1e-5)


def test_deepen_is_the_papers_da_before_the_classifier(resnet):
    model, pretrained = resnet
    grown_model = surgery.grow(model.clone(num_classes=3), [surgery.Deepen('Dense_0', units=32)])
    grown = growjax.grow_params(pretrained, grown_model, jax.random.key(2), IMAGES, False, reinit='^Dense_0/')
    assert grown['params']['Dense_0_fc_a']['kernel'].shape == (16, 32)
    assert grown['params']['Dense_0']['kernel'].shape == (32, 3)
    order = growjax.forward_order(grown_model, jax.random.key(0), IMAGES, False)
    assert order.index('Dense_0_fc_a') == order.index('Dense_0') - 1


# ---------------------------------------------------------------------------------------------
# GPT-style decoder with causal attention


GPT_OPS = (
    surgery.AddHeads('h_1/MultiHeadDotProductAttention_0', heads=1),
    surgery.Widen('h_0/fc', units=8, into='h_0/proj', activation=nn.gelu),
    surgery.LoRA('h_.*/MultiHeadDotProductAttention_0/(query|key|value|out)', rank=2),
    surgery.InsertAfter('h_1', block=lambda: DecoderBlock(16), residual=False,
                        zero='MultiHeadDotProductAttention_0/out|proj'),
)


def test_gpt_grows_and_stays_causal():
    model = GPT()
    pretrained = model.init(jax.random.key(1), TOKENS)
    grown_model = surgery.grow(model, GPT_OPS[:3])
    grown = growjax.grow_params(pretrained, grown_model, jax.random.key(2), TOKENS)
    assert_pretrained_leaves_copied(pretrained, grown)
    # Randomly initialised new heads and units (NormScale on): changing a later token must not change
    # the logits of earlier positions.
    changed = TOKENS.at[:, 5:].set((TOKENS[:, 5:] + 7) % 40)
    before, after = grown_model.apply(grown, TOKENS), grown_model.apply(grown, changed)
    np.testing.assert_allclose(before[:, :5], after[:, :5], atol=1e-6)
    assert not np.allclose(before[:, 5:], after[:, 5:])


def test_gpt_preserving_growth_and_inserted_block():
    model = GPT()
    pretrained = model.init(jax.random.key(1), TOKENS)
    grown_model = surgery.grow(model, GPT_OPS)
    grown = growjax.grow_params(pretrained, grown_model, jax.random.key(2), TOKENS, preserve_function=True)
    report = surgery.report(grown_model, pretrained, grown, TOKENS)
    assert report.max_abs_difference <= 1e-5
    assert 'h_1_inserted' in grown['params']


# ---------------------------------------------------------------------------------------------
# Errors


def test_a_pattern_that_matches_nothing_names_itself_and_what_it_could_mean(vit):
    model, pretrained = vit
    bad = surgery.grow(model, [surgery.Widen('encoderblock_1/MlpBlock_0/Dense_9', units=4,
                                             into='encoderblock_1/MlpBlock_0/Dense_1')])
    with pytest.raises(surgery.SurgeryError, match=r"Dense_9'.*matches no module.*encoderblock_1/MlpBlock_0/Dense_0"):
        growjax.grow_params(pretrained, bad, jax.random.key(0), IMAGES)
    wrong_into = surgery.grow(model, [surgery.Widen('encoderblock_1/MlpBlock_0/Dense_0', units=4, into='Dense_1')])
    with pytest.raises(surgery.SurgeryError, match="'Dense_1' matches no module"):
        wrong_into.init(jax.random.key(0), IMAGES)


def test_a_module_of_an_unsupported_kind_is_named(vit):
    model, _ = vit
    bad = surgery.grow(model, [surgery.Widen('encoder_norm', units=4, into='head')])
    with pytest.raises(surgery.SurgeryError, match='encoder_norm is a flax.linen.normalization.LayerNorm'):
        bad.init(jax.random.key(0), IMAGES)
    with pytest.raises(surgery.SurgeryError, match='LoRA adapts Dense'):
        surgery.grow(model, [surgery.LoRA('embedding', rank=2)]).init(jax.random.key(0), IMAGES)


def test_widen_into_a_consumer_across_a_reshape_is_refused(resnet):
    model, _ = resnet
    bad = surgery.grow(model, [surgery.Widen('ResNetBlock_1/Conv_1', units=4, into='Dense_0')])
    with pytest.raises(surgery.SurgeryError, match='must differ only in the last'):
        bad.init(jax.random.key(0), IMAGES, False)


@pytest.mark.parametrize('make, message', [
    (lambda: surgery.Widen('a', units=0, into='b'), 'Widen.units must be a positive integer'),
    (lambda: surgery.Widen('a(', units=2, into='b'), 'not a valid regex'),
    (lambda: surgery.AddHeads('a', heads=-1), 'AddHeads.heads'),
    (lambda: surgery.InsertAfter('a', block=3), 'InsertAfter.block'),
    (lambda: surgery.grow(ViT(), ['Widen']), 'is not an operation'),
])
def test_bad_operations_are_refused_by_name(make, message):
    with pytest.raises(surgery.SurgeryError, match=message):
        make()


def test_variables_without_the_params_level_get_a_one_line_hint(vit):
    model, pretrained = vit
    grown_model = surgery.grow(model, VIT_OPS[:1])
    with pytest.raises(growjax.GraftError) as info:
        growjax.grow_params(pretrained['params'], grown_model, jax.random.key(0), IMAGES)
    message = str(info.value)
    assert "{'params': params}" in message and len(message.splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# Properties over random sizes


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(width=st.sampled_from([8, 12, 16]), units=st.integers(1, 9), heads=st.integers(1, 3),
                  mlp=st.integers(4, 20), seed=st.integers(0, 2 ** 16))
def test_preserving_growth_property(width, units, heads, mlp, seed):
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x + nn.MultiHeadDotProductAttention(num_heads=2, name='attn')(nn.LayerNorm()(x))
            y = nn.relu(nn.Dense(mlp, name='fc1')(nn.LayerNorm()(x)))
            return x + nn.Dense(width, name='fc2')(y)

    x = jax.random.normal(jax.random.key(seed), (2, 5, width))
    model = Block()
    pretrained = model.init(jax.random.key(seed + 1), x)
    ops = [surgery.Widen('fc1', units=units, into='fc2'), surgery.AddHeads('attn', heads=heads)]
    grown_model = surgery.grow(model, ops)
    grown = growjax.grow_params(pretrained, grown_model, jax.random.key(seed + 2), x, preserve_function=True)
    assert_pretrained_leaves_copied(pretrained, grown)
    assert grown['params']['fc1']['plus']['kernel'].shape == (width, units)
    assert grown['params']['attn']['extra_heads']['query']['kernel'].shape == (width, heads, width // 2)
    np.testing.assert_allclose(grown_model.clone(preserve_function=True).apply(grown, x), model.apply(pretrained, x),
                               atol=1e-5)


class CausalSelfAttention(nn.Module):
    """A user's own attention (nanoGPT-style, with separate Dense projections and its own causal mask)."""
    num_heads: int = 2

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        head_dim = width // self.num_heads
        split = lambda t: t.reshape(*t.shape[:-1], self.num_heads, head_dim)
        q, k, v = (split(nn.Dense(width, name=name)(x)) for name in ('query', 'key', 'value'))
        scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(head_dim)
        causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        context = jnp.einsum('bhqk,bkhd->bqhd', weights, v)
        return nn.Dense(width, name='out')(context.reshape(*x.shape[:-1], width))


class TinyCausalLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(40, 16, name='wte')(tokens)
        x = x + CausalSelfAttention(name='attn')(nn.LayerNorm()(x))
        return nn.Dense(40, name='lm_head')(x)


def test_heads_on_a_users_own_attention_with_dense_projections():
    model = TinyCausalLM()
    pretrained = model.init(jax.random.key(1), TOKENS)
    grown_model = surgery.grow(model, [surgery.AddHeads('attn', heads=2, causal=True)])  # head_dim from num_heads
    grown = growjax.grow_params(pretrained, grown_model, jax.random.key(2), TOKENS)
    assert_pretrained_leaves_copied(pretrained, grown)
    assert grown['params']['attn']['extra_heads']['query']['kernel'].shape == (16, 2, 8)
    assert grown['params']['attn']['out']['from_extra_heads']['kernel'].shape == (16, 16)  # 2 heads x 8 -> 16
    changed = TOKENS.at[:, 5:].set((TOKENS[:, 5:] + 7) % 40)
    before, after = grown_model.apply(grown, TOKENS), grown_model.apply(grown, changed)
    np.testing.assert_allclose(before[:, :5], after[:, :5], atol=1e-6)  # causal=True masks the new heads too
    preserved = growjax.grow_params(pretrained, grown_model, jax.random.key(2), TOKENS, preserve_function=True)
    assert surgery.report(grown_model, pretrained, preserved, TOKENS).max_abs_difference <= 1e-5
