"""A user's own images as a dataset: `root/<split>/<class>/<image file>`.

The layout torchvision's ImageFolder and most labelling tools produce, one folder per split. Read
by random access like a TFDS array_record source, so the same grain pipelines (global shuffle,
per-process shards, exact resume) serve it; images are decoded with PIL when a batch is read.
"""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Mapping

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, UnidentifiedImageError

from growjax.errors import DataError

PREFIX = 'image_folder:'  # config.data.name = 'image_folder:/path/to/root'
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm', '.pgm')
_GRAYSCALE_MODES = ('1', 'L', 'LA', 'I', 'I;16', 'F')


def root_of(name: str) -> str | None:
    """The root folder named by 'image_folder:ROOT' (user '~' expanded), None for other names."""
    if not name.startswith(PREFIX):
        return None
    root = os.path.expanduser(name[len(PREFIX):])
    if not root:
        raise DataError(f"config.data.name={name!r} names no folder: use '{PREFIX}/path/to/root'.")
    return root


def _listdir(path: str) -> list[str]:
    return sorted(name for name in os.listdir(path) if not name.startswith('.'))


@dataclasses.dataclass(frozen=True)
class ImageFolder:
    """The index of a root folder: every split's (file, label) pairs and the class names."""
    root: str
    class_names: tuple[str, ...]
    files: Mapping[str, tuple[str, ...]]  # split -> image paths, sorted by class then file name
    labels: Mapping[str, np.ndarray]  # split -> int64 labels, aligned with files
    channels: int  # 1 when the first training image is grayscale, else 3 (RGB)

    def split_sizes(self) -> dict[str, int]:
        return {split: len(files) for split, files in self.files.items()}


def index_folder(root: str) -> ImageFolder:
    """Lists root/<split>/<class>/<image>; classes are the sorted union of class folders over splits.

    The union (rather than each split's own list) keeps label ids identical in every split, also
    when a split lacks a class. Channels follow the first image of 'train' (else of the first
    split): grayscale folders train 1-channel models, anything else is read as RGB.
    """
    if not os.path.isdir(root):
        raise DataError(f'Image folder {root!r} (config.data.name={PREFIX}{root}) does not exist. It must hold '
                        'one folder per split, each with one folder per class: ROOT/train/<class>/<image>.')
    splits = [s for s in _listdir(root) if os.path.isdir(os.path.join(root, s))]
    if not splits:
        raise DataError(f'{root} has no split folders; expected ROOT/<split>/<class>/<image>, e.g. '
                        f'{os.path.join(root, "train", "cat", "0001.jpg")}.')
    class_names = sorted({c for s in splits for c in _listdir(os.path.join(root, s))
                          if os.path.isdir(os.path.join(root, s, c))})
    if not class_names:
        raise DataError(f'The split folders of {root} ({", ".join(splits)}) hold no class folders; expected '
                        'ROOT/<split>/<class>/<image>.')
    label_of = {name: i for i, name in enumerate(class_names)}
    files, labels = {}, {}
    for split in splits:
        pairs = []
        for class_name in _listdir(os.path.join(root, split)):
            class_dir = os.path.join(root, split, class_name)
            if not os.path.isdir(class_dir):
                continue
            pairs += [(os.path.join(class_dir, f), label_of[class_name]) for f in _listdir(class_dir)
                      if f.lower().endswith(IMAGE_SUFFIXES)]
        if not pairs:
            raise DataError(f'{os.path.join(root, split)} holds no images (suffixes: {", ".join(IMAGE_SUFFIXES)}).')
        files[split] = tuple(p for p, _ in pairs)
        labels[split] = np.asarray([label for _, label in pairs], np.int64)
    first = files['train' if 'train' in files else splits[0]][0]
    with _open(first) as image:
        channels = 1 if image.mode in _GRAYSCALE_MODES else 3
    return ImageFolder(root, tuple(class_names), files, labels, channels)


def _open(path: str) -> Image.Image:
    try:
        return Image.open(path)
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f'Cannot read image {path}: {e}') from None


def read_image(path: str, channels: int) -> np.ndarray:
    """uint8 [H, W, channels] (RGB or grayscale), whatever the file's own mode."""
    with _open(path) as image:
        try:
            pixels = np.asarray(image.convert('L' if channels == 1 else 'RGB'))
        except OSError as e:  # truncated or corrupt data shows up only when decoding
            raise DataError(f'Cannot decode image {path}: {e}') from None
    return pixels[..., None] if channels == 1 else pixels


class ImageFolderSource:
    """Random access to one split spec (e.g. 'train', 'train[:90%]', 'train+validation')."""

    def __init__(self, folder: ImageFolder, split: str):
        try:
            instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(
                {s: types.SimpleNamespace(num_examples=n) for s, n in folder.split_sizes().items()})
        except (KeyError, ValueError, AssertionError) as e:
            raise DataError(f'Split {split!r} of the image folder {folder.root}: {e} (split folders: '
                            f'{", ".join(folder.files)}).') from None
        self._files, self._labels = [], []
        for part in instructions:
            window = slice(part.from_, part.to)
            self._files += folder.files[part.splitname][window]
            self._labels += list(folder.labels[part.splitname][window])
        self._channels = folder.channels

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> dict:
        return {'image': read_image(self._files[index], self._channels), 'label': int(self._labels[index])}

    def labels(self) -> np.ndarray:
        """All labels without decoding an image (for few-shot draws)."""
        return np.asarray(self._labels, np.int64)
