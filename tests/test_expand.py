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
from growjax.expand import ExpandError, NotPreservedError, check_function, expand, expand_opt_state, expansion_plan
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
    big_vars = expand(small_vars, small, big, _tokens(), rng=_key(), zero=ZERO if 'n_layer' in growth else None)
    assert jax.tree_util.tree_map(jnp.shape, big_vars) == jax.tree_util.tree_map(
        jnp.shape, jax.eval_shape(big.init, _key(), _tokens()))
    assert _logit_gap(small_vars, small, big_vars, big, _tokens()) < 1e-5
    jax.tree_util.tree_map(np.testing.assert_array_equal, small_vars, before)  # the small tree is untouched


def test_fused_qkv_is_grown_block_by_block():
    small, big, small_vars = _gpt_pair(fused=True, **BIG)
    big_vars = expand(small_vars, small, big, _tokens(), rng=_key(), zero=ZERO, fused={r'h_\d+/attn/c_attn': 3})
    assert _logit_gap(small_vars, small, big_vars, big, _tokens()) < 1e-5
