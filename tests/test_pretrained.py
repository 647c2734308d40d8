"""growjax.pretrained.from_torch: parity with PyTorch forward passes, strictness, files, sharding, growth.

The PyTorch reference networks below are written out with torchvision's module names (torchvision
itself is too heavy to install), at a width multiplier so that random-weight state dicts are tiny.
Weights are He-scaled and BatchNorm statistics random, so logits are O(1) and every tensor matters.
Each Flax forward pass is jitted once per architecture and shared; XLA compiling is most of the time.
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from torch import nn as tnn

from growjax import config_lib, models, pretrained, steps
from growjax.errors import UserError
from growjax.groups import forward_order, param_labels, split, trainable_mask
from growjax.grow import flatten, grow_params
from growjax.models.growth import Growth
from growjax.train import load_pretrained

WIDTH = 1 / 16
NUM_CLASSES = 7
# AlexNet at 95 px and VGG16 at 64 px end their trunks in 2x2 maps, so fc6 sees a 6x6 / 7x7 grid that
# varies over height and width: a wrong flatten order (CHW vs HWC, or H and W swapped) changes the logits.
INPUT_SIZE = {'alexnet': 95, 'vgg16': 64, 'resnet18': 32, 'resnet50': 48}
NAMES = tuple(INPUT_SIZE)


def _channels(base: int) -> int:
    return max(1, int(round(base * WIDTH)))


# ---------------------------------------------------------------------------------------------
# PyTorch references with torchvision's module names


class TorchAlexNet(tnn.Module):
    def __init__(self):
        super().__init__()
        c = _channels
        self.features = tnn.Sequential(
            tnn.Conv2d(3, c(64), 11, stride=4, padding=2), tnn.ReLU(), tnn.MaxPool2d(3, 2),
            tnn.Conv2d(c(64), c(192), 5, padding=2), tnn.ReLU(), tnn.MaxPool2d(3, 2),
            tnn.Conv2d(c(192), c(384), 3, padding=1), tnn.ReLU(),
            tnn.Conv2d(c(384), c(256), 3, padding=1), tnn.ReLU(),
            tnn.Conv2d(c(256), c(256), 3, padding=1), tnn.ReLU(), tnn.MaxPool2d(3, 2))
        self.avgpool = tnn.AdaptiveAvgPool2d((6, 6))
        self.classifier = tnn.Sequential(
            tnn.Dropout(), tnn.Linear(c(256) * 6 * 6, c(4096)), tnn.ReLU(),
            tnn.Dropout(), tnn.Linear(c(4096), c(4096)), tnn.ReLU(), tnn.Linear(c(4096), NUM_CLASSES))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class TorchVGG16(tnn.Module):
    def __init__(self):
        super().__init__()
        layers, channels = [], 3
        for block in ([64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]):
            for out in map(_channels, block):
                layers += [tnn.Conv2d(channels, out, 3, padding=1), tnn.ReLU()]
                channels = out
            layers.append(tnn.MaxPool2d(2, 2))
        self.features = tnn.Sequential(*layers)
        self.avgpool = tnn.AdaptiveAvgPool2d((7, 7))
        self.classifier = tnn.Sequential(
            tnn.Linear(channels * 7 * 7, _channels(4096)), tnn.ReLU(), tnn.Dropout(),
            tnn.Linear(_channels(4096), _channels(4096)), tnn.ReLU(), tnn.Dropout(),
            tnn.Linear(_channels(4096), NUM_CLASSES))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class TorchBasicBlock(tnn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride, downsample):
        super().__init__()
        self.conv1 = tnn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchBottleneck(tnn.Module):
    """torchvision's v1.5 bottleneck: the stride is on the 3x3 conv."""
    expansion = 4

    def __init__(self, inplanes, planes, stride, downsample):
        super().__init__()
        self.conv1 = tnn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = tnn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(torch.relu(self.bn2(self.conv2(out)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(tnn.Module):
    def __init__(self, block, stage_sizes):
        super().__init__()
        self.conv1 = tnn.Conv2d(3, _channels(64), 7, 2, 3, bias=False)
        self.bn1 = tnn.BatchNorm2d(_channels(64))
        self.maxpool = tnn.MaxPool2d(3, 2, 1)
        inplanes = _channels(64)
        for stage, blocks in enumerate(stage_sizes):
            planes, stride = _channels(64 * 2 ** stage), 1 if stage == 0 else 2
            layer = []
            for index in range(blocks):
                downsample = None
                if index == 0 and (stride != 1 or inplanes != planes * block.expansion):
                    downsample = tnn.Sequential(tnn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
                                                tnn.BatchNorm2d(planes * block.expansion))
                layer.append(block(inplanes, planes, stride if index == 0 else 1, downsample))
                inplanes = planes * block.expansion
            setattr(self, f'layer{stage + 1}', tnn.Sequential(*layer))
        self.fc = tnn.Linear(inplanes, NUM_CLASSES)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        for stage in range(1, 5):
            x = getattr(self, f'layer{stage}')(x)
        return self.fc(torch.flatten(x.mean(dim=(2, 3)), 1))


TORCH_MODELS = {
    'alexnet': TorchAlexNet,
    'vgg16': TorchVGG16,
    'resnet18': functools.partial(TorchResNet, TorchBasicBlock, (2, 2, 2, 2)),
    'resnet50': functools.partial(TorchResNet, TorchBottleneck, (3, 4, 6, 3)),
}


@functools.cache
def _torch_model(name: str) -> tnn.Module:
    """The reference in eval mode with random He-scaled weights and random BatchNorm statistics."""
    torch.manual_seed(0)
    model = TORCH_MODELS[name]()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (tnn.Conv2d, tnn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.1)
            elif isinstance(module, tnn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
        for module in model.modules():  # small residual branches, as in trained ResNets: logits stay O(1)
            if isinstance(module, (TorchBasicBlock, TorchBottleneck)):
                (module.bn2 if isinstance(module, TorchBasicBlock) else module.bn3).weight.uniform_(0.1, 0.3)
    return model.eval()


def _state_dict(name: str) -> dict[str, np.ndarray]:
    """torchvision-format state dict (num_batches_tracked included) as numpy arrays."""
    return {key: value.numpy().copy() for key, value in _torch_model(name).state_dict().items()}


@functools.cache
def _images(name: str) -> np.ndarray:
    """NHWC float32 images."""
    size = INPUT_SIZE[name]
    return np.random.default_rng(0).standard_normal((2, size, size, 3)).astype(np.float32)


def _torch_logits(name: str) -> np.ndarray:
    with torch.no_grad():
        return _torch_model(name)(torch.from_numpy(_images(name).transpose(0, 3, 1, 2))).numpy()


def _model(name: str):
    return models.get(name, num_classes=NUM_CLASSES, width=WIDTH)


@functools.cache
def _forward(name: str):
    return jax.jit(_model(name).apply)


def _max_abs_diff(name: str, variables) -> float:
    return float(np.max(np.abs(np.asarray(_forward(name)(variables, _images(name))) - _torch_logits(name))))


def _assert_same_tree(actual, expected):
    actual, expected = flatten(actual), flatten(expected)
    assert actual.keys() == expected.keys()
    for path in expected:
        np.testing.assert_array_equal(np.asarray(actual[path]), np.asarray(expected[path]), err_msg=str(path))


# ---------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize('name', NAMES)
def test_logits_match_pytorch(name):
    variables = pretrained.from_torch(_torch_model(name).state_dict(), name)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda leaf: leaf.dtype == np.float32, variables))
    assert np.std(_torch_logits(name)) > 0.1  # not vacuous: logits of a scale that errors would show in
    assert _max_abs_diff(name, variables) < 1e-4


def test_resnet_batch_norm_statistics_go_to_batch_stats():
    variables = pretrained.from_torch(_state_dict('resnet50'), 'resnet50')
    torch_model = _torch_model('resnet50')
    np.testing.assert_array_equal(variables['batch_stats']['stage3_block0']['downsample_bn']['var'],
                                  torch_model.layer3[0].downsample[1].running_var.numpy())
    np.testing.assert_array_equal(variables['params']['stage2_block1']['bn3']['scale'],
                                  torch_model.layer2[1].bn3.weight.detach().numpy())


def test_imagenet_normalisation_is_what_the_presets_use():
    assert (pretrained.IMAGENET_MEAN, pretrained.IMAGENET_STD) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    for preset in ('alexnet_flowers102', 'vgg16_sun397', 'resnet50_mit67'):
        config = config_lib.apply_preset(config_lib.base_config(), preset)
        assert (config.data.mean, config.data.std) == (pretrained.IMAGENET_MEAN, pretrained.IMAGENET_STD)


# ---------------------------------------------------------------------------------------------
# Other key conventions and file formats


def _as_timm_vgg16(state_dict):
    """timm's VGG naming (its _filter_fn): fc6 as a 7x7 conv, fc7 as a 1x1 conv, the classifier as head.fc."""
    renames = {'classifier.0': 'pre_logits.fc1', 'classifier.3': 'pre_logits.fc2', 'classifier.6': 'head.fc'}
    timm = {}
    for key, value in state_dict.items():
        module, _, tensor = key.rpartition('.')
        if key == 'classifier.0.weight':
            value = value.reshape(value.shape[0], -1, 7, 7)
        elif key == 'classifier.3.weight':
            value = value.reshape(*value.shape, 1, 1)
        timm[f'{renames.get(module, module)}.{tensor}'] = value
    return timm


def _as_transformers_resnet(state_dict):
    """Hugging Face transformers' ResNetForImageClassification naming."""
    def rename(key):
        key = re.sub(r'^conv1\.', 'resnet.embedder.embedder.convolution.', key)
        key = re.sub(r'^bn1\.', 'resnet.embedder.embedder.normalization.', key)
        key = re.sub(r'^fc\.', 'classifier.1.', key)
        key = re.sub(r'^layer(\d)\.(\d+)\.', lambda m: f'resnet.encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.', key)
        key = re.sub(r'\.conv(\d)\.', lambda m: f'.layer.{int(m[1]) - 1}.convolution.', key)
        key = re.sub(r'\.bn(\d)\.', lambda m: f'.layer.{int(m[1]) - 1}.normalization.', key)
        key = key.replace('.downsample.0.', '.shortcut.convolution.')
        return key.replace('.downsample.1.', '.shortcut.normalization.')
    return {rename(key): value for key, value in state_dict.items()}


@pytest.mark.parametrize('name, convert', [('vgg16', _as_timm_vgg16), ('resnet50', _as_transformers_resnet)])
def test_timm_and_transformers_names_give_the_same_variables(name, convert):
    state_dict = _state_dict(name)
    renamed = convert(state_dict)
    assert not set(renamed) & {'classifier.0.weight', 'conv1.weight'}  # the conversion did rename
    _assert_same_tree(pretrained.from_torch(renamed, name), pretrained.from_torch(state_dict, name))


def test_safetensors_and_pth_files_give_the_same_variables(tmp_path):
    state_dict = _state_dict('resnet18')
    expected = pretrained.from_torch(state_dict, 'resnet18')
    safetensors.numpy.save_file(state_dict, tmp_path / 'resnet18.safetensors')
    torch_state_dict = _torch_model('resnet18').state_dict()
    torch.save(torch_state_dict, tmp_path / 'resnet18.pth')
    torch.save(torch_state_dict, tmp_path / 'legacy.pt', _use_new_zipfile_serialization=False)  # 2017-era files
    for file in ('resnet18.safetensors', 'resnet18.pth', 'legacy.pt'):
        _assert_same_tree(pretrained.from_torch(tmp_path / file, 'resnet18'), expected)


# ---------------------------------------------------------------------------------------------
# Strictness


def _error(state_dict, name, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        pretrained.from_torch(state_dict, name, **kwargs)
    assert '\n' not in str(info.value)
    return str(info.value)


def test_missing_tensor_is_an_error_naming_key_path_and_shape():
    state_dict = _state_dict('vgg16')
    del state_dict['features.28.bias']
    message = _error(state_dict, 'vgg16')
    assert "'features.28.bias' is missing (for params/conv5_3/bias: torch shape (32,))" in message


def test_extra_tensor_is_an_error():
    state_dict = {**_state_dict('alexnet'), 'classifier.7.weight': np.zeros((3, 3), np.float32)}
    assert "'classifier.7.weight' (shape (3, 3)) has no place in the model" in _error(state_dict, 'alexnet')


def test_misshaped_tensor_is_an_error_naming_both_shapes():
    state_dict = _state_dict('resnet18')
    state_dict['layer2.0.downsample.0.weight'] = np.zeros((8, 4, 3, 3), np.float32)
    message = _error(state_dict, 'resnet18')
    assert ("'layer2.0.downsample.0.weight' has shape (8, 4, 3, 3), but params/stage2_block0/downsample_conv/kernel "
            "needs torch shape (8, 4, 1, 1) (Flax shape (1, 1, 4, 8))") in message


def test_width_other_than_the_files_is_an_error():
    message = _error(_state_dict('alexnet'), 'alexnet', width=2 * WIDTH)
    assert "'features.0.weight' has shape (4, 3, 11, 11), but params/conv1/kernel needs torch shape (8, 3, 11, 11)" \
        in message
    assert 'width 0.125' in message


def test_weights_of_another_architecture_name_the_first_mismatching_key():
    message = _error(_state_dict('resnet18'), 'vgg16')
    assert message.startswith('the state dict does not hold growjax vgg16')
    assert "'features.0.weight' is missing" in message.split(';')[0]


def test_non_float_tensor_and_unsupported_model_are_errors():
    state_dict = {**_state_dict('resnet18'), 'fc.bias': np.zeros(NUM_CLASSES, np.int64)}
    assert "'fc.bias' holds int64 values" in _error(state_dict, 'resnet18')
    assert 'supported' in _error(_state_dict('resnet18'), 'small_cnn')


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_damaged_file_is_a_one_line_error_naming_it(tmp_path, suffix):
    path = tmp_path / f'resnet18{suffix}'
    if suffix == '.pth':
        torch.save(_torch_model('resnet18').state_dict(), path)
    else:
        safetensors.numpy.save_file(_state_dict('resnet18'), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    message = _error(path, 'resnet18')
    assert message.startswith(f'{path}: cannot read') and 'download it again' in message
    assert _error(tmp_path / 'absent.pth', 'resnet18') == f'{tmp_path / "absent.pth"}: no such weights file.'


# ---------------------------------------------------------------------------------------------
# The command line and sharded placement


def test_load_pretrained_converts_weight_files(tmp_path):
    path = tmp_path / 'resnet18-weights.pth'
    torch.save(_torch_model('resnet18').state_dict(), path)
    config = config_lib.base_config()
    config.model.name, config.model.width, config.init.pretrained = 'resnet18', WIDTH, str(path)
    _assert_same_tree(load_pretrained(config), pretrained.from_torch(_state_dict('resnet18'), 'resnet18'))
    replicated = NamedSharding(Mesh(np.array(jax.devices()), ('data',)), P())
    placed = load_pretrained(config, replicated)  # as main.py does: each leaf onto the mesh as converted
    assert all(leaf.sharding == replicated for leaf in jax.tree_util.tree_leaves(placed))
    _assert_same_tree(jax.device_get(placed), pretrained.from_torch(_state_dict('resnet18'), 'resnet18'))
    config.model.name = 'vgg16'  # weights of another architecture: one line naming the first key
    with pytest.raises(UserError, match=r"does not hold growjax vgg16 .*'features\.0\.weight' is missing"):
        load_pretrained(config)


def test_sharded_placement_puts_each_leaf_on_its_devices():
    mesh = Mesh(np.array(jax.devices()), ('data',))
    replicated = NamedSharding(mesh, P())
    split_out = NamedSharding(mesh, P(None, 'data'))

    def sharding(path: str, shape) -> NamedSharding:  # dense kernels split over their output units
        return split_out if path.endswith('kernel') and len(shape) == 2 and shape[1] % mesh.size == 0 else replicated

    state_dict = _state_dict('alexnet')
    on_host = flatten(pretrained.from_torch(state_dict, 'alexnet'))
    placed = flatten(pretrained.from_torch(state_dict, 'alexnet', sharding=sharding))
    assert placed[('params', 'fc6', 'kernel')].sharding == split_out
    assert placed[('params', 'conv1', 'kernel')].sharding == replicated
    for path, leaf in placed.items():
        assert leaf.sharding == sharding('/'.join(path), leaf.shape)
        np.testing.assert_array_equal(np.asarray(leaf), on_host[path])
    everywhere = pretrained.from_torch(state_dict, 'alexnet', sharding=replicated)
    assert all(leaf.sharding == replicated for leaf in jax.tree_util.tree_leaves(everywhere))


# ---------------------------------------------------------------------------------------------
# Growing and training from converted weights


@pytest.mark.parametrize('name, growth, regime', [('vgg16', Growth.wa(8), 'fc6_new'),
                                                   ('resnet50', Growth(widen={'stage4': 4}), 'stage4_new')])
def test_grown_model_from_converted_weights_trains(name, growth, regime):
    converted = pretrained.from_torch(_state_dict(name), name)
    model = models.get(name, num_classes=3, growth=growth, width=WIDTH,
                       **({'dropout_rate': 0.0} if 'dropout_rate' in models.options(name) else {}))
    rng, key = np.random.default_rng(1), jax.random.key(0, impl='rbg')
    batch = {'image': jnp.asarray(rng.standard_normal((8, 32, 32, 3)), jnp.float32),
             'label': jnp.asarray(rng.integers(0, 3, 8), jnp.int32)}
    # Jitted as the main job does: XLA then drops the init of every leaf that the graft overwrites.
    grown = jax.jit(lambda p, k, x: grow_params(p, model, k, x, reinit='^classifier/'))(converted, key,
                                                                                          batch['image'][:1])
    kept = {path: leaf for path, leaf in flatten(converted).items() if path[1] != 'classifier'}
    _assert_same_tree({path: flatten(grown)[path] for path in kept}, kept)

    labels = param_labels(grown['params'], converted['params'], reinit='^classifier/')
    # A paper regime: the backward pass stops below fc6 / stage4, which keeps XLA's compile short.
    mask = trainable_mask(labels, regime, forward_order(_model(name), key, batch['image'][:1]))
    optimizer = steps.make_optimizer(split(labels, mask)[0], learning_rate=1e-3, momentum=0.9, weight_decay=5e-4,
                                     new_lr_multiplier=10)
    state = steps.create_state(grown, mask, optimizer)
    train_step = jax.jit(steps.make_train_step(model, optimizer, key))
    losses = []
    for _ in range(6):
        state, metrics = train_step(state, batch)
        losses.append(float(metrics['loss']))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def test_vit_presets_read_a_vit_b16_at_224_in_minus_one_to_one():
    config = config_lib.apply_preset(config_lib.family_config('vit'), 'vit_flowers102')
    assert config.model.name == 'vit' and config.model.vit.variant == 'B/16' and config.model.vit.width == 0
    assert config.data.image_size == 224 and (config.data.mean, config.data.std) == ((0.5,) * 3, (0.5,) * 3)
    assert tuple(config.init.reinit) == ('^head/',) and config.model.dropout_rate == 0.0
    with pytest.raises(config_lib.ConfigError, match='init.pretrained: a ViT-B/16 checkpoint'):
        config_lib.validate(config)
