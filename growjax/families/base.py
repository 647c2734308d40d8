"""The contract of a model family: what the trainer, config_lib and the method registry ask of it.

A family is one module under growjax/families/ holding everything specific to some models: their
config keys and defaults, how each growth method applies to them, how to build them from a config,
what shapes their cached source model, and where their published weights are read (growjax.pretrained).
The base class answers for a family that has nothing special; a family overrides what it has.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from growjax.errors import ConfigError

Need = Callable[[bool, str, str], None]  # need(condition, key, message): raises ConfigError('config.KEY: MESSAGE')


def compute_dtype(config: ml_collections.ConfigDict):
    """config.model.dtype as the models take it (None: float32)."""
    return jnp.bfloat16 if config.model.dtype == 'bfloat16' else None


class Family:
    models: tuple[str, ...] = ()  # the growjax.models names it serves (config.model.name)
    label: str = ''  # plural, in messages: 'CNNs'
    # growth.method name -> how that method applies to these models (the family's build reads it)
    growth: Mapping[str, Callable[..., Any]] = {}
    classifier: tuple[str, ...] = ('^classifier/',)  # regexes of the leaves a new task re-initialises
    published: Mapping[str, str] = {}  # model name -> the published weights its real-data presets need
    weight_suffixes: tuple[str, ...] = ()  # files of published weights that load_published reads
    # Its own kind of run, (config, workdir, eval_hooks) -> summary; None: train's grow-and-fine-tune job.
    job: Callable[..., dict] | None = None

    def add_keys(self, config: ml_collections.ConfigDict) -> None:
        """Adds the config keys this family owns to the fine-tune job's base config (documented there)."""

    def defaults(self, config: ml_collections.ConfigDict) -> None:
        """Turns the base config into this family's default experiment (config_lib.family_config)."""
        config.model.name = self.models[0]
        config.init.reinit = self.classifier

    def validate(self, config: ml_collections.ConfigDict, need: Need) -> None:
        """Checks the keys this family owns (called for every config, whichever model it names)."""

    def build(self, config: ml_collections.ConfigDict, num_classes: int):
        """The (grown) Flax model the config describes."""
        raise NotImplementedError

    def description(self, config: ml_collections.ConfigDict) -> dict:
        """What an export's model.json records of this family's settings, beyond the common ones."""
        return {}

    def drop_unshaping(self, model_settings: dict, name: str) -> None:
        """Removes from config.model's settings the keys of this family that do not shape model `name`
        (the built-in source model's cache key)."""

    def pretrain(self, source: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
        """Changes the built-in source-task run (config_lib.pretrain_config) needs for these models."""

    def load_published(self, config: ml_collections.ConfigDict, path: str, sharding: jax.sharding.Sharding | None):
        """Variables from a published weights file (one of weight_suffixes)."""
        raise ConfigError(f'config.init.pretrained: {self.label} have no published-weights loader ({path}).')

    def preset(self, config: ml_collections.ConfigDict, model: str) -> None:
        """Changes a real-data preset of `model` needs (config_lib.apply_preset)."""
