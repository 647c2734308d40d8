"""Language-model metrics: next-token cross-entropy and bits per byte.

Bits per byte is the usual yardstick of byte-level models (and compression): unlike perplexity per
token it does not depend on a tokeniser, so models over other vocabularies compare on it too.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax


def next_token_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy in nats of logits [B, T, V] against int targets [B, T], in float32.

    `mask` [B] (per example, as the eval iterators give) or [B, T] weights the tokens: padding's 0
    leaves it out of the mean.
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    if mask is None:
        return losses.mean()
    weights = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (losses.ndim - mask.ndim)), losses.shape)
    return (losses * weights).sum() / weights.sum()


def bits_per_byte(mean_cross_entropy_nats):
    """nats / ln 2: a byte-level model's mean cross-entropy per byte in bits (8 would be no better
    than uniform over 256 bytes). For a model over multi-byte tokens, pass nats per byte instead."""
    return mean_cross_entropy_nats / math.log(2)
