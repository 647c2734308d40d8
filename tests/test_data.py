"""Tests for growjax.data: built-in datasets, few-shot subsets, grain iterators, device prefetch."""

import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from matplotlib import ft2font

from growjax import data

CAP = 6  # examples per class and split: small copies keep the suite fast


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='session')
def built(data_dir):
    """name -> 'name/config' of a small copy of every built-in dataset."""
    return {name: data.prepare_builtin(name, data_dir, 16, max_per_class=CAP)
            for name in data.BUILTIN}


def _memory_source(n):
    """In-memory source whose images encode their index (exact bookkeeping checks)."""
    return [{'image': np.full((4, 4, 1), i, np.uint8), 'label': i % 3} for i in range(n)]


def _ids(batch):
    """Index encoded by _memory_source, read back from a normalised (mean 0, std 1) batch."""
    return np.rint(batch['image'][:, 0, 0, 0] * 255).astype(int)


@pytest.mark.parametrize('name,classes,splits', [
    ('growjax_latin', 52, ('train', 'test')),
    ('growjax_greek', 24, ('train', 'validation', 'test')),
    ('growjax_digits', 10, ('train', 'validation', 'test')),
])
def test_builtin_build_and_read(built, data_dir, name, classes, splits):
    full_name = built[name]
    assert full_name == f'{name}/16px_max{CAP}'
    meta = data.dataset_info(full_name, data_dir)
    assert meta.num_classes == len(meta.class_names) == classes
    assert meta.image_shape == (16, 16, 1)
    assert set(meta.split_sizes) == set(splits)
    for split in splits:
        source = data.load_source(full_name, split, data_dir)
        assert len(source) == meta.split_sizes[split] == classes * CAP
        example = source[0]
        assert example['image'].shape == (16, 16, 1) and example['image'].dtype == np.uint8
        labels = data.read_labels(source)
        np.testing.assert_array_equal(np.bincount(labels, minlength=classes), CAP)


def test_prepare_builtin_reuses_built_data(built, data_dir):
    info = os.path.join(data_dir, built['growjax_greek'], '1.0.0', 'dataset_info.json')
    before = os.path.getmtime(info)
    again = data.prepare_builtin('growjax_greek', data_dir, max_per_class=CAP)
    assert again == built['growjax_greek']
    assert os.path.getmtime(info) == before


def test_builtin_image_size_32(data_dir):
    name = data.prepare_builtin('growjax_digits', data_dir, 32, max_per_class=2)
    source = data.load_source(name, 'test', data_dir)
    assert source[0]['image'].shape == (32, 32, 1)
    with pytest.raises(data.DataError, match='contradicts'):
        data.load_source(name, 'test', data_dir, image_size=16)


def test_fonts_disjoint_and_complete():
    assert not set(data.LATIN_FONTS) & set(data.GREEK_FONTS)
    for fonts, chars in ((data.LATIN_FONTS, data.LATIN_CHARS),
                         (data.GREEK_FONTS, data.GREEK_CHARS)):
        for font in fonts:
            face = ft2font.FT2Font(os.path.join(data.builtin.FONT_DIR, font))
            assert all(face.get_char_index(ord(c)) for c in chars), font
    assert len(data.LATIN_CHARS) == 52 and len(data.GREEK_CHARS) == 24


def test_render_glyphs_deterministic():
    args = (data.GREEK_CHARS[:3], data.GREEK_FONTS, 4, 16)
    images, labels = data.render_glyphs(*args, seed=7)
    again, _ = data.render_glyphs(*args, seed=7, chunk=5)  # chunking must not change the output
    other, _ = data.render_glyphs(*args, seed=8)
    assert images.shape == (12, 16, 16, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.repeat(np.arange(3), 4))
    assert images.tobytes() == again.tobytes()
    assert images.tobytes() != other.tobytes()
    assert images.max() > 200  # ink is there


def test_few_shot_indices():
    labels = np.repeat(np.arange(5), 10)[np.random.default_rng(0).permutation(50)]
    picked = data.few_shot_indices(labels, 3, seed=1)
    assert np.all(np.diff(picked) > 0)
    np.testing.assert_array_equal(np.bincount(labels[picked]), 3)
    np.testing.assert_array_equal(picked, data.few_shot_indices(labels, 3, seed=1))
    assert not np.array_equal(picked, data.few_shot_indices(labels, 3, seed=2))
    assert set(picked) <= set(data.few_shot_indices(labels, 4, seed=1))  # nested
    with pytest.raises(data.DataError, match='fewer'):
        data.few_shot_indices(labels, 11, seed=1)
    with pytest.raises(data.DataError, match='Class 5'):
        data.few_shot_indices(labels, 1, seed=1, num_classes=6)


