"""A small CNN for the built-in 8x8 .. 32x32 data, with the paper's fc6/fc7 head."""
from __future__ import annotations

import jax
import flax.linen as nn

from growjax.models.head import FcHeadNet
from growjax.nn import lecun_normal_flat


class SmallCNN(FcHeadNet):
    """conv1 -> pool -> conv2 -> pool -> fc6 -> fc7 -> classifier (ReLU after every layer).

    `width` multiplies every layer's size, so tests run tiny versions; pooling is skipped once a
    map is 2x2 or smaller, so 8x8 inputs (the digits) work as well as 16x16 or 32x32. `fc_width`
    sets the units of fc6 and fc7 alone (0: 256 x width), to vary the source model's capacity
    where growth happens without changing its convolutions.
    """
    FC_UNITS = 256

    dropout_rate: float = 0.0
    fc_width: int = 0

    @property
    def fc6_units(self) -> int:
        return self.fc_width or super().fc6_units

    @property
    def fc7_units(self) -> int:
        return self.fc_width or super().fc7_units

    def trunk(self, x: jax.Array, train: bool) -> jax.Array:
        del train
        for name, channels in (('conv1', 32), ('conv2', 64)):
            x = nn.relu(nn.Conv(self._units(channels), (3, 3), dtype=self.dtype, kernel_init=lecun_normal_flat, name=name)(x))
            if min(x.shape[1:3]) > 2:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return x
