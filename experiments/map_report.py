"""The 'map' section of docs/results.md and its figures (docs/figures/map_*.png), from stored runs only.

Every number is read from the groups experiments.map stored; differences are paired over seeds
(the same examples, batches and crops for every method at a seed), with 95% t-intervals and a
two-sided paired t-test at 5% ('*').
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
from typing import Sequence

import numpy as np

from experiments import report
from experiments.protocol import collapsed as collapsed_run

FIGURES = report.FIGURE_DIR
TASK_NAMES = {'growjax_greek': 'Greek letters (near)', 'growjax_digits': 'Handwritten digits (far)',
              'growjax_scripts': 'other scripts, 131 classes (far, larger)'}
VERDICT_WORDS = {1: 'ahead', 0: 'no significant difference', -1: 'behind'}
BANDS = (('1-5', (1, 2, 5)), ('10-20', (10, 20)), ('50-full', (50, 0)))
PROTOCOLS = (('own', 'per-method rate'), ('shared', "fine-tuning's rate for all (the paper's protocol)"))


def task_name(dataset: str) -> str:
    return TASK_NAMES.get(dataset.split('/')[0], dataset)


def short_task(dataset: str) -> str:
    return dataset.split('/')[0].removeprefix('growjax_').capitalize()


def size_name(shots: int, full: int | None = None) -> str:
    if shots:
        return str(shots)
    return 'full' if full is None else f'full ({full})'


# ---------------------------------------------------------------------------------------------
# Numbers


def runs_at(group: dict | None, rate: float | None, seeds: int | None = None) -> list[dict]:
    """The group's runs at `rate` (of the first `seeds` seeds when given: a larger --seeds is not mixed in)."""
    if group is None or rate is None:
        return []
    return [r for r in group['runs'] if r['learning_rate'] == rate and (seeds is None or r['seed'] < seeds)]


def is_collapsed(group: dict, run: dict) -> bool:
    """A run that diverged or ended at chance (protocol.collapsed with the group's 'chance_limit' and
    'num_classes', which experiments.map puts on every group it reads: a group without them is a reading
    path that skipped it, and raises)."""
    return collapsed_run(run, group['chance_limit'], group['num_classes'])


def values(group: dict | None, rate: float | None, seeds: int | None = None) -> dict[int, float]:
    """{seed: test accuracy} of the group's runs at `rate`, without the runs that collapsed: those
    measure a divergence, not the method (`collapsed_seeds` counts them)."""
    return {r['seed']: r['test']['accuracy'] for r in runs_at(group, rate, seeds) if not is_collapsed(group, r)}


def collapsed_seeds(group: dict | None, rate: float | None, seeds: int | None = None) -> list[int]:
    """The seeds whose run at `rate` collapsed (diverged or ended at chance)."""
    return sorted(r['seed'] for r in runs_at(group, rate, seeds) if is_collapsed(group, r))


def stored_seeds(group: dict | None, rate: float | None, seeds: int | None = None) -> int:
    """How many seeds ran at `rate`, collapsed or not (whether a cell is complete)."""
    return len(runs_at(group, rate, seeds))


@dataclasses.dataclass(frozen=True)
class Diff:
    """Mean of a - b over paired seeds, its 95% t-interval and the paired t-test's p-value; `left_out`
    seeds collapsed in either arm and are not in it."""
    mean: float
    low: float
    high: float
    n: int
    p: float
    left_out: int = 0

    @property
    def sign(self) -> int:
        return int(np.sign(self.mean)) if self.p < 0.05 else 0

    def text(self, digits: int = 1) -> str:
        mark = '*' if self.sign else ''
        out = f' ({self.left_out} collapsed, left out)' if self.left_out else ''
        return f'{100 * self.mean:+.{digits}f} [{100 * self.low:+.{digits}f}, {100 * self.high:+.{digits}f}]{mark}{out}'


def diff(a: dict[int, float], b: dict[int, float] | float, left_out: int = 0) -> Diff | None:
    """a - b paired over common seeds (b a number: a one-sample interval); None below 2 seeds."""
    from scipy import stats
    b = b if isinstance(b, dict) else {seed: b for seed in a}
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = np.asarray([a[s] - b[s] for s in seeds])
    sd = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.975, len(d) - 1)) * sd / math.sqrt(len(d))
    if sd == 0:
        p = 1.0 if d.mean() == 0 else 0.0
    else:
        p = float(2 * stats.t.sf(abs(d.mean()) / (sd / math.sqrt(len(d))), len(d) - 1))
    return Diff(float(d.mean()), float(d.mean() - half), float(d.mean() + half), len(d), p, left_out)


@dataclasses.dataclass(frozen=True)
class Arm:
    """One method's runs at one rate, as a comparison reads them: the seeds stored, and those collapsed."""
    group: dict | None
    rate: float | None
    seeds: int | None = None  # only the first `seeds` seeds

    @property
    def values(self) -> dict[int, float]:
        return values(self.group, self.rate, self.seeds)

    @property
    def collapsed(self) -> list[int]:
        return collapsed_seeds(self.group, self.rate, self.seeds)

    @property
    def stored(self) -> int:
        return stored_seeds(self.group, self.rate, self.seeds)


def paired(a: Arm, b: Arm, seeds: int) -> Diff | None:
    """a - b over the seeds where neither collapsed; None for an incomplete cell (fewer than `seeds`
    stored) or one with fewer than 2 seeds left (`collapsed_text` names it)."""
    if a.stored < seeds or b.stored < seeds:
        return None
    left_out = len(set(a.collapsed) | set(b.collapsed))
    return diff(a.values, b.values, left_out)


def gain_cell(a: Arm, b: Arm, seeds: int, labels: Sequence[str]) -> str:
    """a - b as a table cell: the paired interval, or which arm collapsed where no test is left."""
    d = paired(a, b, seeds)
    if d is not None:
        return d.text()
    return '' if a.stored < seeds or b.stored < seeds else collapsed_text((a, b), labels, seeds)


def collapsed_text(arms: Sequence[Arm], labels: Sequence[str], seeds: int) -> str:
    """'collapsed: WA-grow 4 of 5 seeds at chance' for a comparison that collapse left without a test."""
    parts = [f'{label} {len(arm.collapsed)} of {seeds}' for arm, label in zip(arms, labels) if arm.collapsed]
    return f'collapsed: {", ".join(parts)} seeds diverged or at chance' if parts else ''


def mean_half(values_: dict[int, float] | Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval) in points; nan without values, half 0 for one value."""
    x = 100 * np.asarray(list(values_.values()) if isinstance(values_, dict) else list(values_), float)
    if len(x) < 2:
        return (float(x.mean()) if len(x) else math.nan), 0.0
    from scipy import stats
    return float(x.mean()), float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def mean_ci(values_: dict[int, float] | Sequence[float]) -> str:
    mean, half = mean_half(values_)
    if math.isnan(mean):
        return ''
    return f'{mean:.1f} ± {half:.1f}' if len(values_) > 1 else f'{mean:.1f}'


def dtext(d: Diff | None) -> str:
    return '' if d is None else d.text()


def seeds_text(values_: dict[int, float], seeds: int, collapsed: int = 0) -> str:
    """mean_ci, marked when fewer than the planned seeds are stored (a group computed part-way) and with
    the seeds that collapsed (left out of the mean)."""
    if collapsed:
        text = mean_ci(values_)
        stored = len(values_) + collapsed
        note = f'{collapsed} of {stored} seeds collapsed' + (', left out' if text else '') + (
            f'; {stored} of {seeds} seeds stored' if stored < seeds else '')
        return f'{text} ({note})' if text else f'({note})'
    text = mean_ci(values_)
    return f'{text} ({len(values_)} of {seeds} seeds)' if text and len(values_) < seeds else text


def arm_text(arm: 'Arm', seeds: int) -> str:
    """An arm's test accuracy: seeds_text of the seeds that did not collapse, with the count of those that did."""
    return seeds_text(arm.values, seeds, len(arm.collapsed))


def lora_rank(m, dataset: str) -> int:
    """LoRA's rank on one target: matched to WA's added parameters, so it depends on the number of classes."""
    return dict(m.method('lora', dataset).overrides)['growth.lora_rank']


def row_label(m, name: str, dataset: str) -> str:
    """A method's label in one target's tables (LoRA's with its rank there)."""
    label = m.method(name, dataset).label
    return f'{label} r = {lora_rank(m, dataset)}' if name == 'lora' else label


