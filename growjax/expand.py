"""growjax.expand: grow a trained linen model into a bigger configuration of the same model class.

Progressive training (G_stack, LEMON, bert2BERT, HyperCloning) grows a small model mid-run. Here the
user's model class is not edited: `small_model` and `big_model` are two instances of it, and the
mapping of every leaf is derived from the two models' parameter shapes and from what each module is
(seen by intercepting module calls while their inits are traced).

Width (any axis whose size grows by an integer factor k: residual width, MLP width, heads) is grown
by duplication: the small network's activations become k copies, [h, h]. So an axis that a kernel
*writes* (its output features), and embeddings, biases and norm parameters, are tiled; an axis a
kernel *reads* (Dense axis 0, DenseGeneral's contracted axes, a conv's input channels, the feature
axis of nn.Embed.attend) is tiled and split so the k copies sum to the original. LayerNorm over
[h, h] equals [LN(h), LN(h)], so the whole network computes the same function. Exact splits (W/k
each) leave duplicated units twins forever under Adam; the split here is W/k + e_c with the noise
e_c summing to zero over the copies (HyperCloning-style): the same function, no twins.

Depth: module paths only the big model has are new. depth='zero' initialises them with the big
model's own init, except the modules `zero` names, which start at zero (name the last layer of each
residual branch and a new block is the identity); depth='stack' copies small blocks (G_stack), which
does not preserve the function.

Everything here is a pure function of trees, keys and (static) models: it runs under
jax.jit(..., out_shardings=...), where the function check (which needs values) is skipped.
"""
from __future__ import annotations

import dataclasses
import math
import re
import warnings
import zlib
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from growjax.errors import UserError
from growjax.grow import Path, _init_leaves, _split_static, flatten, path_str, unflatten

PyTree = Any

# expand's function check for half-precision models: relative to max(1, max |logit|).
HALF_PRECISION_TOLERANCE = 3e-2
# Optimiser slots that hold squared gradients: mapped with the square of the gradient's scale.
SECOND_MOMENT_FIELDS = frozenset({'nu', 'nu_max', 'nu_hat', 'sum_of_squares'})


class ExpandError(UserError):
    """A model pair or option that expand cannot map; the message names the leaf and why."""


class NotPreservedError(ExpandError):
    """The expanded model does not compute the small model's function on the sample input."""


@dataclasses.dataclass(frozen=True)
class Axis:
    """How one axis of a leaf grows: `factor` copies, split (read axes) or tiled; a fused axis is
    `blocks` equal blocks (e.g. q, k, v), each tiled separately."""
    factor: int
    read: bool = False
    blocks: int = 1


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """Where a big leaf comes from: the small leaf at `source` grown along `axes` (None: an axis kept),
    or, without a source, the big model's init (zeros when `zero`)."""
    source: Path | None
    axes: tuple[Axis | None, ...] = ()
    zero: bool = False

    @property
    def written_factor(self) -> int:
        """The product of the tiled axes' factors: each copy's gradient is the small one divided by it."""
        return math.prod(a.factor for a in self.axes if a and not a.read)

    @property
    def read_factor(self) -> int:
        """The product of the split axes' factors: each copy holds 1/read_factor of the small weight."""
        return math.prod(a.factor for a in self.axes if a and a.read)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The mapping of every big leaf (flat variable paths, collections included) and what it claims."""
    leaves: Mapping[Path, LeafPlan]
    shapes: Mapping[Path, jax.ShapeDtypeStruct]  # the big model's
    small_shapes: Mapping[Path, jax.ShapeDtypeStruct]
    preserving: bool  # whether the big model is claimed to compute the small one's function
    fused: tuple[tuple[Path, int], ...] = ()  # (module path, blocks) of declared fused projections
    guessed: tuple[str, ...] = ()  # grown leaves of modules expand does not know: tiled as outputs


@dataclasses.dataclass(frozen=True)
class _Module:
    """What a module call tells about its parameters: the kernel leaf's read axes, and methods called."""
    kind: str
    kernel: str | None = None
    read: tuple[int, ...] = ()
    methods: frozenset[str] = frozenset()
    head_dim: int | None = None


