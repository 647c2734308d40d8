"""The growth map (experiments.map): its dataset, source widths, gamma from data, the runner's
generalisations, the protocol's top-up, the statistics, and --quick end to end."""
import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from growjax import Growth, config_lib, data, grow_params, models, train
from growjax.data import builtin
from experiments import map as growth_map
from experiments import map_report, paper, protocol, runner
from growjax.nn import NormScale, scales_from_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = 'growjax_latin/16px_max10'
TARGET = 'growjax_greek/16px_max10'


# ---------------------------------------------------------------------------------------------
# The scripts target


def test_script_letters_follow_their_rule_and_every_font_has_them():
    assert builtin.select_script_chars() == builtin.SCRIPT_CHARS  # the written-out list is the rule's
    assert len(builtin.SCRIPT_CHARS) == 131 == len(set(builtin.script_class_names()))
    assert not set(builtin.SCRIPT_CHARS) & (set(data.LATIN_CHARS) | set(data.GREEK_CHARS))
    for char in builtin.SCRIPT_CHARS:
        fonts = builtin.script_fonts(char)
        assert len(fonts) >= builtin.SCRIPT_MIN_FONTS and set(fonts) <= set(data.GREEK_FONTS), char


def test_scripts_dataset_builds_in_class_order(tmp_path):
    name = data.prepare_builtin('growjax_scripts', str(tmp_path), max_per_class=2)
    meta = data.dataset_info(name, str(tmp_path))
    assert meta.num_classes == 131 and meta.image_shape == (16, 16, 1)
    for split in ('train', 'validation', 'test'):
        images, labels = data.split_arrays(name, split, str(tmp_path), 16)
        np.testing.assert_array_equal(np.bincount(labels, minlength=131), 2)
        assert images.max() > 0.5  # ink is there
    again = builtin.GrowjaxScripts(config=builtin.make_config(16, 2), data_dir=str(tmp_path / 'again'))
    first = again._arrays(lambda n: None)['train']
    np.testing.assert_array_equal(first[1], np.repeat(np.arange(131), 2))
    assert first[0].tobytes() == again._arrays(lambda n: None)['train'][0].tobytes()  # deterministic


# ---------------------------------------------------------------------------------------------
# Source capacity: small_cnn's fc width


def test_fc_width_sets_fc6_and_fc7_only():
    x = jnp.zeros((1, 16, 16, 1))
    default = models.get('small_cnn', num_classes=3, width=0.5)
    assert default.fc6_units == default.fc7_units == 128  # unchanged: 256 x width
    wide = models.get('small_cnn', num_classes=3, width=0.5, fc_width=96)
    params = jax.eval_shape(wide.init, jax.random.key(0), x)['params']
    assert params['fc6']['kernel'].shape[-1] == 96
    assert params['fc7']['kernel'].shape == (96, 96) and params['classifier']['kernel'].shape == (96, 3)
    assert params['conv2']['kernel'].shape == jax.eval_shape(default.init, jax.random.key(0), x)['params'][
        'conv2']['kernel'].shape


def test_fc_width_config_key_reaches_the_model_and_the_source_cache():
    config = config_lib.base_config()
    default_dir = train.builtin_pretrained_dir(config)
    config.model.fc_width = 64
    assert train.build_model(config, 5).fc7_units == 64
    assert train.builtin_pretrained_dir(config) != default_dir
    assert config_lib.pretrain_config(config).model.fc_width == 64
    config.model.fc_width = -1
    with pytest.raises(config_lib.ConfigError, match='model.fc_width'):
        config_lib.validate(config)


# ---------------------------------------------------------------------------------------------
# NormScale's scales from data


def grown(growth, seed=0):
    x = jax.random.normal(jax.random.key(seed), (16, 16, 16, 1))
    plain = models.get('small_cnn', num_classes=7, width=0.25)
    pretrained = plain.init(jax.random.key(1), x)
    model = models.get('small_cnn', num_classes=7, width=0.25, growth=growth)
    return model, grow_params(pretrained, model, jax.random.key(2), x), x


def norm_scale_inputs(model, variables, x):
    found = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, NormScale):
            found[context.module.name] = (args[0], context.module.group_sizes)
        return next_fun(*args, **kwargs)

    import flax.linen as nn
    with nn.intercept_methods(record):
        model.apply(variables, x)
    return found


