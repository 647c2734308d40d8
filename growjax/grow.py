"""Growing parameter trees: graft a pretrained tree into a grown model, and grow optimiser state.

Everything here is a pure function of trees and keys. Shape checks use only static shapes, so the
functions run under `jax.jit(..., out_shardings=...)`: a sharded pretrained tree grows on its own
devices and no array goes through the host.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util

from growjax.errors import UserError

PyTree = Any
Path = tuple[str, ...]


class GraftError(UserError):
    """A pretrained leaf has no place in the grown tree, or a different shape there."""


def path_str(path: Path) -> str:
    return '/'.join(path)


def flatten(tree: Mapping) -> dict[Path, Any]:
    """{('params', 'fc7', 'kernel'): leaf, ...} for a nested dict of variables."""
    return traverse_util.flatten_dict(tree)


def unflatten(flat: Mapping[Path, Any]) -> dict:
    return traverse_util.unflatten_dict(dict(flat))


def compile_patterns(patterns: str | Iterable[str]) -> list[re.Pattern]:
    """Regexes over 'a/b/c' paths (as big_vision's `dont_load`); a bad regex names itself."""
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f'reinit pattern {pattern!r} is not a valid regex: {err}') from None
    return compiled


def matches_any(path: Path, patterns: Sequence[re.Pattern]) -> bool:
    """A path matches when a pattern matches its 'a/b/c' form, with or without the collection."""
    joined = path_str(path)
    without_collection = path_str(path[1:])
    return any(p.search(joined) or p.search(without_collection) for p in patterns)


def _shape(leaf) -> tuple[int, ...]:
    return tuple(jnp.shape(leaf))


def graft_plan(pretrained: Mapping, grown_shapes: Mapping, reinit: Sequence[re.Pattern] = ()) -> set[Path]:
    """The paths of `grown_shapes` that take their value from `pretrained`.

    Raises GraftError for a pretrained leaf that the grown tree lacks or holds with another shape,
    unless a reinit pattern matches it. Static: reads shapes only, never values.
    """
    grown_flat = flatten(grown_shapes)
    copied = set()
    problems = []
    for path, leaf in flatten(pretrained).items():
        if reinit and matches_any(path, reinit):
            continue
        if path not in grown_flat:
            problems.append(f'{path_str(path)}: pretrained shape {_shape(leaf)} has no place in the grown model')
        elif _shape(leaf) != _shape(grown_flat[path]):
            problems.append(f'{path_str(path)}: pretrained shape {_shape(leaf)} != grown shape '
                            f'{_shape(grown_flat[path])}')
        else:
            copied.add(path)
    if problems:
        raise GraftError('Cannot graft the pretrained variables into the grown model (pass reinit=[regex, ...] '
                         'to drop leaves on purpose, e.g. the old classifier):\n  ' + '\n  '.join(problems))
    return copied


def graft(pretrained: Mapping, grown_init: Mapping, reinit: Sequence[re.Pattern] = ()) -> dict:
    """`grown_init` with every (non-reinit) pretrained leaf put in its place, unchanged.

    Returns a new tree; neither input is modified. Pretrained leaves keep their own dtype.
    """
    copied = graft_plan(pretrained, grown_init, reinit)
    pretrained_flat = flatten(pretrained)
    return unflatten({path: pretrained_flat[path] if path in copied else leaf
                      for path, leaf in flatten(grown_init).items()})


def _leaves_of_init(model, paths: frozenset[Path] | None, rng: jax.Array, *sample_args) -> dict[Path, Any]:
    """The leaves at `paths` (all when None) of `model.init(rng, *sample_args)`, flat. Under jit,
    the other leaves are dead code: XLA never computes or allocates them."""
    flat = flatten(model.init(rng, *sample_args))
    return flat if paths is None else {path: flat[path] for path in paths}


# Module level, model and paths static: jit's cache holds one executable per (model, paths, argument
# shapes), so repeated eager grow_params calls compile once (a fresh jax.jit(model.init) per call
# never hits the cache: 46x a plain copy's time at 100M parameters, docs/performance.md).
_init_leaves_cached = jax.jit(_leaves_of_init, static_argnums=(0, 1))


def _init_leaves(model, paths: frozenset[Path] | None):
    """A jitted `(rng, *sample_args) -> leaves`: the cached one unless the model is unhashable (e.g.
    a list field), which still works but compiles on every call."""
    try:
        hash(model)
    except TypeError:
        return jax.jit(functools.partial(_leaves_of_init, model, paths))
    return functools.partial(_init_leaves_cached, model, paths)


