"""Published PyTorch weights (torchvision, timm, Hugging Face) as growjax variables.

`from_torch(state_dict_or_path, name)` converts the ImageNet weights the paper and today's users
start from into the variables of `growjax.models.get(name, ...)` for 'alexnet', 'vgg16',
'resnet18' and 'resnet50':

- conv kernels OIHW -> HWIO and dense kernels (out, in) -> (in, out);
- fc6, the first dense layer after the conv trunk, has its input rows permuted: torch flattens the
  pooled map as (C, H, W), growjax's NHWC map flattens as (H, W, C);
- BatchNorm weight/bias -> params scale/bias, running_mean/running_var -> batch_stats mean/var
  (`num_batches_tracked`, a step counter torch uses only when its momentum is None, is ignored);
- floating tensors become float32.

It is strict: a tensor the model lacks, a leaf the file lacks, or a shape that differs is an error
naming the torch key, the Flax path and both shapes; nothing is filled in or dropped silently.
The width and the number of classes are read from the tensors (the first conv, the classifier).

The models expect NHWC RGB images in [0, 1] normalised with IMAGENET_MEAN / IMAGENET_STD (what
the presets in configs/ set as data.mean / data.std).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import zipfile
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from growjax import models
from growjax.config_lib import IMAGENET_MEAN, IMAGENET_STD
from growjax.errors import UserError
from growjax.grow import Path, flatten, path_str, unflatten
from growjax.models.alexnet import MIN_INPUT_SIZE as ALEXNET_MIN_INPUT_SIZE
from growjax.models.vgg import MIN_INPUT_SIZE as VGG_MIN_INPUT_SIZE

__all__ = ['IMAGENET_MEAN', 'IMAGENET_STD', 'PretrainedError', 'SUPPORTED', 'WEIGHT_FILE_SUFFIXES', 'from_torch']

WEIGHT_FILE_SUFFIXES = ('.pth', '.pt', '.bin', '.safetensors')  # .bin: Hugging Face's pytorch_model.bin

Shape = tuple[int, ...]
Sharding = jax.sharding.Sharding

# The first conv of every supported model has 64 channels at width 1: the file's count gives the width.
_BASE_CHANNELS = 64
_FIRST_CONV = {'alexnet': 'conv1', 'vgg16': 'conv1_1', 'resnet18': 'stem_conv', 'resnet50': 'stem_conv'}
# Any input at least this large gives every parameter its shape (AlexNet and VGG pool adaptively).
_SAMPLE_SIZE = {'alexnet': ALEXNET_MIN_INPUT_SIZE, 'vgg16': VGG_MIN_INPUT_SIZE, 'resnet18': 32, 'resnet50': 32}


class PretrainedError(UserError):
    """Weights that cannot be read, or that do not fit the model (missing, extra, mis-shaped tensors)."""


# ---------------------------------------------------------------------------------------------
# Layouts: how torch stores what a Flax leaf holds


@dataclasses.dataclass(frozen=True)
class Layout:
    """The torch shape a Flax leaf's shape asks for, and the conversion of torch's array to Flax's."""
    torch_shape: Callable[[Shape], Shape]
    to_flax: Callable[[np.ndarray], np.ndarray]


AS_IS = Layout(lambda shape: shape, lambda array: array)
# Both frameworks cross-correlate, so a conv kernel is only transposed, never flipped.
CONV = Layout(lambda s: (s[3], s[2], s[0], s[1]), lambda array: array.transpose(2, 3, 1, 0))
DENSE = Layout(lambda s: (s[1], s[0]), lambda array: array.T)
# timm's VGG keeps fc7 as a 1x1 conv: the same matrix with two unit axes.
DENSE_AS_1X1_CONV = Layout(lambda s: (s[1], s[0], 1, 1), lambda array: array[:, :, 0, 0].T)


def first_dense(grid: tuple[int, int], conv_shaped: bool = False) -> Layout:
    """fc6 after the conv trunk's (H, W) = `grid` pooled map, C channels.

    torch flattens the map channel-major (row c*H*W + h*W + w), growjax's NHWC map as (h, w, c), so
    the rows are permuted. timm stores the same tensor as a conv of the grid's size (out, C, H, W).
    """
    height, width = grid

    def torch_shape(shape: Shape) -> Shape:
        channels = shape[0] // (height * width)
        return (shape[1], channels, height, width) if conv_shaped else (shape[1], channels * height * width)

    def to_flax(array: np.ndarray) -> np.ndarray:
        out = array.shape[0]
        return array.reshape(out, -1, height, width).transpose(2, 3, 1, 0).reshape(-1, out)

    return Layout(torch_shape, to_flax)


# ---------------------------------------------------------------------------------------------
# Key conventions: the names each family of published files uses

