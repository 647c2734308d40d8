"""When does growing help? The gain of growth over fine-tuning, mapped (issue 14).

    python -m experiments.map --workdir=workdirs/map                          # every axis (hours)
    python -m experiments.map --workdir=workdirs/map --axes=size --only=growjax_greek --max_minutes=60
    python -m experiments.map --workdir=workdirs/map --report_only            # the report from what is stored
    python -m experiments.map --workdir=/tmp/map_quick --quick                # smoke run, a few minutes

The paper's setting (hundreds of target classes, tens of examples each, a target far from the
source, fc layers 4,096 wide) is not the built-in data's, so instead of one point this command
maps the gain of each growth method over fine-tuning along the axes that separate the two
(`--axes`, each a slice of its own):

- `size`: examples per class (1 .. 50 and the full train split) x target (Greek letters: near;
  handwritten digits: far; letters of other scripts, 131 classes: far and larger) x method
  (WA-grow, NormScale only, WA-ori, DA, WWA, classic LoRA, and WA-grow with NormScale's scales set
  from data). NormScale only is WA-grow's control: its rescaling of the old units without new units.
  Training steps grow with the data (`epochs` over the examples, at least `min_steps`).
- `capacity`: the source model's fc6/fc7 width (its own pretrained source model per width) x
  S, the units WA adds, relative to it.
- `lr`: every seed at every learning rate for a few methods on one cell: the gain at each rate.
- `convergence`: fine-tuning and WA-grow again with twice the steps, at their chosen rates.
- `forgetting` (paper Table 4): the source task's accuracy after fine-tuning on a target, read
  through the pretrained source classifier from the network's old units.
- `continual` (paper Table 8): source -> target A -> target B, growing at each step.
- `gamma` (beyond the paper): the source task's accuracy right after growth, with the source
  classifier kept, for NormScale's constant gamma and for gamma set from data.

Protocols. Every (cell, method) sweeps the same learning rates; the sweep seeds select on the
validation split; a choice at the lowest or highest rate tried widens the sweep along a ladder
(protocol.sweep) until a worse rate was tried on each side of it. Two readings of the same runs: per-method (each method at its own chosen rate)
and shared (every method at the rate chosen for fine-tuning, the paper's one rate for all), so
every seed of every method also runs at fine-tuning's rate. Test accuracy, paired over seeds; a run
that diverged or ended at chance (protocol.collapsed) is labelled and left out of means and tests.

Runs are stored under WORKDIR/runs (one JSON per (cell, method), a fingerprint of everything a
run depends on, runs kept by (seed, learning rate)); an interrupted invocation resumes where it
stopped, and `--max_minutes` ends one after the group it is on. The report (the repository's docs/results.md,
its 'map' section, and docs/figures/map_*.png; with --quick WORKDIR/docs; or --docs=DIR) is written
from whatever is stored, so it can be committed chunk by chunk.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from growjax import config_lib, data, models, train
from growjax.errors import UserError
from growjax.grow import flatten, grow_params, unflatten
from growjax.nn import scales_from_data

import experiments
from experiments import invocations, paper, protocol, runner
from experiments.protocol import Variant

AXES = ('size', 'capacity', 'lr', 'convergence', 'forgetting', 'continual', 'gamma')


@dataclasses.dataclass(frozen=True)
class MapSettings:
    """What the map runs; FULL is the documented run, QUICK its smoke version."""
    tasks: tuple[str, ...]  # target datasets
    sizes: tuple[int, ...]  # examples per class; 0: the whole train split (a size >= the smallest class is the same)
    methods: tuple[str, ...]  # METHODS names; 'finetune' is the reference and always runs first
    seeds: int
    sweep_seeds: int
    learning_rates: tuple[float, ...]  # every sweep's base rates
    rate_ladder: tuple[float, ...]  # rates a sweep widens into while its choice is at an edge (protocol.sweep)
    batch_size: int
    epochs: float  # steps = max(min_steps, ceil(epochs * examples / batch_size))
    min_steps: int
    evaluations: int  # validation evaluations per run besides step 0
    units: int  # S on the size axis (the source model of DEFAULT_WIDTH)
    capacity_cell: tuple[str, int]  # (dataset, shots) of the capacity axis
    widths: tuple[int, ...]  # fc6/fc7 widths of the source models
    ratios: tuple[float, ...]  # S / width for WA-grow
    capacity_ori_ratio: float | None  # WA-ori at this ratio only (None: not run)
    lr_cell: tuple[str, int]  # every seed at every rate here
    lr_methods: tuple[str, ...]
    convergence_factor: int
    convergence_seeds: int
    convergence_methods: tuple[str, ...]
    forgetting_sizes: tuple[int, ...]
    forgetting_methods: tuple[str, ...]
    continual_a: tuple[str, int]  # source -> A -> B
    continual_b: tuple[str, int]
    continual_arms: tuple[str, ...]  # CONTINUAL_ARMS names
    gamma_units: tuple[int, ...]  # S of the step-0 growth of the source model
    gamma_seeds: int
    gamma_variants: tuple[str, ...]  # GAMMA_VARIANTS names


FULL = MapSettings(
    tasks=('growjax_greek', 'growjax_digits', 'growjax_scripts'), sizes=(1, 2, 5, 10, 20, 50, 0),
    methods=('finetune', 'wa', 'normscale', 'wa_ori', 'da', 'wwa', 'lora', 'wa_data'), seeds=5, sweep_seeds=2,
    learning_rates=(0.001, 0.003, 0.01, 0.03), rate_ladder=protocol.RATE_LADDER, batch_size=32, epochs=10, min_steps=60, evaluations=4,
    units=128, capacity_cell=('growjax_scripts', 5), widths=(64, 128, 256, 512, 1024), ratios=(0.125, 0.5, 2.0),
    capacity_ori_ratio=0.5, lr_cell=('growjax_greek', 5), lr_methods=('finetune', 'wa', 'wa_ori', 'wa_data',
                                                                        'wa_data_first'),
    convergence_factor=2, convergence_seeds=3, convergence_methods=('finetune', 'wa', 'normscale'), forgetting_sizes=(5, 20),
    forgetting_methods=('finetune', 'wa', 'wa_ori', 'da', 'wwa', 'lora', 'wa_data'),
    continual_a=('growjax_greek', 20), continual_b=('growjax_scripts', 10),
    continual_arms=('ft_ft', 'ft_wa', 'wa_ft', 'wa_wwa'), gamma_units=(32, 128, 512), gamma_seeds=5,
    gamma_variants=('wa_ori', 'wa', 'wa_data', 'wa_data_first', 'wwa', 'wwa_data'))
# Every axis once, small: the first target (cells given as ('', shots) take it), two sizes, seeds and
# rates, a few steps; units=0 is half the source model's fc width, widths=() the source model's alone.
QUICK = dataclasses.replace(
    FULL, tasks=('growjax_greek',), sizes=(1, 0), methods=('finetune', 'wa', 'normscale', 'wa_data'), seeds=2,
    sweep_seeds=1, learning_rates=(0.003, 0.01), rate_ladder=(0.001, 0.003, 0.01, 0.03), epochs=1, min_steps=6, evaluations=2, units=0,
    capacity_cell=('', 1), widths=(), ratios=(0.25, 0.5), capacity_ori_ratio=None, lr_cell=('', 1),
    lr_methods=('finetune', 'wa'), convergence_seeds=2, forgetting_sizes=(1,), forgetting_methods=('finetune', 'wa'),
    continual_a=('', 1), continual_b=('', 0), continual_arms=('ft_ft', 'wa_wwa'), gamma_units=(16,), gamma_seeds=2,
    gamma_variants=('wa', 'wa_data'))


# ---------------------------------------------------------------------------------------------
# Methods


@dataclasses.dataclass(frozen=True)
class MapMethod:
    """A growjax method (growjax.methods) with its overrides, the regime it trains in, and how its
    NormScale scales start (growjax.nn.scales_from_data mode; '' for the constant scale_init)."""
    name: str
    method: str
    overrides: tuple[tuple[str, Any], ...] = ()
    regime: str = 'all'
    scales: str = ''
    label: str = ''

    @property
    def variant(self) -> Variant:
        return Variant(self.name, self.method, self.overrides)

    def fingerprint(self) -> list:
        return [['growth.method', self.method], *(list(item) for item in self.overrides), ['regime', self.regime],
                ['scales_from_data', self.scales]]


def make_method(name: str, base, units: int, num_classes: int) -> MapMethod:
    """The map's methods by name; S = `units` for the growing ones."""
    s = (('growth.units', units),)
    if name == 'finetune':
        return MapMethod('finetune', 'finetune', label='fine-tune')
    if name == 'wa':
        return MapMethod('wa', 'wa', s, label='WA-grow')
    if name == 'wa_ori':
        return MapMethod('wa_ori', 'wa_ori', s, label='WA-ori')
    if name == 'normscale':  # WA-grow's rescaling of the old units without its new units: the control
        return MapMethod('normscale', 'normscale', label='NormScale only')
    if name == 'da':
        return MapMethod('da', 'da', s, label='DA')
    if name == 'wwa':
        return MapMethod('wwa', 'wwa', s, label='WWA')
    if name == 'lora':
        rank = paper.matched_lora_rank(base, units, num_classes)  # adds about as many parameters as WA
        return MapMethod('lora', 'lora', (('growth.lora_rank', rank),), regime='new', label='LoRA (`new`)')
    if name == 'wa_data':
        return MapMethod('wa_data', 'wa', s, scales='group', label='WA-grow, γ from data')
    if name == 'wa_data_first':
        return MapMethod('wa_data_first', 'wa', s, scales='first', label='WA-grow, γ = old norm')
    raise UserError(f'Unknown map method {name!r}; methods: {list(METHOD_NAMES)}.')


