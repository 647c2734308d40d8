"""A small GPT (Radford et al. 2019): a causal, pre-LayerNorm Transformer decoder over bytes.

Token and learned position embeddings are summed, then `depth` pre-LN blocks (x + attention(ln_1(x)),
then x + mlp(ln_2(x))), a final LayerNorm and an untied linear head over the vocabulary.

It is a plain linen module on purpose, so growjax can grow it like any other (wider, deeper, more
heads): the head is not tied to the embedding, head_dim is width // num_heads, and the causal mask
is passed to flax's attention as an argument (growjax.surgery sees it and keeps new heads causal).
It grows into a bigger GPT during training with growjax.expand (growjax/lm_train.py).
Parameter names, in forward order: 'embed', 'pos_embed', 'block_0' .. 'block_{depth-1}' (each
'ln_1', 'attn' with flax's 'query'/'key'/'value'/'out', 'ln_2', 'mlp' with 'fc1'/'fc2'), 'ln_f',
'head'.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from growjax.errors import UserError
from growjax.models.growth import GrowthError
from growjax.models.vit import MlpBlock, fused_attention
from growjax.nn import lecun_normal_flat

LAYER_NORM_EPSILON = 1e-5  # GPT-2's (torch's default)
EMBED_STDDEV = 0.02  # GPT-2's init of both embeddings


class GPTConfigError(UserError):
    """GPT sizes that do not fit together, or a sequence longer than the position embeddings."""


def _embed_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """normal(0.02), drawn flat (multi-axis draws compile slowly on XLA:CPU; see lecun_normal_flat)."""
    return (EMBED_STDDEV * jax.random.normal(key, (math.prod(shape),), dtype)).reshape(shape)


def _layer_norm(dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=dtype, name=name)


class Block(nn.Module):
    """x + attn(ln_1(x)) under a causal mask, then x + mlp(ln_2(x))."""
    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
        y = _layer_norm(self.dtype, 'ln_1')(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, dtype=self.dtype, kernel_init=lecun_normal_flat, dropout_rate=self.dropout,
            attention_fn=fused_attention, name='attn',
        )(y, mask=mask, deterministic=not train)
        x = x + nn.Dropout(self.dropout)(y, deterministic=not train)
        y = _layer_norm(self.dtype, 'ln_2')(x)
        y = MlpBlock(self.mlp_dim, self.dropout, dtype=self.dtype, name='mlp')(y, train)
        return x + nn.Dropout(self.dropout)(y, deterministic=not train)


class GPT(nn.Module):
    """Logits [B, T, vocab_size] of the next token at every position of int tokens [B, T].

    width: the embedding width; depth: blocks; num_heads: attention heads (width must be a multiple);
    mlp_dim: the MLP's hidden width (GPT-2: 4 * width); max_len: the longest sequence (the rows of
    'pos_embed'). dropout: on the embeddings, the attention weights and each residual branch, only
    when called with train=True (needs a 'dropout' rng). dtype: the compute dtype; parameters stay
    float32. growth must be None (models.get passes it): a GPT grows with growjax.expand (or growjax.surgery).
    """
    vocab_size: int = 256
    width: int = 256
    depth: int = 4
    num_heads: int = 4
    mlp_dim: int = 1024
    max_len: int = 256
    dropout: float = 0.0
    dtype: jnp.dtype | None = None
    growth: None = None

    def __post_init__(self):
        if self.growth is not None:
            raise GrowthError('GPT takes no Growth spec (growth must be None): a GPT grows with growjax.expand (or growjax.surgery).')
        sizes = {field: getattr(self, field)
                 for field in ('vocab_size', 'width', 'depth', 'num_heads', 'mlp_dim', 'max_len')}
        bad = [f'{field}={value!r}' for field, value in sizes.items()
               if isinstance(value, bool) or not isinstance(value, int) or value <= 0]
        if bad:
            raise GPTConfigError(f'GPT sizes must be positive integers, got {", ".join(bad)}.')
        if self.width % self.num_heads:
            raise GPTConfigError(f'GPT width={self.width} is not a multiple of num_heads={self.num_heads}.')
        super().__post_init__()

    @nn.compact
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        length = tokens.shape[-1]
        if length > self.max_len:
            raise GPTConfigError(f'GPT got sequences of {length} tokens, more than max_len={self.max_len}.')
        x = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, embedding_init=_embed_init, name='embed')(tokens)
        x = x + nn.Embed(self.max_len, self.width, dtype=self.dtype, embedding_init=_embed_init,
                         name='pos_embed')(jnp.arange(length))
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        mask = nn.make_causal_mask(tokens, dtype=jnp.bool_)
        for index in range(self.depth):
            x = Block(self.num_heads, self.mlp_dim, self.dropout, self.dtype, name=f'block_{index}')(x, mask, train)
        x = _layer_norm(self.dtype, 'ln_f')(x)
        return nn.Dense(self.vocab_size, kernel_init=lecun_normal_flat, dtype=self.dtype, name='head')(x)