def test_train_iterator_batches(built, data_dir):
    source = data.load_source(built['growjax_latin'], 'train', data_dir)
    kwargs = dict(global_batch_size=8, image_size=16, crop_padding=2, mean=0.5, std=0.25)
    it = data.make_train_iterator(source, seed=3, **kwargs)
    batches = [next(it) for _ in range(3)]
    assert batches[0]['image'].shape == (8, 16, 16, 1) and batches[0]['image'].dtype == np.float32
    assert batches[0]['label'].dtype == np.int32
    assert np.all((batches[0]['label'] >= 0) & (batches[0]['label'] < 52))
    same = data.make_train_iterator(source, seed=3, **kwargs)
    for batch in batches:
        other = next(same)
        assert all(batch[k].tobytes() == other[k].tobytes() for k in batch)
    different = next(data.make_train_iterator(source, seed=4, **kwargs))
    assert different['image'].tobytes() != batches[0]['image'].tobytes()
    resized = next(data.make_train_iterator(source, seed=3, **{**kwargs, 'image_size': 24}))
    assert resized['image'].shape == (8, 24, 24, 1)


def test_train_iterator_epochs_are_permutations():
    source = _memory_source(12)
    it = data.make_train_iterator(source, global_batch_size=4, seed=0, image_size=4, num_epochs=2)
    ids = np.concatenate([_ids(b) for b in it])
    assert len(ids) == 24
    assert sorted(ids[:12]) == sorted(ids[12:]) == list(range(12))
    assert list(ids[:12]) != list(ids[12:])  # reshuffled per epoch
    subset = [1, 5, 7, 10]
    it = data.make_train_iterator(source, global_batch_size=4, seed=0, image_size=4,
                                  indices=subset, num_epochs=3)
    assert sorted(np.concatenate([_ids(b) for b in it])) == sorted(subset * 3)


@pytest.mark.parametrize('flip', [False, True])
def test_two_processes_equal_one(built, data_dir, flip):
    source = data.load_source(built['growjax_greek'], 'train', data_dir)
    kwargs = dict(global_batch_size=10, seed=5, image_size=16, crop_padding=3, flip=flip,
                  mean=0.2, std=0.5)
    single = data.make_train_iterator(source, **kwargs)
    shards = [data.make_train_iterator(source, process_index=p, process_count=2, **kwargs)
              for p in range(2)]
    for _ in range(30):  # 300 examples: crosses the 144-example epoch twice
        whole = next(single)
        parts = [next(s) for s in shards]
        assert parts[0]['image'].shape == (5, 16, 16, 1)
        for k in whole:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])


def test_process_count_must_divide_batch():
    with pytest.raises(data.DataError, match='multiple'):
        data.make_train_iterator(_memory_source(8), global_batch_size=5, seed=0, image_size=4,
                                 process_count=2)


def test_resume_from_state():
    source = _memory_source(10)
    kwargs = dict(global_batch_size=4, seed=11, image_size=4, crop_padding=1, flip=True)
    reference = data.make_train_iterator(source, **kwargs)
    expected = [next(reference) for _ in range(9)]
    interrupted = data.make_train_iterator(source, **kwargs)
    for _ in range(4):
        next(interrupted)
    state = json.loads(json.dumps(interrupted.get_state()))  # as a checkpoint would store it
    resumed = data.make_train_iterator(source, **kwargs)
    resumed.set_state(state)
    for want in expected[4:]:
        got = next(resumed)
        assert all(got[k].tobytes() == want[k].tobytes() for k in want)


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_iterator_covers_every_example_once(process_count):
    source = _memory_source(23)
    indices = np.arange(2, 23)  # 21 examples
    shares = [list(data.make_eval_iterator(source, global_batch_size=8, image_size=4,
                                           indices=indices, process_index=p,
                                           process_count=process_count))
              for p in range(process_count)]
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) == 3
    order = []
    for step in range(3):
        for share in shares:
            batch = share[step]
            assert batch['mask'].dtype == np.float32
            assert batch['mask'].shape == (8 // process_count,)
            real = batch['mask'] == 1
            order.extend(_ids(batch)[real])
            assert np.all(batch['image'][~real] == 0)
    assert order == list(indices)


def test_unprepared_dataset_error(tmp_path):
    for name in ('mnist', 'no_such_dataset_xyz'):
        with pytest.raises(data.DataError) as error:
            data.load_source(name, 'train', str(tmp_path))
        message = str(error.value)
        assert name in message and str(tmp_path) in message and 'tfds build' in message
        assert isinstance(error.value, ValueError)


def test_unknown_split_error(built, data_dir):
    with pytest.raises(data.DataError, match='available splits: train, validation, test'):
        data.load_source(built['growjax_greek'], 'valid', data_dir)


def test_device_prefetch_matches_host_and_resumes():
    mesh = Mesh(np.array(jax.devices()), ('data',))
    sharding = NamedSharding(mesh, P('data'))
    source = _memory_source(40)
    kwargs = dict(global_batch_size=2 * jax.device_count(), seed=2, image_size=4)
    host = data.make_train_iterator(source, **kwargs)
    expected = [next(host) for _ in range(6)]
    prefetched = data.device_prefetch(data.make_train_iterator(source, **kwargs), sharding, size=2)
    for want in expected[:3]:
        got = next(prefetched)
        assert isinstance(got['image'], jax.Array) and got['image'].sharding == sharding
        np.testing.assert_array_equal(np.asarray(got['image']), want['image'])
    state = prefetched.get_state()
    prefetched.close()
    resumed = data.make_train_iterator(source, **kwargs)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)['label'], expected[3]['label'])
