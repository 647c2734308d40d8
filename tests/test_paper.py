"""The paper experiment: protocol, pairing, reuse of finished runs, verdicts, and --quick end to end."""
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from growjax import data

import experiments
from experiments import paper, protocol, report, runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = 'growjax_latin/16px_max10'
TARGET = 'growjax_greek/16px_max10'


def test_batch_plan_uses_only_the_few_shot_draw_and_is_paired_by_seed():
    labels = np.repeat(np.arange(4), 10)
    ids, offsets = runner.batch_plan(labels, shots=2, seed=3, num_steps=5, batch_size=6, crop_padding=2)
    assert ids.shape == (5, 6) and offsets.shape == (5, 6, 2)
    assert set(ids.ravel()) == set(data.few_shot_indices(labels, 2, seed=3))
    assert offsets.min() >= 0 and offsets.max() <= 4
    again = runner.batch_plan(labels, shots=2, seed=3, num_steps=5, batch_size=6, crop_padding=2)
    np.testing.assert_array_equal(ids, again[0])  # what every method sees at seed 3
    assert not np.array_equal(ids, runner.batch_plan(labels, 2, 4, 5, 6, 2)[0])


def run(seed, lr, val):
    return {'seed': seed, 'learning_rate': lr, 'validation': [{'accuracy': val}], 'test': {'accuracy': val}}


def test_learning_rate_is_selected_on_the_sweep_seeds_only():
    runs = [run(0, 0.01, 0.5), run(1, 0.01, 0.7), run(0, 0.1, 0.8), run(1, 0.1, 0.2), run(2, 0.01, 0.0),
            run(2, 0.1, 1.0)]
    assert protocol.select_learning_rate(runs, [0, 1]) == 0.01  # seed 2 would pick 0.1, but it is not a sweep seed
    assert protocol.select_learning_rate([run(0, 0.1, 0.5), run(0, 0.01, 0.5)], [0]) == 0.01  # ties: the lower rate


class FakeTrainer:
    """Records what the protocol asks for; validation accuracy peaks at lr 0.01."""

    def __init__(self, vectorised):
        self.vectorised = vectorised
        self.calls = []

    def run(self, shots, seeds, learning_rates):
        self.calls.append((list(seeds), list(learning_rates)))
        return [runner.RunCurves(seed, lr, [0], [], [{'accuracy': 1 - abs(np.log10(lr) + 2)}], {'accuracy': 0.5})
                for seed in seeds for lr in learning_rates]


@pytest.mark.parametrize('vectorised,calls', [
    (False, [([0, 1], [0.001, 0.01, 0.1]), ([2, 3], [0.01])]),  # sweep, then the other seeds at the chosen rate
    (True, [([0, 1, 2, 3], [0.001, 0.01, 0.1])]),  # the whole grid in one vectorised call
])
def test_protocol(vectorised, calls):
    settings = dataclasses.replace(paper.FULL, seeds=4, sweep_seeds=2, learning_rates=(0.001, 0.01, 0.1))
    trainer = FakeTrainer(vectorised)
    group = protocol.run_protocol(trainer, shots=1, settings=settings)
    assert trainer.calls == calls
    assert group['chosen_lr'] == 0.01
    assert [r['seed'] for r in protocol.chosen_runs(group)] == [0, 1, 2, 3]


def test_paired_differences_and_verdicts():
    better = report.paired({0: 0.8, 1: 0.7, 2: 0.9}, {0: 0.7, 1: 0.6, 2: 0.79})
    assert better.sign == 1 and better.n == 3 and better.mean == pytest.approx(0.1033, abs=1e-3)
    noisy = report.paired({0: 0.8, 1: 0.6, 2: 0.9}, {0: 0.7, 1: 0.7, 2: 0.8})
    assert noisy.sign == 0
    worse = report.Paired(-0.1, 0.01, 5, -1)
    assert report.verdict([better, better, noisy]) == 'reproduced'
    assert report.verdict([worse, worse, noisy]).startswith('not reproduced')
    assert report.verdict([noisy, noisy]).startswith('unclear')
    assert report.verdict([better, worse]).startswith('unclear')
    # One significant task of three is not a majority, and nothing points the other way: not 'mixed'.
    assert report.verdict([better, noisy, noisy]) == 'unclear at this scale (significantly ahead on 1 of 3 tasks only)'
    assert report.verdict([noisy, worse, noisy]) == 'unclear at this scale (significantly behind on 1 of 3 tasks only)'
    assert 'both directions' in report.verdict([better, worse, noisy])


