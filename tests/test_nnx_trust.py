"""Surgery you can trust, in Flax NNX (issue 20): every hurried mistake with nnx_surgery ends in a
one-line SurgeryError naming the operation and the module, or in a correct model; never in a
silently wrong one. Models as their authors write them: nanoGPT's attention (a causal mask built
inside, separate or fused q/k/v), timm's (one `qkv` projection reshaped to (B, N, 3, H, hd)), pre-LN
transformer blocks that hold their own residual sums."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from growjax import nnx_surgery, surgery
from growjax.nn import lecun_normal_flat

INIT = lecun_normal_flat  # as tests/test_nnx.py: flat draws compile fast on XLA:CPU
WIDTH, HEADS, VOCAB, T = 8, 2, 11, 5
TOKENS = jax.random.randint(jax.random.key(0), (2, T), 0, VOCAB)
FEATURES = jax.random.normal(jax.random.key(1), (2, T, 6))


def linear(i, o, rngs):
    return nnx.Linear(i, o, kernel_init=INIT, rngs=rngs)


def attend(q, k, v, mask=None):
    """Softmax attention over (B, H, T, hd) heads; `mask`: True where a query may see a key."""
    att = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
    if mask is not None:
        att = jnp.where(mask.astype(bool), att, -jnp.inf)
    return jax.nn.softmax(att, axis=-1) @ v


def causal(t):  # the mask nanoGPT builds inside its attention
    return jnp.tril(jnp.ones((t, t), bool))


def split_heads(t, heads):
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(0, 2, 1, 3)


def merge_heads(t):
    b, h, n, d = t.shape
    return t.transpose(0, 2, 1, 3).reshape(b, n, h * d)


class SeparateAttention(nnx.Module):
    """nanoGPT's causal self-attention with separate q/k/v projections; no mask argument."""

    def __init__(self, width, n_head, *, rngs):
        self.n_head = n_head
        self.q, self.k, self.v = linear(width, width, rngs), linear(width, width, rngs), linear(width, width, rngs)
        self.c_proj = linear(width, width, rngs)

    def __call__(self, x):
        q, k, v = (split_heads(t, self.n_head) for t in (self.q(x), self.k(x), self.v(x)))
        return self.c_proj(merge_heads(attend(q, k, v, causal(x.shape[1]))))


class FusedAttention(nnx.Module):
    """nanoGPT's CausalSelfAttention: one c_attn projection split into q, k, v; causal inside."""

    def __init__(self, width, n_head, *, rngs):
        self.n_head = n_head
        self.c_attn = linear(width, 3 * width, rngs)
        self.c_proj = linear(width, width, rngs)

    def __call__(self, x):
        q, k, v = (split_heads(t, self.n_head) for t in jnp.split(self.c_attn(x), 3, axis=-1))
        return self.c_proj(merge_heads(attend(q, k, v, causal(x.shape[1]))))


class TimmAttention(nnx.Module):
    """timm's Attention: qkv reshaped to (B, N, 3, H, hd), every position seen, projection `proj`."""

    def __init__(self, width, num_heads, *, rngs):
        self.num_heads = num_heads
        self.qkv = linear(width, 3 * width, rngs)
        self.proj = linear(width, width, rngs)

    def __call__(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).transpose(2, 0, 3, 1, 4)
        return self.proj(merge_heads(attend(qkv[0], qkv[1], qkv[2])))


class Mlp(nnx.Module):
    def __init__(self, width, *, rngs):
        self.fc = linear(width, 4 * width, rngs)
        self.proj = linear(4 * width, width, rngs)

    def __call__(self, x):
        return self.proj(nnx.gelu(self.fc(x)))


