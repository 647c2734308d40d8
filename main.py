"""Grow a pretrained network and fine-tune it: `python main.py --config=configs/wide.py --workdir=DIR`.

Thin on purpose: flags -> config -> growjax.train.train_and_evaluate. Every failure a user can
cause (a bad config value, a missing dataset or weights file) ends in one line naming the culprit.
"""
import logging
import re
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file, e.g. configs/wide.py[:preset].',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics.jsonl, summary.json and plots go '
                    '(rerunning with the same workdir resumes). Default: workdirs/<config name>.')


def default_workdir(config_path: str) -> str:
    name = config_path.split(':')[0].rstrip('/').split('/')[-1].removesuffix('.py')
    preset = config_path.partition(':')[2]
    return f'workdirs/{name}' + (f'_{preset}' if preset else '')


def one_line(err: BaseException) -> str:
    """The message of `err` on one line; of a wrapped traceback, only its final line."""
    text = str(err).replace('\\n', '\n').replace("\\'", "'")
    if 'Traceback (most recent call last)' in text:
        text = text.strip().splitlines()[-1]
    text = ' '.join(text.split())
    if len(text) > 1 and text[0] == text[-1] and text[0] in '\'"':  # a KeyError's message comes quoted
        text = text[1:-1]
    return text


def parse_flags(argv):
    """absl's parser, with config mistakes (unknown key, wrong type, bad config file) as one line."""
    try:
        argv = FLAGS(argv)
        FLAGS.config.keys()  # ml_collections reports a file it failed to load lazily: fail here
        return argv
    except flags.Error as err:
        message = one_line(err)
    except (AttributeError, KeyError) as err:  # ml_collections: an override of a key the config lacks
        key = re.search(r"'(\w+)'", str(err).replace("\\'", "'"))
        hint = re.search(r'Did you mean "(\w+)"', str(err))
        message = (f"unknown config key '{key.group(1) if key else err}'"
                   + (f' (did you mean {hint.group(1)!r}?)' if hint else ''))
    except OSError as err:  # the config file is missing or unreadable
        message = f'cannot load --config={FLAGS["config"].config_filename}: ' + one_line(err.__cause__ or err)
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


def main(argv):
    del argv
    from growjax import analysis, train  # after flag parsing: JAX starts only for a real run
    from growjax.errors import UserError

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and tfds log every file at INFO
    logging.getLogger('growjax').setLevel(logging.INFO)
    workdir = FLAGS.workdir or default_workdir(FLAGS['config'].config_filename)
    try:
        hooks = analysis.hooks() if FLAGS.config.train.get('analysis') else ()
        summary = train.train_and_evaluate(FLAGS.config, workdir, eval_hooks=hooks)
    except UserError as err:
        print(f'error: {one_line(err)}', file=sys.stderr)
        return 2
    final = ', '.join(f'{key} {summary[key]:.4f}' for key in ('accuracy', 'validation_loss', 'validation_bits_per_byte')
                      if key in summary)
    print(f'{workdir}: final {final} (summary.json, metrics.jsonl, curves.png in {workdir})')
    return 0


if __name__ == '__main__':
    flags.mark_flag_as_required('config')
    app.run(main, flags_parser=parse_flags)
