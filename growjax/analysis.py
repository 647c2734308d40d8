"""The paper's analyses of a grown network, as pure functions, run hooks and a command over a workdir.

- Cooperation of old and new units (paper Fig. 6): the accuracy of the classifier reading only one
  unit group (its share of the logits plus the bias), and all of them. Groups are what the head
  sows as 'intermediates' `classifier_in_<group>` (after NormScale), e.g. 'fc7' (old) and
  'fc7_plus' (new) for WA.
- Learned scales: the mean NormScale gamma of every group (`<layer>_norm/scale_<i>`; i = 0 is the
  old group), which says how much weight each group gets where they meet.
- Parameter change: ||theta - theta_0|| / ||theta_0|| per top-level layer, how far fine-tuning
  moved each layer from where it started.

The functions are jittable and vmappable (the paper experiment computes them inside its vectorised
eval); `hooks()` gives `growjax.train.train_and_evaluate` eval hooks that log them as split
'analysis' in metrics.jsonl (`--config.train.analysis=True`); and
`python -m growjax.analysis --workdir=DIR` plots them for a finished run.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from growjax.grow import flatten

GROUP_PREFIX = 'classifier_in_'
ALL_GROUPS = 'all'
FIGURES = ('analysis_cooperation.png', 'analysis_scales.png', 'analysis_change.png')


# ---------------------------------------------------------------------------------------------
# Pure functions


def classifier_inputs(intermediates: Mapping) -> dict[str, jax.Array]:
    """{group: what the classifier reads of it} from the 'intermediates' collection of a head."""
    found = {}
    for key, value in intermediates.items():
        if key.startswith(GROUP_PREFIX):
            found[key[len(GROUP_PREFIX):]] = value[0] if isinstance(value, tuple) else value  # sow keeps a tuple
    return found


def group_logits(inputs: Mapping[str, jax.Array], classifier: Mapping) -> dict[str, jax.Array]:
    """The logits each group alone produces (its kernel's share plus the bias), and 'all'.

    The classifier is a MultiInputDense: the first (old) group uses `kernel`, every other group g
    its `from_g/kernel`, so the full logits are the sum of the shares plus the bias.
    """
    shares = {group: array @ (classifier[f'from_{group}']['kernel'] if f'from_{group}' in classifier
                              else classifier['kernel'])
              for group, array in inputs.items()}
    bias = classifier['bias']
    logits = {group: share + bias for group, share in shares.items()}
    logits[ALL_GROUPS] = sum(shares.values()) + bias
    return logits


def cooperation_accuracies(intermediates: Mapping, classifier: Mapping, labels: jax.Array) -> dict[str, jax.Array]:
    """{'cooperation/<group>': accuracy reading only that group, 'cooperation/all': reading all}."""
    logits = group_logits(classifier_inputs(intermediates), classifier)
    return {f'cooperation/{group}': jnp.mean(jnp.argmax(value, -1) == labels) for group, value in logits.items()}


def unit_scales(params: Mapping) -> dict[str, jax.Array]:
    """{'scale/<layer>_norm/<i>': mean learned scale of group i} for every NormScale in `params`."""
    return {f'scale/{"/".join(path[:-1])}/{path[-1][len("scale_"):]}': jnp.mean(leaf)
            for path, leaf in flatten(params).items() if path[-1].startswith('scale_')}


def relative_change(params: Mapping, reference: Mapping) -> dict[str, jax.Array]:
    """{'change/<layer>': ||theta - theta_0|| / ||theta_0||} over the layer's leaves present in `reference`.

    Leaves that are absent from either tree or shaped differently (grown or re-initialised parts, e.g.
    a classifier for another number of classes) are left out; a layer whose reference is all zero
    gets its absolute change.
    """
    params_flat = flatten(params)
    squared: dict[str, tuple[jax.Array, jax.Array]] = {}
    for path, before in flatten(reference).items():
        if path not in params_flat or jnp.shape(params_flat[path]) != jnp.shape(before):
            continue
        diff, base = squared.get(path[0], (0.0, 0.0))
        squared[path[0]] = (diff + jnp.sum(jnp.square(params_flat[path] - before)), base + jnp.sum(jnp.square(before)))
    return {f'change/{layer}': jnp.sqrt(diff) / jnp.where(base > 0, jnp.sqrt(base), 1.0)
            for layer, (diff, base) in squared.items()}


def analyse(model, variables: Mapping, reference_params: Mapping | None, images: jax.Array,
            labels: jax.Array) -> dict[str, jax.Array]:
    """Accuracy, loss and all analyses of `variables` on one batch of examples (jittable)."""
    logits, state = model.apply(variables, images, train=False, mutable=['intermediates'])
    params = variables['params']
    losses = -jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), labels[:, None], -1)
    values = {'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels), 'loss': jnp.mean(losses),
              **cooperation_accuracies(state['intermediates'], params['classifier'], labels),
              **unit_scales(params)}
    if reference_params is not None:
        values.update(relative_change(params, reference_params))
    return values


# ---------------------------------------------------------------------------------------------
# Hooks for growjax.train.train_and_evaluate


def hooks() -> list:
    """Eval hooks that log cooperation (on the validation split, else the eval split), scales and
    the change since step 0. A run resumed from a checkpoint has no step-0 parameters, so it logs
    no change."""
    reference: dict[str, Any] = {}
    compiled: dict[str, Any] = {}

    def analysis_hook(step, state, context) -> dict[str, float]:
        variables = state.variables()
        if step == 0:  # a copy: the train step donates (and so deletes) the state's buffers
            reference['params'] = jax.tree_util.tree_map(jnp.copy, variables['params'])
        if 'counts' not in compiled:
            compiled['counts'] = jax.jit(lambda v, batch: masked_correct(context.model, v, batch))
        split = context.config.data.val_split or context.config.data.eval_split
        totals: dict[str, float] = {}
        for batch in context.eval_batches(split):
            for key, value in jax.device_get(compiled['counts'](variables, batch)).items():
                totals[key] = totals.get(key, 0.0) + float(value)
        count = max(totals.pop('count'), 1.0)
        values = {f'cooperation/{group}': correct / count for group, correct in totals.items()}
        summaries = unit_scales(variables['params'])
        if 'params' in reference:
            summaries.update(relative_change(variables['params'], reference['params']))
        values.update({key: float(value) for key, value in jax.device_get(summaries).items()})
        return values

    return [analysis_hook]


def masked_correct(model, variables: Mapping, batch: Mapping) -> dict[str, jax.Array]:
    """{group: correct predictions reading only that group, 'all': reading all, 'count': examples}
    summed over a padded eval batch's real examples (mask 1)."""
    _, state = model.apply(variables, batch['image'], train=False, mutable=['intermediates'])
    logits = group_logits(classifier_inputs(state['intermediates']), variables['params']['classifier'])
    mask = batch.get('mask', jnp.ones(batch['label'].shape, jnp.float32))
    sums = {group: jnp.sum((jnp.argmax(value, -1) == batch['label']) * mask) for group, value in logits.items()}
    return {**sums, 'count': jnp.sum(mask)}


# ---------------------------------------------------------------------------------------------
# A finished workdir: figures from its 'analysis' records, or from its export


def is_new_group(group: str) -> bool:
    """Groups the growth added: widened units ('<layer>_plus') and the new layer 'fc_a'."""
    return group.endswith('_plus') or group == 'fc_a'


def group_label(group: str) -> str:
    if group == ALL_GROUPS:
        return 'all units'
    return f'{group} ({"new" if is_new_group(group) else "old"})'


def records_from_workdir(workdir: str) -> list[dict]:
    """The run's 'analysis' records (train.analysis=True), else one record computed from its export."""
    from growjax.outputs import read_metrics  # late: keeps the pure functions free of I/O imports
    records = read_metrics(workdir)
    logged = [r for r in records if r.get('split') == 'analysis']
    if logged:
        return logged
    configs = [r for r in records if r.get('split') == 'config']
    if not configs:
        raise FileNotFoundError(f'{workdir} has no metrics.jsonl with a config record: is it a growjax workdir?')
    return [analyse_export(workdir, configs[0]['config'])]


def analyse_export(workdir: str, config_dict: Mapping) -> dict:
    """Analyses of a finished run's exported variables on its validation (else eval) split; the
    change is measured from the pretrained variables it grew from."""
    import ml_collections
    from growjax import checkpoint, train
    config = ml_collections.ConfigDict(dict(config_dict))
    variables, description = checkpoint.load_export(workdir)
    model = train.build_model(config, description['num_classes'])
    pretrained = train.load_pretrained(config)
    split = config.data.val_split or config.data.eval_split
    images, labels = load_split(config, split)
    values = jax.jit(lambda v, r, x, y: analyse(model, v, r, x, y))(
        variables, None if pretrained is None else pretrained['params'], images, labels)
    with open(os.path.join(workdir, 'summary.json')) as f:  # an export is written after the final summary
        step = int(json.load(f)['step'])
    return {'step': step, 'split': 'analysis', **{k: float(v) for k, v in jax.device_get(values).items()}}


def load_split(config, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All examples of a split as the eval pipeline serves them (resized, normalised), in memory."""
    from growjax import data
    d = config.data
    source = data.load_source(d.name, split, d.data_dir, d.image_size)
    images, labels = [], []
    for batch in data.make_eval_iterator(source, global_batch_size=256, image_size=d.image_size, mean=d.mean,
                                         std=d.std):
        real = batch['mask'] > 0
        images.append(batch['image'][real])
        labels.append(batch['label'][real])
    return np.concatenate(images), np.concatenate(labels)


def plot_records(records: list[dict], out_dir: str, title: str = '') -> list[str]:
    """Three PNGs over training steps: cooperation accuracies, learned scales, parameter change."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    panels = (('cooperation/', 'classifier accuracy reading only ...', 'accuracy'),
              ('scale/', 'mean learned scale (NormScale gamma)', 'gamma'),
              ('change/', 'relative change ||w - w0|| / ||w0||', 'relative change'))
    steps = [r['step'] for r in records]
    paths = []
    for (prefix, panel_title, ylabel), name in zip(panels, FIGURES):
        fig, ax = plt.subplots(figsize=(6, 3.8))
        keys = sorted({k for r in records for k in r if k.startswith(prefix)})
        for key in keys:
            label = key[len(prefix):]
            if prefix == 'cooperation/':
                label = group_label(label)
            ax.plot(steps, [r.get(key, math.nan) for r in records], 'o-', label=label)
        if not keys:
            ax.text(0.5, 0.5, 'nothing to show (no grown groups / no step-0 reference)', ha='center',
                    transform=ax.transAxes)
        ax.set(xlabel='step', ylabel=ylabel, title=f'{title}: {panel_title}' if title else panel_title)
        ax.grid(alpha=0.3)
        if keys:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str]) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog='python -m growjax.analysis', description=__doc__.split('\n')[0])
    parser.add_argument('--workdir', required=True, help='a finished (or running) main.py workdir')
    args = parser.parse_args(argv)
    from growjax.errors import UserError
    try:
        records = records_from_workdir(args.workdir)
    except (FileNotFoundError, UserError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    with open(os.path.join(args.workdir, 'analysis.json'), 'w') as f:
        json.dump(records, f, indent=1)
    for path in plot_records(records, args.workdir, os.path.basename(os.path.normpath(args.workdir))):
        print(path)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
