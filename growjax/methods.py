"""The growth methods by name: the one registry that configs, models, experiments and reports read.

A method says how a pretrained network is changed before fine-tuning (the paper's WA, DA, DWA,
WWA, and the baselines it is compared with): its name, label and whether it starts from
pretrained weights or grows. How it applies to each kind of model is that model family's
(growjax.families: `Family.growth`, keyed by these names). Adding a method is one entry here plus
its implementation in the families it applies to.

The settings a method reads are config.growth's: units (S), norm_scale, scale_init, lora_rank,
blocks (ViT: how many top blocks grow) and heads (ViT: heads added per block).
"""
from __future__ import annotations

import dataclasses

from growjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Method:
    name: str  # the value of config.growth.method
    label: str  # in tables, figures and logs
    pretrained: bool  # starts from pretrained weights (False: from random init)
    grows: bool  # adds units or layers (False: a baseline that keeps the architecture's width and depth)
    summary: str  # one line for the docs


METHODS: dict[str, Method] = {m.name: m for m in (
    Method('scratch', 'scratch', False, False,
           'the plain architecture from random init: the sanity baseline every method must beat'),
    Method('finetune', 'fine-tune', True, False, 'the pretrained network with a new classifier, no growth'),
    Method('wa', 'WA-grow', True, True,
           'fc7 (ViT: the MLP of the top `blocks` blocks) widened by S units; NormScale where old and new meet'),
    Method('wa_ori', 'WA-ori (no norm)', True, True, "WA without normalisation and scaling: the paper's 'ori'"),
    Method('da', 'DA', True, True,
           'a new layer fc_a of S units on top of fc7 (ViT: `blocks` new encoder blocks on top, the identity at first)'),
    Method('dwa', 'DWA', True, True, 'WA, and DA on top'),
    Method('wwa', 'WWA', True, True, 'fc6 widened by S/2 and fc7 by S units (ViT: the MLPs of the top two blocks)'),
    Method('heads', 'more heads', True, True, 'ViT only: `heads` new attention heads in each of the top `blocks` blocks'),
    Method('normscale', 'NormScale only', True, False,
           "no new units: the classifier reads gamma * fc7 / ||fc7|| (WA-grow's rescaling of the old units "
           'alone, its control; CNNs with fc heads)'),
    Method('lora', 'LoRA', True, False,
           'low-rank adapters of rank lora_rank (CNNs: on fc6 and fc7; ViT: on every attention projection)'),
)}


def get(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f'Unknown growth method {name!r}; methods: {list(METHODS)}.')
    return METHODS[name]
