"""experiments.growth: a run stores its curve and is reused, FLOPs to target interpolate, the page renders."""
import json
import math
import os

import numpy as np
import pytest

from experiments import growth

TINY = growth.Scale('tiny', small=(1, 8), big=(2, 16), head_dim=8, seq_len=8, batch=4, steps=6, warmup=2,
                    eval_every=2, eval_examples=8, eval_batch=8, after_growth=(1,), tail=2, tail_every=1)


def fake_corpus(seq_len=8, n=64) -> growth.Corpus:
    rng = np.random.default_rng(0)
    rows = rng.integers(97, 103, size=(n + 8, seq_len + 1)).astype(np.uint8)
    return growth.Corpus('fake', rows[:n], rows[n:])


def arm(name):
    return next(a for a in growth.arms_for(TINY) if a.name == name)


def test_a_grown_run_stores_its_curve_and_preserves_the_function_at_growth(tmp_path):
    record = growth.train_run(TINY, arm('grow'), 0, fake_corpus(), log=lambda *a, **k: None)
    g = record['growth_step']
    assert g == 2 and len(record['train_loss']) == TINY.steps
    phases = {p['phase']: p for p in record['evals'] if 'growth' in p['phase']}
    assert phases['before_growth']['val'] == pytest.approx(phases['after_growth']['val'], abs=1e-4)
    assert record['step_flops']['big'] > record['step_flops']['small'] > 0
    # Cumulative FLOPs: small steps before growth, the growth, big steps after.
    expected = g * record['step_flops']['small'] + record['growth_flops'] + (TINY.steps - g) * record['step_flops']['big']
    assert record['total_flops'] == pytest.approx(expected)
    assert record['evals'][-1]['flops'] == pytest.approx(expected)
    assert [p['step'] for p in record['evals']] == sorted(p['step'] for p in record['evals'])
    path = growth.save_run(str(tmp_path), record)
    assert json.load(open(path))['arm'] == 'grow'
    assert growth.load_run(str(tmp_path), TINY, arm('grow'), 0, 'fake')['total_flops'] == record['total_flops']
    assert growth.load_run(str(tmp_path), TINY, arm('grow'), 0, 'another corpus') is None
    changed = growth.Scale(**{**TINY.__dict__, 'lr': 1e-2})
    assert growth.load_run(str(tmp_path), changed, arm('grow'), 0) is None  # another setting: not reused


def test_run_all_resumes_from_stored_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(growth, 'load_corpus', lambda scale, data_dir: fake_corpus())
    filters = growth.Filters.parse(['tiny', 'big', 'seed=0'], {'tiny'}, {'big'})
    computed, stopped = growth.run_all([TINY], str(tmp_path), 'unused', 1, filters, None, log=lambda *a, **k: None)
    assert (computed, stopped) == (1, False)
    assert os.path.exists(growth.run_path(str(tmp_path), 'tiny', 'big', 0))
    computed, _ = growth.run_all([TINY], str(tmp_path), 'unused', 1, filters, None, log=lambda *a, **k: None)
    assert computed == 0
    computed, stopped = growth.run_all([TINY], str(tmp_path), 'unused', 1, growth.Filters(), 0.0)
    assert (computed, stopped) == (0, True)  # --max_minutes=0: no new run


def test_crossing_interpolates_linearly_between_evaluations():
    evals = [{'flops': 0.0, 'wall': 0.0, 'val': 5.0}, {'flops': 10.0, 'wall': 1.0, 'val': 3.0},
             {'flops': 20.0, 'wall': 3.0, 'val': 2.0}, {'flops': 30.0, 'wall': 4.0, 'val': 2.5}]
    assert growth.crossing(evals, 4.0) == pytest.approx(5.0)
    assert growth.crossing(evals, 2.5) == pytest.approx(15.0)
    assert growth.crossing(evals, 2.5, 'wall') == pytest.approx(2.0)
    assert growth.crossing(evals, 5.0) == 0.0
    assert growth.crossing(evals, 1.9) is None
    assert growth.value_at(evals, 25.0) == pytest.approx(2.25)
    assert growth.value_at(evals, 31.0) is None


def test_learning_rate_continues_or_rewarms_after_growth():
    scale = growth.Scale(**{**TINY.__dict__, 'steps': 100, 'warmup': 10})
    cont, rewarm = arm('grow'), arm('rewarm')
    assert growth.learning_rate(scale, cont, 0, 25) == pytest.approx(scale.lr / 10)
    assert growth.learning_rate(scale, cont, 25, 25) == pytest.approx(growth.learning_rate(scale, cont, 25, None))
    assert growth.learning_rate(scale, rewarm, 25, 25) == pytest.approx(growth.learning_rate(scale, cont, 25, 25) / 10)
    assert growth.learning_rate(scale, rewarm, 40, 25) == pytest.approx(growth.learning_rate(scale, cont, 40, 25))
    assert growth.learning_rate(scale, cont, 99, None) == pytest.approx(scale.lr * (scale.min_lr + (1 - scale.min_lr) * 0.5 * (1 + math.cos(math.pi * 89 / 90))))


