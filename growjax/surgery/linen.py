"""Grow a Flax linen model that growjax did not write, without editing its code.

    grown = surgery.grow(model, [
        surgery.Widen('block1/mlp/fc1', units=32, into='block1/mlp/fc2', activation=nn.gelu),
        surgery.AddHeads('block0/attention', heads=2),
        surgery.InsertAfter('block1', block=make_block),
    ])
    variables = growjax.grow_params(pretrained, grown, rng, x)

Each operation names the modules it changes by a regex that fully matches their '/'-joined paths
(as big_vision's `dont_load` and qwix's `module_path`). The grown module runs the user's model
inside `flax.linen.intercept_methods`, in the model's own scope (`nn.share_scope`: no extra level
in the parameter paths). When a matched module is called, its operation adds its part (new units,
heads, a block, adapters) and creates the parameters in that module's own scope, or, for a new
layer or block, next to it in its parent's. New parameters therefore sit at new paths beside what
they grow, never at a path the pretrained tree has (docs/design.md, principle 1): `grow_params`
stays strict, and labels, regimes, per-group learning rates and `grow_opt_state` need nothing new.

What each operation adds (P: a matched module; names are of the new parameters):

- `Widen(P, units, into=C)`: S new units beside P (`P/plus`), computed from P's input, through
  the `activation` (and any `through` modules, e.g. a BatchNorm, each with its own copy
  `<module>/plus`), read by the consumer(s) C through `C/from_<P>_plus`. Where old and new units
  meet C, the paper's NormScale (`C/norm/scale_<i>`: per-group L2 normalisation and a learned
  per-unit scale), or, preserving the function, no NormScale and a zero fan-in.
- `AddHeads(A, heads)`: k new heads beside the attention A, with their own query/key/value
  (`A/extra_heads/...`) over the same inputs and mask, read by A's output projection through
  `A/out/from_extra_heads` (the output sums over heads, so new heads are a parallel attention);
  NormScale over [old heads, new heads] at `A/out/norm`, or a zero output when preserving.
- `InsertAfter(M, block)`: a new block `<M>_inserted` after M, in M's parent, on a residual branch
  whose last layer starts at zero (the network starts as before), or a copy of M (stacking).
- `Deepen(C, units)`: the paper's DA: a new layer `<C>_fc_a` of S units between C's input and C
  (C, typically the classifier, then reads S features and is re-initialised).
- `LoRA(M, rank)`: low-rank adapters `M/lora_a`, `M/lora_b` (B = 0: the function is kept), the
  parameter-efficient baseline.

`grow_params(..., preserve_function=True)` (or `grown.clone(preserve_function=True)`) builds the
function-preserving variant of every operation: zero fan-in, no NormScale, zero new-head outputs.
`report(...)` says which leaves were copied, which are new, which re-initialised, what each regex
matched, and checks that the preserving variant computes what the pretrained model did.

Only `__call__` of the model and of its submodules is intercepted, and only linen modules are
supported here (see growjax.nnx_surgery for Flax NNX).
"""
from __future__ import annotations

import contextvars
import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
from flax import errors as flax_errors
import jax
import jax.numpy as jnp

from growjax.grow import GraftError, Path, compile_patterns, flatten, graft_plan, grow_params, matches_any, path_str, \
    unflatten
from growjax.nn import NormScale, lecun_normal_flat, lora, norm_scale_groups
from growjax.surgery import ops as O
from growjax.surgery.ops import (COPY, AddHeads, Deepen, InsertAfter, LoRA, Operation, SurgeryError, Widen, describe,
                                 resolve_causal)
from growjax.surgery.report import Report


# ---------------------------------------------------------------------------------------------
# Module kinds


def _last_axis_dense(module: nn.Module) -> bool:
    """A Dense, or a DenseGeneral that acts like one (int features over the last axis)."""
    if isinstance(module, nn.Dense):
        return True
    if isinstance(module, nn.DenseGeneral):
        features = module.features if isinstance(module.features, int) else tuple(module.features)
        axis = module.axis if isinstance(module.axis, int) else tuple(module.axis)
        return (isinstance(features, int) or len(features) == 1) and axis in (-1, (-1,)) and not module.batch_dims
    return False


def _out_features(module: nn.Module) -> int:
    features = module.features
    return features if isinstance(features, int) else int(features[0])


def _plain_conv(module: nn.Module) -> bool:
    return type(module) is nn.Conv and module.feature_group_count == 1