METHOD_NAMES = ('finetune', 'wa', 'normscale', 'wa_ori', 'da', 'wwa', 'lora', 'wa_data', 'wa_data_first')


def sized(method: MapMethod, units: int) -> MapMethod:
    """`method` growing `units` units, named for them (the capacity axis)."""
    overrides = tuple((k, units if k == 'growth.units' else v) for k, v in method.overrides)
    return dataclasses.replace(method, name=f'{method.name}_s{units}', overrides=overrides,
                               label=f'{method.label} S={units}')


# ---------------------------------------------------------------------------------------------
# Cells and their stored groups


def steps_for(settings: MapSettings, examples: int) -> tuple[int, int]:
    """(training steps, evaluation interval) for a run on `examples` training examples."""
    steps = max(settings.min_steps, math.ceil(settings.epochs * examples / settings.batch_size))
    return steps, max(1, math.ceil(steps / settings.evaluations))


@dataclasses.dataclass(frozen=True)
class Cell:
    """A (target, examples per class, source width, method) point of the map, with its training length."""
    dataset: str
    shots: int  # 0: the whole train split
    width: int  # the source model's fc6/fc7 units
    method: MapMethod
    steps: int
    eval_every: int
    tag: str = ''  # a variant of the cell ('x2': the convergence check; 'after_<method>': continual step B)

    def path(self, workdir: str) -> str:
        tag = f'__{self.tag}' if self.tag else ''
        return os.path.join(workdir, 'runs', self.dataset.replace('/', '_'), f'{self.shots}shot', f'fc{self.width}',
                            f'{self.method.name}__{self.method.regime}{tag}.json')


def default_width(base: ml_collections.ConfigDict) -> int:
    """The fc6/fc7 units of the base config's source model."""
    if base.model.fc_width:
        return base.model.fc_width
    return models.get(base.model.name, num_classes=2, width=base.model.width).fc7_units


def fc_base(base: ml_collections.ConfigDict, width: int) -> ml_collections.ConfigDict:
    """The base config with the source model's fc width (the default width as model.fc_width=0, so the
    default source model and its cache are the ones every other command uses)."""
    config = base.copy_and_resolve_references()
    config.model.fc_width = 0 if width == default_width(base) and not base.model.fc_width else width
    return config


