"""docs/results.md and its figures from the paper experiment's measured runs (nothing typed in by hand).

Tables follow the paper's layout (Table 1: method x regime; Table 3: method x dataset, regime
'all'); each claim gets a verdict from paired differences over seeds (every method sees the same
few-shot draws and batches at a seed), with a two-sided t-test at 5%.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import platform
from typing import Callable, Sequence

import numpy as np

from growjax.analysis import group_label

from experiments.protocol import Settings, chosen_runs

# AlexNet on SUN-397, regime 'all' (the paper's Tables 1 and 3), as docs/design.md quotes them.
PAPER_SUN397_ALL = {'finetune': 55.93, 'da': 58.54, 'wa': 58.95, 'wwa': 59.05, 'wa_ori': 51.34}
FIGURE_DIR = 'figures'


def task_name(dataset: str, shots: int) -> str:
    return f'{dataset.split("/")[0].removeprefix("growjax_").capitalize()} {shots}-shot'


# ---------------------------------------------------------------------------------------------
# Numbers


def accuracies(group: dict, metric: Callable[[dict], float] | None = None) -> dict[int, float]:
    """{seed: value} of the runs at the chosen learning rate (default: test accuracy)."""
    metric = metric or (lambda run: run['test']['accuracy'])
    return {run['seed']: metric(run) for run in chosen_runs(group)}


def mean_std(values: Sequence[float]) -> str:
    values = 100 * np.asarray(list(values))
    return f'{values.mean():.1f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.1f}'


@dataclasses.dataclass(frozen=True)
class Paired:
    """The per-seed difference a - b: mean, standard deviation, number of seeds, and its sign
    where a two-sided paired t-test at 5% rejects 'no difference' (0 otherwise)."""
    mean: float
    std: float
    n: int
    sign: int

    def text(self) -> str:
        mark = {1: ' (significant)', -1: ' (significant)', 0: ''}[self.sign]
        return f'{100 * self.mean:+.1f} ± {100 * self.std:.1f}{mark}'


def paired(a: dict[int, float], b: dict[int, float]) -> Paired:
    from scipy import stats
    seeds = sorted(set(a) & set(b))
    diff = np.asarray([a[s] - b[s] for s in seeds])
    if len(diff) < 2:
        return Paired(float(diff.mean()) if len(diff) else 0.0, 0.0, len(diff), 0)
    std = float(diff.std(ddof=1))
    if std == 0:
        sign = int(np.sign(diff.mean()))
    else:
        t = diff.mean() / (std / np.sqrt(len(diff)))
        sign = int(np.sign(t)) if abs(t) > stats.t.ppf(0.975, len(diff) - 1) else 0
    return Paired(float(diff.mean()), std, len(diff), sign)


def verdict(comparisons: Sequence[Paired]) -> str:
    """Over tasks: reproduced when at least half favour the claim significantly and none oppose it."""
    favour = sum(c.sign > 0 for c in comparisons)
    oppose = sum(c.sign < 0 for c in comparisons)
    half = (len(comparisons) + 1) // 2
    if favour >= half and not oppose:
        return 'reproduced'
    if oppose >= half and not favour:
        return 'not reproduced (significantly the other way)'
    if not favour and not oppose:
        return 'unclear at this scale (no significant difference)'
    if favour and oppose:
        return 'unclear at this scale (mixed: significant in both directions)'
    return (f'unclear at this scale (significantly {"ahead" if favour else "behind"} on '
            f'{favour or oppose} of {len(comparisons)} tasks only)')


class Results:
    """Lookup over the experiment's groups."""

    def __init__(self, experiment: dict, settings: Settings):
        self.groups = experiment['results']
        self.methods = experiment['methods']
        self.labels = {m.name: m.label for m in self.methods}
        self.tasks = list(settings.tasks)
        self.settings = settings

    def group(self, task, method: str, regime: str) -> dict | None:
        regime = 'all' if method == 'scratch' else regime
        return self.groups.get((*task, method, regime))

    def values(self, task, method: str, regime: str = 'all', metric=None) -> dict[int, float]:
        group = self.group(task, method, regime)
        return {} if group is None else accuracies(group, metric)

    def compare(self, a: str, b: str, regime: str = 'all', metric=None) -> list[Paired]:
        return [paired(self.values(t, a, regime, metric), self.values(t, b, regime, metric)) for t in self.tasks]

    def has(self, *methods: str) -> bool:
        return all(m in self.labels for m in methods)

    def lora_names(self) -> list[str]:
        return [m.name for m in self.methods if m.name.startswith('lora_')]