def _dense_like(module: nn.Module, features: int, name: str, *, use_bias: bool, kernel_init=None) -> nn.Dense:
    """An nn.Dense with `module`'s dtypes and initialisers (or `kernel_init`), as a child `name` of `module`."""
    return nn.Dense(features, use_bias=use_bias, dtype=module.dtype, param_dtype=module.param_dtype,
                    precision=module.precision, kernel_init=kernel_init or module.kernel_init,
                    bias_init=module.bias_init, name=name, parent=module)


def _conv_like(module: nn.Conv, features: int, name: str, *, use_bias: bool, kernel_init=None) -> nn.Conv:
    """An nn.Conv with `module`'s geometry, dtypes and initialisers, as a child `name` of `module`."""
    return nn.Conv(features, kernel_size=module.kernel_size, strides=module.strides, padding=module.padding,
                   input_dilation=module.input_dilation, kernel_dilation=module.kernel_dilation,
                   use_bias=use_bias, dtype=module.dtype, param_dtype=module.param_dtype, precision=module.precision,
                   kernel_init=kernel_init or module.kernel_init, bias_init=module.bias_init, name=name, parent=module)


# ---------------------------------------------------------------------------------------------
# One call of the grown model


@dataclasses.dataclass
class _Record:
    """What an init call saw (read by the grown module's init and by `report`)."""
    seen: list[str] = dataclasses.field(default_factory=list)  # module paths, in call order
    matched: dict[tuple[int, str], set[str]] = dataclasses.field(default_factory=dict)  # (op, role) -> paths
    zero: dict[Path, int] = dataclasses.field(default_factory=dict)  # module path -> the op that starts it at zero
    copies: dict[Path, Path] = dataclasses.field(default_factory=dict)  # new module path -> copied module path

    def match(self, index: int, role: str, path: str) -> None:
        self.matched.setdefault((index, role), set()).add(path)


_RECORD: contextvars.ContextVar[_Record | None] = contextvars.ContextVar('growjax_surgery_record', default=None)
# Indices of operations a call leaves out (the growth checks compare the model with and without them).
_SKIP: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar('growjax_surgery_skip', default=frozenset())
# When set, each inserted block's input and output by (operation index, path), for the error that
# says why a block does not start as the identity (ops.check_claims).
_PROBE: contextvars.ContextVar[dict | None] = contextvars.ContextVar('growjax_surgery_probe', default=None)