def fingerprint(cell: Cell, base, settings: MapSettings, pretrained: str | None) -> dict:
    """Everything a run of the cell depends on (not which seeds and rates ran: runs are kept by those)."""
    config = fc_base(base, cell.width)
    return json.loads(json.dumps({
        'steps': cell.steps, 'eval_every': cell.eval_every, 'batch_size': settings.batch_size, 'shots': cell.shots,
        'method': cell.method.fingerprint(), 'pretrained': pretrained, 'model': paper.model_settings(config),
        'reinit': list(config.init.reinit),
        'data': {k: config.data[k] for k in ('image_size', 'crop_padding', 'mean', 'std')},
        'optimiser': {k: config.train[k] for k in ('momentum', 'weight_decay', 'new_lr_multiplier', 'lr_decay_at')},
        'tag': cell.tag,
    }))


# ---------------------------------------------------------------------------------------------
# The experiment's state: tasks, source models, trainers, stored groups


class Map:
    """Lazily loaded tasks and source models, trainers reused across cells, groups stored on disk."""

    def __init__(self, base: ml_collections.ConfigDict, settings: MapSettings, workdir: str, *,
                 max_seconds: float | None = None, compute: bool = True):
        self.width = default_width(base)  # the source model of the size axis
        self.base, self.settings, self.workdir = base, resolve(settings, self.width), workdir
        self.compute = compute  # False: read stored groups only (the report)
        self.deadline = None if max_seconds is None else time.perf_counter() + max_seconds
        self._tasks: dict[str, runner.Task] = {}
        self._sources: dict[int, dict] = {}
        self._trainers: dict[tuple, runner.Trainer] = {}
        self.computed = 0
        self.compute_seconds = 0.0
        self.stopped = False  # --max_minutes reached

    # -- data and models

    def task(self, dataset: str) -> runner.Task:
        if dataset not in self._tasks:
            self._tasks[dataset] = runner.load_task(self.base, dataset)
        return self._tasks[dataset]

    def class_counts(self, dataset: str) -> np.ndarray:
        return np.bincount(self.task(dataset).train.labels)

    def sizes(self, dataset: str, sizes: Iterable[int]) -> list[int]:
        """The sizes that differ for this dataset: one at or above its smallest class is the whole split (0)."""
        smallest = int(self.class_counts(dataset).min())
        return list(dict.fromkeys(0 if s == 0 or s >= smallest else s for s in sizes))

    def size(self, dataset: str, shots: int) -> int:
        """`shots` as the map stores it for this dataset (see sizes)."""
        return self.sizes(dataset, [shots])[0]

    def chance(self, dataset: str) -> dict:
        """What protocol.collapsed reads for runs on `dataset`: {'chance_limit': test accuracy at or below
        which a run collapsed, 'num_classes'}; the report puts it on every group it reads."""
        task = self.task(dataset)
        return {'chance_limit': protocol.chance_limit(task.num_classes, len(task.test.labels)),
                'num_classes': task.num_classes}

    def examples(self, dataset: str, shots: int) -> int:
        counts = self.class_counts(dataset)
        return int(counts.sum()) if shots == 0 else shots * len(counts)

    def cell(self, dataset: str, shots: int, method: MapMethod, width: int | None = None, factor: int = 1,
             tag: str = '') -> Cell:
        steps, every = steps_for(self.settings, self.examples(dataset, shots))
        return Cell(dataset, shots, self.width if width is None else width, method, steps * factor, every * factor,
                    tag)

    def source_dir(self, width: int) -> str:
        config = fc_base(self.base, width)
        return train.builtin_pretrained_dir(config) if config.init.pretrained == 'builtin' else config.init.pretrained

    def source(self, width: int) -> dict:
        """The source model of this fc width (pretrained on the source task once, then cached)."""
        if width not in self._sources:
            self._sources[width] = train.load_pretrained(fc_base(self.base, width))
        return self._sources[width]

    def method(self, name: str, dataset: str, units: int | None = None) -> MapMethod:
        return make_method(name, self.base, self.settings.units if units is None else units,
                           self.task(dataset).num_classes)

    def build_model(self, method: MapMethod, num_classes: int, width: int):
        return train.build_model(method.variant.config(fc_base(self.base, width)), num_classes)

    def trainer(self, cell: Cell, pretrained: dict | None = None, key: tuple = ()) -> runner.Trainer:
        """One trainer per (dataset, width, method, key): runs of any length and size share its compilation."""
        index = (cell.dataset, cell.width, cell.method, key)
        if index not in self._trainers:
            if len(self._trainers) > 12:  # compiled steps add up: keep the recent ones
                self._trainers.pop(next(iter(self._trainers)))
            config = cell.method.variant.config(fc_base(self.base, cell.width))
            task = self.task(cell.dataset)
            self._trainers[index] = runner.Trainer(
                train.build_model(config, task.num_classes), self.source(cell.width) if pretrained is None else pretrained,
                cell.method.regime, task, reinit=tuple(config.init.reinit), num_steps=None,
                batch_size=self.settings.batch_size, eval_every=None, crop_padding=config.data.crop_padding,
                momentum=config.train.momentum, weight_decay=config.train.weight_decay,
                new_lr_multiplier=config.train.new_lr_multiplier, lr_decay_at=tuple(config.train.lr_decay_at),
                scales_from_data=cell.method.scales)
        return self._trainers[index]

    # -- groups

    def expected(self, cell: Cell, pretrained: str | None = None) -> dict:
        return fingerprint(cell, self.base, self.settings, pretrained if pretrained is not None
                           else self.source_dir(cell.width))

    def stored(self, cell: Cell, pretrained: str | None = None) -> dict | None:
        return paper.load_group(cell.path(self.workdir), self.expected(cell, pretrained))

    def out_of_time(self) -> bool:
        if self.deadline is not None and time.perf_counter() > self.deadline:
            self.stopped = True
        return self.stopped

    def protocol_settings(self, **overrides) -> protocol.Settings:
        """The selection protocol's settings (seeds, sweep seeds, rates), as experiments.protocol takes them."""
        s = self.settings
        settings = protocol.Settings(tasks=(), methods=(), regimes=(), seeds=s.seeds, sweep_seeds=s.sweep_seeds,
                                     learning_rates=s.learning_rates, steps=0, batch_size=s.batch_size, eval_every=0,
                                     units=s.units, lora_small_rank=0)
        return dataclasses.replace(settings, **overrides)

    def group(self, cell: Cell, *, extra_rates: Sequence[float] = (), settings: protocol.Settings | None = None,
              trainer: Callable[[], Any] | None = None, pretrained_id: str | None = None) -> dict | None:
        """The cell's group: stored runs, topped up to the protocol, its sweep widened along the rate
        ladder (None if missing and not computing)."""
        expected = self.expected(cell, pretrained_id)
        path = cell.path(self.workdir)
        group = paper.load_group(path, expected)
        settings = settings or self.protocol_settings()
        ladder = self.settings.rate_ladder
        if not self.compute or (group is not None and complete(group, settings, extra_rates, ladder)) \
                or self.out_of_time():
            return group
        started = time.perf_counter()
        runs = [] if group is None else group['runs']
        spent = 0.0 if group is None else group.get('seconds', 0.0)

        def saved(partial):
            paper.save_group(path, {'fingerprint': expected, **partial,
                                    'seconds': spent + time.perf_counter() - started})

        what = f'{cell.dataset} {cell.shots or "full"}-shot fc{cell.width} {cell.method.name}/{cell.method.regime}' \
               f'{" " + cell.tag if cell.tag else ""}'
        fit = (trainer or (lambda: self.trainer(cell)))()
        result = protocol.run_protocol(fit, cell.shots, settings, runs=runs, extra_rates=extra_rates,
                                       run_kwargs={'num_steps': cell.steps, 'eval_every': cell.eval_every},
                                       saved=saved, ladder=ladder)
        seconds = time.perf_counter() - started
        group = {'fingerprint': expected, **result, 'seconds': spent + seconds}
        paper.save_group(path, group)
        self.computed += 1
        self.compute_seconds += seconds
        accuracy = np.mean([r['test']['accuracy'] for r in protocol.chosen_runs(group)])
        print(f'{what:58s} {cell.steps:5d} steps  lr={result["chosen_lr"]:<6g} test {accuracy:.3f}  ({seconds:5.1f} s)',
              flush=True)
        return group

    # -- variables of finished runs (forgetting, continual), cached as .npz

    def model_path(self, cell: Cell, seed: int, lr: float, pretrained_id: str | None = None) -> str:
        """Where one run's final variables are cached. The key holds the target: a run's fingerprint does
        not (its group's path does), and two targets with the same steps, shots and rate would share it."""
        key = json.dumps([cell.dataset, self.expected(cell, pretrained_id), seed, lr], sort_keys=True)
        return os.path.join(self.workdir, 'models', hashlib.sha256(key.encode()).hexdigest()[:20] + '.npz')

    def variables(self, cell: Cell, seed: int, lr: float, pretrained: dict | None = None,
                  pretrained_id: str | None = None, trainer: runner.Trainer | None = None) -> tuple[dict, dict] | None:
        """(final variables, run curves) of one run, retrained once and cached under WORKDIR/models."""
        path = self.model_path(cell, seed, lr, pretrained_id)
        if os.path.exists(path):
            with np.load(path, allow_pickle=False) as stored:
                curves = json.loads(str(stored['__curves__']))
                return unflatten({tuple(k.split('/')): stored[k] for k in stored.files if k != '__curves__'}), curves
        if not self.compute or self.out_of_time():
            return None
        started = time.perf_counter()
        fit = trainer or self.trainer(cell)
        (curves, variables), = fit.run(cell.shots, [seed], [lr], num_steps=cell.steps, eval_every=cell.eval_every,
                                       pretrained=pretrained, keep_variables=True)
        variables = jax.device_get(variables)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = path + '.tmp.npz'
        np.savez(temporary, __curves__=json.dumps(curves.to_json()),
                 **{'/'.join(k): np.asarray(v) for k, v in flatten(variables).items()})
        os.replace(temporary, path)
        self.compute_seconds += time.perf_counter() - started
        return variables, curves.to_json()