# ---------------------------------------------------------------------------------------------
# Tables


def table_by_regime(results: Results, task, paper_column: bool = True) -> str:
    rows = ['| method | ' + ' | '.join(results.settings.regimes) + (' | paper, SUN-397, `all` |' if paper_column else ' |'),
            '|---' * (len(results.settings.regimes) + 1 + paper_column) + '|']
    for method in results.methods:
        cells = []
        for regime in results.settings.regimes:
            values = results.values(task, method.name, regime)
            if method.name == 'scratch' and regime != 'all':
                cells.append('(= all)')
            else:
                cells.append(mean_std(values.values()) if values else '')
        paper = PAPER_SUN397_ALL.get(method.name)
        rows.append(f'| {method.label} | ' + ' | '.join(cells) + (f' | {paper if paper else "—"} |' if paper_column
                                                                   else ' |'))
    return '\n'.join(rows)


def table_by_task(results: Results) -> str:
    rows = ['| method | ' + ' | '.join(task_name(*t) for t in results.tasks) + ' | paper, SUN-397 |',
            '|---' * (len(results.tasks) + 2) + '|']
    for method in results.methods:
        cells = [mean_std(v.values()) if (v := results.values(t, method.name)) else '' for t in results.tasks]
        paper = PAPER_SUN397_ALL.get(method.name)
        rows.append(f'| {method.label} | ' + ' | '.join(cells) + f' | {paper if paper else "—"} |')
    return '\n'.join(rows)


