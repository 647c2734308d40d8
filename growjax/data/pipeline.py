"""Host input pipelines (grain) and device prefetch for data-parallel training on any scale.

Both iterators are built on one global order of examples shared by all processes: each global
batch is cut into `process_count` contiguous shares and process p reads only share p. Hence the
concatenation over processes is exactly the single-process batch, and the data seen does not
depend on the number of hosts. The order is a pure function of (seed, step), so a grain iterator's
state is just the next batch index (JSON) and resuming is exact.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Sequence

import grain
import jax
import numpy as np
from PIL import Image

from growjax.data import tfdata
from growjax.data.sources import load_source, read_examples
from growjax.data.tfdata import StreamingSplit
from growjax.errors import DataError


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
    if global_batch_size < 1 or global_batch_size % process_count:
        raise DataError(f'global_batch_size={global_batch_size} must be a positive multiple of '
                        f'process_count={process_count}.')
    if not 0 <= process_index < process_count:
        raise DataError(f'process_index={process_index} not in [0, {process_count}).')
    return global_batch_size // process_count


def _example_ids(source, indices) -> np.ndarray:
    ids = np.arange(len(source)) if indices is None else np.asarray(indices, np.int64)
    if ids.ndim != 1 or not len(ids):
        raise DataError(f'Nothing to read: {len(source)} examples, indices={indices!r}.')
    if ids.min() < 0 or ids.max() >= len(source):
        raise DataError(f'indices out of range for a source of {len(source)} examples.')
    return ids


def _stack(examples: list, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Images resized one by one to size x size (datasets may mix sizes), and labels."""
    images = np.stack([_resize(np.asarray(ex['image']), size) for ex in examples])
    labels = np.asarray([ex['label'] for ex in examples], np.int32)
    return images, labels


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of one HWC image to size x size (PIL antialiases when shrinking), as float32."""
    if image.shape[:2] == (size, size):
        return image.astype(np.float32)
    out = np.empty((size, size, image.shape[-1]), np.float32)
    for c in range(image.shape[-1]):
        plane = Image.fromarray(np.ascontiguousarray(image[..., c], np.float32))
        out[..., c] = np.asarray(plane.resize((size, size), Image.BILINEAR))
    return out


def _crop(images: np.ndarray, offsets: np.ndarray, padding: int) -> np.ndarray:
    """Random crop of the original size after zero padding (zero = the letters' background)."""
    if not padding:
        return images
    h, w = images.shape[1:3]
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    return np.stack([p[y:y + h, x:x + w] for p, (y, x) in zip(padded, offsets)])


def _normalise(images: np.ndarray, mean, std) -> np.ndarray:
    """(pixels / 255 - mean) / std; mean and std are in [0, 1] units, scalars or per channel."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    return ((np.asarray(images, np.float32) / 255.0 - mean) / std).astype(np.float32)


def _read_options(num_threads: int, prefetch: int) -> grain.ReadOptions:
    # Elements are whole batches, so grain's default buffer (500 elements) would be far too deep.
    return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)


def make_train_iterator(source, *, global_batch_size: int, seed: int, image_size: int,
                        crop_padding: int = 0, flip: bool = False, mean=0.0, std=1.0,
                        indices: Sequence[int] | None = None, process_index: int = 0,
                        process_count: int = 1, num_epochs: int | None = None,
                        num_threads: int = 2, prefetch: int = 2) -> grain.DatasetIterator:
    """Endless (or `num_epochs`) shuffled, augmented batches of this process's share.

    Yields {'image': float32 [local_batch, image_size, image_size, C], 'label': int32 [local_batch]}
    with local_batch = global_batch_size // process_count. Every epoch is a fresh permutation of
    `indices` (default: all examples) derived from `seed`; batches run across epoch boundaries and
    only the incomplete last batch of a finite run is dropped. Augmentation: resize to
    `image_size` if stored otherwise, random crop after zero padding by `crop_padding` pixels,
    horizontal flip only if `flip` (never for letters). Its randomness is drawn per *global* batch
    and then sliced, so it too is independent of process_count. Checkpoint with
    `get_state()` / `set_state(state)` (a JSON-serialisable dict). A StreamingSplit (tfrecord) is
    served by `tfdata.make_train_iterator` instead, with the differences its module states.
    """
    local = _local_batch_size(global_batch_size, process_index, process_count)
    if isinstance(source, StreamingSplit):
        return tfdata.make_train_iterator(
            source, local_batch=local, seed=seed, image_size=image_size, crop_padding=crop_padding, flip=flip,
            mean=mean, std=std, indices=indices, process_index=process_index, process_count=process_count,
            num_epochs=num_epochs)
    ids = _example_ids(source, indices)
    if num_epochs is not None and num_epochs * len(ids) < global_batch_size:
        raise DataError(f'{num_epochs} epoch(s) of {len(ids)} examples do not fill one batch of '
                        f'{global_batch_size}.')
    shuffle_seed, augment_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    mine = slice(process_index * local, (process_index + 1) * local)

    def load(positions: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        offsets = rng.integers(0, 2 * crop_padding + 1, size=(global_batch_size, 2))[mine]
        flips = (rng.random(global_batch_size) < 0.5)[mine]
        images, labels = _stack(read_examples(source, ids[positions[mine]]), image_size)
        images = _crop(images, offsets, crop_padding)
        if flip:
            images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
        return {'image': _normalise(images, mean, std), 'label': labels}

    ds = grain.MapDataset.range(len(ids)).shuffle(seed=shuffle_seed).repeat(num_epochs)
    ds = ds.batch(global_batch_size, drop_remainder=True).random_map(load, seed=augment_seed)
    return iter(ds.to_iter_dataset(_read_options(num_threads, prefetch)))


def make_eval_iterator(source, *, global_batch_size: int, image_size: int, mean=0.0, std=1.0,
                       indices: Sequence[int] | None = None, process_index: int = 0,
                       process_count: int = 1, num_threads: int = 2,
                       prefetch: int = 2) -> grain.DatasetIterator:
    """Every example exactly once, in order, in batches padded to a fixed shape.

    Yields 'image', 'label' as the train iterator plus 'mask' float32 [local_batch] (1 real,
    0 padding), so that sum(mask * correct) / sum(mask) is the exact accuracy and one compiled eval
    step serves all batches. Padding has image 0 and label 0.
    """
    local = _local_batch_size(global_batch_size, process_index, process_count)
    if isinstance(source, StreamingSplit):
        return tfdata.make_eval_iterator(source, image_size=image_size, mean=mean, std=std, indices=indices,
                                         process_index=process_index, process_count=process_count,
                                         local_batch=local)
    ids = _example_ids(source, indices)
    probe, _ = _stack(read_examples(source, ids[:1]), image_size)
    shape = (local, image_size, image_size, probe.shape[-1])

    def load(batch: int) -> dict[str, np.ndarray]:
        positions = batch * global_batch_size + process_index * local + np.arange(local)
        real = positions < len(ids)
        images = np.zeros(shape, np.float32)
        labels = np.zeros(local, np.int32)
        if real.any():
            found, found_labels = _stack(read_examples(source, ids[positions[real]]), image_size)
            images[real] = _normalise(found, mean, std)
            labels[real] = found_labels
        return {'image': images, 'label': labels, 'mask': real.astype(np.float32)}

    ds = grain.MapDataset.range(math.ceil(len(ids) / global_batch_size)).map(load)
    return iter(ds.to_iter_dataset(_read_options(num_threads, prefetch)))


def split_arrays(name: str, split: str, data_dir: str, image_size: int, *, mean=0.0, std=1.0,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """All examples of a split as the eval pipeline serves them (resized, normalised), in memory:
    (float32 [N, S, S, C], int32 [N]), for analyses and the in-memory experiment runner."""
    source = load_source(name, split, data_dir, image_size)
    images, labels = [], []
    for batch in make_eval_iterator(source, global_batch_size=256, image_size=image_size, mean=mean, std=std):
        real = batch['mask'] > 0
        images.append(batch['image'][real])
        labels.append(batch['label'][real])
    return np.concatenate(images), np.concatenate(labels)


class DevicePrefetchIterator:
    """Turns host batches into global jax.Arrays in a background thread, `size` batches ahead.

    `get_state()` returns the host iterator's state *after the last batch handed out* (not after
    the prefetched ones), so checkpoints taken through the prefetcher resume exactly.
    """

    _END = object()

    def __init__(self, iterator, sharding: jax.sharding.Sharding, size: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._state = iterator.get_state() if hasattr(iterator, 'get_state') else None
        self._done = False
        self._thread = threading.Thread(target=self._fill, args=(iterator, sharding), daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, iterator, sharding) -> None:
        try:
            for batch in iterator:
                state = iterator.get_state() if hasattr(iterator, 'get_state') else None
                arrays = jax.tree.map(
                    lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
                if not self._put((arrays, state)):
                    return
        except Exception as e:  # pylint: disable=broad-except  # re-raised in the consumer
            self._put(e)
            return
        self._put(self._END)

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is self._END:
            self._done = True
            raise StopIteration
        if isinstance(item, Exception):
            self._done = True
            raise item
        arrays, self._state = item
        return arrays

    def get_state(self):
        return self._state

    def close(self) -> None:
        """Stops the background thread (it exits at its next queue operation)."""
        self._stop.set()
        self._thread.join()


def device_prefetch(iterator, sharding: jax.sharding.Sharding,
                    size: int = 2) -> DevicePrefetchIterator:
    """Global jax.Arrays (`jax.make_array_from_process_local_data`) kept `size` batches ahead.

    Each process passes its local share; `sharding` (e.g. NamedSharding(mesh, P('data'))) places
    the global batch over the devices of all processes, so the train step never waits on input.
    """
    return DevicePrefetchIterator(iterator, sharding, size)
