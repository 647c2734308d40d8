"""The LM job that grows during training (growjax.lm_train, configs/lm_grow.py) and the model-family
registry it is reached through (growjax.families): tiny sizes on a 20 kB copy of the corpus."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from growjax import families, lm_train, models, steps, train
from growjax.errors import ConfigError, UserError
from growjax.families import gpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {'data.max_bytes': 20000, 'data.seq_len': 32, 'data.eval_examples': 16, 'model.width': 16, 'model.depth': 1,
        'model.head_dim': 8, 'growth.width': (32,), 'growth.depth': (2,), 'train.steps': 12, 'train.batch_size': 8,
        'train.eval_batch_size': 8, 'train.warmup_steps': 2, 'train.log_every': 2, 'train.eval_every': 4,
        'train.checkpoint_every': 4, 'train.progress': False}


@pytest.fixture(scope='module')
def lm_data_dir(tmp_path_factory):
    from growjax.data import text
    directory = str(tmp_path_factory.mktemp('lm_tfds'))
    text.prepare_stdlib(directory, TINY['data.seq_len'], max_bytes=TINY['data.max_bytes'])
    return directory


@pytest.fixture
def tiny_lm(lm_data_dir):
    """A factory of configs/lm_grow.py's config at tiny sizes: 16x1 grown to 32x2 after 6 of 12 steps."""
    def make(**overrides):
        config = gpt.config()
        for key, value in {**TINY, 'data.data_dir': lm_data_dir, **overrides}.items():
            section, name = key.split('.')
            config[section][name] = value
        return config
    return make