def learning_rate_table(results: Results) -> str:
    rows = ['| method | ' + ' | '.join(results.settings.regimes) + ' |', '|---' * (len(results.settings.regimes) + 1) + '|']
    for method in results.methods:
        cells = []
        for regime in results.settings.regimes:
            groups = [results.group(t, method.name, regime) for t in results.tasks]
            if method.name == 'scratch' and regime != 'all':
                cells.append('(= all)')
            else:
                cells.append(' / '.join(f'{g["chosen_lr"]:g}' for g in groups if g))
        rows.append(f'| {method.label} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(rows)


def sweep_summary(results: Results) -> str:
    """How many chosen rates sit at an edge of the grid, and which runs diverged (non-finite loss)."""
    rates = results.settings.learning_rates
    chosen = [group['chosen_lr'] for group in results.groups.values()]
    lines = [f'{chosen.count(min(rates))} of {len(chosen)} groups chose the lowest rate of the sweep and '
             f'{chosen.count(max(rates))} the highest.', '']
    diverged: dict[tuple[str, str], dict[float, int]] = {}
    for (_, _, method, regime), group in results.groups.items():
        for run in group['runs']:
            if not np.all(np.isfinite(run['train_loss'])):
                counts = diverged.setdefault((method, regime), {})
                counts[run['learning_rate']] = counts.get(run['learning_rate'], 0) + 1
    if not diverged:
        return lines[0] + ' No run diverged.'
    lines += ['Runs whose training loss became non-finite, per learning rate (over tasks and seeds):', '',
              '| method | regime | ' + ' | '.join(f'{lr:g}' for lr in rates) + ' |', '|---' * (len(rates) + 2) + '|']
    order = {m.name: i for i, m in enumerate(results.methods)}
    for (method, regime), counts in sorted(diverged.items(), key=lambda item: (order[item[0][0]], item[0][1])):
        lines.append(f'| {results.labels[method]} | {regime} | ' + ' | '.join(str(counts.get(lr, '')) for lr in rates)
                     + ' |')
    return '\n'.join(lines)


def parameter_table(experiment: dict, results: Results) -> str:
    counts = experiment['parameter_counts']
    base = counts.get('finetune')
    rows = ['| method | parameters | added to fine-tuning |', '|---|---|---|']
    for method in results.methods:
        added = '' if base is None or method.name == 'scratch' else f'{counts[method.name] - base:+,d}'
        rows.append(f'| {method.label} | {counts[method.name]:,d} | {added} |')
    return '\n'.join(rows)


# ---------------------------------------------------------------------------------------------
# Claims


def per_task(results: Results, comparisons: Sequence[Paired]) -> str:
    return '; '.join(f'{task_name(*t)} {c.text()}' for t, c in zip(results.tasks, comparisons))


@dataclasses.dataclass(frozen=True)
class Claim:
    title: str  # the claim, with the paper's numbers
    verdict: str
    evidence: str


CLAIMS_INTRO = ('Differences are test accuracy in points, paired over the seeds (same few-shot draws), mean ± std of '
                'the per-seed difference, regime `all` unless stated; "significant" is a two-sided paired t-test at 5%. '
                'A claim is reproduced when at least half of the tasks show it significantly and none the opposite.')


def claims(results: Results) -> list[Claim]:
    found = []
    if results.has('wa', 'finetune'):
        main = results.compare('wa', 'finetune')
        others = [f'{results.labels[m]} − fine-tune: {per_task(results, results.compare(m, "finetune"))}'
                  for m in ('da', 'dwa', 'wwa') if results.has(m)]
        cells = [c for regime in results.settings.regimes for c in results.compare('wa', 'finetune', regime)]
        found.append(Claim(
            'Growing beats classic fine-tuning (paper: WA 58.95 vs fine-tune 55.93)', verdict(main),
            f'WA-grow − fine-tune: {per_task(results, main)}. {". ".join(others)}. Over all {len(cells)} (task, '
            f'regime) cells WA-grow is ahead in {sum(c.mean > 0 for c in cells)}, significantly in '
            f'{sum(c.sign > 0 for c in cells)}, significantly behind in {sum(c.sign < 0 for c in cells)}.'))
    if results.has('wa', 'da'):
        main = results.compare('wa', 'da')
        found.append(Claim('Widening is slightly better than deepening (paper: WA 58.95 vs DA 58.54)', verdict(main),
                           f'WA-grow − DA: {per_task(results, main)}.'))
    if results.has('wwa', 'wa', 'da', 'finetune'):
        rivals = [m for m in ('finetune', 'wa', 'da', 'dwa', 'wa_ori') if results.has(m)]
        best = [max(['wwa', *rivals], key=lambda m: np.mean(list(results.values(t, m).values()) or [0]))
                for t in results.tasks]
        against = {m: results.compare('wwa', m) for m in rivals}
        worse = [f'{results.labels[m]} ({task_name(*t)})' for m, cs in against.items()
                 for t, c in zip(results.tasks, cs) if c.sign < 0]
        tops = sum(b == 'wwa' for b in best)
        if tops >= (len(best) + 1) // 2 and not worse:
            result = 'reproduced'
        elif worse and tops == 0:
            result = 'not reproduced'
        else:
            result = 'unclear at this scale'
        found.append(Claim(
            'Two widened layers (WWA) are best (paper: WWA 59.05, its best)', result,
            f'Best method in regime `all` per task: '
            f'{", ".join(f"{task_name(*t)}: {results.labels[b]}" for t, b in zip(results.tasks, best))}. '
            f'WWA − fine-tune: {per_task(results, against["finetune"])}. WWA significantly behind: '
            f'{", ".join(worse) if worse else "nowhere"}. (Reproduced: WWA best in at least half of the tasks and '
            'never significantly behind another growth method or fine-tuning.)'))
    if results.has('wa_ori', 'finetune'):
        main = results.compare('finetune', 'wa_ori')
        grow = f' WA-grow − WA-ori (what normalisation buys): {per_task(results, results.compare("wa", "wa_ori"))}.' \
            if results.has('wa') else ''
        found.append(Claim(
            'Widening without normalisation and scaling is worse than plain fine-tuning (paper: WA-ori 51.34 vs '
            'fine-tune 55.93)', verdict(main), f'Fine-tune − WA-ori: {per_task(results, main)}.{grow}'))
    if results.has('wa', 'wa_ori'):
        new_minus_old = lambda run: run['test']['cooperation/fc7_plus'] - run['test']['cooperation/fc7']
        zero = {s: 0.0 for s in range(results.settings.seeds)}
        grow = [paired(results.values(t, 'wa', 'all', new_minus_old), zero) for t in results.tasks]
        ori = [paired(results.values(t, 'wa_ori', 'all', new_minus_old), zero) for t in results.tasks]
        found.append(Claim(
            'With normalisation the new units become more useful than the old ones (paper Fig. 6)', verdict(grow),
            'In the paper the classifier reading only the new units of WA-grow beats the one reading only the old '
            'units, while without normalisation the new units are left far behind. Test accuracy reading only the new '
            f'units − only the old units, end of training, WA-grow: {per_task(results, grow)}; WA-ori: '
            f'{per_task(results, ori)}. {scale_movement(results)} See [cooperation.png]({FIGURE_DIR}/cooperation.png) '
            f'and [scales.png]({FIGURE_DIR}/scales.png).'))
    loras = results.lora_names()
    if loras and results.has('wa'):
        lines, comparisons = [], []
        for name in loras:
            for regime in ('new', 'all'):
                if regime in results.settings.regimes:
                    pairs = [paired(results.values(t, 'wa'), results.values(t, name, regime)) for t in results.tasks]
                    comparisons += pairs
                    lines.append(f'WA-grow (`all`) − {results.labels[name]} (`{regime}`): {per_task(results, pairs)}')
        found.append(Claim(
            'Growth vs LoRA (not in the paper: the parameter-efficient alternative; LoRA in `new` is classic LoRA)',
            f'WA-grow significantly ahead in {sum(c.sign > 0 for c in comparisons)} and behind in '
            f'{sum(c.sign < 0 for c in comparisons)} of {len(comparisons)} comparisons',
            '. '.join(lines) + '.'))
    return found


def scale_movement(results: Results) -> str:
    """How far WA-grow's learned scales at the classifier moved from their initial value, at most."""
    moves = {index: [] for index in ('0', '1')}
    for task in results.tasks:
        for regime in results.settings.regimes:
            for run in chosen_runs(results.group(task, 'wa', regime)):
                for index in moves:
                    curve = [v[f'scale/classifier_norm/{index}'] for v in run['validation']]
                    moves[index].append(max(abs(c / curve[0] - 1) for c in curve))
    largest = max(max(moves['0']), max(moves['1']))
    reading = ('they stay where they started, so what normalisation changes here is the per-group normalisation '
               'itself, not a learned re-weighting' if largest < 0.05 else 'they do learn a re-weighting')
    return (f'The learned scales (mean gamma of the old / new units at the classifier) moved by at most '
            f'{100 * max(moves["0"]):.2g}% / {100 * max(moves["1"]):.2g}% of their initial value in any WA-grow '
            f'run: {reading}.')


def shots_paragraph(results: Results) -> str:
    lines = []
    for task in results.tasks:
        ft, scratch = results.values(task, 'finetune'), results.values(task, 'scratch')
        if ft and scratch:
            ok = max(ft.values()) < 0.97 and np.mean(list(ft.values())) > np.mean(list(scratch.values()))
            lines.append(f'{task_name(*task)}: fine-tune {mean_std(ft.values())} vs scratch {mean_std(scratch.values())}'
                         f' ({"criterion holds" if ok else "criterion FAILS"})')
    return '; '.join(lines)


# ---------------------------------------------------------------------------------------------
# Figures


def mean_curve(group: dict, key: str) -> tuple[list[int], np.ndarray]:
    runs = chosen_runs(group)
    return runs[0]['steps'], np.mean([[v.get(key, np.nan) for v in run['validation']] for run in runs], axis=0)


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    _pyplot().close(fig)
    return path


def figure_cooperation(results: Results, path: str) -> str | None:
    if not results.has('wa', 'wa_ori'):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(results.tasks), 2, figsize=(9, 2.6 * len(results.tasks)), squeeze=False)
    for row, task in zip(axes, results.tasks):
        for ax, method in zip(row, ('wa_ori', 'wa')):
            group = results.group(task, method, 'all')
            for key, style in (('cooperation/fc7', 'o-'), ('cooperation/fc7_plus', 's-'), ('cooperation/all', 'k--')):
                steps, curve = mean_curve(group, key)
                ax.plot(steps, curve, style, label=group_label(key.split('/')[1]))
            ax.set(title=f'{results.labels[method]}, {task_name(*task)}', xlabel='step', ylabel='val. accuracy',
                   ylim=(0, 1))
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, title='classifier reads', title_fontsize=8)
    fig.suptitle('Cooperation of old and new units (paper Fig. 6), regime all, mean over seeds')
    return _save(fig, path)


