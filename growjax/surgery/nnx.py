"""Grow a Flax NNX model that growjax did not write, without editing its code.

    grown = nnx_surgery.grow(model, [
        surgery.Widen('blocks/1/fc1', units=32, into='blocks/1/fc2', activation=nnx.gelu),
        surgery.LoRA('blocks/0/attn/(query|value)', rank=4),
    ], rngs=nnx.Rngs(1))

The operations are growjax.surgery's (Widen, AddHeads, InsertAfter, Deepen, LoRA: the same classes,
validation and naming); this module applies them to an `nnx.Module`. In NNX the pretrained values
already live in the module's Variables, so growth is attribute surgery on the module graph, and it
replaces `grow_params`: `grow` returns the grown module with every pretrained Variable holding its
value, at its state path.

Paths. A module's path is the attribute names from the root, joined with '/': `self.blocks =
nnx.List([...])` holding `Block`s whose `self.mlp.fc1` is an nnx.Linear gives 'blocks/0/mlp/fc1';
the same names as `nnx.state(model)`'s keys (list indices as numbers). Regexes fully match these
paths. Patterns match the model's own modules: the root, nnx.List/nnx.Dict containers and the parts
growjax added are not matched. A module shared by two attributes is found at its first path only.

How a module grows, and why its state paths stay. nnx.state flattens a module by its attributes
(`vars(module)`): a wrapper holding `self.inner = original` would move `fc1/kernel` to
`fc1/inner/kernel`. Here a matched module keeps its identity: its class becomes a growjax subclass
of its own class (`GrownLinear` is an nnx.Linear) whose `__call__` adds the operation's part around
the original call, and the new parts are new attributes of the same object. Its attributes, and so
its Variables and their paths, are untouched (`fc1/kernel` stays `fc1/kernel`); only new paths
appear, at the linen version's names:

- Widen(P, units, into=C): `P/plus` (nnx.Linear or nnx.Conv like P), `C/from_<P>_plus` (the fan-in
  from the new units; `<P>` is P's attribute name, a list element's is `<list>_<i>`), `C/norm` (the
  paper's NormScale: `C/norm/scale_0` for the old units, `scale_1` for the new, initialised to
  scale_init), and `<T>/plus` for a BatchNorm T named in `through`. Preserving the function: no
  NormScale and a zero fan-in.
- AddHeads(A, heads) on an nnx.MultiHeadAttention (or a module with query/key/value/out
  projections: nnx.LinearGeneral with (heads, head_dim) features, or nnx.Linear with head_dim
  given or A's `num_heads` / `n_head`; or with one fused nnx.Linear projection named by qkv=, of 3
  x heads x head_dim features, whose input feeds all three of the new heads' projections):
  `A/extra_heads/{query,key,value}`, `A/out/from_extra_heads`, `A/out/norm`. The new heads take
  A's `mask` argument; causal follows surgery.resolve_causal (a user's attention called without
  a mask needs causal=True or False), and an `is_causal=True` call makes them causal.
- InsertAfter(M, block): the block at `M/inserted` (linen: `<M>_inserted` beside M). `block` is
  called with `rngs=` (or the rngs as its one argument, or nothing) and returns an nnx.Module, or is
  'copy': a copy of M as pretrained (its Variables' values copied, growjax's parts of M left out).
  residual=True: out = y + block(y), the block's last layer with a kernel (in the order its
  `__init__` assigns them; the block itself if it has one and no such layer) starts at zero;
  `zero=REGEX` names the layers (paths inside the block) to start at zero instead.
- Deepen(C, units): a new nnx.Linear `C/fc_a` (linen: `<C>_fc_a`) between C's input and C. C then
  reads `units` features: unless units equals its input width, C's kernel is re-created for the
  new width, which `reinit` must allow (e.g. reinit='^head/').
- LoRA(M, rank) on nnx.Linear / nnx.LinearGeneral: Variables `M/lora_a`, `M/lora_b` (B = 0).

A second operation of a kind on the same pattern gets the suffix '2' ('plus2', 'norm2', ...), also
across growth rounds: `grow(grown, more_ops, rngs=...)` appends operations, names of earlier rounds
stay.

Checks. Whether a new block starts as the identity and can train depends on the model's code
(a pre-LN block holds its own residual sum; a zero layer before a ReLU gets no gradient), so grow
runs the grown model on `sample=` and raises, naming the operation, rather than return a model
that is silently not what was asked for (see grow; required with InsertAfter or
preserve_function=True). `report(pretrained, grown, x)` and `check_function(pretrained, grown, x)`
are surgery.report's and surgery.check_function's NNX versions.

Calls. The user's code runs unchanged (`x = self.fc2(nnx.relu(self.fc1(x)))`): the producer's
wrapper returns P's old output and leaves its new units in a store of the current call, the
consumer's wrapper reads them. The store opens when the grown root's `__call__` runs; calling a
part or another method of the root also works (a module-level store is used), but only the root's
`__call__` checks that every producer's new units were read.

In place or a copy. By default `grow` grows a deep copy (`nnx.clone`) and leaves the pretrained
module as it was; `in_place=True` grows the module itself (no second copy of the weights; an error
in a later operation can leave it partly grown).

Not supported: Widen of modules other than nnx.Linear / nnx.Conv (no feature groups), `through`
modules other than nnx.BatchNorm, AddHeads on a decoding (decode=True) attention or one given a
mask under another name than `mask` (timm's attn_mask), LoRA on nnx.Einsum or a LinearGeneral with
batch axes. Each is a one-line SurgeryError naming the path and type.

Training (see README, "Flax NNX"): `nnx.state(grown, nnx.Param)` and `nnx.to_pure_dict` give the
trees growjax.param_labels, growth_optimizer and grow_opt_state read (they accept an nnx.State and
return pure dicts); `on_pure_dicts(tx)` lets nnx.Optimizer run such an optax transformation.
"""
from __future__ import annotations

import contextvars
import dataclasses
import difflib
import functools
import inspect
import math
import re
import threading
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from growjax.grow import compile_patterns, pure
from growjax.nn import lecun_normal_flat, lora_delta, lora_shapes, norm_scale, norm_scale_groups, norm_scale_sizes
from growjax.surgery import ops as O
from growjax.surgery.ops import COPY, AddHeads, Deepen, InsertAfter, LoRA, Operation, SurgeryError, Widen, describe
from growjax.surgery.report import Report

__all__ = ['NormScale', 'check_function', 'grow', 'module_paths', 'on_pure_dicts', 'report']


