"""Published weights (torchvision, timm, Hugging Face, big_vision) as growjax variables.

`from_torch(state_dict_or_path, name)` converts the ImageNet weights the paper and today's users
start from into the variables of `growjax.models.get(name, ...)` for 'alexnet', 'vgg16',
'resnet18', 'resnet50' and 'vit' (timm's and torchvision's ViTs); `from_big_vision(path)` converts
big_vision's ViT .npz files; `model_options(weights, name)` gives the `models.get` options the
weights fit (a ViT's variant, pooling, pre-logits, GELU). For the CNNs:

- conv kernels OIHW -> HWIO and dense kernels (out, in) -> (in, out);
- fc6, the first dense layer after the conv trunk, has its input rows permuted: torch flattens the
  pooled map as (C, H, W), growjax's NHWC map flattens as (H, W, C);
- BatchNorm weight/bias -> params scale/bias, running_mean/running_var -> batch_stats mean/var
  (`num_batches_tracked`, a step counter torch uses only when its momentum is None, is ignored);
- floating tensors become float32.

It is strict: a tensor the model lacks, a leaf the file lacks, or a shape that differs is an error
naming the torch key, the Flax path and both shapes; nothing is filled in or dropped silently.
The width and the number of classes are read from the tensors (the first conv, the classifier).

For ViTs, the fused q/k/v projections of timm and torchvision are split into flax's query, key
and value kernels (width, heads, head_dim), and the position embeddings can be resized to another
image size (`image_size=`). Every size is read from the tensors but the number of heads, which no
shape holds: it is given (`num_heads=`, `variant=`) or that of the standard variant of the file's
sizes.

The CNNs and torchvision's ViTs expect NHWC RGB images in [0, 1] normalised with IMAGENET_MEAN /
IMAGENET_STD (what the presets in configs/ set as data.mean / data.std); timm's AugReg ViTs and
big_vision's expect [-1, 1] (mean 0.5, std 0.5).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import os
import re
import zipfile
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from growjax import models
from growjax.errors import UserError
from growjax.grow import Path, flatten, path_str, unflatten
from growjax.models import vit
from growjax.models.alexnet import AlexNet
from growjax.models.vgg import VGG16

__all__ = ['IMAGENET_MEAN', 'IMAGENET_STD', 'PretrainedError', 'SUPPORTED', 'WEIGHT_FILE_SUFFIXES', 'from_big_vision',
           'from_torch', 'model_options']

# What the published ImageNet networks were trained on: RGB in [0, 1], normalised with these per channel.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_FILE_SUFFIXES = ('.pth', '.pt', '.bin', '.safetensors')  # .bin: Hugging Face's pytorch_model.bin

Shape = tuple[int, ...]
Sharding = jax.sharding.Sharding

# The first conv of every supported model has 64 channels at width 1: the file's count gives the width.
_BASE_CHANNELS = 64
_FIRST_CONV = {'alexnet': 'conv1', 'vgg16': 'conv1_1', 'resnet18': 'stem_conv', 'resnet50': 'stem_conv'}
# Any input at least this large gives every parameter its shape (AlexNet and VGG pool adaptively).
_SAMPLE_SIZE = {'alexnet': AlexNet.MIN_INPUT_SIZE, 'vgg16': VGG16.MIN_INPUT_SIZE, 'resnet18': 32, 'resnet50': 32}


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
    stored = 'torch'                      # for messages: whose shapes the file holds

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
SUPPORTED = (*CONVENTIONS, 'vit')  # the ViT's conventions are built per file (_vit_convert)


# ---------------------------------------------------------------------------------------------
# Vision Transformers: timm's, torchvision's and big_vision's names
#
# growjax's ViT (growjax/models/vit.py) keeps flax's attention layout: query/key/value kernels of
# shape (width, heads, head_dim) and an out kernel (heads, head_dim, width). timm and torchvision
# fuse q, k and v into one (3 * width, width) tensor, so three Flax leaves read slices of one key.


@dataclasses.dataclass(frozen=True)
class LeafConvention:
    """A ViT family's names leaf by leaf: Flax path without the collection -> (file key, layout).

    Built per file (`_vit_convert`): the fused q/k/v layouts need the number of heads, the position
    embeddings' layout the file's grid and the model's.
    """
    name: str
    stored: str  # for messages: whose shapes the file holds ('torch', 'big_vision')
    locate: Callable[[Path], tuple[str, Layout]]

    def key(self, path: Path) -> str:
        return self.locate(path[1:])[0]

    def layout(self, path: Path, shape: Shape) -> Layout:
        return self.locate(path[1:])[1]


def fused_qkv(index: int, heads: int, bias: bool = False) -> Layout:
    """Query (0), key (1) or value (2) of a fused projection (timm's `attn.qkv`, torchvision's
    `in_proj_weight`): torch stacks the rows [q; k; v], each head after head, as in flax's
    (width, heads, head_dim) kernel or (heads, head_dim) bias."""
    if bias:
        return Layout(lambda s: (3 * s[0] * s[1],), lambda array: np.split(array, 3)[index].reshape(heads, -1))
    return Layout(lambda s: (3 * s[1] * s[2], s[0]),
                  lambda array: np.split(array, 3)[index].T.reshape(array.shape[1], heads, -1))


def attention_out(heads: int) -> Layout:
    """The output projection (width, heads * head_dim) as flax's (heads, head_dim, width) kernel."""
    return Layout(lambda s: (s[2], s[0] * s[1]), lambda array: array.T.reshape(heads, -1, array.shape[0]))