def rows(workdir, split):
    return [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl')) if json.loads(line)['split'] == split]


# ---------------------------------------------------------------------------------------------
# The registry


def test_every_model_has_one_family_and_the_trainer_reaches_it_by_name():
    assert sorted(families.model_names()) == models.names()
    assert families.get('gpt').job is lm_train.train_and_evaluate
    assert families.get('small_cnn').job is None and families.get('vit').job is None
    with pytest.raises(ConfigError, match=r"config.model.name: 'nope' is not one of"):
        families.get('nope')


def test_a_method_a_family_lacks_names_the_families_that_have_it(tiny_config):
    config = tiny_config('heads')
    with pytest.raises(UserError, match=r"growth.method='heads' applies to ViTs only; methods for CNNs: \["):
        train.build_model(config, 24)


def test_the_fine_tune_config_of_a_gpt_is_refused_with_the_config_to_start_from(tiny_config):
    config = tiny_config()
    config.model.name = 'gpt'
    with pytest.raises(ConfigError, match='start from configs/lm_grow.py'):
        train.train_and_evaluate(config, '/tmp/never-created')


# ---------------------------------------------------------------------------------------------
# The job


def test_lm_grows_on_schedule_end_to_end(tiny_lm, tmp_path):
    summary = train.train_and_evaluate(tiny_lm(), str(tmp_path))
    train_rows = rows(tmp_path, 'train')
    assert [r['step'] for r in train_rows] == [2, 4, 6, 8, 10, 12]
    flops = [r['flops'] for r in train_rows]
    assert all(b > a for a, b in zip(flops, flops[1:]))
    assert [r['stage'] for r in train_rows] == [0, 0, 0, 1, 1, 1]
    small, big = summary['stages']
    # Per step, the big model costs more; every step is counted at its own stage's cost.
    assert big['flops_per_step'] > 2 * small['flops_per_step'] > 0
    assert flops[-1] == summary['flops'] == 6 * small['flops_per_step'] + 6 * big['flops_per_step']
    (growth,) = rows(tmp_path, 'growth')
    assert growth['step'] == 6 and growth['stage'] == 1
    assert (growth['width_before'], growth['depth_before'], growth['width_after'], growth['depth_after']) == (16, 1, 32, 2)
    assert growth['params_after'] > growth['params_before'] == small['params']
    assert growth['flops'] == flops[2]
    # The default growth preserves the function: the loss just after equals the loss just before.
    assert abs(growth['loss_after'] - growth['loss_before']) < 1e-4 * growth['loss_before']
    validation = rows(tmp_path, 'validation')
    assert [r['step'] for r in validation] == [4, 8, 12]
    assert validation[-1]['loss'] == summary['validation_loss']
    assert summary['validation_bits_per_byte'] == pytest.approx(summary['validation_loss'] / np.log(2))
    assert summary['validation_bytes'] == 16 * 32
    with open(tmp_path / 'summary.json') as f:
        assert json.load(f) == summary
    assert (tmp_path / 'curves.png').stat().st_size > 1000


def test_learning_rate_continues_or_rewarms_after_growth(tiny_lm):
    config = tiny_lm(**{'train.steps': 100, 'train.warmup_steps': 10, 'growth.at': (0.3, 0.6),
                        'growth.width': (32, 64), 'growth.depth': (2, 2), 'growth.rewarm_steps': 5})
    continued = lm_train.learning_rate_schedule(config)
    config.growth.lr = 'rewarm'
    rewarmed = lm_train.learning_rate_schedule(config)
    for count in (0, 5, 29, 45, 59, 80):  # away from the growths: the same schedule
        assert float(rewarmed(count)) == pytest.approx(float(continued(count)))
    for growth_step in (30, 60):  # the first update after a growth has count == growth step
        assert float(rewarmed(growth_step)) == pytest.approx(float(continued(growth_step)) / 5)
        assert float(rewarmed(growth_step + 4)) == pytest.approx(float(continued(growth_step + 4)))


@pytest.mark.parametrize('new_layers', ['zero', 'stack'])
def test_new_layers_start_as_identities_or_as_copies(tiny_lm, new_layers):
    """'stack' copies small blocks whole (G_stack); growth.zero applies to fresh blocks only (it once
    zeroed the copies' residual outputs too, turning G_stack into identity blocks)."""
    config = tiny_lm(**{'growth.new_layers': new_layers, 'growth.width': (16,)})
    first, second = lm_train.stages(config)
    small, big = lm_train.build_model(config, first), lm_train.build_model(config, second)
    plan = lm_train.growth_plan(config, small, big, jnp.zeros((1, 32), jnp.int32))
    fc2 = plan.leaves[('params', 'block_1', 'mlp', 'fc2', 'kernel')]
    assert fc2.zero == (new_layers == 'zero')
    assert (fc2.source == ('params', 'block_0', 'mlp', 'fc2', 'kernel')) == (new_layers == 'stack')
    assert plan.preserving == (new_layers == 'zero')


def test_growth_keeps_the_state_replicated_on_the_mesh(tiny_lm):
    config = tiny_lm()
    first, second = lm_train.stages(config)
    mesh = steps.data_mesh()
    replicated = steps.replicated(mesh)
    optimizer = lm_train.make_optimizer(config)
    small, big = lm_train.build_model(config, first), lm_train.build_model(config, second)
    state = jax.jit(lambda key: lm_train.new_state(small, optimizer, key, 32), out_shardings=replicated)(
        jax.random.key(0))
    grown = lm_train.grow(config, state, small, big, second, jnp.zeros((1, 32), jnp.int32), replicated)
    assert len(mesh.devices.flat) == 8
    for leaf in jax.tree_util.tree_leaves((grown.trainable, grown.opt_state)):
        assert leaf.sharding.is_equivalent_to(replicated, leaf.ndim)
    step = steps.shard_train_step(lm_train.make_train_step(big, optimizer, jax.random.key(1)), mesh)
    batch = jax.device_put({'inputs': jnp.ones((8, 32), jnp.int32), 'targets': jnp.ones((8, 32), jnp.int32)},
                           steps.batch_sharding(mesh))
    after, metrics = step(grown, batch)
    assert np.isfinite(float(metrics['loss'])) and after.trainable['block_1']['mlp']['fc2']['kernel'].sharding \
        .is_equivalent_to(replicated, 2)


@pytest.mark.parametrize('override,expected', [
    ({'growth.width': (32, 64)}, 'config.growth.width: needs one entry per growth.at (1)'),
    ({'growth.width': (24,)}, 'config.growth.width: entry 0 is 24: it must be a multiple of the width before it (16)'),
    ({'growth.at': (0.01,)}, 'config.growth.at: (0.01,) of train.steps=12 gives growth steps [0]'),
    ({'growth.lr': 'restart'}, "config.growth.lr: must be one of ('continue', 'rewarm')"),
    ({'model.width': 20}, 'config.model.width: 20 is not a multiple of model.head_dim=8'),
])
def test_bad_lm_config_values_name_the_key(tiny_lm, override, expected):
    with pytest.raises(ConfigError) as info:
        lm_train.validate(tiny_lm(**override))
    assert str(info.value).startswith(expected), str(info.value)


# ---------------------------------------------------------------------------------------------
# Kill and resume across the growth (real main.py processes, as tests/test_reliability.py)


def main_command(config_flags, workdir):
    return [sys.executable, 'main.py', '--config=configs/lm_grow.py', *config_flags, f'--workdir={workdir}']


def as_flags(config):
    flags = []
    for key, value in {**TINY, 'data.data_dir': config.data.data_dir, 'train.checkpoint_every': 2}.items():
        flags.append(f'--config.{key}={value}' if not isinstance(value, tuple) else
                     f"--config.{key}=({','.join(map(str, value))},)")
    return flags


def run_until(command, condition, log_path, timeout=300) -> str:
    """Starts `command` and SIGKILLs it once condition() holds: '' if it was killed, else why not."""
    with open(log_path, 'w') as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=log)
        started = time.time()
        try:
            while process.poll() is None and time.time() - started < timeout:
                if condition():
                    process.send_signal(signal.SIGKILL)
                    process.wait()
                    return ''
                time.sleep(0.005)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
    with open(log_path) as log:
        return f'not killed (exit {process.returncode}): {log.read()[-2000:]}'


