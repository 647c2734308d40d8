"""growjax's ViT (growjax.models.vit): config keys model.vit.*, the paper's methods as
growjax.surgery operations, the built-in source run's optimiser, and published weights (timm and
torchvision through growjax.pretrained.from_torch, big_vision's .npz through from_big_vision).

The paper's methods on the ViT (blocks 'block0'.., each with 'attention' and 'mlp/fc1' -> GELU ->
'mlp/fc2'): its MLP hidden layers play fc7's part, new blocks fc_a's. The settings read are
config.growth's: units (S), norm_scale, scale_init, lora_rank, blocks (how many top blocks grow)
and heads (heads added per block).
"""
from __future__ import annotations

import flax.linen as nn
import ml_collections

from growjax import models, pretrained, surgery
from growjax.errors import ConfigError, UserError
from growjax.families.base import Family, Need, compute_dtype
from growjax.models.vit import EncoderBlock, gelu as vit_gelu  # the ViT's own exact GELU, for its new units

BIG_VISION_SUFFIX = '.npz'  # big_vision / the original ViT code's checkpoints
SIZE_KEYS = ('width', 'depth', 'mlp_dim', 'num_heads', 'representation_size')


def _none(settings, vit) -> list:
    del settings, vit
    return []


def _top_blocks(settings, vit) -> range:
    depth = vit.dims.depth
    if settings.blocks > depth:
        raise UserError(f'growth.blocks={settings.blocks}, but the ViT has {depth} blocks.')
    return range(depth - settings.blocks, depth)


def _widen_mlp(vit, block: int, units: int, settings, norm_scale: bool) -> surgery.Widen:
    return surgery.Widen(f'block{block}/mlp/fc1', units=units, into=f'block{block}/mlp/fc2',
                         activation=nn.gelu if vit.approximate_gelu else vit_gelu, norm_scale=norm_scale,
                         scale_init=settings.scale_init)


def _wa(norm_scale: bool | None = None):
    """WA: the MLP hidden layer of each of the top `blocks` blocks gains S units (NormScale at fc2)."""
    def operations(settings, vit):
        ns = settings.norm_scale if norm_scale is None else norm_scale
        return [_widen_mlp(vit, block, settings.units, settings, ns) for block in _top_blocks(settings, vit)]
    return operations


def _da(settings, vit) -> list[surgery.Operation]:
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


def _dwa(settings, vit) -> list[surgery.Operation]:
    return _wa()(settings, vit) + _da(settings, vit)


def _wwa(settings, vit) -> list[surgery.Operation]:
    """WWA: the top block's MLP gains S units and the one below S/2 (fc7 + S, fc6 + S/2)."""
    depth = vit.dims.depth
    if depth < 2:
        raise UserError('growth.method=wwa widens the top two blocks; this ViT has one.')
    return [_widen_mlp(vit, depth - 2, max(1, settings.units // 2), settings, settings.norm_scale),
            _widen_mlp(vit, depth - 1, settings.units, settings, settings.norm_scale)]


def _heads(settings, vit) -> list[surgery.Operation]:
    """`heads` new attention heads in each of the top `blocks` blocks (NormScale where the output
    projection reads old and new heads)."""
    return [surgery.AddHeads(f'block{block}/attention', heads=settings.heads, norm_scale=settings.norm_scale,
                             scale_init=settings.scale_init) for block in _top_blocks(settings, vit)]


def _lora(settings, vit) -> list[surgery.Operation]:
    """LoRA on every block's attention projections: the baseline a researcher would pick today."""
    del vit
    return [surgery.LoRA(r'block\d+/attention/(query|key|value|out)', rank=settings.lora_rank)]


class ViTs(Family):
    models = ('vit',)
    label = 'ViTs'
    growth = {'scratch': _none, 'finetune': _none, 'wa': _wa(), 'wa_ori': _wa(norm_scale=False), 'da': _da,
              'dwa': _dwa, 'wwa': _wwa, 'heads': _heads, 'lora': _lora}
    classifier = ('^head/',)
    published = {'vit': ("a ViT-B/16 checkpoint: timm's model.safetensors (e.g. vit_base_patch16_224.augreg_in21k), "
                         "torchvision's vit_b_16-c867db91.pth, or big_vision's .npz")}
    weight_suffixes = (*pretrained.WEIGHT_FILE_SUFFIXES, BIG_VISION_SUFFIX)

    def add_keys(self, config):
        config.model.vit = ml_collections.ConfigDict()  # model.name='vit' only (growjax.models.vit.ViT)
        config.model.vit.variant = 'Ti/4'      # big_vision's 'NAME/PATCH': mu, Ti, S, B, L; patch in pixels
        config.model.vit.width = 64            # 0: the variant's; else an explicit size (64 x 4 blocks: the built-in data)
        config.model.vit.depth = 4             # 0: the variant's number of blocks
        config.model.vit.mlp_dim = 256         # 0: the variant's
        config.model.vit.num_heads = 2         # 0: the variant's
        config.model.vit.pool_type = 'tok'     # 'tok' (class token) or 'gap' (mean of the tokens)
        config.model.vit.representation_size = 0  # a tanh pre-logits layer of this width (0: none)

    def defaults(self, config):
        """A 4-block, 64-wide ViT with 4x4 patches pretrained on the Latin letters, growing S = 128
        units (its MLP is 256 wide)."""
        super().defaults(config)
        config.init.pretrain_steps = 2000
        config.growth.units = 128

    def validate(self, config, need: Need):
        for key in SIZE_KEYS:
            need(config.model.vit[key] >= 0, f'model.vit.{key}', f'must be >= 0 (0: the variant\'s), got '
                 f'{config.model.vit[key]}.')

    def build(self, config, num_classes):
        v = config.model.vit
        vit = models.get('vit', num_classes=num_classes, variant=v.variant, width=v.width or None,
                         depth=v.depth or None, mlp_dim=v.mlp_dim or None, num_heads=v.num_heads or None,
                         pool_type=v.pool_type, representation_size=v.representation_size or None,
                         dropout_rate=config.model.dropout_rate, dtype=compute_dtype(config))
        for key in ('widen', 'deepen'):
            if config.growth[key]:
                raise ConfigError(f'config.growth.{key} is for CNNs; a ViT grows by growth.method '
                                  '(growth.units, growth.blocks, growth.heads).')
        operations = self.growth[config.growth.method](config.growth, vit)
        return surgery.grow(vit, operations) if operations else vit

    def description(self, config):
        return {'vit': config.model.vit.to_dict()}

    def drop_unshaping(self, model_settings, name):
        if name not in self.models:
            model_settings.pop('vit', None)  # the ViT's settings do not shape another model

    def pretrain(self, source, config):
        """A transformer trained from scratch needs Adam and a warm-up."""
        source.train.optimizer, source.train.learning_rate, source.train.weight_decay = 'adamw', 1e-3, 0.05
        source.train.warmup_steps = min(200, config.init.pretrain_steps // 10)

    def load_published(self, config, path, sharding):
        convert = pretrained.from_big_vision if path.endswith(BIG_VISION_SUFFIX) else pretrained.from_torch
        names = () if path.endswith(BIG_VISION_SUFFIX) else ('vit',)
        return convert(path, *names, variant=config.model.vit.variant, image_size=config.data.image_size,
                       sharding=sharding)

    def preset(self, config, model):
        """ViT-B/16 at 224 px; timm's and big_vision's weights expect [-1, 1] inputs."""
        config.model.vit.update(variant='B/16', width=0, depth=0, mlp_dim=0, num_heads=0)
        config.data.mean, config.data.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


FAMILY = ViTs()
