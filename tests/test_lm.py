"""Tests for the byte-level language model: the GPT, the stdlib corpus and its grain pipelines, bits per byte."""

import math
import os
import platform
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from growjax import lm, models
from growjax.data import text
from growjax.errors import DataError, UserError

SEQ_LEN = 32
MAX_BYTES = 8192  # per split: (8192 - 1) // 32 = 255 examples each, built in about a second
TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64, max_len=SEQ_LEN)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp('tfds_text'))


@pytest.fixture(scope='session')
def corpus(data_dir):
    return text.prepare_stdlib(data_dir, SEQ_LEN, max_bytes=MAX_BYTES)


def _source(data_dir, split='train'):
    return text.text_source(data_dir, split, SEQ_LEN, max_bytes=MAX_BYTES)


def _tiny_gpt():
    model = models.get('gpt', num_classes=256, **TINY)
    return model, model.init(jax.random.key(0), jnp.zeros((1, SEQ_LEN), jnp.int32))


def test_gpt_shapes_names_and_registry():
    assert 'gpt' in models.names() and 'vocab_size' in models.options('gpt')
    model, variables = _tiny_gpt()
    assert model.vocab_size == 256
    assert list(variables['params']) == ['embed', 'pos_embed', 'block_0', 'block_1', 'ln_f', 'head']
    block = variables['params']['block_0']
    assert set(block) == {'ln_1', 'attn', 'ln_2', 'mlp'} and set(block['mlp']) == {'fc1', 'fc2'}
    assert block['attn']['query']['kernel'].shape == (32, 2, 16)  # head_dim = width // num_heads
    logits = model.apply(variables, jnp.zeros((3, 20), jnp.int32))  # shorter than max_len is fine
    assert logits.shape == (3, 20, 256) and logits.dtype == jnp.float32


def test_gpt_errors_name_the_culprit():
    with pytest.raises(ValueError, match='vocab_size=100 contradicts num_classes=256'):
        models.get('gpt', num_classes=256, vocab_size=100)
    with pytest.raises(UserError, match='width=30 is not a multiple of num_heads=4'):
        models.get('gpt', num_classes=256, width=30, num_heads=4)
    model, variables = _tiny_gpt()
    with pytest.raises(UserError, match=f'more than max_len={SEQ_LEN}'):
        model.apply(variables, jnp.zeros((1, SEQ_LEN + 1), jnp.int32))


def test_gpt_is_causal():
    model, variables = _tiny_gpt()
    tokens = jax.random.randint(jax.random.key(1), (2, SEQ_LEN), 0, 256)
    changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % 256)
    before, after = model.apply(variables, tokens), model.apply(variables, changed)
    np.testing.assert_array_equal(before[:, :10], after[:, :10])
    assert not np.allclose(before[:, 10:], after[:, 10:])


def test_stdlib_files_exclude_test_folders(tmp_path):
    for path in ('a.py', 'b.txt', 'pkg/__init__.py', 'pkg/test/t.py', 'pkg/tests/t.py', 'test/x.py',
                 'idlelib/idle_test/t.py', 'idlelib/run.py', 'site-packages/jax/x.py', 'testing/y.py'):
        os.makedirs(tmp_path / os.path.dirname(path), exist_ok=True)
        (tmp_path / path).write_text('pass\n')
    assert text.stdlib_files(str(tmp_path)) == ['a.py', 'idlelib/run.py', 'pkg/__init__.py', 'testing/y.py']
    # a 0 byte after each file:
    assert text.split_bytes(str(tmp_path), ['a.py', 'pkg/__init__.py']) == b'pass\n\0pass\n\0'
    assert text.split_bytes(str(tmp_path), ['a.py', 'pkg/__init__.py'], max_bytes=7) == b'pass\n\0p'
    with pytest.raises(DataError, match='does not exist'):
        text.stdlib_files(str(tmp_path / 'missing'))


def test_real_file_list_and_split_are_deterministic_and_disjoint():
    files = text.stdlib_files(sysconfig.get_paths()['stdlib'])
    assert files == sorted(files) and {'os.py', 'json/__init__.py'} <= set(files)
    assert not [f for f in files if set(f.split('/')[:-1]) & text.EXCLUDED_DIRS]
    splits = text.split_files(files)
    assert splits == text.split_files(files)
    assert sorted(sum(splits.values(), [])) == files  # every file in exactly one split
    assert len(splits['train']) > 0.8 * len(files) and splits['validation'] and splits['test']


