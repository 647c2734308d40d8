"""A built-in byte-level text corpus: the Python standard library's own source, and its grain pipelines.

Why this corpus: it ships with every interpreter (nothing to download) and is about 12 MB of real,
varied text (code, docstrings, comments), the right size for the small GPTs that growjax grows.
Being the interpreter's own, the corpus depends on it: another Python version (or a distribution
that patches its stdlib) gives other bytes, so the Python version is part of the dataset's config
name ('growjax_pystdlib/py3.11.7_seq256') and is recorded, with the bytes, files and sha1 of every
split, in the dataset's metadata (`text_info(...).metadata`).

The file list: every `.py` file under `sysconfig.get_paths()['stdlib']`, as sorted relative paths,
without folders named 'test', 'tests' or 'idle_test' (tests: much generated and deliberately
invalid code) nor 'site-packages' / 'dist-packages' (installed packages, not the stdlib; they sit
inside the stdlib folder). Each file goes to one split by the sha1 of its relative path (SPLIT_SHARES:
90% train, 5% validation, 5% test of the files), so splits are disjoint by file and stable when
files come or go. A split is its files concatenated in sorted order, each followed by one 0 byte
(SEPARATOR: an end-of-file mark, as no source file contains one), cut into examples of seq_len + 1
bytes at a stride of seq_len: inputs are bytes [0, seq_len), targets bytes [1, seq_len], and every
byte but the first is a target exactly once (the last, incomplete example is dropped).

It is prepared once into the TFDS data_dir as an `array_record` dataset, like the image datasets of
growjax.data.builtin, and read by random access through grain with the same guarantees as
growjax.data.pipeline: a global shuffle, per-process shares of every global batch, and an iterator
whose state is one JSON index (exact resumption).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import platform
import sysconfig
from collections.abc import Mapping, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds

from growjax.data.pipeline import _example_ids, _local_batch_size, _read_options
from growjax.data.sources import _build, _full_name, read_examples
from growjax.errors import DataError

NAME = 'growjax_pystdlib'
VOCAB_SIZE = 256  # bytes
DEFAULT_SEQ_LEN = 256
SEPARATOR = b'\0'
EXCLUDED_DIRS = frozenset({'test', 'tests', 'idle_test', 'site-packages', 'dist-packages'})
SPLIT_SHARES = {'train': 90, 'validation': 5, 'test': 5}  # percent of the files, by path hash


def stdlib_files(root: str) -> list[str]:
    """Sorted relative paths ('/'-separated) of the .py files under `root`, outside EXCLUDED_DIRS."""
    if not os.path.isdir(root):
        raise DataError(f'The standard library folder {root!r} does not exist.')
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in EXCLUDED_DIRS]
        relative = os.path.relpath(folder, root)
        prefix = '' if relative == '.' else relative.replace(os.sep, '/') + '/'
        files.extend(prefix + name for name in names if name.endswith('.py'))
    return sorted(files)


def split_of(path: str) -> str:
    """The split of a relative path: sha1(path) mod 100 against the cumulative SPLIT_SHARES."""
    bucket = int.from_bytes(hashlib.sha1(path.encode('utf-8')).digest()[:8], 'big') % 100
    for split, share in SPLIT_SHARES.items():
        if bucket < share:
            return split
        bucket -= share
    raise AssertionError('SPLIT_SHARES must sum to 100')


def split_files(files: Sequence[str]) -> dict[str, list[str]]:
    """{split: its files, in the order given}; every split is present, possibly empty."""
    splits = {split: [] for split in SPLIT_SHARES}
    for path in files:
        splits[split_of(path)].append(path)
    return splits


def split_bytes(root: str, files: Sequence[str], max_bytes: int | None = None) -> bytes:
    """The files concatenated, each followed by SEPARATOR; the first `max_bytes` only if given."""
    chunks, size = [], 0
    for path in files:
        if max_bytes is not None and size >= max_bytes:
            break
        with open(os.path.join(root, path), 'rb') as f:
            chunks.append(f.read() + SEPARATOR)
        size += len(chunks[-1])
    return b''.join(chunks)[:max_bytes]


def windows(data: bytes, seq_len: int) -> np.ndarray:
    """uint8 [N, seq_len + 1]: windows of `data` at a stride of seq_len (consecutive ones share a byte)."""
    array = np.frombuffer(data, np.uint8)
    if len(array) <= seq_len:
        return np.zeros((0, seq_len + 1), np.uint8)
    return np.lib.stride_tricks.sliding_window_view(array, seq_len + 1)[::seq_len]


@dataclasses.dataclass(eq=False)
class TextConfig(tfds.core.BuilderConfig):
    """Example length, and an optional cap on every split's bytes (a small, fast copy for tests)."""
    seq_len: int = DEFAULT_SEQ_LEN
    max_bytes: int | None = None