class _Call:
    """Applies the operations during one call of the grown model."""

    def __init__(self, ops: Sequence[Operation], preserve_function: bool):
        self.ops = list(ops)
        self.preserve = preserve_function
        self.record = _RECORD.get() or _Record()
        self.skip = _SKIP.get()
        self.pending: dict[int, tuple[str, jax.Array]] = {}  # Widen op -> (producer name, new units)
        self.heads_inputs: dict[tuple[int, str], dict[str, Any]] = {}  # (AddHeads op, attention path) -> inputs
        self.names = dict(enumerate(O.suffixes(self.ops)))

    # -- dispatch

    def intercept(self, next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != '__call__' or not module.path:
            return next_fun(*args, **kwargs)
        path = '/'.join(module.path)
        self.record.seen.append(path)
        parent = '/'.join(module.path[:-1])
        call = next_fun
        # Nested so that the first operation is the outermost: it sees the module's original input.
        for index, op in reversed(list(enumerate(self.ops))):
            if index in self.skip:
                continue
            role = self._role(op, path, parent, module)
            if role:
                self.record.match(index, role, path)
                call = _bind(getattr(self, f'_{role}'), index, op, module, call)
        return call(*args, **kwargs)

    def _role(self, op: Operation, path: str, parent: str, module: nn.Module) -> str | None:
        if isinstance(op, Widen):
            if re.fullmatch(op.module, path):
                return 'producer'
            if re.fullmatch(op.into, path):
                return 'consumer'
            if any(re.fullmatch(p, path) for p in op.through):
                return 'through'
        elif isinstance(op, AddHeads):
            if re.fullmatch(op.module, path):
                return 'attention'
            if parent and re.fullmatch(op.module, parent):
                if module.name == op.out:
                    return 'head_output'
                return 'head_input' if module.name in op.projections else None
        elif re.fullmatch(op.module, path):
            return {InsertAfter: 'insert_after', Deepen: 'deepen', LoRA: 'lora'}[type(op)]
        return None

    def finish(self) -> None:
        """Every producer's new units must have been read by a consumer."""
        for index, (producer, _) in self.pending.items():
            op = self.ops[index]
            if not any(i == index and role == 'consumer' for i, role in self.record.matched):
                raise O.no_match(op, op.into, self.record.seen, 'into=')
            raise O.not_read(op, producer, self.record.seen)

    # -- Widen

    def _producer(self, index: int, op: Widen, module: nn.Module, call, *args, **kwargs):
        path = '/'.join(module.path)
        x = args[0]
        name = 'plus' + self.names[index]
        if _last_axis_dense(module):
            plus = _dense_like(module, op.units, name, use_bias=module.use_bias)
        elif _plain_conv(module):
            plus = _conv_like(module, op.units, name, use_bias=module.use_bias)
        else:
            raise SurgeryError(f'{describe(op)}: {path} is a {O.kind(module)}; Widen grows Dense, DenseGeneral over '
                               'the last axis, and Conv (no feature groups).')
        if index in self.pending:
            raise O.called_again(op, path)
        self.pending[index] = (module.name + '_' + name, plus(x))
        return call(*args, **kwargs)

    def _through(self, index: int, op: Widen, module: nn.Module, call, *args, **kwargs):
        y = call(*args, **kwargs)
        if index in self.pending:
            producer, units = self.pending[index]
            copy = module.clone(parent=module, name='plus' + self.names[index])
            self.pending[index] = (producer, copy(units, *args[1:], **kwargs))
        return y

    def _consumer(self, index: int, op: Widen, module: nn.Module, call, *args, **kwargs):
        if index not in self.pending:  # called before the producer (or a second time): nothing new to read
            return call(*args, **kwargs)
        path = '/'.join(module.path)
        producer, units = self.pending.pop(index)
        units = O.activated_units(op, path, producer, args[0], units)
        old = args[0]
        if self.preserve or not op.norm_scale:
            scaled_old, scaled_new = old, units
        else:
            scaled_old, scaled_new = _norm_scale(module, [old, units], op.scale_init, 'norm' + self.names[index])
        y = call(scaled_old, *args[1:], **kwargs)
        zero = nn.initializers.zeros if self.preserve else None
        fan_in_name = f'from_{producer}'
        if _last_axis_dense(module):
            fan_in = _dense_like(module, _out_features(module), fan_in_name, use_bias=False, kernel_init=zero)
        elif _plain_conv(module):
            fan_in = _conv_like(module, module.features, fan_in_name, use_bias=False, kernel_init=zero)
        else:
            raise SurgeryError(f'{describe(op)}: consumer {path} is a {O.kind(module)}; Widen feeds Dense, '
                               'DenseGeneral over the last axis, and Conv (no feature groups).')
        return y + fan_in(scaled_new).astype(y.dtype)

    # -- AddHeads

    def _attention(self, index: int, op: AddHeads, module: nn.Module, call, *args, **kwargs):
        path = '/'.join(module.path)
        given = O.call_arguments(type(module).__call__, (module, *args), kwargs)
        O.attention_call(op, path, module, given)
        library = isinstance(module, nn.MultiHeadDotProductAttention)
        state = {'module': module, 'mask': given.get('mask'), 'kwargs': kwargs}
        state['causal'] = resolve_causal(op, path, library, state['mask'], bool(given.get('is_causal', False)))
        self.heads_inputs[(index, path)] = state
        return call(*args, **kwargs)

    def _head_input(self, index: int, op: AddHeads, module: nn.Module, call, *args, **kwargs):
        state = self.heads_inputs.get((index, '/'.join(module.path[:-1])))
        if state is not None:
            role = op.projections[module.name]
            if role == 'qkv':  # one fused projection: the new heads' query, key and value all read its input
                state.update(query=(module, args[0]), key=(module, args[0]), value=(module, args[0]), fused=True)
            else:
                state[role] = (module, args[0])
        return call(*args, **kwargs)

    def _head_output(self, index: int, op: AddHeads, module: nn.Module, call, *args, **kwargs):
        attention_path = '/'.join(module.path[:-1])
        state = self.heads_inputs.pop((index, attention_path), None)
        if state is None or not all(role in state for role in ('query', 'key', 'value')):
            raise O.projections_not_called(op, attention_path, [k for k in state or {} if k in ('query', 'key',
                                                                                             'value')])
        attention = state['module']
        query_module, query_in = state['query']
        old = args[0]
        old_heads, head_dim, flat = _heads_layout(op, attention, query_module, old, state.get('fused', False))
        suffix = self.names[index]
        mask = state['mask']
        deterministic = state['kwargs'].get('deterministic')
        if deterministic is None:
            deterministic = getattr(attention, 'deterministic', True)
        if deterministic is None:
            deterministic = True
        new = _ExtraHeads(
            heads=op.heads, head_dim=head_dim, causal=state['causal'],
            dropout_rate=float(getattr(attention, 'dropout_rate', 0.0)),
            normalize_qk=bool(getattr(attention, 'normalize_qk', False)),
            use_bias=getattr(query_module, 'use_bias', True), kernel_init=query_module.kernel_init,
            bias_init=query_module.bias_init, dtype=query_module.dtype, param_dtype=query_module.param_dtype,
            name='extra_heads' + suffix, parent=attention,
        )(query_in, state['key'][1], state['value'][1], mask, deterministic)  # [..., L, k, d]
        old_flat = O.merge_heads(old, flat, old_heads, head_dim)
        new_flat = O.merge_heads(new, False, op.heads, head_dim)
        if not self.preserve and op.norm_scale:
            old_flat, new_flat = _norm_scale(module, [old_flat, new_flat], op.scale_init, 'norm' + suffix)
        y = call(old_flat if flat else old_flat.reshape(old.shape), *args[1:], **kwargs)
        zero = nn.initializers.zeros if self.preserve else None
        features = module.features
        if flat:
            projection = _dense_like(module, _out_features(module), 'from_extra_heads' + suffix, use_bias=False,
                                     kernel_init=zero)
            return y + projection(new_flat).astype(y.dtype)
        projection = nn.DenseGeneral(features, axis=(-2, -1), use_bias=False, dtype=module.dtype,
                                     param_dtype=module.param_dtype, precision=module.precision,
                                     kernel_init=zero or module.kernel_init, name='from_extra_heads' + suffix,
                                     parent=module)
        return y + projection(new_flat.reshape(new.shape)).astype(y.dtype)

    # -- InsertAfter, Deepen, LoRA

    def _insert_after(self, index: int, op: InsertAfter, module: nn.Module, call, *args, **kwargs):
        y = call(*args, **kwargs)
        path = '/'.join(module.path)
        O.block_output(op, path, y, None)
        if module.parent is None or not isinstance(module.parent, nn.Module):
            raise SurgeryError(f'{describe(op)}: {path} has no parent module to hold the new block.')
        name = f'{module.name}_inserted{self.names[index]}'
        block = module if op.block == COPY else op.block()
        if not isinstance(block, nn.Module):
            raise SurgeryError(f'{describe(op)}: block() returned a {type(block).__name__}, not a linen Module.')
        try:
            bound = block.clone(parent=module.parent, name=name)
        except (flax_errors.AssignSubModuleError, flax_errors.FlaxError) as err:
            raise SurgeryError(f'{describe(op)}: cannot add a block next to {path}: {err}') from None
        new_path = (*module.parent.path, name)
        start = len(self.record.seen)
        out = bound(y, *args[1:], **kwargs)
        O.block_output(op, path, y, out)
        probe = _PROBE.get()
        if probe is not None:
            probe.setdefault((index, path), (y, out))
        if op.block == COPY:
            self.record.copies[new_path] = tuple(module.path)
        inside = [p for p in self.record.seen[start:] if p.startswith(path_str(new_path) + '/')]
        if op.zero is not None:
            prefix = len(path_str(new_path)) + 1
            self.record.zero.update({tuple(p.split('/')): index for p in inside if re.fullmatch(op.zero, p[prefix:])})
        elif op.residual:
            kernel_modules = [p for p in inside if _has_kernel(bound, p[len(path_str(new_path)) + 1:])]
            if not kernel_modules:
                raise O.no_kernel_to_zero(op)
            self.record.zero[tuple(kernel_modules[-1].split('/'))] = index
        return y + out if op.residual else out

    def _deepen(self, index: int, op: Deepen, module: nn.Module, call, *args, **kwargs):
        path = '/'.join(module.path)
        if not _last_axis_dense(module):
            raise SurgeryError(f'{describe(op)}: {path} is a {O.kind(module)}; Deepen puts a Dense layer before a '
                               'Dense or DenseGeneral over the last axis.')
        x = args[0]
        if self.preserve and op.units != x.shape[-1]:
            raise O.needs_identity_width(op, path, x.shape[-1])
        if module.parent is None:
            raise SurgeryError(f'{describe(op)}: {path} has no parent module to hold the new layer.')
        identity = (lambda key, shape, dtype=jnp.float32: jnp.eye(shape[0], shape[1], dtype=dtype))
        layer = nn.Dense(op.units, dtype=module.dtype, param_dtype=module.param_dtype, precision=module.precision,
                         kernel_init=identity if self.preserve else lecun_normal_flat,
                         name=f'{module.name}_fc_a{self.names[index]}', parent=module.parent)
        h = layer(x)
        h = h if op.activation is None else op.activation(h)
        return call(h, *args[1:], **kwargs)

    def _lora(self, index: int, op: LoRA, module: nn.Module, call, *args, **kwargs):
        path = '/'.join(module.path)
        if not isinstance(module, (nn.Dense, nn.DenseGeneral)) or getattr(module, 'batch_dims', ()):
            raise SurgeryError(f'{describe(op)}: {path} is a {O.kind(module)}; LoRA adapts Dense and DenseGeneral.')
        y = call(*args, **kwargs)
        x = args[0]
        axes = (-1,) if isinstance(module, nn.Dense) else _axes(module.axis)
        out_shape = y.shape[x.ndim - len(axes):]
        return y + lora(module, x, axes, out_shape, op.rank, self.names[index], module.dtype).astype(y.dtype)


def _bind(method, index, op, module, call):
    def bound(*args, **kwargs):
        return method(index, op, module, call, *args, **kwargs)
    return bound


def _axes(axis) -> tuple[int, ...]:
    return (axis,) if isinstance(axis, int) else tuple(axis)


def _has_kernel(block: nn.Module, relative: str) -> bool:
    """Whether the module at `relative` inside `block` (bound) holds a 'kernel' parameter."""
    params = block.variables.get('params', {})
    for part in relative.split('/'):
        if not isinstance(params, Mapping) or part not in params:
            return False
        params = params[part]
    return isinstance(params, Mapping) and 'kernel' in params


def _norm_scale(module: nn.Module, groups: list[jax.Array], scale_init: float, name: str) -> list[jax.Array]:
    """The paper's NormScale over [old, new, ...] feature groups, as a child `name` of `module`."""
    return norm_scale_groups(NormScale([g.shape[-1] for g in groups], scale_init=scale_init, name=name, parent=module),
                             groups)


def _heads_layout(op: AddHeads, attention: nn.Module, query: nn.Module, old: jax.Array, fused: bool,
                  ) -> tuple[int, int, bool]:
    """(old heads, head_dim, whether the projections are flat Dense layers) of an attention whose
    output projection reads `old`; `query` is the fused projection when `fused`."""
    where = '/'.join(attention.path)
    count = O.head_count(attention)
    if fused:
        if not _last_axis_dense(query):
            raise SurgeryError(f'{describe(op)}: {where}/{op.qkv} is a {O.kind(query)}; a fused qkv projection is a '
                               'Dense (or DenseGeneral over the last axis) of 3 x heads x head_dim features.')
        return (*O.fused_heads(op, where, _out_features(query), count, old.shape[-1]), True)
    if isinstance(query, nn.DenseGeneral) and not isinstance(query.features, int) and len(query.features) == 2:
        heads, head_dim = (int(f) for f in query.features)
        if old.shape[-2:] != (heads, head_dim):
            raise SurgeryError(f'{describe(op)}: {where}/{op.out} reads shape {old.shape}; expected [..., {heads}, '
                               f'{head_dim}] from the (heads, head_dim) query projection.')
        return heads, head_dim, False
    if isinstance(query, nn.Dense):
        return (*O.flat_heads(op, where, 'Dense', query.features, count, old.shape[-1]), True)
    raise SurgeryError(f'{describe(op)}: {where}/{op.query} is a {O.kind(query)}; AddHeads needs DenseGeneral '
                       'projections with (heads, head_dim) features (as nn.MultiHeadDotProductAttention) or Dense '
                       'ones with head_dim given.')


class _ExtraHeads(nn.Module):
    """The new heads: their own query/key/value projections and attention over the same inputs."""
    heads: int
    head_dim: int
    causal: bool
    dropout_rate: float
    normalize_qk: bool
    use_bias: bool
    kernel_init: Callable
    bias_init: Callable
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, inputs_q, inputs_k, inputs_v, mask, deterministic: bool):
        dense = lambda name: nn.DenseGeneral((self.heads, self.head_dim), use_bias=self.use_bias,
                                             kernel_init=self.kernel_init, bias_init=self.bias_init, dtype=self.dtype,
                                             param_dtype=self.param_dtype, name=name)
        q, k, v = dense('query')(inputs_q), dense('key')(inputs_k), dense('value')(inputs_v)
        if self.normalize_qk:
            q = nn.LayerNorm(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name='query_ln')(q)
            k = nn.LayerNorm(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name='key_ln')(k)
        mask = O.heads_mask(mask, self.causal, inputs_q.shape[:-1], self.heads)
        if deterministic or not self.dropout_rate:  # the fused kernel where the backend has one
            return jax.nn.dot_product_attention(q, k, v, mask=mask)
        return nn.dot_product_attention(q, k, v, mask=mask, dropout_rng=self.make_rng('dropout'),
                                        dropout_rate=self.dropout_rate, deterministic=False, dtype=self.dtype)