@pytest.mark.parametrize('mode', ['group', 'first'])
def test_scales_from_data_are_the_mean_group_norms(mode):
    model, variables, x = grown(Growth.wa(8))
    out = jax.jit(lambda v, x: scales_from_data(model, v, x, mode=mode))(variables, x)
    inputs, sizes = norm_scale_inputs(model, out, x)['classifier_norm']
    old, new = np.split(np.asarray(inputs), [sizes[0]], axis=-1)
    norms = [np.linalg.norm(old, axis=-1).mean(), np.linalg.norm(new, axis=-1).mean()]
    scale = out['params']['classifier_norm']
    np.testing.assert_allclose(scale['scale_0'], norms[0], rtol=1e-5)
    np.testing.assert_allclose(scale['scale_1'], norms[1] if mode == 'group' else norms[0], rtol=1e-5)
    # Old units leave NormScale with the mean norm they had: the pretrained scale.
    normed = NormScale(sizes).apply({'params': scale}, inputs)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(normed)[:, :sizes[0]], axis=-1), norms[0], rtol=1e-5)
    # Everything else is the grafted tree, unchanged; the input tree is not modified.
    np.testing.assert_array_equal(out['params']['fc7']['kernel'], variables['params']['fc7']['kernel'])
    assert float(variables['params']['classifier_norm']['scale_0'][0]) == 10.0


def test_scales_from_data_measure_each_norm_scale_after_the_ones_before_it():
    model, variables, x = grown(Growth.wwa(8))
    out = scales_from_data(model, variables, x)
    assert set(norm_scale_inputs(model, out, x)) == {'fc7_plus_norm', 'classifier_norm'}
    again = scales_from_data(model, out, x)  # a fixed point: measured with the scales before them set
    for layer in ('fc7_plus_norm', 'classifier_norm'):
        for leaf in out['params'][layer]:
            np.testing.assert_allclose(again['params'][layer][leaf], out['params'][layer][leaf], rtol=1e-5)
    with pytest.raises(ValueError, match='mode'):
        scales_from_data(model, variables, x, mode='mean')


# ---------------------------------------------------------------------------------------------
# The runner: whole pool, steps per run, data-initialised scales, kept variables, start models


def test_batch_plan_with_zero_shots_walks_the_whole_pool():
    labels = np.repeat(np.arange(3), [4, 5, 6])
    ids, _ = runner.batch_plan(labels, shots=0, seed=1, num_steps=6, batch_size=5, crop_padding=1)
    assert sorted(ids.ravel()[:15]) == list(range(15))  # one epoch: every example once


@pytest.fixture(scope='module')
def tiny(tiny_base):
    """The tiny set-up of conftest (its data and cached source model), as the map's runner reads it."""
    config = tiny_base()
    return config, runner.load_task(config, TARGET), train.load_pretrained(config)


def trainer(config, task, pretrained, regime='all', num_steps=None, scales=''):
    config = protocol.Variant('wa', 'wa', (('growth.units', 8),)).config(config)
    model = train.build_model(config, task.num_classes)
    return model, runner.Trainer(model, pretrained, regime, task, reinit=tuple(config.init.reinit), num_steps=num_steps,
                                 batch_size=8, eval_every=None if num_steps is None else 2, crop_padding=2,
                                 momentum=0.9, weight_decay=5e-4, new_lr_multiplier=10.0, lr_decay_at=(0.5, 0.8),
                                 scales_from_data=scales)


@pytest.mark.parametrize('regime', ['new', 'all'])  # a vectorised grid, and runs one at a time
def test_steps_per_run_give_the_runs_of_a_fixed_schedule(tiny, regime):
    config, task, pretrained = tiny
    _, fixed = trainer(config, task, pretrained, regime, num_steps=5)
    model, free = trainer(config, task, pretrained, regime)
    seeds, rates = ([0, 1], [0.01, 0.03]) if regime == 'new' else ([0], [0.03])
    for a, b in zip(fixed.run(1, seeds, rates), free.run(1, seeds, rates, num_steps=5, eval_every=2)):
        assert a.to_json() == b.to_json()
    if regime == 'new':
        return
    # The whole pool (shots=0), the final variables, and a start model other than the trainer's.
    (curves, variables), = free.run(0, [0], [0.01], num_steps=4, eval_every=2, keep_variables=True)
    assert curves.steps == [0, 2, 4]
    predictions = np.argmax(np.asarray(model.apply(variables, task.test.images)), -1)
    assert np.mean(predictions == task.test.labels) == pytest.approx(curves.test['accuracy'], abs=1e-6)
    halved = jax.tree_util.tree_map(lambda p: p * 0.5, pretrained)
    (_, start), = free.run(0, [0], [0.0], num_steps=1, eval_every=1, pretrained=halved, keep_variables=True)
    np.testing.assert_allclose(start['params']['conv1']['kernel'], 0.5 * pretrained['params']['conv1']['kernel'])
    assert float(start['params']['classifier_norm']['scale_0'][0]) == 10.0


