"""The paper's protocol on growjax's ViT, pretrained on the built-in Latin letters.

    python -m experiments.vit --workdir=workdirs/vit             # ~30 min on 2 CPU cores
    python -m experiments.vit --workdir=/tmp/vit_quick --quick   # smoke run

Fine-tuning, WA (the top block's MLP widened) with and without NormScale, DA (a new block on top,
the identity at first), more attention heads, and LoRA on every attention projection (at the rank
that matches WA's added parameters), under the regimes new / top block and up /
all, on few-shot Greek letters and digits, with the CNN experiment's protocol (experiments.paper:
paired seeds, a learning-rate sweep per method chosen on validation, test reported). The
section it writes into docs/results.md (between its markers) is kept when the CNN experiment
rewrites the rest of the file, and the other way round.
"""
from __future__ import annotations

import dataclasses
import sys

from growjax import config_lib

from experiments import paper, report
from experiments.protocol import Settings

_BASE = config_lib.family_config('vit')
TOP_BLOCK = f'block{_BASE.model.vit.depth - 1}_new'
REGIMES = ('new', TOP_BLOCK, 'all')

FULL = Settings(
    tasks=(('growjax_greek', 1), ('growjax_greek', 2), ('growjax_digits', 2)),
    methods=('scratch', 'finetune', 'wa_ori', 'wa', 'da', 'heads', 'lora'), regimes=REGIMES, seeds=5, sweep_seeds=2,
    learning_rates=(0.0003, 0.001, 0.003, 0.01, 0.03), steps=80, batch_size=16, eval_every=20,
    units=_BASE.growth.units, lora_small_rank=0)
QUICK = dataclasses.replace(FULL, tasks=(('growjax_greek', 1),), methods=('finetune', 'wa', 'lora'),
                            regimes=('new', 'all'), seeds=1, sweep_seeds=1, learning_rates=(0.01, 0.03), steps=20,
                            eval_every=10)

VIT = paper.Command('experiments.vit', FULL, QUICK, REGIMES, report.write_vit_section)


if __name__ == '__main__':
    from absl import app
    paper.define_flags(VIT, config_lib.family_config('vit'))
    app.run(lambda argv: sys.exit(paper.main(argv, VIT)))