# ---------------------------------------------------------------------------------------------
# NormScale


class NormScale(nnx.Module):
    """The paper's per-group L2 normalisation with a learned per-unit scale (growjax.nn.NormScale in
    NNX, the same computation: growjax.nn.norm_scale): the last axis is split into `group_sizes`,
    each group is L2-normalised per example (in float32, floor `growjax.nn.NORM_EPS`: an all-zero
    group gives zeros and finite gradients) and multiplied by its own scale `scale_<i>` (float32,
    initialised to `scale_init`)."""

    def __init__(self, group_sizes: Sequence[int], scale_init: float = 10.0):
        self.group_sizes = norm_scale_sizes(group_sizes)
        for i, size in enumerate(self.group_sizes):
            setattr(self, f'scale_{i}', nnx.Param(jnp.full((size,), scale_init, jnp.float32)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return norm_scale(x, self.group_sizes, [getattr(self, f'scale_{i}')[...]
                                                for i in range(len(self.group_sizes))])


# ---------------------------------------------------------------------------------------------
# Grown modules: the same object, a growjax subclass of its class


@dataclasses.dataclass(frozen=True)
class _Role:
    """What one operation does at one module (a static attribute of the grown module)."""
    kind: str  # producer, through, consumer, attention, head_input, head_output, insert_after, deepen, lora
    index: int  # the operation's place in the root's list of operations
    op: Operation
    path: str  # the module's path
    attrs: tuple = ()  # names of the new attributes it uses (None: absent)
    info: tuple = ()  # kind-specific static facts


_CLASSES: dict[type, type] = {}
_CLASSES_LOCK = threading.Lock()


def _grown_class(base: type) -> type:
    """`Grown<Base>`: a subclass of `base` whose __call__ runs the module's operations (one per base
    class, so graph definitions of two grown models compare equal)."""
    with _CLASSES_LOCK:
        cls = _CLASSES.get(base)
        if cls is None:
            def __call__(self, *args, **kwargs):
                return _grown_call(self, super(cls, self).__call__, args, kwargs)

            cls = type(f'Grown{base.__name__}', (base,), {
                '__call__': __call__, '__module__': __name__, '__qualname__': f'Grown{base.__qualname__}',
                '__doc__': f'{base.__qualname__} grown by growjax.nnx_surgery (same attributes and Variables, plus '
                           'the new parts named in _growjax_added).',
                '_growjax_base': base})
            _CLASSES[base] = cls
        return cls


def _is_grown(module) -> bool:
    return type(module).__dict__.get('_growjax_base') is not None


def _wrap(module: nnx.Module) -> nnx.Module:
    """Turns `module` (in place) into its grown class; its attributes stay as they are."""
    if not _is_grown(module):
        object.__setattr__(module, '__class__', _grown_class(type(module)))
        module._growjax_roles = ()
        module._growjax_added = ()
    return module


def _add(module: nnx.Module, path: str, role: _Role, new: Mapping[str, Any]) -> None:
    _wrap(module)
    for name, value in new.items():
        if name in vars(module):
            raise SurgeryError(f'{describe(role.op)}: {path or "the model"} already has an attribute {name!r}.')
        setattr(module, name, value)
    module._growjax_added = module._growjax_added + tuple(new)
    module._growjax_roles = module._growjax_roles + (role,)


# ---------------------------------------------------------------------------------------------
# One call


@dataclasses.dataclass
class _Scope:
    strict: bool
    pending: dict = dataclasses.field(default_factory=dict)  # Widen (index, op) -> (producer path, new units)
    heads: dict = dataclasses.field(default_factory=dict)  # (index, op, attention path) -> inputs


_SCOPE: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar('growjax_nnx_scope', default=None)
_LOOSE = threading.local()
# Operations (indices into the root's list) whose roles a call skips: the model as if they had not
# been applied, which the function checks compare with (read when a call runs, or is traced).
_SKIP: contextvars.ContextVar[frozenset] = contextvars.ContextVar('growjax_nnx_skip', default=frozenset())
# When set, each inserted block's input and output, by (operation index, path): for the error that
# says why a block does not start as the identity.
_PROBE: contextvars.ContextVar[dict | None] = contextvars.ContextVar('growjax_nnx_probe', default=None)


def _scope() -> _Scope:
    scope = _SCOPE.get()
    if scope is None:  # a part or another method of the grown model was called, not its root's __call__
        scope = getattr(_LOOSE, 'scope', None)
        if scope is None:
            scope = _LOOSE.scope = _Scope(strict=False)
    return scope


def _grown_call(module, base_call, args, kwargs):
    ops = vars(module).get('_growjax_ops')
    if ops is None:
        return _apply_roles(module, base_call, args, kwargs)
    scope = _Scope(strict=True)
    token = _SCOPE.set(scope)
    try:
        out = _apply_roles(module, base_call, args, kwargs)
    finally:
        _SCOPE.reset(token)
    for (_, op), (producer, _) in scope.pending.items():
        raise O.not_read(op, producer)
    return out


def _apply_roles(module, call, args, kwargs):
    skip = _SKIP.get()
    # Nested so that the first operation is the outermost: it sees the module's original input.
    for role in reversed(module._growjax_roles):
        if role.index not in skip:
            call = functools.partial(_RUN[role.kind], module, role, call)
    return call(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Finding modules


def module_paths(model: nnx.Module) -> dict[str, nnx.Module]:
    """{path: module} of the modules operations can match ('blocks/0/mlp/fc1', ...): every module
    but the root, nnx.List / nnx.Dict containers and growjax's added parts."""
    nodes = {path: node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)}
    found = {}
    for path, node in nodes.items():
        if not path or isinstance(node, (nnx.List, nnx.Dict)):
            continue
        if any(path[i] in getattr(nodes.get(path[:i]), '_growjax_added', ()) for i in range(len(path))):
            continue
        found['/'.join(str(part) for part in path)] = node
    return dict(sorted(found.items()))


def _match(op: Operation, pattern: str, modules: Mapping[str, nnx.Module], what: str = '') -> dict[str, nnx.Module]:
    found = {path: m for path, m in modules.items() if re.fullmatch(pattern, path)}
    if not found:
        raise O.no_match(op, pattern, list(modules), what, 'of the model', 'Its modules')
    return found


def _short_name(path: str) -> str:
    """The name a producer gives its consumer's fan-in: its attribute name, `<list>_<i>` in a list."""
    parts = path.split('/')
    return f'{parts[-2]}_{parts[-1]}' if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def _nearest(path: str, candidates: Sequence[str]) -> str:
    """The candidate sharing the longest path prefix with `path` (the producer in the same block)."""
    parts = path.split('/')

    def shared(other):
        n = 0
        for a, b in zip(parts, other.split('/')):
            if a != b:
                break
            n += 1
        return n
    return max(candidates, key=shared)


def _walk(module: nnx.Module, prefix: str = '') -> Iterator[tuple[str, nnx.Module]]:
    """(path inside `module`, submodule) in the order `__init__` assigned them (the module itself first)."""
    yield prefix, module
    for name, value in vars(module).items():
        if name.startswith('_pytree__') or name.startswith('_growjax'):
            continue
        values = list(enumerate(value)) if isinstance(value, (list, tuple)) else [(None, value)]
        for i, child in values:
            if isinstance(child, nnx.Module):
                key = name if i is None else f'{name}/{i}'
                yield from _walk(child, f'{prefix}/{key}' if prefix else key)


# ---------------------------------------------------------------------------------------------
# New layers like the old ones


def _is_linear(module) -> bool:
    return isinstance(module, nnx.Linear)


def _is_plain_conv(module) -> bool:
    return isinstance(module, nnx.Conv) and module.feature_group_count == 1


def _linear_like(module, in_features: int, out_features: int, rngs: nnx.Rngs, *, use_bias: bool,
                 kernel_init=lecun_normal_flat) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=module.dtype, param_dtype=module.param_dtype,
                      precision=module.precision, kernel_init=kernel_init, rngs=rngs)


def _conv_like(module: nnx.Conv, in_features: int, out_features: int, rngs: nnx.Rngs, *, use_bias: bool,
               kernel_init=lecun_normal_flat) -> nnx.Conv:
    return nnx.Conv(in_features, out_features, module.kernel_size, module.strides, padding=module.padding,
                    input_dilation=module.input_dilation, kernel_dilation=module.kernel_dilation, use_bias=use_bias,
                    dtype=module.dtype, param_dtype=module.param_dtype, precision=module.precision,
                    kernel_init=kernel_init, rngs=rngs)


def _zeros(key, shape, dtype=jnp.float32):
    del key
    return jnp.zeros(shape, dtype)


def _identity(key, shape, dtype=jnp.float32):
    del key
    return jnp.eye(shape[0], shape[1], dtype=dtype)


def _batch_norm_like(module: nnx.BatchNorm, features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(features, use_running_average=module.use_running_average, axis=module.axis,
                         momentum=module.momentum, epsilon=module.epsilon, dtype=module.dtype,
                         param_dtype=module.param_dtype, use_bias=module.use_bias, use_scale=module.use_scale,
                         axis_name=module.axis_name, axis_index_groups=module.axis_index_groups,
                         use_fast_variance=module.use_fast_variance, rngs=rngs)


# ---------------------------------------------------------------------------------------------
# Setting up each operation: _plan_* checks everything and returns a function that applies it


@dataclasses.dataclass
class _Setup:
    rngs: nnx.Rngs
    preserve: bool
    reinit: list  # compiled regexes
    reinitialised: set = dataclasses.field(default_factory=set)  # module paths whose kernel was re-created


def _plan_widen(index, op: Widen, suffix, modules, setup: _Setup):
    rngs, preserve = setup.rngs, setup.preserve
    producers = _match(op, op.module, modules)
    consumers = {p: m for p, m in _match(op, op.into, modules, 'into=').items() if p not in producers}
    if not consumers:
        raise SurgeryError(f'{describe(op)}: into={op.into!r} matches only producers. '
                           f'{O.suggest(op.into, list(modules), "Its modules")}')
    throughs = {}
    for pattern in op.through:
        for path, module in _match(op, pattern, modules, 'through=').items():
            if not isinstance(module, nnx.BatchNorm):
                raise SurgeryError(f'{describe(op)}: through module {path} is a {O.kind(module)}; nnx_surgery copies '
                                   'nnx.BatchNorm for the new units.')
            throughs[path] = module
    for path, module in producers.items():
        if not (_is_linear(module) or _is_plain_conv(module)):
            raise SurgeryError(f'{describe(op)}: {path} is a {O.kind(module)}; Widen grows nnx.Linear and nnx.Conv '
                               '(no feature groups).')
    for path, module in consumers.items():
        if not (_is_linear(module) or _is_plain_conv(module)):
            raise SurgeryError(f'{describe(op)}: consumer {path} is a {O.kind(module)}; Widen feeds nnx.Linear and '
                               'nnx.Conv (no feature groups).')

    def apply():
        name = 'plus' + suffix
        for path, module in producers.items():
            like = _linear_like if _is_linear(module) else _conv_like
            plus = like(module, module.in_features, op.units, rngs, use_bias=module.use_bias)
            _add(module, path, _Role('producer', index, op, path, (name,)), {name: plus})
        for path, module in throughs.items():
            _add(module, path, _Role('through', index, op, path, (name,)),
                 {name: _batch_norm_like(module, op.units, rngs)})
        for path, module in consumers.items():
            fan_in_name = f'from_{_short_name(_nearest(path, list(producers)))}_plus{suffix}'
            like = _linear_like if _is_linear(module) else _conv_like
            new = {fan_in_name: like(module, op.units, module.out_features, rngs, use_bias=False,
                                     kernel_init=_zeros if preserve else lecun_normal_flat)}
            norm_name = None
            if op.norm_scale and not preserve:
                norm_name = 'norm' + suffix
                new[norm_name] = NormScale([module.in_features, op.units], op.scale_init)
            _add(module, path, _Role('consumer', index, op, path, (norm_name, fan_in_name)), new)
    return apply


class _ExtraHeads(nnx.Module):
    """The new heads: their own query/key/value projections and attention over the same inputs."""

    def __init__(self, in_q: int, in_k: int, in_v: int, heads: int, head_dim: int, *, use_bias: bool,
                 normalize_qk: bool, dropout_rate: float, broadcast_dropout: bool, dtype, param_dtype, rngs: nnx.Rngs):
        def dense(features):
            return nnx.LinearGeneral(features, (heads, head_dim), use_bias=use_bias, dtype=dtype,
                                     param_dtype=param_dtype, kernel_init=lecun_normal_flat, rngs=rngs)
        self.query, self.key, self.value = dense(in_q), dense(in_k), dense(in_v)
        if normalize_qk:
            self.query_ln = nnx.LayerNorm(head_dim, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.key_ln = nnx.LayerNorm(head_dim, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads = heads
        self.dropout_rate = float(dropout_rate)
        self.broadcast_dropout = bool(broadcast_dropout)
        self.dtype = dtype

    def __call__(self, inputs_q, inputs_k, inputs_v, *, mask, causal: bool, deterministic: bool, dropout_rng):
        q, k, v = self.query(inputs_q), self.key(inputs_k), self.value(inputs_v)
        if 'query_ln' in vars(self):
            q, k = self.query_ln(q), self.key_ln(k)
        mask = O.heads_mask(mask, causal, inputs_q.shape[:-1], self.heads)
        return nnx.dot_product_attention(q, k, v, mask=mask, dropout_rng=dropout_rng, dropout_rate=self.dropout_rate,
                                         broadcast_dropout=self.broadcast_dropout,
                                         deterministic=deterministic or not self.dropout_rate, dtype=self.dtype)


def _features(projection) -> int:
    features = projection.in_features
    return int(features) if isinstance(features, int) else int(math.prod(features))


def _fused_layout(op: AddHeads, path: str, attention, fused, out) -> tuple[int, int]:
    """(heads, head_dim) of an attention whose q/k/v come from one fused nnx.Linear `op.qkv`."""
    where = f'{describe(op)}: {path}'
    if not _is_linear(fused):
        raise SurgeryError(f'{where}/{op.qkv} is a {O.kind(fused)}; a fused qkv projection is an nnx.Linear of 3 x '
                           'heads x head_dim output features.')
    if not _is_linear(out):
        raise SurgeryError(f'{where}/{op.out} is a {O.kind(out)}; with a fused qkv projection the output projection is '
                           'an nnx.Linear reading heads x head_dim features.')
    return O.fused_heads(op, path, fused.out_features, O.head_count(attention), out.in_features)


def _plan_add_heads(index, op: AddHeads, suffix, modules, setup: _Setup):
    rngs, preserve = setup.rngs, setup.preserve
    plans = []
    for path, attention in _match(op, op.module, modules).items():
        children = {}
        for name, role in (*op.projections.items(), (op.out, 'out')):
            child = getattr(attention, name, None)
            if not isinstance(child, nnx.Module):
                raise SurgeryError(f'{describe(op)}: {path} is a {O.kind(attention)} without a {name!r} projection; '
                                   'AddHeads grows nnx.MultiHeadAttention, or a module whose query/key/value/out '
                                   'projections are nnx.LinearGeneral with (heads, head_dim) features or nnx.Linear '
                                   'with head_dim given, or whose fused projection is named by qkv=.')
            children[role] = (name, child)
        O.attention_call(op, path, attention, {})
        out = children['out'][1]
        if op.qkv is not None:
            fused = children['qkv'][1]
            heads, head_dim = _fused_layout(op, path, attention, fused, out)
            plans.append((path, attention, children, fused, (fused.in_features,) * 3, heads, head_dim, True))
            continue
        query = children['query'][1]
        if (isinstance(query, nnx.LinearGeneral) and len(query.out_features) == 2 and tuple(query.axis) == (-1,)
                and not query.batch_axis):
            heads, head_dim = (int(f) for f in query.out_features)
            flat = False
            if not (isinstance(out, nnx.LinearGeneral) and tuple(out.in_features) == (heads, head_dim)):
                raise SurgeryError(f'{describe(op)}: {path}/{op.out} is a {O.kind(out)}; with (heads, head_dim) '
                                   f'projections AddHeads needs an nnx.LinearGeneral reading ({heads}, {head_dim}).')
        elif isinstance(query, nnx.Linear) and isinstance(out, nnx.Linear):
            heads, head_dim = O.flat_heads(op, path, 'nnx.Linear', query.out_features, O.head_count(attention),
                                           out.in_features)
            flat = True
        else:
            raise SurgeryError(f'{describe(op)}: {path}/{op.query} is a {O.kind(query)}; AddHeads needs '
                               'nnx.LinearGeneral projections with (heads, head_dim) features (as '
                               'nnx.MultiHeadAttention) or nnx.Linear ones with head_dim given.')
        in_features = tuple(_features(children[which][1]) for which in ('query', 'key', 'value'))
        plans.append((path, attention, children, query, in_features, heads, head_dim, flat))

    def apply():
        for path, attention, children, query, in_features, heads, head_dim, flat in plans:
            out = children['out'][1]
            extra_name = 'extra_heads' + suffix
            extra = _ExtraHeads(
                *in_features, op.heads, head_dim,
                use_bias=query.use_bias, normalize_qk=bool(getattr(attention, 'normalize_qk', False)),
                dropout_rate=float(getattr(attention, 'dropout_rate', 0.0)),
                broadcast_dropout=bool(getattr(attention, 'broadcast_dropout', True)), dtype=query.dtype,
                param_dtype=query.param_dtype, rngs=rngs)
            _add(attention, path, _Role('attention', index, op, path, (extra_name,)), {extra_name: extra})
            for which in op.projections.values():
                name, child = children[which]
                _add(child, f'{path}/{name}', _Role('head_input', index, op, f'{path}/{name}', (), (path, which)), {})
            kernel_init = _zeros if preserve else lecun_normal_flat
            from_name = 'from_extra_heads' + suffix
            if flat:
                projection = _linear_like(out, op.heads * head_dim, out.out_features, rngs, use_bias=False,
                                          kernel_init=kernel_init)
            else:
                projection = nnx.LinearGeneral((op.heads, head_dim), out.out_features, axis=(-2, -1), use_bias=False,
                                               dtype=out.dtype, param_dtype=out.param_dtype, precision=out.precision,
                                               kernel_init=kernel_init, rngs=rngs)
            new = {from_name: projection}
            norm_name = None
            if op.norm_scale and not preserve:
                norm_name = 'norm' + suffix
                new[norm_name] = NormScale([heads * head_dim, op.heads * head_dim], op.scale_init)
            out_path = f'{path}/{children["out"][0]}'
            _add(out, out_path, _Role('head_output', index, op, out_path, (norm_name, from_name, extra_name),
                                      (path, flat, heads, head_dim)), new)
    return apply


def _plain_copy(module: nnx.Module) -> nnx.Module:
    """A deep copy of `module` as the user's classes built it: growjax's parts and roles removed."""
    copy = nnx.clone(module)
    for _, node in list(nnx.iter_graph(copy)):
        if isinstance(node, nnx.Module) and _is_grown(node):
            for name in (*node._growjax_added, '_growjax_roles', '_growjax_added', '_growjax_ops', '_growjax_claims'):
                if name in vars(node):
                    delattr(node, name)
            object.__setattr__(node, '__class__', type(node).__dict__['_growjax_base'])
    return copy


def _make_block(op: InsertAfter, rngs: nnx.Rngs):
    try:
        parameters = inspect.signature(op.block).parameters.values()
    except (TypeError, ValueError):
        parameters = ()
    if any(p.name == 'rngs' or p.kind == p.VAR_KEYWORD for p in parameters):
        return op.block(rngs=rngs)
    if any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in parameters):
        return op.block(rngs)
    return op.block()


def _plan_insert_after(index, op: InsertAfter, suffix, modules, setup: _Setup):
    blocks = {}
    for path, module in _match(op, op.module, modules).items():
        block = _plain_copy(module) if op.block == COPY else _make_block(op, setup.rngs)
        if not isinstance(block, nnx.Module):
            raise SurgeryError(f'{describe(op)}: block returned a {type(block).__name__}, not an nnx.Module.')
        inside = list(_walk(block))
        if op.zero is not None:
            zeroed = [(p, m) for p, m in inside if re.fullmatch(op.zero, p)]
            if not zeroed:
                raise SurgeryError(f'{describe(op)}: zero={op.zero!r} matches no module of the new block. '
                                   f'{O.suggest(op.zero, [p for p, _ in inside if p], "Its modules")}')
        elif op.residual:
            kernels = [(p, m) for p, m in inside if isinstance(vars(m).get('kernel'), nnx.Variable)]
            if len(kernels) > 1:
                kernels = [(p, m) for p, m in kernels if p]  # layers inside the block, not the block itself
            if not kernels:
                raise O.no_kernel_to_zero(op)
            zeroed = [kernels[-1]]
        else:
            zeroed = []
        blocks[path] = (module, block, zeroed)

    def apply():
        name = 'inserted' + suffix
        for path, (module, block, zeroed) in blocks.items():
            for _, layer in zeroed:
                for variable in vars(layer).values():
                    if isinstance(variable, nnx.Param):
                        variable.set_value(jnp.zeros_like(variable.get_value()))
            # info: the paths inside the block of the layers whose Params start at zero (grow checks they
            # get a gradient)
            params = tuple(p for p, layer in zeroed if any(isinstance(v, nnx.Param) for v in vars(layer).values()))
            _add(module, path, _Role('insert_after', index, op, path, (name,), params), {name: block})
    return apply


def _plan_deepen(index, op: Deepen, suffix, modules, setup: _Setup):
    rngs, preserve, reinit = setup.rngs, setup.preserve, setup.reinit
    matches = _match(op, op.module, modules)
    for path, module in matches.items():
        if not _is_linear(module):
            raise SurgeryError(f'{describe(op)}: {path} is a {O.kind(module)}; Deepen puts an nnx.Linear layer before '
                               'an nnx.Linear.')
        width = module.in_features
        if preserve and op.units != width:
            raise O.needs_identity_width(op, path, width)
        if op.units != width and not any(p.search(f'{path}/kernel') for p in reinit):
            raise SurgeryError(f'{describe(op)}: {path} reads {width} features and would read {op.units}, so its '
                               f"kernel must be re-initialised: pass reinit='^{path}/' (and the same reinit to "
                               f'param_labels), or units={width}.')

    def apply():
        for path, module in matches.items():
            width = module.in_features
            layer = _linear_like(module, width, op.units, rngs, use_bias=True,
                                 kernel_init=_identity if preserve else lecun_normal_flat)
            if op.units != width:  # re-initialised for its new input width (reinit allows it)
                module.kernel = nnx.Param(lecun_normal_flat(rngs.params(), (op.units, module.out_features),
                                                            module.param_dtype))
                module.in_features = op.units
                setup.reinitialised.add(path)
            name = 'fc_a' + suffix
            _add(module, path, _Role('deepen', index, op, path, (name,)), {name: layer})
    return apply


def _plan_lora(index, op: LoRA, suffix, modules, setup: _Setup):
    rngs = setup.rngs
    matches = _match(op, op.module, modules)
    for path, module in matches.items():
        if not (_is_linear(module) or (isinstance(module, nnx.LinearGeneral) and not module.batch_axis)):
            raise SurgeryError(f'{describe(op)}: {path} is a {O.kind(module)}; LoRA adapts nnx.Linear and '
                               'nnx.LinearGeneral.')

    def apply():
        for path, module in matches.items():
            if _is_linear(module):
                fan_in, out_shape, axes = module.in_features, (module.out_features,), (-1,)
            else:
                fan_in, out_shape = math.prod(module.in_features), tuple(module.out_features)
                axes = tuple(module.axis)
            names = ('lora_a' + suffix, 'lora_b' + suffix)
            a_shape, b_shape = lora_shapes(fan_in, out_shape, op.rank)
            new = {names[0]: nnx.Param(lecun_normal_flat(rngs.params(), a_shape, jnp.float32)),
                   names[1]: nnx.Param(jnp.zeros(b_shape, jnp.float32))}
            _add(module, path, _Role('lora', index, op, path, names, (axes, out_shape)), new)
    return apply


_PLAN = {Widen: _plan_widen, AddHeads: _plan_add_heads, InsertAfter: _plan_insert_after, Deepen: _plan_deepen,
         LoRA: _plan_lora}


# ---------------------------------------------------------------------------------------------
# Running each role


def _run_producer(module, role: _Role, call, *args, **kwargs):
    scope = _scope()
    key = (role.index, role.op)
    if key in scope.pending and scope.strict:
        raise O.called_again(role.op, role.path)
    scope.pending[key] = (role.path, getattr(module, role.attrs[0])(args[0]))
    return call(*args, **kwargs)


def _run_through(module, role: _Role, call, *args, **kwargs):
    y = call(*args, **kwargs)
    scope = _scope()
    key = (role.index, role.op)
    if key in scope.pending:
        producer, units = scope.pending[key]
        scope.pending[key] = (producer, getattr(module, role.attrs[0])(units, *args[1:], **kwargs))
    return y


def _run_consumer(module, role: _Role, call, *args, **kwargs):
    scope = _scope()
    key = (role.index, role.op)
    if key not in scope.pending:  # called before the producer (or a second time): nothing new to read
        return call(*args, **kwargs)
    op: Widen = role.op
    producer, units = scope.pending.pop(key)
    old = args[0]
    units = O.activated_units(op, role.path, producer, old, units)
    norm_name, fan_in_name = role.attrs
    if norm_name is None:
        scaled_old, scaled_new = old, units
    else:
        scaled_old, scaled_new = norm_scale_groups(getattr(module, norm_name), [old, units])
    y = call(scaled_old, *args[1:], **kwargs)
    return y + getattr(module, fan_in_name)(scaled_new).astype(y.dtype)


def _run_attention(module, role: _Role, call, *args, **kwargs):
    given = O.call_arguments(type(module)._growjax_base.__call__, (module, *args), kwargs)
    O.attention_call(role.op, role.path, module, given)
    _scope().heads[(role.index, role.op, role.path)] = {
        'attention': module, 'mask': given.get('mask'), 'deterministic': given.get('deterministic'),
        'rngs': given.get('rngs'), 'is_causal': bool(given.get('is_causal', False))}
    return call(*args, **kwargs)


def _run_head_input(module, role: _Role, call, *args, **kwargs):
    attention_path, which = role.info
    state = _scope().heads.get((role.index, role.op, attention_path))
    if state is not None:
        state.update(dict.fromkeys(('query', 'key', 'value'), args[0]) if which == 'qkv' else {which: args[0]})
    return call(*args, **kwargs)


def _run_head_output(module, role: _Role, call, *args, **kwargs):
    op: AddHeads = role.op
    attention_path, flat, heads, head_dim = role.info
    state = _scope().heads.pop((role.index, op, attention_path), None)
    if state is None or not all(which in state for which in ('query', 'key', 'value')):
        raise O.projections_not_called(op, attention_path, [k for k in state or {} if k in ('query', 'key', 'value')])
    norm_name, from_name, extra_name = role.attrs
    attention = state['attention']
    extra: _ExtraHeads = getattr(attention, extra_name)
    deterministic = state['deterministic']
    if deterministic is None:
        deterministic = getattr(attention, 'deterministic', None)
    deterministic = True if deterministic is None else bool(deterministic)
    dropout_rng = None
    if extra.dropout_rate and not deterministic:
        rngs = state['rngs'] if state['rngs'] is not None else getattr(attention, 'rngs', None)
        if rngs is None:
            raise SurgeryError(f'{describe(op)}: {attention_path} trains with dropout but has no rngs for the new '
                               'heads: pass rngs= to its call.')
        dropout_rng = rngs.dropout() if isinstance(rngs, nnx.Rngs) else rngs()
    new = extra(state['query'], state['key'], state['value'], mask=state['mask'],
                causal=O.resolve_causal(op, attention_path, isinstance(attention, nnx.MultiHeadAttention),
                                        state['mask'], state['is_causal']),
                deterministic=deterministic, dropout_rng=dropout_rng)
    old = args[0]
    old_flat = O.merge_heads(old, flat, heads, head_dim)
    new_flat = O.merge_heads(new, False, op.heads, head_dim)
    if norm_name is not None:
        old_flat, new_flat = norm_scale_groups(getattr(module, norm_name), [old_flat, new_flat])
    y = call(old_flat if flat else old_flat.reshape(old.shape), *args[1:], **kwargs)
    projection = getattr(module, from_name)
    return y + projection(new_flat if flat else new_flat.reshape(new.shape)).astype(y.dtype)


def _run_insert_after(module, role: _Role, call, *args, **kwargs):
    op: InsertAfter = role.op
    y = call(*args, **kwargs)
    O.block_output(op, role.path, y, None)
    out = getattr(module, role.attrs[0])(y, *args[1:], **kwargs)
    O.block_output(op, role.path, y, out)
    probe = _PROBE.get()
    if probe is not None:
        probe.setdefault((role.index, role.path), (y, out))
    return y + out if op.residual else out


def _run_deepen(module, role: _Role, call, *args, **kwargs):
    h = getattr(module, role.attrs[0])(args[0])
    h = h if role.op.activation is None else role.op.activation(h)
    return call(h, *args[1:], **kwargs)


def _run_lora(module, role: _Role, call, *args, **kwargs):
    y = call(*args, **kwargs)
    axes, out_shape = role.info
    a, b = getattr(module, role.attrs[0])[...], getattr(module, role.attrs[1])[...]
    return y + lora_delta(args[0], a, b, axes, out_shape, module.dtype).astype(y.dtype)


_RUN = {'producer': _run_producer, 'through': _run_through, 'consumer': _run_consumer, 'attention': _run_attention,
        'head_input': _run_head_input, 'head_output': _run_head_output, 'insert_after': _run_insert_after,
        'deepen': _run_deepen, 'lora': _run_lora}


# ---------------------------------------------------------------------------------------------
# Checks on concrete inputs (ops.check_claims, ops.check_alive)


def _evaluating(model: nnx.Module) -> nnx.Module:
    """A copy of `model` in eval mode (no dropout, BatchNorm on its running averages): a deterministic
    function, and the model's own state (batch statistics, RNG counts) untouched by the checks."""
    copy = nnx.clone(model)
    copy.eval()
    return copy


def _call(model: nnx.Module, sample: tuple, skip=frozenset(), probe: dict | None = None):
    """`model(*sample)` with the roles of the operations in `skip` switched off."""
    tokens = _SKIP.set(frozenset(skip)), _PROBE.set(probe)
    try:
        return model(*sample)
    finally:
        _PROBE.reset(tokens[1])
        _SKIP.reset(tokens[0])


def _check_on_sample(root: nnx.Module, checked: Sequence[int], sample: tuple, preserving: bool) -> None:
    """Runs the grown model on `sample` and checks that (i) the operations in `checked` that claim to
    keep the function do, and (ii) the layers InsertAfter zeroed receive a gradient."""
    ops, claims = root._growjax_ops, root._growjax_claims
    model = _evaluating(root)
    out = _call(model, sample)  # also raises the errors a call would (shapes, AddHeads' causal rule)
    O.check_claims(ops, [i for i in checked if i in claims], lambda skip, probe: _call(model, sample, skip, probe),
                   preserving)
    _check_alive(model, [i for i in checked if isinstance(ops[i], InsertAfter)], out, sample)


def _check_alive(model: nnx.Module, inserts: Sequence[int], out, sample: tuple) -> None:
    """ops.check_alive for the layers the InsertAfters `inserts` started at zero."""
    layers = {}
    for _, node in nnx.iter_graph(model):
        for role in getattr(node, '_growjax_roles', ()) if isinstance(node, nnx.Module) else ():
            if role.kind == 'insert_after' and role.index in inserts:
                block = f'{role.path}/{role.attrs[0]}'
                layers.update({f'{block}/{inner}' if inner else block: role.op for inner in role.info})
    if not layers:
        return
    cotangent = O.cotangents(out)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grads = jax.grad(lambda params: O.projected(nnx.merge(graphdef, params, rest)(*sample), cotangent))(params)
    moved = set()
    for path, value in nnx.to_flat_state(grads):
        if np.any(np.asarray(value.get_value() if isinstance(value, nnx.Variable) else value)):
            moved.add('/'.join(str(p) for p in path[:-1]))
    O.check_alive(layers, moved)


# ---------------------------------------------------------------------------------------------
# grow


def _check_reinit(patterns, pretrained: set[tuple]) -> None:
    """Every reinit regex must match a pretrained Param: a typo ('^haed/') would keep the pretrained
    leaves it meant to re-initialise, silently."""
    paths = sorted('/'.join(str(part) for part in path) for path in pretrained)
    for pattern in patterns:
        if not any(pattern.search(path) for path in paths):
            close = difflib.get_close_matches(pattern.pattern.strip('^$'), paths, n=6, cutoff=0.4)
            hint = f'Did you mean one of: {", ".join(close)}?' if close else f'Its parameters: {O.sample(paths)}.'
            raise SurgeryError(f"reinit: {pattern.pattern!r} matches no parameter of the model (regexes are searched "
                               f"in '/'-joined paths such as 'fc1/kernel'). {hint}")


def _reinit(root: nnx.Module, patterns, pretrained: set[tuple], rngs: nnx.Rngs, done: set[str]) -> None:
    """Fresh kernels (fan-in init) and zero biases for the pretrained leaves `patterns` match."""
    if not patterns:
        return
    modules = {path: node for path, node in nnx.iter_graph(root) if isinstance(node, nnx.Module)}
    for path in sorted(pretrained, key=str):
        joined = '/'.join(str(part) for part in path)
        if not any(p.search(joined) for p in patterns) or '/'.join(str(p) for p in path[:-1]) in done:
            continue
        module = modules.get(path[:-1])
        variable = vars(module).get(path[-1]) if module is not None else None
        if not isinstance(variable, nnx.Param) or path[-1] not in ('kernel', 'bias') or not isinstance(
                module, (nnx.Linear, nnx.Conv, nnx.LinearGeneral)):
            raise SurgeryError(f'reinit: {joined} matches, but nnx_surgery re-initialises only kernels and biases of '
                               'nnx.Linear, nnx.Conv and nnx.LinearGeneral layers.')
        value = variable.get_value()
        if path[-1] == 'bias':
            variable.set_value(jnp.zeros_like(value))
        elif isinstance(module, nnx.LinearGeneral):
            fan_in = math.prod(module.in_features)
            variable.set_value(lecun_normal_flat(rngs.params(), (fan_in, value.size // fan_in), value.dtype
                                                 ).reshape(value.shape))
        else:
            variable.set_value(lecun_normal_flat(rngs.params(), value.shape, value.dtype))


def _clone(module: nnx.Module) -> nnx.Module:
    """nnx.clone(module), its attributes in the original's order (nnx.clone sorts them; growjax reads
    the order `__init__` assigned the layers as their bottom-to-top order, e.g. in param_groups)."""
    copy = nnx.clone(module)
    originals = dict(nnx.iter_graph(module))
    for path, node in nnx.iter_graph(copy):
        original = originals.get(path)
        if isinstance(node, nnx.Pytree) and type(original) is type(node):
            attributes = vars(node)
            order = [name for name in vars(original) if name in attributes]
            order += [name for name in attributes if name not in order]
            items = [(name, attributes[name]) for name in order]
            attributes.clear()
            attributes.update(items)
    return copy


def grow(module: nnx.Module, ops: Operation | Sequence[Operation], *, rngs: nnx.Rngs, preserve_function: bool = False,
         reinit: str | Sequence[str] = (), in_place: bool = False, sample: Any = None) -> nnx.Module:
    """`module` (an nnx.Module, unmodified) grown by `ops` (growjax.surgery's operations).

    Returns a deep copy of `module`, grown (`in_place=True`: `module` itself, grown), with every
    Variable of `module` at its state path with its value, and the operations' new Variables at new
    paths (see the module docstring), initialised from `rngs` ('params' stream: fan-in aware normal
    kernels, zero biases, NormScale scales at scale_init, LoRA B at zero). The returned module's
    class is a growjax subclass of `module`'s class (isinstance holds).

    preserve_function=True initialises the new parts so the grown model computes what `module` did:
    zero fan-in from new units and no NormScale, zero new-head outputs, Deepen as the identity.
    reinit: regexes searched in 'a/b/kernel' paths of `module`'s Params; the kernels and biases they
    match are re-initialised (a Deepen consumer's kernel for its new input width); a regex that
    matches none is an error. Pass the same regexes as `reinit=` to growjax.param_labels so those
    leaves count as new.

    sample: inputs of the model's `__call__` (a tuple of positional arguments; anything else is the
    one argument), e.g. `sample=(x[:2],)`. Required with an InsertAfter or preserve_function=True:
    whether a new block starts as the identity and can train depends on the model's code, which
    only a call shows. grow then runs the grown model on it (a copy in eval mode) and raises a
    SurgeryError naming the operation unless (i) the operations that claim to keep the function
    (LoRA, InsertAfter with a part at zero, every one with preserve_function=True) do: the output
    equals the output with their roles switched off, to surgery.function_tolerance (full float32 matmuls);
    (ii) every layer an InsertAfter starts at zero gets a non-zero gradient for a random cotangent
    of the output (a zero layer before a ReLU never does). With in_place=True a failed check leaves
    the module grown.

    Growing a grown module again appends the operations (names of earlier rounds stay); the checks
    concern the new ones.
    """
    ops = O.operations(ops, 'nnx_surgery.grow')
    if not isinstance(module, nnx.Module):
        hint = ' For Flax linen modules use growjax.surgery.grow.' if 'linen' in type(module).__module__ else ''
        raise SurgeryError(f'nnx_surgery.grow: expected a flax.nnx Module, got a {type(module).__name__}.{hint}')
    if not isinstance(rngs, nnx.Rngs):
        raise SurgeryError(f'nnx_surgery.grow: rngs must be an nnx.Rngs (for the new parameters), got '
                           f'{type(rngs).__name__}.')
    if sample is None:
        needs = next((describe(op) for op in ops if isinstance(op, InsertAfter)), None)
        if needs or preserve_function:
            what = f'{needs} keeps the function and trains' if needs else 'preserve_function=True keeps the function'
            raise SurgeryError(f'nnx_surgery.grow: whether {what} depends on the model\'s code, which growjax checks '
                               'by calling it: pass sample=(inputs,) (the positional arguments of its __call__, e.g. '
                               'sample=(x[:2],)).')
    previous = tuple(vars(module).get('_growjax_ops', ()))
    O.operations(ops, 'nnx_surgery.grow', previous)  # no LoRA given twice, earlier rounds included
    everything = previous + ops
    patterns = compile_patterns(reinit)
    suffixes = O.suffixes(everything)

    root = module if in_place else _clone(module)
    modules = module_paths(root)
    pretrained = {tuple(path) for path, _ in nnx.to_flat_state(nnx.state(root, nnx.Param))}
    _check_reinit(patterns, pretrained)
    # Every operation is checked (matches, module kinds) before any is applied.
    setup = _Setup(rngs, preserve_function, patterns)
    steps = [_PLAN[type(op)](index, op, suffixes[index], modules, setup)
             for index, op in enumerate(everything) if index >= len(previous)]
    _wrap(root)
    for step in steps:
        step()
    _reinit(root, patterns, pretrained, rngs, setup.reinitialised)
    root._growjax_ops = everything
    root._growjax_claims = tuple(vars(root).get('_growjax_claims', ())) + tuple(
        index for index, op in enumerate(ops, len(previous)) if O.claims(op, preserve_function))
    if sample is not None:
        sample = sample if isinstance(sample, tuple) else (sample,)
        _check_on_sample(root, range(len(previous), len(everything)), sample, preserve_function)
    return root


# ---------------------------------------------------------------------------------------------
# What was grafted


def _variable_paths(model: nnx.Module) -> set[str]:
    """'a/b/leaf' paths of the model's Variables, RNG state left out (counters, not weights)."""
    return {'/'.join(str(part) for part in path)
            for path, variable in nnx.to_flat_state(nnx.state(model)) if not isinstance(variable, nnx.RngState)}


def report(pretrained_model: nnx.Module, grown_model: nnx.Module, *sample_args, reinit: str | Sequence[str] = (),
           atol: float = 1e-5) -> Report:
    """surgery.report for NNX: which Variables of `grown_model` (grown from `pretrained_model` by
    grow) are copied (at a pretrained path), new, or re-initialised (at a pretrained path that a
    `reinit` regex searches), per module; what each operation matched; and, on `sample_args`
    (both models in eval mode, on copies):

    - max_abs_difference: the grown model with the operations that change the function by design
      (`changes_function`: those that claim nothing, see grow) switched off, against the pretrained
      model: a SurgeryError above `atol` (a pretrained value moved, or a claim broken). None when
      leaves were re-initialised or the outputs' shapes differ (they differ by design then);
    - grown_difference: the grown model as it is, against the pretrained model.
    """
    ops = vars(grown_model).get('_growjax_ops')
    if ops is None:
        raise SurgeryError('nnx_surgery.report: grown_model was not grown by nnx_surgery.grow.')
    patterns = compile_patterns(reinit)
    pretrained_paths = _variable_paths(pretrained_model)
    modules: dict[str, dict[str, list[str]]] = {}
    for path in sorted(_variable_paths(grown_model)):
        module, leaf = path.rsplit('/', 1) if '/' in path else ('', path)
        if path not in pretrained_paths:
            kind = 'new'
        else:
            kind = 'reinitialised' if any(p.search(path) for p in patterns) else 'copied'
        modules.setdefault(module, {}).setdefault(kind, []).append(leaf)
    matched: dict[int, set[str]] = {index: set() for index in range(len(ops))}
    for _, node in nnx.iter_graph(grown_model):
        for role in getattr(node, '_growjax_roles', ()) if isinstance(node, nnx.Module) else ():
            matched[role.index].add(role.path)
    matches: dict[str, list[str]] = {}
    for index, paths in matched.items():
        matches[describe(ops[index])] = sorted(set(matches.get(describe(ops[index]), ())) | paths)
    claims = vars(grown_model).get('_growjax_claims', ())
    changing = [index for index in range(len(ops)) if index not in claims]
    expected = _call(_evaluating(pretrained_model), sample_args)
    grown = _evaluating(grown_model)
    difference = None
    if not any('reinitialised' in kinds for kinds in modules.values()):
        difference = O.max_difference(_call(grown, sample_args, skip=changing), expected)
        if difference is not None and not difference <= atol:
            raise SurgeryError(f'nnx_surgery.report: the grown model, with the operations that change the function '
                               f'switched off, differs from the pretrained model by {difference:.3g} (> atol={atol}): '
                               'a pretrained value is not where the model reads it, or an operation does not keep the '
                               'function it claims to.')
    return Report(modules=modules, matches=matches, max_abs_difference=difference,
                  grown_difference=O.max_difference(_call(grown, sample_args), expected),
                  changes_function=tuple(describe(ops[index]) for index in changing))


def check_function(pretrained_model: nnx.Module, grown_model: nnx.Module, *sample_args, atol: float = 1e-5) -> float:
    """The max |difference| of the two models' outputs on `sample_args` (both in eval mode, on copies);
    a SurgeryError above `atol`.

    Give it a grown model that should compute what the pretrained one did (grown with
    preserve_function=True, or before training): values loaded into the wrong place (two square
    kernels swapped by a renamed layer, a transposed kernel) keep every shape and path, and this is
    the check that catches them."""
    return O.compare(_call(_evaluating(grown_model), sample_args), _call(_evaluating(pretrained_model), sample_args),
                     atol, 'nnx_surgery.check_function')


# ---------------------------------------------------------------------------------------------
# Optimisers over pure dicts


def on_pure_dicts(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` (e.g. growjax.growth_optimizer's, whose labels and masks are pure dicts) for trees given as
    nnx.State, as nnx.Optimizer gives them: parameters and updates are converted to pure dicts
    (nnx.to_pure_dict) before `tx` sees them, and updates back to an nnx.State. The optimiser state
    is `tx`'s over pure dicts, so growjax.grow_opt_state grows it (`nnx.as_pure(optimizer.opt_state)`)."""

    def init_fn(params):
        return tx.init(pure(params))

    def update_fn(updates, state, params=None):
        new_updates, new_state = tx.update(pure(updates), state, None if params is None else pure(params))
        return (nnx.State(new_updates) if isinstance(updates, nnx.State) else new_updates), new_state

    return optax.GradientTransformation(init_fn, update_fn)
