"""Random-access TFDS sources (array_record) by name, built-in datasets built on demand.

Random access (`tfds.data_source`) rather than `tf.data`: it needs no TensorFlow, and grain can then
shuffle globally, shard by process and checkpoint an iterator as a single index.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import numpy as np
import tensorflow_datasets as tfds

from growjax.data import builtin
from growjax.errors import UserError

BUILTIN = tuple(builtin.BUILDERS)
DEFAULT_IMAGE_SIZE = 16
_CONFIG_RE = re.compile(r'(\d+)px(?:_max(\d+))?')


class DataError(UserError):
    """A dataset, split or selection that cannot be served; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class DatasetMeta:
    """What a model and a training loop need to know about a dataset before reading it."""
    name: str  # with its TFDS config, e.g. 'growjax_latin/16px'
    num_classes: int
    image_shape: tuple[int, int, int]  # (H, W, C) as stored
    split_sizes: Mapping[str, int]
    class_names: tuple[str, ...]


def _builtin_builder(name: str, data_dir: str, image_size: int | None,
                     max_per_class: int | None = None) -> tfds.core.DatasetBuilder:
    base, _, config = name.partition('/')
    if config:
        match = _CONFIG_RE.fullmatch(config)
        if match is None:
            raise DataError(f'Unknown config {config!r} of {base}: expected e.g. "16px" or '
                            '"16px_max10" (image size, optional per-class cap).')
        size, cap = int(match[1]), None if match[2] is None else int(match[2])
        if (image_size is not None and image_size != size) or (
            max_per_class is not None and max_per_class != cap):
            raise DataError(f'{name} contradicts image_size={image_size}, '
                            f'max_per_class={max_per_class}.')
    else:
        size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
        cap = max_per_class
    cls = builtin.BUILDERS[base]
    # TFDS insists that a registered config is passed by name, an unregistered one as an object.
    config_name = builtin.config_name(size, cap)
    registered = {c.name for c in cls.BUILDER_CONFIGS}
    return cls(config=config_name if config_name in registered else builtin.make_config(size, cap),
               data_dir=data_dir, file_format='array_record')


def prepare_builtin(name: str, data_dir: str, image_size: int | None = None, *,
                    max_per_class: int | None = None) -> str:
    """Builds a built-in dataset into data_dir unless it is already there; returns 'name/config'.

    `image_size`: None means the size in the name's config ('growjax_latin/32px'), else 16.
    `max_per_class` caps every split (a small, fast copy for tests and smoke runs; it gets its own
    config name). The build is deterministic, so hosts with local disks may each build their own
    copy; on a shared filesystem let one process build it before the others read.
    """
    if name.partition('/')[0] not in BUILTIN:
        raise DataError(f'{name!r} is not a built-in dataset; built-in: {", ".join(BUILTIN)}.')
    builder = _builtin_builder(name, data_dir, image_size, max_per_class)
    builder.download_and_prepare(file_format='array_record')  # no-op when already prepared
    return f'{builder.name}/{builder.builder_config.name}'


def _prepared_builder(name: str, data_dir: str, image_size: int | None):
    """A prepared builder; built-ins are built on demand, anything else must be there already."""
    if name.partition('/')[0] in BUILTIN:
        builder = _builtin_builder(name, data_dir, image_size)
        builder.download_and_prepare(file_format='array_record')
        return builder
    hint = (f'Dataset {name!r} is not prepared in data_dir {data_dir!r}. Prepare it once, in the '
            f'array_record format (growjax reads it by random access, without TensorFlow): '
            f'`tfds build {name} --data_dir={data_dir} --file_format=array_record`. Built-in '
            f'datasets ({", ".join(BUILTIN)}) need no preparation.')
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(hint) from e
    if not builder.is_prepared():
        raise DataError(hint)
    return builder


def load_source(name: str, split: str, data_dir: str, image_size: int | None = None):
    """Random-access source (`tfds.data_source`) of a TFDS array_record dataset.

    Built-in datasets are built on demand; `image_size` picks their rendered size (default 16; it
    is ignored for other datasets, which are resized by the input pipeline instead). Elements are
    dicts with 'image' (uint8 HWC) and 'label'.
    """
    builder = _prepared_builder(name, data_dir, image_size)
    available = list(builder.info.splits)
    for part in split.split('+'):
        if part.split('[')[0].strip() not in available:
            raise DataError(f'Unknown split {split!r} of {name} (data_dir {data_dir!r}); '
                            f'available splits: {", ".join(available)}.')
    try:
        return builder.as_data_source(split=split)
    except ValueError as e:  # prepared in a format without random access (e.g. tfrecord)
        raise DataError(f'{name} in {data_dir!r} cannot be read by random access ({e}). Rebuild it '
                        f'with `tfds build {name} --data_dir={data_dir} '
                        '--file_format=array_record`.') from e


def dataset_info(name: str, data_dir: str, image_size: int | None = None) -> DatasetMeta:
    """Classes, image shape and split sizes (builds a built-in dataset if needed)."""
    builder = _prepared_builder(name, data_dir, image_size)
    info = builder.info
    label = info.features['label']
    config = f'/{builder.builder_config.name}' if builder.builder_config else ''
    return DatasetMeta(
        name=f'{builder.name}{config}',
        num_classes=label.num_classes,
        image_shape=tuple(info.features['image'].shape),
        split_sizes={split: info.splits[split].num_examples for split in info.splits},
        class_names=tuple(label.names),
    )


def read_examples(source, ids) -> list:
    """Examples `ids` of a source, in that order; batched reads where the source supports them."""
    ids = [int(i) for i in ids]
    if hasattr(source, '__getitems__'):
        return list(source.__getitems__(ids)) if ids else []
    return [source[i] for i in ids]


def read_labels(source) -> np.ndarray:
    """All labels of a source (int64), e.g. to draw few-shot subsets; reads every record once."""
    return np.asarray([ex['label'] for ex in read_examples(source, range(len(source)))], np.int64)


def few_shot_indices(labels: np.ndarray, shots_per_class: int, seed: int, *,
                     num_classes: int | None = None) -> np.ndarray:
    """Sorted indices of `shots_per_class` random examples of every class.

    Each class draws from its own seeded permutation, so the subsets are nested (k shots are a
    subset of k+1 shots with the same seed) and independent of the other classes: few-shot curves
    then differ only in the added examples. Classes are 0..num_classes-1 when given (a missing class
    is an error), else the labels present.
    """
    labels = np.asarray(labels)
    if shots_per_class < 1:
        raise DataError(f'shots_per_class must be >= 1, got {shots_per_class}.')
    classes = np.unique(labels) if num_classes is None else np.arange(num_classes)
    chosen = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        if len(members) < shots_per_class:
            raise DataError(f'Class {c} has {len(members)} examples, fewer than '
                            f'shots_per_class={shots_per_class}.')
        rng = np.random.default_rng([seed, int(c)])
        chosen.append(rng.permutation(members)[:shots_per_class])
    return np.sort(np.concatenate(chosen))
