"""Vision Transformer (Dosovitskiy et al., ICLR 2021), written as big_vision's `models/vit.py`.

Patch embedding (a conv of stride = kernel = patch size), a class token ('tok') or none ('gap'),
learned position embeddings, pre-LayerNorm encoder blocks (attention, then a GELU MLP, each with a
residual), a final LayerNorm, global pooling (the class token, or the mean over tokens), an
optional tanh pre-logits layer and the head.

Every layer that regimes may freeze is a top-level name, in forward order: 'embedding', 'cls',
'pos_embedding', 'block0' .. 'block{depth-1}', 'encoder_norm', 'pre_logits', 'head' (regimes
count top-level layers, so 'block6_new' trains the upper half of a 12-block ViT). A block holds
'norm1', 'attention' (query/key/value/out as flax's MultiHeadDotProductAttention names them),
'norm2' and 'mlp' ('fc1', 'fc2').

Two choices make published weights load exactly (growjax.pretrained):

- the class token is concatenated *before* the position embeddings are added, so 'pos_embedding'
  has 1 + H*W rows with a class token, as in the original ViT, timm and torchvision. big_vision's
  current vit.py adds positions first (H*W rows, the class token gets none): the same function
  with row 0 at zero, which its loader fills in.
- GELU is exact (erf) by default, as timm and torchvision compute it; big_vision uses flax's tanh
  approximation (`approximate_gelu=True`, what its loader's options say).

A ViT is not grown with a `Growth` spec: growjax.surgery grows it.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from growjax.errors import UserError
from growjax.models.growth import GrowthError
from growjax.nn import lecun_normal_flat

# big_vision's decode_variant (Table 2 of arXiv:2106.04560), plus its tiny 'mu' for tests:
# name -> (width, depth, mlp_dim, num_heads).
VARIANTS = {
    'mu': (32, 1, 128, 2),
    'Ti': (192, 12, 768, 3),
    'S': (384, 12, 1536, 6),
    'M': (512, 12, 2048, 8),
    'B': (768, 12, 3072, 12),
    'L': (1024, 24, 4096, 16),
    'H': (1280, 32, 5120, 16),
}
POOL_TYPES = ('tok', 'gap')
LAYER_NORM_EPSILON = 1e-6  # big_vision, timm and torchvision alike (torch's own default is 1e-5)


class ViTConfigError(UserError):
    """A ViT variant or size that does not parse or does not fit together."""


@dataclasses.dataclass(frozen=True)
class Dims:
    """The sizes of a ViT: embedding width, blocks, MLP width, attention heads, patch side."""
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int


def decode_variant(variant: str | None) -> dict[str, int]:
    """'B/16' -> width, depth, mlp_dim, num_heads and patch_size; 'B' -> all but patch_size; None -> {}."""
    if variant is None:
        return {}
    name, slash, patch = variant.partition('/')
    if name not in VARIANTS or (slash and not patch.isdigit()) or (slash and int(patch) <= 0):
        raise ViTConfigError(f"ViT variant {variant!r} does not parse: expected 'NAME' or 'NAME/PATCH' with NAME "
                             f"one of {list(VARIANTS)} and PATCH a positive integer, e.g. 'B/16'.")
    sizes = dict(zip(('width', 'depth', 'mlp_dim', 'num_heads'), VARIANTS[name]))
    return {**sizes, 'patch_size': int(patch)} if slash else sizes


def variant_of(dims: Dims) -> str | None:
    """The variant name ('S/16') with exactly these sizes, or None."""
    for name, sizes in VARIANTS.items():
        if sizes == (dims.width, dims.depth, dims.mlp_dim, dims.num_heads):
            return f'{name}/{dims.patch_size}'
    return None


def fused_attention(query, key, value, mask=None, dropout_rng=None, dropout_rate: float = 0.0,
                    broadcast_dropout: bool = True, deterministic: bool = True, dtype=None, precision=None):
    """Attention for nn.MultiHeadDotProductAttention through the fused `jax.nn.dot_product_attention`
    where the backend has a fused kernel (cuDNN flash attention on GPUs, TPUs), same arguments as
    flax's.

    jax's kernel has no attention-weight dropout, so while that dropout is active (training with
    attention_dropout_rate > 0) flax's unfused `nn.dot_product_attention`, which has it, is used.
    So it is on CPUs, where jax's version is no fused kernel and its train step ran 1.3x slower than
    flax's einsums (a 6-block, 96-wide ViT on 16x16 images, jax 0.10.2: 669 vs 505 ms per batch of
    128). `precision` applies to flax's path only: the fused kernel picks its own.
    """
    if (dropout_rate > 0.0 and not deterministic) or jax.default_backend() == 'cpu':
        return nn.dot_product_attention(query, key, value, mask=mask, dropout_rng=dropout_rng,
                                        dropout_rate=dropout_rate, broadcast_dropout=broadcast_dropout,
                                        deterministic=deterministic, dtype=dtype, precision=precision)
    return jax.nn.dot_product_attention(query, key, value, mask=mask)


def gelu(x: jax.Array, approximate: bool = False) -> jax.Array:
    """GELU; the exact one as x / 2 * (1 + erf(x / sqrt(2))), torch's (and so timm's) formula.

    jax.nn.gelu computes the exact GELU as x / 2 * erfc(-x / sqrt(2)): the same function (within
    1e-6, 2 ulp, in float32; erfc keeps relative precision below x = -5, where GELU is under 2e-6), but
    XLA:CPU lowers erfc to two rational approximations with divisions, both computed, and erf to one
    polynomial: 0.36 vs 0.84 ms on a [128, 17, 384] array, and the train step of a 6-block, 96-wide
    ViT (16x16 images, batch 128) takes 9% less CPU time (see docs/performance.md, "ViT").
    """
    if approximate:
        return nn.gelu(x, approximate=True)
    return 0.5 * x * (1.0 + lax.erf(x * 0.7071067811865476))  # Python floats: x's dtype is kept


def _posemb_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """big_vision's normal(1 / sqrt(width)), drawn flat (see lecun_normal_flat: multi-axis draws
    compile slowly on XLA:CPU)."""
    return (jax.random.normal(key, (math.prod(shape),), dtype) / math.sqrt(shape[-1])).reshape(shape)


def _layer_norm(dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=dtype, name=name)


class PatchEmbedding(nn.Module):
    """The patch embedding: nn.Conv(width, (p, p), strides=(p, p), padding='VALID') with the same
    parameters ('kernel' HWIO, 'bias'), computed as one matmul over flattened patches.

    The same function; XLA:CPU's convolution backward made a conv here most of a small ViT's step
    (a 6-block, 96-wide ViT on 16x16 images: see docs/performance.md)."""
    width: int
    patch_size: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        n, height, width, channels = x.shape
        h, w = height // p, width // p
        kernel = self.param('kernel', lecun_normal_flat, (p, p, channels, self.width), jnp.float32)
        bias = self.param('bias', nn.initializers.zeros, (self.width,), jnp.float32)
        patches = x[:, :h * p, :w * p].reshape(n, h, p, w, p, channels).transpose(0, 1, 3, 2, 4, 5)
        patches, kernel, bias = nn.dtypes.promote_dtype(patches.reshape(n, h, w, p * p * channels), kernel, bias,
                                                        dtype=self.dtype)
        return patches @ kernel.reshape(p * p * channels, self.width) + bias


class MlpBlock(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 (the block adds the second dropout and the residual)."""
    mlp_dim: int
    dropout_rate: float = 0.0
    approximate_gelu: bool = False
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        width = x.shape[-1]
        x = nn.Dense(self.mlp_dim, kernel_init=lecun_normal_flat, dtype=self.dtype, name='fc1')(x)
        x = gelu(x, approximate=self.approximate_gelu)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        return nn.Dense(width, kernel_init=lecun_normal_flat, dtype=self.dtype, name='fc2')(x)


