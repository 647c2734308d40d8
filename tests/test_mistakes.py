"""docs/mistakes.md, kept honest: every row's mistake is made here and must end in the error the
row quotes, in one line; every mistake here has its row."""
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import growjax
from growjax import nnx_surgery, surgery
from test_surgery_trust import LM, TOKENS, Block, ReluLast, SplitAttention

TABLE = pathlib.Path(__file__).parents[1] / 'docs' / 'mistakes.md'
KEY = jax.random.key(2)


def rows() -> dict[str, str]:
    """{row id: the quoted error excerpt} from the table's rows `| id | mistake | `excerpt` |`."""
    found = {}
    for line in TABLE.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip('|').split('|')]
        if len(cells) == 3 and re.fullmatch(r'`[a-z0-9_]+`', cells[0]):
            found[cells[0].strip('`')] = re.fullmatch(r'`(.+)`', cells[2]).group(1)
    return found


def lm(attention=Block.attention):
    model = LM(attention)
    return model, model.init(jax.random.key(1), TOKENS)


def linen_grow(ops, model_and_vars=None, **kwargs):
    model, pretrained = model_and_vars or lm()
    return growjax.grow_params(pretrained, surgery.grow(model, ops), KEY, TOKENS, **kwargs)


def causal_unknown():
    linen_grow([surgery.AddHeads('h_0/attn', heads=2)], lm(SplitAttention))


def fused_qkv_undeclared():
    linen_grow([surgery.AddHeads('h_0/attn', heads=2, causal=True)])


def residual_block_as_branch():
    linen_grow([surgery.InsertAfter('h_1', block=Block)])


def dead_inserted_block():
    linen_grow([surgery.InsertAfter('h_0', block=ReluLast)])


def reinit_typo():
    linen_grow([surgery.LoRA('h_0/fc', rank=2)], reinit='^lm_haed/')


def wrong_round():
    model, pretrained = lm()
    round1 = surgery.grow(model, [surgery.Widen('h_0/fc', units=4, into='h_0/proj', activation=nn.gelu)])
    round2 = surgery.grow(round1, [surgery.LoRA('h_1/fc', rank=2)])
    growjax.grow_params(pretrained, round2, KEY, TOKENS)


def preserve_in_two_steps():
    model, pretrained = lm()
    grown_model = surgery.grow(model, [surgery.Widen('h_0/fc', units=4, into='h_0/proj', activation=nn.gelu)])
    variables = growjax.grow_params(pretrained, grown_model, KEY, TOKENS, preserve_function=True)
    grown_model.apply(variables, TOKENS)


def pattern_typo():
    linen_grow([surgery.Widen('h_0/fc1', units=4, into='h_0/proj')])


def params_without_collection():
    model, pretrained = lm()
    growjax.grow_params(pretrained['params'], surgery.grow(model, [surgery.LoRA('h_0/fc', rank=2)]), KEY, TOKENS)


def opt_state_of_variables():
    model, pretrained = lm()
    grown = linen_grow([surgery.LoRA('h_0/fc', rank=2)])
    growjax.grow_opt_state(optax.adamw(1e-3).init(pretrained['params']), pretrained, grown)


def sgd_state_for_adamw():
    model, pretrained = lm()
    grown = linen_grow([surgery.LoRA('h_0/fc', rank=2)])
    growjax.grow_opt_state(optax.sgd(1e-3, momentum=0.9).init(pretrained['params']), pretrained['params'],
                           grown['params'], optimizer=optax.adamw(1e-3))


def linen_report_on_nnx():
    model = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    surgery.report(model, {}, {}, jnp.ones((1, 4)))


class NnxMlp(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(8, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x)))


def nnx_insert_without_sample():
    nnx_surgery.grow(NnxMlp(nnx.Rngs(0)), [surgery.InsertAfter('fc1', block=lambda rngs: nnx.Linear(16, 16, rngs=rngs))],
                     rngs=nnx.Rngs(1))


MISTAKES = {fn.__name__: fn for fn in (
    causal_unknown, fused_qkv_undeclared, residual_block_as_branch, dead_inserted_block, reinit_typo, wrong_round,
    preserve_in_two_steps, pattern_typo, params_without_collection, opt_state_of_variables, sgd_state_for_adamw,
    linen_report_on_nnx, nnx_insert_without_sample)}


def test_every_mistake_has_its_row_and_every_row_its_mistake():
    assert sorted(rows()) == sorted(MISTAKES)


@pytest.mark.parametrize('name', sorted(MISTAKES))
def test_the_mistake_ends_in_the_error_its_row_quotes(name):
    with pytest.raises(growjax.errors.UserError) as info:
        MISTAKES[name]()
    message = str(info.value)
    assert rows()[name] in message
    assert len(message.splitlines()) == 1, message
