"""Reproduce "Growing a Brain"'s comparisons and analyses on the built-in offline data.

    python -m experiments.paper --workdir=workdirs/paper            # ~15-25 min on 2 CPU cores
    python -m experiments.paper --workdir=/tmp/paper_quick --quick  # smoke run, < 3 min

Every method (scratch, fine-tuning, WA without / with normalisation, DA, DWA, WWA, and LoRA at a
parameter-matched and a small rank) under the regimes new / fc7_new / all, on few-shot Greek
letters and digits, over paired seeds (the same few-shot draws and batches for every method). Every
(method, regime, task) gets the same learning-rate sweep, chosen on the validation split of the
sweep seeds; test accuracy is reported at the chosen rate over all seeds. Finished groups are kept
under WORKDIR/runs and reused on a rerun; the report (tables, claims, figures) goes to
the repository's docs/results.md (with --quick WORKDIR/docs; or --docs=DIR). `--config.<key>` overrides the growjax settings every
run starts from (growjax/config_lib.py), e.g. `--config.init.cache_dir=DIR`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Callable, Sequence

import ml_collections
import numpy as np

from growjax import config_lib, methods, train

import experiments
from experiments import report, runner
from experiments.protocol import Settings, Variant, chosen_runs, run_protocol

REGIMES = ('new', 'fc7_new', 'all')
# The paper's methods (growjax.methods names), in its tables' order, and LoRA (run at two ranks).
PAPER_METHODS = ('scratch', 'finetune', 'wa_ori', 'wa', 'da', 'dwa', 'wwa')
LORA = 'lora'


FULL = Settings(
    tasks=(('growjax_greek', 1), ('growjax_greek', 2), ('growjax_digits', 1), ('growjax_digits', 2)),
    methods=(*PAPER_METHODS, LORA), regimes=REGIMES, seeds=5, sweep_seeds=2,
    learning_rates=(0.0003, 0.001, 0.003, 0.01, 0.03), steps=80, batch_size=16, eval_every=20, units=128,
    lora_small_rank=4)
# Compilation dominates a smoke run (one per method and regime), hence two regimes only.
QUICK = dataclasses.replace(FULL, tasks=(('growjax_greek', 1),), regimes=('new', 'all'), seeds=1, sweep_seeds=1,
                            learning_rates=(0.003, 0.01), steps=30, eval_every=10)


def lora_variant(rank: int) -> Variant:
    return Variant(f'lora_r{rank}', LORA, (('growth.lora_rank', rank),), label_suffix=f' r={rank}')


def parameter_counts(base, variants: Sequence[Variant], num_classes: int) -> dict[str, int]:
    shape = (base.data.image_size, base.data.image_size, 1)
    return {v.name: runner.parameter_count(train.build_model(v.config(base), num_classes), shape) for v in variants}


def matched_lora_rank(base, units: int, num_classes: int) -> int:
    """The LoRA rank whose adapters add about as many parameters as WA's new units do."""
    variants = [Variant('finetune', 'finetune'), Variant('wa', 'wa', (('growth.units', units),)), lora_variant(1)]
    counts = parameter_counts(base, variants, num_classes)
    return max(1, round((counts['wa'] - counts['finetune']) / (counts['lora_r1'] - counts['finetune'])))


def all_variants(settings: Settings, base, num_classes: int) -> list[Variant]:
    """The settings' methods (growjax.methods names) in their order, growing S units each; 'lora' at the
    rank matching WA's added parameters and at the small rank (if not 0)."""
    variants = []
    for name in settings.methods:
        if name == LORA:
            matched = matched_lora_rank(base, settings.units, num_classes)
            variants += [lora_variant(rank) for rank in sorted({matched, settings.lora_small_rank} - {0}, reverse=True)]
        else:
            variants.append(Variant(name, name, (('growth.units', settings.units),) if methods.METHODS[name].grows
                                    else ()))
    return variants


def regimes_of(method: Variant, settings: Settings) -> tuple[str, ...]:
    """Scratch has no pretrained layers, so every regime trains all of it: run it once, as 'all'."""
    return settings.regimes if method.pretrained else ('all',)


# ---------------------------------------------------------------------------------------------
# Finished groups on disk


def group_path(workdir: str, dataset: str, shots: int, method: str, regime: str) -> str:
    return os.path.join(workdir, 'runs', dataset.replace('/', '_'), f'{shots}shot', f'{method}__{regime}.json')


