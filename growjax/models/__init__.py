"""Growable models by name: `growjax.models.get(name, num_classes=..., growth=..., **kwargs)`."""
from __future__ import annotations

import dataclasses

from growjax.models.alexnet import AlexNet
from growjax.models.gpt import GPT
from growjax.models.growth import Growth
from growjax.models.head import FcHeadNet
from growjax.models.resnet import ResNet18, ResNet50
from growjax.models.small_cnn import SmallCNN
from growjax.models.vgg import VGG16
from growjax.models.vit import ViT

_REGISTRY = {
    'small_cnn': SmallCNN,
    'alexnet': AlexNet,
    'vgg16': VGG16,
    'resnet18': ResNet18,
    'resnet50': ResNet50,
    'vit': ViT,
    'gpt': GPT,
}


def get(name: str, *, num_classes: int, growth: Growth | None = None, **kwargs):
    """The Flax module `name` for `num_classes` classes, grown as `growth` says (None: as pretrained).

    Extra keyword arguments are the model's own fields (e.g. `width`, `dropout_rate`, `dtype`). A
    language model's classes are its vocabulary: 'gpt' takes `num_classes` as its `vocab_size`.
    """
    if name not in _REGISTRY:
        raise ValueError(f'Unknown model {name!r}; available: {sorted(_REGISTRY)}.')
    cls = _REGISTRY[name]
    fields = options(name)
    unknown = set(kwargs) - fields
    if unknown:
        raise ValueError(f'Model {name!r} has no option(s) {sorted(unknown)}; options: {sorted(fields)}.')
    if 'num_classes' not in fields:
        if kwargs.setdefault('vocab_size', num_classes) != num_classes:
            raise ValueError(f'Model {name!r}: vocab_size={kwargs["vocab_size"]} contradicts num_classes={num_classes} '
                             '(its classes are its vocabulary; pass num_classes only).')
        return cls(growth=growth, **kwargs)
    return cls(num_classes=num_classes, growth=growth, **kwargs)


def options(name: str) -> set[str]:
    """The keyword options of model `name` (its dataclass fields, ClassVars excluded)."""
    return {field.name for field in dataclasses.fields(_REGISTRY[name])} - {'parent', 'name'}


def names() -> list[str]:
    return sorted(_REGISTRY)
