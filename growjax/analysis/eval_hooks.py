"""The analyses as eval hooks for `growjax.train.train_and_evaluate`: the job calls the hooks it is
given and logs what they return (split 'analysis' in metrics.jsonl), so it knows nothing of them."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from growjax.analysis.measures import ALL_GROUPS, classifier_inputs, group_logits, has_groups, relative_change, unit_scales
from growjax.steps import masked_sums


def hooks() -> list:
    """Eval hooks that log cooperation (on the validation split; none without one: the test split
    is for the final evaluation only), scales and the change since step 0. A run resumed from a
    checkpoint has no step-0 parameters, so it logs no change."""
    reference: dict[str, Any] = {}
    compiled: dict[str, Any] = {}

    def analysis_hook(step, state, context) -> dict[str, float]:
        variables = state.variables()
        if step == 0:  # a copy: the train step donates (and so deletes) the state's buffers
            reference['params'] = jax.tree_util.tree_map(jnp.copy, variables['params'])
        values = {}
        split = context.config.data.val_split
        if split:
            if 'counts' not in compiled:
                compiled['counts'] = jax.jit(lambda v, batch: masked_correct(context.model, v, batch))
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
    logits, state = model.apply(variables, batch['image'], train=False, mutable=['intermediates'])
    if not has_groups(state.get('intermediates', {}), variables['params']):
        return {'count': masked_sums(logits, batch)['count']}
    logits = group_logits(classifier_inputs(state['intermediates']), variables['params']['classifier'])
    sums = {group: masked_sums(value, batch) for group, value in logits.items()}
    return {**{group: s['correct'] for group, s in sums.items()}, 'count': sums[ALL_GROUPS]['count']}
