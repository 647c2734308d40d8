"""The experiments' shared vocabulary: settings, method variants and the selection protocol.

Both the experiments (experiments.paper) and their reports (experiments.report) read these;
neither imports the other's internals.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import ml_collections
import numpy as np

from growjax import config_lib, methods


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the experiment runs; `FULL` is the documented run, `QUICK` its smoke version."""
    tasks: tuple[tuple[str, int], ...]  # (dataset, shots per class)
    methods: tuple[str, ...]  # PAPER_METHODS names and 'lora' (both ranks)
    regimes: tuple[str, ...]
    seeds: int  # seeds 0 .. seeds-1, paired across methods
    sweep_seeds: int  # the first ones select the learning rate
    learning_rates: tuple[float, ...]  # base rates; new leaves train at config.train.new_lr_multiplier x
    steps: int
    batch_size: int
    eval_every: int
    units: int  # S: WA/DWA add S units to fc7, DA's fc_a has S, WWA adds S/2 to fc6 and S to fc7
    lora_small_rank: int  # besides the rank that matches WA's added parameters (0: none)


@dataclasses.dataclass(frozen=True)
class Variant:
    """A growjax method (growjax.methods) run with some config overrides, e.g. LoRA at rank 4."""
    name: str  # results key
    method: str  # a growjax.methods name
    overrides: tuple[tuple[str, object], ...] = ()  # growjax config keys, e.g. (('growth.units', 128),)
    label_suffix: str = ''

    @property
    def label(self) -> str:
        return methods.METHODS[self.method].label + self.label_suffix

    @property
    def pretrained(self) -> bool:
        return methods.METHODS[self.method].pretrained

    @property
    def grows(self) -> bool:
        return methods.METHODS[self.method].grows

    def config(self, base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        config = base.copy_and_resolve_references()
        config.growth.method = self.method
        if not self.pretrained:
            config.init.pretrained = ''
        for key, value in self.overrides:
            section, field = key.split('.')
            config[section][field] = value
        config_lib.validate(config)
        return config


# ---------------------------------------------------------------------------------------------
# The protocol: sweep, select on validation, report test


def validation_scores(runs: Sequence[dict], sweep_seeds: Sequence[int], rates: Sequence[float] | None = None
                      ) -> dict[float, float]:
    """{rate: mean final validation accuracy over the sweep seeds}, only `rates` when given."""
    scores = {}
    for run in runs:
        if run['seed'] in sweep_seeds and (rates is None or run['learning_rate'] in rates):
            scores.setdefault(run['learning_rate'], []).append(run['validation'][-1]['accuracy'])
    return {lr: float(np.mean(values)) for lr, values in scores.items()}


def select_learning_rate(runs: Sequence[dict], sweep_seeds: Sequence[int], rates: Sequence[float] | None = None
                         ) -> float:
    """The rate with the best mean final validation accuracy over the sweep seeds (ties: the lower);
    only among `rates` when given (runs at other rates, e.g. kept from another sweep, are ignored)."""
    return best_rate(validation_scores(runs, sweep_seeds, rates))


def best_rate(scores: dict[float, float]) -> float:
    """The rate of the best score (ties: the lower rate)."""
    return min(scores, key=lambda lr: (-scores[lr], lr))


# Rates a sweep widens into (experiments.map): a rate chosen at an edge of the rates tried is not known
# to be the best, so the sweep seeds also run the ladder's next rate beyond it, until the chosen rate
# has a worse rate tried on each side, the edge is a plateau, or the ladder ends.
RATE_LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """The outcome of a (widening) sweep read from stored runs."""
    rates: tuple[float, ...]  # the rates swept, ascending (the base rates and the ladder rates reached)
    chosen: float | None  # None: the base sweep is incomplete
    next_rate: float | None = None  # a rate the sweep seeds must still run (None: the sweep is finished)
    at_edge: bool = False  # chosen at an edge, better than its neighbour, and the ladder ends there
    plateau: bool = False  # chosen at an edge that ties its neighbour on validation: widening stopped


def sweep(runs: Sequence[dict], sweep_seeds: Sequence[int], rates: Sequence[float],
          ladder: Sequence[float] = ()) -> Sweep:
    """Replays the sweep on `runs`: select among `rates`; while the choice is at an edge and strictly
    better than its neighbour, add the `ladder`'s next rate beyond it (when the sweep seeds have run
    it; else it is `next_rate`). A tie with the neighbour (a flat validation curve) ends the widening:
    ties go to the lower rate, so otherwise a plateau would walk the sweep to the ladder's end.

    The same runs always give the same answer, so a group that was interrupted, or that holds runs at
    other rates (another method's shared rate), is read exactly as the sweep that made it.
    """
    rates, ladder = sorted({float(r) for r in rates}), sorted(float(r) for r in ladder)
    have = {(r['seed'], r['learning_rate']) for r in runs}
    if any((seed, lr) not in have for seed in sweep_seeds for lr in rates):
        return Sweep(tuple(rates), None)
    while True:
        scores = validation_scores(runs, sweep_seeds, rates)
        chosen = best_rate(scores)
        if len(rates) == 1 or chosen not in (rates[0], rates[-1]):
            return Sweep(tuple(rates), chosen)
        low = chosen == rates[0]
        if scores[chosen] == scores[rates[1] if low else rates[-2]]:
            return Sweep(tuple(rates), chosen, plateau=True)
        beyond = [r for r in ladder if r < rates[0]][-1:] if low else [r for r in ladder if r > rates[-1]][:1]
        if not beyond:
            return Sweep(tuple(rates), chosen, at_edge=True)
        if any((seed, beyond[0]) not in have for seed in sweep_seeds):
            return Sweep(tuple(rates), chosen, next_rate=beyond[0])
        rates = sorted([*rates, beyond[0]])


def run_protocol(trainer, shots: int, settings: Settings, *, runs: Sequence[dict] = (),
                 extra_rates: Sequence[float] = (), run_kwargs: dict | None = None, saved=None,
                 ladder: Sequence[float] = ()) -> dict:
    """Runs one (method, regime, task): the sweep, the selection, the remaining seeds at the chosen rate.

    A vectorised trainer runs the full seeds x rates grid in one go (cheaper than two compiles);
    the selection still reads only the sweep seeds, so every method is chosen the same way.

    Beyond that (the growth map, experiments.map): `runs` already done are reused, by (seed,
    learning rate), and only the missing ones trained; `extra_rates` are rates every seed runs at
    besides the chosen one (a shared-rate protocol: another method's chosen rate); `run_kwargs` go
    to every `trainer.run` (e.g. num_steps); `saved(group)` is called after each batch of new runs,
    so an interrupted group resumes where it stopped; `ladder` widens the sweep (see `sweep`).
    """
    seeds = list(range(settings.seeds))
    sweep_seeds = seeds[:settings.sweep_seeds]
    first = seeds if trainer.vectorised else sweep_seeds
    done = {(r['seed'], r['learning_rate']): r for r in runs}

    def ensure(block_seeds, rates):
        missing = [(seed, lr) for seed in block_seeds for lr in rates if (seed, float(lr)) not in done]
        if not missing:
            return
        if len(missing) == len(block_seeds) * len(rates):
            calls = [(list(block_seeds), list(rates))]  # the whole block in one call
        elif trainer.vectorised:
            calls = [(sorted({s for s, _ in missing}), sorted({lr for _, lr in missing}))]
        else:
            calls = [([seed], [lr]) for seed, lr in missing]
        for call_seeds, call_rates in calls:
            for run in trainer.run(shots, call_seeds, call_rates, **(run_kwargs or {})):
                run = run.to_json()
                done.setdefault((run['seed'], run['learning_rate']), run)  # a stored run is kept as it was
            if saved is not None:
                saved({'chosen_lr': None, 'runs': list(done.values())})

    ensure(first, settings.learning_rates)
    asked = set()
    while (swept := sweep(list(done.values()), sweep_seeds, settings.learning_rates, ladder)).next_rate is not None:
        if swept.next_rate in asked:  # its runs came back at another rate: widening would never end
            raise RuntimeError(f'the sweep asked twice for rate {swept.next_rate}: the trainer returned runs at '
                               'other rates.')
        asked.add(swept.next_rate)
        ensure(sweep_seeds, [swept.next_rate])
    chosen = swept.chosen
    ensure([seed for seed in seeds if (seed, chosen) not in done], [chosen])  # one call for the missing seeds
    extra = [float(lr) for lr in dict.fromkeys(extra_rates) if float(lr) != chosen]
    if extra:
        ensure(seeds, extra)
    return {'chosen_lr': chosen, 'rates': list(swept.rates), 'runs': list(done.values())}


def chosen_runs(group: dict) -> list[dict]:
    return sorted((r for r in group['runs'] if r['learning_rate'] == group['chosen_lr']), key=lambda r: r['seed'])


# ---------------------------------------------------------------------------------------------
# Runs that collapsed: a diverged or chance-level run is not a measurement of its method


def chance_limit(num_classes: int, test_examples: int) -> float:
    """The test accuracy at or below which a run is indistinguishable from guessing: chance (1 / classes)
    plus three binomial standard deviations over the test split."""
    p = 1 / num_classes
    return p + 3 * math.sqrt(p * (1 - p) / test_examples)


def collapsed(run: dict, accuracy_limit: float, num_classes: int) -> bool:
    """Whether the run diverged or ended at chance: a non-finite training loss, a final training loss at
    or above log(classes) (it fits its training data no better than a uniform guess: a run that blew
    up and landed a little above chance on test), or a test accuracy at most `accuracy_limit`."""
    losses = run['train_loss']
    if not all(math.isfinite(x) for x in losses):
        return True
    return bool(losses and losses[-1] >= math.log(num_classes)) or run['test']['accuracy'] <= accuracy_limit
