"""The growth methods by name: the one registry that configs, models, experiments and reports read.

A method says how a pretrained network is changed before fine-tuning (the paper's WA, DA, DWA,
WWA, and the baselines it is compared with). Adding a method is one entry here plus, where it needs
one, its implementation in the models (a `Growth` spec they know how to apply).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from growjax.errors import UserError
from growjax.models.growth import Growth


@dataclasses.dataclass(frozen=True)
class Method:
    name: str  # the value of config.growth.method
    label: str  # in tables, figures and logs
    pretrained: bool  # starts from pretrained weights (False: from random init)
    grows: bool  # adds units or layers (False: a baseline that keeps the architecture's width and depth)
    growth: Callable[[Any], Growth | None]  # the Growth spec, from config.growth (units, norm_scale, ...)
    summary: str  # one line for the docs


def _none(settings) -> None:
    del settings


def _paper(preset: Callable[..., Growth], norm_scale: bool | None = None) -> Callable[[Any], Growth]:
    """A paper preset of S = settings.units; norm_scale from the settings unless the method fixes it."""
    def growth(settings) -> Growth:
        return preset(settings.units, norm_scale=settings.norm_scale if norm_scale is None else norm_scale,
                      scale_init=settings.scale_init)
    return growth


METHODS: dict[str, Method] = {m.name: m for m in (
    Method('scratch', 'scratch', False, False, _none,
           'the plain architecture from random init: the sanity baseline every method must beat'),
    Method('finetune', 'fine-tune', True, False, _none,
           'the pretrained network with a new classifier, no growth'),
    Method('wa', 'WA-grow', True, True, _paper(Growth.wa),
           'fc7 widened by S units fed by fc6; NormScale where old and new units meet (growth.norm_scale)'),
    Method('wa_ori', 'WA-ori (no norm)', True, True, _paper(Growth.wa, norm_scale=False),
           "WA without normalisation and scaling: the paper's 'ori'"),
    Method('da', 'DA', True, True, _paper(Growth.da), 'a new layer fc_a of S units on top of fc7'),
    Method('dwa', 'DWA', True, True, _paper(Growth.dwa), 'fc7 widened by S units, and fc_a (S units) on top'),
    Method('wwa', 'WWA', True, True, _paper(Growth.wwa),
           'fc6 widened by S/2 and fc7 by S units (fc7+ reads [fc6, fc6+])'),
    Method('lora', 'LoRA', True, False, lambda settings: Growth.lora_preset(settings.lora_rank),
           'low-rank adapters (rank growth.lora_rank) on fc6 and fc7: the parameter-efficient baseline'),
)}


def get(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f'Unknown growth method {name!r}; methods: {list(METHODS)}.')
    return METHODS[name]