def grow_params(pretrained_variables: Mapping, model, rng: jax.Array, *sample_args,
                reinit: str | Iterable[str] = (), preserve_function: bool = False) -> dict:
    """Initialises the grown `model` and grafts every pretrained leaf into it, unchanged.

    New units get the model's own (fan-in aware) initialisers: they are the leaves of
    `model.init(rng, *sample_args)` at the new paths, and only those are computed, by one jitted
    init compiled once per model and argument shapes. The pretrained arrays are reused as they are
    (never copied, modified or donated); under an outer jit with out_shardings the same code is
    inlined, so a sharded tree grows on its devices. Strict: a pretrained leaf (params,
    batch_stats, any collection) with no place in the grown tree, or a different shape, raises
    GraftError naming its path and both shapes, unless one of the `reinit` regexes (over
    'params/a/b' or 'a/b' paths) matches it: then the grown model's fresh init is used (e.g.
    reinit='^classifier/' for a new task).

    preserve_function=True asks the model to initialise its new parts so the grown network
    computes exactly what the pretrained one did (zero fan-in from new units, identity inserted
    layers). Only models with a `preserve_function` field know how; the model raises where it is
    impossible (e.g. NormScale, which rescales the pretrained units).
    """
    if preserve_function:
        if 'preserve_function' not in getattr(model, '__dataclass_fields__', {}):
            raise TypeError(f'{type(model).__name__} has no `preserve_function` field, so grow_params cannot '
                            'know how to initialise its new parts to preserve the function.')
        model = model.clone(preserve_function=True)
    patterns = compile_patterns(reinit)
    # Strictness is checked from shapes alone, before running the (possibly large) init.
    shapes = jax.eval_shape(_init_leaves(model, None), rng, *sample_args)
    copied = graft_plan(pretrained_variables, unflatten(shapes), patterns)
    fresh = _init_leaves(model, frozenset(shapes.keys() - copied))(rng, *sample_args)
    pretrained_flat = flatten(pretrained_variables)
    return unflatten({path: pretrained_flat[path] if path in copied else fresh[path] for path in shapes})


def new_paths(grown: Mapping, pretrained: Mapping, reinit: str | Iterable[str] = ()) -> set[Path]:
    """Paths of `grown` that are new: absent from `pretrained` (a tree or its shapes) or reinitialised."""
    patterns = compile_patterns(reinit)
    pretrained_flat = flatten(pretrained)
    return {path for path in flatten(grown) if path not in pretrained_flat or matches_any(path, patterns)}


def _is_param_shaped(node, old_structure, old_leaves) -> bool:
    if jax.tree_util.tree_structure(node) != old_structure:
        return False
    return all(_shape(a) == _shape(b) for a, b in zip(jax.tree_util.tree_leaves(node), old_leaves))


def grow_opt_state(opt_state: PyTree, old_params: Mapping, new_params: Mapping) -> PyTree:
    """The optimiser state for `new_params`, grown from the state for `old_params`.

    Every subtree of `opt_state` shaped like `old_params` (momentum traces, Adam's mu and nu, in
    any chain, masked or injected transformation) becomes a tree shaped like `new_params`: old
    slots kept bit for bit, new slots zero (a new unit has no history). Everything else (step
    counts, schedules' state, hyperparameters) is kept as it is, so training continues where it
    was. A pretrained slot whose shape changed is an error, as in grafting.
    """
    old_structure = jax.tree_util.tree_structure(old_params)
    old_leaves = jax.tree_util.tree_leaves(old_params)
    graft_plan(old_params, new_params)  # every old slot must have a same-shaped place

    def grow_slot(slot_tree):
        zeros = jax.tree_util.tree_map(
            lambda p: jnp.zeros(jnp.shape(p), dtype=_slot_dtype(slot_tree, p)), new_params)
        return graft(slot_tree, zeros)

    def visit(node):
        if _is_param_shaped(node, old_structure, old_leaves) and isinstance(node, Mapping):
            return grow_slot(node)
        if isinstance(node, tuple) and hasattr(node, '_fields'):  # NamedTuple states (optax)
            return type(node)(*(visit(child) for child in node))
        if isinstance(node, (tuple, list)):
            return type(node)(visit(child) for child in node)
        if isinstance(node, Mapping):
            return type(node)({key: visit(child) for key, child in node.items()})
        return node

    return visit(opt_state)


def _slot_dtype(slot_tree: Mapping, param) -> jnp.dtype:
    """New slots take the dtype the old slots use (e.g. bfloat16 momentum), else the param's."""
    leaves = jax.tree_util.tree_leaves(slot_tree)
    return leaves[0].dtype if leaves else jnp.result_type(param)
