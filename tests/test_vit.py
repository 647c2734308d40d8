"""The ViT (growjax/models/vit.py) and its published-weight loaders (timm, torchvision, big_vision).

The PyTorch references below are written out with timm's and torchvision's module names and
semantics (neither library installs beside this torch), tiny: width 32, 2 blocks, 2 heads, 4-pixel
patches on 16x16 images. Random weights (LayerNorms, class token and position embeddings too),
so every tensor and every layout matters for the logits.
"""
from __future__ import annotations

import collections
import functools
import math

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from torch import nn as tnn
from torch.nn import functional as F

from growjax import models, pretrained
from growjax.errors import UserError
from growjax.groups import forward_order, regime_names
from growjax.grow import flatten
from growjax.models import vit
from growjax.models.growth import Growth, GrowthError

WIDTH, DEPTH, HEADS, MLP_DIM, PATCH, SIZE, NUM_CLASSES = 32, 2, 2, 64, 4, 16, 5
TINY = dict(variant='mu/4', depth=DEPTH, mlp_dim=MLP_DIM)  # mu: width 32, 2 heads


def _key(seed: int = 0) -> jax.Array:
    return jax.random.key(seed, impl='rbg')  # compiles faster on XLA:CPU; the model does not depend on it


@functools.cache
def _images(size: int = SIZE, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, size, size, channels)).astype(np.float32)


def _random_variables(model, images: np.ndarray) -> dict:
    """Random values of the model's shapes (from the traced init): XLA:CPU takes seconds to compile an
    init's random draws, and only test_init runs one."""
    rng = np.random.default_rng(1)
    return jax.tree_util.tree_map(lambda leaf: (0.3 * rng.standard_normal(leaf.shape)).astype(leaf.dtype),
                                  jax.eval_shape(model.init, _key(), images))


# ---------------------------------------------------------------------------------------------
# The model


def test_parameter_names_are_top_level_layers_in_forward_order():
    model = models.get('vit', num_classes=NUM_CLASSES, representation_size=16, **TINY)
    variables = jax.eval_shape(model.init, _key(), _images())
    assert forward_order(model, _key(), _images()) == [
        'embedding', 'cls', 'pos_embedding', 'block0', 'block1', 'encoder_norm', 'pre_logits', 'head']
    shapes = {'/'.join(path[1:]): leaf.shape for path, leaf in flatten(variables).items()}
    assert {path: shape for path, shape in shapes.items() if path.startswith('block1/')} == {
        'block1/norm1/scale': (32,), 'block1/norm1/bias': (32,),
        'block1/attention/query/kernel': (32, 2, 16), 'block1/attention/query/bias': (2, 16),
        'block1/attention/key/kernel': (32, 2, 16), 'block1/attention/key/bias': (2, 16),
        'block1/attention/value/kernel': (32, 2, 16), 'block1/attention/value/bias': (2, 16),
        'block1/attention/out/kernel': (2, 16, 32), 'block1/attention/out/bias': (32,),
        'block1/norm2/scale': (32,), 'block1/norm2/bias': (32,),
        'block1/mlp/fc1/kernel': (32, 64), 'block1/mlp/fc1/bias': (64,),
        'block1/mlp/fc2/kernel': (64, 32), 'block1/mlp/fc2/bias': (32,)}
    assert shapes['cls'] == (1, 1, 32) and shapes['pos_embedding'] == (1, 1 + 16, 32)
    assert shapes['embedding/kernel'] == (4, 4, 3, 32) and shapes['pre_logits/kernel'] == (32, 16)
    assert 'block1_new' in regime_names(forward_order(model, _key(), _images()))


@pytest.mark.parametrize('options, paths', [
    ({}, {'cls'}),
    ({'pool_type': 'gap'}, set()),
    ({'representation_size': 8}, {'cls', 'pre_logits'}),
    ({'pool_type': 'gap', 'norm_pooled': True}, set()),
])
def test_forward_shapes(options, paths):
    model = models.get('vit', num_classes=NUM_CLASSES, **TINY, **options)
    variables = _random_variables(model, _images())
    assert paths == {'cls', 'pre_logits'} & set(variables['params'])
    assert variables['params']['pos_embedding'].shape == (1, len(paths & {'cls'}) + 16, WIDTH)
    logits = model.apply(variables, _images())
    assert logits.shape == (2, NUM_CLASSES) and np.all(np.isfinite(logits))