def test_finished_groups_are_reused_and_changed_settings_recomputed(tiny_base, tmp_path):
    base = tiny_base(str(tmp_path / 'cache'))
    settings = dataclasses.replace(paper.FULL, tasks=((TARGET, 1), (TARGET, 2)), methods=('scratch',),
                                   regimes=('all',), seeds=2, sweep_seeds=1, learning_rates=(0.01, 0.1), steps=4,
                                   eval_every=2)
    workdir = str(tmp_path / 'paper')
    first = paper.run_experiment(base, settings, workdir)
    assert first['computed'] == 2
    group = first['results'][(TARGET, 1, 'scratch', 'all')]
    assert [r['steps'] for r in group['runs']][0] == [0, 2, 4]
    assert {(r['seed'], r['learning_rate']) for r in group['runs']} == {
        (0, 0.01), (0, 0.1), (1, group['chosen_lr'])}

    again = paper.run_experiment(base, settings, workdir)
    assert again['computed'] == 0
    assert {key: (g['chosen_lr'], [r['test'] for r in g['runs']]) for key, g in again['results'].items()} == {
        key: (g['chosen_lr'], [r['test'] for r in g['runs']]) for key, g in first['results'].items()}

    longer = paper.run_experiment(base, dataclasses.replace(settings, steps=6), workdir)
    assert longer['computed'] == 2


def test_quick_mode_end_to_end(data_dir, tmp_path):
    """`--quick` (on the small test copies of the data, with a source model pretrained for 8 steps)."""
    workdir = str(tmp_path / 'quick')
    flags = [f'--config.{key}={value}' for key, value in (
        ('model.width', 0.25), ('init.cache_dir', tmp_path / 'cache'), ('init.pretrain_steps', 8),
        ('init.source_dataset', SOURCE), ('data.data_dir', data_dir), ('train.progress', False))]
    result = subprocess.run([sys.executable, '-m', 'experiments.paper', '--quick', f'--workdir={workdir}',
                             f'--tasks={TARGET}:1', *flags], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ' 17/17]' in result.stdout  # every group of the smoke run done
    with open(os.path.join(workdir, 'docs', 'results.md')) as f:
        text = f.read()
    for expected in ('## Table 1 analogue', '## Table 3 analogue', '## Chosen learning rates', '**1. Growing beats',
                     '**5. With normalisation', '| claim | verdict |', '--quick', 'LoRA r=', 'jax 0.'):
        assert expected in text, expected
    for name in ('cooperation', 'learning_curves', 'scales', 'parameter_change'):
        size = os.path.getsize(os.path.join(workdir, 'docs', 'figures', f'{name}.png'))
        assert 1000 < size < 200_000, (name, size)


def test_reports_go_to_the_checkouts_docs_and_find_their_sections_there():
    """The default report folder comes from the package's location, not the current folder, and the
    committed results.md holds the markers the commands splice at (else a rerun would append a copy)."""
    assert experiments.DOCS == os.path.join(REPO, 'docs')
    with open(os.path.join(experiments.DOCS, 'results.md')) as f:
        text = f.read()
    assert all(report.markers(name)[0] in text for name in report.SECTIONS)


def test_sections_of_other_commands_survive_a_rewrite_of_results_md(tmp_path):
    path = str(tmp_path / 'results.md')
    with open(path, 'w') as f:
        f.write('# paper\ntext\n')
    report.splice(path, 'map', 'MAP 1')
    report.splice(path, 'vit', 'VIT 1')
    report.splice(path, 'map', 'MAP 2')
    text = open(path).read()
    assert text.startswith('# paper\ntext') and 'MAP 1' not in text
    assert text.index('VIT 1') < text.index('MAP 2')  # in report.SECTIONS order, whatever wrote first
    kept = report.sections_of(path)
    with open(path, 'w') as f:  # what write_report does: the paper's part anew, the others kept
        f.write('# paper, regenerated\n')
    report.splice(path, keep=kept)
    assert report.sections_of(path) == {'vit': 'VIT 1', 'map': 'MAP 2'}
    assert open(path).read().startswith('# paper, regenerated')