def _describe(module: nn.Module, method: str, args: tuple) -> _Module | None:
    """The roles of a known module's parameters; None for a module expand does not know."""
    kind = type(module).__name__
    if isinstance(module, nn.Dense):
        return _Module(kind, 'kernel', (0,))
    if isinstance(module, nn.DenseGeneral):
        axis = module.axis if isinstance(module.axis, Sequence) else (module.axis,)
        batch = module.batch_dims if isinstance(module.batch_dims, Sequence) else (module.batch_dims,)
        return _Module(kind, 'kernel', tuple(range(len(batch), len(batch) + len(axis))))
    if isinstance(module, (nn.Conv, nn.ConvLocal)):
        window = (module.kernel_size,) if isinstance(module.kernel_size, int) else tuple(module.kernel_size)
        return _Module(kind, 'kernel', (len(window),))
    if isinstance(module, nn.Embed):
        return _Module(kind, 'embedding', (1,) if method == 'attend' else (), frozenset({method}))
    if isinstance(module, nn.MultiHeadDotProductAttention) and args:
        features = module.qkv_features or args[0].shape[-1]
        return _Module(kind, head_dim=features // module.num_heads)
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.BatchNorm)):
        return _Module(kind)
    return None


def _merge(old: _Module | None, new: _Module | None) -> _Module | None:
    """Calls of one module seen more than once (e.g. an Embed called and attended: tied embeddings)."""
    if old is None or new is None:
        return old or new
    return dataclasses.replace(old, read=tuple(sorted(set(old.read) | set(new.read))),
                               methods=old.methods | new.methods)


def _trace(model, rng, sample_inputs) -> tuple[dict[Path, Any], dict[Path, _Module | None]]:
    """(flat shapes of model.init, {module path: what it is}) from one abstract init: no FLOPs."""
    static, arrays = _split_static(sample_inputs)
    modules: dict[Path, _Module | None] = {}

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name in ('__call__', 'attend'):
            path = tuple(context.module.path)
            modules[path] = _merge(modules.get(path), _describe(context.module, context.method_name, args))
        return next_fun(*args, **kwargs)

    def init(rng, *arrays):
        args = list(arrays)
        for position, value in static:
            args.insert(position, value)
        with nn.intercept_methods(interceptor):
            return model.init(rng, *args)

    return flatten(jax.eval_shape(init, rng, *arrays)), modules


def _refuse_nnx(*models) -> None:
    for model in models:
        if not isinstance(model, nn.Module):
            raise ExpandError(f'growjax.expand is linen-only: got a {type(model).__module__}.{type(model).__name__}, '
                              'not a flax.linen Module (Flax NNX models hold their state; grow them with '
                              'growjax.nnx_surgery).')


