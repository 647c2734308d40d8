"""Data for growjax: TFDS array_record sources, built-in offline datasets, grain pipelines.

Built-in datasets (rendered Latin letters as the source task, Greek letters in held-out fonts and
scikit-learn digits as targets) are generated locally and need neither downloads nor TensorFlow;
see `growjax.data.builtin` and docs/design.md ("Built-in offline data"). Any prepared TFDS dataset is
read by name (array_record by random access with grain; tfrecord with tf.data, growjax.data.tfdata),
and 'image_folder:ROOT' reads a user's own ROOT/<split>/<class>/<image> (growjax.data.folder).
"""

from growjax.data.builtin import GREEK_CHARS
from growjax.data.builtin import GREEK_FONTS
from growjax.data.builtin import LATIN_CHARS
from growjax.data.builtin import LATIN_FONTS
from growjax.data.builtin import render_glyphs
from growjax.data.pipeline import device_prefetch
from growjax.data.pipeline import DevicePrefetchIterator
from growjax.data.pipeline import make_eval_iterator
from growjax.data.pipeline import make_train_iterator
from growjax.data.pipeline import split_arrays
from growjax.data.sources import BUILTIN
from growjax.data.sources import dataset_info
from growjax.data.sources import DatasetMeta
from growjax.data.sources import few_shot_indices
from growjax.data.sources import load_source
from growjax.data.sources import prepare_builtin
from growjax.data.sources import read_labels
from growjax.data.tfdata import StreamingSplit
from growjax.errors import DataError