def complete(group: dict, settings: protocol.Settings, extra_rates: Sequence[float] = (),
             ladder: Sequence[float] = ()) -> bool:
    """Whether the group holds every run the protocol asks for (widened sweep, chosen rate, extra rates)."""
    have = {(r['seed'], r['learning_rate']) for r in group['runs']}
    seeds = list(range(settings.seeds))
    swept = protocol.sweep(group['runs'], seeds[:settings.sweep_seeds], settings.learning_rates, ladder)
    if swept.chosen is None or swept.next_rate is not None:
        return False
    return all((s, float(lr)) in have for s in seeds for lr in (swept.chosen, *extra_rates))


def resolve(settings: MapSettings, width: int) -> MapSettings:
    """Cells given as ('', shots) take the first target (continual B: the last); units=0 is half the source
    model's fc `width`, widths=() the width alone."""
    first, last = settings.tasks[0], settings.tasks[-1]
    pick = lambda cell, default: (cell[0] or default, cell[1])
    half = max(1, width // 2)
    return dataclasses.replace(settings, units=settings.units or half, widths=settings.widths or (width,),
                               capacity_cell=pick(settings.capacity_cell, first),
                               lr_cell=pick(settings.lr_cell, first), continual_a=pick(settings.continual_a, first),
                               continual_b=pick(settings.continual_b, last))


@dataclasses.dataclass(frozen=True)
class Filters:
    """--only: datasets, shots=N, width=N, method=NAME (or of each kind, and across kinds)."""
    datasets: frozenset = frozenset()
    shots: frozenset = frozenset()
    widths: frozenset = frozenset()
    methods: frozenset = frozenset()

    @classmethod
    def parse(cls, items: Sequence[str] | None) -> 'Filters':
        found = {'datasets': set(), 'shots': set(), 'widths': set(), 'methods': set()}
        for item in items or ():
            key, _, value = item.partition('=')
            if not value:
                found['datasets'].add(key)
            elif key in ('shots', 'width') and value.isdigit():
                found['shots' if key == 'shots' else 'widths'].add(int(value))
            elif key == 'method':
                found['methods'].add(value)
            else:
                raise UserError(f'--only: {item!r} is not a dataset, shots=N, width=N or method=NAME.')
        return cls(**{k: frozenset(v) for k, v in found.items()})

    def admit(self, dataset: str | None = None, shots: int | None = None, width: int | None = None,
              method: str | None = None) -> bool:
        return all(not allowed or value is None or value in allowed for allowed, value in (
            (self.datasets, dataset), (self.shots, shots), (self.widths, width), (self.methods, method)))


# ---------------------------------------------------------------------------------------------
# The axes. Each `axis_*` computes what the filters admit (when computing) and returns what is stored.


def axis_size(m: Map, filters: Filters = Filters()) -> dict:
    """{(dataset, shots, method name): group} of the main map; fine-tuning first in every cell (its
    chosen rate is every other method's shared rate)."""
    s, width = m.settings, m.width
    found = {}
    names = ['finetune', *[n for n in s.methods if n != 'finetune']]
    for name in names:
        for dataset in s.tasks:
            for shots in m.sizes(dataset, s.sizes):
                cell = m.cell(dataset, shots, m.method(name, dataset), width)
                ft = found.get((dataset, shots, 'finetune'))
                shared = [ft['chosen_lr']] if ft and name != 'finetune' and ft.get('chosen_lr') else []
                with _Admit(m, filters.admit(dataset, shots, width, name)):
                    group = m.group(cell, extra_rates=shared)
                if group is not None:
                    found[(dataset, shots, name)] = with_choice(group, m, dataset)
    return found


def with_choice(group: dict, m: Map, dataset: str) -> dict:
    """The group as the report reads it: its widened sweep replayed ('chosen_lr', None for a group stored
    before its sweep finished; 'rates', the rates swept; 'at_edge', chosen at the ladder's end; 'plateau',
    chosen at an edge that ties its neighbour) and what protocol.collapsed reads for runs on `dataset`
    (Map.chance)."""
    s = m.settings
    swept = protocol.sweep(group['runs'], list(range(s.sweep_seeds)), s.learning_rates, s.rate_ladder)
    chosen = swept.chosen if swept.next_rate is None else None
    return {**group, 'chosen_lr': chosen, 'rates': list(swept.rates), 'at_edge': swept.at_edge, 'plateau': swept.plateau,
            **m.chance(dataset)}


class _Admit:
    """A context in which the map computes only if the filters admit the cell."""

    def __init__(self, m: Map, admitted: bool):
        self.m, self.admitted, self.before = m, admitted, m.compute

    def __enter__(self):
        self.m.compute = self.before and self.admitted
        return self

    def __exit__(self, *exc):
        self.m.compute = self.before


def capacity_method(m: Map, name: str, width: int, ratio: float | None) -> MapMethod:
    dataset = m.settings.capacity_cell[0]
    if ratio is None:
        return m.method(name, dataset)
    units = max(1, int(round(ratio * width)))
    method = m.method(name, dataset, units)
    return method if (width == m.width and units == m.settings.units) else sized(method, units)


def capacity_plan(m: Map) -> list[tuple[int, str, float | None]]:
    """(width, method name, S / width) of the capacity axis, fine-tuning first at each width."""
    s = m.settings
    plan = []
    for width in s.widths:
        plan.append((width, 'finetune', None))
        plan.append((width, 'normscale', None))  # the rescaling alone: WA-grow's control at this width
        plan += [(width, 'wa', ratio) for ratio in s.ratios]
        if s.capacity_ori_ratio is not None:
            plan.append((width, 'wa_ori', s.capacity_ori_ratio))
    return plan


def axis_capacity(m: Map, filters: Filters = Filters()) -> dict:
    """{(width, method name, ratio): group} on the capacity cell."""
    dataset, shots = m.settings.capacity_cell
    shots = m.size(dataset, shots)
    found = {}
    for width, name, ratio in capacity_plan(m):
        with _Admit(m, filters.admit(dataset, shots, width, name)):
            cell = m.cell(dataset, shots, capacity_method(m, name, width, ratio), width)
            ft = found.get((width, 'finetune', None))
            shared = [ft['chosen_lr']] if ft and name != 'finetune' and ft.get('chosen_lr') else []
            group = m.group(cell, extra_rates=shared)
        if group is not None:
            found[(width, name, ratio)] = with_choice(group, m, dataset)
    return found


def axis_lr(m: Map, filters: Filters = Filters()) -> dict:
    """{method name: group}: every seed at every rate on the lr cell."""
    dataset, shots = m.settings.lr_cell
    shots = m.size(dataset, shots)
    found = {}
    for name in ['finetune', *(n for n in m.settings.lr_methods if n != 'finetune')]:
        # Every seed at every base rate, and at fine-tuning's chosen rate (the shared reading), which a
        # widened sweep may have put outside the base rates.
        ft = found.get('finetune')
        shared = [ft['chosen_lr']] if ft and name != 'finetune' and ft.get('chosen_lr') else []
        with _Admit(m, filters.admit(dataset, shots, m.width, name)):
            group = m.group(m.cell(dataset, shots, m.method(name, dataset), m.width),
                            extra_rates=(*m.settings.learning_rates, *shared))
        if group is not None:
            found[name] = with_choice(group, m, dataset)
    return found


def axis_convergence(m: Map, size: dict, filters: Filters = Filters()) -> dict:
    """{(dataset, shots, method): (group at 1x, group at convergence_factor x the steps)}, at the
    chosen rate of the 1x group, on the first convergence_seeds seeds."""
    s = m.settings
    found = {}
    for name in s.convergence_methods:
        for dataset in s.tasks:
            for shots in m.sizes(dataset, s.sizes):
                base = size.get((dataset, shots, name))
                if base is None or base.get('chosen_lr') is None:
                    continue
                settings = m.protocol_settings(seeds=s.convergence_seeds, sweep_seeds=s.convergence_seeds,
                                               learning_rates=(base['chosen_lr'],))
                with _Admit(m, filters.admit(dataset, shots, m.width, name)):
                    cell = m.cell(dataset, shots, m.method(name, dataset), m.width, factor=s.convergence_factor,
                                  tag=f'x{s.convergence_factor}')
                    group = m.group(cell, settings=settings)  # one rate: nothing to widen
                if group is not None:
                    found[(dataset, shots, name)] = (base, {**group, **m.chance(dataset)})
    return found


# -- forgetting: the source task through the old units


def source_split(m: Map, split: str) -> runner.Split:
    d = m.base.data
    return runner.Split(*data.split_arrays(m.base.init.source_dataset, split, d.data_dir, d.image_size, mean=d.mean,
                                           std=d.std))


def source_head_model(m: Map, method: MapMethod, width: int, num_classes: int):
    """The source architecture with the method's adapters (LoRA) and nothing it grew: the network's
    old units and the pretrained source classifier."""
    keep = method if method.method == 'lora' else make_method('finetune', m.base, 1, num_classes)
    return m.build_model(keep, num_classes, width)


_PREDICT: dict[Any, Callable] = {}


def accuracy(model, variables: dict, split: runner.Split, chunk: int = 512) -> float:
    if model not in _PREDICT:
        _PREDICT[model] = jax.jit(lambda v, x: jnp.argmax(model.apply(v, x), -1))
    predict = _PREDICT[model]
    correct = sum(int(np.sum(np.asarray(predict(variables, split.images[i:i + chunk])) == split.labels[i:i + chunk]))
                  for i in range(0, len(split.labels), chunk))
    return correct / len(split.labels)


def source_accuracy(m: Map, method: MapMethod, width: int, tuned: dict | None, split: runner.Split) -> float:
    """Accuracy on the source split of the old units of `tuned` (None: the source model) read by the
    source classifier (as pretrained)."""
    source = m.source(width)
    num_classes = int(source['params']['classifier']['kernel'].shape[-1])
    model = source_head_model(m, method, width, num_classes)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *split.images.shape[1:])))
    tuned_flat = flatten(source if tuned is None else tuned)
    source_flat = flatten(source)
    variables = unflatten({path: source_flat[path] if path[1] == 'classifier' else tuned_flat[path]
                           for path in flatten(shapes)})
    return accuracy(model, variables, split)


