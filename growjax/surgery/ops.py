"""The growth operations, once for both back-ends (growjax.surgery.linen, growjax.surgery.nnx).

Here: each operation's spec and validation, how it is described and names its new parts, which
operations claim to keep the function, the rules both back-ends apply alike (AddHeads' causal and
mask-argument rules, how many heads an attention has, the fused q/k/v layout), the function and
liveness checks given a back-end's "output with these operations left out" and "which layers got a
gradient", and the texts of the errors both raise. A back-end only finds modules, builds new layers
of its framework, and runs them.

Adding an operation: its spec (a frozen dataclass with `module`) here, in OPERATIONS, with its
`claims` rule if it keeps the function; then one handler per back-end (linen: `_Call._<role>` and
its role in `_Call._role`; NNX: `_plan_<name>` in `_PLAN` and its `_run_<role>` in `_RUN`).
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from growjax.errors import UserError


class SurgeryError(UserError):
    """An operation that cannot apply: no module matches, a module of an unsupported kind, shapes."""


# ---------------------------------------------------------------------------------------------
# Operations


def _compile(pattern: str, what: str) -> re.Pattern:
    if not isinstance(pattern, str) or not pattern:
        raise SurgeryError(f'{what}: expected a regex over module paths such as "block1/mlp/fc1", got {pattern!r}.')
    try:
        return re.compile(pattern)
    except re.error as err:
        raise SurgeryError(f'{what}: {pattern!r} is not a valid regex: {err}') from None


def _positive(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SurgeryError(f'{what} must be a positive integer, got {value!r}.')


@dataclasses.dataclass(frozen=True)
class Widen:
    """WA on any model: `units` new units beside `module` (Dense, DenseGeneral over the last axis, or
    Conv; NNX: nnx.Linear, nnx.Conv), fed by its input, through `activation`, read by every module
    matching `into`.

    `through`: regexes of modules that lie between `module` and its consumers and act per unit
    (e.g. a ResNet's BatchNorm): the new units pass through a copy of each, as the old ones pass
    through the original. Whatever else the model does between the two (dropout, a residual sum) is
    not applied to the new units. norm_scale: the paper's NormScale where old and new units meet
    the consumer ("grow"; False is its "ori"); scale_init is gamma's initial value.
    """
    module: str
    units: int
    into: str
    activation: Callable[[jax.Array], jax.Array] | None = nn.relu
    through: tuple[str, ...] = ()
    norm_scale: bool = True
    scale_init: float = 10.0

    def __post_init__(self):
        _compile(self.module, 'Widen.module')
        _compile(self.into, 'Widen.into')
        _positive(self.units, 'Widen.units')
        if isinstance(self.through, str):
            object.__setattr__(self, 'through', (self.through,))
        for pattern in self.through:
            _compile(pattern, 'Widen.through')
        if self.scale_init <= 0:
            raise SurgeryError(f'Widen.scale_init must be positive, got {self.scale_init}.')


@dataclasses.dataclass(frozen=True)
class AddHeads:
    """`heads` new attention heads beside the attention `module`.

    The module is flax's attention (linen nn.MultiHeadDotProductAttention, nnx.MultiHeadAttention),
    or a user's attention whose query, key, value and output projections are children named by
    `query`, `key`, `value`, `out` (DenseGeneral with (heads, head_dim) features, or Dense with
    `head_dim` given or the attention's `num_heads` / `n_head`), or whose one fused projection `qkv`
    (a Dense of 3 x heads x head_dim features: nanoGPT's `c_attn`, timm's `qkv`) feeds all three.
    The new heads have their own query/key/value projections of the same input, so the fused
    layout's order does not matter to them.

    causal: whether the new heads may look only at earlier positions (see `resolve_causal`).
    norm_scale: NormScale over [old heads, new heads] where the output projection reads them;
    preserving the function, their output projection starts at zero.
    """
    module: str
    heads: int
    norm_scale: bool = True
    scale_init: float = 10.0
    head_dim: int | None = None
    causal: bool | None = None
    query: str = 'query'
    key: str = 'key'
    value: str = 'value'
    out: str = 'out'
    qkv: str | None = None

    def __post_init__(self):
        _compile(self.module, 'AddHeads.module')
        _positive(self.heads, 'AddHeads.heads')
        if self.head_dim is not None:
            _positive(self.head_dim, 'AddHeads.head_dim')
        if self.scale_init <= 0:
            raise SurgeryError(f'AddHeads.scale_init must be positive, got {self.scale_init}.')
        if self.causal not in (None, True, False):
            raise SurgeryError(f'AddHeads.causal must be True, False or None, got {self.causal!r}.')
        if self.qkv is not None and (not isinstance(self.qkv, str) or not self.qkv or '/' in self.qkv):
            raise SurgeryError(f"AddHeads.qkv names the attention's fused projection child (e.g. 'c_attn'), got "
                               f'{self.qkv!r}.')

    @property
    def projections(self) -> dict[str, str]:
        """{child name: role} of the projections that feed the new heads: the fused one, or q/k/v."""
        if self.qkv is not None:
            return {self.qkv: 'qkv'}
        return {self.query: 'query', self.key: 'key', self.value: 'value'}


COPY = 'copy'


@dataclasses.dataclass(frozen=True)
class InsertAfter:
    """A new block after `module` (linen: `<module>_inserted` in the module's parent, which must be
    a compact module; NNX: `<module>/inserted`).

    block: a function returning a module (linen: called with no arguments; NNX: with `rngs=`, the
    rngs, or nothing) that is called with the module's output and the same other arguments the
    module got, or 'copy': a copy of the module, initialised from its pretrained weights (stacking).
    residual: the block is a residual branch, out = y + block(y), and its last layer with a kernel
    starts at zero, so the network starts as before; residual=False replaces y by block(y) (for
    blocks that hold their own residual connections, e.g. a pre-LN transformer block; pass `zero`
    to start them as the identity, or leave it out to stack a block that changes the function, as
    G_stack does). zero: a regex over module paths inside the block whose parameters start at zero
    (default with residual: the last layer).
    """
    module: str
    block: Callable[[], Any] | str = COPY
    residual: bool = True
    zero: str | None = None

    def __post_init__(self):
        _compile(self.module, 'InsertAfter.module')
        if self.block != COPY and not callable(self.block):
            raise SurgeryError(f"InsertAfter.block must be a function returning a module, or 'copy'; got "
                               f'{self.block!r}.')
        if self.zero is not None:
            _compile(self.zero, 'InsertAfter.zero')


@dataclasses.dataclass(frozen=True)
class Deepen:
    """The paper's DA on any model: a new Dense layer of `units` between the input of `module`
    (e.g. the classifier) and the module, followed by `activation`. The module then reads `units`
    features: re-initialise it (e.g. reinit='^head/') unless units equals its input width.
    Preserving the function, the new layer starts as the identity (units must equal the input
    width; with a ReLU-like activation that holds where the features are non-negative)."""
    module: str
    units: int
    activation: Callable[[jax.Array], jax.Array] | None = nn.relu

    def __post_init__(self):
        _compile(self.module, 'Deepen.module')
        _positive(self.units, 'Deepen.units')


@dataclasses.dataclass(frozen=True)
class LoRA:
    """Low-rank adapters (Hu et al. 2021) on Dense / DenseGeneral modules: y = x W + b + (x A) B with
    `lora_a` (fan-in scaled random) and `lora_b` (zeros) in the module's scope, so the function
    is kept at init (growjax.nn.lora_delta). The parameter-efficient alternative to growth."""
    module: str
    rank: int

    def __post_init__(self):
        _compile(self.module, 'LoRA.module')
        _positive(self.rank, 'LoRA.rank')


Operation = Widen | AddHeads | InsertAfter | Deepen | LoRA
OPERATIONS = (Widen, AddHeads, InsertAfter, Deepen, LoRA)


def describe(op: Operation) -> str:
    """'Widen(block1/mlp/fc1, units=32, into=block1/mlp/fc2)': for reports and errors."""
    shown = {}
    for field in dataclasses.fields(op):
        value = getattr(op, field.name)
        if field.name != 'module' and value != field.default:
            shown[field.name] = getattr(value, '__name__', type(value).__name__) if callable(value) else value
    return f'{type(op).__name__}({op.module}' + ''.join(f', {k}={v}' for k, v in shown.items()) + ')'


def operations(ops, where: str, earlier: Sequence[Operation] = ()) -> tuple[Operation, ...]:
    """`ops` (one operation or a sequence) as a tuple, each checked to be an operation, and no LoRA
    given twice (counting `earlier` rounds'); `where` names the caller in errors ('surgery.grow')."""
    if isinstance(ops, OPERATIONS):
        ops = [ops]
    ops = tuple(ops)
    names = ', '.join(kind.__name__ for kind in OPERATIONS)
    for op in ops:
        if not isinstance(op, OPERATIONS):
            raise SurgeryError(f'{where}: {op!r} is not an operation ({names}).')
    everything = tuple(earlier) + ops
    duplicates = [describe(op) for i, op in enumerate(everything) if isinstance(op, LoRA) and op in everything[:i]]
    if duplicates:
        raise SurgeryError(f'{where}: {duplicates[0]} is given twice.')
    return ops


def suffixes(ops: Sequence[Operation]) -> list[str]:
    """The suffix of each operation's new parts ('plus', 'plus2', ...): '' for the first of a kind on
    one pattern, then '2', '3', ...: names stay stable when a later growth round appends operations."""
    counts: dict[tuple[type, str], int] = {}
    found = []
    for op in ops:
        key = (type(op), op.module)
        found.append('' if counts.get(key, 0) == 0 else str(counts[key] + 1))
        counts[key] = counts.get(key, 0) + 1
    return found


def stacks(op: Operation) -> bool:
    """Whether `op` stacks a block that changes the function whatever its initialisation (an
    InsertAfter with residual=False and no zero=): no function-preserving variant of it exists."""
    return isinstance(op, InsertAfter) and not op.residual and op.zero is None


def claims(op: Operation, preserve_function: bool) -> bool:
    """Whether `op` says it keeps the function, which both back-ends check on a sample input: LoRA
    (B = 0), InsertAfter with a part at zero (residual=True, or zero=), and every operation grown
    with preserve_function=True. An InsertAfter with residual=False and no zero= stacks a block
    (G_stack) and changes the function by design, unless preserve_function says otherwise."""
    if preserve_function or isinstance(op, LoRA):
        return True
    return isinstance(op, InsertAfter) and not stacks(op)


# ---------------------------------------------------------------------------------------------
# Rules both back-ends apply


def resolve_causal(op: AddHeads, path: str, library_attention: bool, mask, is_causal: bool = False) -> bool:
    """Whether the new heads of `op` at `path` are causal (AddHeads.causal's rule, for both back-ends).

    op.causal decides when given. Else it is decided only where it can be seen: flax's attention
    modules (library_attention: linen MultiHeadDotProductAttention, NNX MultiHeadAttention) never
    mask by themselves, so their new heads take the call's mask as it is; a user's attention given
    a `mask` argument shares that mask; a user's attention called without one may build a causal
    mask inside (nanoGPT), which growjax cannot see, so it is an error asking for causal=True or
    False (a default either way would let the new heads of a decoder see future tokens, or blind
    those of an encoder). is_causal: the call said `is_causal=True` (flax NNX's way to say the old
    heads are causal): the new heads are too."""
    if is_causal:
        if op.causal is False:
            raise SurgeryError(f'{describe(op)}: causal=False, but {path} is called with is_causal=True: new heads '
                               'that see later positions would leak them to the earlier ones; leave causal out or pass '
                               'True.')
        return True
    if op.causal is not None:
        return op.causal
    if library_attention or mask is not None:
        return False
    raise SurgeryError(f'{describe(op)}: {path} is called without a mask argument, so growjax cannot see whether it '
                       'masks future positions inside (a decoder such as nanoGPT does): pass causal=True for a causal '
                       'attention, causal=False for one that sees every position.')


def call_arguments(function: Callable, args: tuple, kwargs: Mapping) -> dict:
    """The arguments of a call of `function` by name, positional ones and **kwargs included (a user's
    attention may take its mask positionally); only the keywords when the call does not fit."""
    try:
        bound = inspect.signature(function).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return dict(kwargs)
    arguments = dict(bound.arguments)
    for name, parameter in bound.signature.parameters.items():
        if parameter.kind == parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    return arguments


def attention_call(op: AddHeads, path: str, module, arguments: Mapping) -> None:
    """The checks of a call of the attention `module` that AddHeads grows, by its `arguments`: not a
    decoding call, and no mask under another name than `mask` (timm's attn_mask), which the new
    heads would not apply."""
    if arguments.get('decode') or getattr(module, 'decode', False):
        raise SurgeryError(f'{describe(op)}: {path} decodes with a cache (decode=True); add heads to the model used '
                           'for training, not to its decoding copy.')
    other = next((name for name, value in arguments.items() if 'mask' in name and name != 'mask' and value is not None),
                 None)
    if other is not None:
        raise SurgeryError(f'{describe(op)}: {path} is called with {other}=, a mask the new heads would not apply '
                           "(they take the argument named 'mask'); pass it as mask= or grow another attention.")


def head_count(attention) -> tuple[str, int] | None:
    """(attribute, number of heads) of an attention that stores it (`num_heads`: flax, timm;
    `n_head`: nanoGPT), or None."""
    for name in ('num_heads', 'n_head'):
        value = getattr(attention, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return name, value
    return None


def flat_heads(op: AddHeads, where: str, layer: str, features: int, count, out_width: int) -> tuple[int, int]:
    """(heads, head_dim) of an attention whose query/key/value projections are flat `layer`s of
    `features` outputs, read as one `out_width` input by the output projection; count: head_count."""
    head_dim = op.head_dim
    if head_dim is None and count is not None:
        head_dim = features // count[1]
    if not head_dim or features % head_dim or out_width != features:
        raise SurgeryError(f'{describe(op)}: {where} projects with {layer} layers of {features} features: pass '
                           'head_dim= (features = heads x head_dim).')
    return features // head_dim, head_dim


def fused_heads(op: AddHeads, where: str, features: int, count, out_width: int) -> tuple[int, int]:
    """(heads, head_dim) of an attention `where` whose q, k, v come from one fused projection `op.qkv`
    of `features` outputs ([q | k | v], each heads x head_dim), its output projection reading
    `out_width` features; count: head_count(attention)."""
    head_dim = op.head_dim
    if head_dim is None:
        if count is None:
            raise SurgeryError(f'{describe(op)}: {where} has no num_heads or n_head attribute to split {op.qkv} into '
                               'heads: pass head_dim= (the width of one head).')
        if features % (3 * count[1]):
            raise SurgeryError(f'{describe(op)}: {where}/{op.qkv} has {features} output features, not 3 x {count[1]} '
                               f'heads ({count[0]}) x head_dim: is it the fused q/k/v projection?')
        head_dim = features // (3 * count[1])
    if features % (3 * head_dim):
        raise SurgeryError(f'{describe(op)}: {where}/{op.qkv} has {features} output features, not a multiple of 3 x '
                           f'head_dim={head_dim}: is it the fused q/k/v projection? (pass head_dim=)')
    heads = features // (3 * head_dim)
    if out_width != heads * head_dim:
        raise SurgeryError(f'{describe(op)}: {where}/{op.out} reads {out_width} features, not the {heads} x '
                           f'{head_dim} that {op.qkv} gives each of q, k and v: an unknown fused layout.')
    return heads, head_dim


def heads_mask(mask, causal: bool, query_shape: Sequence[int], heads: int):
    """The mask of `heads` new heads: the call's mask (as booleans), and the causal one if `causal`;
    per-head masks of the old heads give the new heads the first head's."""
    if mask is not None:
        mask = mask.astype(jnp.bool_)  # flax's masks are often float (make_causal_mask's default)
    if causal:
        causal_mask = nn.make_causal_mask(jnp.ones(query_shape), dtype=jnp.bool_)
        mask = causal_mask if mask is None else nn.combine_masks(mask, causal_mask, dtype=jnp.bool_)
    if mask is not None and mask.ndim >= 3 and mask.shape[-3] not in (1, heads):
        if not mask.shape[-3]:
            raise SurgeryError('AddHeads: an empty attention mask.')
        mask = mask[..., :1, :, :]
    return mask


def merge_heads(x: jax.Array, flat: bool, heads: int, head_dim: int) -> jax.Array:
    """[..., heads, head_dim] -> [..., heads x head_dim] (as it is if already `flat`)."""
    return x if flat else x.reshape(*x.shape[:-2], heads * head_dim)


def activated_units(op: Widen, consumer: str, producer: str, old: jax.Array, units: jax.Array) -> jax.Array:
    """The new units as the consumer reads them (after the activation), checked against what it
    reads of the old ones: they must differ only in the feature axis."""
    units = units if op.activation is None else op.activation(units)
    if old.shape[:-1] != units.shape[:-1]:
        raise SurgeryError(
            f'{describe(op)}: {consumer} reads shape {old.shape}, but the new units of {producer} have shape '
            f'{units.shape}: the two must differ only in the last (feature) axis, i.e. reach the consumer '
            'through per-unit operations only (an activation, a BatchNorm named in `through`).')
    return units


# ---------------------------------------------------------------------------------------------
# Errors both back-ends raise


def sample(paths: Sequence[str], limit: int = 12) -> str:
    unique = list(dict.fromkeys(paths))
    return ', '.join(unique[:limit]) + (f', ... ({len(unique)} in all)' if len(unique) > limit else '')


def suggest(pattern: str, paths: Sequence[str], listed: str = 'Modules called') -> str:
    """'Did you mean one of: ...' with the paths close to `pattern`, else a sample of `paths`."""
    unique = list(dict.fromkeys(paths))
    close = difflib.get_close_matches(pattern, unique, n=6, cutoff=0.4)
    last = pattern.rsplit('/', 1)[-1]
    close += [p for p in unique if p.rsplit('/', 1)[-1] == last and p not in close][:6 - len(close)]
    if close:
        return f'Did you mean one of: {", ".join(close)}? (Patterns match whole paths.)'
    return f'{listed}: {sample(unique)}.'


def no_match(op: Operation, pattern: str, paths: Sequence[str], what: str = '', where: str = 'that was called',
             listed: str = 'Modules called') -> SurgeryError:
    """`op`'s `pattern` (its `what`: '', 'into=', 'through=') matches none of `paths`."""
    return SurgeryError(f'{describe(op)}: {what}{pattern!r} matches no module {where}. '
                        f'{suggest(pattern, paths, listed)}')


def not_read(op: Widen, producer: str, called: Sequence[str] | None = None) -> SurgeryError:
    called = f'; modules called: {sample(called)}' if called else ''
    return SurgeryError(f'{describe(op)}: the new units of {producer} were not read by any module matching '
                        f'into={op.into!r} after it{called}.')


def called_again(op: Widen, path: str) -> SurgeryError:
    return SurgeryError(f'{describe(op)}: {path} was called again before a module matching into={op.into!r} read '
                        'its new units.')


def projections_not_called(op: AddHeads, attention: str, called: Sequence[str]) -> SurgeryError:
    plural = 's' if len(op.projections) > 1 else ''
    return SurgeryError(f'{describe(op)}: {attention} must call its '
                        f'{" and ".join(repr(name) for name in op.projections)} projection{plural} before {op.out!r}; '
                        f'found {sorted(called)}.')


def needs_identity_width(op: Deepen, path: str, width: int) -> SurgeryError:
    return SurgeryError(f'{describe(op)}: preserving the function needs units equal to the input width of {path} '
                        f'({width}) so the new layer can start as the identity; got {op.units}.')


def block_output(op: InsertAfter, path: str, y, out) -> None:
    """The output `y` of the module an InsertAfter follows must be an array, and the block's `out` keep its shape."""
    if not isinstance(y, jax.Array):
        raise SurgeryError(f'{describe(op)}: {path} returns a {type(y).__name__}, not an array: insert after a module '
                           'that returns one array.')
    if out is not None and out.shape != y.shape:
        raise SurgeryError(f'{describe(op)}: the new block maps shape {y.shape} to {out.shape}; a block inserted after '
                           'a module must keep its output shape.')


def no_kernel_to_zero(op: InsertAfter) -> SurgeryError:
    return SurgeryError(f'{describe(op)}: the new block has no layer with a kernel to start at zero; pass zero=REGEX '
                        'or residual=False.')


# ---------------------------------------------------------------------------------------------
# The checks on a sample input


def function_tolerance(reference) -> float:
    """How far an operation that keeps the function may move the output: float32 rounding, relative
    to the output's scale (1e-5 x max(1, max |output|)); 1e-2 x max(1, max |output|) for
    half-precision outputs.

    The checks run with float32 matmuls at full precision (jax.default_matmul_precision('highest')):
    new parts that start at zero add exact zeros and an identity layer copies its input, so the one
    tolerance holds on GPUs, whose default float32 matmuls (TF32) round to ~1e-3, and on TPUs."""
    leaves = [jnp.asarray(leaf) for leaf in jax.tree_util.tree_leaves(reference)]
    scale = max([1.0] + [float(jnp.max(jnp.abs(leaf.astype(jnp.float32)))) for leaf in leaves
                         if leaf.size and jnp.issubdtype(leaf.dtype, jnp.inexact)])
    half = any(leaf.dtype in (jnp.bfloat16, jnp.float16) for leaf in leaves)
    return (1e-2 if half else 1e-5) * scale


def float_leaves(tree) -> list[jax.Array]:
    return [jnp.asarray(leaf, jnp.float32) for leaf in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]


def max_difference(actual, expected) -> float | None:
    """max |actual - expected| over the outputs' float leaves; None when their structures or shapes differ."""
    if jax.tree_util.tree_structure(actual) != jax.tree_util.tree_structure(expected):
        return None
    pairs = list(zip(float_leaves(actual), float_leaves(expected)))
    if any(a.shape != b.shape for a, b in pairs):
        return None
    return max((float(jnp.max(jnp.abs(a - b), initial=0.0)) for a, b in pairs), default=0.0)


def compare(actual, expected, atol: float, where: str) -> float:
    """check_function's verdict: the max |difference|, a SurgeryError above `atol`."""
    difference = max_difference(actual, expected)
    if difference is None:
        raise SurgeryError(f"{where}: the two models' outputs differ in structure or shape.")
    if not difference <= atol:
        raise SurgeryError(f'The grown model differs from the pretrained model by {difference:.3g} (> atol={atol}) '
                           'with its new parts set to preserve the function: a pretrained value is not where the '
                           'model reads it, or an operation does not preserve the function.')
    return difference


def _change(difference: float | None) -> str:
    return 'a different output shape' if difference is None else f'max |difference| {difference:.3g}'


def not_kept(op: Operation, difference: float | None, preserving: bool, block: tuple | None = None) -> str:
    """Why `op` alone changes the function it claims to keep; block: an InsertAfter's (input, block
    output) on the sample, if seen."""
    if isinstance(op, InsertAfter):
        head = f'{describe(op)}: the inserted block does not start as the identity ({_change(difference)})'
        if stacks(op):
            return head + ': residual=False without zero= stacks the block, which changes the function; name the ' \
                'layers that start at zero with zero=REGEX, or grow without preserve_function.'
        if op.residual:
            looks = ''
            if block is not None and float(jnp.linalg.norm(block[1] - block[0])) < float(jnp.linalg.norm(block[1])):
                looks = ' (its output is closer to its input than to zero)'
            return head + ": with residual=True the block's output is added to its input and must start at zero, " \
                f'but it is not{looks}; if the block holds its own residual sum (x + f(x), as a pre-LN transformer ' \
                'block), pass residual=False and zero=REGEX naming the last layer of each of its residual branches.'
        return head + f': zero={op.zero!r} does not zero every residual branch inside it; name the last layer of ' \
            'each branch (the block must compute x + 0 at first).'
    if isinstance(op, Deepen):
        return f'{describe(op)}: the new layer starts as the identity, but does not keep the function ' \
            f'({_change(difference)}): its activation changes the features {op.module} reads (a ReLU zeroes ' \
            'negative ones); pass activation=None, or grow without preserve_function.'
    claim = 'with preserve_function=True' if preserving else 'as it claims'
    return f'{describe(op)} does not keep the function {claim} ({_change(difference)} on the sample input).'


def check_claims(ops: Sequence[Operation], claiming: Sequence[int], output: Callable, preserving: bool) -> None:
    """A SurgeryError, naming the first that breaks it alone, unless the operations `claiming` (indices
    into `ops`) keep the function: `output(skip, probe)` is the model's output on the sample with the
    operations `skip` left out (probe: None, or a dict an InsertAfter fills with {(index, path):
    (its input, its block's output)}). Run at full float32 matmul precision (see function_tolerance)."""
    if not claiming:
        return
    with jax.default_matmul_precision('highest'):
        reference = output(frozenset(claiming), None)
        tolerance = function_tolerance(reference)
        difference = max_difference(output(frozenset(), None), reference)
        if difference is not None and difference <= tolerance:
            return
        for index in claiming:
            probe = {}
            alone = max_difference(output(frozenset(claiming) - {index}, probe), reference)
            if alone is None or alone > tolerance:
                block = next((value for (i, _), value in probe.items() if i == index), None)
                raise SurgeryError(not_kept(ops[index], alone, preserving, block))
    raise SurgeryError(f'The operations {", ".join(describe(ops[i]) for i in claiming)} keep the function one by one '
                       f'but not together ({_change(difference)}).')


def cotangents(out) -> list[jax.Array]:
    """A fixed random cotangent per float leaf of `out` (not ones: the outputs of a softmax sum to
    one, so their gradients would cancel); the liveness check projects the output on them. `out`
    may be the output's shapes (jax.eval_shape)."""
    leaves = [leaf for leaf in jax.tree_util.tree_leaves(out) if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
    keys = jax.random.split(jax.random.key(0), len(leaves))
    return [jax.random.normal(key, leaf.shape) for key, leaf in zip(keys, leaves)]


def projected(out, cotangent: Sequence[jax.Array]) -> jax.Array:
    return sum(jnp.vdot(leaf, c) for leaf, c in zip(float_leaves(out), cotangent))


def check_alive(layers: Mapping[str, Operation], moved: set[str]) -> None:
    """A SurgeryError for a layer an operation started at zero ({layer path: op}) that got no gradient
    on the sample (is not in `moved`): it sits at a flat part of an activation (ReLU at 0) and would
    never train."""
    for layer, op in layers.items():
        if layer not in moved:
            raise SurgeryError(
                f'{describe(op)}: {layer} starts at zero but gets no gradient on the sample input, so it would never '
                'train: its output passes through a flat part of an activation (e.g. ReLU at 0), or it is not used. '
                'Start at zero a layer whose output reaches the sum directly (zero=REGEX), or use an activation with a '
                'gradient at 0.')


def kind(module) -> str:
    """'flax.linen.linear.Dense': a module's class, for errors."""
    return f'{type(module).__module__}.{type(module).__qualname__}'
