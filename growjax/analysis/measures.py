"""The paper's analyses as pure functions of a model's variables and a batch (jittable, vmappable:
the paper experiment computes them inside its vectorised evaluation). See growjax.analysis."""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from growjax.grow import flatten

GROUP_PREFIX = 'classifier_in_'
ALL_GROUPS = 'all'


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


def has_groups(intermediates: Mapping, params: Mapping) -> bool:
    """Whether the model sows its classifier's unit groups (growjax's fc heads do; a ViT does not)."""
    return 'classifier' in params and bool(classifier_inputs(intermediates))


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
    values = {'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels), 'loss': jnp.mean(losses), **unit_scales(params)}
    if has_groups(state.get('intermediates', {}), params):
        values.update(cooperation_accuracies(state['intermediates'], params['classifier'], labels))
    if reference_params is not None:
        values.update(relative_change(params, reference_params))
    return values


def is_new_group(group: str) -> bool:
    """Groups the growth added: widened units ('<layer>_plus') and the new layer 'fc_a'."""
    return group.endswith('_plus') or group == 'fc_a'


def group_label(group: str) -> str:
    if group == ALL_GROUPS:
        return 'all units'
    return f'{group} ({"new" if is_new_group(group) else "old"})'
