"""What a run leaves for the researcher: metrics.jsonl, TensorBoard events, a progress bar, a plot."""
from __future__ import annotations

import json
import os
import sys
from typing import Mapping

import jax

METRICS_FILE = 'metrics.jsonl'
CURVES_FILE = 'curves.png'


def read_jsonl(path: str) -> list[dict]:
    """The JSON objects of a JSON-lines file, one per non-blank line ([] when it does not exist yet)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_metrics(workdir: str) -> list[dict]:
    return read_jsonl(os.path.join(workdir, METRICS_FILE))


class MetricsWriter:
    """Appends one JSON object per logged step or evaluation to metrics.jsonl and mirrors scalars to
    TensorBoard. On resume, records after the restored step (written by the interrupted run after
    its last checkpoint) are dropped, so the file reads like one uninterrupted run."""

    def __init__(self, workdir: str, resume_step: int = 0):
        self._enabled = jax.process_index() == 0
        self._path = os.path.join(workdir, METRICS_FILE)
        self._tensorboard = None
        if not self._enabled:
            return
        kept = [r for r in read_metrics(workdir) if r['step'] <= resume_step] if resume_step else []
        with open(self._path, 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in kept)
        from tensorboardX import SummaryWriter  # imported late: only process 0 writes events
        self._tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'))

    def write_config(self, config, **facts) -> None:
        """The first record: the config and `facts` about the run (e.g. dataset=..., num_classes=...)."""
        if self._enabled:
            self._append({'step': 0, 'split': 'config', 'config': json.loads(config.to_json_best_effort()), **facts})

    def write(self, step: int, split: str, values: Mapping[str, float]) -> None:
        if not self._enabled:
            return
        self._append({'step': step, 'split': split, **values})
        for key, value in values.items():
            self._tensorboard.add_scalar(f'{split}/{key}', value, step)
        self._tensorboard.flush()

    def _append(self, record: dict) -> None:
        with open(self._path, 'a') as f:
            f.write(json.dumps(record) + '\n')

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


class ProgressBar:
    """A tqdm bar on stderr with the job's running numbers, e.g. loss and images per second (silent
    when disabled)."""

    def __init__(self, total: int, initial: int, enabled: bool, description: str = ''):
        self._bar = None
        if enabled:
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=initial, desc=description, file=sys.stderr, dynamic_ncols=True)
        self._position = initial

    def update(self, step: int, **values: float) -> None:
        """Moves to `step` and shows `values` (e.g. loss=0.52, img_s=830.0) with 3 significant digits."""
        if self._bar is None:
            return
        self._bar.update(step - self._position)
        self._position = step
        self._bar.set_postfix({key: f'{value:.3g}' for key, value in values.items()})

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def plot_curves(workdir: str, path: str | None = None) -> str:
    """A PNG of the train loss / accuracy and evaluation accuracy curves from metrics.jsonl."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(workdir) if 'loss' in r]  # not the config or 'analysis' records
    path = path or os.path.join(workdir, CURVES_FILE)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for split in dict.fromkeys(r['split'] for r in records):
        rows = [r for r in records if r['split'] == split]
        style = '-' if split == 'train' else 'o-'
        ax_loss.plot([r['step'] for r in rows], [r['loss'] for r in rows], style, label=split)
        ax_acc.plot([r['step'] for r in rows], [r['accuracy'] for r in rows], style, label=split)
    ax_loss.set(xlabel='step', ylabel='loss', title='loss')
    ax_acc.set(xlabel='step', ylabel='accuracy', title='accuracy', ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(os.path.basename(os.path.normpath(workdir)))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_loss_against_flops(workdir: str, path: str | None = None) -> str:
    """A PNG of the validation (and train) loss against cumulative training FLOPs from metrics.jsonl,
    each growth marked where it happened (rows of split 'growth'): compute is the fair axis for a
    model that changes size mid-run."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    path = path or os.path.join(workdir, CURVES_FILE)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for split, style in (('train', '-'), ('validation', 'o-')):
        rows = [r for r in records if r['split'] == split and 'flops' in r]
        if rows:
            ax.plot([r['flops'] for r in rows], [r['loss'] for r in rows], style, label=split, alpha=0.5 if split == 'train' else 1)
    for row in (r for r in records if r['split'] == 'growth'):
        ax.axvline(row['flops'], color='k', linestyle=':', alpha=0.7)
        ax.annotate(f"grow {row['width_before']}x{row['depth_before']} -> {row['width_after']}x{row['depth_after']}",
                    (row['flops'], row['loss_after']), textcoords='offset points', xytext=(4, 8), fontsize=8)
    ax.set(xlabel='training FLOPs (cumulative, XLA cost analysis)', ylabel='loss (nats per byte)',
           title=os.path.basename(os.path.normpath(workdir)))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