def config_name(seq_len: int, max_bytes: int | None) -> str:
    """'py3.11.7_seq256' (+ '_max20000'): the running interpreter's version makes its own dataset."""
    return f'py{platform.python_version()}_seq{seq_len}' + ('' if max_bytes is None else f'_max{max_bytes}')


def make_config(seq_len: int, max_bytes: int | None = None) -> TextConfig:
    return TextConfig(name=config_name(seq_len, max_bytes), seq_len=seq_len, max_bytes=max_bytes)


class GrowjaxPystdlib(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The running interpreter's standard library source as byte sequences (see the module docstring)."""

    VERSION = tfds.core.Version('1.0.0')
    code_path = None  # as builtin._Builtin: nothing to download, no checksums to look for
    BUILDER_CONFIGS = [make_config(DEFAULT_SEQ_LEN)]

    def _info(self):
        length = self.builder_config.seq_len + 1
        return tfds.core.DatasetInfo(
            builder=self,
            description=f'The .py source of the Python {platform.python_version()} standard library, without '
                        f'tests, as bytes: files split by path hash, each followed by a 0 byte, concatenated, cut into '
                        f'examples of {length} bytes.',
            features=tfds.features.FeaturesDict({'tokens': tfds.features.Tensor(shape=(length,), dtype=np.uint8)}),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,  # stored in corpus order (TFDS would order examples by a hash of their key)
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        root = sysconfig.get_paths()['stdlib']
        config = self.builder_config
        examples, metadata = {}, {'python': platform.python_version(), 'stdlib': root, 'separator': 0,
                                  'bytes': {}, 'files': {}, 'sha1': {}}
        for split, files in split_files(stdlib_files(root)).items():
            data = split_bytes(root, files, config.max_bytes)
            if len(data) <= config.seq_len:
                raise DataError(f'Split {split!r} of {NAME} has {len(data)} bytes, too few for one example of '
                                f'seq_len={config.seq_len} (max_bytes={config.max_bytes}).')
            examples[split] = windows(data, config.seq_len)
            metadata['bytes'][split] = len(data)
            metadata['files'][split] = len(files)
            metadata['sha1'][split] = hashlib.sha1(data).hexdigest()
        self.info.metadata.update(metadata)
        return {split: self._generate_examples(rows) for split, rows in examples.items()}

    def _generate_examples(self, rows):
        for i, row in enumerate(rows):
            yield i, {'tokens': row}

    # See builtin._Builtin: nothing is downloaded, so TFDS's download messages do not apply.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class TextMeta:
    """What a language model and its training loop need to know about the corpus before reading it."""
    name: str  # with its TFDS config, e.g. 'growjax_pystdlib/py3.11.7_seq256'
    seq_len: int
    vocab_size: int
    split_sizes: Mapping[str, int]  # examples
    metadata: Mapping  # python, stdlib, separator; per split: bytes and sha1 as stored, files before any max_bytes cap


def _prepared(data_dir: str, seq_len: int, max_bytes: int | None) -> tfds.core.DatasetBuilder:
    for option, value in (('seq_len', seq_len), ('max_bytes', max_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise DataError(f'{NAME}: {option} must be a positive integer, got {value!r}.')
    # TFDS insists that a registered config is passed by name, an unregistered one as an object.
    name = config_name(seq_len, max_bytes)
    registered = {config.name for config in GrowjaxPystdlib.BUILDER_CONFIGS}
    builder = GrowjaxPystdlib(config=name if name in registered else make_config(seq_len, max_bytes),
                              data_dir=data_dir, file_format='array_record')
    _build(builder)
    return builder


def prepare_stdlib(data_dir: str, seq_len: int = DEFAULT_SEQ_LEN, *, max_bytes: int | None = None) -> str:
    """Builds the corpus into data_dir unless it is already there; returns 'name/config'.

    `max_bytes` caps every split (a small copy for tests; it gets its own config name). The build is
    deterministic for one interpreter, so hosts may each build their own copy.
    """
    return _full_name(_prepared(data_dir, seq_len, max_bytes))


def text_info(data_dir: str, seq_len: int = DEFAULT_SEQ_LEN, *, max_bytes: int | None = None) -> TextMeta:
    """The corpus's name, sizes and metadata (prepares it if needed)."""
    builder = _prepared(data_dir, seq_len, max_bytes)
    return TextMeta(name=_full_name(builder), seq_len=seq_len, vocab_size=VOCAB_SIZE,
                    split_sizes={split: info.num_examples for split, info in builder.info.splits.items()},
                    metadata=dict(builder.info.metadata))


def text_source(data_dir: str, split: str, seq_len: int = DEFAULT_SEQ_LEN, *, max_bytes: int | None = None):
    """The random-access examples ({'tokens': uint8 [seq_len + 1]}) of one split (prepares it if needed)."""
    builder = _prepared(data_dir, seq_len, max_bytes)
    if split.split('[')[0] not in builder.info.splits:
        raise DataError(f'Unknown split {split!r} of {NAME}; available: {", ".join(builder.info.splits)}.')
    return builder.as_data_source(split=split)


def _shifted(examples: list) -> dict[str, np.ndarray]:
    """int32 inputs (bytes [0, T)) and targets (bytes [1, T]) of examples of T + 1 bytes."""
    tokens = np.stack([np.asarray(ex['tokens']) for ex in examples]).astype(np.int32)
    return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}


def make_lm_train_iterator(source, *, global_batch_size: int, seed: int, indices: Sequence[int] | None = None,
                           process_index: int = 0, process_count: int = 1, num_epochs: int | None = None,
                           num_threads: int = 2, prefetch: int = 2) -> grain.DatasetIterator:
    """Endless (or `num_epochs`) shuffled batches of this process's share: {'inputs', 'targets'}, int32
    [global_batch_size // process_count, seq_len].

    As pipeline.make_train_iterator: a fresh permutation of `indices` (default: all) per epoch from
    `seed`, batches across epoch boundaries, process p reads share p of each global batch, and
    `get_state()` / `set_state(state)` checkpoint the iterator exactly.
    """
    local = _local_batch_size(global_batch_size, process_index, process_count)
    ids = _example_ids(source, indices)
    if num_epochs is not None and num_epochs * len(ids) < global_batch_size:
        raise DataError(f'{num_epochs} epoch(s) of {len(ids)} examples do not fill one batch of {global_batch_size}.')
    mine = slice(process_index * local, (process_index + 1) * local)

    def load(positions: np.ndarray) -> dict[str, np.ndarray]:
        return _shifted(read_examples(source, ids[positions[mine]]))

    ds = grain.MapDataset.range(len(ids)).shuffle(seed=seed).repeat(num_epochs)
    ds = ds.batch(global_batch_size, drop_remainder=True).map(load)
    return iter(ds.to_iter_dataset(_read_options(num_threads, prefetch)))


def make_lm_eval_iterator(source, *, global_batch_size: int, indices: Sequence[int] | None = None,
                          process_index: int = 0, process_count: int = 1, num_threads: int = 2,
                          prefetch: int = 2) -> grain.DatasetIterator:
    """Every example exactly once, in order, in batches padded to a fixed shape: 'inputs', 'targets' as
    the train iterator plus 'mask' float32 [local_batch] (1 real, 0 padding of zero bytes)."""
    local = _local_batch_size(global_batch_size, process_index, process_count)
    ids = _example_ids(source, indices)
    length = len(np.asarray(source[int(ids[0])]['tokens'])) - 1

    def load(batch: int) -> dict[str, np.ndarray]:
        positions = batch * global_batch_size + process_index * local + np.arange(local)
        real = positions < len(ids)
        out = {key: np.zeros((local, length), np.int32) for key in ('inputs', 'targets')}
        if real.any():
            for key, value in _shifted(read_examples(source, ids[positions[real]])).items():
                out[key][real] = value
        return {**out, 'mask': real.astype(np.float32)}

    ds = grain.MapDataset.range(math.ceil(len(ids) / global_batch_size)).map(load)
    return iter(ds.to_iter_dataset(_read_options(num_threads, prefetch)))
