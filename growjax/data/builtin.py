"""Built-in offline datasets: rendered Latin (source) and Greek (target) letters, sklearn digits,
and letters of other scripts (a harder, larger target).

Why rendered letters: growing a pretrained net only pays off when pretraining helps, i.e. a large,
varied source task and a small target task of *other* classes (docs/design.md, "Built-in offline data").
The source renders the 52 Latin letters in matplotlib's shipped fonts; the target renders Greek
lowercase letters only in fonts held out of the source, so neither classes nor typefaces overlap.

Everything is generated locally (no download, no TensorFlow) and written by TFDS in the
`array_record` format, so it is read like any other TFDS dataset with random access.
"""

from __future__ import annotations

import dataclasses
import os
import unicodedata

import matplotlib
import numpy as np
import tensorflow_datasets as tfds
from matplotlib import ft2font
from PIL import Image
from scipy import ndimage

FONT_DIR = os.path.join(matplotlib.get_data_path(), 'fonts', 'ttf')

LATIN_CHARS = tuple(chr(c) for c in range(ord('A'), ord('Z') + 1)) + tuple(
    chr(c) for c in range(ord('a'), ord('z') + 1))
# alpha..omega without final sigma (U+03C2): it is a positional variant of sigma, not a letter.
GREEK_CHARS = tuple(chr(c) for c in range(0x3B1, 0x3CA) if c != 0x3C2)

# Held out of the source: the target's typefaces are never seen in pretraining. One face per
# family/style mix, so the target still spans sans, serif, mono, regular, bold and slanted.
GREEK_FONTS = (
    'DejaVuSans-Oblique.ttf',
    'DejaVuSansMono-Bold.ttf',
    'DejaVuSerif.ttf',
    'STIXGeneral.ttf',
    'STIXGeneralBolIta.ttf',
)
# Every other shipped font with real Latin letters (the Computer Modern faces have no Greek at
# Unicode code points, so they can only serve the source). Left out on purpose: cmex10/cmsy10
# (symbols at letter code points), LastResortHE (placeholder boxes), the *Display faces and the
# STIX size/non-Unicode variants (no letters).
LATIN_FONTS = (
    'DejaVuSans.ttf',
    'DejaVuSans-Bold.ttf',
    'DejaVuSans-BoldOblique.ttf',
    'DejaVuSansMono.ttf',
    'DejaVuSansMono-Oblique.ttf',
    'DejaVuSansMono-BoldOblique.ttf',
    'DejaVuSerif-Bold.ttf',
    'DejaVuSerif-Italic.ttf',
    'DejaVuSerif-BoldItalic.ttf',
    'STIXGeneralBol.ttf',
    'STIXGeneralItalic.ttf',
    'cmr10.ttf',
    'cmb10.ttf',
    'cmss10.ttf',
    'cmti10.ttf',
    'cmtt10.ttf',
    'cmmi10.ttf',
)

# A harder, larger, farther target: letters of other scripts. The letters of the Cyrillic
# (U+0410-044F), Armenian (U+0531-0556, U+0561-0586) and Georgian (U+10D0-10FA) blocks that have a
# glyph in at least SCRIPT_MIN_FONTS of the held-out GREEK_FONTS and that do not look like a Latin
# or Greek letter or an earlier letter of the list (mean correlation of their 16x16 renderings over
# the fonts both have <= SCRIPT_MAX_SIMILARITY): `select_script_chars()` recomputes the list
# (tests/test_map.py checks it still does with the installed fonts); it is written out here so the
# dataset's classes stay fixed. 36 Cyrillic, 56 Armenian, 39 Georgian letters.
SCRIPT_MIN_FONTS = 3
SCRIPT_MAX_SIMILARITY = 0.9
SCRIPT_BLOCKS = ((0x410, 0x450), (0x531, 0x557), (0x561, 0x587), (0x10D0, 0x10FB))
SCRIPT_CHARS = tuple(
    'ДЖЗЙЛУФЦЧШЪЫЬЭЮЯбвгджзилмтфцчшъыьэюя'
    'ԱԲԳԴԵԶԷԸԹԺԻԽԾԿՀՁՃՄՅՆՇՈՉՊՋՌՎՐՒՔՖաբդեէըթժլխծկձճմյնշչջվւփքֆ'
    'აბგდეზთიკლმნოპჟრსტუფქღყშჩცწჭჯჰჱჲჳჴჵჶჸჹჺ')