# ---------------------------------------------------------------------------------------------
# The grown model


class Grown(nn.Module):
    """`model` grown by `ops`; build it with `grow(model, ops)`. Its parameters are the model's, at
    the same paths, plus the operations' new ones. `rounds`: how many of `ops` each earlier growth
    round added (grow() on a grown model appends a round), so grafting can insist on the variables
    trained after them. Implements growjax.grow.GrownModel."""
    model: nn.Module
    ops: tuple[Operation, ...]
    preserve_function: bool = False
    rounds: tuple[int, ...] = ()

    def setup(self):
        nn.share_scope(self, self.model)  # the model's parameters keep their paths: no extra level

    def __call__(self, *args, **kwargs):
        call = _Call(self.ops, self.preserve_function)
        try:
            with nn.intercept_methods(call.intercept):
                out = self.model(*args, **kwargs)
        except flax_errors.ScopeParamNotFoundError as err:
            if self.preserve_function or not re.search(r'"scale_\d+"', str(err)):
                raise
            found = re.search(r'named "(\w+)" in scope "/?([^"]*)"', str(err))
            where = f'{found.group(2)}/{found.group(1)}' if found else 'a NormScale scale'
            raise SurgeryError(f'These variables lack {where}: they were grown with preserve_function=True (no '
                               'NormScale); apply them with the model that grew them: '
                               'surgery.grow(model, ops, preserve_function=True) (or '
                               'grown_model.clone(preserve_function=True)).') from None
        call.finish()
        return out

    def init_with_output(self, rngs, *args, **kwargs):
        """As linen's, plus: every operation must match, and new parts that start at zero do."""
        record = _Record()
        token = _RECORD.set(record)
        try:
            out, variables = super().init_with_output(rngs, *args, **kwargs)
        finally:
            _RECORD.reset(token)
        check_matches(self.ops, record)
        return out, _zeroed(variables, record.zero)

    def trace(self, *args, **kwargs) -> _Record:
        """What an init with these inputs sees (module paths, matches, zero-initialised and copied
        modules), computed from shapes only."""
        record = _Record()
        token = _RECORD.set(record)
        try:
            jax.eval_shape(lambda: nn.Module.init_with_output(self, jax.random.key(0), *args, **kwargs))
        finally:
            _RECORD.reset(token)
        return record

    def matches(self, *args, **kwargs) -> dict[str, list[str]]:
        """{operation: the module paths it matched} for these inputs (shapes only)."""
        record = self.trace(*args, **kwargs)
        check_matches(self.ops, record)
        return {describe(op): sorted(set().union(*(paths for (i, _), paths in record.matched.items() if i == index)))
                for index, op in enumerate(self.ops)}

    def graft_sources(self, *args, **kwargs) -> dict[Path, Path]:
        """{grown leaf path: pretrained leaf path} of new leaves that start as copies of pretrained ones
        (InsertAfter(block='copy')); grow_params reads it. Leaves that start at zero are not copied."""
        record = self.trace(*args, **kwargs)
        if not record.copies:
            return {}
        shapes = jax.eval_shape(lambda: nn.Module.init(self, jax.random.key(0), *args, **kwargs))
        sources = {}
        for path in flatten(shapes):
            collection, rest = path[0], path[1:]
            for new, old in record.copies.items():
                if rest[:len(new)] == new and rest[:-1] not in record.zero:
                    sources[path] = (collection, *old, *rest[len(new):])
        return sources

    def earlier_rounds(self, *args, **kwargs) -> dict[Path, int]:
        """{leaf path: round} of the leaves earlier growth rounds added (round 1 is the first growth):
        a pretrained tree for this model must hold them (shapes only)."""
        added, seen, end = {}, None, 0
        for round_, size in enumerate(self.rounds, start=1):
            end += size
            earlier = self.clone(ops=self.ops[:end], rounds=(), preserve_function=False)
            paths = set(flatten(jax.eval_shape(lambda m=earlier: nn.Module.init(m, jax.random.key(0), *args,
                                                                                 **kwargs))))
            if seen is None:
                seen = set(flatten(jax.eval_shape(lambda: self.model.init(jax.random.key(0), *args, **kwargs))))
            added.update({path: round_ for path in paths - seen})
            seen |= paths
        return added

    def check_growth(self, variables: Mapping, *args, **kwargs) -> None:
        """Checks on the sample input what the operations claim, with these variables:

        - the function: operations that keep it (ops.claims: LoRA, InsertAfter with a part at
          zero; every one under preserve_function) must leave the output as without them, to
          float32 tolerance (`function_tolerance`); else a SurgeryError naming the first that
          breaks it alone;
        - the gradient: a layer an InsertAfter starts at zero must get one (a zeroed layer under
          ReLU at 0 never would: a dead block); else a SurgeryError naming it.
        grow_params runs it whenever its inputs are concrete (not under an outer jit)."""
        claiming = [i for i, op in enumerate(self.ops) if O.claims(op, self.preserve_function)]
        O.check_claims(self.ops, claiming, lambda skip, probe: self._output(variables, skip, args, kwargs, probe),
                       self.preserve_function)
        zeroed = self.trace(*args, **kwargs).zero
        if zeroed:
            _check_alive(self, variables, zeroed, args, kwargs)

    def _output(self, variables: Mapping, skip, args, kwargs, probe: dict | None = None):
        """The output with the operations `skip` left out (their parameters unused)."""
        tokens = _SKIP.set(frozenset(skip)), _PROBE.set(probe)
        try:
            out, _ = self.apply(variables, *args, mutable=True, rngs={'dropout': jax.random.key(0)}, **kwargs)
        finally:
            _PROBE.reset(tokens[1])
            _SKIP.reset(tokens[0])
        return out


