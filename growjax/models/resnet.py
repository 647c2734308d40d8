"""ResNet-18 and ResNet-50 in torchvision's layout (v1.5: bottlenecks stride on the 3x3 conv),
growable per stage.

Growth keeps every pretrained leaf at its path and shape (docs/design.md, principle 1):

- widen {'stageK': k}: every block of stage K gains k channels of inner width ("WA inside a
  block"). A new conv beside the one that sets the inner width (`conv1_plus` in a BasicBlock,
  `conv2_plus` in a Bottleneck, each with its own BatchNorm `*_plus`) feeds the next conv through a
  new fan-in subtree (`conv2/from_conv1_plus`, `conv3/from_conv2_plus`). The block's output width,
  and so everything after it, is unchanged. With norm_scale, a NormScale (`conv2_norm`,
  `conv3_norm`) normalises the old and new channel groups at each position before that conv.
- deepen {'stageK': n}: n new blocks `stageK_extra0`, `stageK_extra1`, ... at the end of stage K
  (stride 1, no downsample). They are new as a whole, so they are not split into old and new
  channel groups even when the stage is also widened.

preserve_function: the new fan-in kernels start at zero and inserted blocks start as the identity
(the scale of their last BatchNorm at zero, so the residual branch adds nothing), so the grown
network computes what the pretrained one did.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import flax.linen as nn

from growjax.models.growth import Growth, GrowthError, check_layer_names
from growjax.nn import MultiInputConv, NormScale, he_normal_flat, lecun_normal_flat

STAGES = ('stage1', 'stage2', 'stage3', 'stage4')
# Where the paper's fc-head methods grow a ResNet: fc6 -> stage3, fc7 -> stage4 (units = channels added
# to its blocks' inner width), and DA's fc_a -> one residual block at the end of stage4.
PAPER_LAYERS = {'fc6': 'stage3', 'fc7': 'stage4'}
BASE_WIDTH = 64


def _torch_padding(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """torch's symmetric `padding=kernel // 2`; Flax's 'SAME' pads strided convs asymmetrically."""
    return ((kernel // 2, kernel // 2),) * 2


def _conv(features: int, kernel: int, strides: int, dtype, name: str) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=_torch_padding(kernel),
                   use_bias=False, kernel_init=he_normal_flat, dtype=dtype, name=name)


def _batch_norm(x: jax.Array, train: bool, dtype, name: str, zero_scale: bool = False) -> jax.Array:
    """torch's BatchNorm2d defaults (momentum 0.1 there is 0.9 here: Flax weighs the old average).

    The mode is passed at call time, not to the constructor, so that the train step can run frozen
    layers with their running averages (steps.frozen_batch_norms_use_running_averages).
    """
    norm = nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=dtype,
                        scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones, name=name)
    return norm(x, use_running_average=not train)


class _ResidualBlock(nn.Module):
    """Fields and layers shared by BasicBlock and Bottleneck.

    features: inner width; the block outputs features * `expansion` (a class attribute of each
        block type) channels.
    extra_features: channels added to the inner width by widening (0: as pretrained).
    start_as_identity: zero the last BatchNorm's scale, for blocks inserted by deepening.
    """
    features: int
    strides: int = 1
    downsample: bool = False
    extra_features: int = 0
    norm_scale: bool = False
    scale_init: float = 10.0
    preserve_function: bool = False
    start_as_identity: bool = False
    dtype: jnp.dtype | None = None

    def _conv_bn_relu(self, x, features: int, kernel: int, strides: int, conv_name: str, bn_name: str, train: bool):
        x = _conv(features, kernel, strides, self.dtype, conv_name)(x)
        return nn.relu(_batch_norm(x, train, self.dtype, bn_name))

    def _reading_conv(self, old, new, features: int, kernel: int, name: str, new_name: str):
        """Conv `name` over the old channels and, when widened, the new `new_name` channels as well."""
        if new is None:
            return _conv(features, kernel, 1, self.dtype, name)(old)
        if self.norm_scale:
            sizes = (old.shape[-1], new.shape[-1])
            merged = NormScale(sizes, scale_init=self.scale_init, name=f'{name}_norm')(
                jnp.concatenate([old, new], axis=-1))
            old, new = jnp.split(merged, [sizes[0]], axis=-1)
        return MultiInputConv(features, (kernel, kernel), padding=_torch_padding(kernel), use_bias=False,
                              extra_input_names=(new_name,), zero_new_fan_in=self.preserve_function,
                              kernel_init=he_normal_flat, dtype=self.dtype, name=name)([old, new])

    def _residual(self, x, branch, last_bn: str, train: bool):
        """relu(BN(branch) + shortcut); the shortcut is a 1x1 conv + BN where the shape changes."""
        branch = _batch_norm(branch, train, self.dtype, last_bn, zero_scale=self.start_as_identity)
        shortcut = x
        if self.downsample:
            shortcut = _conv(self.features * self.expansion, 1, self.strides, self.dtype, 'downsample_conv')(x)
            shortcut = _batch_norm(shortcut, train, self.dtype, 'downsample_bn')
        return nn.relu(branch + shortcut)


class BasicBlock(_ResidualBlock):
    """conv1 3x3 -> bn1 -> ReLU -> conv2 3x3 -> bn2, plus the shortcut; widening adds `conv1_plus`."""
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        h = self._conv_bn_relu(x, self.features, 3, self.strides, 'conv1', 'bn1', train)
        h_plus = None
        if self.extra_features:
            h_plus = self._conv_bn_relu(x, self.extra_features, 3, self.strides, 'conv1_plus', 'bn1_plus', train)
        y = self._reading_conv(h, h_plus, self.features, 3, 'conv2', 'conv1_plus')
        return self._residual(x, y, 'bn2', train)


class Bottleneck(_ResidualBlock):
    """conv1 1x1 -> conv2 3x3 (the stride) -> conv3 1x1 (x4 channels), each with BN; widening adds
    `conv2_plus` beside conv2."""
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        h = self._conv_bn_relu(x, self.features, 1, 1, 'conv1', 'bn1', train)
        h2 = self._conv_bn_relu(h, self.features, 3, self.strides, 'conv2', 'bn2', train)
        h2_plus = None
        if self.extra_features:
            h2_plus = self._conv_bn_relu(h, self.extra_features, 3, self.strides, 'conv2_plus', 'bn2_plus', train)
        y = self._reading_conv(h2, h2_plus, self.features * self.expansion, 1, 'conv3', 'conv2_plus')
        return self._residual(x, y, 'bn3', train)


class ResNet(nn.Module):
    """stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) -> stage1..stage4 -> global avg pool -> classifier.

    `width` multiplies every channel count (base 64), so tests run tiny versions. Growth counts
    (channels, blocks) are absolute, not scaled by `width`. Call with train=True and
    mutable=['batch_stats'] to train (BatchNorm batch statistics). Subclasses set `stage_sizes`
    and `block_cls` as plain class attributes, not fields, so `models.get` offers no such options.
    """
    num_classes: int = 1000
    growth: Growth | None = None
    width: float = 1.0
    preserve_function: bool = False
    dtype: jnp.dtype | None = None

    def _check(self):
        if self.growth is None:
            return
        check_layer_names(self.growth, STAGES, STAGES, type(self).__name__)
        if self.preserve_function and self.growth.norm_scale and self.growth.widen:
            raise GrowthError('preserve_function=True is impossible with norm_scale=True when widening a stage: '
                             'NormScale rescales the pretrained channels the next conv reads. Grow with '
                             'norm_scale=False to preserve the function.')

    def _channels(self, base: int) -> int:
        return max(1, int(round(base * self.width)))

    def _stage(self, x: jax.Array, index: int, train: bool) -> jax.Array:
        stage = STAGES[index]
        growth = self.growth or Growth()
        features = self._channels(BASE_WIDTH * 2 ** index)
        block = functools.partial(self.block_cls, features=features, norm_scale=growth.norm_scale,
                                  scale_init=growth.scale_init, preserve_function=self.preserve_function,
                                  dtype=self.dtype)
        for j in range(self.stage_sizes[index]):
            strides = 2 if index > 0 and j == 0 else 1
            downsample = j == 0 and (strides != 1 or x.shape[-1] != features * self.block_cls.expansion)
            x = block(strides=strides, downsample=downsample, extra_features=growth.widen_by.get(stage, 0),
                      name=f'{stage}_block{j}')(x, train)
        for j in range(growth.deepen_by.get(stage, 0)):
            x = block(start_as_identity=self.preserve_function, name=f'{stage}_extra{j}')(x, train)
        return x

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        self._check()
        x = _conv(self._channels(BASE_WIDTH), 7, 2, self.dtype, 'stem_conv')(x)
        x = nn.relu(_batch_norm(x, train, self.dtype, 'stem_bn'))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for index in range(len(self.stage_sizes)):
            x = self._stage(x, index, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=lecun_normal_flat, name='classifier')(x)


class ResNet18(ResNet):
    """ResNet-18: BasicBlocks [2, 2, 2, 2]."""
    stage_sizes = (2, 2, 2, 2)
    block_cls = BasicBlock


class ResNet50(ResNet):
    """ResNet-50: Bottlenecks [3, 4, 6, 3], expansion 4."""
    stage_sizes = (3, 4, 6, 3)
    block_cls = Bottleneck
