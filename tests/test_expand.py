"""growjax.expand: a trained small model grown into a bigger configuration of the same class.

The LM is written here as nanoGPT writes it (pre-LN, causal, learned positions, names wte / wpe /
h_i / ln_f / lm_head), with separate or fused (c_attn) q/k/v, and is never edited. Random weights
everywhere (norms and biases too), so every leaf matters for the logits.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import growjax
from growjax import models
from growjax.errors import UserError
from growjax.expand import (ExpandError, NotPreservedError, check_function, expand, expand_opt_state, expansion_plan,
                            rate_scales)
from growjax.grow import flatten

VOCAB, SEQ = 40, 8
ZERO = r'h_(2|3)/(attn|mlp)/c_proj'  # the last layer of each residual branch of the new blocks


class CausalSelfAttention(nn.Module):
    n_head: int
    fused: bool = False

    @nn.compact
    def __call__(self, x):
        b, t, c = x.shape
        if self.fused:
            q, k, v = jnp.split(nn.Dense(3 * c, name='c_attn')(x), 3, axis=-1)
        else:
            q, k, v = (nn.Dense(c, name=name)(x) for name in ('q', 'k', 'v'))
        q, k, v = (a.reshape(b, t, self.n_head, c // self.n_head) for a in (q, k, v))
        scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(c // self.n_head)
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
        y = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(scores, axis=-1), v).reshape(b, t, c)
        return nn.Dense(c, name='c_proj')(y)


class MLP(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(x.shape[-1], name='c_proj')(nn.gelu(nn.Dense(self.hidden, name='c_fc')(x)))


class Block(nn.Module):
    n_head: int
    hidden: int
    fused: bool = False

    @nn.compact
    def __call__(self, x):
        x = x + CausalSelfAttention(self.n_head, self.fused, name='attn')(nn.LayerNorm(name='ln_1')(x))
        return x + MLP(self.hidden, name='mlp')(nn.LayerNorm(name='ln_2')(x))


class GPT(nn.Module):
    n_layer: int = 2
    n_embd: int = 16
    n_head: int = 2
    hidden: int = 64
    fused: bool = False
    tied: bool = False

    @nn.compact
    def __call__(self, tokens):
        wte = nn.Embed(VOCAB, self.n_embd, name='wte')
        x = wte(tokens) + nn.Embed(SEQ, self.n_embd, name='wpe')(jnp.arange(tokens.shape[1]))
        for i in range(self.n_layer):
            x = Block(self.n_head, self.hidden, self.fused, name=f'h_{i}')(x)
        x = nn.LayerNorm(name='ln_f')(x)
        return wte.attend(x) if self.tied else nn.Dense(VOCAB, use_bias=False, name='lm_head')(x)


SMALL = dict(n_layer=2, n_embd=16, n_head=2, hidden=64)
BIG = dict(n_layer=4, n_embd=32, n_head=4, hidden=128)


def _key(seed: int = 0) -> jax.Array:
    return jax.random.key(seed, impl='rbg')  # compiles faster on XLA:CPU


@functools.cache
def _tokens(batch: int = 2) -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, (batch, SEQ)).astype(np.int32)


def _random_variables(model, *inputs, seed: int = 1) -> dict:
    """Random values of the model's shapes (norms and biases too); XLA:CPU is slow to compile inits."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda leaf: jnp.asarray(0.3 * rng.standard_normal(leaf.shape), leaf.dtype),
                                  jax.eval_shape(model.init, _key(), *inputs))


def _gpt_pair(fused=False, tied=False, **big):
    small = GPT(**SMALL, fused=fused, tied=tied)
    return small, GPT(**{**SMALL, **big}, fused=fused, tied=tied), _random_variables(small, _tokens())


def _logit_gap(small_vars, small, big_vars, big, *inputs) -> float:
    return float(jnp.max(jnp.abs(big.apply(big_vars, *inputs) - small.apply(small_vars, *inputs))))


# ---------------------------------------------------------------------------------------------
# Function preservation, one dimension at a time and all together


@pytest.mark.parametrize('growth', [
    dict(n_embd=32, n_head=4),  # residual width and heads (head_dim 8 kept)
    dict(hidden=128),
    dict(n_layer=4),
    BIG,
], ids=['width+heads', 'mlp', 'depth', 'all'])
def test_gpt_logits_are_preserved(growth):
    small, big, small_vars = _gpt_pair(**growth)
    before = jax.tree_util.tree_map(np.array, small_vars)
    big_vars = growjax.expand(small_vars, small, big, _tokens(), rng=_key(), zero=ZERO if 'n_layer' in growth else None)
    assert jax.tree_util.tree_map(jnp.shape, big_vars) == jax.tree_util.tree_map(
        jnp.shape, jax.eval_shape(big.init, _key(), _tokens()))
    assert _logit_gap(small_vars, small, big_vars, big, _tokens()) < 1e-5
    jax.tree_util.tree_map(np.testing.assert_array_equal, small_vars, before)  # the small tree is untouched