function_tolerance = O.function_tolerance


def _check_alive(model: Grown, variables: Mapping, zeroed: Mapping[Path, int], args, kwargs) -> None:
    """ops.check_alive for the modules (paths) that operations start at zero."""
    cotangent = O.cotangents(jax.eval_shape(lambda: model._output(variables, (), args, kwargs)))
    def loss(params):
        return O.projected(model._output({**variables, 'params': params}, (), args, kwargs), cotangent)

    grads = flatten(jax.grad(loss)(variables['params']))
    moved = {path_str(path[:-1]) for path, g in grads.items() if bool(jnp.any(g != 0))}
    layers = {path_str(module): model.ops[index] for module, index in zeroed.items()
              if any(path[:-1] == module for path in grads)}
    O.check_alive(layers, moved)


def _zeroed(variables: Mapping, modules: set[Path]) -> dict:
    """`variables` with the parameters of `modules` (module paths) at zero."""
    if not modules:
        return variables
    return unflatten({path: jnp.zeros_like(leaf) if path[0] == 'params' and path[1:-1] in modules else leaf
                      for path, leaf in flatten(variables).items()})


def check_matches(ops: Sequence[Operation], record: _Record) -> None:
    """Raises a SurgeryError for an operation (or its `into`/`through`) that matched no module,
    naming the pattern and the module paths it could have meant."""
    for index, op in enumerate(ops):
        if isinstance(op, Widen):
            required = [('producer', op.module), ('consumer', op.into)]
        elif isinstance(op, AddHeads):
            required = [('attention', op.module), ('head_output', f'{op.module}/{op.out}')]
        else:
            required = [(None, op.module)]
        for role, pattern in required:
            if role == 'head_output' and (index, 'attention') in record.matched and (index, role) not in record.matched:
                attentions = sorted(record.matched[(index, 'attention')])
                children = sorted({p[len(a) + 1:].split('/')[0] for a in attentions for p in record.seen
                                   if p.startswith(a + '/')})
                raise SurgeryError(f'{describe(op)}: {attentions[0]} calls no {op.out!r} (its output projection); its '
                                   f'children: {", ".join(children) or "none"}. Name its projections with out= and '
                                   'query=/key=/value=, or qkv= for one fused projection (nanoGPT\'s c_attn, timm\'s '
                                   'qkv).')
            if not any(i == index and role in (None, r) for i, r in record.matched):
                raise O.no_match(op, pattern, record.seen, 'into=' if role == 'consumer' else '')
        for pattern in getattr(op, 'through', ()):
            if not any(re.fullmatch(pattern, p) for p in record.seen):
                raise O.no_match(op, pattern, record.seen, 'through=')