def position_embeddings(file_rows: tuple[int, tuple[int, int]], model_rows: tuple[int, tuple[int, int]]) -> Layout:
    """Position embeddings of (class-token rows, (grid height, grid width)) in the file as the model's.

    The class token's row is kept, or zero where the file has none (big_vision's current ViT gives
    the class token no position, which is the same function). A grid of another size is resized as
    big_vision's `resample_posemb` does: bilinear, corners aligned (scipy.ndimage.zoom, order 1).
    """
    (file_tokens, file_grid), (tokens, grid) = file_rows, model_rows

    def to_flax(array: np.ndarray) -> np.ndarray:
        width = array.shape[-1]
        token_rows = array[:, :file_tokens] if file_tokens else np.zeros((1, tokens, width), np.float32)
        positions = array[0, file_tokens:].reshape(*file_grid, width)
        if file_grid != grid:
            import scipy.ndimage  # only for resizing

            zoom = (grid[0] / file_grid[0], grid[1] / file_grid[1], 1)
            positions = scipy.ndimage.zoom(positions, zoom, order=1)
        return np.concatenate([token_rows, positions.reshape(1, grid[0] * grid[1], width)], axis=1)

    return Layout(lambda s: (1, file_tokens + file_grid[0] * file_grid[1], s[2]), to_flax)


_VIT_BLOCK = re.compile(r'block(\d+)')


@dataclasses.dataclass(frozen=True)
class _ViTNames:
    """How one family names a ViT's tensors: `top` for the layers and parameters outside the blocks,
    `block` ('blocks.{}') and `inner` for a block's layers (Flax 'attention/query' -> file name)."""
    name: str
    stored: str  # 'torch' (OIHW convs, (out, in) linears, fused q/k/v) or 'big_vision' (flax's own)
    top: Mapping[str, str]
    block: str
    inner: Mapping[str, str]
    prefix: str = ''  # big_vision checkpoints may hold the parameters under 'params/'

    def key(self, path: Path) -> str:
        *module, leaf = path
        if not module:  # a parameter of the model itself: 'cls', 'pos_embedding'
            return self.prefix + self.top[leaf]
        block = _VIT_BLOCK.fullmatch(module[0])
        layer = f"{self.block.format(block[1])}.{self.inner[path_str(module[1:])]}" if block else self.top[module[0]]
        if self.stored == 'big_vision':
            return f"{self.prefix}{layer.replace('.', '/')}/{leaf}"
        # nn.MultiheadAttention (torchvision) holds its fused projection as `in_proj_weight`, not a submodule.
        return f'{layer}.{_TENSOR_NAMES["params", leaf]}'.replace('.in_proj.', '.in_proj_')