_EM = 0.8  # font size (em) as a fraction of the canvas
_BASELINE = 0.75  # baseline row as a fraction of the canvas: keeps x-height vs cap-height cues
_MARGIN = 0.25  # extra border around the stored glyph, so warps pull ink in rather than black
_STROKE_RADII = (0, 1, 2)  # dilation radius in pixels of a 64-pixel canvas (scaled with it)

# Per-sample augmentation ranges.
_SCALE = (0.8, 1.1)
_ROTATION_DEG = 15.0
_SHEAR = 0.15
_SHIFT = 0.08  # fraction of the image size
_INK = (0.75, 1.0)
_BACKGROUND = (0.0, 0.1)
_NOISE_STD = (0.0, 0.08)


def supersample(image_size: int) -> int:
    """Glyphs are warped on a canvas this many times finer and box-filtered down.

    The supersampling antialiases the warp so that letters stay legible at 16x16 (factor 4);
    a canvas of >= 64 pixels is enough, so larger images use less (32x32: factor 2, 4x cheaper).
    """
    return max(2, -(-64 // image_size))


def greek_class_names() -> tuple[str, ...]:
    """ASCII names ('alpha', 'beta', ...): readable in logs and label files."""
    return tuple(unicodedata.name(c).split()[-1].lower() for c in GREEK_CHARS)


class _GlyphCache:
    """Renders each (font, char, stroke) once (uint8, supersampled); samples warp copies of it."""

    def __init__(self, image_size: int):
        self.factor = supersample(image_size)
        self.canvas = self.factor * image_size
        self.margin = int(round(_MARGIN * self.canvas))
        self._fonts: dict[str, ft2font.FT2Font] = {}
        self._glyphs: dict[tuple[str, str, int], np.ndarray] = {}

    def get(self, font: str, char: str, stroke: int) -> np.ndarray:
        key = (font, char, stroke)
        if key not in self._glyphs:
            glyph = self._glyphs.get((font, char, 0))
            if glyph is None:
                glyph = self._glyphs[(font, char, 0)] = self._render(font, char)
            radius = int(round(_STROKE_RADII[stroke] * self.canvas / 64))
            if radius:
                yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
                glyph = ndimage.grey_dilation(glyph, footprint=yy**2 + xx**2 <= radius**2)
            self._glyphs[key] = glyph
        return self._glyphs[key]

    def _render(self, font: str, char: str) -> np.ndarray:
        """The glyph with its baseline at a fixed row and its ink centred horizontally."""
        ft = self._fonts.get(font)
        if ft is None:
            ft = self._fonts[font] = ft2font.FT2Font(os.path.join(FONT_DIR, font))
        if not ft.get_char_index(ord(char)):
            raise ValueError(f'font {font} has no glyph for {char!r}')
        ft.set_size(_EM * self.canvas, 72)  # at 72 dpi, points are pixels
        ft.set_text(char)
        ft.draw_glyphs_to_bitmap(antialiased=True)
        ink = np.asarray(ft.get_image(), np.uint8)
        descent = ft.get_descent() / 64.0
        size = self.canvas + 2 * self.margin
        out = np.zeros((size, size), np.uint8)
        top = int(round(self.margin + _BASELINE * self.canvas - (ink.shape[0] - descent)))
        left = int(round(self.margin + (self.canvas - ink.shape[1]) / 2))
        rows = slice(max(top, 0), min(top + ink.shape[0], size))
        cols = slice(max(left, 0), min(left + ink.shape[1], size))
        out[rows, cols] = ink[rows.start - top:rows.stop - top, cols.start - left:cols.stop - left]
        return out


def script_fonts(char: str) -> tuple[str, ...]:
    """The held-out fonts (GREEK_FONTS) that have a glyph for `char`."""
    return tuple(font for font in GREEK_FONTS if _font(font).get_char_index(ord(char)))


_FACES: dict[str, ft2font.FT2Font] = {}


def _font(font: str) -> ft2font.FT2Font:
    if font not in _FACES:
        _FACES[font] = ft2font.FT2Font(os.path.join(FONT_DIR, font))
    return _FACES[font]


def select_script_chars() -> tuple[str, ...]:
    """SCRIPT_CHARS as its rule defines them, from the installed fonts (see SCRIPT_CHARS)."""
    cache = _GlyphCache(16)
    k, crop = cache.factor, slice(cache.margin, cache.margin + cache.canvas)

    def centred(font, char):
        x = cache.get(font, char, 0)[crop, crop].astype(np.float32).reshape(16, k, 16, k).mean(axis=(1, 3)).ravel()
        x -= x.mean()
        norm = np.linalg.norm(x)
        return x / norm if norm > 0 else x

    def similar(char, fonts, other):
        common = [f for f in fonts if _font(f).get_char_index(ord(other))]
        return bool(common) and np.mean([centred(f, char) @ centred(f, other) for f in common]) > SCRIPT_MAX_SIMILARITY

    kept = []
    for start, stop in SCRIPT_BLOCKS:
        for char in map(chr, range(start, stop)):
            fonts = script_fonts(char)
            if not unicodedata.category(char).startswith('L') or len(fonts) < SCRIPT_MIN_FONTS:
                continue
            if not any(similar(char, fonts, other) for other in (*LATIN_CHARS, *GREEK_CHARS, *kept)):
                kept.append(char)
    return tuple(kept)


def script_class_names() -> tuple[str, ...]:
    """ASCII names ('cyrillic_capital_letter_de', 'armenian_small_letter_ben', ...)."""
    return tuple(unicodedata.name(c).lower().replace(' ', '_').replace('-', '_') for c in SCRIPT_CHARS)


def _random_affines(rng: np.random.Generator, n: int, canvas: int, margin: int):
    """Output->glyph maps (matrix [n, 2, 2], offset [n, 2]): scale, rotation, shear, shift."""
    scale = rng.uniform(*_SCALE, size=n)
    theta = np.deg2rad(rng.uniform(-_ROTATION_DEG, _ROTATION_DEG, size=n))
    shear = rng.uniform(-_SHEAR, _SHEAR, size=n)
    shift = rng.uniform(-_SHIFT, _SHIFT, size=(n, 2)) * canvas
    cos, sin = np.cos(theta), np.sin(theta)
    rotation = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    shearing = np.zeros((n, 2, 2))
    shearing[:, 0, 0] = shearing[:, 1, 1] = 1.0
    shearing[:, 1, 0] = shear
    inverse = np.linalg.inv(scale[:, None, None] * rotation @ shearing)
    centre_out = np.full(2, (canvas - 1) / 2)
    offset = centre_out + margin - np.einsum('nij,nj->ni', inverse, centre_out + shift)
    return inverse, offset


def _warp(glyphs: np.ndarray, inverse: np.ndarray, offset: np.ndarray, canvas: int):
    """Bilinear warp of uint8 glyphs [n, G, G] to float [n, canvas, canvas] in [0, 1], zero outside.

    Vectorised over the batch: one scipy affine_transform call per image was about 2x slower.
    """
    n, g = glyphs.shape[:2]
    width = g + 2  # a zero border: coordinates clipped onto it read 0
    flat = np.pad(glyphs, ((0, 0), (1, 1), (1, 1))).astype(np.float32) / 255.0
    rows, cols = np.meshgrid(np.arange(canvas, dtype=np.float32),
                             np.arange(canvas, dtype=np.float32), indexing='ij')
    m = inverse.astype(np.float32)[:, :, :, None]
    b = offset.astype(np.float32)[:, :, None] + 1.0
    src_r = np.clip(m[:, 0, 0] * rows.ravel() + m[:, 0, 1] * cols.ravel() + b[:, 0], 0.0, g + 1.0)
    src_c = np.clip(m[:, 1, 0] * rows.ravel() + m[:, 1, 1] * cols.ravel() + b[:, 1], 0.0, g + 1.0)
    base_r = np.minimum(np.floor(src_r), g)
    base_c = np.minimum(np.floor(src_c), g)
    fr, fc = src_r - base_r, src_c - base_c
    corner = (base_r.astype(np.int64) * width + base_c.astype(np.int64)
              + np.arange(n)[:, None] * width * width).ravel()
    flat = flat.ravel()
    pick = lambda k: flat[corner + k].reshape(fr.shape)
    top = pick(0) * (1 - fc) + pick(1) * fc
    bottom = pick(width) * (1 - fc) + pick(width + 1) * fc
    return (top * (1 - fr) + bottom * fr).reshape(n, canvas, canvas)


def render_glyphs(chars, fonts, per_class: int, image_size: int, seed: int, *,
                  chunk: int = 256, on_chunk=None):
    """`per_class` randomly augmented images of each char: (uint8 [N, S, S, 1], int64 [N]).

    Class-major order; every image has a random font from `fonts`, stroke width, warp (scale,
    rotation, shear, shift), ink/background level and noise. All randomness is drawn up front, so
    the output depends on `seed` only (given the installed matplotlib/FreeType), not on `chunk`.
    `on_chunk(n)` is called after every `n` images rendered (a progress bar's update).
    """
    rng = np.random.default_rng(seed)
    cache = _GlyphCache(image_size)
    n = len(chars) * per_class
    labels = np.repeat(np.arange(len(chars), dtype=np.int64), per_class)
    font_ids = rng.integers(len(fonts), size=n)
    strokes = rng.integers(len(_STROKE_RADII), size=n)
    # Bold faces are thick already: the widest dilation would fill their counters.
    bold = np.array(['Bol' in f or f == 'cmb10.ttf' for f in fonts])
    strokes = np.where(bold[font_ids], np.minimum(strokes, 1), strokes)
    inverse, offset = _random_affines(rng, n, cache.canvas, cache.margin)
    ink = rng.uniform(*_INK, size=(n, 1, 1))
    background = rng.uniform(*_BACKGROUND, size=(n, 1, 1))
    noise = rng.standard_normal((n, image_size, image_size)) * rng.uniform(
        *_NOISE_STD, size=(n, 1, 1))
    images = np.empty((n, image_size, image_size, 1), np.uint8)
    for start in range(0, n, chunk):
        batch = slice(start, start + chunk)
        glyphs = np.stack([cache.get(fonts[f], chars[c], int(k)) for f, c, k in
                           zip(font_ids[batch], labels[batch], strokes[batch])])
        hi = _warp(glyphs, inverse[batch], offset[batch], cache.canvas)
        k = cache.factor
        x = hi.reshape(-1, image_size, k, image_size, k).mean(axis=(2, 4))
        x = background[batch] + x * (ink[batch] - background[batch]) + noise[batch]
        images[batch, ..., 0] = np.round(np.clip(x, 0.0, 1.0) * 255.0)
        if on_chunk is not None:
            on_chunk(len(glyphs))
    return images, labels


DIGITS_COUNT = 1797  # sklearn's load_digits


def digits_splits(image_size: int, seed: int, per_class: dict[str, int | None]):
    """sklearn's 8x8 digits upsampled to S x S, split per class (stratified) into fixed splits.

    `per_class` maps split -> examples per class, None for all the rest (the 'train' pool, so the
    few-shot pool is as large as the data allows). Returns {split: (images, labels)}.
    """
    # Imported here: scikit-learn is slow to import and only this build needs it.
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.stack([
        np.asarray(Image.fromarray(p).resize((image_size, image_size), Image.BILINEAR))
        for p in pixels])[..., None]
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    chosen = {split: [] for split in per_class}
    for c in range(10):
        members = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for split, count in per_class.items():
            stop = len(members) if count is None else start + count
            chosen[split].append(members[start:stop])
            start = stop
    splits = {split: np.sort(np.concatenate(idx)) for split, idx in chosen.items()}
    return {split: (images[idx], labels[idx]) for split, idx in splits.items()}


@dataclasses.dataclass(eq=False)
class BuiltinConfig(tfds.core.BuilderConfig):
    """Image size, and an optional per-class cap on every split (small copies for tests)."""
    image_size: int = 16
    max_per_class: int | None = None


def config_name(image_size: int, max_per_class: int | None) -> str:
    return f'{image_size}px' + ('' if max_per_class is None else f'_max{max_per_class}')


def make_config(image_size: int, max_per_class: int | None = None) -> BuiltinConfig:
    return BuiltinConfig(name=config_name(image_size, max_per_class), image_size=image_size,
                         max_per_class=max_per_class,
                         description=f'{image_size}x{image_size} grayscale' +
                         ('' if max_per_class is None else f', at most {max_per_class} per class'))


class _Builtin(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared TFDS plumbing: features, splits from in-memory arrays, per-class capping."""

    VERSION = tfds.core.Version('1.0.0')
    # tfds 4.9.10 finds a builder's source file (only to look for download checksums beside it)
    # through `importlib_resources`, a backport it installs only on Python < 3.9, so the lookup
    # fails for any builder in a package. Nothing is downloaded here: there are no checksums.
    code_path = None
    BUILDER_CONFIGS = [make_config(16), make_config(32)]
    SEED = 0
    DESCRIPTION = ''
    CLASS_NAMES: tuple[str, ...] = ()
    # split -> images per class (None: the rest, digits only).
    SPLITS: dict[str, int | None] = {}

    def _info(self):
        s = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Tensor(shape=(s, s, 1), dtype=np.uint8),
                'label': tfds.features.ClassLabel(names=self.CLASS_NAMES),
            }),
            supervised_keys=('image', 'label'),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        from tqdm import tqdm
        with tqdm(total=self._images_to_render(), unit='img', leave=False,
                  desc=f'Rendering {self.name}/{self.builder_config.name}') as progress:
            arrays = self._arrays(progress.update)
        return {split: self._generate_examples(*arrays) for split, arrays in arrays.items()}

    # TFDS announces "Downloading and preparing dataset Unknown size (download: Unknown size ...)"
    # and "downloaded and prepared": nothing is downloaded here, so sources.prepare_builtin says
    # what really happens instead.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _generate_examples(self, images, labels):
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {'image': image, 'label': label}

    def _per_class(self, count: int | None) -> int | None:
        cap = self.builder_config.max_per_class
        if cap is None:
            return count
        return cap if count is None else min(count, cap)

    def _images_to_render(self) -> int:
        raise NotImplementedError

    def _arrays(self, on_images) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{split: (images, labels)}; `on_images(n)` after every n images made."""
        raise NotImplementedError


class _Glyphs(_Builtin, skip_registration=True):
    CHARS: tuple[str, ...] = ()
    FONTS: tuple[str, ...] = ()

    def _images_to_render(self) -> int:
        return sum(len(self.CHARS) * self._per_class(count) for count in self.SPLITS.values())

    def _arrays(self, on_images):
        return {split: render_glyphs(self.CHARS, self.FONTS, self._per_class(count),
                                     self.builder_config.image_size, seed=self.SEED + i, on_chunk=on_images)
                for i, (split, count) in enumerate(self.SPLITS.items())}


class GrowjaxLatin(_Glyphs):
    """Source task: 52 Latin letters (A-Z, a-z) in LATIN_FONTS."""

    DESCRIPTION = ('The 52 Latin letters rendered in matplotlib fonts (LATIN_FONTS) with random '
                   'size, shift, rotation, shear, stroke, contrast and noise. Source task.')
    CHARS = LATIN_CHARS
    CLASS_NAMES = LATIN_CHARS
    FONTS = LATIN_FONTS
    SPLITS = {'train': 300, 'test': 50}
    SEED = 1000


class GrowjaxGreek(_Glyphs):
    """Target task: 24 Greek lowercase letters, only in the held-out GREEK_FONTS."""

    DESCRIPTION = ('The 24 Greek lowercase letters rendered only in fonts held out of '
                   'growjax_latin (GREEK_FONTS), same augmentations. Few-shot target task: '
                   'draw subsets of `train` with few_shot_indices.')
    CHARS = GREEK_CHARS
    CLASS_NAMES = greek_class_names()
    FONTS = GREEK_FONTS
    SPLITS = {'train': 50, 'validation': 20, 'test': 50}
    SEED = 2000


class GrowjaxDigits(_Builtin):
    """Second target task: scikit-learn's handwritten digits (real data, ~180 per class)."""

    DESCRIPTION = ("scikit-learn's load_digits (8x8, 0..16) scaled to uint8 and upsampled "
                   'bilinearly; fixed stratified splits.')
    CLASS_NAMES = tuple(str(d) for d in range(10))
    SPLITS = {'test': 50, 'validation': 20, 'train': None}
    SEED = 3000

    def _images_to_render(self) -> int:
        return DIGITS_COUNT

    def _arrays(self, on_images):
        splits = digits_splits(self.builder_config.image_size, self.SEED,
                               {split: self._per_class(n) for split, n in self.SPLITS.items()})
        on_images(DIGITS_COUNT)  # all of them are read and resized, whatever the cap keeps
        return splits


class GrowjaxScripts(_Builtin):
    """Third target task: 131 letters of the Cyrillic, Armenian and Georgian scripts (SCRIPT_CHARS),
    only in the held-out GREEK_FONTS: many classes, far from the Latin source, not nearly solved."""

    DESCRIPTION = ('131 letters of the Cyrillic, Armenian and Georgian scripts that look like no Latin or Greek '
                   'letter (SCRIPT_CHARS), rendered only in the fonts held out of growjax_latin that have them '
                   '(at least 3 of GREEK_FONTS), same augmentations. A harder, larger few-shot target.')
    CLASS_NAMES = script_class_names()
    SPLITS = {'train': 50, 'validation': 10, 'test': 20}
    SEED = 4000

    def _images_to_render(self) -> int:
        return sum(len(SCRIPT_CHARS) * self._per_class(count) for count in self.SPLITS.values())

    def _arrays(self, on_images):
        """Letters that share a set of fonts render together (render_glyphs draws one font per image
        from its list); each split is then put back in class-major order."""
        by_fonts: dict[tuple[str, ...], list[int]] = {}
        for label, char in enumerate(SCRIPT_CHARS):
            by_fonts.setdefault(script_fonts(char), []).append(label)
        arrays = {}
        for i, (split, count) in enumerate(self.SPLITS.items()):
            per_class = self._per_class(count)
            images = np.empty((len(SCRIPT_CHARS) * per_class, self.builder_config.image_size,
                               self.builder_config.image_size, 1), np.uint8)
            for j, (fonts, labels) in enumerate(sorted(by_fonts.items())):
                part, local = render_glyphs([SCRIPT_CHARS[label] for label in labels], fonts, per_class,
                                            self.builder_config.image_size, seed=self.SEED + 100 * i + j,
                                            on_chunk=on_images)
                for k, label in enumerate(labels):
                    images[label * per_class:(label + 1) * per_class] = part[local == k]
            arrays[split] = (images, np.repeat(np.arange(len(SCRIPT_CHARS), dtype=np.int64), per_class))
        return arrays


BUILDERS = {'growjax_latin': GrowjaxLatin, 'growjax_greek': GrowjaxGreek,
            'growjax_digits': GrowjaxDigits, 'growjax_scripts': GrowjaxScripts}