def figure_learning_curves(results: Results, path: str) -> str:
    plt = _pyplot()
    cols = min(2, len(results.tasks))
    rows = -(-len(results.tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.4 * rows), squeeze=False)
    for ax, task in zip(axes.flat, results.tasks):
        for method in results.methods:
            group = results.group(task, method.name, 'all')
            if group:
                steps, curve = mean_curve(group, 'accuracy')
                ax.plot(steps, curve, 'o-' if method.grows else 'x--', label=method.label, markersize=3)
        ax.set(title=task_name(*task), xlabel='step', ylabel='val. accuracy', ylim=(0, 1))
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(results.tasks):]:
        ax.axis('off')
    axes.flat[0].legend(fontsize=7, ncol=2)
    fig.suptitle('Learning curves, regime all, chosen learning rate, mean over seeds')
    return _save(fig, path)


# Where each method's old and new fc7 units meet (a NormScale whose group 0 is old fc7, group 1 fc7_plus).
MEETING_NORM = {'wa': 'classifier_norm', 'dwa': 'fc_a_norm', 'wwa': 'classifier_norm'}


def figure_scales(results: Results, path: str, scale_init: float) -> str | None:
    methods = [m for m in MEETING_NORM if results.has(m)]
    if not methods:
        return None
    plt = _pyplot()
    regimes = results.settings.regimes
    fig, axes = plt.subplots(1, len(regimes), figsize=(4.2 * len(regimes), 3.4), squeeze=False, sharey=True)
    task = results.tasks[0]
    colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
    for ax, regime in zip(axes[0], regimes):
        for colour, method in zip(colours, methods):
            group = results.group(task, method, regime)
            for index, style in (('0', '-'), ('1', '--')):
                steps, curve = mean_curve(group, f'scale/{MEETING_NORM[method]}/{index}')
                ax.plot(steps, curve - scale_init, style, color=colour,
                        label=f'{results.labels[method]}, {"old fc7" if index == "0" else "new fc7_plus"}')
        ax.set(title=f'regime {regime}', xlabel='step', ylabel=f'mean gamma − {scale_init:g} (its init)')
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f'Learned scales of old (solid) and new (dashed) fc7 units where they meet, {task_name(*task)}')
    return _save(fig, path)