def axis_forgetting(m: Map, size: dict, filters: Filters = Filters()) -> dict:
    """{(dataset, shots, method): record}: per seed at the method's chosen rate, target test accuracy and
    the source task's test accuracy through the old units before and after fine-tuning on the target."""
    s = m.settings
    found = {}
    split = None
    for dataset in s.tasks:
        for shots in m.sizes(dataset, s.forgetting_sizes):
            for name in s.forgetting_methods:
                base = size.get((dataset, shots, name))
                if base is None or base.get('chosen_lr') is None:
                    continue
                method = m.method(name, dataset)
                cell = m.cell(dataset, shots, method, m.width, tag='forgetting')
                expected = {'dataset': dataset, 'runs': m.expected(m.cell(dataset, shots, method, m.width)),
                            'lr': base['chosen_lr'], 'seeds': s.seeds}
                path = cell.path(m.workdir)
                record = paper.load_group(path, expected)
                if record is None and m.compute and filters.admit(dataset, shots, m.width, name) and not m.out_of_time():
                    split = split or source_split(m, 'test')
                    stored = {r['seed']: r for r in protocol.chosen_runs(base)}
                    seeds = []
                    for seed in range(s.seeds):
                        found_variables = m.variables(m.cell(dataset, shots, method, m.width), seed, base['chosen_lr'])
                        if found_variables is None:
                            break
                        variables, curves = found_variables
                        seeds.append({'seed': seed, 'target_test': curves['test']['accuracy'],
                                      'stored_test': stored.get(seed, {}).get('test', {}).get('accuracy'),
                                      'source_after': source_accuracy(m, method, m.width, variables, split)})
                    if len(seeds) == s.seeds:
                        record = {'fingerprint': expected, 'seeds': seeds,
                                  'source_before': source_accuracy(  # the plain architecture: the source
                                      # model has no adapters (a LoRA model built here would miss its leaves)
                                      m, make_method('finetune', m.base, 1, 1), m.width, None, split)}
                        paper.save_group(path, record)
                        m.computed += 1
                        print(f'forgetting {dataset} {shots or "full"}-shot {name}: source '
                              f'{record["source_before"]:.3f} -> {np.mean([r["source_after"] for r in seeds]):.3f}',
                              flush=True)
                if record is not None:
                    found[(dataset, shots, name)] = record
    return found


