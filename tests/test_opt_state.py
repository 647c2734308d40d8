"""grow_opt_state: old optimiser slots kept bit for bit, new slots zero, training goes on."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from growjax import GraftError, grow_opt_state
from growjax.grow import flatten, graft


def mlp_params(key, sizes, extra_units=0):
    """A param tree like a widened MLP: layer i, plus a new `fc1_plus` layer when extra_units > 0."""
    keys = jax.random.split(key, len(sizes))
    params = {f'fc{i}': {'kernel': jax.random.normal(k, (a, b)), 'bias': jnp.zeros(b)}
              for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}
    if extra_units:
        params['fc1_plus'] = {'kernel': jnp.ones((sizes[0], extra_units)), 'bias': jnp.ones(extra_units)}
    return params


OPTIMIZERS = {
    'sgd_momentum': lambda: optax.sgd(0.1, momentum=0.9),
    'adam': lambda: optax.adam(1e-3),
    'adamw': lambda: optax.adamw(1e-3, weight_decay=1e-2),
    'chain_clip_decay_sgd_schedule': lambda: optax.chain(
        optax.clip_by_global_norm(1.0), optax.add_decayed_weights(5e-4),
        optax.sgd(optax.piecewise_constant_schedule(0.1, {5: 0.1}), momentum=0.9, nesterov=True)),
    'inject_hyperparams_adam': lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-3),
}


def trained_state(optimizer, params, steps=3):
    state = optimizer.init(params)
    for i in range(steps):
        grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.1 * (i + 1)), params)
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def param_shaped_nodes(state, params):
    """Every sub-tree of an optimiser state with the structure of `params`."""
    structure = jax.tree_util.tree_structure(params)
    found = []

    def visit(node):
        if isinstance(node, dict) and jax.tree_util.tree_structure(node) == structure:
            found.append(node)
        elif isinstance(node, (tuple, list)):
            for child in node:
                visit(child)
        elif isinstance(node, dict):
            for child in node.values():
                visit(child)

    visit(state)
    return found


@pytest.mark.parametrize('name', sorted(OPTIMIZERS))
def test_old_slots_kept_new_slots_zero_and_training_continues(name):
    optimizer = OPTIMIZERS[name]()
    old_params, state = trained_state(optimizer, mlp_params(jax.random.key(0), [4, 6, 3]))
    new_params = graft(old_params, mlp_params(jax.random.key(1), [4, 6, 3], extra_units=5))
    grown_state = grow_opt_state(state, old_params, new_params)

    old_slots = param_shaped_nodes(state, old_params)
    new_slots = param_shaped_nodes(grown_state, new_params)
    assert old_slots and len(old_slots) == len(new_slots)
    for old_slot, new_slot in zip(old_slots, new_slots):
        for path, leaf in flatten(old_slot).items():
            np.testing.assert_array_equal(flatten(new_slot)[path], leaf)  # bit for bit
        np.testing.assert_array_equal(new_slot['fc1_plus']['kernel'], 0.0)
    # Counts and hyperparameters carry over unchanged.
    old_rest = [l for l in jax.tree_util.tree_leaves(state) if l.ndim == 0]
    new_rest = [l for l in jax.tree_util.tree_leaves(grown_state) if l.ndim == 0]
    np.testing.assert_array_equal(old_rest, new_rest)
    # The grown state drives the next update like a state that had always been that shape.
    grads = jax.tree_util.tree_map(jnp.ones_like, new_params)
    updates, _ = optimizer.update(grads, grown_state, new_params)
    assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(new_params)
    assert all(np.all(np.isfinite(u)) for u in jax.tree_util.tree_leaves(updates))


def test_momentum_of_old_leaves_continues_exactly():
    """After growing, old leaves move exactly as they would have without growth."""
    optimizer = optax.sgd(0.1, momentum=0.9)
    old_params, state = trained_state(optimizer, mlp_params(jax.random.key(0), [3, 4, 2]))
    new_params = graft(old_params, mlp_params(jax.random.key(1), [3, 4, 2], extra_units=2))
    grads_old = jax.tree_util.tree_map(jnp.ones_like, old_params)
    grads_new = jax.tree_util.tree_map(jnp.ones_like, new_params)
    updates_old, _ = optimizer.update(grads_old, state, old_params)
    updates_new, _ = optimizer.update(grads_new, grow_opt_state(state, old_params, new_params), new_params)
    for path, update in flatten(updates_old).items():
        np.testing.assert_array_equal(flatten(updates_new)[path], update)


def test_changed_shape_is_an_error():
    optimizer = optax.adam(1e-3)
    old_params, state = trained_state(optimizer, mlp_params(jax.random.key(0), [4, 6, 3]))
    with pytest.raises(GraftError, match=r'fc0/kernel: pretrained shape \(4, 6\) != grown shape \(4, 7\)'):
        grow_opt_state(state, old_params, mlp_params(jax.random.key(0), [4, 7, 3]))


@settings(max_examples=10, deadline=None)
@given(sizes=st.lists(st.integers(1, 6), min_size=2, max_size=4), extra=st.integers(1, 4),
       use_adam=st.booleans())
def test_growth_property(sizes, extra, use_adam):
    optimizer = optax.adam(1e-2) if use_adam else optax.sgd(0.1, momentum=0.9)
    old_params, state = trained_state(optimizer, mlp_params(jax.random.key(0), sizes), steps=1)
    new_params = graft(old_params, mlp_params(jax.random.key(1), sizes, extra_units=extra))
    grown = grow_opt_state(state, old_params, new_params)
    for old_slot, new_slot in zip(param_shaped_nodes(state, old_params), param_shaped_nodes(grown, new_params)):
        assert set(flatten(new_slot)) == set(flatten(new_params))
        for path, leaf in flatten(old_slot).items():
            np.testing.assert_array_equal(flatten(new_slot)[path], leaf)
        assert not np.any(flatten(new_slot)[('fc1_plus', 'bias')])
