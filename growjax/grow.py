"""Growing parameter trees: graft a pretrained tree into a grown model, and grow optimiser state.

Everything here is a pure function of trees and keys. Shape checks use only static shapes, so the
functions run under `jax.jit(..., out_shardings=...)`: a sharded pretrained tree grows on its own
devices and no array goes through the host.
"""
from __future__ import annotations

import difflib
import functools
import re
import warnings
from typing import Any, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from growjax.errors import UserError

PyTree = Any
Path = tuple[str, ...]


class GraftError(UserError):
    """A pretrained leaf has no place in the grown tree, or a different shape there."""


def path_str(path: Path) -> str:
    return '/'.join(str(part) for part in path)  # an NNX state's list indices are ints


def pure(tree):
    """A Flax NNX `nnx.State` as its pure dict (`state.to_pure_dict()`: arrays, list indices as int
    keys); any other tree as it is. Every function here that reads parameter trees accepts either."""
    return tree.to_pure_dict() if hasattr(tree, 'to_pure_dict') and not isinstance(tree, dict) else tree


def flatten(tree: Mapping) -> dict[Path, Any]:
    """{('params', 'fc7', 'kernel'): leaf, ...} for a nested dict of variables (or an nnx.State)."""
    return traverse_util.flatten_dict(pure(tree))


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


def check_patterns_used(patterns: Sequence[re.Pattern], paths: Iterable[Path], what: str = 'pretrained leaf') -> None:
    """A GraftError for a reinit pattern that matches none of `paths`: a typo (`'^lm_haed/'`) would
    otherwise leave pretrained what the user meant to re-initialise."""
    paths = list(paths)
    for pattern in patterns:
        if not any(matches_any(path, [pattern]) for path in paths):
            modules = sorted({path_str(path[1:-1] if path[0] == 'params' else path[:-1]) for path in paths})
            close = difflib.get_close_matches(re.sub(r'[\^$\\()|?*+.\[\]]', '', pattern.pattern), modules, n=4,
                                              cutoff=0.3)
            hint = f' (did you mean {", ".join(close)}?)' if close else ''
            raise GraftError(f'reinit pattern {pattern.pattern!r} matches no {what}{hint}. A pattern that matches '
                             'nothing would leave pretrained what it meant to re-initialise.')


def matches_any(path: Path, patterns: Sequence[re.Pattern]) -> bool:
    """A path matches when a pattern matches its 'a/b/c' form, with or without the collection."""
    joined = path_str(path)
    without_collection = path_str(path[1:])
    return any(p.search(joined) or p.search(without_collection) for p in patterns)


def _shape(leaf) -> tuple[int, ...]:
    return tuple(jnp.shape(leaf))


def graft_plan(pretrained: Mapping, grown_shapes: Mapping, reinit: Sequence[re.Pattern] = (),
               also_reinit: Iterable[Path] = ()) -> set[Path]:
    """The paths of `grown_shapes` that take their value from `pretrained`.

    Raises GraftError for a pretrained leaf that the grown tree lacks or holds with another shape,
    unless a reinit pattern matches it, and for a reinit pattern that matches no pretrained leaf
    (nor one of `also_reinit`, leaves the pretrained tree should have held). Static: reads shapes
    only, never values.
    """
    check_patterns_used(reinit, [*flatten(pretrained), *also_reinit])
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


def _leaves_of_init(model, paths: frozenset[Path] | None, static: tuple, rng: jax.Array, *arrays) -> dict[Path, Any]:
    """The leaves at `paths` (all when None) of `model.init(rng, *sample_args)`, flat, where the sample
    args are `arrays` with the `static` (position, value) ones put back. Under jit, the other leaves
    are dead code: XLA never computes or allocates them."""
    args = list(arrays)
    for position, value in static:
        args.insert(position, value)
    flat = flatten(model.init(rng, *args))
    return flat if paths is None else {path: flat[path] for path in paths}


