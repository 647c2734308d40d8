"""Test set-up: 8 virtual CPU devices for sharding tests (set before JAX starts), and tiny built-in
data plus a tiny cached source model shared by the tests of the main job."""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pathlib  # noqa: E402

import pytest  # noqa: E402  (after the environment above)

SLOW = {line.strip() for line in (pathlib.Path(__file__).parent / 'slow.txt').read_text().splitlines()
        if line.strip() and not line.startswith('#')}


def pytest_collection_modifyitems(config, items):
    """The tests tests/slow.txt lists are `slow`: the README's default run skips them, .ci/run runs them."""
    for item in items:
        if item.nodeid in SLOW or item.nodeid.split('[')[0] in SLOW:
            item.add_marker(pytest.mark.slow)

SOURCE = 'growjax_latin/16px_max10'
TARGET = 'growjax_greek/16px_max10'


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
    from growjax import data
    directory = str(tmp_path_factory.mktemp('tfds'))
    for name in (SOURCE, TARGET):
        data.prepare_builtin(name, directory)
    return directory


@pytest.fixture(scope='session')
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp('cache'))


def tiny_base_config(data_dir: str, cache_dir: str):
    """growjax's defaults on the tiny data, with the tiny source model (quarter width, 8 steps)."""
    from growjax import config_lib
    c = config_lib.base_config()
    c.model.width = 0.25
    c.init.cache_dir = cache_dir
    c.init.pretrain_steps = 8
    c.init.source_dataset = SOURCE
    c.data.data_dir = data_dir
    c.train.progress = False
    return c


@pytest.fixture(scope='session')
def tiny_base(data_dir, cache_dir):
    """A factory of the base config the experiments (paper, map) start from, on the tiny data (with
    the shared cached source model, or one in `cache`)."""
    return lambda cache=cache_dir: tiny_base_config(data_dir, cache)


@pytest.fixture
def tiny_config(data_dir, cache_dir):
    """A factory of configs for runs of a few seconds: tiny model and data, 12 steps."""

    def make(method='wa'):
        c = tiny_base_config(data_dir, cache_dir)
        c.growth.method = method
        c.growth.units = 16
        c.data.name = TARGET
        c.data.shots_per_class = 2
        c.train.steps = 12
        c.train.batch_size = 16
        c.train.log_every = 4
        c.train.eval_every = 8
        c.train.checkpoint_every = 4
        c.train.eval_batch_size = 64
        return c
    return make


@pytest.fixture
def tiny_flags(tiny_config):
    """The tiny config as main.py flags (for subprocess runs)."""
    config = tiny_config()
    keys = ['model.width', 'growth.units', 'init.cache_dir', 'init.pretrain_steps', 'init.source_dataset',
            'data.name', 'data.data_dir', 'data.shots_per_class', 'train.steps', 'train.batch_size',
            'train.log_every', 'train.eval_every', 'train.checkpoint_every', 'train.eval_batch_size', 'train.progress']
    return [f'--config.{key}={config[key.split(".")[0]][key.split(".")[1]]}' for key in keys]