def _compile(patterns: str | Iterable[str] | Mapping | None, what: str) -> list[re.Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    try:
        return [re.compile(p) for p in patterns]
    except re.error as err:
        raise ExpandError(f'{what} pattern is not a valid regex: {err}') from None


def _matches(module_path: Path, patterns: Sequence[re.Pattern]) -> bool:
    return any(p.fullmatch(path_str(module_path)) for p in patterns)


_NUMBERED = re.compile(r'^(.*?)(\d+)$')


def _layer_groups(small: set[Path], big: set[Path]) -> dict[tuple[Path, str], tuple[int, int]]:
    """{(parent path, name prefix): (small count, big count)} of numbered modules (h_0.., block0..)
    that the big model has more of; both numbered 0..n-1."""
    def indices(paths):
        found: dict[tuple[Path, str], set[int]] = {}
        for path in paths:
            match = _NUMBERED.match(path[-1]) if path else None
            if match:
                found.setdefault((path[:-1], match.group(1)), set()).add(int(match.group(2)))
        return found

    small_indices, big_indices = indices(small), indices(big)
    return {key: (len(small_indices[key]), len(ids)) for key, ids in big_indices.items()
            if key in small_indices and small_indices[key] == set(range(len(small_indices[key])))
            and ids == set(range(len(ids))) and len(ids) > len(small_indices[key])}


def _stack_source(path: Path, groups, order: str) -> Path:
    """The small path a big path copies under depth='stack': big layer i <- small i mod n ('cycle':
    [0 1 0 1], G_stack's whole-model stacking) or i * n // m ('repeat': [0 0 1 1])."""
    parts = list(path)
    for depth in range(len(parts)):
        match = _NUMBERED.match(parts[depth])
        key = (tuple(parts[:depth]), match.group(1)) if match else None
        if key in groups:
            n, m = groups[key]
            i = int(match.group(2))
            parts[depth] = f'{match.group(1)}{i % n if order == "cycle" else i * n // m}'
    return tuple(parts)


def _leaf_axes(path: Path, small_shape, big_shape, read: Sequence[int], blocks: int) -> tuple[Axis | None, ...]:
    """Per axis, how it grows; an axis that shrinks or grows by a non-integer factor is refused."""
    where = path_str(path)
    if len(small_shape) != len(big_shape):
        raise ExpandError(f'{where}: small shape {tuple(small_shape)} and big shape {tuple(big_shape)} differ in rank.')
    axes = []
    for i, (s, b) in enumerate(zip(small_shape, big_shape)):
        if s == b:
            axes.append(None)
            continue
        if b < s or b % s:
            raise ExpandError(f'{where}: axis {i} goes from {s} to {b} (small shape {tuple(small_shape)}, big '
                              f'{tuple(big_shape)}), which is not an integer growth factor: expand duplicates units, '
                              'so every grown size must be a multiple of the small one.')
        fused = blocks if i not in read else 1
        if s % fused:
            raise ExpandError(f'{where}: axis {i} of size {s} is declared fused of {fused} blocks, which do not '
                              'divide it.')
        axes.append(Axis(b // s, i in read, fused))
    return tuple(axes)


def _refuse_tied(path: Path, module: _Module | None, small_shape, big_shape) -> None:
    """An nn.Embed both called and attended (tied input/output embeddings) whose width grows."""
    if module and module.kind == 'Embed' and len(module.methods) > 1 and big_shape[1] != small_shape[1]:
        raise ExpandError(f'{path_str(path)}: nn.Embed {path_str(path[1:-1])!r} is both the input embedding and the '
                          f'output projection (attend: tied embeddings); its feature axis grows {small_shape[1]} -> '
                          f'{big_shape[1]}, which cannot be tiled (input) and split (output) at once: untie them (an '
                          'output Dense) or keep the width.')


def _refuse_head_dim_change(small_modules: Mapping[Path, _Module | None], big_modules: Mapping[Path, _Module | None]):
    for path, module in big_modules.items():
        small = small_modules.get(path)
        if module and small and module.head_dim and small.head_dim and module.head_dim != small.head_dim:
            raise ExpandError(f'{path_str(path)}: head_dim changes from {small.head_dim} to {module.head_dim}, which '
                              'changes attention\'s 1/sqrt(head_dim) and q.k: grow the number of heads instead.')


def _zeroed_modules(small: set[Path], big: set[Path], patterns: Sequence[re.Pattern], zero) -> set[Path]:
    """The modules `zero` names among those only the big model has (kept modules are never zeroed)."""
    new = big - small
    zeroed = {path for path in new if _matches(path, patterns)}
    if patterns and new and not zeroed:
        roots = sorted({path_str(p) for p in new if p[:-1] not in new})
        raise ExpandError(f'zero={zero!r} matches no module the big model adds (new: {roots}); it names '
                          'modules by full path, e.g. \'h_(2|3)/(attn|mlp)/c_proj\'.')
    return zeroed


def expansion_plan(small_model: nn.Module, big_model: nn.Module, *sample_inputs,
                   zero: str | Iterable[str] | None = None, fused: Mapping[str, int] | None = None,
                   reads: Mapping[str, Sequence[int]] | None = None, depth: str = 'zero',
                   stack: str = 'cycle') -> Plan:
    """How each leaf of big_model's variables comes from small_model's (static: shapes and module
    types only). The options are expand's; see there."""
    _refuse_nnx(small_model, big_model)
    if depth not in ('zero', 'stack') or stack not in ('cycle', 'repeat'):
        raise ExpandError(f"expand: depth={depth!r}, stack={stack!r}; expected depth 'zero' or 'stack' and "
                          "stack 'cycle' or 'repeat'.")
    rng = jax.random.key(0)
    small_shapes, small_modules = _trace(small_model, rng, sample_inputs)
    big_shapes, big_modules = _trace(big_model, rng, sample_inputs)
    _refuse_head_dim_change(small_modules, big_modules)
    fused = dict(fused or {})
    fused_patterns = {pattern: blocks for pattern, blocks in zip(_compile(list(fused), 'fused'), fused.values())}
    zero_patterns = _compile(zero, 'zero')
    reads = dict(reads or {})
    read_patterns = dict(zip(_compile(list(reads), 'reads'), (tuple(axes) for axes in reads.values())))
    for pattern in fused_patterns:
        if not any(pattern.fullmatch(path_str(path)) for path in big_modules):
            raise ExpandError(f'fused={{{pattern.pattern!r}: ...}} matches no module of the big model '
                              f'(modules: {sorted(path_str(p) for p in big_modules if p)[:12]} ...).')
    for pattern in read_patterns:
        if not any(pattern.fullmatch(path_str(path[1:])) for path in big_shapes):
            raise ExpandError(f'reads={{{pattern.pattern!r}: ...}} matches no leaf of the big model (it fully matches '
                              f"leaf paths such as {path_str(next(iter(big_shapes))[1:])!r}); a leaf it misses would be "
                              'tiled as an output.')
    zeroed = _zeroed_modules(set(small_modules), set(big_modules), zero_patterns, zero)
    groups = _layer_groups(set(small_modules), set(big_modules)) if depth == 'stack' else {}
    if stack == 'repeat':
        for (parent, prefix), (n, m) in groups.items():
            if m % n:
                raise ExpandError(f"depth='stack', stack='repeat': {path_str(parent + (prefix,))}* go from {n} to {m} "
                                  "layers, not a multiple: use stack='cycle'.")

    leaves, guessed = {}, []
    for path, big in big_shapes.items():
        module_path, name = path[1:-1], path[-1]
        source = (path[0], *_stack_source(path[1:], groups, stack)) if groups else path
        if module_path in zeroed:
            leaves[path] = LeafPlan(None, zero=True)
            continue
        if source not in small_shapes:
            leaves[path] = LeafPlan(None)
            continue
        module = big_modules.get(module_path)
        declared = [axes for p, axes in read_patterns.items() if p.fullmatch(path_str(path[1:]))]
        read = declared[0] if declared else module.read if module and name == module.kernel else ()
        _refuse_tied(path, module, small_shapes[source].shape, big.shape)
        blocks = next((b for p, b in fused_patterns.items() if p.fullmatch(path_str(module_path))), 1)
        axes = _leaf_axes(path, small_shapes[source].shape, big.shape, read, blocks)
        if module is None and not declared and any(axes):
            guessed.append(path_str(path))
        leaves[path] = LeafPlan(source, axes)
    unused = sorted(path_str(p) for p in small_shapes.keys() - {leaf.source for leaf in leaves.values()})
    if unused:
        raise ExpandError(f'expand: small leaves with no place in the big model: {unused[:8]} (the big model must hold '
                          'every module of the small one, at the same path).')
    fused_modules = tuple((path, blocks) for path in big_modules for pattern, blocks in fused_patterns.items()
                          if pattern.fullmatch(path_str(path)))
    return Plan(leaves, big_shapes, small_shapes, preserving=depth == 'zero' or bool(zero_patterns),
                fused=fused_modules, guessed=tuple(guessed))


def _tile(x: jax.Array, axis: int, spec: Axis) -> jax.Array:
    """`spec.factor` copies along `axis`, each of the `spec.blocks` blocks tiled on its own."""
    parts = jnp.split(x, spec.blocks, axis) if spec.blocks > 1 else [x]
    return jnp.concatenate([jnp.concatenate([part] * spec.factor, axis) for part in parts], axis)


def _zero_sum_over_copies(z: jax.Array, axis: int, spec: Axis) -> jax.Array:
    """`z` minus its mean over the copies along `axis`: adds nothing to what the copies sum to."""
    shape = z.shape
    grouped = z.reshape(shape[:axis] + (spec.blocks, spec.factor, -1) + shape[axis + 1:])
    return (grouped - grouped.mean(axis=axis + 1, keepdims=True)).reshape(shape)


def _expand_leaf(x: jax.Array, axes: Sequence[Axis | None], noise: float, key: jax.Array) -> jax.Array:
    """Tile every grown axis; divide by the read axes' factors, plus noise that sums to zero over the
    copies of each read axis (std `noise` x the small leaf's rms / those factors)."""
    small = x
    for axis, spec in enumerate(axes):
        if spec:
            x = _tile(x, axis, spec)
    read = [(axis, spec) for axis, spec in enumerate(axes) if spec and spec.read]
    if not read:
        return x
    split = math.prod(spec.factor for _, spec in read)
    x = x / split
    if noise and jnp.issubdtype(x.dtype, jnp.floating):
        z = jax.random.normal(key, x.shape, jnp.float32)
        for axis, spec in read:
            z = _zero_sum_over_copies(z, axis, spec)
        rms = jnp.sqrt(jnp.mean(jnp.square(small.astype(jnp.float32))))
        x = (x + (noise * rms / split * z).astype(x.dtype)).astype(small.dtype)
    return x


def _leaf_key(rng: jax.Array, path: Path) -> jax.Array:
    return jax.random.fold_in(rng, zlib.crc32(path_str(path).encode()))


def _is_traced(tree) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(tree))


def expand(small_variables: Mapping, small_model: nn.Module, big_model: nn.Module, *sample_inputs, rng: jax.Array,
           zero: str | Iterable[str] | None = None, fused: Mapping[str, int] | None = None,
           reads: Mapping[str, Sequence[int]] | None = None, depth: str = 'zero', stack: str = 'cycle',
           noise: float = 0.1, check: bool | None = None, tolerance: float = 1e-4, plan: Plan | None = None) -> dict:
    """big_model's variables grown from small_variables (a trained small_model of the same class).

    zero: regexes fully matching module paths of big_model ('h_2/attn/c_proj'); the modules it names
        among those the small model lacks start at zero (kept modules are never zeroed). Name the last
        layer of each residual branch and a new block starts as the identity.
    fused: {module regex: n}: that module's output axis is n equal blocks (a fused qkv Dense: 3), each
        grown on its own, heads contiguous inside a block. Undeclared, [q k v] would be tiled as
        [q k v q k v]; the function check catches it.
    reads: {leaf regex ('block/proj/w'): axes}: the axes a parameter of a module expand does not know
        contracts with its input (split, not tiled). Known: nn.Dense, DenseGeneral, Conv, Embed(.attend).
    depth: 'zero' (new layers: the big model's init, `zero` modules at zero) or 'stack' (new numbered
        layers copy small ones, G_stack; stack='cycle' gives [0 1 0 1], 'repeat' [0 0 1 1]).
    noise: the std of the symmetry-breaking split, relative to each split leaf's rms / its factor;
        0 gives exact W/k splits, whose copies stay twins under Adam forever.
    check: run both models on sample_inputs and raise NotPreservedError, naming the first module whose
        output differs, unless the logits agree within tolerance x max(1, max |small logits|).
        None: where preservation is claimed (depth='zero', or `zero` given) and values are concrete
        (under jit it cannot run: it warns; call check_function on the result and pass check=False).
    plan: a precomputed expansion_plan (to grow the optimiser state with the same mapping); it was
        built with its own zero / fused / reads / depth / stack, so those arguments are then not used.

    Pure: small_variables are not modified; rng draws the new leaves and the noise. Runs under
    jax.jit(..., out_shardings=...): the sample inputs are used for their shapes only.
    """
    plan = plan or expansion_plan(small_model, big_model, *sample_inputs, zero=zero, fused=fused, reads=reads,
                                  depth=depth, stack=stack)
    small_flat = flatten(small_variables)
    wrong = [f'{path_str(p)}: {tuple(jnp.shape(small_flat[p])) if p in small_flat else "missing"}, small_model has '
             f'{plan.small_shapes[p].shape}' for p in plan.small_shapes
             if p not in small_flat or tuple(jnp.shape(small_flat[p])) != plan.small_shapes[p].shape]
    if wrong:
        raise ExpandError('expand: small_variables do not fit small_model (pass {\'params\': ...} as init returns '
                          'it):\n  ' + '\n  '.join(wrong[:8]))
    init_key, noise_key = jax.random.split(rng)
    fresh_paths = frozenset(p for p, leaf in plan.leaves.items() if leaf.source is None and not leaf.zero)
    fresh = {}
    if fresh_paths:
        init, arrays = _init_leaves(big_model, fresh_paths, sample_inputs)
        fresh = init(init_key, *arrays)
    grown = {}
    for path, leaf in plan.leaves.items():
        if leaf.zero:
            grown[path] = jnp.zeros(plan.shapes[path].shape, plan.shapes[path].dtype)
        elif leaf.source is None:
            grown[path] = fresh[path]
        else:
            grown[path] = _expand_leaf(small_flat[leaf.source], leaf.axes, noise, _leaf_key(noise_key, path))
    big_variables = unflatten(grown)
    if check is None:
        traced = _is_traced((small_variables, sample_inputs))
        if plan.preserving and traced:
            warnings.warn('expand under jit cannot check that the big model computes the small one\'s function (it '
                          'needs values): call growjax.expand.check_function on the result outside jit, and pass '
                          'check=False here.', stacklevel=2)
        check = plan.preserving and not traced
    if check:
        if _is_traced((small_variables, sample_inputs)):
            raise ExpandError('expand(check=True) under jit: the check needs values; pass check=False and call '
                              'growjax.expand.check_function on the result outside jit.')
        check_function(small_variables, small_model, big_variables, big_model, *sample_inputs,
                       fused=plan.fused, tolerance=tolerance, guessed=plan.guessed)
    return big_variables


# ---------------------------------------------------------------------------------------------
# The function check


def _expected(small: np.ndarray, big_shape, blocks: int) -> np.ndarray | None:
    """The small activation as the big model should hold it (copies along grown axes), or None where
    the shapes are not related by integer factors."""
    if small.ndim != len(big_shape):
        return None
    for axis, (s, b) in enumerate(zip(small.shape, big_shape)):
        if s != b:
            if b % s or (axis == small.ndim - 1 and s % blocks):
                return None
            small = np.asarray(_tile(small, axis, Axis(b // s, blocks=blocks if axis == small.ndim - 1 else 1)))
    return small


def _calls(model, variables, sample_inputs) -> list[tuple[Path, Any, Any]]:
    """(module path, first input, output) of every module call, in the order the calls finish."""
    calls = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == '__call__' and context.module.path:
            calls.append((tuple(context.module.path), args[0] if args else None, out))
        return out

    with nn.intercept_methods(interceptor):
        model.apply(variables, *sample_inputs)
    return calls


def _first_difference(small_calls, big_calls, fused: Mapping[Path, int], tolerance: float) -> str | None:
    """Why the first differing module differs: a kept module whose output is not the small one's
    copies, or a new block that is not the identity."""
    small_outputs: dict[Path, list] = {}
    for path, _, out in small_calls:
        small_outputs.setdefault(path, []).append(out)
    seen: dict[Path, int] = {}
    for position, (path, first_input, out) in enumerate(big_calls):
        index = seen[path] = seen.get(path, -1) + 1
        if not isinstance(out, jax.Array):
            continue
        if path not in small_outputs:
            if path[:-1] in small_outputs or not path[:-1]:  # the root of a new block
                if isinstance(first_input, jax.Array) and first_input.shape == out.shape:
                    gap = float(jnp.max(jnp.abs(out - first_input)))
                    if gap > tolerance * max(1.0, float(jnp.max(jnp.abs(first_input)))):
                        return (f'the new module {path_str(path)} is not the identity at growth (max |output - input| '
                                f'= {gap:.3g}): name the last layer of each of its residual branches in zero=..., '
                                'e.g. zero=\'h_(2|3)/(attn|mlp)/c_proj\'.')
            continue
        if index >= len(small_outputs[path]) or not isinstance(small_outputs[path][index], jax.Array):
            continue
        expected = _expected(np.asarray(small_outputs[path][index]), out.shape, fused.get(path, 1))
        if expected is None:
            continue
        gap = float(np.max(np.abs(np.asarray(out) - expected)))
        if gap > tolerance * max(1.0, float(np.max(np.abs(expected)))):
            siblings = sorted({path_str(p) for p, _, _ in big_calls[:position]
                               if p[:len(path) - 1] == path[:-1] and p != path and len(p) >= len(path)})
            return (f'{path_str(path)} is the first module whose output is not the small model\'s, copied (max |diff| '
                    f'{gap:.3g}; its output shape {tuple(out.shape)}); modules called before it under '
                    f'{path_str(path[:-1]) or "the model"}: {siblings}. Its input is not laid out as expand assumed: '
                    'a projection that fuses several outputs in one axis (qkv in one Dense) needs '
                    'fused={\'<its path regex>\': 3}; a head_dim that changed cannot be grown (grow the number of '
                    'heads); a parameter of a module expand does not know that reads a grown axis needs '
                    'reads={\'<its leaf path regex>\': (axis, ...)}.')
    return None


def check_function(small_variables: Mapping, small_model: nn.Module, big_variables: Mapping, big_model: nn.Module,
                   *sample_inputs, fused: Iterable[tuple[Path, int]] = (), tolerance: float = 1e-4,
                   guessed: Sequence[str] = ()) -> float:
    """max |big logits - small logits| on sample_inputs; raises NotPreservedError above
    tolerance x max(1, max |small logits|), naming the first module whose output differs.

    float32 matmuls run at full precision (GPUs' default TF32 would round them to ~1e-3). A model
    that computes in bfloat16/float16 sums the split copies in another order than the small model
    sums the original: its tolerance is HALF_PRECISION_TOLERANCE (a GPT 2x32 -> 4x64 in bfloat16
    differs by 0.056 at max |logit| 4.1, 1.3%)."""
    with jax.default_matmul_precision('highest'):
        small_out = small_model.apply(small_variables, *sample_inputs)
        big_out = big_model.apply(big_variables, *sample_inputs)
    if small_out.dtype in (jnp.bfloat16, jnp.float16):
        tolerance = max(tolerance, HALF_PRECISION_TOLERANCE)
    small_out, big_out = small_out.astype(jnp.float32), big_out.astype(jnp.float32)
    gap = float(jnp.max(jnp.abs(big_out - small_out))) if big_out.shape == small_out.shape else math.inf
    if gap <= tolerance * max(1.0, float(jnp.max(jnp.abs(small_out)))):
        return gap
    small_calls = _calls(small_model, small_variables, sample_inputs)
    big_calls = _calls(big_model, big_variables, sample_inputs)
    why = _first_difference(small_calls, big_calls, dict(fused), tolerance)
    guesses = f' Leaves of modules expand does not know, tiled as outputs: {list(guessed)[:8]}.' if guessed else ''
    raise NotPreservedError(f'expand: the big model does not compute the small one\'s function on the sample input '
                            f'(max |logits diff| {gap:.3g}). {why or "No single module was found."}{guesses}')


# ---------------------------------------------------------------------------------------------
# Optimiser state


def _is_params_like(node, structure, shapes) -> bool:
    return (isinstance(node, Mapping) and jax.tree_util.tree_structure(node) == structure
            and all(tuple(jnp.shape(a)) == s for a, s in zip(jax.tree_util.tree_leaves(node), shapes)))


def _map_slot(slot: Mapping, plan: Plan, power: int, reset: bool) -> dict:
    """A params-shaped slot for the big tree: zero for new leaves (and everywhere under 'reset'); else
    the small slot tiled, times (1 / written factor) ** power: the slot the duplicated network would
    hold, since each tiled copy's gradient is the small gradient / written factor and each split
    copy gets the whole gradient."""
    flat = flatten(slot)
    dtype = jnp.result_type(next(iter(flat.values())))  # new slots as the old ones (e.g. bfloat16 momentum)
    out = {}
    for path, leaf in plan.leaves.items():
        if path[0] != 'params':
            continue
        if reset or leaf.source is None or leaf.zero:
            out[path[1:]] = jnp.zeros(plan.shapes[path].shape, dtype)
            continue
        small = flat[leaf.source[1:]]
        for axis, spec in enumerate(leaf.axes):
            if spec:
                small = _tile(small, axis, spec)
        out[path[1:]] = (small / leaf.written_factor ** power).astype(small.dtype)
    return unflatten(out)


def expand_opt_state(opt_state: PyTree, small_params: Mapping, big_params: Mapping, plan: Plan,
                     rule: str = 'map') -> PyTree:
    """The optax state for big_params (grown by `expand` with `plan`) from the state for small_params.

    Every params-shaped subtree (SGD's momentum trace, Adam/AdamW's mu and nu, in any chain or
    inject_hyperparams) is mapped; step counts and schedules' states are kept.

    rule='map': the state the duplicated network would hold had it been trained all along: a slot of
        a tiled leaf copy is the small slot / f (f: the product of the leaf's tiled axes' factors,
        since each copy's gradient is the small gradient / f) and second moments ('nu') / f**2; a
        split copy gets the whole gradient, so its slot is the small one. So with noise=0 the first
        AdamW step moves every entry exactly as the small model's (eps aside), and SGD's by 1/f.
        Note: a split pair then moves k times as fast as the small weight in function terms (both
        halves take the whole step): scale split leaves' learning rates by `rate_scales(plan)`.
    rule='reset': every slot zero and the counts of the states holding them 0: a fresh optimiser's
        first step (AdamW: lr * g / (|g| + eps) plus weight decay), with schedules continuing.
    New leaves get zero slots under both rules.
    """
    if rule not in ('map', 'reset'):
        raise ExpandError(f"expand_opt_state: rule={rule!r}; expected 'map' or 'reset'.")
    big_flat = flatten(big_params)
    planned = {p[1:]: plan.shapes[p].shape for p in plan.leaves if p[0] == 'params'}
    wrong = sorted(path_str(p) for p in planned.keys() ^ big_flat.keys()
                   if p not in big_flat or p not in planned or tuple(jnp.shape(big_flat[p])) != planned[p])
    if wrong:
        raise ExpandError(f'expand_opt_state: big_params do not fit the plan (paths or shapes differ): {wrong[:8]}')
    structure = jax.tree_util.tree_structure(small_params)
    shapes = [tuple(jnp.shape(a)) for a in jax.tree_util.tree_leaves(small_params)]
    reset = rule == 'reset'

    def visit(node, field):
        if _is_params_like(node, structure, shapes):
            return _map_slot(node, plan, 2 if field in SECOND_MOMENT_FIELDS else 1, reset)
        if isinstance(node, optax.MaskedNode):
            raise ExpandError('expand_opt_state: masked optimiser states (optax.masked, multi_transform) are not '
                              'supported; build the big optimiser and use rule=\'reset\' via its init.')
        if isinstance(node, tuple) and hasattr(node, '_fields'):
            fields = {f: visit(getattr(node, f), f) for f in node._fields}
            holds_slots = any(_is_params_like(getattr(node, f), structure, shapes) for f in node._fields)
            if reset and holds_slots and 'count' in fields:
                fields['count'] = jnp.zeros_like(node.count)
            return type(node)(**fields)
        if isinstance(node, (tuple, list)):
            return type(node)(visit(child, None) for child in node)
        if isinstance(node, Mapping):
            return type(node)({key: visit(child, key) for key, child in node.items()})
        return node

    return visit(opt_state, None)


def rate_scales(plan: Plan) -> dict:
    """Per params leaf, 1 / (product of its split axes' factors): the learning-rate factor that makes
    Adam move a split leaf's copies together as fast as the small weight moved (also muP's 1/fan_in
    rule for Adam's hidden layers). Multiply the updates by it, e.g. optax.chain(optax.adamw(lr),
    optax.stateless(lambda updates, _: jax.tree_util.tree_map(jnp.multiply, updates, scales)))."""
    return unflatten({p[1:]: 1.0 / leaf.read_factor for p, leaf in plan.leaves.items() if p[0] == 'params'})