def grow(model: nn.Module, ops: Sequence[Operation], preserve_function: bool = False) -> Grown:
    """`model` (a linen Module, unmodified) grown by `ops`; growing a grown model again appends the
    operations as a new round, so names of earlier rounds stay as they were (continual growth), and
    grafting takes the variables trained after the earlier rounds.

    preserve_function=True: every operation starts at zero (no NormScale, zero fan-in and new-head
    outputs, identity blocks), so the grown model computes what `model` did; grow_params then
    checks it on the sample input. It holds for all operations of the model, earlier rounds too."""
    earlier = model.ops if isinstance(model, Grown) else ()
    ops = O.operations(ops, 'surgery.grow', earlier)
    if isinstance(model, Grown):
        return model.clone(ops=model.ops + ops, rounds=model.rounds + (len(model.ops) - sum(model.rounds),),
                           preserve_function=preserve_function)
    if not isinstance(model, nn.Module):
        hint = ' For Flax NNX modules use growjax.nnx_surgery.grow.' if 'nnx' in type(model).__module__ else ''
        raise SurgeryError(f'surgery.grow: expected a flax.linen Module, got a {type(model).__name__}.{hint}')
    return Grown(model=model, ops=ops, preserve_function=preserve_function)


# ---------------------------------------------------------------------------------------------
# What was grafted