class EncoderBlock(nn.Module):
    """x + attention(norm1(x)), then + mlp(norm2(x)): pre-LN, as big_vision's Encoder1DBlock."""
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    approximate_gelu: bool = False
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = _layer_norm(self.dtype, 'norm1')(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, dtype=self.dtype, kernel_init=lecun_normal_flat,
            dropout_rate=self.attention_dropout_rate, attention_fn=fused_attention, name='attention',
        )(y, deterministic=not train)
        x = x + nn.Dropout(self.dropout_rate)(y, deterministic=not train)
        y = _layer_norm(self.dtype, 'norm2')(x)
        y = MlpBlock(self.mlp_dim, self.dropout_rate, self.approximate_gelu, self.dtype, name='mlp')(y, train)
        return x + nn.Dropout(self.dropout_rate)(y, deterministic=not train)


class ViT(nn.Module):
    """A Vision Transformer for NHWC images of any size and channel count.

    variant: big_vision's 'NAME/PATCH' ('Ti/16', 'S/32', 'B/16', 'mu/4'; names in VARIANTS), or
        'NAME' with `patch_size`, or None with every size given.
    width, depth, mlp_dim, num_heads, patch_size: override the variant's sizes (None: the
        variant's), e.g. variant='S/4', width=128, depth=6 for the built-in 16x16 / 32x32 data.
    pool_type: 'tok' (a class token; its output is pooled) or 'gap' (no class token; the mean of
        the tokens).
    representation_size: a tanh pre-logits layer of this width before the head (None: none).
    norm_pooled: the final LayerNorm normalises the pooled vector instead of every token (timm's
        `fc_norm`, used by its average-pooled models); big_vision and timm's `norm` do the latter.
    dropout_rate: after the position embeddings, in the MLP and on each residual branch;
        attention_dropout_rate: on the attention weights. Active only when called with train=True.
    approximate_gelu: flax's tanh GELU (big_vision) instead of the exact one (timm, torchvision).
    dtype: the compute dtype (e.g. bfloat16); parameters stay float32.
    growth: must be None (models.get passes it): a ViT is grown with growjax.surgery.

    The position embeddings take their shape from the input at init (one per patch, plus one for
    the class token); growjax.pretrained resizes published ones to another image size.
    """
    num_classes: int = 1000
    variant: str | None = 'B/16'
    width: int | None = None
    depth: int | None = None
    mlp_dim: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    pool_type: str = 'tok'
    representation_size: int | None = None
    norm_pooled: bool = False
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    approximate_gelu: bool = False
    dtype: jnp.dtype | None = None
    growth: None = None

    def __post_init__(self):
        if self.growth is not None:
            raise GrowthError('ViT takes no Growth spec (growth must be None): a ViT is grown with growjax.surgery.')
        if self.pool_type not in POOL_TYPES:
            raise ViTConfigError(f'ViT pool_type={self.pool_type!r}; expected one of {list(POOL_TYPES)}.')
        _ = self.dims  # a variant or sizes that do not fit fail here, at construction, not at the first call
        super().__post_init__()

    @property
    def dims(self) -> Dims:
        """The variant's sizes with the explicit overrides applied."""
        sizes = decode_variant(self.variant)
        for field in ('width', 'depth', 'mlp_dim', 'num_heads', 'patch_size'):
            if getattr(self, field) is not None:
                sizes[field] = getattr(self, field)
        missing = [field for field in ('width', 'depth', 'mlp_dim', 'num_heads', 'patch_size') if field not in sizes]
        if missing:
            raise ViTConfigError(f'ViT variant={self.variant!r} does not give {missing}: pass them, or a variant '
                                 "such as 'B/16'.")
        dims = Dims(**sizes)
        bad = [f'{field}={value}' for field, value in dataclasses.asdict(dims).items()
               if isinstance(value, bool) or not isinstance(value, int) or value <= 0]
        if bad:
            raise ViTConfigError(f'ViT sizes must be positive integers, got {", ".join(bad)}.')
        if dims.width % dims.num_heads:
            raise ViTConfigError(f'ViT width={dims.width} is not a multiple of num_heads={dims.num_heads}.')
        return dims

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dims = self.dims
        x = PatchEmbedding(dims.width, dims.patch_size, self.dtype, name='embedding')(x)
        n, h, w, c = x.shape
        x = x.reshape(n, h * w, c)
        if self.pool_type == 'tok':
            cls = self.param('cls', nn.initializers.zeros, (1, 1, c), jnp.float32)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (n, 1, c)), x], axis=1)
        pos_embedding = self.param('pos_embedding', _posemb_init, (1, x.shape[1], c), jnp.float32)
        x = nn.Dropout(self.dropout_rate)(x + pos_embedding.astype(x.dtype), deterministic=not train)

        for index in range(dims.depth):
            x = EncoderBlock(dims.num_heads, dims.mlp_dim, self.dropout_rate, self.attention_dropout_rate,
                             self.approximate_gelu, self.dtype, name=f'block{index}')(x, train)

        pool = (lambda tokens: tokens[:, 0]) if self.pool_type == 'tok' else (lambda tokens: tokens.mean(axis=1))
        norm = _layer_norm(self.dtype, 'encoder_norm')
        x = norm(pool(x)) if self.norm_pooled else pool(norm(x))
        if self.representation_size:
            x = nn.tanh(nn.Dense(self.representation_size, kernel_init=lecun_normal_flat, dtype=self.dtype,
                                 name='pre_logits')(x))
        return nn.Dense(self.num_classes, kernel_init=lecun_normal_flat, dtype=self.dtype, name='head')(x)
