"""growjax's byte-level GPT (growjax.models.gpt), trained and grown during training by the LM job
(growjax.lm_train): its defaults, and how growth applies to it.

Growth is growjax.expand's, between two sizes of the same GPT: width by duplication (heads grow,
head_dim stays), new blocks on top that start as the identity because the last layer of each of
their residual branches ('attn/out', 'mlp/fc2') starts at zero (ZERO). The fine-tune methods of
growjax.methods do not apply (growth is empty): a GPT has no pretrained-then-grown job here.
Published weights: none are read (growjax.pretrained converts image models only).
"""
from __future__ import annotations

import ml_collections

from growjax import lm_train
from growjax.families.base import Family

ZERO = r'block_\d+/(attn/out|mlp/fc2)'  # a new block's residual-branch outputs: zero at growth, so it is the identity


def config() -> ml_collections.ConfigDict:
    """The LM job for a GPT: 2 blocks x 64 wide (2 heads of 32), grown at half the budget to 4 x 128."""
    c = lm_train.base_config()
    c.model.name = 'gpt'
    c.growth.zero = ZERO
    return c


class GPTs(Family):
    models = ('gpt',)
    label = 'GPTs'
    job = staticmethod(lm_train.train_and_evaluate)


FAMILY = GPTs()