class Block(nnx.Module):
    """A pre-LN transformer block: it holds its own residual sums."""

    def __init__(self, width, heads, attention, *, rngs):
        self.ln_1 = nnx.LayerNorm(width, rngs=rngs)
        self.attn = attention(width, heads, rngs=rngs)
        self.ln_2 = nnx.LayerNorm(width, rngs=rngs)
        self.mlp = Mlp(width, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nnx.Module):
    def __init__(self, attention, *, rngs):
        self.wte = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
        self.wpe = nnx.Embed(T, WIDTH, rngs=rngs)
        self.h = nnx.List([Block(WIDTH, HEADS, attention, rngs=rngs) for _ in range(2)])
        self.ln_f = nnx.LayerNorm(WIDTH, rngs=rngs)
        self.lm_head = linear(WIDTH, VOCAB, rngs)

    def __call__(self, tokens):
        x = self.wte(tokens) + self.wpe(jnp.arange(tokens.shape[1]))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class ViT(nnx.Module):
    def __init__(self, *, rngs):
        self.patch_embed = linear(6, WIDTH, rngs)
        self.blocks = nnx.List([Block(WIDTH, HEADS, TimmAttention, rngs=rngs) for _ in range(2)])
        self.norm = nnx.LayerNorm(WIDTH, rngs=rngs)
        self.head = linear(WIDTH, 3, rngs)

    def __call__(self, x):
        x = self.patch_embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(axis=1))


class ReluMLP(nnx.Module):
    def __init__(self, *, rngs):
        self.fc1 = linear(6, WIDTH, rngs)
        self.fc2 = linear(WIDTH, WIDTH, rngs)
        self.head = linear(WIDTH, 3, rngs)

    def __call__(self, x):
        return self.head(self.fc2(nnx.relu(self.fc1(x))))


def gpt(attention=FusedAttention):
    return GPT(attention, rngs=nnx.Rngs(0))


def make_block(rngs):
    return Block(WIDTH, HEADS, FusedAttention, rngs=rngs)


def relu_block(rngs):  # its last layer feeds a ReLU: zeroed, it sits at ReLU's flat 0
    return nnx.Sequential(linear(WIDTH, 16, rngs), nnx.relu, linear(16, WIDTH, rngs), nnx.relu)


def one_line(info):
    assert len(str(info.value).splitlines()) == 1, str(info.value)


def later_tokens_leak(model):
    """Whether changing the last token changes any earlier position's output."""
    changed = TOKENS.at[:, -1].set((TOKENS[:, -1] + 1) % VOCAB)
    return not np.allclose(model(TOKENS)[:, :-1], model(changed)[:, :-1], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 1. AddHeads: causal only where it can be seen


def test_heads_added_to_an_attention_that_masks_inside_must_be_told_whether_it_is_causal():
    grown = nnx_surgery.grow(gpt(SeparateAttention), surgery.AddHeads(
        r'h/\d/attn', heads=2, query='q', key='k', value='v', out='c_proj'), rngs=nnx.Rngs(1))
    with pytest.raises(surgery.SurgeryError, match=r"AddHeads\(h/\\d/attn, .*h/0/attn is called without a mask "
                                                   r'argument.*causal=True') as info:
        grown(TOKENS)
    one_line(info)
    # Told, the new heads (non-zero: not preserving) see only earlier positions, as the old ones do.
    causal = nnx_surgery.grow(gpt(SeparateAttention), surgery.AddHeads(
        r'h/\d/attn', heads=2, query='q', key='k', value='v', out='c_proj', causal=True), rngs=nnx.Rngs(1))
    assert np.any(causal.h[0].attn.c_proj.from_extra_heads.kernel[...])
    assert not later_tokens_leak(gpt(SeparateAttention)) and not later_tokens_leak(causal)
    assert not np.allclose(causal(TOKENS), gpt(SeparateAttention)(TOKENS), atol=1e-3)


class MaskedAttention(SeparateAttention):
    """A user's attention given its mask as an argument (positionally, here)."""

    def __call__(self, x, mask):
        q, k, v = (split_heads(t, self.n_head) for t in (self.q(x), self.k(x), self.v(x)))
        return self.c_proj(merge_heads(attend(q, k, v, mask)))


class MaskedLM(nnx.Module):
    def __init__(self, *, rngs):
        self.wte = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
        self.attn = MaskedAttention(WIDTH, HEADS, rngs=rngs)

    def __call__(self, tokens):
        h = self.wte(tokens)
        return h + self.attn(h, nnx.make_causal_mask(tokens))


def test_heads_added_to_an_attention_given_a_mask_share_it():
    grown = nnx_surgery.grow(MaskedLM(rngs=nnx.Rngs(0)), surgery.AddHeads(
        'attn', heads=2, query='q', key='k', value='v', out='c_proj'), rngs=nnx.Rngs(1), sample=(TOKENS,))
    assert not later_tokens_leak(grown)
    assert not np.allclose(grown(TOKENS), MaskedLM(rngs=nnx.Rngs(0))(TOKENS), atol=1e-3)


class TimmMaskedAttention(TimmAttention):
    """timm's signature: the mask is `attn_mask`."""

    def __call__(self, x, attn_mask=None):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).transpose(2, 0, 3, 1, 4)
        return self.proj(merge_heads(attend(qkv[0], qkv[1], qkv[2], attn_mask)))