def _attention_names(qkv: str, out: str) -> dict[str, str]:
    """A block's attention layers; `qkv` is one fused tensor's name, or a template ('...{}') of three."""
    return {**{f'attention/{part}': qkv.format(part) for part in ('query', 'key', 'value')}, 'attention/out': out}


def _timm_vit_names(keys: set[str]) -> _ViTNames:
    """timm's VisionTransformer (ViT, DeiT, AugReg ports); average-pooled models norm with `fc_norm`."""
    final_norm = 'fc_norm' if 'fc_norm.weight' in keys else 'norm'
    return _ViTNames(
        'timm', 'torch',
        {'embedding': 'patch_embed.proj', 'cls': 'cls_token', 'pos_embedding': 'pos_embed', 'encoder_norm': final_norm,
         'pre_logits': 'pre_logits.fc', 'head': 'head'},
        'blocks.{}',
        {'norm1': 'norm1', 'norm2': 'norm2', **_attention_names('attn.qkv', 'attn.proj'),
         'mlp/fc1': 'mlp.fc1', 'mlp/fc2': 'mlp.fc2'})


def _torchvision_vit_names(keys: set[str]) -> _ViTNames:
    """torchvision's VisionTransformer (vit_b_16, ...). Files saved by torchvision 0.12, such as
    vit_b_16-c867db91.pth, name the MLP `linear_1`/`linear_2`; later versions `0`/`3`."""
    old_mlp = any('.mlp.linear_1.' in key for key in keys)
    return _ViTNames(
        'torchvision', 'torch',
        {'embedding': 'conv_proj', 'cls': 'class_token', 'pos_embedding': 'encoder.pos_embedding',
         'encoder_norm': 'encoder.ln', 'pre_logits': 'heads.pre_logits', 'head': 'heads.head'},
        'encoder.layers.encoder_layer_{}',
        {'norm1': 'ln_1', 'norm2': 'ln_2',
         **_attention_names('self_attention.in_proj', 'self_attention.out_proj'),
         'mlp/fc1': 'mlp.linear_1' if old_mlp else 'mlp.0', 'mlp/fc2': 'mlp.linear_2' if old_mlp else 'mlp.3'})


# Where big_vision files keep the position embeddings: today's vit.py, the original ViT code
# (google-research/vision_transformer, whose AugReg .npz files timm ports), and big_vision before 2022.
_BIG_VISION_POSEMB = ('pos_embedding', 'Transformer/posembed_input/pos_embedding', 'Transformer/pos_embedding')


def _big_vision_vit_names(keys: set[str]) -> _ViTNames:
    """big_vision's ViT (flax linen numbering: LayerNorm_0/1, MultiHeadDotProductAttention_0,
    MlpBlock_0), or the original ViT code's pre-linen numbering (LayerNorm_0/2,
    MultiHeadDotProductAttention_1, MlpBlock_3) that the published AugReg .npz files use."""
    prefix = 'params/' if any(key.startswith('params/') for key in keys) else ''
    pre_linen = any('/MlpBlock_3/' in key for key in keys)
    posemb = next((name for name in _BIG_VISION_POSEMB if prefix + name in keys), _BIG_VISION_POSEMB[int(pre_linen)])
    attention, mlp = ('MultiHeadDotProductAttention_1', 'MlpBlock_3') if pre_linen else \
        ('MultiHeadDotProductAttention_0', 'MlpBlock_0')
    return _ViTNames(
        'vision_transformer' if pre_linen else 'big_vision', 'big_vision',
        {'embedding': 'embedding', 'cls': 'cls', 'pos_embedding': posemb, 'encoder_norm': 'Transformer/encoder_norm',
         'pre_logits': 'pre_logits', 'head': 'head'},
        'Transformer/encoderblock_{}',
        {'norm1': 'LayerNorm_0', 'norm2': 'LayerNorm_2' if pre_linen else 'LayerNorm_1',
         **_attention_names(attention + '.{}', attention + '.out'),
         'mlp/fc1': f'{mlp}.Dense_0', 'mlp/fc2': f'{mlp}.Dense_1'},
        prefix)


