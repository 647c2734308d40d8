"""A user's own image folder (ROOT/<split>/<class>/<image>) as a dataset, also in the main job."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from growjax import data

CLASSES = ('alpha', 'beta', 'gamma')


def write_folder(root, per_class: dict[str, int], *, mode='RGB', seed=0) -> dict[str, list]:
    """Random images of varying sizes; returns split -> [(path, label, pixels)] in sorted order."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, count in per_class.items():
        written[split] = []
        for label, name in enumerate(CLASSES):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(count):
                h, w = rng.integers(8, 40, size=2)
                channels = 3 if mode == 'RGB' else 1
                pixels = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
                path = os.path.join(root, split, name, f'{i:03d}.png')
                Image.fromarray(pixels if mode == 'RGB' else pixels[..., 0], mode).save(path)
                written[split].append((path, label, pixels))
    return written


def test_index_and_read(tmp_path):
    written = write_folder(tmp_path, {'train': 4, 'test': 2})
    meta = data.dataset_info(f'image_folder:{tmp_path}', '')
    assert meta.class_names == CLASSES and meta.num_classes == 3
    assert meta.image_shape == (None, None, 3)
    assert meta.split_sizes == {'train': 12, 'test': 6}
    source = data.load_source(f'image_folder:{tmp_path}', 'train', '')
    assert len(source) == 12
    for i, (path, label, pixels) in enumerate(written['train']):
        example = source[i]
        assert example['label'] == label
        np.testing.assert_array_equal(example['image'], pixels)  # PNG is lossless
    np.testing.assert_array_equal(data.read_labels(source), [label for _, label, _ in written['train']])


def test_split_specs(tmp_path):
    write_folder(tmp_path, {'train': 4, 'validation': 1})
    root = str(tmp_path)
    assert len(data.load_source(f'image_folder:{root}', 'train[:50%]', '')) == 6
    assert len(data.load_source(f'image_folder:{root}', 'train[6:]', '')) == 6
    both = data.load_source(f'image_folder:{root}', 'train+validation', '')
    assert len(both) == 15
    np.testing.assert_array_equal(both.labels()[12:], [0, 1, 2])


def test_grayscale_folder_gives_one_channel(tmp_path):
    write_folder(tmp_path, {'train': 2}, mode='L')
    assert data.dataset_info(f'image_folder:{tmp_path}', '').image_shape == (None, None, 1)
    assert data.load_source(f'image_folder:{tmp_path}', 'train', '')[0]['image'].ndim == 3


def test_iterators_resize_mixed_sizes(tmp_path):
    write_folder(tmp_path, {'train': 4, 'test': 3})
    source = data.load_source(f'image_folder:{tmp_path}', 'train', '')
    train = data.make_train_iterator(source, global_batch_size=4, seed=0, image_size=16, crop_padding=2,
                                     flip=True, mean=(0.5,) * 3, std=(0.25,) * 3)
    batch = next(train)
    assert batch['image'].shape == (4, 16, 16, 3) and batch['image'].dtype == np.float32
    assert np.isfinite(batch['image']).all() and batch['image'].min() >= -2.0 and batch['image'].max() <= 2.0
    test = data.load_source(f'image_folder:{tmp_path}', 'test', '')
    batches = list(data.make_eval_iterator(test, global_batch_size=4, image_size=16))
    assert len(batches) == 3 and sum(b['mask'].sum() for b in batches) == 9
    labels = np.concatenate([b['label'][b['mask'] > 0] for b in batches])
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1, 2, 2, 2])


def test_folder_errors(tmp_path):
    with pytest.raises(data.DataError, match='missing.*does not exist'):
        data.dataset_info(f'image_folder:{tmp_path}/missing', '')
    with pytest.raises(data.DataError, match='no split folders'):
        data.dataset_info(f'image_folder:{tmp_path}', '')
    os.makedirs(tmp_path / 'train' / 'cat')
    with pytest.raises(data.DataError, match='holds no images'):
        data.dataset_info(f'image_folder:{tmp_path}', '')
    write_folder(tmp_path, {'train': 1})
    with pytest.raises(data.DataError, match=r"Split 'validation'.*split folders: train"):
        data.load_source(f'image_folder:{tmp_path}', 'validation', '')
    broken = tmp_path / 'train' / 'beta' / 'zz_broken.png'
    broken.write_bytes(b'not an image')
    source = data.load_source(f'image_folder:{tmp_path}', 'train', '')
    with pytest.raises(data.DataError, match='zz_broken.png'):
        source[len(source) - 2]  # sorted: alpha/000, beta/000, beta/zz_broken, gamma/000


def test_main_job_on_an_image_folder(tmp_path, tiny_config):
    """Grow the tiny built-in source model and fine-tune it on a grayscale image folder."""
    from growjax import train
    write_folder(tmp_path / 'images', {'train': 6, 'validation': 2, 'test': 3}, mode='L')
    config = tiny_config('wa')
    config.data.name = f'image_folder:{tmp_path}/images'
    config.data.shots_per_class = 0
    summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
    assert 0.0 <= summary['accuracy'] <= 1.0
    with open(tmp_path / 'run' / 'summary.json') as f:
        written = json.load(f)
    assert written['dataset'] == config.data.name and written['test_accuracy'] == summary['test_accuracy']
    assert sorted(os.listdir(tmp_path / 'images')) == ['test', 'train', 'validation']  # the user's folder untouched
