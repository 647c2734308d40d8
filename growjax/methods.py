"""The growth methods by name: the one registry that configs, models, experiments and reports read.

A method says how a pretrained network is changed before fine-tuning (the paper's WA, DA, DWA,
WWA, and the baselines it is compared with), for each family of models: a `Growth` spec for
growjax's fc-head CNNs and ResNets (`growth`), and growjax.surgery operations for its ViT (`vit`).
Adding a method is one entry here (plus, for a new kind of growth, its implementation).

The settings a method reads are config.growth's: units (S), norm_scale, scale_init, lora_rank,
blocks (ViT: how many top blocks grow) and heads (ViT: heads added per block).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn

from growjax import surgery
from growjax.errors import UserError
from growjax.models.growth import Growth
from growjax.models.vit import EncoderBlock, gelu as vit_gelu  # the ViT's own exact GELU, for its new units


@dataclasses.dataclass(frozen=True)
class Method:
    name: str  # the value of config.growth.method
    label: str  # in tables, figures and logs
    pretrained: bool  # starts from pretrained weights (False: from random init)
    grows: bool  # adds units or layers (False: a baseline that keeps the architecture's width and depth)
    growth: Callable[[Any], Growth | None] | None  # CNNs: the Growth spec (None: not for CNNs)
    vit: Callable[[Any, Any], list[surgery.Operation]] | None  # ViT: (settings, the ViT) -> operations
    summary: str  # one line for the docs

    def operations(self, settings, vit) -> list[surgery.Operation]:
        """The surgery operations of this method on `vit` (growjax.models.vit.ViT)."""
        if self.vit is None:
            raise UserError(f'growth.method={self.name!r} has no ViT version; ViT methods: '
                            f'{[m.name for m in METHODS.values() if m.vit is not None]}.')
        return self.vit(settings, vit)

    def growth_spec(self, settings) -> Growth | None:
        """The Growth spec of this method for growjax's CNNs."""
        if self.growth is None:
            raise UserError(f'growth.method={self.name!r} applies to ViTs only; CNN methods: '
                            f'{[m.name for m in METHODS.values() if m.growth is not None]}.')
        return self.growth(settings)


def _none(settings, *model) -> None | list:
    del settings
    return [] if model else None


def _paper(preset: Callable[..., Growth], norm_scale: bool | None = None) -> Callable[[Any], Growth]:
    """A paper preset of S = settings.units; norm_scale from the settings unless the method fixes it."""
    def growth(settings) -> Growth:
        return preset(settings.units, norm_scale=settings.norm_scale if norm_scale is None else norm_scale,
                      scale_init=settings.scale_init)
    return growth


# ---------------------------------------------------------------------------------------------
# The paper's methods on growjax's ViT (growjax.models.vit: blocks 'block0'.., each with 'attention'
# and 'mlp/fc1' -> GELU -> 'mlp/fc2'): its MLP hidden layers play fc7's part, new blocks fc_a's.


def _top_blocks(settings, vit) -> range:
    depth = vit.dims.depth
    if settings.blocks > depth:
        raise UserError(f'growth.blocks={settings.blocks}, but the ViT has {depth} blocks.')
    return range(depth - settings.blocks, depth)


def _widen_mlp(vit, block: int, units: int, settings, norm_scale: bool) -> surgery.Widen:
    return surgery.Widen(f'block{block}/mlp/fc1', units=units, into=f'block{block}/mlp/fc2',
                         activation=nn.gelu if vit.approximate_gelu else vit_gelu, norm_scale=norm_scale,
                         scale_init=settings.scale_init)


def _vit_wa(norm_scale: bool | None = None):
    """WA: the MLP hidden layer of each of the top `blocks` blocks gains S units (NormScale at fc2)."""
    def operations(settings, vit):
        ns = settings.norm_scale if norm_scale is None else norm_scale
        return [_widen_mlp(vit, block, settings.units, settings, ns) for block in _top_blocks(settings, vit)]
    return operations


