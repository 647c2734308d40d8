"""Dataset sources by name: TFDS datasets, built-in datasets built on demand, image folders.

Random access (`tfds.data_source` over array_record, or an image folder) is preferred: it needs no
TensorFlow, and grain can then shuffle globally, shard by process and checkpoint an iterator as a
single index. TFDS datasets prepared as tfrecord give a `StreamingSplit`, read with tf.data
(growjax.data.tfdata).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping

import numpy as np
import tensorflow_datasets as tfds

from growjax.data import builtin, folder
from growjax.data.tfdata import StreamingSplit
from growjax.errors import DataError

log = logging.getLogger('growjax')
BUILTIN = tuple(builtin.BUILDERS)
DEFAULT_IMAGE_SIZE = 16
_CONFIG_RE = re.compile(r'(\d+)px(?:_max(\d+))?')


@dataclasses.dataclass(frozen=True)
class DatasetMeta:
    """What a model and a training loop need to know about a dataset before reading it."""
    name: str  # with its TFDS config, e.g. 'growjax_latin/16px'
    num_classes: int
    image_shape: tuple[int, int, int]  # (H, W, C) as stored
    split_sizes: Mapping[str, int]
    class_names: tuple[str, ...]


def _full_name(builder: tfds.core.DatasetBuilder) -> str:
    """'name/config' (or 'name' for a builder without configs), as tfds.load takes it."""
    config = f'/{builder.builder_config.name}' if builder.builder_config else ''
    return f'{builder.name}{config}'


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
    _build(builder)
    return _full_name(builder)


def _build(builder: tfds.core.DatasetBuilder) -> None:
    """Renders a built-in dataset into its data_dir once (later calls find it prepared), under one
    progress bar of our own (TFDS's per-split bars and its download messages do not apply)."""
    if builder.is_prepared():
        return
    log.info('Rendering the built-in dataset %s into %s (once: later runs reuse it; nothing is downloaded).',
             _full_name(builder), builder.data_dir)
    shown = getattr(tfds.core.utils.tqdm_utils, '_active', True)
    tfds.display_progress_bar(False)
    try:
        builder.download_and_prepare(file_format='array_record')
    finally:
        tfds.display_progress_bar(shown)


def _prepared_builder(name: str, data_dir: str, image_size: int | None):
    """A prepared builder; built-ins are built on demand, anything else must be there already."""
    if name.partition('/')[0] in BUILTIN:
        builder = _builtin_builder(name, data_dir, image_size)
        _build(builder)
        return builder
    hint = (f'Dataset {name!r} is not prepared in data_dir {data_dir!r}. Prepare it once, preferably in the '
            f'array_record format (read by random access, without TensorFlow): '
            f'`tfds build {name} --data_dir={data_dir} --file_format=array_record` (tfrecord also works, '
            f'read with tf.data). Built-in datasets ({", ".join(BUILTIN)}) need no preparation; for your own '
            f"images use data.name='{folder.PREFIX}ROOT' with ROOT/<split>/<class>/<image>.")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(hint) from e
    if not builder.is_prepared():
        raise DataError(hint)
    return builder


def load_source(name: str, split: str, data_dir: str, image_size: int | None = None):
    """The examples of one split: a random-access source, or a StreamingSplit for tfrecord datasets.

    Built-in datasets are built on demand; `image_size` picks their rendered size (default 16; it
    is ignored for other datasets, which are resized by the input pipeline instead).
    name='image_folder:ROOT' reads ROOT/<split>/<class>/<image> (data_dir is not used). Elements are
    dicts with 'image' (uint8 HWC) and 'label'; split specs follow TFDS ('train[:90%]', 'a+b').
    """
    root = folder.root_of(name)
    if root is not None:
        return folder.ImageFolderSource(folder.index_folder(root), split)
    builder = _prepared_builder(name, data_dir, image_size)
    available = list(builder.info.splits)
    for part in split.split('+'):
        if part.split('[')[0].strip() not in available:
            raise DataError(f'Unknown split {split!r} of {name} (data_dir {data_dir!r}); '
                            f'available splits: {", ".join(available)}.')
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        return StreamingSplit(builder, split)
    return builder.as_data_source(split=split)


def dataset_info(name: str, data_dir: str, image_size: int | None = None) -> DatasetMeta:
    """Classes, image shape (None for sizes that vary) and split sizes (builds a built-in dataset if needed)."""
    root = folder.root_of(name)
    if root is not None:
        index = folder.index_folder(root)
        return DatasetMeta(name=f'{folder.PREFIX}{root}', num_classes=len(index.class_names),
                           image_shape=(None, None, index.channels), split_sizes=index.split_sizes(),
                           class_names=index.class_names)
    builder = _prepared_builder(name, data_dir, image_size)
    info = builder.info
    label = info.features['label']
    return DatasetMeta(
        name=_full_name(builder),
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
    """All labels of a source (int64) in its order, e.g. to draw few-shot subsets."""
    if isinstance(source, (StreamingSplit, folder.ImageFolderSource)):
        return source.labels()
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