class Padded(nnx.Module):
    def __init__(self, *, rngs):
        self.attn = TimmMaskedAttention(WIDTH, HEADS, rngs=rngs)

    def __call__(self, x):
        keep = jnp.arange(x.shape[1]) < 3  # padding after the third position
        return self.attn(x, attn_mask=keep[None, None, None, :])


def test_a_mask_the_new_heads_would_not_apply_is_an_error():
    op = surgery.AddHeads('attn', heads=1, qkv='qkv', out='proj', causal=False)
    with pytest.raises(surgery.SurgeryError, match=r'attn is called with attn_mask=, a mask the new heads would not '
                                                   r'apply') as info:
        nnx_surgery.grow(Padded(rngs=nnx.Rngs(0)), op, rngs=nnx.Rngs(1), sample=(jnp.ones((2, T, WIDTH)),))
    one_line(info)


class CausalCall(nnx.Module):
    """nnx.MultiHeadAttention called with is_causal=True and no mask."""

    def __init__(self, *, rngs):
        self.wte = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(HEADS, WIDTH, decode=False, kernel_init=INIT, rngs=rngs)

    def __call__(self, tokens):
        h = self.wte(tokens)
        return h + self.attn(h, is_causal=True)


def test_an_is_causal_call_makes_the_new_heads_causal_and_contradicting_it_is_an_error():
    grown = nnx_surgery.grow(CausalCall(rngs=nnx.Rngs(0)), surgery.AddHeads('attn', heads=2), rngs=nnx.Rngs(1))
    assert not later_tokens_leak(CausalCall(rngs=nnx.Rngs(0))) and not later_tokens_leak(grown)
    contradicting = nnx_surgery.grow(CausalCall(rngs=nnx.Rngs(0)), surgery.AddHeads('attn', heads=2, causal=False),
                                     rngs=nnx.Rngs(1))
    with pytest.raises(surgery.SurgeryError, match=r'causal=False.*attn is called with is_causal=True') as info:
        contradicting(TOKENS)
    one_line(info)


# ---------------------------------------------------------------------------------------------
# 2. AddHeads on a fused q/k/v projection


FUSED = {
    'nanogpt': (gpt, surgery.AddHeads(r'h/\d/attn', heads=2, qkv='c_attn', out='c_proj', causal=True), TOKENS, 'h'),
    'timm': (lambda: ViT(rngs=nnx.Rngs(0)), surgery.AddHeads(r'blocks/\d/attn', heads=2, qkv='qkv', out='proj',
                                                              causal=False), FEATURES, 'blocks'),
}