class SizeMap:
    """The size axis: per (dataset, shots, method) group, readings under both protocols."""

    def __init__(self, m, groups: dict):
        self.m, self.groups = m, groups
        self.tasks = [t for t in m.settings.tasks if any(k[0] == t for k in groups)]
        self.methods = [n for n in m.settings.methods if n != 'finetune']
        first = (self.tasks or m.settings.tasks)[0]  # nothing stored yet: the tables are empty, the labels still named
        self.labels = {name: m.method(name, first).label for name in m.settings.methods}

    def sizes(self, dataset: str) -> list[int]:
        return self.m.sizes(dataset, self.m.settings.sizes)

    def full_count(self, dataset: str) -> str:
        counts = self.m.class_counts(dataset)
        return str(int(counts.min())) if counts.min() == counts.max() else f'{int(counts.min())}-{int(counts.max())}'

    def rate(self, dataset: str, shots: int, method: str, protocol: str) -> float | None:
        group = self.groups.get((dataset, shots, method if protocol == 'own' else 'finetune'))
        return None if group is None else group.get('chosen_lr')

    def arm(self, dataset: str, shots: int, method: str, protocol: str = 'own') -> Arm:
        """The method's runs at its rate under `protocol`, over the planned seeds."""
        return Arm(self.groups.get((dataset, shots, method)), self.rate(dataset, shots, method, protocol),
                   self.m.settings.seeds)

    def accuracies(self, dataset: str, shots: int, method: str, protocol: str = 'own') -> dict[int, float]:
        """{seed: test accuracy} over the planned seeds, without collapsed runs."""
        return self.arm(dataset, shots, method, protocol).values

    def gain(self, dataset: str, shots: int, method: str, protocol: str, reference: str = 'finetune') -> Diff | None:
        """method - reference, paired; None for incomplete cells and those collapse left untestable."""
        return paired(self.arm(dataset, shots, method, protocol), self.arm(dataset, shots, reference, protocol),
                      self.m.settings.seeds)

    def gain_text(self, dataset: str, shots: int, method: str, protocol: str, reference: str = 'finetune') -> str:
        """The gain's table cell: its interval, or which arm collapsed where no test is left."""
        return gain_cell(self.arm(dataset, shots, method, protocol), self.arm(dataset, shots, reference, protocol),
                         self.m.settings.seeds, [self.labels[name] for name in (method, reference)])


# ---------------------------------------------------------------------------------------------
# Figures


def plain(label: str) -> str:
    return label.replace('`', '')


def annotate(ax, grid, marks, limit, fontsize):
    """Each cell's value (bold and starred where significant), white on dark cells."""
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f'{grid[i, j]:+.1f}{"*" if marks[i, j] else ""}', ha='center', va='center',
                        fontsize=fontsize, fontweight='bold' if marks[i, j] else 'normal',
                        color='white' if abs(grid[i, j]) > 0.6 * limit else 'black')


