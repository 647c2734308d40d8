"""Hurried mistakes with linen surgery end in a clear error or a right result, never a silently wrong
model (issue 20). Each test here failed on the code before its fix (see the commit messages)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import growjax
from growjax import surgery

TOKENS = jax.random.randint(jax.random.key(0), (2, 8), 0, 40)


def later_token_changed(tokens, at=5):
    return tokens.at[:, at:].set((tokens[:, at:] + 7) % 40)


def causal_attention(q, k, v):
    """[B, T, H, D] -> [B, T, H, D], masking future positions inside (as nanoGPT does)."""
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(q.shape[-1])
    keep = jnp.tril(jnp.ones((q.shape[1], q.shape[1]), bool))
    return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(jnp.where(keep, scores, -1e9), axis=-1), v)


class NanoAttention(nn.Module):
    """nanoGPT's CausalSelfAttention: one fused c_attn split into q, k, v; the causal mask built inside."""
    n_head: int = 2

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        q, k, v = jnp.split(nn.Dense(3 * width, name='c_attn')(x), 3, axis=-1)
        heads = lambda t: t.reshape(*t.shape[:-1], self.n_head, width // self.n_head)
        y = causal_attention(heads(q), heads(k), heads(v))
        return nn.Dense(width, name='c_proj')(y.reshape(x.shape))


class TimmAttention(nn.Module):
    """timm's Attention: qkv reshaped to (B, N, 3, heads, head_dim), no mask, `proj` out."""
    num_heads: int = 2

    @nn.compact
    def __call__(self, x):
        batch, length, width = x.shape
        qkv = nn.Dense(3 * width, name='qkv')(x).reshape(batch, length, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        weights = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(q.shape[-1]), axis=-1)
        y = jnp.einsum('bhqk,bkhd->bqhd', weights, v)
        return nn.Dense(width, name='proj')(y.reshape(x.shape))


class SplitAttention(nn.Module):
    """A user's attention with separate q/k/v Dense projections and the causal mask built inside."""
    num_heads: int = 2

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        heads = lambda t: t.reshape(*t.shape[:-1], self.num_heads, width // self.num_heads)
        q, k, v = (heads(nn.Dense(width, name=name)(x)) for name in ('query', 'key', 'value'))
        return nn.Dense(width, name='out')(causal_attention(q, k, v).reshape(x.shape))


class Block(nn.Module):
    """A pre-LN transformer block: it holds its own residual sums."""
    attention: type = NanoAttention

    @nn.compact
    def __call__(self, x):
        x = x + self.attention(name='attn')(nn.LayerNorm(name='ln_1')(x))
        h = nn.gelu(nn.Dense(4 * x.shape[-1], name='fc')(nn.LayerNorm(name='ln_2')(x)))
        return x + nn.Dense(x.shape[-1], name='proj')(h)


class LM(nn.Module):
    attention: type = NanoAttention
    depth: int = 2

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(40, 16, name='wte')(tokens)
        for i in range(self.depth):
            x = Block(self.attention, name=f'h_{i}')(x)
        return nn.Dense(40, name='lm_head')(nn.LayerNorm(name='ln_f')(x))


@pytest.fixture(scope='module')
def lm():
    model = LM()
    return model, model.init(jax.random.key(1), TOKENS)


def grow(model, pretrained, ops, *, preserve=False, **kwargs):
    grown_model = surgery.grow(model, ops)
    return grown_model, growjax.grow_params(pretrained, grown_model, jax.random.key(2), TOKENS,
                                            preserve_function=preserve, **kwargs)


# ---------------------------------------------------------------------------------------------
# 1. New heads on a causal attention that masks inside


def test_heads_on_an_attention_that_masks_inside_must_be_told_if_it_is_causal():
    model = LM(SplitAttention)
    pretrained = model.init(jax.random.key(1), TOKENS)
    with pytest.raises(surgery.SurgeryError, match=r'AddHeads\(h_0/attn.*without a mask.*causal=True'):
        grow(model, pretrained, [surgery.AddHeads('h_0/attn', heads=2)])
    grown_model, grown = grow(model, pretrained, [surgery.AddHeads('h_0/attn', heads=2, causal=True)])
    before, after = grown_model.apply(grown, TOKENS), grown_model.apply(grown, later_token_changed(TOKENS))
    np.testing.assert_allclose(before[:, :5], after[:, :5], atol=1e-6)


def test_flax_attention_without_a_mask_stays_bidirectional():
    class Encoder(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            x = nn.Embed(40, 16)(tokens)
            return nn.MultiHeadDotProductAttention(num_heads=2, name='attn')(x)

    model = Encoder()
    pretrained = model.init(jax.random.key(1), TOKENS)
    grown_model, grown = grow(model, pretrained, [surgery.AddHeads('attn', heads=1)])
    before, after = grown_model.apply(grown, TOKENS), grown_model.apply(grown, later_token_changed(TOKENS))
    assert not np.allclose(before[:, :5], after[:, :5])  # an encoder's new heads see every position


# ---------------------------------------------------------------------------------------------
# Fused q/k/v projections


@pytest.mark.parametrize('attention, op', [
    (NanoAttention, surgery.AddHeads('h_.*/attn', heads=2, qkv='c_attn', out='c_proj', causal=True)),
    (TimmAttention, surgery.AddHeads('h_.*/attn', heads=1, qkv='qkv', out='proj', causal=False)),
])
def test_heads_on_a_fused_qkv_attention(attention, op):
    model = LM(attention)
    pretrained = model.init(jax.random.key(1), TOKENS)
    grown_model, grown = grow(model, pretrained, [op], preserve=True)
    np.testing.assert_allclose(surgery.grow(model, [op], preserve_function=True).apply(grown, TOKENS),
                               model.apply(pretrained, TOKENS), atol=1e-5)
    grown_model, grown = grow(model, pretrained, [op])
    head_dim = 8
    assert grown['params']['h_1']['attn']['extra_heads']['query']['kernel'].shape == (16, op.heads, head_dim)
    before, after = grown_model.apply(grown, TOKENS), grown_model.apply(grown, later_token_changed(TOKENS))
    assert not np.allclose(before, model.apply(pretrained, TOKENS), atol=1e-3)  # the new heads take part
    assert np.allclose(before[:, :5], after[:, :5], atol=1e-6) == op.causal


def test_a_fused_layout_it_cannot_read_is_refused(lm):
    model, pretrained = lm
    with pytest.raises(surgery.SurgeryError, match=r"c_attn has 48 output features.*head_dim="):
        grow(model, pretrained, [surgery.AddHeads('h_0/attn', heads=1, qkv='c_attn', out='c_proj', causal=True,
                                                  head_dim=5)])
    with pytest.raises(surgery.SurgeryError, match=r"must call its 'qkv' projection before 'c_proj'"):
        grow(model, pretrained, [surgery.AddHeads('h_0/attn', heads=1, qkv='qkv', out='c_proj', causal=True)])


# ---------------------------------------------------------------------------------------------
# 2, 3. Inserted blocks: the identity at first, and alive


def test_a_block_with_its_own_residual_inserted_as_a_residual_branch_is_refused(lm):
    model, pretrained = lm
    op = surgery.InsertAfter('h_1', block=lambda: Block())  # residual=True, but Block adds x itself
    with pytest.raises(surgery.SurgeryError, match=r'InsertAfter\(h_1.*does not start as the identity.*residual=False'):
        grow(model, pretrained, [op])
    with pytest.raises(surgery.SurgeryError, match=r'InsertAfter\(h_1'):  # the guarantee names the op at fault
        grow(model, pretrained, [surgery.Widen('h_0/fc', units=4, into='h_0/proj', activation=nn.gelu), op],
             preserve=True)
    fixed = surgery.InsertAfter('h_1', block=lambda: Block(), residual=False, zero='attn/c_proj|proj')
    grown_model, grown = grow(model, pretrained, [fixed])
    np.testing.assert_allclose(grown_model.apply(grown, TOKENS), model.apply(pretrained, TOKENS), atol=1e-5)


class ReluLast(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(x.shape[-1], name='out')(nn.Dense(32, name='hidden')(x)))


class ReluInside(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(x.shape[-1], name='out')(nn.relu(nn.Dense(32, name='hidden')(x)))


def test_an_inserted_block_whose_zeroed_layer_feeds_relu_is_refused_as_dead(lm):
    model, pretrained = lm
    with pytest.raises(surgery.SurgeryError, match=r'InsertAfter\(h_0.*h_0_inserted/out.*no gradient.*ReLU'):
        grow(model, pretrained, [surgery.InsertAfter('h_0', block=ReluLast)])
    # its last layer after the activation: the zeroed layer gets a gradient, the block trains
    grown_model, grown = grow(model, pretrained, [surgery.InsertAfter('h_0', block=ReluInside)])
    np.testing.assert_allclose(grown_model.apply(grown, TOKENS), model.apply(pretrained, TOKENS), atol=1e-5)
    assert not grown['params']['h_0_inserted']['out']['kernel'].any()


# ---------------------------------------------------------------------------------------------
# 4. reinit patterns that match nothing


def test_a_reinit_pattern_that_matches_no_leaf_is_an_error(lm):
    model, pretrained = lm
    with pytest.raises(growjax.GraftError, match=r"reinit pattern '\^lm_haed/' matches no pretrained leaf.*lm_head"):
        grow(model, pretrained, [surgery.LoRA('h_0/fc', rank=2)], reinit='^lm_haed/')
    with pytest.raises(growjax.GraftError, match=r"'\^lm_haed/' matches no"):
        growjax.param_labels(pretrained['params'], pretrained['params'], reinit='^lm_haed/')


# ---------------------------------------------------------------------------------------------
# 5. Two rounds, grafted from the wrong round


def test_round_two_grafted_from_round_zero_variables_is_an_error(lm):
    model, pretrained = lm
    round1_model, round1 = grow(model, pretrained, [surgery.Widen('h_0/fc', units=4, into='h_0/proj',
                                                                   activation=nn.gelu)])
    round2_model = surgery.grow(round1_model, [surgery.LoRA('h_1/fc', rank=2)])
    with pytest.raises(growjax.GraftError, match=r'round 1.*h_0/fc/plus/kernel.*trained'):
        growjax.grow_params(pretrained, round2_model, jax.random.key(3), TOKENS)
    round2 = growjax.grow_params(round1, round2_model, jax.random.key(3), TOKENS)  # the right tree
    np.testing.assert_array_equal(round2['params']['h_0']['fc']['plus']['kernel'],
                                  round1['params']['h_0']['fc']['plus']['kernel'])
    fresh = growjax.grow_params(pretrained, round2_model, jax.random.key(3), TOKENS, reinit='h_0/(fc/plus|proj/)')
    assert 'plus' in fresh['params']['h_0']['fc']  # started fresh, on purpose


# ---------------------------------------------------------------------------------------------
# 6. What report checked


def test_report_says_which_model_it_checked_and_that_norm_scale_changes_the_function(lm):
    model, pretrained = lm
    op = surgery.Widen('h_0/fc', units=4, into='h_0/proj', activation=nn.gelu)
    grown_model, grown = grow(model, pretrained, [op])
    report = surgery.report(grown_model, pretrained, grown, TOKENS)
    assert report.max_abs_difference <= 1e-5
    assert report.grown_difference > 1e-3
    assert report.changes_function == (surgery.describe(op),)
    text = str(report)
    assert 'function-preserving variant' in text and 'not the model as grown' in text
    assert 'the model as grown' in text and 'Widen(h_0/fc' in text


# ---------------------------------------------------------------------------------------------
# preserve_function: one step, and a guarantee


def test_preserve_function_in_one_step(lm):
    model, pretrained = lm
    ops = [surgery.Widen('h_0/fc', units=4, into='h_0/proj', activation=nn.gelu),
           surgery.AddHeads('h_1/attn', heads=1, qkv='c_attn', out='c_proj', causal=True)]
    grown_model = surgery.grow(model, ops, preserve_function=True)
    grown = growjax.grow_params(pretrained, grown_model, jax.random.key(2), TOKENS)
    np.testing.assert_allclose(grown_model.apply(grown, TOKENS), model.apply(pretrained, TOKENS), atol=1e-5)
    # the two-step way, forgetting the second step: a one-line error saying what to apply
    plain = surgery.grow(model, ops)
    variables = growjax.grow_params(pretrained, plain, jax.random.key(2), TOKENS, preserve_function=True)
    with pytest.raises(surgery.SurgeryError, match=r'preserve_function=True.*surgery.grow\(model, ops, '
                                                   r'preserve_function=True\)') as info:
        plain.apply(variables, TOKENS)
    assert len(str(info.value).splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# Confusing errors made clear


def test_grow_opt_state_given_variables_instead_of_params(lm):
    model, pretrained = lm
    grown_model, grown = grow(model, pretrained, [surgery.LoRA('h_0/fc', rank=2)])
    state = optax.adamw(1e-3).init(pretrained['params'])
    with pytest.raises(growjax.GraftError, match=r"variables\['params'\]") as info:
        growjax.grow_opt_state(state, pretrained, grown)
    assert len(str(info.value).splitlines()) == 1


def test_an_sgd_state_grown_for_adamw_is_named(lm):
    model, pretrained = lm
    grown_model, grown = grow(model, pretrained, [surgery.LoRA('h_0/fc', rank=2)])
    state = optax.sgd(1e-3, momentum=0.9).init(pretrained['params'])
    with pytest.raises(growjax.GraftError, match=r'TraceState.*ScaleByAdamState|sgd.*adam') as info:
        growjax.grow_opt_state(state, pretrained['params'], grown['params'], optimizer=optax.adamw(1e-3))
    assert len(str(info.value).splitlines()) == 1


def test_linen_report_on_an_nnx_model_points_to_nnx_surgery():
    from flax import nnx
    model = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    with pytest.raises(surgery.SurgeryError, match='nnx_surgery.check_function'):
        surgery.check_function(model, {}, model, {}, jnp.ones((1, 4)))
    with pytest.raises(surgery.SurgeryError, match='nnx_surgery.report'):
        surgery.report(model, {}, {}, jnp.ones((1, 4)))


# ---------------------------------------------------------------------------------------------
# One rule for both back-ends (growjax/surgery/ops.py)


class MaskedAttention(nn.Module):
    """timm's way: the mask under another name than `mask`."""
    num_heads: int = 2

    @nn.compact
    def __call__(self, x, attn_mask=None):
        width = x.shape[-1]
        heads = lambda t: t.reshape(*t.shape[:-1], self.num_heads, width // self.num_heads)
        q, k, v = (heads(nn.Dense(width, name=name)(x)) for name in ('query', 'key', 'value'))
        return nn.Dense(width, name='out')(nn.dot_product_attention(q, k, v, mask=attn_mask).reshape(x.shape))


class MaskedLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(40, 16, name='wte')(tokens)
        mask = nn.make_attention_mask(tokens > 0, tokens > 0)
        return nn.Dense(40, name='lm_head')(x + MaskedAttention(name='attn')(x, attn_mask=mask))


def test_a_mask_under_another_name_is_refused_as_in_nnx():
    model = MaskedLM()
    pretrained = model.init(jax.random.key(1), TOKENS)
    with pytest.raises(surgery.SurgeryError, match=r"AddHeads\(attn.*attn is called with attn_mask=, a mask the new "
                                                   r"heads would not apply"):
        grow(model, pretrained, [surgery.AddHeads('attn', heads=1, causal=False)])


def test_a_stacked_copy_changes_the_function_by_design_as_in_nnx(lm):
    """InsertAfter(residual=False) without zero= claims nothing (G_stack): grown, and reported as
    changing the function; under preserve_function it is an error naming it."""
    model, pretrained = lm
    op = surgery.InsertAfter('h_1', block='copy', residual=False)
    grown_model, grown = grow(model, pretrained, [op])
    np.testing.assert_array_equal(grown['params']['h_1_inserted']['fc']['kernel'],
                                  pretrained['params']['h_1']['fc']['kernel'])
    assert surgery.report(grown_model, pretrained, grown, TOKENS).changes_function == (surgery.describe(op),)
    with pytest.raises(surgery.SurgeryError, match=r'InsertAfter\(h_1, residual=False\): .*stacks the block'):
        grow(model, pretrained, [op], preserve=True)


def test_grow_params_under_jit_says_it_cannot_check(lm):
    model, pretrained = lm
    grown_model = surgery.grow(model, [surgery.InsertAfter('h_1', block=lambda: Block())])  # a wrong claim
    jitted = jax.jit(lambda p: growjax.grow_params(p, grown_model, jax.random.key(2), TOKENS))
    with pytest.warns(UserWarning, match='cannot check.*check_growth'):
        variables = jitted(pretrained)
    with pytest.raises(surgery.SurgeryError, match='does not start as the identity'):
        grown_model.check_growth(variables, TOKENS)  # what the warning says to run