def test_corpus_prepared_once_with_its_metadata(corpus, data_dir):
    assert corpus == f'growjax_pystdlib/py{platform.python_version()}_seq{SEQ_LEN}_max{MAX_BYTES}'
    info_file = os.path.join(data_dir, corpus, '1.0.0', 'dataset_info.json')
    before, first = os.path.getmtime(info_file), _source(data_dir)[0]['tokens']
    assert text.prepare_stdlib(data_dir, SEQ_LEN, max_bytes=MAX_BYTES) == corpus  # a cache hit: nothing rebuilt
    assert os.path.getmtime(info_file) == before
    np.testing.assert_array_equal(_source(data_dir)[0]['tokens'], first)
    meta = text.text_info(data_dir, SEQ_LEN, max_bytes=MAX_BYTES)
    assert meta.metadata['python'] == platform.python_version()
    assert meta.metadata['bytes'] == {split: MAX_BYTES for split in text.SPLIT_SHARES}
    assert meta.split_sizes == {split: (MAX_BYTES - 1) // SEQ_LEN for split in text.SPLIT_SHARES}


def test_examples_are_the_split_bytes_at_a_stride_of_seq_len(corpus, data_dir):
    del corpus
    root = sysconfig.get_paths()['stdlib']
    data = text.split_bytes(root, text.split_files(text.stdlib_files(root))['validation'], MAX_BYTES)
    assert len(data) == MAX_BYTES
    source = _source(data_dir, 'validation')
    rows = np.stack([source[i]['tokens'] for i in range(len(source))])
    np.testing.assert_array_equal(rows, text.windows(data, SEQ_LEN))
    assert rows[0].tobytes() == data[:SEQ_LEN + 1] and rows[1].tobytes() == data[SEQ_LEN:2 * SEQ_LEN + 1]


def test_unknown_split_and_bad_sizes(data_dir):
    with pytest.raises(DataError, match="Unknown split 'dev'"):
        _source(data_dir, 'dev')
    with pytest.raises(DataError, match='seq_len must be a positive integer'):
        text.prepare_stdlib(data_dir, 0)


def test_train_iterator_shifts_and_resumes(corpus, data_dir):
    del corpus
    source = _source(data_dir)
    iterator = text.make_lm_train_iterator(source, global_batch_size=8, seed=3)
    first = next(iterator)
    assert first['inputs'].shape == first['targets'].shape == (8, SEQ_LEN) and first['inputs'].dtype == np.int32
    np.testing.assert_array_equal(first['inputs'][:, 1:], first['targets'][:, :-1])
    state = iterator.get_state()
    expected = next(iterator)
    resumed = text.make_lm_train_iterator(source, global_batch_size=8, seed=3)
    resumed.set_state(state)
    again = next(resumed)
    for key in ('inputs', 'targets'):
        np.testing.assert_array_equal(again[key], expected[key])


def test_train_iterator_shares_make_the_global_batch(corpus, data_dir):
    del corpus
    source = _source(data_dir)
    whole = next(text.make_lm_train_iterator(source, global_batch_size=8, seed=5))
    shares = [next(text.make_lm_train_iterator(source, global_batch_size=8, seed=5, process_index=p, process_count=2))
              for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([s['inputs'] for s in shares]), whole['inputs'])


def test_eval_iterator_reads_every_example_once(corpus, data_dir):
    del corpus
    source = _source(data_dir, 'test')
    batches = list(text.make_lm_eval_iterator(source, global_batch_size=100))
    assert [b['mask'].sum() for b in batches] == [100, 100, 55]
    inputs = np.concatenate([b['inputs'][b['mask'] > 0] for b in batches])
    np.testing.assert_array_equal(inputs, np.stack([source[i]['tokens'][:-1] for i in range(len(source))]))


def test_cross_entropy_and_bits_per_byte():
    assert lm.bits_per_byte(math.log(256)) == pytest.approx(8.0)
    assert lm.bits_per_byte(math.log(2)) == pytest.approx(1.0)
    uniform = jnp.zeros((2, 3, 256))
    targets = jnp.zeros((2, 3), jnp.int32)
    assert float(lm.next_token_cross_entropy(uniform, targets)) == pytest.approx(math.log(256), rel=1e-6)
    logits = uniform.at[1, :, 0].set(100.0)  # example 1 is certain and right: its loss is ~0
    assert float(lm.next_token_cross_entropy(logits, targets, jnp.array([0.0, 1.0]))) == pytest.approx(0.0, abs=1e-5)
    assert float(lm.next_token_cross_entropy(logits, targets)) == pytest.approx(math.log(256) / 2, rel=1e-5)


def test_tiny_gpt_learns_the_corpus(corpus, data_dir):
    del corpus
    model, variables = _tiny_gpt()
    optimizer = optax.adamw(3e-3)
    params, opt_state = variables['params'], optimizer.init(variables['params'])

    def loss_fn(params, batch):
        return lm.next_token_cross_entropy(model.apply({'params': params}, batch['inputs']), batch['targets'])

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def validation_bits_per_byte(params):
        batches = list(text.make_lm_eval_iterator(_source(data_dir, 'validation'), global_batch_size=128))
        nats = sum(float(lm.next_token_cross_entropy(model.apply({'params': params}, b['inputs']), b['targets'],
                                                     b['mask'])) * b['mask'].sum() for b in batches)
        return lm.bits_per_byte(nats / sum(b['mask'].sum() for b in batches))

    before = validation_bits_per_byte(params)
    iterator = text.make_lm_train_iterator(_source(data_dir), global_batch_size=16, seed=0)
    losses = []
    for _ in range(20):
        params, opt_state, loss = step(params, opt_state, next(iterator))
        losses.append(float(loss))
    after = validation_bits_per_byte(params)
    assert np.mean(losses[-5:]) < losses[0] - 1.0, losses
    assert 7.5 < before < 8.5 and after < before - 1.0, (before, after)