def fingerprint(settings: Settings, base, method: Variant, regime: str, pretrained_dir: str | None) -> dict:
    """Everything a group's result depends on; a stored group is reused only if it matches."""
    train = base.train
    return json.loads(json.dumps({  # as stored: tuples become lists
        'settings': {k: v for k, v in dataclasses.asdict(settings).items() if k not in ('tasks', 'methods', 'regimes')},
        'method': [['growth.method', method.method], *(list(item) for item in method.overrides)], 'regime': regime, 'pretrained': pretrained_dir,
        'model': model_settings(base), 'reinit': list(base.init.reinit),
        'data': {k: base.data[k] for k in ('image_size', 'crop_padding', 'mean', 'std')},
        'optimiser': {k: train[k] for k in ('momentum', 'weight_decay', 'new_lr_multiplier', 'lr_decay_at')},
    }))


def model_settings(base) -> dict:
    """config.model as fingerprints record it: model.fc_width only when set, so groups stored before
    the key existed still match."""
    model = base.model.to_dict()
    if not model.get('fc_width'):
        model.pop('fc_width', None)
    return model


def load_group(path: str, expected: dict) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        group = json.load(f)
    return group if group.get('fingerprint') == expected else None


def save_group(path: str, group: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = path + '.tmp'
    with open(temporary, 'w') as f:
        json.dump(group, f)
    os.replace(temporary, path)  # a run killed mid-write leaves no half group behind


# ---------------------------------------------------------------------------------------------
# The whole experiment


@dataclasses.dataclass
class Progress:
    """One line per (task, method, regime) group, with elapsed time and a rough remaining time."""
    total: int
    done: int = 0
    computed: int = 0
    compute_seconds: float = 0.0
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def report(self, what: str, group: dict, seconds: float | None) -> None:
        self.done += 1
        if seconds is not None:
            self.computed += 1
            self.compute_seconds += seconds
        accuracies = [r['test']['accuracy'] for r in chosen_runs(group)]
        remaining = (self.total - self.done) * self.compute_seconds / max(self.computed, 1)
        took = 'reused' if seconds is None else f'{seconds:5.1f} s'
        print(f'[{self.done:3d}/{self.total}] {what:44s} lr={group["chosen_lr"]:<6g} test {np.mean(accuracies):.3f}'
              f' +- {np.std(accuracies):.3f}  ({took}; {time.perf_counter() - self.start:4.0f} s elapsed,'
              f' ~{remaining / 60:.0f} min left)', flush=True)


def run_experiment(base: ml_collections.ConfigDict, settings: Settings, workdir: str) -> dict:
    """Runs (or reuses) every group; returns {'results': {(dataset, shots, method, regime): group}, ...}."""
    datasets = list(dict.fromkeys(dataset for dataset, _ in settings.tasks))
    tasks = {dataset: runner.load_task(base, dataset) for dataset in datasets}
    variants = all_variants(settings, base, tasks[datasets[0]].num_classes)
    pretrained_dir = train.builtin_pretrained_dir(base) if base.init.pretrained == 'builtin' else base.init.pretrained
    pretrained, pretrain_seconds = None, 0.0
    plan = [(dataset, method, regime) for dataset in datasets for method in variants
            for regime in regimes_of(method, settings)]
    progress = Progress(total=sum(len([s for d, s in settings.tasks if d == dataset]) for dataset, _, _ in plan))
    results = {}
    for dataset, method, regime in plan:
        shots_list = [shots for d, shots in settings.tasks if d == dataset]
        expected = fingerprint(settings, base, method, regime, pretrained_dir if method.pretrained else None)
        paths = {shots: group_path(workdir, dataset, shots, method.name, regime) for shots in shots_list}
        stored = {shots: load_group(paths[shots], expected) for shots in shots_list}
        trainer = None
        for shots in shots_list:
            what = f'{dataset} {shots}-shot {method.name}/{regime}'
            group = stored[shots]
            seconds = None
            if group is None:
                if method.pretrained and pretrained is None:
                    started = time.perf_counter()
                    pretrained = train.load_pretrained(base)  # trains and caches the source model once
                    pretrain_seconds = time.perf_counter() - started
                started = time.perf_counter()
                if trainer is None:
                    config = method.config(base)
                    trainer = runner.Trainer(
                        train.build_model(config, tasks[dataset].num_classes), pretrained if method.pretrained else None,
                        regime, tasks[dataset], reinit=tuple(config.init.reinit), num_steps=settings.steps,
                        batch_size=settings.batch_size, eval_every=settings.eval_every,
                        crop_padding=config.data.crop_padding, momentum=config.train.momentum,
                        weight_decay=config.train.weight_decay, new_lr_multiplier=config.train.new_lr_multiplier,
                        lr_decay_at=tuple(config.train.lr_decay_at))
                group = {'fingerprint': expected, **run_protocol(trainer, shots, settings)}
                seconds = time.perf_counter() - started
                group['seconds'] = seconds
                save_group(paths[shots], group)
            results[(dataset, shots, method.name, regime)] = group
            progress.report(what, group, seconds)
    counts = parameter_counts(base, variants, tasks[datasets[0]].num_classes)
    return {'results': results, 'methods': variants, 'parameter_counts': counts, 'computed': progress.computed,
            'pretrain_seconds': pretrain_seconds}


def parse_tasks(spec: str) -> tuple[tuple[str, int], ...]:
    """'growjax_greek:1,growjax_digits:2' -> (('growjax_greek', 1), ('growjax_digits', 2))."""
    tasks = []
    for item in filter(None, (part.strip() for part in spec.split(','))):
        dataset, _, shots = item.rpartition(':')
        if not dataset or not shots.isdigit() or int(shots) < 1:
            raise config_lib.ConfigError(f'--tasks: {item!r} is not dataset:shots (e.g. growjax_greek:1).')
        tasks.append((dataset, int(shots)))
    return tuple(tasks)


@dataclasses.dataclass(frozen=True)
class Command:
    """An experiment command: its settings (full and --quick), the regimes it allows, its report."""
    module: str  # python -m <module>
    full: Settings
    quick: Settings
    regimes: tuple[str, ...]
    write_report: Callable  # (experiment, settings, base, docs_dir, *, command, seconds) -> path


PAPER = Command('experiments.paper', FULL, QUICK, REGIMES, report.write_report)


def main(argv: Sequence[str], command: Command = PAPER) -> int:
    from absl import flags
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and tfds log every file at INFO
    flags_ = flags.FLAGS
    settings = command.quick if flags_.quick else command.full
    overrides = {}
    if flags_.tasks:
        overrides['tasks'] = parse_tasks(flags_.tasks)
    if flags_.methods:
        overrides['methods'] = tuple(flags_.methods)
    if flags_.regimes:
        overrides['regimes'] = tuple(flags_.regimes)
    for name in ('seeds', 'sweep_seeds', 'steps'):
        if flags_[name].value is not None:
            overrides[name] = flags_[name].value
    if flags_.learning_rates:
        overrides['learning_rates'] = tuple(float(lr) for lr in flags_.learning_rates)
    settings = dataclasses.replace(settings, **overrides)
    unknown = set(settings.methods) - set(methods.METHODS)
    if unknown or not set(settings.regimes) <= set(command.regimes) or settings.sweep_seeds > settings.seeds:
        print(f'error: methods must be among {list(methods.METHODS)}, regimes among {list(command.regimes)}, '
              'and sweep_seeds <= seeds.', file=sys.stderr)
        return 2
    docs_dir = flags_.docs or (os.path.join(flags_.workdir, 'docs') if flags_.quick else experiments.DOCS)
    started = time.perf_counter()
    experiment = run_experiment(flags_.config, settings, flags_.workdir)
    del argv  # absl strips the flags from it; the report shows the command as typed
    typed = ' '.join([f'python -m {command.module}', *sys.argv[1:]])
    path = command.write_report(experiment, settings, flags_.config, docs_dir, command=typed.strip(),
                                seconds=time.perf_counter() - started)
    print(f'{path} written ({experiment["computed"]} groups computed, the rest reused) in '
          f'{time.perf_counter() - started:.0f} s.')
    return 0


def define_flags(command: Command = PAPER, config: ml_collections.ConfigDict | None = None) -> None:
    from absl import flags
    from ml_collections import config_flags
    default_workdir = 'workdirs/' + command.module.rsplit('.', 1)[-1]
    flags.DEFINE_string('workdir', default_workdir, 'Where finished groups (runs/) are kept and reused.')
    flags.DEFINE_bool('quick', False, 'Smoke run: fewer tasks, seeds, learning rates, steps and regimes.')
    flags.DEFINE_string('docs', None, 'Folder for results.md and figures/ (default: the repository\'s docs/; with '
                      '--quick WORKDIR/docs).')
    flags.DEFINE_string('tasks', None, "Override the tasks, 'dataset:shots,...'.")
    flags.DEFINE_list('methods', None, f'Override the methods: some of {list(methods.METHODS)}.')
    flags.DEFINE_list('regimes', None, f'Override the regimes: some of {list(command.regimes)}.')
    flags.DEFINE_integer('seeds', None, 'Override the number of seeds.')
    flags.DEFINE_integer('sweep_seeds', None, 'Override how many seeds select the learning rate.')
    flags.DEFINE_integer('steps', None, 'Override the training steps per run.')
    flags.DEFINE_list('learning_rates', None, 'Override the learning-rate sweep.')
    config_flags.DEFINE_config_dict('config', config or config_lib.base_config(),
                                    'growjax settings every run starts from (growjax/config_lib.py).')


if __name__ == '__main__':
    from absl import app
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