def _vit_da(settings, vit) -> list[surgery.Operation]:
    """DA: `blocks` new encoder blocks on top, each starting as the identity (its attention output
    and its MLP's fc2 start at zero)."""
    dims = vit.dims

    def block():
        return EncoderBlock(dims.num_heads, dims.mlp_dim, vit.dropout_rate, vit.attention_dropout_rate,
                            vit.approximate_gelu, vit.dtype)

    last = f'block{dims.depth - 1}'
    operations = []
    for _ in range(settings.blocks):
        operations.append(surgery.InsertAfter(last, block=block, residual=False, zero='attention/out|mlp/fc2'))
        last = f'{last}_inserted'
    return operations


def _vit_dwa(settings, vit) -> list[surgery.Operation]:
    return _vit_wa()(settings, vit) + _vit_da(settings, vit)


def _vit_wwa(settings, vit) -> list[surgery.Operation]:
    """WWA: the top block's MLP gains S units and the one below S/2 (fc7 + S, fc6 + S/2)."""
    depth = vit.dims.depth
    if depth < 2:
        raise UserError('growth.method=wwa widens the top two blocks; this ViT has one.')
    return [_widen_mlp(vit, depth - 2, max(1, settings.units // 2), settings, settings.norm_scale),
            _widen_mlp(vit, depth - 1, settings.units, settings, settings.norm_scale)]


def _vit_heads(settings, vit) -> list[surgery.Operation]:
    """`heads` new attention heads in each of the top `blocks` blocks (NormScale where the output
    projection reads old and new heads)."""
    return [surgery.AddHeads(f'block{block}/attention', heads=settings.heads, norm_scale=settings.norm_scale,
                             scale_init=settings.scale_init) for block in _top_blocks(settings, vit)]


def _vit_lora(settings, vit) -> list[surgery.Operation]:
    """LoRA on every block's attention projections: the baseline a researcher would pick today."""
    return [surgery.LoRA(r'block\d+/attention/(query|key|value|out)', rank=settings.lora_rank)]


METHODS: dict[str, Method] = {m.name: m for m in (
    Method('scratch', 'scratch', False, False, _none, _none,
           'the plain architecture from random init: the sanity baseline every method must beat'),
    Method('finetune', 'fine-tune', True, False, _none, _none,
           'the pretrained network with a new classifier, no growth'),
    Method('wa', 'WA-grow', True, True, _paper(Growth.wa), _vit_wa(),
           'fc7 (ViT: the MLP of the top `blocks` blocks) widened by S units; NormScale where old and new meet'),
    Method('wa_ori', 'WA-ori (no norm)', True, True, _paper(Growth.wa, norm_scale=False), _vit_wa(norm_scale=False),
           "WA without normalisation and scaling: the paper's 'ori'"),
    Method('da', 'DA', True, True, _paper(Growth.da), _vit_da,
           'a new layer fc_a of S units on top of fc7 (ViT: `blocks` new encoder blocks on top, the identity at first)'),
    Method('dwa', 'DWA', True, True, _paper(Growth.dwa), _vit_dwa, 'WA, and DA on top'),
    Method('wwa', 'WWA', True, True, _paper(Growth.wwa), _vit_wwa,
           'fc6 widened by S/2 and fc7 by S units (ViT: the MLPs of the top two blocks)'),
    Method('heads', 'more heads', True, True, None, _vit_heads,
           'ViT only: `heads` new attention heads in each of the top `blocks` blocks'),
    Method('lora', 'LoRA', True, False, lambda settings: Growth.lora_preset(settings.lora_rank), _vit_lora,
           'low-rank adapters of rank lora_rank (CNNs: on fc6 and fc7; ViT: on every attention projection)'),
)}


def get(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f'Unknown growth method {name!r}; methods: {list(METHODS)}.')
    return METHODS[name]
