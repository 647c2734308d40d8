"""Parameter groups from tree paths: which leaves are new, which train, and at what learning rate.

By principle 1 (pretrained leaves keep their paths) "new" is just "a path the pretrained tree
lacks, or one reinitialised on purpose". Regimes (the paper's Table 1) pick which pretrained
layers train; frozen leaves are split off before differentiation so they cost no gradient work.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from growjax.grow import Path, check_patterns_used, compile_patterns, flatten, matches_any, path_str, pure, unflatten

PRETRAINED, NEW = 'pretrained', 'new'


def param_labels(params: Mapping, pretrained_params: Mapping, reinit: str | Iterable[str] = ()) -> dict:
    """A tree like `params` of 'pretrained' / 'new' strings.

    `pretrained_params` may be the values or just their shapes (jax.eval_shape of the ungrown
    model). Reinit patterns are matched as in grow_params, so a reinitialised classifier is new.
    Either tree may be a Flax NNX nnx.State (or its pure dict); the result is a pure dict.
    """
    patterns = compile_patterns(reinit)
    pretrained_flat = flatten(pretrained_params)
    if pretrained_flat:
        check_patterns_used(patterns, pretrained_flat)
    return unflatten({
        path: NEW if path not in pretrained_flat or matches_any(path, patterns) else PRETRAINED
        for path in flatten(params)})


def _layer_groups(layer_order: Sequence[str]) -> list[str]:
    """Layer names and their prefixes before the first '_', in order: 'stage4_block0' gives 'stage4'."""
    groups = []
    for layer in layer_order:
        for name in (layer.split('_')[0], layer):
            if name not in groups:
                groups.append(name)
    return groups


def regime_names(layer_order: Sequence[str]) -> list[str]:
    """The regimes a model supports: 'new', '<layer>_new' for each top-level layer or layer prefix
    (e.g. 'fc7_new', 'stage4_new'), and 'all'."""
    return ['new', *(f'{name}_new' for name in _layer_groups(layer_order)), 'all']


def trainable_mask(labels: Mapping, regime: str, layer_order: Sequence[str]) -> dict:
    """A tree of bools: which leaves train under `regime` (the paper's Table 1).

    'new': only new leaves (new layers, new fan-in, the new classifier). '<name>_new': new leaves
    plus every pretrained leaf from the first top-level layer called `name` (or starting with
    `name_`) upwards in `layer_order`, e.g. 'fc7_new' or, for ResNets, 'stage4_new'. 'all': all.
    `layer_order` lists the pretrained top-level layer names bottom to top (see `forward_order`).
    """
    valid = regime_names(layer_order)
    if regime not in valid:
        raise ValueError(f'Unknown regime {regime!r}; this model supports {valid}.')
    if regime == 'all':
        trainable_layers = set(layer_order)
    elif regime == 'new':
        trainable_layers = set()
    else:
        name = regime[:-len('_new')]
        start = next(i for i, layer in enumerate(layer_order) if layer == name or layer.startswith(name + '_'))
        trainable_layers = set(layer_order[start:])
    return unflatten({
        path: label == NEW or path[0] in trainable_layers for path, label in flatten(labels).items()})


def forward_order(model, rng: jax.Array, *sample_args) -> list[str]:
    """Top-level parameter names of `model` in the order the forward pass creates them.

    Flax's init records modules in call order, which for a feed-forward network is bottom to top;
    this avoids a hand-written layer list per model. Costs no computation: the init is only traced
    (and the order read inside the trace, since pytree flattening would sort the keys).
    """
    order: list[str] = []

    def record(key):
        order.extend(model.init(key, *sample_args)['params'])

    jax.eval_shape(record, rng)
    return order


def pretrained_layer_order(model, pretrained_params: Mapping | None, rng: jax.Array, *sample_args) -> list[str]:
    """The top-level layers of the grown `model` that hold pretrained leaves, bottom to top.

    Regimes count from these. They come from the grown model itself, not from its plain
    architecture, so layers added by an earlier growth round (e.g. `fc7_plus` in a grown export
    grown again) are pretrained layers in their forward position. With no pretrained tree
    (training from scratch) every layer counts.
    """
    order = forward_order(model, rng, *sample_args)
    return order if not pretrained_params else [name for name in order if name in pretrained_params]


@dataclasses.dataclass(frozen=True)
class ParamGroups:
    """Which leaves of a grown model are new, and which train under a regime."""
    labels: dict  # 'pretrained' / 'new' per leaf
    mask: dict  # True where the leaf trains
    layer_order: tuple[str, ...]  # the pretrained top-level layers, bottom to top

    @property
    def trainable_labels(self) -> dict:
        """The labels of the trainable leaves only (the tree the optimiser sees)."""
        return split(self.labels, self.mask)[0]

    def trains(self, layer: str) -> bool:
        """Whether any leaf of top-level `layer` trains."""
        return any(jax.tree_util.tree_leaves(self.mask.get(layer, {})))


def param_groups(model, pretrained_params: Mapping | None, regime: str, *sample_args,
                 reinit: str | Iterable[str] = ()) -> ParamGroups:
    """Labels, layer order and regime mask of `model` grown from `pretrained_params` (None: from
    scratch, every leaf new). Reads shapes only: nothing is initialised or computed.

    The one place where a training set-up decides what trains; the main job, the paper's runner
    and research code all call it.

    `model` may be a Flax NNX module (e.g. grown by growjax.nnx_surgery.grow), which holds its
    parameters: its nnx.Param state is labelled (pure dicts), no sample args are needed, and the
    layer order is the order its `__init__` assigns its top-level attributes.
    """
    from flax import nnx  # only NNX models need it
    if isinstance(model, nnx.Module):
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        pretrained = pure(pretrained_params) or {}
        labels = param_labels(params, pretrained, reinit=reinit)
        order = [name for name in vars(model) if name in params and (not pretrained or name in pretrained)]
        return ParamGroups(labels=labels, mask=trainable_mask(labels, regime, order), layer_order=tuple(order))
    rng = jax.random.key(0)  # shapes and names do not depend on it
    shapes = jax.eval_shape(lambda: model.init(rng, *sample_args))  # closed over: a `train` flag stays Python
    labels = param_labels(shapes['params'], pretrained_params or {}, reinit=reinit)
    order = pretrained_layer_order(model, pretrained_params, rng, *sample_args)
    return ParamGroups(labels=labels, mask=trainable_mask(labels, regime, order), layer_order=tuple(order))


def split(tree: Mapping, mask: Mapping) -> tuple[dict, dict]:
    """(trainable, frozen) sub-trees of `tree`; `merge` puts them back together."""
    mask_flat = flatten(mask)
    trainable, frozen = {}, {}
    for path, leaf in flatten(tree).items():
        (trainable if mask_flat[path] else frozen)[path] = leaf
    return unflatten(trainable), unflatten(frozen)


def merge(trainable: Mapping, frozen: Mapping) -> dict:
    return unflatten({**flatten(frozen), **flatten(trainable)})


class ScaleByGroupState(NamedTuple):
    """No state: the multipliers are static, derived from tree paths."""


def scale_by_group(labels: Mapping, multipliers: Mapping[str, float]) -> optax.GradientTransformation:
    """Multiplies each leaf's update by the multiplier of its label (paper: new layers at 10x).

    Put it after the optimiser (e.g. `optax.chain(sgd, scale_by_group(...))`): for SGD with
    momentum that is exactly a per-group learning rate. `labels` must be shaped like the updates.
    """
    missing = {label for label in jax.tree_util.tree_leaves(labels)} - set(multipliers)
    if missing:
        raise ValueError(f'scale_by_group: no multiplier for label(s) {sorted(missing)}; got {dict(multipliers)}.')

    def init_fn(params):
        del params
        return ScaleByGroupState()

    def scale(label, update):
        if isinstance(update, optax.MaskedNode):  # inside multi_transform / masked: another group's leaf
            return update
        return update * jnp.asarray(multipliers[label], update.dtype)

    def update_fn(updates, state, params=None):
        del params
        return jax.tree_util.tree_map(scale, labels, updates), state

    return optax.GradientTransformation(init_fn, update_fn)


FROZEN = 'frozen'


def growth_optimizer(optimizer: optax.GradientTransformation, groups: ParamGroups, *,
                     new_lr_multiplier: float = 10.0, pretrained_lr_multiplier: float = 1.0,
                     ) -> optax.GradientTransformation:
    """Any optax `optimizer` for a grown model: it updates only the leaves that train under the
    regime (`groups.mask`), new leaves at `new_lr_multiplier` x its learning rate (the paper: 10x).

    Frozen leaves get zero updates and no optimiser state (optax.masked). For research code that
    differentiates the whole tree; the main job's step goes further and never computes their
    gradients (growjax.steps). Its structure does not depend on the labels, so after growing again
    `grow_opt_state(state, old_params, new_params, optimizer=growth_optimizer(optimizer, new_groups))`
    carries the state over.
    """
    mask = flatten(groups.mask)
    labels = unflatten({path: label if mask[path] else FROZEN for path, label in flatten(groups.labels).items()})
    return optax.chain(
        optax.masked(optimizer, groups.mask),
        scale_by_group(labels, {PRETRAINED: pretrained_lr_multiplier, NEW: new_lr_multiplier, FROZEN: 0.0}),
    )


def describe(labels: Mapping, mask: Mapping, params: Mapping) -> str:
    """A one-line-per-layer summary (label, trains?, parameter count) for logs."""
    counts: dict[tuple[str, str, bool], int] = {}
    mask_flat = flatten(mask)
    params_flat = flatten(params)
    for path, label in flatten(labels).items():
        key = (path[0], label, bool(mask_flat[path]))
        counts[key] = counts.get(key, 0) + int(jnp.size(params_flat[path]))
    return '\n'.join(f'{layer:24s} {label:10s} {"train" if trains else "frozen":6s} {n:>12,d}'
                     for (layer, label, trains), n in counts.items())