def _vit_leaf(path: Path, names: _ViTNames, heads: int, posemb: Layout) -> tuple[str, Layout]:
    """The file key and layout of the Flax leaf `path` (without the collection)."""
    key = names.key(path)
    if path == ('pos_embedding',):
        return key, posemb
    if names.stored != 'torch':
        return key, AS_IS
    *module, leaf = path
    layer = path_str(module[1:]) if module and _VIT_BLOCK.fullmatch(module[0]) else None
    if layer in ('attention/query', 'attention/key', 'attention/value'):
        return key, fused_qkv(('query', 'key', 'value').index(module[-1]), heads, bias=leaf == 'bias')
    if leaf != 'kernel':
        return key, AS_IS
    if layer == 'attention/out':
        return key, attention_out(heads)
    return key, CONV if module == ['embedding'] else DENSE


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
    if path.endswith('.npz'):
        raise PretrainedError(f'{path}: a .npz file holds JAX weights; load big_vision ViT checkpoints with '
                              'growjax.pretrained.from_big_vision.')
    if path.endswith('.safetensors'):
        with _safetensors(path) as tensors:
            yield tensors
        return
    state_dict = _torch_state_dict(path)
    yield _in_memory(state_dict, source=path)


@contextlib.contextmanager
def _npz(path: str) -> Iterator[_Tensors]:
    """A .npz archive: shapes from the arrays' headers, each array read only when it is loaded."""
    with _reading(path, 'it as a .npz archive'):
        archive = zipfile.ZipFile(path)
        shapes = {}
        for member in archive.namelist():
            if member.endswith('.npy'):
                with archive.open(member) as file:
                    version = np.lib.format.read_magic(file)
                    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shapes[member[:-len('.npy')]] = tuple(read_header(file)[0])

    def load(key: str) -> np.ndarray:
        with _reading(path, repr(key)), archive.open(key + '.npy') as file:
            array = np.lib.format.read_array(file)
        return _float32(array, key, path)

    with archive:
        yield _Tensors(path, shapes, load)


def _only_params(tensors: _Tensors) -> _Tensors:
    """A big_vision checkpoint's parameters: where keys start with 'params/', the others (optimiser
    state, step counters) are not weights."""
    if not any(key.startswith('params/') for key in tensors.shapes):
        return tensors
    return dataclasses.replace(tensors, shapes={k: s for k, s in tensors.shapes.items() if k.startswith('params/')})


def _is_big_vision(weights) -> bool:
    """A .npz file, or in-memory big_vision parameters (nested, or flat with '/' keys; torch's use '.')."""
    if isinstance(weights, Mapping):
        return any(isinstance(value, Mapping) or '/' in key for key, value in weights.items())
    return os.fspath(weights).endswith('.npz')


@contextlib.contextmanager
def _open_big_vision(params_or_path) -> Iterator[_Tensors]:
    if isinstance(params_or_path, Mapping):
        flat = {path_str(path): value for path, value in flatten(params_or_path).items()}
        yield _only_params(_in_memory(flat, source='the big_vision parameters'))
        return
    path = os.fspath(params_or_path)
    if not os.path.isfile(path):
        raise PretrainedError(f'{path}: no such weights file.')
    with _npz(path) as tensors:
        yield _only_params(tensors)


# ---------------------------------------------------------------------------------------------
# Matching a state dict to a model


def _sample_input(height: int, width: int | None = None, channels: int = 3) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((1, height, width or height, channels), jnp.float32)