def figure_parameter_change(results: Results, path: str) -> str:
    plt = _pyplot()
    methods = [m for m in results.methods if m.name == 'finetune' or m.grows]
    layers = ('conv1', 'conv2', 'fc6', 'fc7')
    task = results.tasks[0]
    regimes = [r for r in ('fc7_new', 'all') if r in results.settings.regimes] or list(results.settings.regimes)
    fig, axes = plt.subplots(1, len(regimes), figsize=(5.5 * len(regimes), 3.4), squeeze=False)
    width = 0.8 / max(len(methods), 1)
    for ax, regime in zip(axes[0], regimes):
        for i, method in enumerate(methods):
            runs = chosen_runs(results.group(task, method.name, regime))
            values = [np.mean([run['test'].get(f'change/{layer}', np.nan) for run in runs]) for layer in layers]
            ax.bar(np.arange(len(layers)) + (i - (len(methods) - 1) / 2) * width, values, width, label=method.label)
        ax.set_xticks(np.arange(len(layers)), layers)
        ax.set(title=f'regime {regime}', ylabel='||w - w0|| / ||w0||')
        ax.grid(alpha=0.3, axis='y')
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f'Relative change of each pretrained layer, {task_name(*task)}, end of training', fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# results.md


def versions() -> str:
    import flax
    import jax
    import jaxlib
    import optax
    return (f'Python {platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, '
            f'flax {flax.__version__}, optax {optax.__version__}, numpy {np.__version__}; '
            f'{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, backend {jax.default_backend()}')