@pytest.mark.parametrize('case', FUSED)
def test_heads_added_beside_a_fused_qkv_projection(case):
    make, op, x, blocks = FUSED[case]
    expected = make()(x)
    preserving = nnx_surgery.grow(make(), op, rngs=nnx.Rngs(1), preserve_function=True, sample=(x,))
    np.testing.assert_allclose(preserving(x), expected, atol=1e-5)
    grown = nnx_surgery.grow(make(), op, rngs=nnx.Rngs(1), sample=(x,))
    attention = getattr(grown, blocks)[0].attn
    assert attention.extra_heads.query.kernel[...].shape == (WIDTH, 2, WIDTH // HEADS)
    assert np.any(getattr(attention, op.out).from_extra_heads.kernel[...])
    assert not np.allclose(grown(x), expected, atol=1e-3)
    if case == 'nanogpt':
        assert not later_tokens_leak(grown)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(grown)
    assert np.any(getattr(grads, blocks)[0].attn.extra_heads.key.kernel[...])


class NoHeadCount(FusedAttention):
    def __init__(self, width, n_head, *, rngs):
        super().__init__(width, n_head, rngs=rngs)
        del self.n_head
        self.heads_here = n_head

    def __call__(self, x):
        q, k, v = (split_heads(t, self.heads_here) for t in jnp.split(self.c_attn(x), 3, axis=-1))
        return self.c_proj(merge_heads(attend(q, k, v, causal(x.shape[1]))))


def test_a_fused_projection_growjax_cannot_split_into_heads_is_refused():
    cases = [
        (gpt(), surgery.AddHeads('h/0/attn', heads=1, qkv='c_attn', out='c_proj', head_dim=3, causal=True),
         r'c_attn has 24 output features, not a multiple of 3 x head_dim=3'),
        (gpt(NoHeadCount), surgery.AddHeads('h/0/attn', heads=1, qkv='c_attn', out='c_proj', causal=True),
         r'pass head_dim='),
        (gpt(), surgery.AddHeads('h/0/attn', heads=1, qkv='c_proj', out='c_proj', causal=True),
         r'c_proj has 8 output features, not 3 x'),
        (gpt(), surgery.AddHeads('h/0', heads=1, qkv='ln_1', out='attn', causal=True),
         r'h/0/ln_1 is a flax\.nnx\..*LayerNorm; a fused qkv projection is an nnx\.Linear'),
        (gpt(), surgery.AddHeads('h/0/attn', heads=1, qkv='c_attn', out='c_fc', causal=True),
         r"h/0/attn is a .*FusedAttention without a 'c_fc' projection"),
    ]
    for model, op, message in cases:
        with pytest.raises(surgery.SurgeryError, match=r'AddHeads\(h/0.*' + message) as info:
            nnx_surgery.grow(model, op, rngs=nnx.Rngs(1))
        one_line(info)


# ---------------------------------------------------------------------------------------------
# 3. InsertAfter: checked on a sample


def test_inserting_a_block_that_holds_its_own_residual_sum_as_a_residual_branch_is_an_error():
    with pytest.raises(surgery.SurgeryError, match=r'InsertAfter\(h/1, block=make_block\): the inserted block does '
                                                   r'not start as the identity \(max \|difference\| [0-9.]+\).*'
                                                   r'residual=False and zero=') as info:
        nnx_surgery.grow(gpt(), surgery.InsertAfter('h/1', block=make_block), rngs=nnx.Rngs(1), sample=(TOKENS,))
    one_line(info)
    # Said right: its own residual branches end at zero, and the model computes what it did.
    op = surgery.InsertAfter('h/1', block=make_block, residual=False, zero='(attn/c_proj|mlp/proj)')
    grown = nnx_surgery.grow(gpt(), op, rngs=nnx.Rngs(1), sample=(TOKENS,))
    np.testing.assert_allclose(grown(TOKENS), gpt()(TOKENS), atol=1e-5)


def test_insert_after_and_preserving_the_function_need_a_sample_to_check_it_on():
    for kwargs, ops in (({}, [surgery.InsertAfter('h/1', block=make_block)]),
                        ({'preserve_function': True}, [surgery.LoRA('lm_head', rank=2)])):
        with pytest.raises(surgery.SurgeryError, match=r'nnx_surgery\.grow: .*pass sample=\(inputs,\)') as info:
            nnx_surgery.grow(gpt(), ops, rngs=nnx.Rngs(1), **kwargs)
        one_line(info)


def test_an_inserted_block_that_cannot_train_is_an_error():
    with pytest.raises(surgery.SurgeryError, match=r'InsertAfter\(fc2, block=relu_block\): fc2/inserted/layers/2 '
                                                   r'starts at zero but gets no gradient.*flat part of an activation '
                                                   r'\(e\.g\. ReLU at 0\).*zero=') as info:
        nnx_surgery.grow(ReluMLP(rngs=nnx.Rngs(0)), surgery.InsertAfter('fc2', block=relu_block), rngs=nnx.Rngs(1),
                         sample=(FEATURES,))
    one_line(info)


def test_a_preserving_operation_that_does_not_preserve_is_named():
    model = ReluMLP(rngs=nnx.Rngs(0))  # fc2 reads ReLU features (>= 0), head reads fc2's (of either sign)
    ops = [surgery.LoRA('fc1', rank=2), surgery.Deepen('fc2', units=WIDTH), surgery.Deepen('head', units=WIDTH)]
    with pytest.raises(surgery.SurgeryError, match=r'Deepen\(head, units=8\): .*does not keep the function '
                                                   r'\(max \|difference\| [0-9.]+\).*activation=None') as info:
        nnx_surgery.grow(model, ops, rngs=nnx.Rngs(1), preserve_function=True, sample=(FEATURES,))
    one_line(info)
    ops[-1] = surgery.Deepen('head', units=WIDTH, activation=None)
    grown = nnx_surgery.grow(model, ops, rngs=nnx.Rngs(1), preserve_function=True, sample=FEATURES)  # one argument
    np.testing.assert_allclose(grown(FEATURES), model(FEATURES), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 4. reinit


def test_a_reinit_pattern_that_matches_nothing_is_an_error():
    with pytest.raises(surgery.SurgeryError, match=r"reinit: '\^haed/' matches no parameter.*head/kernel") as info:
        nnx_surgery.grow(ReluMLP(rngs=nnx.Rngs(0)), surgery.LoRA('fc1', rank=2), rngs=nnx.Rngs(1),
                         reinit=['^fc2/', '^haed/'])
    one_line(info)


# ---------------------------------------------------------------------------------------------
# 5. report and check_function


def test_report_says_what_was_copied_new_and_reinitialised_and_checks_the_function():
    model = ReluMLP(rngs=nnx.Rngs(0))
    ops = [surgery.Widen('fc1', units=4, into='fc2'), surgery.LoRA('head', rank=2)]
    grown = nnx_surgery.grow(model, ops, rngs=nnx.Rngs(1))
    report = nnx_surgery.report(model, grown, FEATURES)
    assert isinstance(report, surgery.Report)
    assert report.modules['fc1'] == {'copied': ['bias', 'kernel']}
    assert report.modules['fc1/plus'] == {'new': ['bias', 'kernel']}
    assert report.modules['fc2/norm'] == {'new': ['scale_0', 'scale_1']}
    assert report.modules['head'] == {'copied': ['bias', 'kernel'], 'new': ['lora_a', 'lora_b']}
    assert report.matches == {'Widen(fc1, units=4, into=fc2)': ['fc1', 'fc2'], 'LoRA(head, rank=2)': ['head']}
    assert report.max_abs_difference == 0.0  # Widen switched off, LoRA on: the pretrained function
    assert report.grown_difference > 1e-3 and report.changes_function == ('Widen(fc1, units=4, into=fc2)',)
    assert 'max |difference|' in str(report)

    reinit = nnx_surgery.grow(model, surgery.Deepen('head', units=12), rngs=nnx.Rngs(1), reinit='^head/')
    report = nnx_surgery.report(model, reinit, FEATURES, reinit='^head/')
    assert report.modules['head'] == {'reinitialised': ['bias', 'kernel']}
    assert report.modules['head/fc_a'] == {'new': ['bias', 'kernel']}
    assert report.max_abs_difference is None  # re-initialised leaves differ by design


def test_check_function_catches_a_leaf_in_the_wrong_place():
    model = ReluMLP(rngs=nnx.Rngs(0))
    grown = nnx_surgery.grow(model, [surgery.Widen('fc1', units=4, into='fc2'), surgery.LoRA('fc2', rank=2)],
                             rngs=nnx.Rngs(1), preserve_function=True, sample=(FEATURES,))
    assert nnx_surgery.check_function(model, grown, FEATURES) <= 1e-5
    # fc2's kernel transposed by a mistaken conversion: the same shape, so no graft would complain.
    grown.fc2.kernel[...] = grown.fc2.kernel[...].T
    with pytest.raises(surgery.SurgeryError, match=r'differs from the pretrained model by [0-9.]+ \(> atol=1e-05\)'
                       ) as info:
        nnx_surgery.check_function(model, grown, FEATURES)
    one_line(info)
    with pytest.raises(surgery.SurgeryError, match='differs from the pretrained model'):
        nnx_surgery.report(model, grown, FEATURES)