def test_fused_qkv_is_grown_block_by_block():
    small, big, small_vars = _gpt_pair(fused=True, **BIG)
    big_vars = expand(small_vars, small, big, _tokens(), rng=_key(), zero=ZERO, fused={r'h_\d+/attn/c_attn': 3})
    assert _logit_gap(small_vars, small, big_vars, big, _tokens()) < 1e-5


def test_zoo_vit_logits_are_preserved():
    images = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    small = models.get('vit', num_classes=5, variant='mu/4', depth=2, mlp_dim=64)  # width 32, 2 heads
    big = models.get('vit', num_classes=5, variant='mu/4', width=64, num_heads=4, depth=4, mlp_dim=128)
    small_vars = _random_variables(small, images)
    big_vars = expand(small_vars, small, big, images, rng=_key(), zero=r'block(2|3)/(attention/out|mlp/fc2)')
    assert big_vars['params']['block1']['attention']['query']['kernel'].shape == (64, 4, 16)
    assert _logit_gap(small_vars, small, big_vars, big, images) < 1e-5


@pytest.mark.parametrize('stack, sources', [('cycle', (0, 1, 0, 1)), ('repeat', (0, 0, 1, 1))])
def test_stack_copies_small_blocks(stack, sources):
    small, big, small_vars = _gpt_pair(n_layer=4)
    big_vars = expand(small_vars, small, big, _tokens(), rng=_key(), depth='stack', stack=stack)  # no check
    for i, source in enumerate(sources):
        jax.tree_util.tree_map(np.testing.assert_array_equal, big_vars['params'][f'h_{i}'],
                               small_vars['params'][f'h_{source}'])
    assert _logit_gap(small_vars, small, big_vars, big, _tokens()) > 1e-3  # G_stack changes the function
    # Copies whose residual branches end at zero are identities: then preservation is claimed and checked.
    zeroed = expand(small_vars, small, big, _tokens(), rng=_key(), depth='stack', stack='cycle', zero=ZERO)
    np.testing.assert_array_equal(zeroed['params']['h_2']['mlp']['c_fc']['kernel'],
                                  small_vars['params']['h_0']['mlp']['c_fc']['kernel'])
    assert _logit_gap(small_vars, small, zeroed, big, _tokens()) < 1e-5


# ---------------------------------------------------------------------------------------------
# The copies must not stay copies