# -- continual growth: source -> A -> B

CONTINUAL_ARMS = (  # (name, label, method at A, method at B)
    ('ft_ft', 'fine-tune → fine-tune', 'finetune', 'finetune'),
    ('ft_wa', 'fine-tune → WA (grow at B only)', 'finetune', 'wa'),
    ('wa_ft', 'WA → no new units (grow at A only)', 'wa', 'wa'),
    # WWA at B keeps A's trained fc7_plus (same leaf name) and adds S/2 units to fc6: fc7 gains no new units at B.
    ('wa_wwa', 'WA → WWA (grow at each step: fc7 at A, fc6 at B)', 'wa', 'wwa'),
)


class PerSeed:
    """A trainer whose runs start from a different model per seed (the seed's model after task A)."""
    vectorised = False

    def __init__(self, trainer: runner.Trainer, models: Callable[[int], dict | None]):
        self.trainer, self.models = trainer, models

    def run(self, shots, seeds, learning_rates, **kwargs):
        found = []
        for seed in seeds:
            pretrained = self.models(seed)
            if pretrained is None:
                raise _Stop()
            found += self.trainer.run(shots, [seed], learning_rates, pretrained=pretrained, **kwargs)
        return found


class _Stop(Exception):
    """A model of step A is missing and may not be computed now."""


