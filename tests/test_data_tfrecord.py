"""TFDS datasets prepared as tfrecord (most published ones): read with TFDS's reader and tf.data.

The dataset here is built by the test in the tfrecord format with encoded PNG images of varying
sizes, like e.g. oxford_flowers102 (TensorFlow writes and reads it; nothing is downloaded).
"""
import json
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from growjax import data

NUM_CLASSES = 3
SPLITS = {'train': 30, 'test': 7}


class GrowjaxTestPhotos(tfds.core.GeneratorBasedBuilder):
    """RGB images of random sizes whose mean brightness encodes the label."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES)}), supervised_keys=('image', 'label'))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split, count) for split, count in SPLITS.items()}

    def _generate_examples(self, split, count):
        rng = np.random.default_rng(len(split))
        for i in range(count):
            label = i % NUM_CLASSES
            h, w = rng.integers(10, 30, size=2)
            yield f'{split}{i}', {'image': np.full((h, w, 3), 40 + 80 * label, np.uint8), 'label': label}


@pytest.fixture(scope='module')
def tfrecord_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp('tfrecord'))
    GrowjaxTestPhotos(data_dir=directory, file_format='tfrecord').download_and_prepare(file_format='tfrecord')
    return directory


def source(directory, split='train'):
    return data.load_source('growjax_test_photos', split, directory)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_tfrecord_is_streamed(tfrecord_dir):
    train = source(tfrecord_dir)
    assert isinstance(train, data.StreamingSplit) and len(train) == 30
    meta = data.dataset_info('growjax_test_photos', tfrecord_dir)
    assert meta.num_classes == NUM_CLASSES and meta.image_shape == (None, None, 3)
    labels = data.read_labels(train)
    assert labels.dtype == np.int64 and sorted(labels) == sorted(i % NUM_CLASSES for i in range(30))


def test_train_batches_are_resized_augmented_and_labelled(tfrecord_dir):
    iterator = data.make_train_iterator(source(tfrecord_dir), global_batch_size=8, seed=0, image_size=16,
                                        crop_padding=0, mean=(0.5,) * 3, std=(0.5,) * 3)
    for batch in take(iterator, 5):  # crosses the epoch boundary (30 examples)
        assert batch['image'].shape == (8, 16, 16, 3) and batch['image'].dtype == np.float32
        assert batch['label'].dtype == np.int32
        # Constant images survive resizing exactly: brightness (40 + 80 label) / 255 normalised.
        expected = ((40 + 80 * batch['label']) / 255.0 - 0.5) / 0.5
        np.testing.assert_allclose(batch['image'], np.broadcast_to(expected[:, None, None, None],
                                                                   batch['image'].shape), atol=1e-5)


def test_train_stream_is_deterministic_and_resumes_exactly(tfrecord_dir):
    kwargs = dict(global_batch_size=8, seed=3, image_size=16, crop_padding=3, flip=True)
    first = data.make_train_iterator(source(tfrecord_dir), **kwargs)
    batches = take(first, 3)
    state = first.get_state()
    assert json.loads(json.dumps(state)) == state
    rest = take(first, 3)
    again = take(data.make_train_iterator(source(tfrecord_dir), **kwargs), 3)
    resumed = data.make_train_iterator(source(tfrecord_dir), **kwargs)
    resumed.set_state(state)
    for a, b in zip(batches + rest, again + take(resumed, 3)):
        np.testing.assert_array_equal(a['image'], b['image'])
        np.testing.assert_array_equal(a['label'], b['label'])
    other_seed = next(data.make_train_iterator(source(tfrecord_dir), **{**kwargs, 'seed': 4}))
    assert not np.array_equal(other_seed['image'], batches[0]['image'])


def test_few_shot_indices_select_those_examples(tfrecord_dir):
    train = source(tfrecord_dir)
    labels = data.read_labels(train)
    indices = data.few_shot_indices(labels, 2, seed=0)
    batches = list(data.make_eval_iterator(train, global_batch_size=4, image_size=8, indices=indices))
    seen = np.concatenate([b['label'][b['mask'] > 0] for b in batches])
    np.testing.assert_array_equal(seen, labels[indices])
    iterator = data.make_train_iterator(train, global_batch_size=6, seed=0, image_size=8, indices=indices,
                                        num_epochs=1)
    epoch = next(iterator)['label']
    assert sorted(epoch) == sorted(labels[indices])


@pytest.mark.parametrize('process_count', [1, 2, 3])
def test_eval_shares_cover_every_example_once(tfrecord_dir, process_count):
    test = source(tfrecord_dir, 'test')
    per_process = [list(data.make_eval_iterator(test, global_batch_size=2 * process_count, image_size=8,
                                                process_index=p, process_count=process_count))
                   for p in range(process_count)]
    assert len({len(batches) for batches in per_process}) == 1  # collectives need equal counts
    seen = np.concatenate([b['label'][b['mask'] > 0] for batches in per_process for b in batches])
    assert sorted(seen) == sorted(data.read_labels(test))
    padding = [b['image'][b['mask'] == 0] for batches in per_process for b in batches]
    assert all((p == 0).all() for p in padding)


def test_missing_tensorflow_is_a_clear_error(tfrecord_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, 'tensorflow', None)  # `import tensorflow` now raises ImportError
    with pytest.raises(data.DataError, match='tfrecord.*TensorFlow.*array_record'):
        data.read_labels(source(tfrecord_dir))


def test_main_job_on_a_tfrecord_dataset(tfrecord_dir, tmp_path, tiny_config):
    from growjax import train
    config = tiny_config('scratch')
    config.init.pretrained = ''
    config.data.name = 'growjax_test_photos'
    config.data.data_dir = tfrecord_dir
    config.data.val_split = ''
    config.data.shots_per_class = 4
    config.data.mean, config.data.std = (0.5,) * 3, (0.5,) * 3
    config.train.steps = 8
    summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
    assert 0.0 <= summary['test_accuracy'] <= 1.0
    metrics = [json.loads(line) for line in open(tmp_path / 'run' / 'metrics.jsonl')]
    assert any(m['split'] == 'test' for m in metrics)