def _loss(model, params, tokens):
    logits = model.apply({'params': params}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def _train(model, params, optimizer, steps: int, seed: int = 5, state=None):
    """(params, optimiser state) after `steps` steps of next-token prediction on random tokens."""
    @jax.jit
    def step(params, state, tokens):
        grads = jax.grad(functools.partial(_loss, model))(params, tokens)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = optimizer.init(params) if state is None else state
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        params, state = step(params, state, jnp.asarray(rng.integers(0, VOCAB, (4, SEQ + 1)), jnp.int32))
    return params, state


def _units_with_a_twin(kernel) -> int:
    """Columns (units) of a kernel that equal another column exactly."""
    columns = np.asarray(kernel).T
    same = (columns[:, None, :] == columns[None, :, :]).all(-1)
    np.fill_diagonal(same, False)
    return int(same.any(1).sum())


@pytest.mark.parametrize('noise, twins', [(0.0, 128), (0.1, 0)], ids=['exact-split', 'noisy-split'])
def test_copied_mlp_units_do_not_stay_twins_under_adamw(noise, twins):
    small, big, small_vars = _gpt_pair(hidden=128)  # only the MLP grows: its units start as exact copies
    big_vars = expand(small_vars, small, big, _tokens(), rng=_key(), noise=noise)
    assert _units_with_a_twin(big_vars['params']['h_0']['mlp']['c_fc']['kernel']) == 128
    trained, _ = _train(big, big_vars['params'], optax.adamw(1e-2, weight_decay=0.1), steps=20)
    assert _units_with_a_twin(trained['h_0']['mlp']['c_fc']['kernel']) == twins


# ---------------------------------------------------------------------------------------------
# Optimiser state: the first update after growth is what the rule says


def _tiled(small, big_shape) -> np.ndarray:
    """Copies of `small` along every axis that grows (the plain layout of the unfused GPT)."""
    small = np.asarray(small)
    for axis, (s, b) in enumerate(zip(small.shape, big_shape)):
        small = np.concatenate([small] * (b // s), axis) if s != b else small
    return small


def _first_updates(optimizer, rule: str):
    """Grow a GPT trained for 3 steps (exact splits, so gradients are exact copies) with its optimiser
    state, then take one step on the same batch in both models."""
    small, big, small_vars = _gpt_pair(**BIG)
    small_params, state = _train(small, small_vars['params'], optimizer, steps=3)
    plan = expansion_plan(small, big, _tokens(), zero=ZERO)
    big_params = expand({'params': small_params}, small, big, _tokens(), rng=_key(), plan=plan, noise=0.0)['params']
    big_state = expand_opt_state(state, small_params, big_params, plan, rule=rule)
    tokens = jnp.asarray(np.random.default_rng(9).integers(0, VOCAB, (4, SEQ + 1)), jnp.int32)
    small_updates, _ = optimizer.update(jax.grad(functools.partial(_loss, small))(small_params, tokens), state,
                                        small_params)
    big_grads = jax.grad(functools.partial(_loss, big))(big_params, tokens)
    big_updates, _ = optimizer.update(big_grads, big_state, big_params)
    return plan, *(flatten(tree) for tree in (small_params, big_params, small_updates, big_updates, big_grads)), \
        big_state


LR, WD = 1e-2, 0.1
B1, B2, EPS = 0.9, 0.999, 1e-8


def test_adamw_state_map_makes_the_first_step_the_small_models_step():
    # eps aside: a tiled copy's sqrt(nu) is the small one's / f, so eps would weigh f times more; 1e-16 hides it.
    optimizer = optax.adamw(LR, eps=1e-16, weight_decay=WD)
    plan, small_p, big_p, small_u, big_u, big_g, big_state = _first_updates(optimizer, 'map')
    assert int(big_state[0].count) == 3  # kept
    for path, update in big_u.items():
        if path[-2:] == ('k', 'bias'):
            continue  # its gradient is rounding noise (softmax ignores a shift of all keys), which Adam normalises
        if path[0] in ('h_2', 'h_3'):  # new leaves: zero moments, the step count goes on (to 4)
            m_hat = (1 - B1) * big_g[path] / (1 - B1 ** 4)
            v_hat = (1 - B2) * big_g[path] ** 2 / (1 - B2 ** 4)
            expected = -LR * (m_hat / (np.sqrt(v_hat) + 1e-16) + WD * big_p[path])
        else:  # Adam's part of the step is the small model's, copied; decay acts on the big weights
            expected = _tiled(small_u[path] + LR * WD * small_p[path], update.shape) - LR * WD * big_p[path]
        np.testing.assert_allclose(update, expected, atol=2e-6, err_msg='/'.join(path))
    assert rate_scales(plan)['h_0']['mlp']['c_proj']['kernel'] == 0.5  # it reads the hidden units, 64 -> 128


def test_sgd_momentum_state_map_scales_the_step_as_the_gradients():
    optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)
    plan, _, _, small_u, big_u, big_g, _ = _first_updates(optimizer, 'map')
    for path, update in big_u.items():
        leaf = plan.leaves[('params', *path)]
        expected = -0.1 * big_g[path] if leaf.source is None or leaf.zero else \
            _tiled(small_u[path], update.shape) / leaf.written_factor
        np.testing.assert_allclose(update, expected, atol=1e-6, err_msg='/'.join(path))


def test_adamw_state_reset_makes_the_first_step_a_fresh_adams():
    _, _, big_p, _, big_u, big_g, big_state = _first_updates(optax.adamw(LR, weight_decay=WD), 'reset')
    assert int(big_state[0].count) == 0
    for path, update in big_u.items():
        if path[-2:] == ('k', 'bias'):
            continue  # its gradient is rounding noise (softmax ignores a shift of all keys), which Adam normalises
        expected = -LR * (big_g[path] / (np.abs(big_g[path]) + EPS) + WD * big_p[path])
        np.testing.assert_allclose(update, expected, atol=1e-6, err_msg='/'.join(path))


# ---------------------------------------------------------------------------------------------
# What cannot be grown is refused in one line that names the leaf or module and why


def _error(call, kind=ExpandError) -> str:
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert isinstance(info.value, kind) and '\n' not in message, message
    return message


def test_non_integer_growth_factor_is_refused():
    small, big, small_vars = _gpt_pair(n_embd=24, n_head=3)
    message = _error(lambda: expand(small_vars, small, big, _tokens(), rng=_key()))
    assert 'goes from 16 to 24' in message and 'not an integer growth factor' in message and 'params/' in message


def test_head_dim_change_is_refused():
    images = np.zeros((1, 16, 16, 3), np.float32)
    small = models.get('vit', num_classes=5, variant='mu/4', depth=1)  # width 32, 2 heads of 16
    big = models.get('vit', num_classes=5, variant='mu/4', depth=1, width=64)  # 2 heads of 32
    message = _error(lambda: expansion_plan(small, big, images))
    assert 'block0/attention' in message and 'head_dim changes from 16 to 32' in message
    # The user's own attention hides head_dim in a reshape: the function check finds it.
    small, big, small_vars = _gpt_pair(n_embd=32)
    message = _error(lambda: expand(small_vars, small, big, _tokens(), rng=_key()), NotPreservedError)
    assert 'h_0/attn/c_proj is the first module' in message and 'head_dim' in message


def test_undeclared_fused_qkv_is_caught_and_the_option_named():
    small, big, small_vars = _gpt_pair(fused=True, n_embd=32, n_head=4)
    message = _error(lambda: expand(small_vars, small, big, _tokens(), rng=_key()), NotPreservedError)
    assert "['h_0/attn/c_attn']" in message and 'fused=' in message, message


def test_tied_embeddings_are_refused_where_the_width_grows():
    small, big, small_vars = _gpt_pair(tied=True, n_embd=32, n_head=4)
    message = _error(lambda: expand(small_vars, small, big, _tokens(), rng=_key()))
    assert message.startswith('params/wte/embedding') and 'tied' in message
    small, big, small_vars = _gpt_pair(tied=True, hidden=128)  # the tied axis does not grow: fine
    big_vars = expand(small_vars, small, big, _tokens(), rng=_key())
    assert _logit_gap(small_vars, small, big_vars, big, _tokens()) < 1e-5


class Projected(nn.Module):
    """A user's layer expand does not know: `x @ w` with a bare parameter."""
    width: int

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, self.width, name='embed')(tokens)
        x = x @ self.param('w', nn.initializers.lecun_normal(), (self.width, self.width))
        return nn.Dense(VOCAB, name='out')(nn.relu(x))


def test_unknown_layout_is_caught_and_can_be_declared():
    small, big = Projected(16), Projected(32)
    small_vars = _random_variables(small, _tokens())
    message = _error(lambda: expand(small_vars, small, big, _tokens(), rng=_key()), NotPreservedError)
    assert "['params/w']" in message and 'reads=' in message, message  # the guessed leaf and the option
    big_vars = expand(small_vars, small, big, _tokens(), rng=_key(), reads={'w': (0,)})
    assert _logit_gap(small_vars, small, big_vars, big, _tokens()) < 1e-5
    # a reads pattern that matches no leaf would leave it tiled as an output, unseen under jit
    message = _error(lambda: expansion_plan(small, big, _tokens(), reads={'proj/w': (0,)}))
    assert "reads={'proj/w'" in message and 'matches no leaf' in message, message


def test_nnx_models_and_unmatched_zero_are_refused():
    linear = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    assert 'linen-only' in _error(lambda: expansion_plan(linear, linear, np.zeros((1, 2), np.float32)))
    small, big, small_vars = _gpt_pair(n_layer=4)
    message = _error(lambda: expand(small_vars, small, big, _tokens(), rng=_key(), zero='h_2/c_proj'))
    assert "['h_2', 'h_3']" in message


# ---------------------------------------------------------------------------------------------
# Pure and shardable


def test_expands_under_jit_into_sharded_leaves_on_8_devices():
    devices = np.array(jax.devices())
    assert devices.size == 8, 'conftest.py asks XLA for 8 CPU devices'
    mesh = Mesh(devices, ('model',))

    def sharding_for(leaf):
        spec = P(*([None] * (leaf.ndim - 1)), 'model') if leaf.ndim and leaf.shape[-1] % 8 == 0 else P()
        return NamedSharding(mesh, spec)

    small, big, small_vars = _gpt_pair(**BIG)
    placed = jax.tree_util.tree_map(lambda a: jax.device_put(a, sharding_for(a)), small_vars)
    out_shardings = jax.tree_util.tree_map(sharding_for, jax.eval_shape(big.init, _key(), _tokens()))
    rng = jax.device_put(_key(3), NamedSharding(mesh, P()))
    grow = jax.jit(lambda v, key: expand(v, small, big, jnp.zeros((2, SEQ), jnp.int32), rng=key, zero=ZERO),
                   out_shardings=out_shardings)
    with jax.transfer_guard('disallow'), pytest.warns(UserWarning, match='cannot check.*check_function'):
        big_vars = grow(placed, rng)
    kernel = big_vars['params']['h_1']['mlp']['c_fc']['kernel']
    assert kernel.sharding == out_shardings['params']['h_1']['mlp']['c_fc']['kernel']
    assert len(kernel.sharding.device_set) == 8
    eager = expand(small_vars, small, big, _tokens(), rng=_key(3), zero=ZERO)
    jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, atol=1e-6), jax.device_get(big_vars), eager)
    assert check_function(small_vars, small, jax.device_get(big_vars), big, _tokens()) < 1e-5
