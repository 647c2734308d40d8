"""VGG16 in torchvision's layout (configuration D, no batch norm), with the growable fc6/fc7 head."""
from __future__ import annotations

import jax
import flax.linen as nn

from growjax.models.head import FcHeadNet
from growjax.nn import adaptive_avg_pool, lecun_normal_flat

# (channels, convs) per block; block b's convs are conv{b}_1, conv{b}_2, ...
_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


class VGG16(FcHeadNet):
    """conv1_1..conv5_3 (3x3, pad 1, ReLU; 2x2/2 max-pool after each block) -> adaptive avg pool
    7x7 -> fc6 -> fc7 -> classifier.

    Paddings and floor-mode pools match torch, so published weights give identical logits (fc6
    reads features flattened as HWC, torch's as CHW: a weight loader permutes fc6's rows). `width`
    multiplies every conv and fc width, so tests run tiny versions. Inputs of 32x32 and larger work
    (224x224 is the usual size).
    """

    FC_UNITS = 4096
    MIN_INPUT_SIZE = 32  # the last max-pool still sees a full window (torch fails below it too)

    def trunk(self, x: jax.Array, train: bool) -> jax.Array:
        del train
        self._check_input_size(x)
        for block, (channels, convs) in enumerate(_BLOCKS, start=1):
            for index in range(1, convs + 1):
                x = nn.Conv(self._units(channels), (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                            kernel_init=lecun_normal_flat, name=f'conv{block}_{index}')(x)
                x = nn.relu(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return adaptive_avg_pool(x, (7, 7))
