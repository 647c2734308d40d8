"""Streaming input for TFDS datasets without random access (tfrecord): TFDS's reader + tf.data.

Most published TFDS datasets are prepared as tfrecord, which only TensorFlow reads, in file order.
This module gives them the same iterators as the grain pipelines (same batches' keys, shapes,
augmentation and normalisation; `get_state`/`set_state` for exact resume) with these differences:
the shuffle is a buffer of encoded examples (not a global permutation), and each process reads its
own even share of the split, so the order depends on the number of processes. TensorFlow is
imported only here, when such a dataset is used, and is kept off the accelerators.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from growjax.errors import DataError

SHUFFLE_BUFFER = 10_000  # encoded examples per process


class StreamingSplit:
    """A split of a TFDS dataset prepared without random access (tfrecord), read in file order."""

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str):
        self.builder = builder
        self.split = split
        self.num_examples = builder.info.splits[split].num_examples

    def __len__(self) -> int:
        return self.num_examples

    def labels(self) -> np.ndarray:
        """All labels of the split (int64) in reading order, without decoding images."""
        _tensorflow()
        labels = _read(self, self.split).map(lambda ex: ex['label']).batch(4096)
        return np.concatenate([np.asarray(b, np.int64) for b in labels.as_numpy_iterator()]
                              or [np.zeros(0, np.int64)])


def _tensorflow():
    try:
        import tensorflow as tf
    except ImportError:
        raise DataError('This dataset is prepared as tfrecord, which only TensorFlow reads: '
                        '`pip install tensorflow-cpu` (requirements.txt lists it), or rebuild it with '
                        '`tfds build NAME --data_dir=DIR --file_format=array_record`.') from None
    tf.config.set_visible_devices([], 'GPU')  # the accelerators belong to JAX
    return tf


def _image_is_encoded(source: StreamingSplit) -> bool:
    return isinstance(source.builder.info.features['image'], tfds.features.Image)


def _read(source: StreamingSplit, split):
    """Examples {'image', 'label'} of `split` in file order, images still encoded (decoding after
    the shuffle buffer and the few-shot filter keeps both cheap)."""
    decoders = {'image': tfds.decode.SkipDecoding()} if _image_is_encoded(source) else None
    ds = source.builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                                   read_config=tfds.ReadConfig(try_autocache=False))
    return ds.map(lambda ex: {'image': ex['image'], 'label': ex['label']})


def _decode(source: StreamingSplit, image):
    if _image_is_encoded(source):
        return source.builder.info.features['image'].decode_example(image)
    return image


def _process_share(source: StreamingSplit, tf, indices, process_index: int, process_count: int):
    """(dataset of this process's examples, encoded; their count).

    Without `indices` each process reads its own even sub-split; with them (few-shot draws, positions
    in reading order) every process reads the split, keeps `indices` and takes every
    process_count-th of them.
    """
    count = _share_size(source, indices, process_index, process_count)
    if indices is None:
        return _read(source, _even_share(source, process_index, process_count)), count
    keep = np.zeros(len(source), bool)
    keep[indices] = True
    keep = tf.constant(keep)
    ds = _read(source, source.split).enumerate().filter(lambda i, ex: tf.gather(keep, i))
    return ds.map(lambda i, ex: ex).shard(process_count, process_index), count


def _even_share(source: StreamingSplit, process_index: int, process_count: int):
    """This process's sub-split of the split (sizes differ by at most one)."""
    return tfds.even_splits(source.split, n=process_count)[process_index]


def _share_size(source: StreamingSplit, indices, process_index: int, process_count: int) -> int:
    if indices is None:
        return source.builder.info.splits[_even_share(source, process_index, process_count)].num_examples
    indices = np.asarray(indices, np.int64)
    if indices.ndim != 1 or not len(indices) or indices.min() < 0 or indices.max() >= len(source):
        raise DataError(f'indices out of range (or empty) for {source.name} {source.split!r} of {len(source)} examples.')
    return len(range(process_index, len(indices), process_count))


def _resized(source: StreamingSplit, tf, image, image_size: int):
    """Decoded image -> float32 in [0, 255], resized to image_size (bilinear, antialiased)."""
    image = tf.cast(_decode(source, image), tf.float32)
    same = tf.reduce_all(tf.shape(image)[:2] == image_size)
    return tf.cond(same, lambda: image, lambda: tf.image.resize(image, (image_size, image_size), antialias=True))


def _normalise(tf, image, mean, std):
    return (image / 255.0 - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


class TrainIterator:
    """Endless augmented batches of a streaming split; the state is the number of batches read."""

    def __init__(self, build, local_batch: int):
        self._build = build
        self._local_batch = local_batch
        self._batches_read = 0
        self._iterator = build(0)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        self._batches_read += 1
        return batch

    def get_state(self) -> dict:
        return {'batches_read': self._batches_read}

    def set_state(self, state: dict) -> None:
        self._batches_read = int(state['batches_read'])
        self._iterator = self._build(self._batches_read * self._local_batch)


def make_train_iterator(source: StreamingSplit, *, local_batch: int, seed: int, image_size: int,
                        crop_padding: int = 0, flip: bool = False, mean=0.0, std=1.0,
                        indices: Sequence[int] | None = None, process_index: int = 0, process_count: int = 1,
                        num_epochs: int | None = None) -> TrainIterator:
    """As `pipeline.make_train_iterator`, for a tfrecord split (see the module docstring); batches
    of `local_batch` (this process's share of the global batch).

    Every random draw (shuffle, crop offsets, flips) comes from `seed` and the example's position in
    the stream, so rebuilding the stream and skipping the examples already seen resumes exactly.
    """
    tf = _tensorflow()
    shuffle_seed, augment_seed = (int(s) % 2**31 for s in np.random.SeedSequence(seed).generate_state(2))
    encoded, count = _process_share(source, tf, indices, process_index, process_count)
    if num_epochs is not None and num_epochs * count < local_batch:
        raise DataError(f'{num_epochs} epoch(s) of {count} examples do not fill one batch of {local_batch}.')

    def augment(position, example):
        rng = tf.stack([tf.constant(augment_seed, tf.int64), position])
        image = _resized(source, tf, example['image'], image_size)
        if crop_padding:
            padded = tf.pad(image, [[crop_padding, crop_padding], [crop_padding, crop_padding], [0, 0]])
            offsets = tf.random.stateless_uniform([2], seed=rng, maxval=2 * crop_padding + 1, dtype=tf.int32)
            image = tf.slice(padded, tf.concat([offsets, [0]], 0), tf.shape(image))
        if flip:
            coin = tf.random.stateless_uniform([], seed=rng[::-1])
            image = tf.cond(coin < 0.5, lambda: tf.image.flip_left_right(image), lambda: image)
        return {'image': _normalise(tf, image, mean, std), 'label': tf.cast(example['label'], tf.int32)}

    def build(skip_examples: int) -> Iterator:
        ds = encoded.shuffle(min(count, SHUFFLE_BUFFER), seed=shuffle_seed, reshuffle_each_iteration=True)
        ds = ds.repeat(num_epochs).skip(skip_examples).enumerate(start=skip_examples)
        ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.batch(local_batch, drop_remainder=True).prefetch(2).as_numpy_iterator()

    return TrainIterator(build, local_batch)


def make_eval_iterator(source: StreamingSplit, *, image_size: int, mean=0.0, std=1.0,
                       indices: Sequence[int] | None = None, process_index: int = 0, process_count: int = 1,
                       local_batch: int) -> Iterator[dict[str, np.ndarray]]:
    """As `pipeline.make_eval_iterator`: every example once, padded batches with a 'mask'.

    Every process yields the same number of batches (its share padded), so a collective eval step
    never waits on a process that ran out.
    """
    tf = _tensorflow()
    encoded, _ = _process_share(source, tf, indices, process_index, process_count)
    num_batches = math.ceil(max(_share_size(source, indices, p, process_count) for p in range(process_count))
                            / local_batch)
    channels = source.builder.info.features['image'].shape[-1]

    def preprocess(example):
        image = _resized(source, tf, example['image'], image_size)
        return {'image': _normalise(tf, image, mean, std), 'label': tf.cast(example['label'], tf.int32)}

    batches = encoded.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(local_batch)
    return _padded(batches.prefetch(2).as_numpy_iterator(), num_batches, local_batch,
                   (image_size, image_size, channels))


def _padded(batches: Iterator, num_batches: int, local_batch: int, image_shape) -> Iterator[dict[str, np.ndarray]]:
    """Exactly `num_batches` batches of `local_batch`, the real examples first, then zero padding."""
    for _ in range(num_batches):
        real = next(batches, None)
        n = 0 if real is None else len(real['label'])
        images = np.zeros((local_batch, *image_shape), np.float32)
        labels = np.zeros(local_batch, np.int32)
        if n:
            images[:n], labels[:n] = real['image'], real['label']
        yield {'image': images, 'label': labels, 'mask': (np.arange(local_batch) < n).astype(np.float32)}