def test_any_channel_count_and_image_size():
    model = models.get('vit', num_classes=3, **TINY)
    variables = _random_variables(model, _images(32, 1))
    assert variables['params']['pos_embedding'].shape == (1, 1 + 8 * 8, WIDTH)
    assert variables['params']['embedding']['kernel'].shape == (PATCH, PATCH, 1, WIDTH)
    assert model.apply(variables, _images(32, 1)).shape == (2, 3)


def test_init():
    """big_vision's initialisers, as lecun_normal_flat draws them: zero class token and biases,
    position embeddings of std 1/sqrt(width), kernels of variance 1/fan_in (attention's too)."""
    model = models.get('vit', num_classes=NUM_CLASSES, variant='mu/4', mlp_dim=256)
    params = model.init(jax.random.key(0), _images(32))['params']
    assert not np.any(params['cls']) and not np.any(params['block0']['attention']['query']['bias'])
    assert abs(np.std(params['pos_embedding']) * math.sqrt(WIDTH) - 1) < 0.1
    for kernel, fan_in in ((params['block0']['attention']['key']['kernel'], WIDTH),
                           (params['block0']['attention']['out']['kernel'], WIDTH),
                           (params['block0']['mlp']['fc2']['kernel'], 256),
                           (params['embedding']['kernel'], 3 * PATCH * PATCH)):
        assert abs(np.std(kernel) * math.sqrt(fan_in) - 1) < 0.15, kernel.shape
    np.testing.assert_array_equal(params['block0']['norm2']['scale'], 1)


def test_bfloat16_computes_in_bfloat16_with_float32_parameters():
    model = models.get('vit', num_classes=NUM_CLASSES, dtype=jnp.bfloat16, **TINY)
    variables = jax.eval_shape(model.init, _key(), _images())  # traced only: dtypes need no computing
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
    intermediates = jax.eval_shape(lambda v, x: model.apply(v, x, capture_intermediates=True), variables, _images())
    assert jax.tree_util.tree_leaves(intermediates[0])[0].dtype == jnp.bfloat16  # the logits
    outputs = flatten(intermediates[1]['intermediates']['block1'])  # {('mlp', '__call__'): (output,), ...}
    dtypes = {path[0]: output[0].dtype for path, output in outputs.items() if len(path) == 2}
    assert {'norm1', 'attention', 'norm2', 'mlp'} <= set(dtypes) and set(dtypes.values()) == {jnp.dtype(jnp.bfloat16)}


def test_vit_b16_has_timms_parameter_count():
    """timm's vit_base_patch16_224 has 86,567,656 parameters; counted from shapes, nothing allocated."""
    model = models.get('vit', num_classes=1000, variant='B/16')
    shapes = jax.eval_shape(model.init, _key(), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    assert sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes)) == 86_567_656


def test_variants_and_overrides():
    assert vit.decode_variant('S/16') == {'width': 384, 'depth': 12, 'mlp_dim': 1536, 'num_heads': 6, 'patch_size': 16}
    assert vit.decode_variant('Ti') == {'width': 192, 'depth': 12, 'mlp_dim': 768, 'num_heads': 3}
    assert vit.decode_variant('L/32')['depth'] == 24 and vit.decode_variant('mu/4')['width'] == 32
    # A small ViT for the built-in 16x16 / 32x32 data: S's heads and MLP, width and depth given.
    model = models.get('vit', num_classes=24, variant='S/4', width=128, depth=6, mlp_dim=256, num_heads=4)
    assert model.dims == vit.Dims(width=128, depth=6, mlp_dim=256, num_heads=4, patch_size=4)
    assert vit.variant_of(vit.Dims(192, 12, 768, 3, 32)) == 'Ti/32' and vit.variant_of(model.dims) is None
    for variant, message in (('X/16', "variant 'X/16' does not parse"), ('B/x', "variant 'B/x' does not parse"),
                             ('B', "does not give ['patch_size']")):
        with pytest.raises(UserError, match=message.replace('[', r'\[').replace(']', r'\]')):
            models.get('vit', num_classes=2, variant=variant)
    with pytest.raises(UserError, match='width=100 is not a multiple of num_heads=6'):
        models.get('vit', num_classes=2, variant='S/16', width=100)
    with pytest.raises(UserError, match="pool_type='map'"):
        models.get('vit', num_classes=2, variant='S/16', pool_type='map')