def report(grown: Grown, pretrained_variables: Mapping, grown_variables: Mapping, *sample_args,
           reinit: str | Sequence[str] = (), pretrained_model: nn.Module | None = None, rng: jax.Array | None = None,
           atol: float = 1e-5) -> Report:
    """The graft report of `grown_variables` (from grow_params) and, when a pretrained model to
    compare with is known (`pretrained_model`, else `grown.model` when the pretrained tree fits it),
    two comparisons with it on `sample_args`: the function-preserving variant of the same
    operations must compute what the pretrained model did (a SurgeryError when the outputs differ
    by more than `atol`: a leaf grafted into the wrong place shows up here), and the model as grown
    is measured too, with the operations that change the function by design named."""
    _require_linen(grown, 'report')
    patterns = compile_patterns(reinit)
    pretrained_flat = flatten(pretrained_variables)
    modules: dict[str, dict[str, list[str]]] = {}
    for path, leaf in flatten(grown_variables).items():
        if path in pretrained_flat and matches_any(path, patterns):
            kind = 'reinitialised'
        elif path in pretrained_flat:
            kind = 'copied'
        else:
            kind = 'new'
        module = path_str(path[1:-1]) if path[0] == 'params' else f'{path[0]}:{path_str(path[1:-1])}'
        modules.setdefault(module, {}).setdefault(kind, []).append(path[-1])
    result = Report(modules=modules, matches=grown.matches(*sample_args))
    reference = pretrained_model
    if reference is None:
        try:
            graft_plan(pretrained_variables, jax.eval_shape(lambda: grown.model.init(jax.random.key(0), *sample_args)),
                       patterns)
            reference = grown.model
        except GraftError:
            return result  # another head (a new task): pass pretrained_model= to check the function
    # the function-preserving variant: every operation that has one (a stacked block has none: left out)
    preserving = grow(reference, tuple(op for op in grown.ops if not O.stacks(op))).clone(preserve_function=True)
    variables = grow_params(pretrained_variables, preserving, jax.random.key(0) if rng is None else rng, *sample_args)
    difference = check_function(reference, pretrained_variables, preserving, variables, *sample_args, atol=atol)
    expected = reference.apply(pretrained_variables, *sample_args)
    shapes = jax.eval_shape(lambda: grown.init(jax.random.key(0), *sample_args))
    if not grown.preserve_function and set(flatten(shapes)) - set(pretrained_flat) - set(flatten(grown_variables)):
        grown = grown.clone(preserve_function=True)  # variables from grow_params(..., preserve_function=True)
    changes = tuple(describe(op) for op in grown.ops if not O.claims(op, grown.preserve_function))
    return dataclasses.replace(result, max_abs_difference=difference, changes_function=changes,
                               grown_difference=O.max_difference(grown.apply(grown_variables, *sample_args), expected))


def _require_linen(model, what: str) -> None:
    if not isinstance(model, nn.Module):
        hint = f' For Flax NNX models use growjax.nnx_surgery.{what}.' if 'nnx' in type(model).__module__ else ''
        raise SurgeryError(f'surgery.{what}: expected flax.linen Modules, got a {type(model).__name__}.{hint}')


def check_function(pretrained_model: nn.Module, pretrained_variables: Mapping, grown_model: nn.Module,
                   grown_variables: Mapping, *sample_args, atol: float = 1e-5) -> float:
    """The max |difference| of the two models' outputs on `sample_args`; a SurgeryError above `atol`.

    Give it a grown model whose new parts preserve the function: grafting is strict about paths and
    shapes, but two square kernels swapped by a renamed layer graft without complaint. This is the
    check that catches them."""
    _require_linen(pretrained_model, 'check_function')
    _require_linen(grown_model, 'check_function')
    return O.compare(grown_model.apply(grown_variables, *sample_args),
                     pretrained_model.apply(pretrained_variables, *sample_args), atol, 'surgery.check_function')
