"""The main job end to end on tiny built-in data: outputs, resume, sharding, config errors."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from growjax import config_lib, data, families, steps, train
from growjax.errors import UserError
from growjax.grow import flatten

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = 'growjax_greek/16px_max10'


def test_end_to_end_writes_every_output(tiny_config, tmp_path):
    summary = train.train_and_evaluate(tiny_config(), str(tmp_path))
    with open(tmp_path / 'summary.json') as f:
        assert json.load(f) == summary
    assert 0.0 <= summary['accuracy'] <= 1.0 and summary['step'] == 12
    records = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
    train_records = [r for r in records if r['split'] == 'train']
    assert [r['step'] for r in train_records] == [4, 8, 12]
    for r in records[1:]:
        assert {'step', 'split', 'loss', 'accuracy'} <= set(r) and np.isfinite(r['loss'])
    assert {r['split'] for r in records} == {'config', 'train', 'test', 'validation'}
    assert (tmp_path / 'curves.png').stat().st_size > 1000
    assert os.listdir(tmp_path / 'tensorboard')
    # The export is a valid pretrained input of the next growth round.
    config = tiny_config(method='wwa')
    config.init.pretrained = str(tmp_path)
    config.init.reinit = ()
    second = train.train_and_evaluate(config, str(tmp_path / 'round2'))
    assert second['step'] == 12


def test_evaluation_during_training_reads_the_validation_split_only(tiny_config, tmp_path):
    config = tiny_config()
    config.train.eval_every = 4
    train.train_and_evaluate(config, str(tmp_path))
    records = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
    assert [r['step'] for r in records if r['split'] == 'validation'] == [4, 8, 12]
    assert [r['step'] for r in records if r['split'] == 'test'] == [12]  # once, at the end


def test_without_a_validation_split_only_the_final_evaluation_runs(tiny_config, tmp_path):
    config = tiny_config()
    config.data.val_split = ''
    summary = train.train_and_evaluate(config, str(tmp_path))
    records = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
    assert [(r['step'], r['split']) for r in records if r['split'] not in ('config', 'train')] == [(12, 'test')]
    assert 'validation_accuracy' not in summary


def test_continual_growth_trains_the_layers_an_earlier_round_added(tiny_config, tmp_path):
    """Round 1 (WA) adds fc7_plus and classifier_norm; round 2 (WWA) grows its export again. They are
    pretrained layers of round 2 and must train under regimes that reach them (the regime's layer
    order once came from the plain architecture, which lacks them: they stayed frozen)."""
    from growjax.checkpoint import load_export
    train.train_and_evaluate(tiny_config('wa'), str(tmp_path / 'round1'))
    round1 = flatten(load_export(str(tmp_path / 'round1'))[0]['params'])
    grown_in_round1 = [path for path in round1 if path[0] in ('fc7_plus', 'classifier_norm')]
    assert len(grown_in_round1) == 4  # fc7_plus kernel/bias, classifier_norm scale_0/scale_1
    for regime in ('all', 'fc7_new'):
        config = tiny_config('wwa')
        config.init.pretrained = str(tmp_path / 'round1')
        config.init.reinit = ()
        config.train.regime = regime
        train.train_and_evaluate(config, str(tmp_path / f'round2_{regime}'))
        round2 = flatten(load_export(str(tmp_path / f'round2_{regime}'))[0]['params'])
        for path in grown_in_round1:
            assert not np.array_equal(round2[path], round1[path]), f'{regime}: {"/".join(path)} did not train'
        frozen_below = [path for path in round1 if path[0] in ('conv1', 'conv2', 'fc6')]
        for path in frozen_below:  # fc7_new: what lies below fc7 stays as round 1 left it
            assert np.array_equal(round2[path], round1[path]) == (regime == 'fc7_new'), (regime, path)


def test_builtin_pretrained_model_is_cached(tiny_config, monkeypatch):
    config = tiny_config()
    train.load_pretrained(config)  # pretrains once (or finds the cache)
    calls = []
    monkeypatch.setattr(train, 'train_and_evaluate', lambda *args: calls.append(args))
    variables = train.load_pretrained(config)
    assert not calls and 'fc7' in variables['params']


class Interrupted(Exception):
    pass


def test_resume_continues_from_checkpoint_and_matches_uninterrupted_run(tiny_config, tmp_path, monkeypatch):
    config = tiny_config()
    train.train_and_evaluate(config, str(tmp_path / 'straight'))

    real_shard = steps.shard_train_step
    calls = []

    def failing_after(limit):
        def shard(step_fn, mesh):
            jitted = real_shard(step_fn, mesh)

            def step(state, batch):
                if len(calls) == limit:
                    raise Interrupted
                calls.append(1)
                return jitted(state, batch)
            return step
        return shard

    monkeypatch.setattr(steps, 'shard_train_step', failing_after(10))
    with pytest.raises(Interrupted):
        train.train_and_evaluate(config, str(tmp_path / 'resumed'))
    calls.clear()
    monkeypatch.setattr(steps, 'shard_train_step', failing_after(1000))
    train.train_and_evaluate(config, str(tmp_path / 'resumed'))
    assert len(calls) == 4  # resumed at the step-8 checkpoint, not from scratch

    from growjax.checkpoint import load_export
    straight, _ = load_export(str(tmp_path / 'straight'))
    resumed, _ = load_export(str(tmp_path / 'resumed'))
    for path, leaf in flatten(straight).items():
        np.testing.assert_array_equal(flatten(resumed)[path], leaf, err_msg='/'.join(path))
    steps_logged = [json.loads(l)['step'] for l in open(tmp_path / 'resumed' / 'metrics.jsonl')
                    if json.loads(l)['split'] == 'train']
    assert steps_logged == [4, 8, 12]  # records of the interrupted run after its checkpoint are dropped


def test_sharded_step_matches_single_device(tiny_config):
    config = tiny_config()
    meta = data.dataset_info(TARGET, config.data.data_dir)
    model = train.build_model(config, meta.num_classes)
    pretrained = train.load_pretrained(config)
    batch = {'image': jax.random.normal(jax.random.key(5), (16, 16, 16, 1)),
             'label': jnp.arange(16, dtype=jnp.int32) % meta.num_classes}
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = steps.data_mesh(devices)
        state, optimizer, dropout_rng = train.init_state(config, model, pretrained, mesh, (16, 16, 1))
        step = steps.shard_train_step(steps.make_train_step(model, optimizer, dropout_rng), mesh)
        placed = jax.device_put(batch, steps.batch_sharding(mesh))
        for _ in range(2):
            state, metrics = step(state, placed)
        results.append((float(metrics['loss']), jax.device_get(state.trainable)))
    assert len(jax.devices()) == 8
    (loss_1, params_1), (loss_8, params_8) = results
    np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_8, params_1)


def run_main(*args):
    return subprocess.run([sys.executable, 'main.py', *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize('override,expected', [
    ('--config.train.no_such_key=1', 'no_such_key'),
    ('--config.train.steps=abc', 'steps'),
])
def test_bad_overrides_are_refused_by_name(override, expected, tmp_path):
    result = run_main('--config=configs/wide.py', override, f'--workdir={tmp_path}')
    assert result.returncode != 0
    assert expected in result.stderr


@pytest.mark.parametrize('override,expected', [
    ('--config.growth.widen=fc9=4', "cannot widen 'fc9'"),
    ('--config.growth.units=0', 'config.growth.units'),
    ('--config.train.batch_size=12', 'config.train.batch_size=12 is not divisible'),
    ('--config.train.regime=fc9_new', 'config.train.regime'),
    ('--config.init.pretrained=/no/such/file.pth', 'config.init.pretrained: /no/such/file.pth does not exist'),
])
def test_invalid_values_give_one_line_errors(tiny_flags, override, expected, tmp_path):
    env_args = tiny_flags
    result = subprocess.run(
        [sys.executable, 'main.py', '--config=configs/wide.py', *env_args, override, f'--workdir={tmp_path}'],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
    assert result.returncode == 2, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(error_lines) == 1 and expected in error_lines[0], result.stderr[-2000:]
    assert 'Traceback' not in result.stderr


def test_one_line_errors_keep_their_quotes():
    code = ("import main; print(main.one_line(ValueError(\"pass 'builtin'\"))); "
            "print(main.one_line(KeyError('no such key')))")
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.splitlines() == ["pass 'builtin'", 'no such key'], result.stderr[-2000:]


@pytest.fixture
def tiny_vit_config(tiny_config):
    """A tiny ViT (2 blocks, width 16) on the tiny built-in data; its source model pretrained for 8 steps."""
    def make(method='wa'):
        c = tiny_config(method)
        c.model.name = 'vit'
        c.model.vit.update(variant='mu/4', width=16, depth=2, mlp_dim=32, num_heads=2)
        c.init.reinit = families.get('vit').classifier
        c.growth.units = 8
        return c
    return make


@pytest.mark.parametrize('method,regime,new_leaf', [
    ('wa', 'block1_new', ('block1', 'mlp', 'fc1', 'plus', 'kernel')),
    ('da', 'new', ('block1_inserted', 'mlp', 'fc2', 'kernel')),
    ('heads', 'all', ('block1', 'attention', 'extra_heads', 'query', 'kernel')),
    ('lora', 'new', ('block0', 'attention', 'value', 'lora_b')),
])
def test_vit_grows_and_trains_through_the_main_job(tiny_vit_config, tmp_path, method, regime, new_leaf):
    from growjax.checkpoint import load_export
    config = tiny_vit_config(method)
    config.train.regime = regime
    summary = train.train_and_evaluate(config, str(tmp_path))
    assert 0.0 <= summary['accuracy'] <= 1.0 and summary['step'] == 12
    exported = flatten(load_export(str(tmp_path))[0]['params'])
    source = flatten(train.load_pretrained(config)['params'])
    assert new_leaf in exported and new_leaf not in source
    # Regime 'new' leaves the whole pretrained ViT as it was; 'block1_new' the blocks below block1.
    frozen = {'new': lambda path: path[0] != 'head', 'block1_new': lambda path: path[0] in ('embedding', 'block0'),
              'all': lambda path: False}[regime]
    for path, leaf in source.items():
        if frozen(path):
            np.testing.assert_array_equal(exported[path], leaf, err_msg='/'.join(path))
    if regime != 'new':  # and the layers it trains moved
        assert any(not np.array_equal(exported[path], leaf) for path, leaf in source.items()
                   if not frozen(path) and path[0] != 'head')


def test_a_cnn_only_or_vit_only_setting_is_refused_by_name(tiny_config, tiny_vit_config):
    config = tiny_config('heads')
    with pytest.raises(UserError, match="growth.method='heads' applies to ViTs only"):
        train.build_model(config, 24)
    config = tiny_vit_config('wa')
    config.growth.widen = 'fc7=4'
    with pytest.raises(config_lib.ConfigError, match='config.growth.widen is for CNNs'):
        train.build_model(config, 24)
    config = tiny_vit_config('wa')
    config.train.regime = 'fc7_new'
    with pytest.raises(config_lib.ConfigError, match="config.train.regime: Unknown regime 'fc7_new'"):
        train.train_and_evaluate(config, '/tmp/never-created')