def write_report(experiment: dict, settings: Settings, base, docs_dir: str, *, command: str, seconds: float) -> str:
    results = Results(experiment, settings)
    figures_dir = os.path.join(docs_dir, FIGURE_DIR)
    os.makedirs(figures_dir, exist_ok=True)
    made = {name: make(results, os.path.join(figures_dir, f'{name}.png')) for name, make in (
        ('cooperation', figure_cooperation), ('learning_curves', figure_learning_curves),
        ('scales', lambda r, p: figure_scales(r, p, base.growth.scale_init)),
        ('parameter_change', figure_parameter_change))}
    compute_seconds = sum(group.get('seconds', 0.0) for group in results.groups.values())
    task_order = ', '.join(task_name(*t) for t in results.tasks)
    s = settings
    lines = [
        '# Growing a Brain on the built-in data: results',
        '',
        f'Written by `{command}` on {datetime.date.today()}. This invocation took {seconds / 60:.1f} min and '
        f'computed {experiment["computed"]} of the {len(results.groups)} (task, method, regime) groups (the rest '
        f'were reused from earlier invocations with identical settings); computing all groups took '
        f'{compute_seconds / 60:.1f} min in all (compilation included), plus '
        f'{experiment["pretrain_seconds"] / 60:.1f} min here to load (or, when not cached, train) the source model.',
        f'Versions: {versions()}.',
        '',
        '## Set-up',
        '',
        f'- Source model: `small_cnn` (width {base.model.width}) trained on the rendered Latin letters '
        f'(`init.pretrained={base.init.pretrained!r}`, {base.init.pretrain_steps} steps; cached and reused).',
        f'- Targets: {task_order}; few-shot draws from the train split with `growjax.data.few_shot_indices`; '
        'learning rates selected on the validation split, accuracy reported on the test split.',
        f'- Methods: S = {s.units} new units (WA/DWA: fc7 + S; DA: fc_a of S; WWA: fc6 + S/2, fc7 + S); '
        f'LoRA on fc6 and fc7 at the rank that adds about as many parameters as WA, and at rank {s.lora_small_rank}. '
        'Scratch has no pretrained layers, so its regimes coincide (run once).',
        f'- Training: {s.steps} steps of batch {s.batch_size}, SGD momentum {base.train.momentum}, weight decay '
        f'{base.train.weight_decay} (kernels), learning rate / 10 at {tuple(base.train.lr_decay_at)} of training, '
        f'new leaves at {base.train.new_lr_multiplier:g}x the base rate, random {base.data.crop_padding}-pixel crops.',
        f'- Fairness: every (method, regime, task) sweeps the same base learning rates {list(s.learning_rates)}; the '
        f'rate with the best mean validation accuracy over seeds {list(range(s.sweep_seeds))} is chosen, and test '
        f'accuracy is the mean ± std over seeds {list(range(s.seeds))} at that rate. All methods see the same '
        'few-shot examples, batches and crops at a given seed.',
        '',
        '## How the few-shot sizes were chosen',
        '',
        'With the `main.py` defaults (5 shots, 300 steps) plain fine-tuning on Greek is close to the ceiling, which '
        'leaves no room to see differences, so the targets use 1 and 2 shots per class. The criterion is that '
        'fine-tuning sits well below 100% and above scratch, checked here on this run\'s own numbers '
        f'(regime `all`): {shots_paragraph(results) or "(scratch or fine-tune not run)"}.',
        '',
        '## Table 1 analogue: test accuracy (%) by method and regime',
        '',
        'Mean ± std over seeds at the chosen learning rate. The last column is the paper\'s AlexNet on SUN-397 in '
        'regime `all` (only those numbers are quoted here; see the paper for its other cells).',
        '',
    ]
    for task in results.tasks:
        lines += [f'### {task_name(*task)}', '', table_by_regime(results, task), '']
    lines += [
        '## Table 3 analogue: test accuracy (%) by dataset, regime `all`',
        '',
        table_by_task(results),
        '',
        '## Chosen learning rates',
        '',
        f'Base learning rate chosen on validation, per regime, for the tasks in the order {task_order}.',
        '',
        learning_rate_table(results),
        '',
        sweep_summary(results),
        '',
        '## Parameters',
        '',
        parameter_table(experiment, results),
        '',
        '## The claims',
        '',
    ]
    found = claims(results)
    lines += [CLAIMS_INTRO, '', '| claim | verdict |', '|---|---|']
    lines += [f'| {i}. {claim.title} | {claim.verdict} |' for i, claim in enumerate(found, 1)]
    lines += ['']
    lines += [f'**{i}. {claim.title}.** {claim.evidence} Verdict: **{claim.verdict}**.\n'
              for i, claim in enumerate(found, 1)]
    lines += ['## Figures', '']
    captions = {
        'cooperation': 'Cooperation of old and new units (paper Fig. 6): validation accuracy of the classifier '
                       'reading only the old fc7 units, only the new fc7_plus units, or both, over training, '
                       'WA-ori vs WA-grow.',
        'learning_curves': 'Learning curves of every method (validation accuracy, regime `all`).',
        'scales': 'Learned NormScale scales (mean gamma) of the old and the new units where they meet the classifier.',
        'parameter_change': 'Relative change ||w - w0|| / ||w0|| of each pretrained layer at the end of training.',
    }
    for name, path in made.items():
        if path:
            lines += [f'![{name}]({FIGURE_DIR}/{name}.png)', '', captions[name], '']
    lines += [
        '## Reproduce',
        '',
        '```bash',
        command,
        '```',
        '',
        'Finished (task, method, regime) groups are stored under the workdir (`runs/`) and reused when the command is '
        'rerun with the same settings. The same analyses for any `main.py` run: `--config.train.analysis=True` logs '
        'them to `metrics.jsonl`, and `python -m growjax.analysis --workdir=DIR` plots them (or computes them from '
        'the run\'s export).',
        '',
    ]
    path = os.path.join(docs_dir, 'results.md')
    kept = sections_of(path)  # the sections other commands wrote stay
    with open(path, 'w') as f:
        f.write('\n'.join(lines))
    splice(path, keep=kept)
    return path


