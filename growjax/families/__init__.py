"""Model families by name: the one registry through which the trainer, config_lib and the growth
methods reach what is specific to a model (its module, config keys and defaults, how each growth
method applies to it, its published-weights loader, its own job if it has one).

Adding a family is one module with a `FAMILY` (a growjax.families.base.Family) and one line in
FAMILIES below; docs/design.md ("Adding a model family") shows it with the GPT.
"""
from __future__ import annotations

import ml_collections

from growjax.errors import ConfigError, UserError
from growjax.families import cnn, gpt, vit
from growjax.families.base import Family

FAMILIES: tuple[Family, ...] = (
    cnn.FAMILY,
    vit.FAMILY,
    gpt.FAMILY,
)
_BY_MODEL = {name: family for family in FAMILIES for name in family.models}


def model_names() -> list[str]:
    return list(_BY_MODEL)


def get(model_name: str) -> Family:
    """The family of growjax.models name `model_name` (config.model.name)."""
    if model_name not in _BY_MODEL:
        raise ConfigError(f'config.model.name: {model_name!r} is not one of {model_names()}.')
    return _BY_MODEL[model_name]


def of(config: ml_collections.ConfigDict) -> Family:
    return get(config.model.name)


def supporting(method: str) -> list[str]:
    """The labels of the families that growth.method `method` applies to."""
    return [family.label for family in FAMILIES if method in family.growth]


def check_method(family: Family, method: str) -> None:
    """An error naming the families that have growth.method `method`, when `family` has not."""
    if method not in family.growth:
        others = supporting(method)
        where = f'applies to {" and ".join(others)} only' if others else 'applies to no model family'
        raise UserError(f'growth.method={method!r} {where}; methods for {family.label}: {list(family.growth)}.')


def build(config: ml_collections.ConfigDict, num_classes: int):
    """The (grown) model the config describes, built by its family."""
    family = of(config)
    check_method(family, config.growth.method)
    return family.build(config, num_classes)


def published_weights() -> dict[str, str]:
    """{model name: the published weights its real-data presets need}, over all families."""
    return {name: what for family in FAMILIES for name, what in family.published.items()}