def test_models_get_passes_the_fields_through_and_refuses_unknown_ones():
    model = models.get('vit', num_classes=7, variant='Ti/32', pool_type='gap', representation_size=12,
                       dropout_rate=0.1, attention_dropout_rate=0.2, approximate_gelu=True, norm_pooled=True)
    assert (model.num_classes, model.variant, model.pool_type, model.representation_size, model.dropout_rate,
            model.attention_dropout_rate, model.approximate_gelu, model.norm_pooled) == \
        (7, 'Ti/32', 'gap', 12, 0.1, 0.2, True, True)
    assert {'variant', 'width', 'depth', 'mlp_dim', 'num_heads', 'patch_size', 'pool_type', 'representation_size',
            'dropout_rate', 'approximate_gelu', 'dtype'} <= models.options('vit')
    with pytest.raises(ValueError, match=r"Model 'vit' has no option\(s\) \['hidden_size'\]"):
        models.get('vit', num_classes=2, hidden_size=768)


def test_a_growth_spec_is_refused():
    with pytest.raises(GrowthError, match='a ViT is grown with growjax.surgery'):
        models.get('vit', num_classes=2, growth=Growth.wa(8))


def test_fused_attention_equals_flax_unfused_attention(monkeypatch):
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')  # the fused branch, as on a GPU
    rng = np.random.default_rng(0)
    query, key, value = (jnp.asarray(rng.standard_normal((2, 17, 2, 16)), jnp.float32) for _ in range(3))
    np.testing.assert_allclose(vit.fused_attention(query, key, value),
                               fnn.dot_product_attention(query, key, value), atol=1e-6, rtol=1e-6)


def test_the_model_attends_through_jax_fused_kernel_and_equals_the_unfused_model(monkeypatch):
    model = models.get('vit', num_classes=NUM_CLASSES, **TINY)
    variables = _random_variables(model, _images())
    calls = []
    fused_kernel = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, 'dot_product_attention', lambda *a, **k: calls.append(1) or fused_kernel(*a, **k))
    model.apply(variables, _images())
    assert not calls  # on CPU, where jax has no fused kernel, flax's einsums (faster there)
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
    fused = model.apply(variables, _images())
    assert len(calls) == DEPTH  # one fused call per block
    monkeypatch.setattr(vit, 'fused_attention', fnn.dot_product_attention)  # flax's own, unfused
    unfused = model.apply(variables, _images())
    assert len(calls) == DEPTH
    assert np.max(np.abs(np.asarray(fused) - np.asarray(unfused))) < 1e-5


def test_dropout_only_in_train_mode(monkeypatch):
    plain = models.get('vit', num_classes=NUM_CLASSES, **TINY)
    dropping = models.get('vit', num_classes=NUM_CLASSES, dropout_rate=0.3, attention_dropout_rate=0.3, **TINY)
    variables = _random_variables(plain, _images())
    expected = plain.apply(variables, _images())
    np.testing.assert_array_equal(dropping.apply(variables, _images()), expected)  # train=False: no dropout
    calls = []
    fused_kernel = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, 'dot_product_attention', lambda *a, **k: calls.append(1) or fused_kernel(*a, **k))
    trained = dropping.apply(variables, _images(), train=True, rngs={'dropout': _key(1)})
    assert np.max(np.abs(np.asarray(trained) - np.asarray(expected))) > 1e-3
    assert calls == []  # attention dropout needs flax's unfused attention


# ---------------------------------------------------------------------------------------------
# PyTorch references: timm's VisionTransformer and torchvision's, with their names