def logged(workdir, text):
    path = os.path.join(workdir, 'metrics.jsonl')
    return os.path.exists(path) and text in open(path).read()


@pytest.mark.slow
@pytest.mark.parametrize('when', ['before', 'during', 'just_after'])
def test_sigkill_around_the_growth_then_resume_gives_the_same_numbers(tiny_lm, tmp_path, when):
    config = tiny_lm()
    straight = train.train_and_evaluate(config, str(tmp_path / 'straight'))
    workdir = str(tmp_path / 'killed')
    flags = as_flags(config)
    if when == 'before':  # the first async save (step 2 of 6 before growth) is under way
        condition = lambda: glob.glob(os.path.join(workdir, 'checkpoints', '*tmp*'))  # noqa: E731
    elif when == 'during':  # step 6 is logged, the growth (evaluations, expand) is under way
        condition = lambda: logged(workdir, '"step": 6, "split": "train"')  # noqa: E731
    else:  # the growth row is written: the grown state's checkpoint (step 6) is not yet complete
        condition = lambda: logged(workdir, '"split": "growth"')  # noqa: E731
    why = run_until(main_command(flags, workdir), condition, tmp_path / 'killed.log')
    assert not why, why
    saved = sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, 'checkpoints', '[0-9]*'))
                   if os.path.basename(p).isdigit())
    assert not saved or max(saved) < 12
    result = subprocess.run(main_command(flags, workdir), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(workdir, 'summary.json')) as f:
        resumed = json.load(f)
    for key in ('validation_loss', 'validation_bits_per_byte', 'flops', 'stages'):
        assert resumed[key] == straight[key], key
    assert rows(workdir, 'growth') == rows(tmp_path / 'straight', 'growth')
    strip = lambda rs: [{k: v for k, v in r.items() if k != 'bytes_per_second'} for r in rs]  # noqa: E731
    assert strip(rows(workdir, 'train')) == strip(rows(tmp_path / 'straight', 'train'))