def axis_continual(m: Map, size: dict, filters: Filters = Filters()) -> dict:
    """{arm name: group at B} and {('A', method): group at A}, {('direct', method): group source -> B}."""
    s = m.settings
    (a_set, a_shots), (b_set, b_shots) = s.continual_a, s.continual_b
    a_shots, b_shots = m.size(a_set, a_shots), m.size(b_set, b_shots)
    found = {}
    for name in ('finetune', 'wa'):
        with _Admit(m, filters.admit(a_set, a_shots, m.width, name)):
            a_group = size.get((a_set, a_shots, name)) or m.group(m.cell(a_set, a_shots, m.method(name, a_set), m.width))
        if a_group is not None:
            found[('A', name)] = with_choice(a_group, m, a_set)
        with _Admit(m, filters.admit(b_set, b_shots, m.width, name)):
            direct = size.get((b_set, b_shots, name)) or m.group(m.cell(b_set, b_shots, m.method(name, b_set), m.width))
        if direct is not None:
            found[('direct', name)] = with_choice(direct, m, b_set)
    for arm, _, a_name, b_name in CONTINUAL_ARMS:
        if arm not in s.continual_arms:
            continue
        a_group = found.get(('A', a_name))
        if a_group is None or a_group.get('chosen_lr') is None:
            continue
        a_method = m.method(a_name, a_set)
        a_cell = m.cell(a_set, a_shots, a_method, m.width)
        a_lr = a_group['chosen_lr']
        a_id = json.dumps([a_set, m.expected(a_cell), a_lr], sort_keys=True)  # A's target: not in its fingerprint
        cache: dict[int, dict | None] = {}

        def model_after_a(seed, a_cell=a_cell, a_lr=a_lr, cache=cache):
            if seed not in cache:
                found_variables = m.variables(a_cell, seed, a_lr)
                cache[seed] = None if found_variables is None else found_variables[0]
            return cache[seed]

        b_method = m.method(b_name, b_set)
        b_cell = m.cell(b_set, b_shots, b_method, m.width, tag=f'after_{a_name}')  # A's cell is in the fingerprint
        ft_arm = found.get('ft_ft')
        shared = [ft_arm['chosen_lr']] if ft_arm and arm != 'ft_ft' and ft_arm.get('chosen_lr') else []

        def per_seed(b_cell=b_cell, model_after_a=model_after_a, a_name=a_name):
            first = model_after_a(0)
            if first is None:
                raise _Stop()
            return PerSeed(m.trainer(b_cell, pretrained=first, key=('after', a_name)), model_after_a)

        with _Admit(m, filters.admit(b_set, b_shots, m.width, arm)):
            try:
                group = m.group(b_cell, extra_rates=shared, trainer=per_seed, pretrained_id=a_id)
            except _Stop:
                group = m.stored(b_cell, a_id)
        if group is not None:
            found[arm] = with_choice(group, m, b_set)
    return found


# -- gamma right after growth (beyond the paper)

GAMMA_VARIANTS = (  # (name, label, method, scales from data)
    ('wa_ori', 'WA-ori (no NormScale)', 'wa_ori', ''),
    ('wa', 'WA-grow, γ = 10', 'wa', ''),
    ('wa_data', 'WA-grow, γ from data (each group its norm)', 'wa', 'group'),
    ('wa_data_first', 'WA-grow, γ from data (old group\'s norm)', 'wa', 'first'),
    ('wwa', 'WWA, γ = 10', 'wwa', ''),
    ('wwa_data', 'WWA, γ from data (each group its norm)', 'wwa', 'group'),
)


def _grow_keeping_classifier(model, source: dict, key, sample, batch, mode: str) -> dict:
    """The source model grown into `model` with nothing re-initialised (its classifier kept), and its
    NormScale scales set from `batch` when `mode` is given."""
    variables = grow_params(source, model, key, sample, reinit=())
    return scales_from_data(model, variables, batch, mode=mode) if mode else variables


def axis_gamma(m: Map, filters: Filters = Filters()) -> dict | None:
    """Source test accuracy right after growing the source model (its classifier kept), per S, variant
    and seed, and the gammas set from data at the classifier; stored as one record."""
    s = m.settings
    variants = [v for v in GAMMA_VARIANTS if v[0] in s.gamma_variants]
    expected = {'source': m.source_dir(m.width), 'units': list(s.gamma_units), 'seeds': s.gamma_seeds,
                'variants': [list(v[2:]) for v in variants], 'batch_size': s.batch_size,
                'model': paper.model_settings(fc_base(m.base, m.width))}
    path = os.path.join(m.workdir, 'runs', 'gamma_step0.json')
    record = paper.load_group(path, expected)
    if record is not None or not m.compute or not filters.admit(m.base.init.source_dataset, None, m.width, 'gamma'):
        return record
    source = m.source(m.width)
    num_classes = int(source['params']['classifier']['kernel'].shape[-1])
    test, pool = source_split(m, 'test'), source_split(m, 'train')
    sample = jnp.zeros((1, *test.images.shape[1:]))
    rows = {'source': source_accuracy(m, make_method('finetune', m.base, 1, num_classes), m.width, None, test)}
    scales = {}
    for units in s.gamma_units:
        for name, _, method_name, mode in variants:
            method = make_method(method_name, m.base, units, num_classes)
            model = m.build_model(method, num_classes, m.width)
            grow = jax.jit(lambda key, batch, model=model, mode=mode: _grow_keeping_classifier(
                model, source, key, sample, batch, mode))
            accuracies = []
            for seed in range(s.gamma_seeds):
                batch = pool.images[np.random.default_rng(seed).choice(len(pool.labels), s.batch_size, replace=False)]
                variables = grow(jax.random.key(seed), jnp.asarray(batch))
                if mode and seed == 0:
                    scales[f'{name}/{units}'] = {k: float(np.mean(v)) for k, v in
                                                 variables['params']['classifier_norm'].items()}
                accuracies.append(accuracy(model, variables, test))
            rows[f'{name}/{units}'] = accuracies
    record = {'fingerprint': expected, 'accuracy': rows, 'scales': scales}
    paper.save_group(path, record)
    m.computed += 1
    return record


# ---------------------------------------------------------------------------------------------
# The command


def run_axes(m: Map, axes: Sequence[str], filters: Filters) -> dict:
    """Computes the axes in `axes` (what `filters` admit) and reads every axis from the store."""
    results = {}
    for axis in AXES:
        m.compute = axis in axes
        started, computed = time.perf_counter(), m.computed
        if axis == 'size':
            results['size'] = axis_size(m, filters)
        elif axis == 'capacity':
            results['capacity'] = axis_capacity(m, filters)
        elif axis == 'lr':
            results['lr'] = axis_lr(m, filters)
        elif axis == 'convergence':
            results['convergence'] = axis_convergence(m, results['size'], filters)
        elif axis == 'forgetting':
            results['forgetting'] = axis_forgetting(m, results['size'], filters)
        elif axis == 'continual':
            results['continual'] = axis_continual(m, results['size'], filters)
        elif axis == 'gamma':
            results['gamma'] = axis_gamma(m, filters)
        if m.compute:
            print(f'axis {axis}: {m.computed - computed} groups computed in {time.perf_counter() - started:.0f} s'
                  f'{" (stopped: --max_minutes)" if m.stopped else ""}', flush=True)
    m.compute = False
    return results


