"""Faults a long run meets: SIGKILL at any point, damaged checkpoints, NaNs, several processes, bad input.

The kill and multi-process tests start real `main.py` processes (marked slow; they run in CI).
"""
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from growjax import checkpoint, steps, train
from growjax.grow import flatten

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main_command(flags, workdir, *extra):
    return [sys.executable, 'main.py', '--config=configs/wide.py', *flags, f'--workdir={workdir}', *extra]


def run_main(flags, workdir, *extra, env=None):
    return subprocess.run(main_command(flags, workdir, *extra), cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def exported(workdir):
    variables, _ = checkpoint.load_export(str(workdir))
    return flatten(variables)


def assert_bitwise_equal(a, b):
    assert set(a) == set(b)
    for path in a:
        np.testing.assert_array_equal(np.asarray(a[path]), np.asarray(b[path]), err_msg='/'.join(path))


@pytest.fixture
def straight_run(tiny_config, tmp_path):
    """An uninterrupted tiny run: the reference every recovered run must match bit for bit."""
    workdir = tmp_path / 'straight'
    train.train_and_evaluate(tiny_config(), str(workdir))
    return workdir


@pytest.mark.slow
def test_sigkill_at_any_point_then_resume_is_bitwise_equal(tiny_flags, straight_run, tmp_path):
    workdir = tmp_path / 'killed'
    flags = [*tiny_flags, '--config.train.checkpoint_every=2', '--config.train.steps=12']
    # The straight run used checkpoint_every=4; checkpoints do not change the arithmetic.
    kills = 0
    for deadline in (0.3, 0.0, 0.0):  # 0.0: kill the moment an async save's temporary folder appears
        process = subprocess.Popen(main_command(flags, workdir), cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        started = time.time()
        while process.poll() is None and time.time() - started < 120:
            saving = glob.glob(str(workdir / 'checkpoints' / '*tmp*'))
            if saving and time.time() - started > deadline:
                process.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.005)
        process.wait()
        if process.returncode == 0:
            break
    assert kills >= 1
    result = run_main(flags, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_bitwise_equal(exported(workdir), exported(straight_run))


def corrupt_latest(workdir, how):
    step_dirs = sorted(glob.glob(str(workdir / 'checkpoints' / '[0-9]*')), key=lambda p: int(os.path.basename(p)))
    latest = step_dirs[-1]
    data_files = [f for f in glob.glob(os.path.join(latest, 'state', '**', '*'), recursive=True)
                  if os.path.isfile(f) and os.path.getsize(f) > 256]
    target = max(data_files, key=os.path.getsize)
    with open(target, 'r+b') as f:
        if how == 'truncate':
            f.truncate(os.path.getsize(target) // 2)
        else:
            f.seek(os.path.getsize(target) // 2)
            f.write(os.urandom(64))
    return int(os.path.basename(latest))


@pytest.mark.parametrize('how', ['truncate', 'garble'])
def test_damaged_latest_checkpoint_falls_back_to_previous(tiny_config, straight_run, tmp_path, how, caplog):
    workdir = tmp_path / 'damaged'
    config = tiny_config()
    config.train.max_to_keep = 3
    train.train_and_evaluate(config, str(workdir))
    damaged_step = corrupt_latest(workdir, how)
    good_steps = sorted(int(os.path.basename(p)) for p in glob.glob(str(workdir / 'checkpoints' / '[0-9]*'))
                        if os.path.basename(p).isdigit() and int(os.path.basename(p)) != damaged_step)
    config.train.steps = 16  # run on past the damaged step
    train.train_and_evaluate(config, str(workdir))
    assert f'checkpoint {damaged_step}' in caplog.text and 'earlier checkpoint' in caplog.text
    assert glob.glob(str(workdir / 'checkpoints' / f'{damaged_step}.damaged-*'))  # kept aside, not reused
    records = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
    assert [r['step'] for r in records if r['split'] == 'train'][-2:] == [12, 16]


def test_checksum_mismatch_is_damage(tmp_path):
    state = {'w': jnp.arange(6.0).reshape(2, 3)}
    manager = checkpoint.checkpoint_manager(str(tmp_path), max_to_keep=3)
    checkpoint.save(manager, 1, state, {'next_index': 1})
    checkpoint.save(manager, 2, {'w': state['w'] + 1}, {'next_index': 2})
    manager.wait_until_finished()
    manager.close()
    # Make step 2's recorded checksum disagree with its (readable) arrays: a silent bit flip.
    meta_path = tmp_path / 'checkpoints' / '2' / 'data' / 'metadata'
    meta = json.loads(meta_path.read_text())
    meta['checksum'][0] ^= 1
    meta_path.write_text(json.dumps(meta))
    manager, restored = checkpoint.restore_latest(str(tmp_path), 3, checkpoint.abstract_like(state))
    manager.close()
    step, restored_state, data_state = restored
    assert step == 1 and data_state == {'next_index': 1}
    np.testing.assert_array_equal(restored_state['w'], state['w'])


def test_nan_loss_stops_with_the_step_and_keeps_good_checkpoints(tiny_config, tmp_path):
    config = tiny_config()
    config.train.learning_rate = 1e12  # diverges within a few steps
    config.train.checkpoint_every = 1
    with pytest.raises(train.TrainingDiverged, match=r'at step (\d+)') as info:
        train.train_and_evaluate(config, str(tmp_path))
    bad_step = int(re.search(r'at step (\d+)', str(info.value)).group(1))
    saved = sorted(int(os.path.basename(p)) for p in glob.glob(str(tmp_path / 'checkpoints' / '[0-9]*')))
    assert saved and max(saved) < bad_step
    # Every kept checkpoint restores to finite parameters.
    state, _, _ = train.init_state(config, train.build_model(config, 24), train.load_pretrained(config),
                                   steps.data_mesh(), (16, 16, 1))
    manager, (step, restored, _) = checkpoint.restore_latest(str(tmp_path), 2, checkpoint.abstract_like(state))
    manager.close()
    assert step == max(saved)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(restored.trainable))


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_and_their_checkpoints_resume_in_one(tiny_flags, tmp_path):
    one = run_main(tiny_flags, tmp_path / 'one', env={'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
    assert one.returncode == 0, one.stderr[-3000:]
    port = free_port()
    two_dir = tmp_path / 'two'
    processes = [subprocess.Popen(
        main_command(tiny_flags, two_dir, '--config.multihost=True',
                     f'--config.distributed.coordinator_address=127.0.0.1:{port}',
                     '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}'),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    for p, (_, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]

    def train_losses(workdir):
        return [r['loss'] for r in map(json.loads, open(workdir / 'metrics.jsonl')) if r['split'] == 'train']

    np.testing.assert_allclose(train_losses(two_dir), train_losses(tmp_path / 'one'), rtol=1e-4)
    # The 2-process checkpoints resume in one process (8 devices), which trains on to step 16.
    resumed = run_main(tiny_flags, two_dir, '--config.train.steps=16',
                       env={'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps_logged = [r['step'] for r in map(json.loads, open(two_dir / 'metrics.jsonl')) if r['split'] == 'train']
    assert steps_logged == [4, 8, 12, 16]


def other_architecture_export(tiny_config, tmp_path):
    config = tiny_config(method='scratch')
    config.init.pretrained = ''
    config.model.width = 0.5
    config.train.steps = 4
    workdir = tmp_path / 'wider_model'
    train.train_and_evaluate(config, str(workdir))
    return workdir


def damaged_export(tiny_config, tmp_path):
    workdir = other_architecture_export(tiny_config, tmp_path)
    for path in glob.glob(str(workdir / 'export' / 'variables' / '**' / '*'), recursive=True):
        if os.path.isfile(path) and os.path.getsize(path) > 256:
            with open(path, 'r+b') as f:
                f.truncate(10)
    return workdir


BAD_INPUTS = {
    'unknown config key': (lambda tc, tmp: ['--config.train.learning_rat=0.1'], 'learning_rat'),
    'wrong value type': (lambda tc, tmp: ['--config.train.steps=many'], 'steps'),
    'widen a missing layer': (lambda tc, tmp: ['--config.growth.widen=fc9=4'], "cannot widen 'fc9'"),
    'zero units': (lambda tc, tmp: ['--config.growth.units=0'], 'config.growth.units'),
    'negative units': (lambda tc, tmp: ['--config.growth.units=-3'], 'config.growth.units'),
    'weights of another architecture': (
        lambda tc, tmp: [f'--config.init.pretrained={other_architecture_export(tc, tmp)}'], 'params/fc7/kernel'),
    'dataset not prepared': (lambda tc, tmp: ['--config.data.name=mnist'], 'mnist'),
    'image folder missing': (lambda tc, tmp: [f'--config.data.name=image_folder:{tmp}/nowhere'], 'nowhere'),
    'images of the wrong shape': (
        lambda tc, tmp: [f'--config.init.pretrained={other_architecture_export(tc, tmp)}', '--config.model.width=0.5',
                         '--config.data.name=growjax_greek/32px_max10', '--config.data.image_size=32'],
        'trained on 16x16 images'),
    'global batch not divisible by devices': (lambda tc, tmp: ['--config.train.batch_size=12'], 'batch_size=12'),
    'corrupted weights file': (
        lambda tc, tmp: [f'--config.init.pretrained={damaged_export(tc, tmp)}'], 'cannot read the pretrained'),
}


@pytest.mark.parametrize('fault', sorted(BAD_INPUTS))
def test_bad_input_gives_one_line_error_and_no_outputs(fault, tiny_flags, tiny_config, tmp_path):
    make_flags, expected = BAD_INPUTS[fault]
    workdir = tmp_path / 'run'
    result = run_main(tiny_flags, workdir, *make_flags(tiny_config, tmp_path))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if 'rror' in line and expected in line]
    assert lines, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr
    assert not workdir.exists()  # nothing partial left behind


@pytest.mark.parametrize('make_workdir,expected', [
    (lambda tmp: (tmp / 'a_file').write_text('x') and tmp / 'a_file', 'is a file'),
    (lambda tmp: (tmp / 'file2').write_text('x') and tmp / 'file2' / 'sub', 'cannot be created'),
])
def test_unusable_workdir(make_workdir, expected, tiny_flags, tmp_path):
    result = run_main(tiny_flags, make_workdir(tmp_path))
    assert result.returncode == 2 and expected in result.stderr and 'Traceback' not in result.stderr