# Module level, model, paths and static arguments static: jit's cache holds one executable per (model,
# paths, argument shapes), so repeated eager grow_params calls compile once (a fresh jax.jit(model.init)
# per call never hits the cache: 46x a plain copy's time at 100M parameters, docs/performance.md).
_init_leaves_cached = jax.jit(_leaves_of_init, static_argnums=(0, 1, 2))


def _split_static(sample_args: Sequence) -> tuple[tuple, list]:
    """Python scalars and None among the sample args (e.g. a `train` flag) are static, the rest traced."""
    static = tuple((i, a) for i, a in enumerate(sample_args) if a is None or isinstance(a, (bool, int, float, str)))
    arrays = [a for i, a in enumerate(sample_args) if i not in dict(static)]
    return static, arrays


def _init_leaves(model, paths: frozenset[Path] | None, sample_args: Sequence):
    """(a jitted `(rng, *arrays) -> leaves`, the array sample args): the cached one unless the model is
    unhashable (e.g. a list field), which still works but compiles on every call."""
    static, arrays = _split_static(sample_args)
    try:
        hash(model)
    except TypeError:
        return jax.jit(functools.partial(_leaves_of_init, model, paths, static)), arrays
    return functools.partial(_init_leaves_cached, model, paths, static), arrays


def grow_params(pretrained_variables: Mapping, model, rng: jax.Array, *sample_args,
                reinit: str | Iterable[str] = (), preserve_function: bool = False, check: bool = True) -> dict:
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

    check: for a model that knows how it was grown (growjax.surgery's), run its check_growth on the
    sample input (the function where operations claim to keep it, gradients of zeroed layers). It
    needs values: under an outer jit it warns instead, and the caller runs it on the result.

    preserve_function=True asks the model to initialise its new parts so the grown network
    computes exactly what the pretrained one did (zero fan-in from new units, identity inserted
    layers). Only models with a `preserve_function` field know how; the model raises where it is
    impossible (e.g. NormScale, which rescales the pretrained units).

    `pretrained_variables` may be an nnx.State (read as its pure dict). Flax NNX models grow with
    growjax.nnx_surgery.grow instead: their Variables already hold the pretrained values.
    """
    if preserve_function and not getattr(model, 'preserve_function', False):
        if 'preserve_function' not in getattr(model, '__dataclass_fields__', {}):
            raise TypeError(f'{type(model).__name__} has no `preserve_function` field, so grow_params cannot '
                            'know how to initialise its new parts to preserve the function.')
        model = model.clone(preserve_function=True)
    patterns = compile_patterns(reinit)
    # Strictness is checked from shapes alone, before running the (possibly large) init.
    init_all, arrays = _init_leaves(model, None, sample_args)
    shapes = jax.eval_shape(init_all, rng, *arrays)
    collections = {path[0] for path in shapes}
    if 'params' in collections and isinstance(pretrained_variables, Mapping) and 'params' not in pretrained_variables:
        raise GraftError(f'grow_params takes variables with their collections, e.g. {{\'params\': params}}, but the '
                         f'pretrained tree\'s top level is {sorted(pretrained_variables)[:6]}: pass {{\'params\': params}}.')
    pretrained_flat = flatten(pretrained_variables)
    earlier = model.earlier_rounds(*sample_args) if isinstance(model, GrownModel) else {}
    copied = graft_plan(pretrained_variables, unflatten(shapes), patterns, also_reinit=earlier)
    _check_earlier_rounds(earlier, pretrained_flat, patterns)
    sources = _copy_sources(model, pretrained_flat, shapes, sample_args)
    init_new, _ = _init_leaves(model, frozenset(shapes.keys() - copied - sources.keys()), sample_args)
    fresh = init_new(rng, *arrays)
    grown = unflatten({path: pretrained_flat[path] if path in copied else
                       pretrained_flat[sources[path]] if path in sources else fresh[path] for path in shapes})
    if check and isinstance(model, GrownModel):
        if _traced(pretrained_variables, rng, sample_args):
            warnings.warn(f'grow_params under jit cannot check what {type(model).__name__} claims (it needs values): '
                          'call model.check_growth(variables, *sample_args) on the result outside jit, and pass '
                          'check=False here.', stacklevel=2)
        else:
            model.check_growth(grown, *sample_args)
    return grown


@runtime_checkable
class GrownModel(Protocol):
    """What grow_params asks of a model that knows how it was grown (growjax.surgery.Grown).

    A plain model (growjax's zoo) needs none of it: its new leaves are the paths the pretrained
    tree lacks. A surgically grown one also knows which new leaves start as copies, which leaves
    earlier growth rounds added (so the pretrained tree must be the one trained after them), and
    how to check on a sample input that what it claims (the function kept, zeroed layers alive)
    holds."""
    preserve_function: bool

    def graft_sources(self, *sample_args) -> dict[Path, Path]:
        """{grown leaf path: pretrained leaf path} of new leaves that start as copies."""

    def earlier_rounds(self, *sample_args) -> dict[Path, int]:
        """{leaf path: the growth round (1, 2, ...) that added it} for leaves of earlier rounds."""

    def check_growth(self, variables: Mapping, *sample_args) -> None:
        """Raises when the grown variables break what the model's operations claim."""


def _traced(*trees) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(trees))


def _check_earlier_rounds(earlier: Mapping[Path, int], pretrained_flat: Mapping, patterns) -> None:
    """A GraftError when the pretrained tree lacks leaves an earlier growth round added: it is the
    tree the model started from, not the one trained after that round (its units would be lost)."""
    missing = {path: round_ for path, round_ in earlier.items()
               if path not in pretrained_flat and not matches_any(path, patterns)}
    if missing:
        first = min(missing.values())
        paths = sorted(path_str(path) for path, round_ in missing.items() if round_ == first)
        raise GraftError(f'The pretrained variables lack the {len(paths)} leaves that growth round {first} added '
                         f'({", ".join(paths[:4])}{", ..." if len(paths) > 4 else ""}): the model was grown again, '
                         f'so it grafts from the variables trained after round {first}, not those it started from; '
                         'pass those, or reinit=REGEX naming these leaves to start them fresh.')


def _copy_sources(model, pretrained_flat: Mapping[Path, Any], shapes: Mapping[Path, Any], sample_args) -> dict:
    """{new path: pretrained path} of new leaves that start as a copy of a pretrained leaf, from
    the model's `graft_sources` (surgery's InsertAfter(block='copy')); strict like grafting."""
    if not isinstance(model, GrownModel):
        return {}
    sources = model.graft_sources(*sample_args)
    problems = [f'{path_str(new)} copies {path_str(old)}, which the pretrained tree '
                + ('lacks' if old not in pretrained_flat else
                   f'holds with shape {_shape(pretrained_flat[old])}, not {_shape(shapes[new])}')
                for new, old in sources.items()
                if old not in pretrained_flat or _shape(pretrained_flat[old]) != _shape(shapes[new])]
    if problems:
        raise GraftError('Cannot initialise copied blocks from the pretrained variables:\n  ' + '\n  '.join(problems))
    return sources


def new_paths(grown: Mapping, pretrained: Mapping, reinit: str | Iterable[str] = ()) -> set[Path]:
    """Paths of `grown` that are new: absent from `pretrained` (a tree or its shapes) or reinitialised."""
    patterns = compile_patterns(reinit)
    pretrained_flat = flatten(pretrained)
    check_patterns_used(patterns, pretrained_flat)
    return {path for path in flatten(grown) if path not in pretrained_flat or matches_any(path, patterns)}


def _is_param_shaped(node, old_structure, old_leaves) -> bool:
    if jax.tree_util.tree_structure(node) != old_structure:
        return False
    return all(_shape(a) == _shape(b) for a, b in zip(jax.tree_util.tree_leaves(node), old_leaves))


def grow_opt_state(opt_state: PyTree, old_params: Mapping, new_params: Mapping, optimizer=None) -> PyTree:
    """The optimiser state for `new_params`, grown from the state for `old_params`.

    Every subtree of `opt_state` shaped like `old_params` (momentum traces, Adam's mu and nu, in
    any chain, masked or injected transformation) becomes a tree shaped like `new_params`: old
    slots kept bit for bit, new slots zero (a new unit has no history). Everything else (step
    counts, schedules' state, hyperparameters) is kept as it is, so training continues where it
    was. A pretrained slot whose shape changed is an error, as in grafting.

    `optimizer`: the optimiser of the grown model, when it differs from the old one in which leaves
    it trains or how it groups them (e.g. `growth_optimizer` rebuilt with the grown model's labels,
    whose masked state holds no slots for frozen leaves, or a multi_transform that gained a group).
    The state then takes the new optimiser's structure (its `init(new_params)`), with every slot
    and count the old state has at the same place carried over: a leaf that starts training gets
    a fresh slot, one that stops training loses its slot.

    Flax NNX: `old_params` / `new_params` may be nnx.State (`nnx.state(model, nnx.Param)`), read as
    their pure dicts; `opt_state` is then the state of an optimiser over those pure dicts (plain
    optax, or `nnx.as_pure(optimizer.opt_state)` of an nnx.Optimizer running
    nnx_surgery.on_pure_dicts(tx)), and the result is over pure dicts too.
    """
    old_params, new_params = pure(old_params), pure(new_params)
    _refuse_variables_dicts(opt_state, old_params, new_params)
    graft_plan(old_params, new_params)  # every old slot must have a same-shaped place
    if optimizer is not None:
        return _carry_over(opt_state, optimizer.init(new_params), ())
    old_structure = jax.tree_util.tree_structure(old_params)
    old_leaves = jax.tree_util.tree_leaves(old_params)

    def grow_slot(slot_tree):
        zeros = jax.tree_util.tree_map(
            lambda p: jnp.zeros(jnp.shape(p), dtype=_slot_dtype(slot_tree, p)), new_params)
        return graft(slot_tree, zeros)

    def visit(node):
        if _is_param_shaped(node, old_structure, old_leaves) and isinstance(node, Mapping):
            return grow_slot(node)
        if isinstance(node, optax.MaskedNode) or _holds_masked_node(node, old_structure):
            raise GraftError('grow_opt_state: the optimiser state holds masked slots (optax.masked or '
                             'multi_transform): pass optimizer=<the grown model\'s optimiser> so that the masks of the '
                             'grown tree are known.')
        if isinstance(node, tuple) and hasattr(node, '_fields'):  # NamedTuple states (optax)
            return type(node)(*(visit(child) for child in node))
        if isinstance(node, (tuple, list)):
            return type(node)(visit(child) for child in node)
        if isinstance(node, Mapping):
            return type(node)({key: visit(child) for key, child in node.items()})
        return node

    return visit(opt_state)


def _refuse_variables_dicts(opt_state, old_params: Mapping, new_params: Mapping) -> None:
    """A one-line GraftError for `{'params': ..., ...}` variables given where the optimiser saw the
    params alone: no slot would match them, and the state would come back ungrown, to fail at the
    first update."""
    def shaped_like(tree) -> bool:
        structure = jax.tree_util.tree_structure(tree)
        found = []

        def visit(node):
            if found or node is None:
                return
            if isinstance(node, Mapping) and jax.tree_util.tree_structure(node) == structure:
                found.append(node)
            elif isinstance(node, Mapping):
                for child in node.values():
                    visit(child)
            elif isinstance(node, (tuple, list)):
                for child in node:
                    visit(child)
        visit(opt_state)
        return bool(found)

    for name, tree in (('old_params', old_params), ('new_params', new_params)):
        inner = tree.get('params') if isinstance(tree, Mapping) else None
        if isinstance(inner, Mapping) and not shaped_like(tree) and shaped_like(old_params.get('params', {})):
            raise GraftError(f"grow_opt_state: {name} is a variables dict ({{'params': ...}}) but the optimiser state "
                             "holds slots for the parameters alone: pass variables['params'] for both.")


def _holds_masked_node(node, old_structure) -> bool:
    """A params-like mapping with masked (MaskedNode) leaves."""
    if not isinstance(node, Mapping):
        return False
    leaves = jax.tree_util.tree_leaves(node, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    return any(isinstance(leaf, optax.MaskedNode) for leaf in leaves) and \
        jax.tree_util.tree_structure(node) != old_structure


def _carry_over(old, new, where: tuple) -> PyTree:
    """`new` (a fresh state of the grown model's optimiser) with what `old` holds at the same places."""
    here = '/'.join(str(part) for part in where) or '(the state itself)'
    if isinstance(new, optax.MaskedNode) or old is None:
        return new  # a frozen leaf has no slot; a new place keeps its fresh value
    if isinstance(old, optax.MaskedNode):
        return new  # a leaf that starts training: a fresh slot
    if isinstance(new, tuple) and hasattr(new, '_fields'):
        if type(old) is not type(new):
            raise GraftError(f'grow_opt_state: at {here} the old state holds a {type(old).__name__}, the grown '
                             f'optimiser a {type(new).__name__}: build the grown optimiser like the old one.')
        return type(new)(*(_carry_over(getattr(old, f), getattr(new, f), (*where, f)) for f in new._fields))
    if isinstance(new, (tuple, list)):
        if not isinstance(old, (tuple, list)) or len(old) != len(new):
            raise GraftError(f'grow_opt_state: at {here} the old state is {_state_kinds(old)}, the grown optimiser\'s '
                             f'{_state_kinds(new)}: build the grown optimiser like the old one (the same chain of '
                             'transformations).')
        return type(new)(_carry_over(o, n, (*where, i)) for i, (o, n) in enumerate(zip(old, new)))
    if isinstance(new, Mapping):
        if not isinstance(old, Mapping):
            raise GraftError(f'grow_opt_state: at {here} the old state holds a {type(old).__name__}, the grown '
                             'optimiser a mapping.')
        lost = set(old) - set(new)
        if lost:
            raise GraftError(f'grow_opt_state: at {here} the old state has {sorted(lost)}, which the grown optimiser '
                             'lacks (a parameter or a group would be dropped).')
        return type(new)({k: _carry_over(old.get(k), v, (*where, k)) for k, v in new.items()})
    if hasattr(new, 'shape') and hasattr(old, 'shape'):
        if _shape(old) != _shape(new):
            raise GraftError(f'grow_opt_state: at {here} the old slot has shape {_shape(old)}, the grown optimiser\'s '
                             f'{_shape(new)}: a pretrained leaf changed shape.')
        return jnp.asarray(old, dtype=new.dtype) if hasattr(new, 'dtype') else old
    return new if not jax.tree_util.tree_leaves(old) else old


def _state_kinds(state) -> str:
    """'(TraceState, EmptyState)': the optax state classes of a chain, to tell an SGD state from an Adam one."""
    parts = state if isinstance(state, (tuple, list)) and not hasattr(state, '_fields') else (state,)
    return '(' + ', '.join(type(part).__name__ for part in parts) + ')'


def _slot_dtype(slot_tree: Mapping, param) -> jnp.dtype:
    """New slots take the dtype the old slots use (e.g. bfloat16 momentum), else the param's."""
    leaves = jax.tree_util.tree_leaves(slot_tree)
    return leaves[0].dtype if leaves else jnp.result_type(param)
