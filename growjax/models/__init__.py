"""Growable models by name: `growjax.models.get(name, num_classes=..., growth=..., **kwargs)`."""
from __future__ import annotations

from growjax.models.growth import Growth
from growjax.models.head import FcHeadNet
from growjax.models.small_cnn import SmallCNN

_REGISTRY = {
    'small_cnn': SmallCNN,
}


def get(name: str, *, num_classes: int, growth: Growth | None = None, **kwargs):
    """The Flax module `name` for `num_classes` classes, grown as `growth` says (None: as pretrained).

    Extra keyword arguments are the model's own fields (e.g. `width`, `dropout_rate`, `dtype`).
    """
    if name not in _REGISTRY:
        raise ValueError(f'Unknown model {name!r}; available: {sorted(_REGISTRY)}.')
    cls = _REGISTRY[name]
    fields = set(cls.__dataclass_fields__) - {'parent', 'name'}
    unknown = set(kwargs) - fields
    if unknown:
        raise ValueError(f'Model {name!r} has no option(s) {sorted(unknown)}; options: {sorted(fields)}.')
    return cls(num_classes=num_classes, growth=growth, **kwargs)


def names() -> list[str]:
    return sorted(_REGISTRY)
