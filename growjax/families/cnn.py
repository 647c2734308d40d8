"""growjax's CNNs: the small CNN of the built-in data, AlexNet and VGG16 (fc6 -> fc7 -> classifier
heads) and the ResNets. They grow by a `Growth` spec the models apply themselves
(growjax.models.growth); published torchvision / timm / transformers weights are read by
growjax.pretrained.from_torch.
"""
from __future__ import annotations

from typing import Callable

import ml_collections

from growjax import models, pretrained
from growjax.errors import ConfigError
from growjax.families.base import Family, Need, compute_dtype
from growjax.models.growth import Growth
from growjax.models.resnet import PAPER_LAYERS as RESNET_LAYERS

FC_WIDTH_MODELS = ('small_cnn',)  # the models whose fc6/fc7 units model.fc_width sets
RESNETS = ('resnet18', 'resnet50')  # no fc6/fc7: the paper's methods act on their last two stages


def parse_layer_counts(spec: str, key: str) -> dict[str, int]:
    """'stage3=64,stage4=128' -> {'stage3': 64, 'stage4': 128}; errors name the config key."""
    counts = {}
    for item in filter(None, (part.strip() for part in spec.split(','))):
        layer, _, count = item.partition('=')
        if not layer or not count.strip().isdigit() or int(count) <= 0:
            raise ConfigError(f'config.{key}: {item!r} is not layer=positive_integer (e.g. \'stage4=128\').')
        counts[layer.strip()] = int(count)
    return counts


def _none(settings) -> None:
    del settings


def _paper(preset: Callable[..., Growth], norm_scale: bool | None = None) -> Callable[..., Growth]:
    """A paper preset of S = settings.units; norm_scale from the settings unless the method fixes it."""
    def growth(settings) -> Growth:
        return preset(settings.units, norm_scale=settings.norm_scale if norm_scale is None else norm_scale,
                      scale_init=settings.scale_init)
    return growth


def growth_spec(config: ml_collections.ConfigDict) -> Growth | None:
    """The model's Growth: the method's, plus any explicit growth.widen / growth.deepen entries.

    ResNets have no fc6/fc7, so there the paper's methods act on the last two stages
    (growjax.models.resnet.PAPER_LAYERS), and fc_a is one residual block inserted at the end of stage4.
    """
    g = config.growth
    spec = FAMILY.growth[g.method](g)
    widen, deepen = (spec.widen_by, spec.deepen_by) if spec else ({}, {})
    if config.model.name in RESNETS:
        widen = {RESNET_LAYERS[layer]: units for layer, units in widen.items()}
        deepen = {RESNET_LAYERS[layer]: 1 for layer in deepen}
    widen.update(parse_layer_counts(g.widen, 'growth.widen'))
    deepen.update(parse_layer_counts(g.deepen, 'growth.deepen'))
    lora = spec.lora_ranks if spec else {}
    classifier_norm = bool(spec and spec.classifier_norm)
    if not widen and not deepen and not lora and not classifier_norm:
        return None
    norm_scale = spec.norm_scale if spec else g.norm_scale  # a method may fix it (wa_ori)
    return Growth(widen=widen, deepen=deepen, norm_scale=norm_scale, scale_init=g.scale_init, lora=lora,
                  classifier_norm=classifier_norm)


class CNNs(Family):
    models = ('small_cnn', 'alexnet', 'vgg16', 'resnet18', 'resnet50')
    label = 'CNNs'
    growth = {
        'scratch': _none,
        'finetune': _none,
        'wa': _paper(Growth.wa),
        'wa_ori': _paper(Growth.wa, norm_scale=False),
        'da': _paper(Growth.da),
        'dwa': _paper(Growth.dwa),
        'wwa': _paper(Growth.wwa),
        'lora': lambda settings: Growth.lora_preset(settings.lora_rank),
        'normscale': lambda settings: Growth.norm_only(norm_scale=settings.norm_scale,
                                                      scale_init=settings.scale_init),
    }
    published = {
        'alexnet': 'torchvision AlexNet ImageNet weights (alexnet-owt-7be5be79.pth)',
        'vgg16': 'torchvision VGG16 ImageNet weights (vgg16-397923af.pth)',
        'resnet50': 'torchvision ResNet-50 ImageNet weights (resnet50-0676ba61.pth or resnet50-11ad3fa6.pth)',
    }
    weight_suffixes = pretrained.WEIGHT_FILE_SUFFIXES

    def add_keys(self, config):
        config.model.fc_width = 0  # small_cnn: units of fc6 and fc7 (0: 256 x width), the source model's capacity

    def validate(self, config, need: Need):
        need(config.model.fc_width >= 0, 'model.fc_width', f'must be >= 0 (0: 256 x model.width), got '
             f'{config.model.fc_width}.')
        need(not config.model.fc_width or config.model.name in FC_WIDTH_MODELS, 'model.fc_width',
             f'sets the fc6/fc7 units of {", ".join(FC_WIDTH_MODELS)} only, not of {config.model.name!r}.')
        for key in ('widen', 'deepen'):
            parse_layer_counts(config.growth[key], f'growth.{key}')
        if config.growth.method == 'normscale':  # NormScale where the classifier reads fc7: nothing else
            need(config.model.name not in RESNETS, 'growth.method',
                 f"'normscale' rescales fc7 where the classifier reads it; {config.model.name} has no fc6/fc7 head.")
            need(config.growth.norm_scale, 'growth.norm_scale',
                 "must be True with growth.method='normscale' (NormScale only without NormScale is plain "
                 'fine-tuning: use growth.method=finetune).')

    def build(self, config, num_classes):
        kwargs = {'width': config.model.width, 'dtype': compute_dtype(config)}
        if 'dropout_rate' in models.options(config.model.name):  # ResNets have no dropout
            kwargs['dropout_rate'] = config.model.dropout_rate
        if config.model.fc_width:  # validate checks the model has fc6/fc7
            kwargs['fc_width'] = config.model.fc_width
        return models.get(config.model.name, num_classes=num_classes, growth=growth_spec(config), **kwargs)

    def description(self, config):
        return {'fc_width': config.model.fc_width} if config.model.fc_width else {}

    def drop_unshaping(self, model_settings, name):
        if not model_settings.get('fc_width'):
            model_settings.pop('fc_width', None)  # the default: source models cached before the key existed stay valid

    def load_published(self, config, path, sharding):
        return pretrained.from_torch(path, config.model.name, width=config.model.width, sharding=sharding)

    def preset(self, config, model):
        config.model.dropout_rate = 0.5 if model in ('alexnet', 'vgg16') else 0.0  # their published heads have it


FAMILY = CNNs()