def fake_run(name, seed, total, finals, growth_step=None, spike=0.0):
    """A stored-run record whose validation loss falls linearly from 5 to `finals` over `total` FLOPs."""
    a = arm(name)
    steps = np.arange(0, 11)
    vals = 5.0 - (5.0 - finals) * steps / 10
    evals = [{'step': int(s), 'flops': total * s / 10, 'wall': s / 10, 'val': float(v), 'phase': 'big', 'train': None}
             for s, v in zip(steps, vals)]
    if growth_step is not None:
        before = dict(evals[growth_step], phase='before_growth')
        after = dict(before, phase='after_growth')
        evals[growth_step] = dict(evals[growth_step], val=evals[growth_step]['val'] + spike, step=growth_step + 0.5)
        evals[growth_step:growth_step] = [before, after]
    return {'fingerprint': growth.fingerprint(TINY, a, seed, 'fake'), 'scale': 'tiny', 'arm': name, 'seed': seed,
            'label': a.label, 'small': [1, 8], 'big': [2, 16], 'growth_step': growth_step,
            'step_flops': {'small': 1.0, 'big': 2.0}, 'growth_flops': 0.5, 'total_flops': total, 'wall': 1.0,
            'eval_seconds': 0.0, 'compile_seconds': 0.0, 'evals': evals, 'train_loss': [3.0] * 10,
            'tokens_per_step': 32, 'machine': {'cpus': 2, 'load_1min': [1.0, 2.0], 'platform': 'x', 'jax': 'x',
                                               'backend': 'cpu'}}


def test_the_page_renders_from_stored_runs(tmp_path):
    workdir = str(tmp_path / 'work')
    for seed, final in enumerate((2.0, 2.1, 1.9)):
        growth.save_run(workdir, fake_run('big', seed, 100.0, final))
    for seed, final in enumerate((1.8, 1.85, 1.75)):  # reaches 2.0 at 3/3.2 of its FLOPs
        growth.save_run(workdir, fake_run('grow', seed, 60.0, final, growth_step=3, spike=0.2))
    growth.save_run(workdir, fake_run('small', 0, 20.0, 3.0))
    per_arm = growth.stored_runs(workdir, [TINY])['tiny']
    summary = growth.summarise(per_arm['grow'], per_arm['big'])
    assert summary['target'] == pytest.approx(2.0)
    fractions = [growth.crossing(r['evals'], 2.0) / 100.0 for r in per_arm['grow']]
    assert summary['flops_to_target'][0] == pytest.approx(np.mean(fractions))
    assert summary['flops_to_target'][1] < summary['flops_to_target'][0] < summary['flops_to_target'][2]
    assert summary['spike']['rise'] == pytest.approx(0.2) and summary['spike']['recover_steps'] is not None
    assert growth.summarise(per_arm['small'], per_arm['big'])['flops_to_target'] is None
    assert growth.best_arm(per_arm) == 'grow'
    page = growth.write_page([TINY], workdir, str(tmp_path / 'docs' / 'growth.md'), command='python -m experiments.growth --x')
    text = open(page).read()
    assert text.splitlines()[2].startswith('Verdict: at tiny (1x8 -> 2x16), the best grown arm ("width+depth (default rules)") '
                                           "reached the big-from-scratch model's final validation loss with 56% of its FLOPs (95% t interval over 3 seeds: 54%–58%), 44% fewer: it meets the target of at least 40% fewer FLOPs (1 of 1 grown arms reached that loss at all")
    assert 'python -m experiments.growth --x' in text
    assert 'not reached (0/1 seeds)' in text  # the small model
    assert 'not run yet' in text  # arms without stored runs are listed as missing
    assert os.path.exists(tmp_path / 'docs' / 'figures' / 'growth_tiny.png')
    assert os.path.exists(tmp_path / 'docs' / 'figures' / 'growth_tiny_spike.png')


def test_only_filters_and_refuses_unknown_names():
    f = growth.Filters.parse(['w64', 'grow', 'seed=1'], {'w64', 'w128'}, {'grow', 'big'})
    assert f.admit('w64', 'grow', 1) and not f.admit('w128', 'grow', 1) and not f.admit('w64', 'big', 1)
    with pytest.raises(ValueError, match='not a scale'):
        growth.Filters.parse(['nope'], {'w64'}, {'grow'})