# ---------------------------------------------------------------------------------------------
# The ViT section of results.md (experiments.vit)

def markers(name: str) -> tuple[str, str]:
    """The comments that delimit section `name` of results.md, written by its own command."""
    return f'<!-- {name}:begin (written by python -m experiments.{name}) -->', f'<!-- {name}:end -->'


SECTIONS = ('vit', 'map')  # sections other commands write into results.md, in this order after the paper's


def sections_of(path: str) -> dict[str, str]:
    """{name: text} of the sections written by other commands that `path` holds."""
    text = open(path).read() if os.path.exists(path) else ''
    found = {}
    for name in SECTIONS:
        begin, end = markers(name)
        if begin in text:
            found[name] = text.partition(begin)[2].partition(end)[0].strip()
    return found


def splice(path: str, name: str | None = None, section: str | None = None, keep: dict[str, str] | None = None) -> None:
    """Rewrites the sections after the paper's in `path`: `name`'s with `section`, the others as `keep`
    (default: as `path` holds them), in SECTIONS order."""
    sections = sections_of(path) if keep is None else dict(keep)
    if name is not None:
        sections[name] = section.strip()
    text = open(path).read() if os.path.exists(path) else '# growjax results\n'
    first = min((text.index(markers(n)[0]) for n in SECTIONS if markers(n)[0] in text), default=len(text))
    parts = [text[:first].rstrip('\n')]
    for n in SECTIONS:
        if n in sections:
            begin, end = markers(n)
            parts.append(f'{begin}\n{sections[n]}\n{end}')
    with open(path, 'w') as f:
        f.write('\n\n'.join(parts) + '\n')


def vit_claims(results: Results) -> list[Claim]:
    """Within each regime: each growth against fine-tuning, normalisation (WA-grow vs WA-ori), wider vs
    deeper, and the best growth against each LoRA. (A ViT's best regime depends on the method and
    the data, so every comparison is made regime by regime rather than in `all` only.)"""
    found = []
    growth = [m.name for m in results.methods if m.grows]
    for regime in results.settings.regimes:
        pairs = [(m, 'finetune') for m in growth if results.has('finetune')]
        if results.has('wa', 'wa_ori'):
            pairs.append(('wa', 'wa_ori'))
        if results.has('wa', 'da'):
            pairs.append(('wa', 'da'))
        candidates = [m for m in growth if m != 'wa_ori']
        if candidates:
            best = max(candidates, key=lambda m: np.mean([np.mean(list(results.values(t, m, regime).values()) or [0])
                                                          for t in results.tasks]))
            pairs += [(best, lora) for lora in results.lora_names()]
        for a, b in pairs:
            comparisons = results.compare(a, b, regime)
            found.append(Claim(f'{results.labels[a]} − {results.labels[b]}, regime `{regime}`', verdict(comparisons),
                               per_task(results, comparisons)))
    return found