# (collection, Flax leaf) -> torch's tensor name within its module.
_TENSOR_NAMES = {('params', 'kernel'): 'weight', ('params', 'bias'): 'bias', ('params', 'scale'): 'weight',
                 ('batch_stats', 'mean'): 'running_mean', ('batch_stats', 'var'): 'running_var'}


@dataclasses.dataclass(frozen=True)
class KeyConvention:
    """How one family of files names (and lays out) the tensors of a growjax model."""
    name: str
    module_name: Callable[[Path], str]    # Flax module path, e.g. ('stage1_block0', 'conv1') -> torch module
    kernel_layouts: Mapping[str, Layout]  # Flax module -> its kernel's layout, where not plain CONV / DENSE

    def key(self, path: Path) -> str:
        """The state-dict key of the Flax leaf `path` (('params', 'fc6', 'kernel'))."""
        return f'{self.module_name(path[1:-1])}.{_TENSOR_NAMES[path[0], path[-1]]}'

    def layout(self, path: Path, shape: Shape) -> Layout:
        if path[-1] != 'kernel':
            return AS_IS
        return self.kernel_layouts.get(path_str(path[1:-1])) or (CONV if len(shape) == 4 else DENSE)


def _renamed(names: Mapping[str, str]) -> Callable[[Path], str]:
    return lambda module: names[path_str(module)]


_ALEXNET_CONVS = ('conv1', 'conv2', 'conv3', 'conv4', 'conv5')
_VGG16_CONVS = tuple(f'conv{block}_{index}' for block, convs in enumerate((2, 2, 3, 3, 3), 1)
                     for index in range(1, convs + 1))
# torchvision's `features` Sequential: indices of the convs between ReLUs and max-pools.
_ALEXNET_FEATURES = dict(zip(_ALEXNET_CONVS, (f'features.{i}' for i in (0, 3, 6, 8, 10))))
_VGG16_FEATURES = dict(zip(_VGG16_CONVS, (f'features.{i}' for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28))))

ALEXNET_TORCHVISION = KeyConvention(
    'torchvision', _renamed({**_ALEXNET_FEATURES, 'fc6': 'classifier.1', 'fc7': 'classifier.4',
                             'classifier': 'classifier.6'}),
    {'fc6': first_dense((6, 6))})
VGG16_TORCHVISION = KeyConvention(
    'torchvision', _renamed({**_VGG16_FEATURES, 'fc6': 'classifier.0', 'fc7': 'classifier.3',
                             'classifier': 'classifier.6'}),
    {'fc6': first_dense((7, 7))})
# timm (e.g. timm/vgg16.tv_in1k): torchvision's tensors, fc6/fc7 reshaped into convs (timm's VGG _filter_fn).
VGG16_TIMM = KeyConvention(
    'timm', _renamed({**_VGG16_FEATURES, 'fc6': 'pre_logits.fc1', 'fc7': 'pre_logits.fc2', 'classifier': 'head.fc'}),
    {'fc6': first_dense((7, 7), conv_shaped=True), 'fc7': DENSE_AS_1X1_CONV})


def _block(module: str) -> tuple[int, int]:
    """'stage2_block0' -> (2, 0)."""
    stage, index = re.fullmatch(r'stage(\d)_block(\d+)', module).groups()
    return int(stage), int(index)


def _torchvision_resnet_module(module: Path) -> str:
    if len(module) == 1:
        return {'stem_conv': 'conv1', 'stem_bn': 'bn1', 'classifier': 'fc'}[module[0]]
    (stage, index), layer = _block(module[0]), module[1]
    layer = {'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1'}.get(layer, layer)
    return f'layer{stage}.{index}.{layer}'


def _transformers_resnet_module(module: Path) -> str:
    """Hugging Face transformers' ResNetForImageClassification (e.g. microsoft/resnet-50)."""
    if len(module) == 1:
        return {'stem_conv': 'resnet.embedder.embedder.convolution',
                'stem_bn': 'resnet.embedder.embedder.normalization', 'classifier': 'classifier.1'}[module[0]]
    (stage, index), layer = _block(module[0]), module[1]
    kind = 'convolution' if 'conv' in layer else 'normalization'
    prefix = f'resnet.encoder.stages.{stage - 1}.layers.{index}'
    if layer.startswith('downsample'):
        return f'{prefix}.shortcut.{kind}'
    return f'{prefix}.layer.{int(layer[-1]) - 1}.{kind}'  # conv1/bn1 -> layer.0


# torchvision's ResNet names are timm's too (e.g. timm/resnet50.a1_in1k).
RESNET_TORCHVISION = KeyConvention('torchvision/timm', _torchvision_resnet_module, {})
RESNET_TRANSFORMERS = KeyConvention('transformers', _transformers_resnet_module, {})

