"""AlexNet in torchvision's layout (the paper's network), with the growable fc6/fc7 head."""
from __future__ import annotations

import jax
import flax.linen as nn

from growjax.models.head import FcHeadNet
from growjax.nn import adaptive_avg_pool, lecun_normal_flat

# (name, channels, kernel, stride, padding, max-pool after): torchvision's `features`.
_CONVS = (
    ('conv1', 64, 11, 4, 2, True),
    ('conv2', 192, 5, 1, 2, True),
    ('conv3', 384, 3, 1, 1, False),
    ('conv4', 256, 3, 1, 1, False),
    ('conv5', 256, 3, 1, 1, True),
)


class AlexNet(FcHeadNet):
    """conv1..conv5 (ReLU, 3x3/2 max-pools) -> adaptive avg pool 6x6 -> fc6 -> fc7 -> classifier.

    Paddings are torch's explicit ones and the max-pools floor like torch's, so published weights
    give identical logits (fc6 reads features flattened as HWC, torch's as CHW: a weight loader
    permutes fc6's rows). Dropout sits after fc6/fc7 (FcHeadNet) rather than before them as in
    torchvision; only training noise differs. `width` multiplies every conv and fc width, so tests
    run tiny versions. Inputs of 63x63 and larger work (224x224 is the usual size).
    """

    FC_UNITS = 4096
    MIN_INPUT_SIZE = 63  # the last max-pool still sees a full window (torch fails below it too)

    def trunk(self, x: jax.Array, train: bool) -> jax.Array:
        del train
        self._check_input_size(x)
        for name, channels, kernel, stride, pad, pool in _CONVS:
            x = nn.Conv(self._units(channels), (kernel, kernel), strides=(stride, stride),
                        padding=((pad, pad), (pad, pad)), dtype=self.dtype,
                        kernel_init=lecun_normal_flat, name=name)(x)
            x = nn.relu(x)
            if pool:
                x = nn.max_pool(x, (3, 3), strides=(2, 2))
        return adaptive_avg_pool(x, (6, 6))
