"""growjax.analysis: hand-computed cases, exactness on a real head, hooks in main.py's job, the command."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import growjax
from growjax import Growth, analysis, config_lib, data, grow_params, train
from growjax.analysis import cli
from growjax.outputs import read_metrics

SOURCE = 'growjax_latin/16px_max10'
TARGET = 'growjax_greek/16px_max10'
X = jax.random.uniform(jax.random.key(0), (6, 16, 16, 1))


def test_cooperation_by_hand():
    old = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    new = jnp.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    classifier = {'kernel': jnp.eye(2), 'bias': jnp.zeros(2), 'from_fc7_plus': {'kernel': 3 * jnp.eye(2)}}
    intermediates = {'classifier_in_fc7': (old,), 'classifier_in_fc7_plus': (new,)}
    labels = jnp.array([0, 1, 0])
    # Old alone predicts [0, 1, 0]; new alone [1, 1, 1]; together the new units dominate: [1, 1, 1].
    values = analysis.cooperation_accuracies(intermediates, classifier, labels)
    np.testing.assert_allclose([values['cooperation/fc7'], values['cooperation/fc7_plus'], values['cooperation/all']],
                               [1.0, 1 / 3, 1 / 3])
    silent = {**classifier, 'from_fc7_plus': {'kernel': jnp.zeros((2, 2))}}
    values = analysis.cooperation_accuracies(intermediates, silent, labels)
    assert values['cooperation/all'] == values['cooperation/fc7']  # zero new kernel: 'all' is the old units alone


def test_scales_and_relative_change_by_hand():
    params = {'classifier_norm': {'scale_0': jnp.array([1.0, 3.0]), 'scale_1': jnp.array([10.0])},
              'fc7': {'kernel': jnp.array([3.0, 9.0]), 'bias': jnp.array([5.0])},
              'fc7_plus': {'kernel': jnp.array([1.0])}}
    assert analysis.unit_scales(params) == {'scale/classifier_norm/0': 2.0, 'scale/classifier_norm/1': 10.0}
    reference = {'fc7': {'kernel': jnp.array([3.0, 4.0]), 'bias': jnp.array([0.0])},
                 'fc6': {'kernel': jnp.array([1.0])}}
    change = analysis.relative_change(params, reference)
    # fc7: ||(0, 5, 5)|| / ||(3, 4, 0)||; fc6 is absent from params, fc7_plus from the reference.
    assert set(change) == {'change/fc7'}
    np.testing.assert_allclose(change['change/fc7'], np.sqrt(50.0) / 5.0)


def test_group_logits_rebuild_the_classifier_exactly():
    plain = growjax.models.get('small_cnn', num_classes=5, width=0.25)
    pretrained = plain.init(jax.random.key(1), X)
    for growth in (Growth.wa(8), Growth.wwa(8), Growth.dwa(8), Growth.da(8), None):
        model = growjax.models.get('small_cnn', num_classes=3, width=0.25, growth=growth)
        variables = grow_params(pretrained, model, jax.random.key(2), X, reinit='^classifier/')
        logits, state = model.apply(variables, X, mutable=['intermediates'])
        rebuilt = analysis.group_logits(analysis.classifier_inputs(state['intermediates']),
                                        variables['params']['classifier'])
        np.testing.assert_allclose(rebuilt['all'], logits, rtol=1e-5, atol=1e-5)
        values = analysis.analyse(model, variables, pretrained['params'], X, jnp.array([0, 1, 2, 0, 1, 2]))
        assert values['accuracy'] == values['cooperation/all']
        assert values['change/fc7'] == 0.0  # grafted leaves are the pretrained ones


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
    """A tiny main.py job with train.analysis=True (its source model pretrained for 8 steps)."""
    data_dir = str(tmp_path_factory.mktemp('tfds'))
    for name in (SOURCE, TARGET):
        data.prepare_builtin(name, data_dir)
    config = config_lib.base_config()
    config.model.width = 0.25
    config.growth.units = 16
    config.init.cache_dir = str(tmp_path_factory.mktemp('cache'))
    config.init.pretrain_steps = 8
    config.init.source_dataset = SOURCE
    config.data.name = TARGET
    config.data.data_dir = data_dir
    config.data.shots_per_class = 2
    config.train.steps = 8
    config.train.batch_size = 16
    config.train.log_every = 4
    config.train.eval_every = 4
    config.train.checkpoint_every = 8
    config.train.eval_batch_size = 64
    config.train.progress = False
    config.train.analysis = True
    workdir = str(tmp_path_factory.mktemp('run'))
    train.train_and_evaluate(config, workdir, eval_hooks=analysis.hooks())
    return workdir


def test_hooks_log_the_analyses_at_every_evaluation(finished_run):
    records = [r for r in read_metrics(finished_run) if r['split'] == 'analysis']
    assert [r['step'] for r in records] == [0, 4, 8]
    for record in records:
        assert {'cooperation/fc7', 'cooperation/fc7_plus', 'cooperation/all', 'scale/classifier_norm/0',
                'scale/classifier_norm/1'} <= set(record)
        assert 0.0 <= record['cooperation/all'] <= 1.0
    assert records[0]['change/fc7'] == 0.0 and records[-1]['change/fc7'] > 0.0
    assert records[0]['scale/classifier_norm/1'] == pytest.approx(10.0)


def test_command_plots_logged_records(finished_run):
    assert cli.main(['--workdir', finished_run]) == 0
    for name in cli.FIGURES:
        assert os.path.getsize(os.path.join(finished_run, name)) > 1000
    with open(os.path.join(finished_run, 'analysis.json')) as f:
        assert [r['step'] for r in json.load(f)] == [0, 4, 8]


def test_command_analyses_the_export_of_a_run_without_records(finished_run, tmp_path):
    workdir = str(tmp_path / 'run')
    shutil.copytree(finished_run, workdir)
    kept = [r for r in read_metrics(workdir) if r['split'] != 'analysis']
    with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in kept)
    (record,), split = cli.records_from_workdir(workdir)
    assert split == 'validation'
    logged = [r for r in read_metrics(finished_run) if r['split'] == 'analysis'][-1]
    assert record['step'] == 8
    # The export holds the final parameters, so the scales match the last logged record; the change is
    # measured from the pretrained source model here, from the grown init in the hook: both move fc7 alike.
    assert record['scale/classifier_norm/1'] == pytest.approx(logged['scale/classifier_norm/1'], rel=1e-6)
    assert record['change/fc7'] == pytest.approx(logged['change/fc7'], rel=1e-5)
    assert record['cooperation/all'] == pytest.approx(logged['cooperation/all'])


def test_command_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert cli.main(['--workdir', str(tmp_path)]) == 2
    assert 'is it a growjax workdir?' in capsys.readouterr().err
