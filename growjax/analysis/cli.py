"""`python -m growjax.analysis --workdir=DIR`: the paper's analyses of a main.py run, as figures.

The run's 'analysis' records (logged with --config.train.analysis=True, cooperation on the
validation split) are plotted; a finished run without them is analysed from its export, on its
validation split (else its test split: a finished run's report, not a choice made from it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import jax
import ml_collections

from growjax import checkpoint, data, train
from growjax.analysis import ALL_GROUPS, analyse, group_label
from growjax.errors import UserError
from growjax.outputs import read_metrics

FIGURES = ('analysis_cooperation.png', 'analysis_scales.png', 'analysis_change.png')


def records_from_workdir(workdir: str) -> tuple[list[dict], str]:
    """(the run's 'analysis' records, else one record computed from its export; the split the
    cooperation accuracies were measured on)."""
    records = read_metrics(workdir)
    configs = [r for r in records if r.get('split') == 'config']
    if not configs:
        raise FileNotFoundError(f'{workdir} has no metrics.jsonl with a config record: is it a growjax workdir?')
    config = ml_collections.ConfigDict(dict(configs[0]['config']))
    logged = [r for r in records if r.get('split') == 'analysis']
    if logged:
        return logged, config.data.val_split
    split = config.data.val_split or config.data.eval_split
    return [analyse_export(workdir, config, split)], split


def analyse_export(workdir: str, config: ml_collections.ConfigDict, split: str) -> dict:
    """Analyses of a finished run's exported variables on `split`; the change is measured from the
    pretrained variables it grew from."""
    variables, description = checkpoint.load_export(workdir)
    model = train.build_model(config, description['num_classes'])
    pretrained = train.load_pretrained(config)
    d = config.data
    images, labels = data.split_arrays(d.name, split, d.data_dir, d.image_size, mean=d.mean, std=d.std)
    values = jax.jit(lambda v, r, x, y: analyse(model, v, r, x, y))(
        variables, None if pretrained is None else pretrained['params'], images, labels)
    with open(os.path.join(workdir, 'summary.json')) as f:  # an export is written after the final summary
        step = int(json.load(f)['step'])
    return {'step': step, 'split': 'analysis', **{k: float(v) for k, v in jax.device_get(values).items()}}


def _series(records: list[dict], prefix: str) -> dict[str, list[tuple[int, float]]]:
    """{name after prefix: [(step, value), ...]} of the records' finite values."""
    series: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key.startswith(prefix) and math.isfinite(value):
                series.setdefault(key[len(prefix):], []).append((record['step'], value))
    return dict(sorted(series.items()))


def plot_records(records: list[dict], out_dir: str, title: str = '', split: str = '') -> list[str]:
    """Three PNGs: cooperation accuracies, learned scales and parameter change over training steps
    (bars when the run has one evaluation). Axes show plain values (no offset: scales that move by
    1e-3 read as 10.001, not as +1e-3); the change is on a log axis, so a re-initialised or new
    layer that moves 100x more does not flatten the others."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    on_split = f' ({split} split)' if split else ''
    panels = (('cooperation/', f'classifier accuracy reading only one group{on_split}', 'accuracy', False),
              ('scale/', 'mean learned scale (NormScale gamma)', 'gamma', False),
              ('change/', 'relative change ||w - w0|| / ||w0|| per layer', 'relative change (log)', True))
    paths = []
    for (prefix, panel_title, ylabel, log_scale), name in zip(panels, FIGURES):
        series = _series(records, prefix)
        if log_scale:  # step 0 has no change: a log axis cannot show it
            series = {k: [(s, v) for s, v in points if v > 0] for k, points in series.items()}
            series = {k: points for k, points in series.items() if points}
        steps = sorted({s for points in series.values() for s, _ in points})
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        labels = {key: group_label(key) if prefix == 'cooperation/' else key for key in series}
        if not series:
            reason = {'cooperation/': 'no validation split was evaluated' if not split else 'no grown groups',
                      'scale/': 'no NormScale in this model', 'change/': 'no step-0 reference'}[prefix]
            ax.text(0.5, 0.5, f'nothing to show ({reason})', ha='center', transform=ax.transAxes)
        elif len(steps) == 1:
            names = list(series)
            values = [series[k][0][1] for k in names]
            bars = ax.barh(range(len(names)), values, color=['0.5' if k == ALL_GROUPS else f'C{i}'
                                                              for i, k in enumerate(names)])
            ax.set_yticks(range(len(names)), [labels[k] for k in names], fontsize=8)
            ax.bar_label(bars, fmt='%.4g', fontsize=8, padding=2)
            ax.set_xlabel(f'{ylabel} at step {steps[0]}')
            if log_scale:
                ax.set_xscale('log')
        else:
            for key, points in series.items():
                ax.plot(*zip(*points), 'o-', label=labels[key])
            ax.set(xlabel='step', ylabel=ylabel)
            ax.legend(fontsize=8)
        if log_scale and len(steps) > 1:
            ax.set_yscale('log')
        for axis in (ax.xaxis, ax.yaxis):
            formatter = axis.get_major_formatter()
            if hasattr(formatter, 'set_useOffset'):
                formatter.set_useOffset(False)
        ax.set_title(f'{title}: {panel_title}' if title else panel_title, fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog='python -m growjax.analysis', description=__doc__.split('\n')[0])
    parser.add_argument('--workdir', required=True, help='a finished (or running) main.py workdir')
    args = parser.parse_args(argv)
    try:
        records, split = records_from_workdir(args.workdir)
    except (FileNotFoundError, UserError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    with open(os.path.join(args.workdir, 'analysis.json'), 'w') as f:
        json.dump(records, f, indent=1)
    for path in plot_records(records, args.workdir, os.path.basename(os.path.normpath(args.workdir)), split):
        print(path)
    return 0