CONVENTIONS = {
    'alexnet': (ALEXNET_TORCHVISION,),
    'vgg16': (VGG16_TORCHVISION, VGG16_TIMM),
    'resnet18': (RESNET_TORCHVISION, RESNET_TRANSFORMERS),
    'resnet50': (RESNET_TORCHVISION, RESNET_TRANSFORMERS),
}
SUPPORTED = tuple(CONVENTIONS)


# ---------------------------------------------------------------------------------------------
# Reading tensors one at a time


@dataclasses.dataclass(frozen=True)
class _Tensors:
    """A state dict's shapes, and a loader of one float32 tensor at a time (files stay mapped until then)."""
    source: str  # for messages: the file, or 'the state dict'
    shapes: Mapping[str, Shape]
    load: Callable[[str], np.ndarray]


@contextlib.contextmanager
def _reading(path: str, what: str) -> Iterator[None]:
    """Any failure to read turns into one line naming the file (damaged files fail in many ways)."""
    try:
        yield
    except Exception as err:
        detail = ' '.join(str(err).split()).split('. ')[0][:200]
        raise PretrainedError(f'{path}: cannot read {what} ({type(err).__name__}: {detail}); the file is damaged '
                              'or incomplete: download it again.') from err


def _float32(value: Any, key: str, source: str) -> np.ndarray:
    """A floating tensor (torch or numpy) as a float32 numpy array, without a copy where it is one."""
    if hasattr(value, 'detach'):  # a torch.Tensor; torch itself is imported only to read .pth files
        value = value.detach().cpu()
        value = (value.float() if value.is_floating_point() else value).numpy()
    array = np.asarray(value)
    if array.dtype.kind != 'f':
        raise PretrainedError(f'{source}: {key!r} holds {array.dtype} values, not floating-point weights.')
    return array.astype(np.float32, copy=False)


def _in_memory(state_dict: Mapping[str, Any], source: str = 'the state dict') -> _Tensors:
    return _Tensors(source, {key: tuple(value.shape) for key, value in state_dict.items()},
                    lambda key: _float32(state_dict[key], key, source))


def _torch_state_dict(path: str) -> Mapping[str, Any]:
    """torch.load of a state dict; zip-format files (torch >= 1.6) are memory-mapped, not read whole."""
    try:
        import torch  # only .pth/.pt/.bin files need PyTorch
    except ImportError:
        raise PretrainedError(f'{path}: reading PyTorch files needs torch (python3 -m pip install torch, the CPU '
                              'wheel is enough), or convert the file to .safetensors.') from None
    with _reading(path, 'it as a PyTorch state dict'):
        state_dict = torch.load(path, map_location='cpu', weights_only=True, mmap=zipfile.is_zipfile(path))
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise PretrainedError(f'{path} holds a {type(state_dict).__name__}, not a state dict of tensors: save '
                              "`model.state_dict()` (a training checkpoint's weights are often under 'state_dict').")
    return state_dict


@contextlib.contextmanager
def _safetensors(path: str) -> Iterator[_Tensors]:
    from safetensors import safe_open  # numpy only: no torch needed

    with _reading(path, 'it as a .safetensors file'):  # the header check also catches truncated files
        handle = safe_open(path, framework='numpy')
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    with handle:
        yield _Tensors(path, shapes, lambda key: _float32(handle.get_tensor(key), key, path))


@contextlib.contextmanager
def _open(state_dict_or_path) -> Iterator[_Tensors]:
    if isinstance(state_dict_or_path, Mapping):
        yield _in_memory(state_dict_or_path)
        return
    path = os.fspath(state_dict_or_path)
    if not os.path.isfile(path):
        raise PretrainedError(f'{path}: no such weights file.')
    if path.endswith('.safetensors'):
        with _safetensors(path) as tensors:
            yield tensors
        return
    state_dict = _torch_state_dict(path)
    yield _in_memory(state_dict, source=path)


# ---------------------------------------------------------------------------------------------
# Matching a state dict to a model


def _sample_input(name: str) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((1, _SAMPLE_SIZE[name], _SAMPLE_SIZE[name], 3), jnp.float32)


def _variable_shapes(model, name: str) -> dict[Path, Shape]:
    """The model's leaf shapes in the order its forward pass creates them, so that errors name the
    lowest layer first. Only traced; the order is read inside the trace (pytrees sort their keys)."""
    shapes = {}

    def record(key, sample):
        shapes.update({path: tuple(leaf.shape) for path, leaf in flatten(model.init(key, sample)).items()})

    jax.eval_shape(record, jax.random.key(0), _sample_input(name))
    return shapes


@functools.cache
def _variable_paths(name: str) -> tuple[Path, ...]:
    """The plain model's leaf paths, which do not depend on its width or number of classes."""
    return tuple(_variable_shapes(models.get(name, num_classes=1, width=1 / _BASE_CHANNELS), name))