def _plt():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def figure_gain(size: SizeMap, path: str) -> str | None:
    """Heatmaps of the gain over fine-tuning: protocols (rows) x targets (columns), methods x sizes."""
    if not size.tasks or not size.methods:
        return None
    plt = _plt()
    fig, axes = plt.subplots(2, len(size.tasks), figsize=(4.4 * len(size.tasks), 2 * 0.45 * len(size.methods) + 2.8),
                             squeeze=False, constrained_layout=True)
    grids = {}
    for p, (protocol, _) in enumerate(PROTOCOLS):
        for t, dataset in enumerate(size.tasks):
            sizes = size.sizes(dataset)
            grid = np.full((len(size.methods), len(sizes)), np.nan)
            marks = np.zeros_like(grid)
            for i, method in enumerate(size.methods):
                for j, shots in enumerate(sizes):
                    d = size.gain(dataset, shots, method, protocol)
                    if d is not None:
                        grid[i, j], marks[i, j] = 100 * d.mean, d.sign
            grids[p, t] = (grid, marks, sizes)
    # The colour scale is clipped at the 90th percentile of |gain|, at least 5 points: one diverged cell
    # (e.g. -65 at a shared rate) does not wash out every other cell, and differences within seed noise
    # (a point or two) stay pale; the numbers printed in the cells are exact.
    magnitudes = np.concatenate([np.abs(g[np.isfinite(g)]) for g, _, _ in grids.values()])
    limit = max(5.0, float(np.percentile(magnitudes, 90))) if magnitudes.size else 5.0
    for (p, t), (grid, marks, sizes) in grids.items():
        ax = axes[p][t]
        image = ax.imshow(grid, cmap='RdBu', vmin=-limit, vmax=limit, aspect='auto')
        annotate(ax, grid, marks, limit, 7)
        ax.set_xticks(range(len(sizes)), [size_name(s) for s in sizes], fontsize=8)
        ax.set_yticks(range(len(size.methods)), [plain(size.labels[m]) for m in size.methods], fontsize=8)
        ax.set_title(f'{short_task(size.tasks[t])}: {PROTOCOLS[p][1].split(" (")[0]}', fontsize=9)
        ax.set_xlabel('examples per class', fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.6, extend='both',
                 label=f'test accuracy − fine-tuning (points; colours clipped at ±{limit:.1f})')
    fig.suptitle('Gain over fine-tuning (mean over seeds; * paired t-test p < 0.05)', fontsize=10)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def figure_accuracy(size: SizeMap, path: str) -> str | None:
    """Test accuracy against examples per class, per target and method (per-method rates), 95% intervals."""
    if not size.tasks:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(size.tasks), figsize=(4.5 * len(size.tasks), 3.6), squeeze=False)
    for t, dataset in enumerate(size.tasks):
        ax = axes[0][t]
        sizes = size.sizes(dataset)
        for k, method in enumerate(['finetune', *size.methods]):
            xs, ys, errs = [], [], []
            for j, shots in enumerate(sizes):
                acc = size.accuracies(dataset, shots, method)
                if len(acc) >= 2:
                    mean, half = mean_half(acc)
                    xs.append(j)
                    ys.append(mean)
                    errs.append(half)
            if xs:
                ax.errorbar(xs, ys, yerr=errs, marker='o', markersize=3, capsize=2, linewidth=1.2 if method == 'finetune'
                            else 0.8, color='black' if method == 'finetune' else f'C{k - 1}',  # one colour per method
                            label=plain(size.labels[method]))
        ax.set_xticks(range(len(sizes)), [size_name(s) for s in sizes])
        ax.set_xlabel('examples per class')
        ax.set_ylabel('test accuracy (%)')
        ax.set_title(task_name(dataset), fontsize=9)
        ax.grid(alpha=0.3)
    handles = {}  # every method once, also one run on some targets only
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.legend(handles.values(), handles.keys(), loc='center right', fontsize=7)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def figure_convergence(m, size: SizeMap, path: str) -> str | None:
    """Validation accuracy over training of fine-tuning at its chosen rate (mean over seeds), one
    line per size: every curve flat at the end."""
    if not size.tasks:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(size.tasks), figsize=(4.5 * len(size.tasks), 3.4), squeeze=False)
    for t, dataset in enumerate(size.tasks):
        ax = axes[0][t]
        for k, shots in enumerate(size.sizes(dataset)):
            for method, style in (('finetune', '-'), ('wa', '--')):
                group = size.groups.get((dataset, shots, method))
                rate = None if group is None else group.get('chosen_lr')
                runs = [r for r in runs_at(group, rate, m.settings.seeds) if not is_collapsed(group, r)]
                if not runs:
                    continue
                steps = np.asarray(runs[0]['steps'], float)
                curve = np.mean([[v['accuracy'] for v in r['validation']] for r in runs], axis=0)
                ax.plot(steps / steps[-1], 100 * curve, style, marker='.', color=f'C{k}',
                        label=f'{size_name(shots)} ({int(steps[-1])} steps)' if method == 'finetune' else None)
        ax.set_xlabel(f'fraction of training (lr / 10 at {" and ".join(f"{x:g}" for x in m.base.train.lr_decay_at)})')
        ax.set_ylabel('validation accuracy (%)')
        ax.set_title(f'{task_name(dataset)}: fine-tuning (solid), WA-grow (dashed)', fontsize=8)
        ax.legend(fontsize=7, title='examples per class', title_fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def figure_capacity(m, capacity: dict, path: str) -> str | None:
    s = m.settings
    if not capacity:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), squeeze=False)
    # The first column is the control (NormScale only: WA-grow's rescaling without its new units).
    columns = [('normscale', None), *(('wa', ratio) for ratio in s.ratios)]
    for p, (protocol, label) in enumerate(PROTOCOLS):
        grid = np.full((len(s.widths), len(columns)), np.nan)
        marks = np.zeros_like(grid)
        for i, width in enumerate(s.widths):
            for j, (name, ratio) in enumerate(columns):
                d = capacity_gain(m, capacity, width, name, ratio, protocol)
                if d is not None:
                    grid[i, j], marks[i, j] = 100 * d.mean, d.sign
        limit = max(1.0, float(np.nanmax(np.abs(grid)))) if np.isfinite(grid).any() else 1.0
        ax = axes[0][p]
        image = ax.imshow(grid, cmap='RdBu', vmin=-limit, vmax=limit, aspect='auto')
        annotate(ax, grid, marks, limit, 8)
        ax.set_xticks(range(len(columns)), ['NormScale\nonly', *(f'WA-grow\nS={r:g}·w' for r in s.ratios)],
                      fontsize=7)
        ax.set_yticks(range(len(s.widths)), [f'fc {w}' + ('' if np.isfinite(row).any() else ' (not run)')
                                             for w, row in zip(s.widths, grid)], fontsize=8)
        ax.set_title(f'gain over fine-tuning: {label.split(" (")[0]}', fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8, label='points')
    dataset, shots = s.capacity_cell
    fig.suptitle(f'Source capacity: {task_name(dataset)}, {size_name(shots)} per class', fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def figure_lr(m, lr: dict, labels: dict, path: str) -> str | None:
    s = m.settings
    if 'finetune' not in lr:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    rates = list(s.learning_rates)
    for name, group in lr.items():
        means, errs, gains, gerrs = [], [], [], []
        for rate in rates:
            acc = values(group, rate)
            mean, half = mean_half(acc)
            means.append(mean)
            errs.append(half)
            d = diff(acc, values(lr['finetune'], rate))
            gains.append(np.nan if d is None else 100 * d.mean)
            gerrs.append(0 if d is None else 100 * (d.high - d.mean))
        style = dict(marker='o', markersize=3, capsize=2, color='black' if name == 'finetune' else None)
        axes[0].errorbar(rates, means, yerr=errs, label=plain(labels[name]), **style)
        if name != 'finetune':
            axes[1].errorbar(rates, gains, yerr=gerrs, label=plain(labels[name]), **style)
    for ax in axes:
        ax.set_xscale('log')
        ax.set_xticks(rates, [f'{r:g}' for r in rates])
        ax.minorticks_off()
        ax.set_xlabel(f'base learning rate (new leaves at {m.base.train.new_lr_multiplier:g}x)')
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('test accuracy (%)')
    axes[1].set_ylabel('− fine-tuning at the same rate (points)')
    axes[1].axhline(0, color='black', linewidth=0.8)
    axes[0].legend(fontsize=7)
    dataset, shots = s.lr_cell
    fig.suptitle(f'Every seed at every rate: {task_name(dataset)}, {size_name(shots)} per class, regime all '
                 f'({s.seeds} seeds, 95% intervals)', fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Sections


def capacity_gain(m, capacity: dict, width: int, method: str, ratio, protocol: str) -> Diff | None:
    return paired(*capacity_arms(m, capacity, width, method, ratio, protocol), m.settings.seeds)


def capacity_arms(m, capacity: dict, width: int, method: str, ratio, protocol: str) -> tuple[Arm, Arm]:
    """(method's arm, fine-tuning's arm) at one source width; under 'shared' both at fine-tuning's rate."""
    group, ft = capacity.get((width, method, ratio)), capacity.get((width, 'finetune', None))
    ft_rate = ft.get('chosen_lr') if ft else None
    rate = group.get('chosen_lr') if group and protocol == 'own' else ft_rate
    return Arm(group, rate if group else None, m.settings.seeds), Arm(ft, ft_rate, m.settings.seeds)


def size_tables(size: SizeMap) -> list[str]:
    lines = []
    for dataset in size.tasks:
        sizes = size.sizes(dataset)
        # Methods with no stored cell on this target are left out (the coverage list says what is missing).
        methods = [m for m in size.methods if any(size.accuracies(dataset, s, m) for s in sizes)]
        head = '| | ' + ' | '.join(size_name(s, size.full_count(dataset)) for s in sizes) + ' |'
        rule = '|---' * (len(sizes) + 1) + '|'
        steps = [size.m.cell(dataset, s, size.m.method('finetune', dataset)).steps for s in sizes]
        lines += [f'#### {task_name(dataset)}', '',
                  f'Test accuracy (%, mean ± 95% interval over seeds) at each method\'s own chosen rate, and the '
                  f'training steps (batch {size.m.settings.batch_size}):', '', head, rule,
                  '| steps | ' + ' | '.join(str(x) for x in steps) + ' |']
        for method in ['finetune', *methods]:
            cells = [arm_text(size.arm(dataset, s, method), size.m.settings.seeds) for s in sizes]
            lines.append(f'| {row_label(size.m, method, dataset)} | ' + ' | '.join(cells) + ' |')
        for protocol, label in PROTOCOLS:
            lines += ['', f'Gain over fine-tuning (points, paired, [95% interval], * p < 0.05), {label}:', '', head,
                      rule]
            if protocol == 'shared':
                lines.append('| shared rate | ' + ' | '.join(
                    f'{r:g}' if (r := size.rate(dataset, s, 'finetune', 'own')) else '' for s in sizes) + ' |')
            for method in methods:
                lines.append(f'| {row_label(size.m, method, dataset)} | ' + ' | '.join(
                    size.gain_text(dataset, s, method, protocol) for s in sizes) + ' |')
        lines += ['', 'Chosen base learning rates (validation, sweep seeds):', '', head, rule]
        for method in ['finetune', *methods]:
            lines.append(f'| {row_label(size.m, method, dataset)} | ' + ' | '.join(
                f'{r:g}' if (r := size.rate(dataset, s, method, 'own')) else '' for s in sizes) + ' |')
        lines.append('')
    return lines


def band_sizes(size: SizeMap, dataset: str, band: tuple[int, ...]) -> list[int]:
    return [s for s in size.sizes(dataset) if s in band]


def region_verdicts(size: SizeMap) -> tuple[list[str], dict]:
    """The verdict table per (target, band of sizes) and the facts the closing note reads."""
    comparisons = [(method, 'finetune', f'{size.labels[method]} − fine-tune') for method in size.methods]
    if 'wa' in size.methods and 'wa_ori' in size.methods:
        comparisons.append(('wa', 'wa_ori', 'WA-grow − WA-ori (normalisation)'))
    if 'wa' in size.methods and 'normscale' in size.methods:
        comparisons.append(('wa', 'normscale', 'WA-grow − NormScale only (the new units)'))
    growth = [m for m in size.methods if m not in ('lora', 'normscale')]  # LoRA and the control do not grow
    lines = ['| target | examples per class | comparison | per-method rate | shared rate |', '|---|---|---|---|---|']
    facts = {'up': {'own': [], 'shared': []}, 'down': {'own': [], 'shared': []}, 'cells': 0, 'norm': [],
             'lora_up': [], 'lora_down': [], 'regions': [], 'growth_cells': 0}
    for dataset in size.tasks:
        for band_name, band in BANDS:
            sizes = band_sizes(size, dataset, band)
            if not sizes:
                continue
            if any(size.gain(dataset, s, method, 'own') is not None for s in sizes for method in growth):
                facts['regions'].append((dataset, band_name))  # the closing note speaks only of regions measured
            for a, b, label in comparisons:
                cells, counted = [], 0
                for protocol, _ in PROTOCOLS:
                    found = [(s, size.gain(dataset, s, a, protocol, b)) for s in sizes]
                    found = [(s, d) for s, d in found if d is not None]
                    counted += len(found)
                    significant = [f'{size_name(s)}: {d.text()}' for s, d in found if d.sign]
                    cells.append(f'{sum(d.sign > 0 for _, d in found)} ahead, {sum(d.sign < 0 for _, d in found)} '
                                 f'behind of {len(found)}' + (f' ({"; ".join(significant)})' if significant else ''))
                    for s, d in found:
                        where = (dataset, band_name, s, a)
                        if b == 'finetune' and a in growth:
                            if protocol == 'own':
                                facts['growth_cells'] += 1
                            if d.sign > 0:
                                facts['up'][protocol].append((*where, d))
                            elif d.sign < 0:
                                facts['down'][protocol].append((*where, d))
                        if b == 'wa_ori' and protocol == 'own' and d.sign:
                            facts['norm'].append((*where, d))
                        if a == 'lora' and protocol == 'own' and d.sign:
                            facts['lora_up' if d.sign > 0 else 'lora_down'].append((*where, d))
                if counted:  # a comparison with no stored cell in this region (not run yet) gets no row
                    lines.append(f'| {short_task(dataset)} | {band_name} | {label} | {cells[0]} | {cells[1]} |')
    return lines, facts


def strongest_case(size: SizeMap, facts: dict, capacity: Sequence[tuple[int, float, Diff]] = ()) -> str:
    """The largest significant per-method gain of a growth method over fine-tuning on the size axis,
    with its rates (a rate at the sweep's edge means the grid, not only the method, may shape the
    gain), and on the capacity axis."""
    ahead = [(w, r, d) for w, r, d in capacity if d.sign > 0]
    on_capacity = ''
    if ahead:
        width, ratio, d = max(ahead, key=lambda x: x[2].mean)
        on_capacity = (f' On the capacity axis: WA-grow from the fc {width} source, S = {ratio:g} x width: '
                       f'{d.text()} points.')
    ups = facts['up']['own']
    if not ups:
        return ('Strongest case: no growth method is significantly ahead of fine-tuning in any cell of the size axis '
                '(per-method rates).' + on_capacity)
    dataset, _, shots, method, d = max(ups, key=lambda x: x[4].mean)
    own, ft = size.rate(dataset, shots, method, 'own'), size.rate(dataset, shots, 'finetune', 'own')
    edge = [f'{size.labels[name]} {size.rate(dataset, shots, name, "own"):g}' for name in (method, 'finetune')
            if size.groups[(dataset, shots, name)].get('at_edge')]
    return (f'Strongest case (largest significant per-method gain on the size axis): {size.labels[method]} on '
            f'{task_name(dataset)}, {size_name(shots)} per class: {d.text()} points, at rate {own:g} (fine-tune '
            f'{ft:g})'
            + (f'; at the edge of the rates swept: {", ".join(edge)}' if edge else '') + '.' + on_capacity)


def capacity_sentence_part(capacity: Sequence[tuple[int, float, Diff]]) -> str:
    """'; on the capacity axis WA-grow was ahead in k and behind in j of n (source width, S) cells (ahead
    at fc 64; behind at ...)', the closing note's words for the capacity axis."""
    ahead = [w for w, _, d in capacity if d.sign > 0]
    behind = [w for w, _, d in capacity if d.sign < 0]
    widths = lambda found: ', '.join(f'fc {w}' for w in dict.fromkeys(found))
    where_ = '; '.join(f'{word} at {widths(found)}' for word, found in (('ahead', ahead), ('behind', behind)) if found)
    return (f'; on the capacity axis WA-grow was ahead in {len(ahead)} and behind in {len(behind)} of {len(capacity)} '
            '(source width, S) cells' + (f' ({where_})' if where_ else ''))


def where(items) -> str:
    """'Greek 1-5 (WA-grow at 2: +1.0 [...]), ...' grouped by region."""
    regions: dict[tuple, list[str]] = {}
    for dataset, band, shots, method, d in items:
        regions.setdefault((short_task(dataset), band), []).append(f'{method} at {size_name(shots)}: {d.text()}')
    return '; '.join(f'{task} {band} ({", ".join(cells)})' for (task, band), cells in regions.items())


def capacity_verdicts(m, capacity: dict) -> list[tuple[int, float, Diff]]:
    """(source width, S / width, WA-grow − fine-tune) of every complete capacity cell, per-method rates."""
    return [(width, ratio, d) for width in m.settings.widths for ratio in m.settings.ratios
            if (d := capacity_gain(m, capacity, width, 'wa', ratio, 'own')) is not None]


def closing_note(size: SizeMap, facts: dict, capacity: Sequence[tuple[int, float, Diff]] = ()) -> str:
    """Three sentences from the verdicts: where growing helps on this data, and where it does not."""
    n = facts['growth_cells']
    up_own, up_shared = facts['up']['own'], facts['up']['shared']
    down_own = facts['down']['own']
    helped = sorted({(short_task(d), b) for d, b, *_ in up_own})
    # Each comparison is tested at p < 0.05 on its own: about n / 40 land significantly ahead (and as many
    # behind) by chance alone, which the note states beside the count.
    resting = sum(x[4].left_out > 0 for x in up_own)  # significant on the seeds left after a collapse
    first = (f'Under the per-method protocol growing beat fine-tuning significantly in {len(up_own)} of {n} '
             f'(target, size, growth method) comparisons (about {n / 40:.1f} expected by chance at p < 0.05, '
             'uncorrected' + (f'; {resting} of them on the seeds left after runs collapsed' if resting else '') + ')'
             + (f', in {", ".join(f"{t} {b}" for t, b in helped)} per class' if helped else
                ', that is nowhere on this data')
             + (capacity_sentence_part(capacity) if capacity else '') + '.')
    learning_rate_only = [x for x in up_shared if (x[0], x[2], x[3]) not in {(y[0], y[2], y[3]) for y in up_own}]
    second = (f'At fine-tuning\'s rate for every method (the paper\'s protocol) it did in {len(up_shared)}, of which '
              f'{len(learning_rate_only)} vanish{"es" if len(learning_rate_only) == 1 else ""} when each method gets '
              'its own rate, so '
              + ('those gains depend on the rate each method is given' if learning_rate_only else
                 'none of them depends on the rate each method is given') + '.')
    hurt = sorted({(short_task(d), b) for d, b, *_ in down_own})
    not_helped = [(short_task(d), b) for d, b in facts['regions'] if (short_task(d), b) not in helped]
    third = ((f'It did not help in {", ".join(f"{t} {b}" for t, b in not_helped)}' if not_helped else
              'It helped in every region measured')
             + (f' and was significantly worse in {len(down_own)} comparison{"s" if len(down_own) > 1 else ""} '
                f'({", ".join(f"{t} {b}" for t, b in hurt)})' if down_own else '')
             + f'; normalisation (WA-grow vs WA-ori) mattered significantly in {len(facts["norm"])} cells, and classic '
               f'LoRA beat fine-tuning in {len(facts["lora_up"])} and lost in {len(facts["lora_down"])}.')
    return ' '.join([first, second, third])


def convergence_lines(m, convergence: dict) -> tuple[list[str], str]:
    """Per (target, size): what doubling the steps adds to each method, and each growth method's gain
    over fine-tuning with the map's steps and with the doubled ones (the same seeds, chosen rates);
    and the verdict's sentence: does the longer schedule change any comparison's verdict?"""
    if not convergence:
        return ['(not run yet)', ''], ''
    s = m.settings
    labels = {n: m.method(n, s.tasks[0]).label for n in s.convergence_methods}
    growth = [n for n in s.convergence_methods if n != 'finetune']
    factor = s.convergence_factor
    lines = [f'Test accuracy with {factor}x the steps − with the map\'s steps, same seeds (the first '
             f'{s.convergence_seeds}) and chosen rate; and each growth method − fine-tuning on those seeds with the '
             f'map\'s steps and with {factor}x; points, [95% interval]:', '',
             '| target | examples per class | steps | ' + ' | '.join(f'{labels[n]}: {factor}x − 1x'
                                                               for n in s.convergence_methods)
             + ''.join(f' | {labels[n]} − fine-tune, 1x | {labels[n]} − fine-tune, {factor}x' for n in growth) + ' |',
             '|---' * (3 + len(s.convergence_methods) + 2 * len(growth)) + '|']
    rows = sorted({(d, sh) for d, sh, _ in convergence}, key=lambda x: (s.tasks.index(x[0]), x[1] or 10 ** 6))
    longer_better = checks = 0
    verdicts = []  # (row, growth method, verdict at 1x, verdict at the longer schedule)
    n = s.convergence_seeds
    for dataset, shots in rows:
        cells, steps, arms = [], '', {}  # arms: method -> (its Arm at 1x, at factor x), the first n seeds
        for name in s.convergence_methods:
            pair = convergence.get((dataset, shots, name))
            if pair is None:
                cells.append('')
                continue
            base, longer = pair
            arms[name] = Arm(base, base['chosen_lr'], n), Arm(longer, base['chosen_lr'], n)
            d = paired(arms[name][1], arms[name][0], n)
            checks += d is not None
            longer_better += d is not None and d.sign > 0
            cells.append(gain_cell(arms[name][1], arms[name][0], n, (f'{factor}x', '1x')))
            steps = f'{longer["fingerprint"]["steps"] // factor} → {longer["fingerprint"]["steps"]}'
        for name in growth:
            both = name in arms and 'finetune' in arms
            cells += [gain_cell(arms[name][i], arms['finetune'][i], n, (labels[name], labels['finetune'])) if both
                      else '' for i in (0, 1)]
            pair = [paired(arms[name][i], arms['finetune'][i], n) if both else None for i in (0, 1)]
            if all(d is not None for d in pair):
                verdicts.append((f'{short_task(dataset)} {size_name(shots)} {labels[name]}', *(d.sign for d in pair)))
        lines.append(f'| {short_task(dataset)} | {size_name(shots)} | {steps} | ' + ' | '.join(cells) + ' |')
    changed = [f'{row} ({VERDICT_WORDS[a]} → {VERDICT_WORDS[b]})' for row, a, b in verdicts if a != b]
    better = (f'{factor}x the steps was significantly better in {longer_better} of {checks} (target, size, method) '
              'checks')
    same = (f'the verdict of each method against fine-tuning (ahead, no significant difference, behind) is '
            f'the same at 1x and {factor}x in {len(verdicts) - len(changed)} of {len(verdicts)} comparisons on the '
            'convergence seeds' + (f'; it changes in {"; ".join(changed)}' if changed else ''))
    return (lines + ['', f'{better}: there the map\'s steps had not converged. {same[0].upper()}{same[1:]}.', ''],
            f'Schedule: {better}; {same}.')


@dataclasses.dataclass(frozen=True)
class Decomposition:
    """WA-grow − fine-tune = (NormScale only − fine-tune) + (WA-grow − NormScale only), paired over the
    seeds where no arm collapsed, so the three means add up exactly."""
    total: Diff | None  # WA-grow − fine-tune (None: fewer than 2 seeds where no arm collapsed)
    rescaling: Diff | None  # NormScale only − fine-tune: the old units' rescaling alone
    units: Diff | None  # WA-grow − NormScale only: what the new units add to it
    left_out: int = 0  # seeds where an arm collapsed

    def cell(self, part: str, seeds: int) -> str:
        d = getattr(self, part)
        return d.text() if d is not None else f'collapsed: {self.left_out} of {seeds} seeds lost in an arm'


def decompose(wa: Arm, normscale: Arm, finetune: Arm, seeds: int) -> Decomposition | None:
    """None for an incomplete cell (an arm with fewer than `seeds` stored)."""
    arms = (wa, normscale, finetune)
    if min(arm.stored for arm in arms) < seeds:
        return None
    keep = set.intersection(*(set(arm.values) for arm in arms))
    pick = lambda arm: {k: v for k, v in arm.values.items() if k in keep}
    left_out = seeds - len(keep)
    return Decomposition(diff(pick(wa), pick(finetune), left_out), diff(pick(normscale), pick(finetune), left_out),
                         diff(pick(wa), pick(normscale), left_out), left_out)


DECOMPOSITION_PARTS = (('total', 'growth − fine-tune'), ('rescaling', 'NormScale only − fine-tune (the rescaling)'),
                       ('units', 'growth − NormScale only (the new units)'))
DECOMPOSED = ('wa', 'wwa')  # growth methods whose classifier reads the old fc7 units through NormScale


def decompositions(m, size: 'SizeMap', capacity: dict, protocol: str) -> list[tuple[str, Decomposition]]:
    """('target | size | growth' row, Decomposition) of every complete cell: the size axis (WA-grow and
    WWA), then the capacity axis (WA-grow at every S)."""
    rows = []
    for dataset in size.tasks:
        for shots in size.sizes(dataset):
            for name in (n for n in DECOMPOSED if n in size.methods):
                arms = [size.arm(dataset, shots, key, protocol) for key in (name, 'normscale', 'finetune')]
                if (d := decompose(*arms, m.settings.seeds)) is not None:
                    rows.append((f'{short_task(dataset)} | {size_name(shots)} | {size.labels[name]}', d))
    dataset, shots = m.settings.capacity_cell
    shots = m.size(dataset, shots)
    in_size = size.groups.get((dataset, shots, 'wa'))
    for width in m.settings.widths:
        for ratio in m.settings.ratios:
            wa, ft = capacity_arms(m, capacity, width, 'wa', ratio, protocol)
            normscale, _ = capacity_arms(m, capacity, width, 'normscale', None, protocol)
            if in_size and wa.group and wa.group['fingerprint'] == in_size['fingerprint']:
                continue  # the size axis's own cell (same files), already a row
            if (d := decompose(wa, normscale, ft, m.settings.seeds)) is not None:
                rows.append((f'{short_task(dataset)} | {size_name(shots)}, fc {width} | WA-grow S = {ratio:g} x width',
                             d))
    return rows


def decomposition_lines(m, size: 'SizeMap', capacity: dict) -> tuple[list[str], str]:
    """The decomposition tables (both protocols) and the verdict's sentence on them (per-method rates)."""
    lines = []
    for protocol, label in PROTOCOLS:
        rows = decompositions(m, size, capacity, protocol)
        if not rows:
            continue
        lines += [f'{label[0].upper()}{label[1:]}:', '',
                  '| target | examples per class (capacity: source width) | growth | '
                  + ' | '.join(text for _, text in DECOMPOSITION_PARTS) + ' |', '|---' * (3 + len(DECOMPOSITION_PARTS)) + '|']
        lines += [f'| {row} | ' + ' | '.join(d.cell(part, m.settings.seeds) for part, _ in DECOMPOSITION_PARTS)
                  + ' |' for row, d in rows]
        lines.append('')
    if not lines:
        return ['(NormScale only has not run beside a growth method and fine-tuning yet)', ''], ''
    rows = [(row, d) for row, d in decompositions(m, size, capacity, 'own') if d.total is not None]
    if not rows:
        return lines, ('Capacity or rescaling: no cell with all three arms kept two seeds where none collapsed, '
                       'so nothing can be split.')
    count = lambda part, sign: sum(getattr(d, part) is not None and getattr(d, part).sign == sign for _, d in rows)
    counts = '; '.join(f'{text.split(" (")[0]}: {count(part, 1)} ahead, {count(part, -1)} behind'
                       for part, text in DECOMPOSITION_PARTS)
    point = lambda d: f'{100 * d.mean:+.1f}{"*" if d.sign else ""}'
    ahead = [(row, d) for row, d in rows if d.total.sign > 0]
    splits = [f'{" ".join(row.split(" | "))}: {point(d.total)} = rescaling {point(d.rescaling)} + new units '
              f'{point(d.units)}' for row, d in ahead]
    by_rescaling = sum(d.rescaling.sign > 0 and d.units.sign <= 0 for _, d in ahead)
    by_units = sum(d.units.sign > 0 and d.rescaling.sign <= 0 for _, d in ahead)
    where_ = (f'of the {len(ahead)} cells where growing (WA-grow, WWA) beats fine-tuning, the rescaling alone carries '
              f'{by_rescaling}, the new units alone {by_units}')
    shared = [d for _, d in decompositions(m, size, capacity, 'shared') if d.rescaling is not None]
    shared_up, shared_down = (sum(d.rescaling.sign == sign for d in shared) for sign in (1, -1))
    overall = (f'; over all {len(rows)} pairs NormScale only alone beats fine-tuning in {count("rescaling", 1)}, and '
               f'the new units on top of it win {count("units", 1)} and lose {count("units", -1)} (each at its own '
               f'rate; at fine-tuning\'s rate NormScale only is ahead in {shared_up} and behind in {shared_down} of '
               f'{len(shared)}' + (', so its gain needs its own rate' if shared_down > shared_up else '') + '). ')
    if not ahead:
        lead = ''
    elif by_rescaling > 2 * by_units:
        lead = f'In short, what helps here is mostly the rescaling, not the added capacity: {where_}{overall}'
    elif by_units > 2 * by_rescaling:
        lead = f'In short, the gains are mostly capacity: {where_}{overall}'
    else:
        lead = f'In short, both matter, in different places: {where_}{overall}'
    sentence = lead + (f'Per-method rates, {len(rows)} (cell, growth method) pairs of the size and capacity axes with '
                       f'all three arms: {counts}. '
                       + (f'Where growing beats fine-tuning significantly, its gain splits as (points, * p < 0.05): '
                          f'{"; ".join(splits)}.' if splits else 'Growing beats fine-tuning significantly in none.'))
    return lines, sentence


def capacity_lines(m, capacity: dict) -> list[str]:
    s = m.settings
    if not capacity:
        return ['(not run yet)', '']
    ori = s.capacity_ori_ratio is not None
    columns = 1 + len(s.ratios) + ori
    lines = ['| fc6/fc7 width | fine-tune (%) | NormScale only | '
             + ' | '.join(f'WA-grow S = {r:g} x width' for r in s.ratios)
             + (f' | WA-ori S = {s.capacity_ori_ratio:g} x width' if ori else '') + ' |', '|---' * (2 + columns) + '|']
    names = {'finetune': 'fine-tune', 'normscale': 'NormScale only', 'wa': 'WA-grow', 'wa_ori': 'WA-ori'}
    cell = lambda width, name, ratio, protocol: gain_cell(*capacity_arms(m, capacity, width, name, ratio, protocol),
                                                          s.seeds, (names[name], 'fine-tune'))
    for protocol, label in PROTOCOLS:
        lines.append(f'| *{label}* |' + ' |' * (1 + columns))
        for width in s.widths:
            ft = capacity.get((width, 'finetune', None))
            acc = arm_text(Arm(ft, ft.get('chosen_lr'), s.seeds), s.seeds) if ft else ''
            cells = [cell(width, 'normscale', None, protocol), *(cell(width, 'wa', r, protocol) for r in s.ratios)]
            if ori:
                cells.append(cell(width, 'wa_ori', s.capacity_ori_ratio, protocol))
            lines.append(f'| {width} | {acc} | ' + ' | '.join(cells) + ' |')
    return lines + ['']


def lr_lines(m, lr: dict, labels: dict) -> list[str]:
    s = m.settings
    if 'finetune' not in lr:
        return ['(not run yet)', '']
    # The base rates, and any rate a widened sweep chose (every seed runs it).
    rates = sorted({float(r) for r in s.learning_rates} | {g['chosen_lr'] for g in lr.values() if g.get('chosen_lr')})
    lines = ['Test accuracy (%, mean ± 95% interval over all seeds) at each rate, and the gain over fine-tuning at '
             'the same rate:', '', '| method | ' + ' | '.join(f'{r:g}' for r in rates) + ' | chosen (validation) |',
             '|---' * (len(rates) + 2) + '|']
    for name, group in lr.items():
        lines.append(f'| {labels[name]} | ' + ' | '.join(arm_text(Arm(group, r), s.seeds) for r in rates)
                     + f' | {group.get("chosen_lr") or ""} |')
    for name, group in lr.items():
        if name != 'finetune':
            lines.append(f'| {labels[name]} − fine-tune | ' + ' | '.join(
                gain_cell(Arm(group, r), Arm(lr['finetune'], r), s.seeds, (labels[name], labels['finetune']))
                for r in rates) + ' | |')
    ft_rate = lr['finetune'].get('chosen_lr')
    lines.append('')
    for name, group in lr.items():
        if name == 'finetune' or ft_rate is None or group.get('chosen_lr') is None:
            continue
        names = (labels[name], labels['finetune'])
        shared = gain_cell(Arm(group, ft_rate), Arm(lr['finetune'], ft_rate), s.seeds, names)
        own = gain_cell(Arm(group, group['chosen_lr']), Arm(lr['finetune'], ft_rate), s.seeds, names)
        best = max(rates, key=lambda r: np.mean(list(values(group, r).values()) or [0]))
        lines.append(f'- {labels[name]}: at fine-tuning\'s chosen rate {ft_rate:g} (shared) {shared}; each at its '
                     f'chosen rate ({group["chosen_lr"]:g} vs {ft_rate:g}) {own}; its best test rate is {best:g}.')
    return lines + ['']


def forgetting_lines(m, forgetting: dict, labels: dict, size: SizeMap) -> list[str]:
    if not forgetting:
        return ['(not run yet)', '']
    lines = ['| target | examples per class | method | target test (%) | source test after (%) | change of the source '
             'task (points) | − fine-tune\'s change |', '|---|---|---|---|---|---|---|']
    same, total = 0, 0
    for (dataset, shots, name), record in forgetting.items():
        # A seed whose target run collapsed (the size axis's run at this rate) measures no fine-tuning:
        # left out here, and in fine-tuning's column it is paired with.
        lost = set(size.arm(dataset, shots, name).collapsed)
        ft_lost = set(size.arm(dataset, shots, 'finetune').collapsed)
        kept = [r for r in record['seeds'] if r['seed'] not in lost]
        after = {r['seed']: r['source_after'] for r in kept}
        target = {r['seed']: r['target_test'] for r in kept}
        dropped = len(record['seeds']) - len(kept)
        # A vectorised grid (stored) and a single retrained run reduce in another order: float32 means
        # then differ in the last bits (~1e-7), far below one test example.
        reproduced = sum(r['stored_test'] is not None and abs(r['stored_test'] - r['target_test']) < 1e-6
                         for r in record['seeds'])
        same += reproduced
        total += len(record['seeds'])
        ft = forgetting.get((dataset, shots, 'finetune'))
        versus = '' if ft is None or name == 'finetune' else dtext(diff(
            after, {r['seed']: r['source_after'] for r in ft['seeds'] if r['seed'] not in ft_lost},
            len(lost | ft_lost)))
        # A seed whose retrained run missed the stored one beyond float noise (even by an example) may not
        # be the run the map measured: the row says so.
        unlike = len(record['seeds']) - reproduced
        lines.append(f'| {short_task(dataset)} | {size_name(shots)} | {labels.get(name, name)} | '
                     f'{seeds_text(target, len(record["seeds"]), dropped)}'
                     + (f' ({unlike} of {len(record["seeds"])} retrained seeds differ from the stored run)' if unlike
                        else '') + ' | '
                     f'{mean_ci(after)} | {dtext(diff(after, record["source_before"]))} | {versus} |')
    before = next(iter(forgetting.values()))['source_before']
    return [f'Source task (test split of `{m.base.init.source_dataset}`) before fine-tuning: {100 * before:.1f}%. '
            f'Retrained runs reproduced the stored test accuracy (to 1e-6) in {same} of {total} (seed, cell, method) '
            'runs.', '',
            *lines, '']


def continual_lines(m, continual: dict, arms: Sequence[tuple]) -> list[str]:
    s = m.settings
    if not any(arm in continual for arm, *_ in arms):
        return ['(not run yet)', '']
    (a_set, a_shots), (b_set, b_shots) = s.continual_a, s.continual_b
    ft = continual.get('ft_ft')
    lines = [f'A = {task_name(a_set)}, {size_name(a_shots)} per class; B = {task_name(b_set)}, {size_name(b_shots)} '
             'per class. Each step sweeps the rates and selects on its own validation split; each seed continues '
             'from its own model after A.', '',
             '| arm | test on A (%) | test on B (%) | − fine-tune → fine-tune, per-method | shared rate |',
             '|---|---|---|---|---|']
    for arm, label, a_name, _ in arms:
        if arm not in s.continual_arms:
            continue
        group = continual.get(arm)
        a = continual.get(('A', a_name))
        a_acc = arm_text(Arm(a, a.get('chosen_lr')), s.seeds) if a else ''
        if group is None:
            lines.append(f'| {label} | {a_acc} | | | |')
            continue
        own = Arm(group, group.get('chosen_lr'))
        ft_own = Arm(ft, ft.get('chosen_lr') if ft else None)
        shared = Arm(group, ft.get('chosen_lr') if ft else None)
        names = (label, 'fine-tune → fine-tune')
        versus = ('', '') if arm == 'ft_ft' else (gain_cell(own, ft_own, s.seeds, names),
                                                  gain_cell(shared, ft_own, s.seeds, names))
        lines.append(f'| {label} | {a_acc} | {arm_text(own, s.seeds)} | {versus[0]} | {versus[1]} |')
    for name in ('finetune', 'wa'):
        direct = continual.get(('direct', name))
        if direct is not None:
            arm = Arm(direct, direct.get('chosen_lr'))
            versus = gain_cell(arm, Arm(ft, ft.get('chosen_lr')), s.seeds, (name, 'fine-tune → fine-tune')) if ft else ''
            lines.append(f'| source → B directly, {m.method(name, b_set).label} | | {arm_text(arm, s.seeds)} | '
                         f'{versus} | |')
    return lines + ['']


def gamma_lines(m, gamma: dict | None, size: SizeMap, variants: Sequence[tuple]) -> list[str]:
    lines = []
    if gamma is None:
        lines += ['(step-0 measurement not run yet)', '']
    else:
        units = m.settings.gamma_units
        acc = gamma['accuracy']
        lines += [f'Source-task test accuracy right after growing the source model (fc {m.width}) with its classifier '
                  f'kept, before any training: {100 * acc["source"]:.1f}% without growth. Mean over '
                  f'{m.settings.gamma_seeds} seeds of the new units\' initialisation (min-max):', '',
                  '| growth | ' + ' | '.join(f'S = {u}' for u in units) + ' |', '|---' * (len(units) + 1) + '|']
        for name, label, *_ in variants:
            if not any(f'{name}/{u}' in acc for u in units):
                continue
            cells = []
            for u in units:
                x = 100 * np.asarray(acc.get(f'{name}/{u}', []))
                cells.append(f'{x.mean():.1f} ({x.min():.1f}-{x.max():.1f})' if len(x) else '')
            lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
        scales = gamma.get('scales', {})
        if scales:
            lines += ['', 'Gammas set from data at the classifier (seed 0; scale_0: the old fc7 units, scale_1: the new): '
                      + '; '.join(f'{k}: ' + ', '.join(f'{g} {v:.2f}' for g, v in sorted(x.items()))
                                  for k, x in scales.items()) + '.']
        lines.append('')
    if 'wa_data' in size.methods and 'wa' in size.methods:
        lines += ['Does it change the map? WA-grow with γ from data − WA-grow with γ = 10, per cell (points, [95% '
                  'interval]), and how often each picked fine-tuning\'s rate:', '',
                  '| target | ' + ' | '.join(PROTOCOLS[i][1].split(' (')[0] for i in range(2)) + ' | same rate as '
                  'fine-tune: WA-grow / γ from data |', '|---|---|---|---|']
        for dataset in size.tasks:
            cells = []
            for protocol, _ in PROTOCOLS:
                found = [(s, size.gain(dataset, s, 'wa_data', protocol, 'wa')) for s in size.sizes(dataset)]
                cells.append(', '.join(f'{size_name(s)}: {d.text()}' for s, d in found if d is not None))
            same = [sum(rate is not None and rate == size.rate(dataset, s, 'finetune', 'own')
                        for s in size.sizes(dataset) for rate in [size.rate(dataset, s, name, 'own')])
                    for name in ('wa', 'wa_data')]
            lines.append(f'| {short_task(dataset)} | {cells[0]} | {cells[1]} | {same[0]} / {same[1]} of '
                         f'{len(size.sizes(dataset))} |')
        lines.append('')
    return lines


def stored_groups(m, size: SizeMap, capacity: dict) -> list[tuple[str, dict, float | None]]:
    """(name, group, fine-tuning's chosen rate in its cell) of every group the size and capacity axes
    read, each stored file once (the capacity axis's groups at the size axis's width and S are the
    size axis's own files)."""
    cap_dataset, cap_shots = m.settings.capacity_cell
    cap_shots = m.size(cap_dataset, cap_shots)
    rate = lambda group: group.get('chosen_lr') if group else None
    named = [(f'{short_task(d)} {size_name(sh)} {n}', d, sh, g, size.rate(d, sh, 'finetune', 'own'))
             for (d, sh, n), g in size.groups.items()]
    named += [(f'capacity fc {w} {n}' + (f' S = {r:g} x width' if r else ''), cap_dataset, cap_shots, g,
               rate(capacity.get((w, 'finetune', None)))) for (w, n, r), g in capacity.items()]
    found, seen = [], set()
    for name, dataset, shots, group, ft_rate in named:
        key = (dataset, shots, json.dumps(group['fingerprint'], sort_keys=True))
        if key not in seen:
            seen.add(key)
            found.append((name, group, ft_rate))
    return found


def rate_edges(m, size: SizeMap, capacity: dict) -> str:
    """The verdict's sentence on the sweeps: how far they widened (protocol.sweep) and which chosen rates
    still sit at an edge of the rates swept (where the ladder ended, or on a validation plateau)."""
    base = [float(r) for r in m.settings.learning_rates]
    chosen = [(name, g) for name, g, _ in stored_groups(m, size, capacity) if g.get('chosen_lr') is not None]
    if not chosen:
        return ''
    widened = [g for _, g in chosen if set(g['rates']) - set(base)]
    reached = sorted({r for g in widened for r in g['rates']} - set(base))
    outside = [name for name, g in chosen if g['chosen_lr'] not in base]
    edge = [f'{name} ({g["chosen_lr"]:g})' for name, g in chosen if g['at_edge']]
    plateau = [f'{name} ({g["chosen_lr"]:g})' for name, g in chosen if g['plateau']]
    return (f'Rates: {len(widened)} of {len(chosen)} groups (size and capacity axes) chose a rate at an edge of '
            f'{base} and widened their sweep' + (f' (to {", ".join(f"{r:g}" for r in reached)})' if reached else '')
            + f'; {len(outside)} then chose a rate outside the base grid. Chosen rates still at an edge of the rates '
            f'swept: {len(edge)} of {len(chosen)}'
            + (f' ({", ".join(edge)}: the ladder {list(m.settings.rate_ladder)} ends there)' if edge else '')
            + (f'; {len(plateau)} more at the edge of a validation plateau (the edge rate ties its neighbour, so '
               f'widening stopped: {", ".join(plateau)})' if plateau else '') + '.')


def collapse_sentence(m, size: SizeMap, capacity: dict) -> str:
    """The verdict's sentence on collapsed runs: which readings (a group at the rate a protocol reads) of
    the size and capacity axes lost seeds."""
    readings = []
    for name, group, ft_rate in stored_groups(m, size, capacity):
        for protocol, rate in (('own', group.get('chosen_lr')), ('shared', ft_rate)):
            if protocol == 'shared' and rate == group.get('chosen_lr'):
                continue  # the same runs as the own reading (fine-tuning's always)
            readings.append((name, protocol, Arm(group, rate, m.settings.seeds)))
    hit = [(what, protocol, arm) for what, protocol, arm in readings if arm.collapsed]
    if not hit:
        return (f'Collapsed runs: none of the {len(readings)} readings (group, rate) of the size and capacity axes '
                'holds a run that diverged or ended at chance.')
    where_ = '; '.join(f'{what} at {"its own" if protocol == "own" else "the shared"} rate {arm.rate:g}: '
                       f'{len(arm.collapsed)} of {arm.stored}' for what, protocol, arm in hit)
    return (f'Collapsed runs: {len(hit)} of {len(readings)} readings (group, rate) of the size and capacity axes hold '
            'runs that diverged or ended at chance (see Set-up); they are labelled where they occur and left out of '
            f'every mean and test ({where_}).')


def coverage_lines(m, size: SizeMap, results: dict) -> list[str]:
    """What the settings plan against what is stored complete (all seeds at the rates both protocols read)."""
    s = m.settings
    seeds = s.seeds
    full = lambda group, rate: stored_seeds(group, rate) >= seeds
    planned = done = 0
    missing = []
    for dataset in s.tasks:
        for shots in m.sizes(dataset, s.sizes):
            for method in s.methods:
                planned += 1
                group = size.groups.get((dataset, shots, method))
                ft_rate = size.rate(dataset, shots, method, 'shared')
                if group is not None and full(group, group.get('chosen_lr')) and full(group, ft_rate):
                    done += 1
                else:  # stored part-way (e.g. a sweep still to widen) or not at all
                    missing.append(f'{short_task(dataset)} {size_name(shots)} {method}'
                                   + (' (part-way)' if group is not None else ''))
    lines = [f'- size axis: {done} of {planned} (target, size, method) cells complete'
             + (f'; not complete: {", ".join(missing)}' if missing else '') + '.']
    capacity = results.get('capacity', {})
    cap_planned = len(s.widths) * (2 + len(s.ratios) + (s.capacity_ori_ratio is not None))
    cap_done = sum(full(g, g.get('chosen_lr')) for g in capacity.values())
    lines.append(f'- capacity axis: {cap_done} of {cap_planned} (width, method, S) groups complete.')
    lr = results.get('lr', {})
    lr_done = sum(all(full(g, r) for r in s.learning_rates) for g in lr.values())
    lines.append(f'- learning-rate axis: {lr_done} of {len(s.lr_methods)} methods at every seed and rate.')
    convergence = results.get('convergence', {})
    lines.append(f'- convergence: {sum(stored_seeds(g, b["chosen_lr"]) >= s.convergence_seeds for b, g in convergence.values())}'
                 f' of {len(s.convergence_methods) * sum(len(m.sizes(t, s.sizes)) for t in s.tasks)} (target, size, '
                 'method) checks.')
    forgetting = results.get('forgetting', {})
    lines.append(f'- forgetting: {len(forgetting)} of '
                 f'{len(s.forgetting_methods) * sum(len(m.sizes(t, s.forgetting_sizes)) for t in s.tasks)} (target, '
                 'size, method) records.')
    continual = results.get('continual', {})
    lines.append(f'- continual: {sum(a in continual for a in s.continual_arms)} of {len(s.continual_arms)} arms; '
                 f'gamma at step 0: {"stored" if results.get("gamma") else "not run"}.')
    return lines + ['']


def compute_lines(m, results: dict, invocations: list[dict]) -> list[str]:
    per_axis = {}
    for axis, found in results.items():
        if axis not in ('size', 'capacity', 'lr', 'continual', 'convergence'):
            continue
        if axis in ('size', 'capacity', 'lr', 'continual'):
            groups = [g for g in found.values() if isinstance(g, dict) and 'runs' in g]
        elif axis == 'convergence':
            groups = [longer for _, longer in found.values()]
        else:
            groups = []
        per_axis[axis] = (len(groups), sum(g.get('seconds', 0.0) for g in groups) / 60)
    lines = ['Stored groups and their compute time (minutes, this machine, training and evaluation; shared groups '
             'count on each axis that reads them): ' + '; '.join(
                 f'{axis} {n} groups, {minutes:.0f} min' for axis, (n, minutes) in per_axis.items() if n) + '.', '',
             'Invocations that computed them (from WORKDIR/invocations.jsonl):', '']
    for entry in invocations:
        lines.append(f'- {entry["date"]}: `{entry["command"]}`: {entry["computed"]} groups, {entry["minutes"]:.0f} min'
                     + (' (stopped at --max_minutes)' if entry.get('stopped') else ''))
    return lines + ['']


def section(m, results: dict, docs_dir: str, *, command: str, invocations: list[dict]) -> str:
    """The markdown of the map section, with its figures written to docs_dir/figures."""
    s = m.settings
    figures_dir = os.path.join(docs_dir, FIGURES)
    os.makedirs(figures_dir, exist_ok=True)
    size = SizeMap(m, results.get('size', {}))
    labels = {name: m.method(name, s.tasks[0]).label for name in set(s.methods) | set(s.lr_methods)
              | set(s.forgetting_methods)}
    made = {
        'map_gain': figure_gain(size, os.path.join(figures_dir, 'map_gain.png')),
        'map_accuracy': figure_accuracy(size, os.path.join(figures_dir, 'map_accuracy.png')),
        'map_convergence': figure_convergence(m, size, os.path.join(figures_dir, 'map_convergence.png')),
        'map_capacity': figure_capacity(m, results.get('capacity', {}), os.path.join(figures_dir, 'map_capacity.png')),
        'map_lr': figure_lr(m, results.get('lr', {}), labels, os.path.join(figures_dir, 'map_lr.png')),
    }
    verdicts, facts = region_verdicts(size)
    capacity = results.get('capacity', {})
    capacity_cells = capacity_verdicts(m, capacity)
    decomposition, decomposition_sentence = decomposition_lines(m, size, capacity)
    convergence, convergence_sentence = convergence_lines(m, results.get('convergence', {}))
    verdict = [decomposition_sentence,
               closing_note(size, facts, capacity_cells) if size.tasks else '(the size axis has not run yet)',
               convergence_sentence, rate_edges(m, size, capacity),
               collapse_sentence(m, size, capacity)]
    workdir = m.workdir
    reproduce = lambda axis: f'`python -m experiments.map --workdir={workdir} --axes={axis}`'
    figure = lambda name, caption: ([f'![{name}]({FIGURES}/{name}.png)', '', caption, ''] if made.get(name) else [])
    lr_cell = f'{task_name(s.lr_cell[0])}, {size_name(s.lr_cell[1])} per class'
    lines = [
        '## When does growing help? The map',
        '',
        f'Written by `{command}` on {datetime.date.today()} from the runs stored in `{workdir}` (every table and '
        f'figure of this section; the invocations that computed the runs are listed under "Compute" below). '
        f'Versions: {report.versions()}.',
        '',
        '### Verdict',
        '',
        'Read from the tables below (each sentence is computed from them):',
        '',
        *(f'- {sentence}' for sentence in verdict if sentence),
        '',
        '### Set-up',
        '',
        f'- Source: `small_cnn` pretrained on the rendered Latin letters (fc6/fc7 {m.width} units unless stated; '
        f'every fc width of the capacity axis has its own source model, `--config.model.fc_width`). Targets: '
        + ', '.join(f'{task_name(t)} (`{t}`)' for t in s.tasks) + '. The scripts target is 131 letters of the '
        'Cyrillic, Armenian and Georgian scripts that look like no Latin or Greek letter, rendered in the held-out '
        'fonts (growjax/data/builtin.py, `growjax_scripts`).',
        f'- Methods (S = {s.units} new units): ' + ', '.join(labels[n] for n in s.methods) + '. Regime `all` (every '
        f'layer trains, new leaves at {m.base.train.new_lr_multiplier:g}x); LoRA in `new` (frozen network, adapters '
        'and classifier: classic LoRA), at the rank that adds about as many parameters as WA ('
        + ', '.join(f'{short_task(t)}: r = {lora_rank(m, t)}' for t in s.tasks) + ').',
        f'- Training: SGD momentum {m.base.train.momentum}, batch {s.batch_size}, max({s.min_steps}, '
        f'{s.epochs:g} epochs) steps, learning rate / 10 at {tuple(m.base.train.lr_decay_at)} of training, random '
        f'{m.base.data.crop_padding}-pixel crops. Convergence: see below.',
        f'- Protocol: every (cell, method) sweeps {list(s.learning_rates)}; seeds {list(range(s.sweep_seeds))} '
        f'select on validation; while the chosen rate is the lowest or highest swept, the sweep seeds also run the '
        f'next rate beyond it on the ladder {list(s.rate_ladder)} (experiments.protocol.sweep), so a method\'s rate '
        f'is chosen with a worse rate tried on each side (a tie with the neighbour, a plateau, also ends it); test '
        f'accuracy over seeds {list(range(s.seeds))}. A run that diverged (training loss non-finite, or at the end '
        'no lower than log(classes), a uniform guess\'s) or ended at chance (test accuracy at most 1/classes plus '
        'three binomial standard deviations over the test split) is labelled "collapsed" and left out of means and '
        'tests, with the count shown. Two readings: **per-method** (each '
        'method at its own chosen rate) and **shared** (every method at the rate chosen for fine-tuning, one rate '
        'for all as the paper trains; the paper\'s numbers are comparable to this one). Gains are paired over seeds: '
        'mean [95% t-interval], * where a two-sided paired t-test gives p < 0.05.',
        '',
        '### The map: size x distance x method',
        '',
        *figure('map_gain', f'Gain of each method over fine-tuning, per target and examples per class, under both '
                            f'protocols. Made from the `size` axis ({reproduce("size")}).'),
        *figure('map_accuracy', 'Test accuracy against examples per class (per-method rates; 95% intervals over '
                                f'seeds). From the `size` axis ({reproduce("size")}).'),
        *size_tables(size),
        '### Capacity or rescaling? NormScale only',
        '',
        'WA-grow (and WWA) change two things at once: they add units, and the classifier reads the old fc7 units '
        'through NormScale (each group L2-normalised, times a learned γ starting at '
        f'{m.base.growth.scale_init:g}). NormScale only (`growth.method=normscale`) is the second change alone: no '
        'new units, the classifier reads γ · fc7 / ||fc7||, exactly as WA-grow\'s classifier reads the old units '
        '(WWA also widens fc6, and its fc7 units read fc6 through NormScale: what it adds on top of NormScale only '
        'is its new units and that second rescaling). Paired over the same seeds (those where none of the three '
        'arms collapsed), so the first gain column is the sum of the other two (where an arm lost a seed, it can '
        'differ from the gain tables, which pair two arms). The capacity axis\'s rows at one source width share its '
        'NormScale only and fine-tune arms, so they are not independent findings:',
        '',
        *decomposition,
        '### Verdicts per region',
        '',
        'Cells of each band where the comparison is significantly ahead or behind (paired t-test, p < 0.05, not '
        'corrected for the many comparisons: about one in 40 lands ahead, and one in 40 behind, by chance alone), '
        'with the interval of every significant one:',
        '',
        *verdicts,
        '',
        strongest_case(size, facts, capacity_cells) if size.tasks else '',
        '',
        '### Convergence',
        '',
        *figure('map_convergence', 'Validation accuracy over training (mean over the seeds at the chosen rate) of '
                                   'fine-tuning and WA-grow, every size. From the `size` axis '
                                   f'({reproduce("size")}).'),
        *convergence,
        f'From the `convergence` axis ({reproduce("convergence")}).',
        '',
        '### Source capacity: fc width x S',
        '',
        f'{task_name(s.capacity_cell[0])}, {size_name(s.capacity_cell[1])} per class; NormScale only, WA-grow and WA-ori: gain over '
        'fine-tuning of the same source model (points, [95% interval]):',
        '',
        *capacity_lines(m, results.get('capacity', {})),
        *figure('map_capacity', f'NormScale only and WA-grow − fine-tuning by source width and S (w: the source\'s fc '
                                'width). From the `capacity` axis '
                                f'({reproduce("capacity")}).'),
        '### Shared versus per-method learning rate',
        '',
        f'{lr_cell}, regime `all`, every seed at every rate (the setting of the independent re-implementation the '
        'issue quotes, on this repository\'s data):',
        '',
        *lr_lines(m, results.get('lr', {}), labels),
        *figure('map_lr', f'Accuracy and gain over fine-tuning at each learning rate. From the `lr` axis '
                          f'({reproduce("lr")}).'),
        '### Forgetting of the source task (paper Table 4)',
        '',
        'After fine-tuning on a target at the method\'s chosen rate, the source task read through the network\'s old '
        'units (fc7, not the new ones) by the pretrained source classifier:',
        '',
        *forgetting_lines(m, results.get('forgetting', {}), labels, size),
        f'From the `forgetting` axis ({reproduce("forgetting")}).',
        '',
        '### Continual growth (paper Table 8)',
        '',
        *continual_lines(m, results.get('continual', {}), results['continual_arms']),
        f'From the `continual` axis ({reproduce("continual")}).',
        '',
        '### Beyond the paper: initialising γ from data',
        '',
        'NormScale\'s constant γ = 10 rescales the pretrained units at growth. `growjax.nn.scales_from_data` sets '
        'every γ of a group to that group\'s mean L2 norm on the first training batch (mode `group`: old units start '
        'at their pretrained scale, new ones at theirs), or every group to the old group\'s norm (mode `first`).',
        '',
        *gamma_lines(m, results.get('gamma'), size, results['gamma_variants']),
        f'From the `gamma` axis ({reproduce("gamma")}) and the `size` axis (method `wa_data`).',
        '',
        '### Compute: what ran',
        '',
        *coverage_lines(m, size, results),
        *compute_lines(m, results, invocations),
    ]
    return '\n'.join(lines)


def write(m, results: dict, docs_dir: str, *, command: str, invocations: list[dict]) -> str:
    path = os.path.join(docs_dir, 'results.md')
    os.makedirs(docs_dir, exist_ok=True)
    report.splice(path, 'map', section(m, results, docs_dir, command=command, invocations=invocations))
    return path