def collect(m: Map) -> dict:
    """Everything stored, for the report (with the labels of the continual arms and gamma variants)."""
    return {**run_axes(m, (), Filters()), 'continual_arms': CONTINUAL_ARMS, 'gamma_variants': GAMMA_VARIANTS}


# Settings the map's runs neither record in their fingerprints nor apply (the growth is the method's;
# the runner trains with the paper's SGD, without warm-up or flips): changing one would reuse stored
# runs made without it, so it is refused.
UNRECORDED = (*(f'growth.{key}' for key in config_lib.base_config().growth.keys()),
              'train.optimizer', 'train.warmup_steps', 'data.flip', 'init.preserve_function')


def check_recorded(config: ml_collections.ConfigDict) -> None:
    """Raises UserError naming every UNRECORDED key that differs from growjax's default."""
    default = config_lib.base_config()
    sections = [key.split('.') for key in UNRECORDED]
    changed = [f'{section}.{name}' for section, name in sections if config[section][name] != default[section][name]]
    if changed:
        raise UserError(f'experiments.map: --config.{", --config.".join(changed)} cannot be changed: the map '
                        'grows by its own methods (--methods) and trains with the paper\'s SGD, and its stored runs do '
                        'not record these keys.')


def main(argv: Sequence[str]) -> int:
    from absl import flags
    from absl import logging as absl_logging
    from experiments import map_report
    absl_logging.set_verbosity(absl_logging.WARNING)
    del argv
    f = flags.FLAGS
    settings = QUICK if f.quick else FULL
    overrides = {}
    if f.tasks:
        overrides['tasks'] = tuple(f.tasks)
    if f.sizes:
        if not all(x.isdigit() for x in f.sizes):
            print(f'error: --sizes must be examples per class (0: the whole train split), got {",".join(f.sizes)}.',
                  file=sys.stderr)
            return 2
        overrides['sizes'] = tuple(int(x) for x in f.sizes)
    if f.methods:
        overrides['methods'] = tuple(f.methods)
    if f.seeds is not None:
        overrides['seeds'] = f.seeds
    settings = dataclasses.replace(settings, **overrides)
    if 'finetune' not in settings.methods:  # the reference of every gain, always run first
        settings = dataclasses.replace(settings, methods=('finetune', *settings.methods))
    try:
        check_recorded(f.config)
        filters = Filters.parse(f.only)
    except UserError as err:  # bad input: one line naming it, no traceback
        print(f'error: {err}', file=sys.stderr)
        return 2
    axes = tuple(f.axes or AXES)
    unknown = (set(axes) - set(AXES)) | (set(settings.methods) - set(METHOD_NAMES))
    if unknown:
        print(f'error: axes must be among {list(AXES)} and methods among {list(METHOD_NAMES)} (got {sorted(unknown)}).',
              file=sys.stderr)
        return 2
    if settings.sweep_seeds > settings.seeds:
        print(f'error: --seeds={settings.seeds} is below the {settings.sweep_seeds} seeds that select the learning '
              'rate.', file=sys.stderr)
        return 2
    typed = ' '.join(['python -m experiments.map', *sys.argv[1:]]).strip()
    started = time.perf_counter()
    m = Map(f.config, settings, f.workdir, max_seconds=None if f.max_minutes is None else 60 * f.max_minutes)
    if not f.report_only:
        run_axes(m, axes, filters)
        invocations.record(f.workdir, {'command': typed, 'axes': list(axes), 'only': list(f.only or ()),
                                      'computed': m.computed, 'minutes': (time.perf_counter() - started) / 60,
                                      'compute_minutes': m.compute_seconds / 60, 'stopped': m.stopped,
                                      'date': time.strftime('%Y-%m-%d %H:%M')})
    docs_dir = f.docs or (os.path.join(f.workdir, 'docs') if f.quick else experiments.DOCS)
    results = collect(m)
    path = map_report.write(m, results, docs_dir, command=typed, invocations=invocations.read(f.workdir))
    print(f'{path} written ({m.computed} groups computed{", stopped at --max_minutes" if m.stopped else ""}) in '
          f'{time.perf_counter() - started:.0f} s.')
    return 0


def define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags
    flags.DEFINE_string('workdir', 'workdirs/map', 'Where runs (runs/), models (models/) and the log of invocations are kept.')
    flags.DEFINE_bool('quick', False, 'Smoke run: one target, two sizes, two seeds and rates, tiny training, every axis.')
    flags.DEFINE_string('docs', None, 'Folder for results.md and figures/ (default: the repository\'s docs/; with '
                      '--quick WORKDIR/docs).')
    flags.DEFINE_list('axes', None, f'Axes to compute (default: all): some of {list(AXES)}; the report shows every '
                      'axis that is stored.')
    flags.DEFINE_list('only', None, 'Compute only these: target datasets, shots=N, width=N, method=NAME (or within '
                      'a kind, and across kinds).')
    flags.DEFINE_float('max_minutes', None, 'Start no new group after this many minutes (then write the report).')
    flags.DEFINE_bool('report_only', False, 'Compute nothing: write the report from what is stored.')
    flags.DEFINE_list('tasks', None, 'Override the target datasets.')
    flags.DEFINE_list('sizes', None, 'Override the examples per class (0: the whole train split).')
    flags.DEFINE_list('methods', None, f'Override the methods of the size axis: some of {list(METHOD_NAMES)}.')
    flags.DEFINE_integer('seeds', None, 'Override the number of seeds.')
    config_flags.DEFINE_config_dict('config', config_lib.base_config(),
                                    'growjax settings every run starts from (growjax/config_lib.py).')


if __name__ == '__main__':
    from absl import app
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
