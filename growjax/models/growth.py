"""The growth spec: which layers a model widens or deepens, and how old and new units meet."""
from __future__ import annotations

import dataclasses
from typing import Mapping

from growjax.errors import UserError


class GrowthError(UserError):
    """A growth spec that the model cannot apply (unknown layer, non-positive size)."""


def _as_pairs(value, what: str) -> tuple[tuple[str, int], ...]:
    """Normalises a {name: count} mapping (or pairs) into a sorted tuple, so specs hash and compare."""
    items = value.items() if isinstance(value, Mapping) else tuple(value)
    pairs = []
    for name, count in items:
        if not isinstance(name, str):
            raise GrowthError(f'Growth.{what}: layer names must be strings, got {name!r}.')
        if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
            raise GrowthError(f'Growth.{what}[{name!r}] must be a positive integer, got {count!r}.')
        pairs.append((name, count))
    return tuple(sorted(pairs))


@dataclasses.dataclass(frozen=True)
class Growth:
    """How to grow a pretrained architecture.

    widen:  {layer: units added beside it}. For the fc heads of small_cnn/alexnet/vgg16 the layers
            are 'fc6' and 'fc7'; for ResNets a stage name ('stage1'..'stage4') and the number of
            channels added to the inner width of every block of that stage.
    deepen: {layer: size}. For fc heads only 'fc7': a new layer `fc_a` of that many units on top of
            fc7 (fed by all of fc7's groups). For ResNets a stage and the number of residual blocks
            inserted at its end.
    norm_scale: apply NormScale wherever a layer reads the output of a new layer (the paper's
            "grow"; False is its "ori"). scale_init is gamma's starting value.
    classifier_norm: NormScale where the classifier reads fc7 even when no new unit meets it: the
            classifier reads gamma * x / ||x|| of the unchanged fc7 (fc heads only). Alone it is the
            control for WA-grow, which changes two things at once (new units, and this rescaling of
            the old ones): 'NormScale only' (growjax.methods 'normscale') separates them.
    lora:   {layer: rank}. Low-rank adapters (LoRA) on fc heads' 'fc6'/'fc7': y = x W + b + (x A) B
            with new leaves `<layer>/lora_a` (in, rank) and `<layer>/lora_b` (rank, out, zeros), so
            the pretrained function is kept at init; the parameter-efficient alternative to growth.

    The paper's variants are the presets `wa`, `da`, `dwa`, `wwa`; `lora_preset` adapts fc6 and fc7;
    growjax.methods names them (config.growth.method).
    """
    widen: tuple[tuple[str, int], ...] = ()
    deepen: tuple[tuple[str, int], ...] = ()
    norm_scale: bool = True
    scale_init: float = 10.0
    lora: tuple[tuple[str, int], ...] = ()
    classifier_norm: bool = False

    def __post_init__(self):
        object.__setattr__(self, 'widen', _as_pairs(self.widen, 'widen'))
        object.__setattr__(self, 'deepen', _as_pairs(self.deepen, 'deepen'))
        object.__setattr__(self, 'lora', _as_pairs(self.lora, 'lora'))
        if self.scale_init <= 0:
            raise GrowthError(f'Growth.scale_init must be positive, got {self.scale_init}.')
        if self.classifier_norm and not self.norm_scale:
            raise GrowthError('Growth.classifier_norm=True is NormScale at the classifier; it contradicts '
                              'norm_scale=False (config growth.norm_scale).')

    @property
    def widen_by(self) -> dict[str, int]:
        return dict(self.widen)

    @property
    def deepen_by(self) -> dict[str, int]:
        return dict(self.deepen)

    @property
    def lora_ranks(self) -> dict[str, int]:
        return dict(self.lora)

    @classmethod
    def wa(cls, units: int, **kwargs) -> 'Growth':
        """WA: fc7 widened by `units` new units fed by fc6."""
        return cls(widen={'fc7': units}, **kwargs)

    @classmethod
    def da(cls, units: int, **kwargs) -> 'Growth':
        """DA: a new layer fc_a of `units` units on top of fc7."""
        return cls(deepen={'fc7': units}, **kwargs)

    @classmethod
    def dwa(cls, units: int, **kwargs) -> 'Growth':
        """DWA: fc7 widened by `units`, and fc_a (`units` units) fed by [fc7, fc7_plus]."""
        return cls(widen={'fc7': units}, deepen={'fc7': units}, **kwargs)

    @classmethod
    def wwa(cls, units: int, **kwargs) -> 'Growth':
        """WWA: fc6 widened by units/2 and fc7 by `units` (fc7_plus fed by [fc6, fc6_plus])."""
        if units < 2:
            raise GrowthError(f'Growth.wwa needs at least 2 units (fc6 gets units/2), got {units}.')
        return cls(widen={'fc6': units // 2, 'fc7': units}, **kwargs)

    @classmethod
    def lora_preset(cls, rank: int, **kwargs) -> 'Growth':
        """LoRA: rank-`rank` adapters on fc6 and fc7, no new units."""
        return cls(lora={'fc6': rank, 'fc7': rank}, **kwargs)

    @classmethod
    def norm_only(cls, **kwargs) -> 'Growth':
        """NormScale only: no new units; the classifier reads gamma * fc7 / ||fc7|| (WA's rescaling alone)."""
        return cls(classifier_norm=True, **kwargs)


def check_layer_names(growth: Growth, widenable: tuple[str, ...], deepenable: tuple[str, ...], model: str,
                      adaptable: tuple[str, ...] = (), has_fc_head: bool = False):
    """Raises a GrowthError naming the layer when a spec asks to grow a layer the model lacks."""
    if growth.classifier_norm and not has_fc_head:
        raise GrowthError(f'{model}: classifier_norm (NormScale where the classifier reads fc7, the \'normscale\' '
                          'method) needs an fc6/fc7 head; this model has none.')
    for name, _ in growth.lora:
        if name not in adaptable:
            raise GrowthError(f'{model}: cannot add LoRA adapters to {name!r}; adaptable layers are {list(adaptable)}.')
    for name, _ in growth.widen:
        if name not in widenable:
            raise GrowthError(f'{model}: cannot widen {name!r}; widenable layers are {list(widenable)}.')
    for name, _ in growth.deepen:
        if name not in deepenable:
            raise GrowthError(f'{model}: cannot deepen {name!r}; deepenable layers are {list(deepenable)}.')