def vit_section(experiment: dict, settings: Settings, base, docs_dir: str, *, command: str, seconds: float) -> str:
    """The markdown of the ViT results, with its learning-curve figure written to docs_dir/figures."""
    results = Results(experiment, settings)
    figures_dir = os.path.join(docs_dir, FIGURE_DIR)
    os.makedirs(figures_dir, exist_ok=True)
    figure = figure_learning_curves(results, os.path.join(figures_dir, 'vit_learning_curves.png'))
    v = base.model.vit
    sizes = ', '.join(f'{key} {v[key]}' for key in ('width', 'depth', 'mlp_dim', 'num_heads') if v[key]) or 'its sizes'
    compute_seconds = sum(group.get('seconds', 0.0) for group in results.groups.values())
    task_order = ', '.join(task_name(*t) for t in results.tasks)
    s = settings
    lines = [
        '## Vision transformer',
        '',
        f'Written by `{command}` on {datetime.date.today()}: {seconds / 60:.1f} min for this invocation '
        f'({experiment["computed"]} of {len(results.groups)} groups computed; all groups took {compute_seconds / 60:.1f} '
        f'min, plus {experiment["pretrain_seconds"] / 60:.1f} min to load or train the source model). Versions: '
        f'{versions()}.',
        '',
        f'- Source model: growjax\'s ViT (variant `{v.variant}`; {sizes}; `{v.pool_type}` pooling) trained from '
        f'scratch on the rendered Latin letters with AdamW ({base.init.pretrain_steps} steps; cached).',
        f'- Growth through `growjax.surgery` (growjax/methods.py): WA widens the MLP hidden layer of the top '
        f'{base.growth.blocks} block(s) by S = {s.units} units (NormScale where they meet fc2; WA-ori without), DA adds '
        f'{base.growth.blocks} encoder block(s) on top starting as the identity, "more heads" adds {base.growth.heads} '
        'heads to the top block(s) (NormScale where the output projection reads old and new heads), LoRA adapts '
        'every attention projection (at the rank matching WA\'s added parameters'
        f'{f", and at rank {s.lora_small_rank}" if s.lora_small_rank else ""}).',
        f'- Protocol as for the CNN above: targets {task_order}; {s.steps} SGD steps of batch {s.batch_size} '
        f'(momentum {base.train.momentum}, new leaves at {base.train.new_lr_multiplier:g}x); every (method, regime, '
        f'task) sweeps {list(s.learning_rates)} and the rate with the best validation accuracy over seeds '
        f'{list(range(s.sweep_seeds))} is chosen; test accuracy is mean ± std over seeds {list(range(s.seeds))}, '
        'paired (the same examples, batches and crops for every method).',
        f'- Regimes: {", ".join(f"`{r}`" for r in s.regimes)} (`blockK_new`: block K and every layer above it, '
        'plus all new leaves).',
        '',
        '### Test accuracy (%) by method and regime',
        '',
    ]
    for task in results.tasks:
        lines += [f'#### {task_name(*task)}', '', table_by_regime(results, task, paper_column=False), '']
    found = vit_claims(results)
    lines += [
        '### Chosen learning rates', '', learning_rate_table(results), '', sweep_summary(results), '',
        '### Parameters', '', parameter_table(experiment, results), '',
        '### Verdicts', '',
        'Each row: test accuracy of the first method minus the second, in points, paired over seeds (mean ± std of '
        'the per-seed difference) per task, in one regime; "significant" is a two-sided paired t-test at 5%. The first '
        'method is ahead ("reproduced") when at least half of the tasks show it significantly and none the opposite. '
        'For LoRA the growth compared is the one with the best mean test accuracy in that regime.', '',
        '| comparison | per task | verdict |', '|---|---|---|',
        *[f'| {claim.title} | {claim.evidence} | {claim.verdict} |' for claim in found], '',
        f'![vit_learning_curves]({FIGURE_DIR}/{os.path.basename(figure)})', '',
        'Learning curves of every method on the ViT (validation accuracy, regime `all`).', '',
        '```bash', command, '```', '',
    ]
    return '\n'.join(lines)


def write_vit_section(experiment: dict, settings: Settings, base, docs_dir: str, *, command: str,
                      seconds: float) -> str:
    path = os.path.join(docs_dir, 'results.md')
    splice(path, 'vit', vit_section(experiment, settings, base, docs_dir, command=command, seconds=seconds))
    return path
