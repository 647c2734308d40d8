"""The fully connected head fc6 -> fc7 -> classifier, growable in every way the paper grows it.

Shared by small_cnn, alexnet and vgg16. Activations flow as *groups* of units, (name, array, new):
a widened layer L adds `L_plus` beside L; old L reads only the old group below it (so WWA's old
fc7 stays fed by fc6 alone), while L_plus and every later layer read all groups. Wherever a layer
reads the output of a new layer, NormScale (if enabled) normalises each group separately.
"""
from __future__ import annotations

import itertools
from typing import ClassVar

import jax
import jax.numpy as jnp
import flax.linen as nn

from growjax.errors import UserError
from growjax.models.growth import Growth, GrowthError, check_layer_names
from growjax.nn import MultiInputDense, NormScale, lecun_normal_flat, lora

WIDENABLE = ('fc6', 'fc7')
DEEPENABLE = ('fc7',)
ADAPTABLE = ('fc6', 'fc7')  # layers that take LoRA adapters


class LoRADense(nn.Module):
    """nn.Dense plus a low-rank update (LoRA, Hu et al. 2021): y = x W + b + (x A) B.

    `kernel`/`bias` sit where nn.Dense puts them, so a pretrained Dense grafts unchanged and the
    adapters `lora_a` (in, rank; fan-in scaled random) and `lora_b` (rank, out; zeros) are new
    paths: the layer computes the pretrained function at init and regimes see them as new leaves.
    The adapters are growjax.nn.lora's, as growjax.surgery.LoRA adds them to any model's Dense.
    """
    features: int
    rank: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param('kernel', lecun_normal_flat, (x.shape[-1], self.features), jnp.float32)
        bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
        delta = lora(self, x, (-1,), (self.features,), self.rank, dtype=self.dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return x @ kernel + bias + delta


def _identity_init(key, shape, dtype=jnp.float32):
    """Identity kernel: an inserted layer of fc7's width that passes ReLU outputs through unchanged."""
    del key
    if shape[0] != shape[1]:
        raise ValueError(f'an identity kernel needs a square shape, got {shape}.')
    return jnp.eye(shape[0], dtype=dtype)


class FcHeadNet(nn.Module):
    """Base of networks ending in fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout -> classifier.

    Subclasses define `trunk(x, train)` (features before fc6) and the head widths; the head's
    layers are created in the subclass's own scope, so their paths are top level ('fc7/kernel'),
    as in the paper's layer names and in the regimes that refer to them.

    preserve_function: initialise new parts so that the grown head computes exactly what the
    pretrained one did (zero fan-in from new units into the pretrained classifier; fc_a as the
    identity). Impossible, and so an error, with NormScale (it rescales the old units) or with an
    fc_a whose width differs from fc7's.
    """
    FC_UNITS: ClassVar[int]  # fc6's and fc7's width at width=1 (the published networks' 4096)
    MIN_INPUT_SIZE: ClassVar[int] = 1  # smallest input side the trunk's pools keep a map for

    num_classes: int = 1000
    growth: Growth | None = None
    dropout_rate: float = 0.5
    width: float = 1.0  # multiplies every layer's size, so tests run tiny versions
    preserve_function: bool = False
    dtype: jnp.dtype | None = None

    def _check(self):
        if self.growth is None:
            return
        check_layer_names(self.growth, WIDENABLE, DEEPENABLE, type(self).__name__, adaptable=ADAPTABLE,
                          has_fc_head=True)
        if self.preserve_function and self.growth.norm_scale:
            raise GrowthError('preserve_function=True is impossible with norm_scale=True: NormScale '
                             'rescales the pretrained units. Grow with norm_scale=False to preserve the function.')
        fc_a_units = self.growth.deepen_by.get('fc7')
        if self.preserve_function and fc_a_units is not None and fc_a_units != self.fc7_units:
            raise GrowthError(f'preserve_function=True needs fc_a to have fc7\'s width ({self.fc7_units}) to start as '
                             f'the identity; got deepen fc7 -> {fc_a_units}.')

    def _read(self, groups, consumer: str) -> list[jax.Array]:
        """The arrays a layer reads, through NormScale when a new group is among them (and, for the
        classifier, with growth.classifier_norm: the 'NormScale only' control)."""
        arrays = [array for _, array, _ in groups]
        rescaled = any(new for _, _, new in groups) or (consumer == 'classifier' and self.growth is not None
                                                         and self.growth.classifier_norm)
        if self.growth is None or not self.growth.norm_scale or not rescaled:
            return arrays
        sizes = [array.shape[-1] for array in arrays]
        merged = NormScale(sizes, scale_init=self.growth.scale_init, name=f'{consumer}_norm')(
            jnp.concatenate(arrays, axis=-1))
        return jnp.split(merged, list(itertools.accumulate(sizes))[:-1], axis=-1)

    def _activate(self, x, train: bool):
        return nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(x))

    def _layer(self, name: str, units: int, groups, train: bool):
        """Old layer `name` (reads the old group only) plus, if widened, `name_plus` (reads all)."""
        old_name, old_array, _ = groups[0]
        rank = self.growth.lora_ranks.get(name) if self.growth else None
        if rank:
            dense = LoRADense(units, rank, dtype=self.dtype, name=name)
        else:
            dense = nn.Dense(units, dtype=self.dtype, kernel_init=lecun_normal_flat, name=name)
        out = [(name, self._activate(dense(old_array), train), False)]
        extra = self.growth.widen_by.get(name) if self.growth else None
        if extra:
            plus = MultiInputDense(extra, extra_input_names=[g[0] for g in groups[1:]], dtype=self.dtype,
                                   name=f'{name}_plus')(self._read(groups, f'{name}_plus'))
            out.append((f'{name}_plus', self._activate(plus, train), True))
        return out

    def _units(self, base: int) -> int:
        return max(1, int(round(base * self.width)))

    @property
    def fc6_units(self) -> int:
        return self._units(self.FC_UNITS)

    @property
    def fc7_units(self) -> int:
        return self._units(self.FC_UNITS)

    def _check_input_size(self, x: jax.Array) -> None:
        if min(x.shape[1:3]) < self.MIN_INPUT_SIZE:
            raise UserError(f'{type(self).__name__} needs inputs of at least {self.MIN_INPUT_SIZE}x'
                            f'{self.MIN_INPUT_SIZE}, got {x.shape[1]}x{x.shape[2]}: smaller maps vanish in the '
                            'max-pools.')

    def trunk(self, x: jax.Array, train: bool) -> jax.Array:
        raise NotImplementedError

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        self._check()
        features = self.trunk(x, train)
        groups = [('trunk', features.reshape(features.shape[0], -1), False)]
        groups = self._layer('fc6', self.fc6_units, groups, train)
        groups = self._layer('fc7', self.fc7_units, groups, train)
        fc_a_units = self.growth.deepen_by.get('fc7') if self.growth else None
        if fc_a_units:
            fc_a = MultiInputDense(
                fc_a_units, extra_input_names=[g[0] for g in groups[1:]], dtype=self.dtype,
                zero_new_fan_in=self.preserve_function,
                kernel_init=_identity_init if self.preserve_function else lecun_normal_flat,
                name='fc_a')(self._read(groups, 'fc_a'))
            groups = [('fc_a', self._activate(fc_a, train), True)]
        inputs = self._read(groups, 'classifier')
        for (name, _, _), array in zip(groups, inputs):
            # What the classifier sees of each group, for the old-vs-new unit analyses (paper Fig. 6).
            self.sow('intermediates', f'classifier_in_{name}', array)
        return MultiInputDense(self.num_classes, extra_input_names=[g[0] for g in groups[1:]], dtype=self.dtype,
                               zero_new_fan_in=self.preserve_function, name='classifier')(inputs)