class TimmAttention(tnn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = tnn.Linear(dim, dim * 3)
        self.proj = tnn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class TimmMlp(tnn.Module):
    def __init__(self, dim, hidden, gelu):
        super().__init__()
        self.fc1, self.act, self.fc2 = tnn.Linear(dim, hidden), gelu, tnn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TimmBlock(tnn.Module):
    def __init__(self, dim, num_heads, mlp_dim, gelu):
        super().__init__()
        self.norm1 = tnn.LayerNorm(dim, eps=1e-6)
        self.attn = TimmAttention(dim, num_heads)
        self.norm2 = tnn.LayerNorm(dim, eps=1e-6)
        self.mlp = TimmMlp(dim, mlp_dim, gelu)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmPatchEmbed(tnn.Module):
    def __init__(self, channels, dim, patch):
        super().__init__()
        self.proj = tnn.Conv2d(channels, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimmViT(tnn.Module):
    """timm's VisionTransformer: class_token=False is its global-average-pooled model (fc_norm=True:
    the final norm after the pooling), representation_size its older pre_logits.fc + tanh."""

    def __init__(self, class_token=True, fc_norm=False, representation_size=None, gelu='none', depth=DEPTH,
                 dim=WIDTH, mlp_dim=MLP_DIM, heads=HEADS, size=SIZE):
        super().__init__()
        gelu = tnn.GELU(approximate=gelu)  # 'none': exact erf, as timm; 'tanh': flax's default (big_vision)
        self.patch_embed = TimmPatchEmbed(3, dim, PATCH)
        if class_token:
            self.cls_token = tnn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = tnn.Parameter(torch.zeros(1, int(class_token) + (size // PATCH) ** 2, dim))
        self.blocks = tnn.Sequential(*(TimmBlock(dim, heads, mlp_dim, gelu) for _ in range(depth)))
        if fc_norm:
            self.fc_norm = tnn.LayerNorm(dim, eps=1e-6)
        else:
            self.norm = tnn.LayerNorm(dim, eps=1e-6)
        if representation_size:
            self.pre_logits = tnn.Sequential(collections.OrderedDict(
                fc=tnn.Linear(dim, representation_size), act=tnn.Tanh()))
        self.head = tnn.Linear(representation_size or dim, NUM_CLASSES)

    def forward(self, x):
        x = self.patch_embed(x)
        if hasattr(self, 'cls_token'):
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.blocks(x + self.pos_embed)
        if hasattr(self, 'norm'):
            x = self.norm(x)
        x = x[:, 0] if hasattr(self, 'cls_token') else x.mean(dim=1)
        if hasattr(self, 'fc_norm'):
            x = self.fc_norm(x)
        if hasattr(self, 'pre_logits'):
            x = self.pre_logits(x)
        return self.head(x)


class TorchvisionEncoderBlock(tnn.Module):
    def __init__(self, dim, num_heads, mlp_dim):
        super().__init__()
        self.ln_1 = tnn.LayerNorm(dim, eps=1e-6)
        self.self_attention = tnn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.ln_2 = tnn.LayerNorm(dim, eps=1e-6)
        self.mlp = tnn.Sequential(tnn.Linear(dim, mlp_dim), tnn.GELU(), tnn.Dropout(0.0), tnn.Linear(mlp_dim, dim),
                                  tnn.Dropout(0.0))

    def forward(self, inputs):
        x = self.ln_1(inputs)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = x + inputs
        return x + self.mlp(self.ln_2(x))


class TorchvisionEncoder(tnn.Module):
    def __init__(self, seq_length, dim, num_heads, mlp_dim):
        super().__init__()
        self.pos_embedding = tnn.Parameter(torch.zeros(1, seq_length, dim))
        self.layers = tnn.Sequential(collections.OrderedDict(
            (f'encoder_layer_{i}', TorchvisionEncoderBlock(dim, num_heads, mlp_dim)) for i in range(DEPTH)))
        self.ln = tnn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        return self.ln(self.layers(x + self.pos_embedding))


class TorchvisionViT(tnn.Module):
    """torchvision.models.VisionTransformer (vit_b_16's code), with nn.MultiheadAttention."""

    def __init__(self):
        super().__init__()
        self.conv_proj = tnn.Conv2d(3, WIDTH, PATCH, stride=PATCH)
        self.class_token = tnn.Parameter(torch.zeros(1, 1, WIDTH))
        self.encoder = TorchvisionEncoder((SIZE // PATCH) ** 2 + 1, WIDTH, HEADS, MLP_DIM)
        self.heads = tnn.Sequential(collections.OrderedDict(head=tnn.Linear(WIDTH, NUM_CLASSES)))

    def forward(self, x):
        x = self.conv_proj(x)
        x = x.reshape(x.shape[0], WIDTH, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])


def _randomized(model: tnn.Module, seed: int = 0) -> tnn.Module:
    """Random weights where torch initialises constants (LayerNorms, biases, tokens, positions)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1 and ('norm' in name or 'ln' in name) and name.endswith('weight'):
                parameter.uniform_(0.5, 1.5)
            elif parameter.dim() == 1:
                parameter.normal_(0.0, 0.1)
            elif parameter.dim() == 3:  # class token, position embeddings
                parameter.normal_(0.0, 0.5)
    return model.eval()


@functools.cache
def _timm(**options) -> tnn.Module:
    return _randomized(TimmViT(**options))


@functools.cache
def _torchvision() -> tnn.Module:
    return _randomized(TorchvisionViT())


def _state_dict(model: tnn.Module) -> dict[str, np.ndarray]:
    return {key: value.detach().numpy().copy() for key, value in model.state_dict().items()}


def _torch_logits(model: tnn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()


def _logits_diff(variables, options, model: tnn.Module) -> float:
    flax_model = models.get('vit', **options)
    torch_logits = _torch_logits(model, _images())
    assert np.std(torch_logits) > 0.1  # logits of a scale that a wrong layout would show in
    return float(np.max(np.abs(np.asarray(flax_model.apply(variables, _images())) - torch_logits)))


def _assert_same_tree(actual, expected):
    actual, expected = flatten(actual), flatten(expected)
    assert actual.keys() == expected.keys()
    for path in expected:
        np.testing.assert_array_equal(np.asarray(actual[path]), np.asarray(expected[path]), err_msg=str(path))


# ---------------------------------------------------------------------------------------------
# Parity with PyTorch


@pytest.mark.parametrize('options', [{}, {'class_token': False}, {'class_token': False, 'fc_norm': True},
                                      {'representation_size': 24}], ids=['tok', 'gap', 'gap_fc_norm', 'pre_logits'])
def test_timm_logits(options):
    reference = _timm(**options)
    variables = pretrained.from_torch(_state_dict(reference), 'vit', num_heads=HEADS)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda leaf: leaf.dtype == np.float32, variables))
    found = pretrained.model_options(_state_dict(reference), 'vit', num_heads=HEADS)
    assert found == {'num_classes': NUM_CLASSES, 'variant': None, 'width': WIDTH, 'depth': DEPTH, 'mlp_dim': MLP_DIM,
                     'num_heads': HEADS, 'patch_size': PATCH, 'pool_type': 'gap' if 'class_token' in options else 'tok',
                     'norm_pooled': 'fc_norm' in options, 'approximate_gelu': False,
                     **({'representation_size': 24} if 'representation_size' in options else {})}
    assert _logits_diff(variables, found, reference) < 1e-4


def test_timm_qkv_is_split_into_query_key_value_per_head():
    state_dict = _state_dict(_timm())
    attention = pretrained.from_torch(state_dict, 'vit', num_heads=HEADS)['params']['block1']['attention']
    qkv, proj = state_dict['blocks.1.attn.qkv.weight'], state_dict['blocks.1.attn.proj.weight']
    np.testing.assert_array_equal(attention['key']['kernel'][:, 1, 3], qkv[WIDTH + 16 + 3])  # head 1, unit 3 of k
    np.testing.assert_array_equal(attention['value']['bias'], state_dict['blocks.1.attn.qkv.bias'][64:].reshape(2, 16))
    np.testing.assert_array_equal(attention['out']['kernel'][1, 3], proj[:, 16 + 3])


def test_torchvision_logits_both_mlp_names(tmp_path):
    reference = _torchvision()
    state_dict = _state_dict(reference)
    assert 'encoder.layers.encoder_layer_1.self_attention.in_proj_weight' in state_dict
    variables = pretrained.from_torch(state_dict, 'vit', num_heads=HEADS)
    options = pretrained.model_options(state_dict, 'vit', num_heads=HEADS)
    assert _logits_diff(variables, options, reference) < 1e-4
    # vit_b_16-c867db91.pth was saved by torchvision 0.12, whose MLPBlock named its linears linear_1/linear_2.
    old = {key.replace('.mlp.0.', '.mlp.linear_1.').replace('.mlp.3.', '.mlp.linear_2.'): value
           for key, value in state_dict.items()}
    assert old != state_dict
    _assert_same_tree(pretrained.from_torch(old, 'vit', num_heads=HEADS), variables)


def test_safetensors_and_pth_files(tmp_path):
    state_dict = _state_dict(_timm())
    expected = pretrained.from_torch(state_dict, 'vit', num_heads=HEADS)
    safetensors.numpy.save_file(state_dict, tmp_path / 'vit.safetensors')
    torch.save(_timm().state_dict(), tmp_path / 'vit.pth')
    for file in ('vit.safetensors', 'vit.pth'):
        _assert_same_tree(pretrained.from_torch(tmp_path / file, 'vit', num_heads=HEADS), expected)


def _as_big_vision(state_dict, linen: bool = True) -> dict[str, np.ndarray]:
    """timm's tensors as big_vision stores them: flax layouts. linen=True: today's vit.py (its
    'params/' checkpoints, position embeddings added before the class token, so the token's own
    position is folded into it); False: the original ViT code's AugReg files (pre-linen numbering,
    positions under Transformer/posembed_input, with the class token's row)."""
    attention, mlp, norm2 = ('MultiHeadDotProductAttention_0', 'MlpBlock_0', 'LayerNorm_1') if linen else \
        ('MultiHeadDotProductAttention_1', 'MlpBlock_3', 'LayerNorm_2')
    params = {'embedding/kernel': state_dict['patch_embed.proj.weight'].transpose(2, 3, 1, 0),
              'embedding/bias': state_dict['patch_embed.proj.bias'],
              'Transformer/encoder_norm/scale': state_dict['norm.weight'],
              'Transformer/encoder_norm/bias': state_dict['norm.bias'],
              'head/kernel': state_dict['head.weight'].T, 'head/bias': state_dict['head.bias']}
    if linen:
        params['cls'] = state_dict['cls_token'] + state_dict['pos_embed'][:, :1]
        params['pos_embedding'] = state_dict['pos_embed'][:, 1:]
    else:
        params['cls'] = state_dict['cls_token']
        params['Transformer/posembed_input/pos_embedding'] = state_dict['pos_embed']
    for i in range(DEPTH):
        block, timm = f'Transformer/encoderblock_{i}', f'blocks.{i}'
        for flax_norm, timm_norm in (('LayerNorm_0', 'norm1'), (norm2, 'norm2')):
            params[f'{block}/{flax_norm}/scale'] = state_dict[f'{timm}.{timm_norm}.weight']
            params[f'{block}/{flax_norm}/bias'] = state_dict[f'{timm}.{timm_norm}.bias']
        qkv, qkv_bias = state_dict[f'{timm}.attn.qkv.weight'], state_dict[f'{timm}.attn.qkv.bias']
        for j, part in enumerate(('query', 'key', 'value')):
            params[f'{block}/{attention}/{part}/kernel'] = qkv[j * WIDTH:(j + 1) * WIDTH].T.reshape(WIDTH, HEADS, -1)
            params[f'{block}/{attention}/{part}/bias'] = qkv_bias[j * WIDTH:(j + 1) * WIDTH].reshape(HEADS, -1)
        params[f'{block}/{attention}/out/kernel'] = state_dict[f'{timm}.attn.proj.weight'].T.reshape(HEADS, -1, WIDTH)
        params[f'{block}/{attention}/out/bias'] = state_dict[f'{timm}.attn.proj.bias']
        for r in range(2):
            params[f'{block}/{mlp}/Dense_{r}/kernel'] = state_dict[f'{timm}.mlp.fc{r + 1}.weight'].T
            params[f'{block}/{mlp}/Dense_{r}/bias'] = state_dict[f'{timm}.mlp.fc{r + 1}.bias']
    if linen:
        params = {f'params/{key}': value for key, value in params.items()}
        params['opt/momentum/head/kernel'] = np.zeros(3, np.float32)  # a checkpoint's optimiser state: not weights
    return params


@pytest.mark.parametrize('linen', [True, False], ids=['big_vision', 'augreg'])
def test_big_vision_npz_logits(tmp_path, linen):
    reference = _timm(gelu='tanh')  # big_vision computes flax's tanh GELU
    np.savez(tmp_path / 'vit.npz', **_as_big_vision(_state_dict(reference), linen))
    options = pretrained.model_options(tmp_path / 'vit.npz', 'vit', num_heads=HEADS)
    assert options['approximate_gelu'] is True and options['pool_type'] == 'tok'
    variables = pretrained.from_big_vision(tmp_path / 'vit.npz', num_heads=HEADS)
    assert _logits_diff(variables, options, reference) < 1e-4
    exact = pretrained.from_torch(_state_dict(reference), 'vit', num_heads=HEADS)
    if not linen:  # the same tensors as timm's file; big_vision's folds the class token's position into 'cls'
        _assert_same_tree(variables, exact)
    in_memory = pretrained.from_big_vision({k: v for k, v in np.load(tmp_path / 'vit.npz').items()}, num_heads=HEADS)
    _assert_same_tree(in_memory, variables)


def test_standard_variant_sizes_give_the_heads():
    reference = _randomized(TimmViT(depth=1, mlp_dim=128))  # mu's sizes: width 32, depth 1, mlp 128 -> 2 heads
    state_dict = _state_dict(reference)
    options = pretrained.model_options(state_dict, 'vit')
    assert options == {'num_classes': NUM_CLASSES, 'variant': 'mu/4', 'pool_type': 'tok', 'norm_pooled': False,
                       'approximate_gelu': False}
    assert _logits_diff(pretrained.from_torch(state_dict, 'vit'), options, reference) < 1e-4


def test_model_options_of_a_cnn_file_are_its_classes_and_width():
    model = models.get('alexnet', num_classes=7, width=1 / 16)
    shapes = flatten(jax.eval_shape(model.init, _key(), jax.ShapeDtypeStruct((1, 63, 63, 3), jnp.float32)))
    names = pretrained.ALEXNET_TORCHVISION
    state_dict = {names.key(path): np.zeros(names.layout(path, leaf.shape).torch_shape(leaf.shape), np.float32)
                  for path, leaf in shapes.items()}
    assert pretrained.model_options(state_dict, 'alexnet') == {'num_classes': 7, 'width': 1 / 16}


# ---------------------------------------------------------------------------------------------
# Position embeddings at another image size


def test_position_embeddings_are_resized_for_another_image_size():
    state_dict = _state_dict(_timm())
    state_dict['pos_embed'][:, 1:] = 0.25  # a constant grid
    variables = pretrained.from_torch(state_dict, 'vit', num_heads=HEADS, image_size=32)
    positions = variables['params']['pos_embedding']
    assert positions.shape == (1, 1 + (32 // PATCH) ** 2, WIDTH)
    np.testing.assert_array_equal(positions[:, 0], state_dict['pos_embed'][:, 0])  # the class token's row kept
    np.testing.assert_allclose(positions[:, 1:], 0.25, rtol=1e-6)  # a constant grid stays constant
    model = models.get('vit', **pretrained.model_options(state_dict, 'vit', num_heads=HEADS))
    assert model.apply(variables, _images(32)).shape == (2, NUM_CLASSES)
    # Bilinear with the corners aligned (big_vision's resample_posemb): corners kept, a ramp stays a ramp.
    ramp = np.arange(4, dtype=np.float32)[None, :, None] * np.ones((4, 1, WIDTH), np.float32)  # (4, 4, width): x
    state_dict['pos_embed'][:, 1:] = ramp.reshape(1, 16, WIDTH)
    grid = pretrained.from_torch(state_dict, 'vit', num_heads=HEADS, image_size=(16, 28))['params']['pos_embedding']
    np.testing.assert_allclose(grid[0, 1:, 0].reshape(4, 7), np.tile(np.linspace(0, 3, 7), (4, 1)), atol=1e-5)


def test_big_vision_positions_without_a_class_row_are_resized_too(tmp_path):
    params = _as_big_vision(_state_dict(_timm()))
    variables = pretrained.from_big_vision(params, num_heads=HEADS, image_size=8)
    np.testing.assert_array_equal(variables['params']['pos_embedding'][:, 0], 0)  # its class token has no position
    np.testing.assert_allclose(variables['params']['pos_embedding'][0, 1:],  # 4x4 -> 2x2: the corners
                               params['params/pos_embedding'][0, [0, 3, 12, 15]], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Strictness


def _error(function, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        function(*args, **kwargs)
    assert '\n' not in str(info.value)
    return str(info.value)


def test_missing_tensor_names_key_path_and_shape():
    state_dict = _state_dict(_timm())
    del state_dict['blocks.1.mlp.fc2.bias']
    message = _error(pretrained.from_torch, state_dict, 'vit', num_heads=HEADS)
    assert "'blocks.1.mlp.fc2.bias' is missing (for params/block1/mlp/fc2/bias: torch shape (32,))" in message


def test_misshaped_fused_qkv_names_both_shapes_once():
    state_dict = _state_dict(_timm())
    state_dict['blocks.0.attn.qkv.weight'] = np.zeros((64, WIDTH), np.float32)
    message = _error(pretrained.from_torch, state_dict, 'vit', num_heads=HEADS)
    assert ("'blocks.0.attn.qkv.weight' has shape (64, 32), but params/block0/attention/query/kernel needs torch "
            "shape (96, 32) (Flax shape (32, 2, 16))") in message
    assert message.count('qkv.weight') == 1


def test_extra_and_misshaped_big_vision_tensors_are_errors():
    params = _as_big_vision(_state_dict(_timm()))
    params['params/Transformer/encoderblock_0/LayerNorm_9/scale'] = np.ones(WIDTH, np.float32)
    assert "'params/Transformer/encoderblock_0/LayerNorm_9/scale' (shape (32,)) has no place in the model" in \
        _error(pretrained.from_big_vision, params, num_heads=HEADS)
    params = _as_big_vision(_state_dict(_timm()))
    params['params/head/kernel'] = np.zeros((WIDTH + 1, NUM_CLASSES), np.float32)
    assert ("'params/head/kernel' has shape (33, 5), but params/head/kernel needs big_vision shape (32, 5)"
            in _error(pretrained.from_big_vision, params, num_heads=HEADS))


def test_heads_unknown_or_contradicted_are_errors():
    state_dict = _state_dict(_timm())
    message = _error(pretrained.from_torch, state_dict, 'vit')
    assert 'number of attention heads is in no tensor' in message and 'width 32, depth 2, mlp_dim 64' in message
    assert 'pass num_heads=' in message
    # A variant is checked against the file, not forced on it: mu has 1 block and an MLP of 128.
    message = _error(pretrained.from_torch, state_dict, 'vit', variant='mu/4')
    assert ("'blocks.0.mlp.fc1.weight' has shape (64, 32), but params/block0/mlp/fc1/kernel needs torch shape "
            "(128, 32)") in message
    assert 'width=32 is not a multiple of num_heads=3' in _error(pretrained.from_torch, state_dict, 'vit',
                                                                 num_heads=3)
    assert "only for name='vit'" in _error(pretrained.from_torch, state_dict, 'resnet18', num_heads=2)


def test_unsupported_timm_pooling_and_wrong_files_are_errors(tmp_path):
    state_dict = _state_dict(_timm())
    state_dict['fc_norm.weight'] = state_dict.pop('norm.weight')  # a class token and fc_norm: timm's 'avg' + token
    state_dict['fc_norm.bias'] = state_dict.pop('norm.bias')
    assert "both 'cls_token' and 'fc_norm.weight'" in _error(pretrained.from_torch, state_dict, 'vit', num_heads=2)
    np.savez(tmp_path / 'vit.npz', x=np.zeros(1, np.float32))
    assert 'from_big_vision' in _error(pretrained.from_torch, tmp_path / 'vit.npz', 'vit')
    message = _error(pretrained.from_torch, _state_dict(_torchvision()), 'resnet18')
    assert "'conv1.weight' is missing" in message  # weights of another architecture name the first missing key
    (tmp_path / 'broken.npz').write_bytes(b'PK\x03\x04 not a zip')
    assert 'cannot read it as a .npz archive' in _error(pretrained.from_big_vision, tmp_path / 'broken.npz')


# ---------------------------------------------------------------------------------------------
# Sharded placement


def test_sharded_placement_puts_each_leaf_on_its_devices():
    mesh = Mesh(np.array(jax.devices()), ('data',))
    replicated, split_out = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, 'data'))

    def sharding(path: str, shape) -> NamedSharding:  # MLP kernels split over their output units
        return split_out if '/mlp/' in path and path.endswith('kernel') and shape[1] % mesh.size == 0 else replicated

    state_dict = _state_dict(_timm())
    on_host = flatten(pretrained.from_torch(state_dict, 'vit', num_heads=HEADS))
    placed = flatten(pretrained.from_torch(state_dict, 'vit', num_heads=HEADS, sharding=sharding))
    assert placed[('params', 'block0', 'mlp', 'fc1', 'kernel')].sharding == split_out
    assert placed[('params', 'block0', 'attention', 'query', 'kernel')].sharding == replicated
    for path, leaf in placed.items():
        np.testing.assert_array_equal(np.asarray(leaf), on_host[path])