def _variable_shapes(model, sample: jax.ShapeDtypeStruct) -> dict[Path, Shape]:
    """The model's leaf shapes in the order its forward pass creates them, so that errors name the
    lowest layer first. Only traced; the order is read inside the trace (pytrees sort their keys)."""
    shapes = {}

    def record(key, sample):
        shapes.update({path: tuple(leaf.shape) for path, leaf in flatten(model.init(key, sample)).items()})

    jax.eval_shape(record, jax.random.key(0), sample)
    return shapes


@functools.cache
def _variable_paths(name: str) -> tuple[Path, ...]:
    """The plain model's leaf paths, which do not depend on its width or number of classes."""
    return tuple(_variable_shapes(models.get(name, num_classes=1, width=1 / _BASE_CHANNELS),
                                  _sample_input(_SAMPLE_SIZE[name])))


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


def _match(expected: Mapping[Path, Shape], convention: KeyConvention | LeafConvention, tensors: _Tensors,
           model_description: str) -> dict[Path, tuple[str, Layout]]:
    """{Flax path: (torch key, layout)} covering every leaf and every tensor, or a PretrainedError."""
    plan, mismatched, ignored, reported = {}, [], set(), set()
    for path, shape in expected.items():
        key, layout = convention.key(path), convention.layout(path, shape)
        wanted, found = layout.torch_shape(shape), tensors.shapes.get(key)
        if found != wanted and key not in reported:  # a fused tensor (ViT's q/k/v) is reported once
            reported.add(key)
            if found is None:
                mismatched.append(f'{key!r} is missing (for {path_str(path)}: {convention.stored} shape {wanted})')
            else:
                mismatched.append(f'{key!r} has shape {found}, but {path_str(path)} needs {convention.stored} '
                                  f'shape {wanted} (Flax shape {shape})')
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


def _convert(tensors: _Tensors, convention: KeyConvention | LeafConvention, expected: Mapping[Path, Shape],
             description: str, sharding: Sharding | Callable[[str, Shape], Sharding] | None) -> dict:
    """The variables, each leaf converted and placed in turn (the strict match first)."""
    plan = _match(expected, convention, tensors, description)
    return unflatten({path: _place(layout.to_flax(tensors.load(key)), path, sharding)
                      for path, (key, layout) in plan.items()})


def _check_name(name: str, **vit_arguments):
    if name not in SUPPORTED:
        raise PretrainedError(f'No published-weights loader for model {name!r}; supported: {list(SUPPORTED)}.')
    given = [argument for argument, value in vit_arguments.items() if value is not None]
    if name != 'vit' and given:
        raise PretrainedError(f"{', '.join(given)}: only for name='vit', not {name!r}.")


def _place(array: np.ndarray, path: Path, sharding: Sharding | Callable[[str, Shape], Sharding] | None):
    """The leaf on its devices, each device receiving only its slice (multi-host too); else the host array."""
    if sharding is None:
        return array
    target = sharding if isinstance(sharding, Sharding) else sharding(path_str(path), array.shape)
    return jax.make_array_from_callback(array.shape, target, lambda index: array[index])


# ---------------------------------------------------------------------------------------------
# Matching a ViT file to a model: sizes from the tensors, heads from the caller or the variant


@functools.cache
def _vit_probe_paths() -> tuple[Path, ...]:
    """The leaf paths of a one-block ViT with every optional layer; family names are told apart on them."""
    model = models.get('vit', num_classes=1, variant='mu/1', representation_size=1)
    return tuple(path[1:] for path in _variable_shapes(model, _sample_input(1)))


def _torch_vit_names(keys: set[str]) -> _ViTNames:
    """timm's or torchvision's names, whichever the file uses most (timm's where nothing matches)."""
    families = (_timm_vit_names(keys), _torchvision_vit_names(keys))
    return max(families, key=lambda names: len({names.key(path) for path in _vit_probe_paths()} & keys))