def test_trainer_sets_scales_from_the_first_batch(tiny):
    config, task, pretrained = tiny
    model, fit = trainer(config, task, pretrained, scales='group')
    (_, start), = fit.run(1, [0], [0.0], num_steps=1, eval_every=1, keep_variables=True)
    ids, offsets = runner.batch_plan(task.train.labels, 1, 0, 1, 8, 2)
    first = fit._first_batches(ids[None], offsets[None])[0]
    expected = scales_from_data(model, grow_params(pretrained, model, jax.random.key(0), jnp.zeros((1, 16, 16, 1)), reinit=(
        '^classifier/',)), first)
    for leaf in ('scale_0', 'scale_1'):
        np.testing.assert_allclose(start['params']['classifier_norm'][leaf],
                                   expected['params']['classifier_norm'][leaf], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The protocol: stored runs reused, extra (shared) rates, saved progress


class FakeTrainer:
    vectorised = False

    def __init__(self):
        self.calls = []

    def run(self, shots, seeds, learning_rates, **kwargs):
        self.calls.append((list(seeds), list(learning_rates), kwargs))
        return [runner.RunCurves(seed, lr, [0], [], [{'accuracy': 1 - abs(np.log10(lr) + 2)}], {'accuracy': 0.5})
                for seed in seeds for lr in learning_rates]


def test_protocol_tops_up_stored_runs_and_runs_the_shared_rate():
    settings = dataclasses.replace(paper.FULL, seeds=3, sweep_seeds=2, learning_rates=(0.001, 0.01, 0.1))
    first = FakeTrainer()
    saved = []
    group = protocol.run_protocol(first, 1, settings, extra_rates=(0.1,), run_kwargs={'num_steps': 5},
                                  saved=saved.append)
    assert group['chosen_lr'] == 0.01 and len(saved) == len(first.calls)
    assert first.calls[0] == ([0, 1], [0.001, 0.01, 0.1], {'num_steps': 5})
    assert {(r['seed'], r['learning_rate']) for r in group['runs']} == {
        (s, lr) for s in (0, 1) for lr in (0.001, 0.01, 0.1)} | {(2, 0.01), (2, 0.1)}
    # A group stopped half way resumes with only what is missing.
    half = [r for r in group['runs'] if r['seed'] == 0]
    again = FakeTrainer()
    resumed = protocol.run_protocol(again, 1, settings, runs=half, extra_rates=(0.1,))
    assert all(seeds == [s] and len(rates) == 1 for seeds, rates, _ in again.calls for s in seeds)
    assert len(again.calls) == len(group['runs']) - len(half)
    assert growth_map.complete(resumed, settings, (0.1,)) and not growth_map.complete({'runs': half}, settings)


# ---------------------------------------------------------------------------------------------
# Statistics and the report's reading of runs


def test_paired_interval_and_test_match_scipy():
    a = {0: 0.80, 1: 0.74, 2: 0.91, 3: 0.66, 4: 0.85}
    b = {0: 0.78, 1: 0.70, 2: 0.90, 3: 0.60, 4: 0.86, 5: 0.1}
    d = map_report.diff(a, b)
    diffs = np.asarray([a[s] - b[s] for s in range(5)])
    low, high = stats.t.interval(0.95, 4, loc=diffs.mean(), scale=stats.sem(diffs))
    assert (d.n, d.low, d.high) == (5, pytest.approx(low), pytest.approx(high))
    assert d.p == pytest.approx(stats.ttest_rel([a[s] for s in range(5)], [b[s] for s in range(5)]).pvalue)
    assert d.sign == (1 if d.p < 0.05 else 0) and d.text().startswith('+')
    assert map_report.diff({0: 0.5}, {0: 0.4}) is None
    assert map_report.diff({0: 0.5, 1: 0.7}, 0.5).mean == pytest.approx(0.1)


def test_filters_select_chunks():
    only = growth_map.Filters.parse(['growjax_greek', 'shots=5', 'method=wa'])
    assert only.admit('growjax_greek', 5, 256, 'wa') and not only.admit('growjax_digits', 5, 256, 'wa')
    assert not only.admit('growjax_greek', 2, 256, 'wa') and growth_map.Filters().admit('x', 1, 2, 'y')
    with pytest.raises(Exception, match='only'):
        growth_map.Filters.parse(['shots=five'])


# ---------------------------------------------------------------------------------------------
# --quick end to end


def test_quick_end_to_end_and_report_from_the_store(tiny, tmp_path):
    config, _, _ = tiny  # its cached source model is the quick run's
    workdir = str(tmp_path / 'map')
    flags = [f'--config.{key}={value}' for key, value in (
        ('model.width', 0.25), ('init.cache_dir', config.init.cache_dir), ('init.pretrain_steps', 8),
        ('init.source_dataset', SOURCE), ('data.data_dir', config.data.data_dir), ('train.progress', False))]
    command = [sys.executable, '-m', 'experiments.map', '--quick', f'--workdir={workdir}', f'--tasks={TARGET}',
               *flags]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for axis in growth_map.AXES:
        assert f'axis {axis}:' in result.stdout, axis
    path = os.path.join(workdir, 'docs', 'results.md')
    text = open(path).read()
    assert '<!-- map:begin' in text and '<!-- map:end -->' in text
    for expected in ('### The map: size x distance x method', 'per-method rate', "fine-tuning's rate for all",
                     '### Verdicts per region', '### Convergence', '### Source capacity', '### Forgetting',
                     '### Continual growth', 'γ from data', '### Verdict', '--quick', 'Strongest case',
                     'the steps was significantly better in', '### Capacity or rescaling? NormScale only',
                     'growth − NormScale only (the new units)', 'Chosen rates still at an edge of the rates swept',
                     'Collapsed runs:', 'is the same at 1x and 2x in'):
        assert expected in text, expected
    verdict = text.split('### Verdict')[1].split('### Set-up')[0]
    assert verdict.count('\n- ') == 5  # growth vs fine-tuning, decomposition, schedule, rates, collapsed runs
    # The capacity axis's group at the size axis's width and S is the size axis's own file: one row, not two.
    decomposition = text.split('### Capacity or rescaling?')[1].split('Fine-tuning\'s rate for all')[0]
    assert '| Greek | 1 |' in decomposition and 'S = 0.25 x width' in decomposition
    assert 'S = 0.5 x width' not in decomposition
    for name in ('map_gain', 'map_accuracy', 'map_convergence', 'map_capacity', 'map_lr'):
        size = os.path.getsize(os.path.join(workdir, 'docs', 'figures', f'{name}.png'))
        assert 1000 < size < 300_000, (name, size)
    # Everything is stored: the report alone recomputes nothing and says the same.
    again = subprocess.run([*command, '--report_only'], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert '(0 groups computed)' in again.stdout
    strip = lambda t: [line for line in t.splitlines() if not line.startswith(('Written by', '- 20'))]
    assert strip(open(path).read()) == strip(text)


def test_settings_the_runs_do_not_record_are_refused():
    """--config.growth.scale_init=20 would silently reuse runs made with gamma = 10: refused, by name."""
    config = config_lib.base_config()
    growth_map.check_recorded(config)  # the defaults pass
    config.growth.scale_init = 20.0
    config.train.optimizer = 'adamw'
    with pytest.raises(growth_map.UserError, match=r'--config\.growth\.scale_init, --config\.train\.optimizer'):
        growth_map.check_recorded(config)


def test_bad_sizes_and_too_few_seeds_are_one_line_errors():
    for flag, expected in (('--sizes=1,x', '--sizes must be examples per class'),
                           ('--seeds=1', '--seeds=1 is below the 2 seeds that select the learning rate')):
        result = subprocess.run([sys.executable, '-m', 'experiments.map', flag, '--report_only'], cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and expected in result.stderr, result.stderr[-2000:]
        assert 'Traceback' not in result.stderr


def test_lora_rank_is_matched_per_target_and_tables_say_which():
    """The matched rank depends on the classifier's size: one label for all targets would misreport it."""
    base = config_lib.base_config()
    few, many = (growth_map.make_method('lora', base, 128, classes) for classes in (10, 131))
    assert few.label == many.label and 'r' not in few.label.split('(')[0].replace('LoRA', '')
    assert dict(few.overrides)['growth.lora_rank'] < dict(many.overrides)['growth.lora_rank']


def test_groups_with_fewer_seeds_than_planned_are_marked():
    assert map_report.seeds_text({0: 0.5, 1: 0.7}, 5) == '60.0 ± 127.1 (2 of 5 seeds)'
    assert map_report.seeds_text({s: 0.5 for s in range(5)}, 5) == '50.0 ± 0.0'
    assert map_report.seeds_text({}, 5) == ''