def _convention(name: str, keys: set[str]) -> KeyConvention:
    """The convention whose names the file uses most (torchvision's where nothing matches)."""
    return max(CONVENTIONS[name], key=lambda c: len({c.key(path) for path in _variable_paths(name)} & keys))


def _model_options(name: str, convention: KeyConvention, shapes: Mapping[str, Shape]) -> dict[str, Any]:
    """num_classes from the classifier, width from the first conv (ImageNet defaults where absent:
    the strict match then names the missing tensors)."""
    classifier = shapes.get(convention.key(('params', 'classifier', 'kernel')))
    first_conv = shapes.get(convention.key(('params', _FIRST_CONV[name], 'kernel')))
    return {'num_classes': classifier[0] if classifier else 1000,
            'width': first_conv[0] / _BASE_CHANNELS if first_conv else 1.0}


def _match(expected: Mapping[Path, Shape], convention: KeyConvention, tensors: _Tensors,
           model_description: str) -> dict[Path, tuple[str, Layout]]:
    """{Flax path: (torch key, layout)} covering every leaf and every tensor, or a PretrainedError."""
    plan, mismatched, ignored = {}, [], set()
    for path, shape in expected.items():
        key, layout = convention.key(path), convention.layout(path, shape)
        wanted, found = layout.torch_shape(shape), tensors.shapes.get(key)
        if found is None:
            mismatched.append(f'{key!r} is missing (for {path_str(path)}: torch shape {wanted})')
        elif found != wanted:
            mismatched.append(f'{key!r} has shape {found}, but {path_str(path)} needs torch shape {wanted} '
                              f'(Flax shape {shape})')
        plan[path] = (key, layout)
        if path[0] == 'batch_stats':
            ignored.add(key.rpartition('.')[0] + '.num_batches_tracked')
    used = {key for key, _ in plan.values()} | ignored
    unexpected = [f'{key!r} (shape {shape}) has no place in the model' for key, shape in tensors.shapes.items()
                  if key not in used]
    if mismatched or unexpected:
        # One line: the lowest mismatches, and the file's first unexpected tensor (it hints at what the file is).
        shown = mismatched[:3 - min(1, len(unexpected))]
        shown += unexpected[:3 - len(shown)]
        hidden = len(mismatched) + len(unexpected) - len(shown)
        raise PretrainedError(f'{tensors.source} does not hold {model_description} weights ({convention.name} '
                              'names): ' + '; '.join(shown) + (f'; and {hidden} more' if hidden else '') + '.')
    return plan


def _place(array: np.ndarray, path: Path, sharding: Sharding | Callable[[str, Shape], Sharding] | None):
    """The leaf on its devices, each device receiving only its slice (multi-host too); else the host array."""
    if sharding is None:
        return array
    target = sharding if isinstance(sharding, Sharding) else sharding(path_str(path), array.shape)
    return jax.make_array_from_callback(array.shape, target, lambda index: array[index])


def from_torch(state_dict_or_path, name: str, *, width: float | None = None,
               sharding: Sharding | Callable[[str, Shape], Sharding] | None = None) -> dict:
    """Variables for `growjax.models.get(name, num_classes=N, width=W)` from a PyTorch state dict.

    state_dict_or_path: a mapping of names to torch tensors or numpy arrays, or a file: .safetensors
        (read with numpy alone) or a torch.save file (.pth, .pt, .bin; needs torch). torchvision's,
        timm's and Hugging Face transformers' key names are recognised (see CONVENTIONS).
    name: 'alexnet', 'vgg16', 'resnet18' or 'resnet50'.
    width: the model width to check the file against; None reads it from the first conv. N is
        always read from the classifier.
    sharding: None returns numpy arrays on the host. A jax Sharding (or a function of the leaf's
        'params/fc6/kernel' path and shape returning one) places each leaf as soon as it is
        converted, so the host never holds a second copy of the whole tree, only one leaf at a time
        (zip-format .pth and .safetensors files are memory-mapped, not read whole).

    Returns {'params': ...} (ResNets: and 'batch_stats'). Raises PretrainedError (a UserError)
    for an unreadable file or for any missing, extra or mis-shaped tensor, naming the torch key,
    the Flax path and both shapes.
    """
    if name not in CONVENTIONS:
        raise PretrainedError(f'No published-weights loader for model {name!r}; supported: {list(SUPPORTED)}.')
    with _open(state_dict_or_path) as tensors:
        convention = _convention(name, set(tensors.shapes))
        options = _model_options(name, convention, tensors.shapes)
        if width is not None:
            options['width'] = width
        model = models.get(name, **options)
        description = f"growjax {name} (width {options['width']:g}, {options['num_classes']} classes)"
        plan = _match(_variable_shapes(model, name), convention, tensors, description)
        return unflatten({path: _place(layout.to_flax(tensors.load(key)), path, sharding)
                          for path, (key, layout) in plan.items()})