def _position_rows(shape: Shape, class_token: bool, source: str, key: str) -> tuple[int, tuple[int, int]]:
    """(class-token rows, grid) of stored position embeddings (1, rows, width): a square grid, after
    one class-token row where the model has a class token and the file stores one."""
    rows = shape[1] if len(shape) == 3 else -1
    for tokens in ((1, 0) if class_token else (0,)):
        side = math.isqrt(max(rows - tokens, 0))
        if side > 0 and side * side == rows - tokens:
            return tokens, (side, side)
    raise PretrainedError(f'{source}: {key!r} has shape {shape}, not position embeddings of a square grid of '
                          f'patches{" (after a class-token row)" if class_token else ""}.')


def _patch_embedding(names: _ViTNames, shapes: Mapping[str, Shape]) -> tuple[int, int, int] | None:
    """(width, channels, patch side) of the file's patch-embedding kernel (torch: OIHW, flax: HWIO)."""
    shape = shapes.get(names.key(('embedding', 'kernel')))
    if shape is None or len(shape) != 4:
        return None
    return (shape[0], shape[1], shape[2]) if names.stored == 'torch' else (shape[3], shape[2], shape[0])


def _vit_options(names: _ViTNames, tensors: _Tensors, *, variant: str | None, num_heads: int | None,
                 width: int | None) -> dict[str, Any]:
    """The options of growjax.models.get('vit', ...) that the file's weights fit.

    Sizes, pooling, pre-logits and classes are read from the tensors; the number of heads is not in
    any shape, so it comes from `num_heads`, from `variant`, or from the standard variant of the
    file's width, depth and MLP width. A given variant or width is checked, not overridden: the
    strict match names the tensors that do not fit it.
    """
    shapes, source = tensors.shapes, tensors.source

    def size(*path: str) -> int | None:
        shape = shapes.get(names.key(path))
        return shape[0] if shape else None

    if width is not None and (isinstance(width, bool) or not isinstance(width, int)):
        raise PretrainedError(f"width={width!r}: a ViT's width is its embedding width, an integer such as 768.")
    class_token = names.key(('cls',)) in shapes
    if class_token and names.top['encoder_norm'] == 'fc_norm':
        raise PretrainedError(f"{source} holds both 'cls_token' and 'fc_norm.weight': timm averages such a model's "
                              'patch tokens beside its class token, which growjax\'s ViT does not compute.')
    options = {'num_classes': size('head', 'bias') or 1000, 'pool_type': 'tok' if class_token else 'gap',
               'representation_size': size('pre_logits', 'bias'), 'norm_pooled': names.top['encoder_norm'] == 'fc_norm',
               'approximate_gelu': names.stored == 'big_vision'}
    embedding = _patch_embedding(names, shapes)
    depth = next(i for i in itertools.count() if names.key((f'block{i}', 'norm1', 'scale')) not in shapes)
    if embedding is None or depth == 0 or size('block0', 'mlp', 'fc1', 'bias') is None:
        # Not a ViT file of this family: a full-size model, whose strict match names the first missing tensors.
        return {**options, 'variant': variant or 'B/16', 'num_heads': num_heads, 'width': width}
    dims = {'width': embedding[0], 'depth': depth, 'mlp_dim': size('block0', 'mlp', 'fc1', 'bias'),
            'patch_size': embedding[2]}
    if variant is not None:
        given = vit.decode_variant(variant)
        extra = {} if 'patch_size' in given else {'patch_size': dims['patch_size']}
        return {**options, 'variant': variant, **extra, 'num_heads': num_heads, 'width': width}
    standard = next((sizes for sizes in vit.VARIANTS.values() if sizes[:3] == (dims['width'], dims['depth'],
                                                                             dims['mlp_dim'])), None)
    if num_heads is None and standard is None:
        raise PretrainedError(
            f"{source}: the number of attention heads is in no tensor's shape, and width {dims['width']}, depth "
            f"{dims['depth']}, mlp_dim {dims['mlp_dim']} is no standard ViT variant ({', '.join(vit.VARIANTS)}): pass "
            "num_heads=... (or variant=...).")
    found = vit.Dims(**dims, num_heads=num_heads or standard[3])
    name = vit.variant_of(found)
    options.update({'variant': name} if name else {'variant': None, **dataclasses.asdict(found)})
    return {**options, 'width': width} if width is not None else options


