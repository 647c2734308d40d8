"""Frozen BatchNorm layers stay frozen in the train step: running averages used and kept as pretrained."""
import jax
import jax.numpy as jnp
import numpy as np

from growjax import Growth, groups, models, steps
from growjax.grow import flatten, grow_params

NUM_CLASSES = 3
WIDTH = 1 / 16


def _state_and_step(regime: str, growth: Growth | None):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
    plain = models.get('resnet18', num_classes=NUM_CLASSES, width=WIDTH)
    pretrained = plain.init(jax.random.key(0), x)
    # Pretrained running statistics unlike any batch's (mean 0.3, variance 2).
    pretrained['batch_stats'] = jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.full_like(s, 0.3 if path[-1].key == 'mean' else 2.0), pretrained['batch_stats'])
    model = models.get('resnet18', num_classes=NUM_CLASSES, width=WIDTH, growth=growth)
    variables = grow_params(pretrained, model, jax.random.key(1), x, reinit='^classifier/')
    labels = groups.param_labels(variables['params'], pretrained['params'], reinit='^classifier/')
    mask = groups.trainable_mask(labels, regime, groups.forward_order(plain, jax.random.key(0), x))
    optimizer = steps.make_optimizer(groups.split(labels, mask)[0], learning_rate=0.1, momentum=0.9,
                                     weight_decay=0.0, new_lr_multiplier=10.0)
    state = steps.create_state(variables, mask, optimizer)
    step = jax.jit(steps.make_train_step(model, optimizer, jax.random.key(2)))
    return model, state, step, {'image': x, 'label': jnp.array([0, 1, 2, 0])}


def test_frozen_trunk_batch_norms_normalise_with_running_averages():
    """Regime 'new' on an ungrown ResNet trains only the classifier: every BatchNorm is frozen, so
    the train step's forward pass is the eval-mode forward pass (same loss) and no statistic moves."""
    model, state, step, batch = _state_and_step('new', None)
    eval_logits = model.apply(state.variables(), batch['image'], train=False)
    eval_loss = steps.cross_entropy(eval_logits, batch['label'])
    new_state, metrics = step(state, batch)
    np.testing.assert_allclose(metrics['loss'], eval_loss, rtol=1e-5)
    for path, value in flatten(state.batch_stats).items():
        np.testing.assert_array_equal(flatten(new_state.batch_stats)[path], value, err_msg=str(path))


def test_only_trainable_batch_norms_update_their_statistics():
    _, state, step, batch = _state_and_step('stage4_new', Growth(widen={'stage3': 2}))
    new_state, _ = step(state, batch)
    before, after = flatten(state.batch_stats), flatten(new_state.batch_stats)
    trainable_modules = {path[:-1] for path in flatten(state.trainable)}
    changed = {path[:-1] for path in before if not np.array_equal(before[path], after[path])}
    assert changed  # stage4's and the new stage3 channels' statistics moved
    assert changed == {module for module in {p[:-1] for p in before} if module in trainable_modules}
    assert any('stage3' in m[0] and m[-1].endswith('_plus') for m in changed)  # new BN in a frozen stage
    assert not any(m[0].startswith(('stem', 'stage1', 'stage2')) for m in changed)


def test_regime_all_still_uses_batch_statistics():
    model, state, step, batch = _state_and_step('all', None)
    eval_loss = steps.cross_entropy(model.apply(state.variables(), batch['image'], train=False), batch['label'])
    new_state, metrics = step(state, batch)
    assert not np.allclose(metrics['loss'], eval_loss, rtol=1e-3)
    before, after = flatten(state.batch_stats), flatten(new_state.batch_stats)
    assert all(not np.array_equal(before[p], after[p]) for p in before if p[-1] == 'mean')