def _without_none(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options left at None are the model's defaults (a variant's sizes), except `variant` itself."""
    return {k: v for k, v in options.items() if v is not None or k == 'variant'}


def _vit_model(names: _ViTNames, tensors: _Tensors, **kwargs) -> tuple[dict[str, Any], Any]:
    options = _without_none(_vit_options(names, tensors, **kwargs))
    return options, models.get('vit', **options)


def _vit_convert(names: _ViTNames, tensors: _Tensors, *, variant, num_heads, width, image_size, sharding) -> dict:
    """Variables of the ViT the file's weights fit, position embeddings resized to `image_size`."""
    options, model = _vit_model(names, tensors, variant=variant, num_heads=num_heads, width=width)
    dims = model.dims
    class_token = options['pool_type'] == 'tok'
    channels = (_patch_embedding(names, tensors.shapes) or (0, 3, 0))[1]
    posemb_key = names.key(('pos_embedding',))
    stored = tensors.shapes.get(posemb_key)
    file_rows = _position_rows(stored, class_token, tensors.source, posemb_key) if stored else None
    if image_size is None:  # the size the file was trained at
        grid = file_rows[1] if file_rows else (224 // dims.patch_size,) * 2
    else:
        height, width_px = (image_size, image_size) if isinstance(image_size, int) else image_size
        grid = (height // dims.patch_size, width_px // dims.patch_size)
        if min(grid) < 1:
            raise PretrainedError(f'image_size={image_size} is smaller than one {dims.patch_size}-pixel patch.')
    model_rows = (int(class_token), grid)
    posemb = position_embeddings(file_rows, model_rows) if file_rows else AS_IS
    convention = LeafConvention(names.name, names.stored,
                                functools.partial(_vit_leaf, names=names, heads=dims.num_heads, posemb=posemb))
    description = (f"growjax vit (width {dims.width}, depth {dims.depth}, {dims.num_heads} heads, mlp_dim "
                   f"{dims.mlp_dim}, patch {dims.patch_size}, pool '{options['pool_type']}', "
                   f"{options['num_classes']} classes)")
    sample = _sample_input(grid[0] * dims.patch_size, grid[1] * dims.patch_size, channels)
    return _convert(tensors, convention, _variable_shapes(model, sample), description, sharding)


def from_torch(state_dict_or_path, name: str, *, width: float | None = None, variant: str | None = None,
               num_heads: int | None = None, image_size: int | tuple[int, int] | None = None,
               sharding: Sharding | Callable[[str, Shape], Sharding] | None = None) -> dict:
    """Variables for `growjax.models.get(name, num_classes=N, width=W)` from a PyTorch state dict.

    state_dict_or_path: a mapping of names to torch tensors or numpy arrays, or a file: .safetensors
        (read with numpy alone) or a torch.save file (.pth, .pt, .bin; needs torch). torchvision's,
        timm's and Hugging Face transformers' key names are recognised (see CONVENTIONS; ViTs:
        timm's and torchvision's).
    name: 'alexnet', 'vgg16', 'resnet18', 'resnet50' or 'vit'.
    width: the model width to check the file against; None reads it from the first conv. N is
        always read from the classifier. For 'vit', the embedding width (an int).
    variant, num_heads: 'vit' only. Every size of a ViT is read from the tensors except its number
        of heads: it is `num_heads`, or the `variant`'s ('B/16'; its sizes are then checked against
        the file), or, given neither, that of the standard variant with the file's width, depth and
        MLP width (a PretrainedError where there is none). `model_options` gives the options of
        the model to apply the variables with.
    image_size: 'vit' only: the input size (int or (height, width)) to resize the position
        embeddings to (bilinear, as big_vision's resample_posemb; the class token's row is kept);
        None keeps the file's.
    sharding: None returns numpy arrays on the host. A jax Sharding (or a function of the leaf's
        'params/fc6/kernel' path and shape returning one) places each leaf as soon as it is
        converted, so the host never holds a second copy of the whole tree, only one leaf at a time
        (zip-format .pth and .safetensors files are memory-mapped, not read whole).

    Returns {'params': ...} (ResNets: and 'batch_stats'). Raises PretrainedError (a UserError)
    for an unreadable file or for any missing, extra or mis-shaped tensor, naming the torch key,
    the Flax path and both shapes.
    """
    _check_name(name, variant=variant, num_heads=num_heads, image_size=image_size)
    with _open(state_dict_or_path) as tensors:
        if name == 'vit':
            return _vit_convert(_torch_vit_names(set(tensors.shapes)), tensors, variant=variant, num_heads=num_heads,
                                width=width, image_size=image_size, sharding=sharding)
        convention = _convention(name, set(tensors.shapes))
        options = _model_options(name, convention, tensors.shapes)
        if width is not None:
            options['width'] = width
        model = models.get(name, **options)
        description = f"growjax {name} (width {options['width']:g}, {options['num_classes']} classes)"
        return _convert(tensors, convention, _variable_shapes(model, _sample_input(_SAMPLE_SIZE[name])), description,
                        sharding)


def from_big_vision(params_or_path, *, variant: str | None = None, num_heads: int | None = None,
                    width: int | None = None, image_size: int | tuple[int, int] | None = None,
                    sharding: Sharding | Callable[[str, Shape], Sharding] | None = None) -> dict:
    """Variables for `growjax.models.get('vit', ...)` from big_vision's ViT parameters.

    params_or_path: a .npz file as big_vision and the original ViT code (google-research/
        vision_transformer: the AugReg `gs://vit_models/augreg/*.npz` files) save them, with flat
        'Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel' keys, with or
        without a leading 'params/' (keys outside 'params/', such as optimiser state, are then
        ignored); or such parameters in memory (nested, or flat with '/' keys). Today's linen
        names and the original code's pre-linen ones (MultiHeadDotProductAttention_1, MlpBlock_3)
        are both recognised, and the position embeddings wherever either kept them.
    variant, num_heads, width, image_size, sharding: as for `from_torch(..., 'vit')`.

    The arrays are flax's own, so nothing is transposed; where the file's position embeddings
    have no class-token row (big_vision's current vit.py adds them before the class token), that
    row is zero. big_vision computes GELU with flax's tanh approximation: apply the variables with
    `approximate_gelu=True`, as `model_options` says. Strict like from_torch.
    """
    with _open_big_vision(params_or_path) as tensors:
        return _vit_convert(_big_vision_vit_names(set(tensors.shapes)), tensors, variant=variant, num_heads=num_heads,
                            width=width, image_size=image_size, sharding=sharding)


def model_options(weights, name: str, *, width: float | None = None, variant: str | None = None,
                  num_heads: int | None = None) -> dict[str, Any]:
    """The keyword arguments of `growjax.models.get(name, **options)` for the model these weights fit.

    weights: what from_torch takes, or for 'vit' also what from_big_vision takes (a .npz file, or
    nested or '/'-keyed parameters). For the CNNs: num_classes and width. For 'vit': num_classes,
    the variant (or explicit sizes where the file's are no standard variant's), pool_type,
    representation_size, norm_pooled, and approximate_gelu (True for big_vision's weights). Only
    shapes are read. width, variant, num_heads: as for from_torch.
    """
    _check_name(name, variant=variant, num_heads=num_heads)
    if name == 'vit' and _is_big_vision(weights):
        with _open_big_vision(weights) as tensors:
            return _vit_model(_big_vision_vit_names(set(tensors.shapes)), tensors, variant=variant,
                              num_heads=num_heads, width=width)[0]
    with _open(weights) as tensors:
        if name == 'vit':
            return _vit_model(_torch_vit_names(set(tensors.shapes)), tensors, variant=variant, num_heads=num_heads,
                              width=width)[0]
        options = _model_options(name, _convention(name, set(tensors.shapes)), tensors.shapes)
        return {**options, 'width': width} if width is not None else options
