"""growjax.nnx_surgery on Flax NNX models written the way NNX users write them (nnx.Linear, nnx.Conv,
nnx.BatchNorm, nnx.MultiHeadAttention, nnx.List, nnx.Rngs), and growjax's parameter-tree functions
on NNX state."""
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import growjax
from growjax import nnx_surgery, surgery
from growjax.grow import flatten
from growjax.nn import lecun_normal_flat

# nnx's default kernel init (lecun normal), drawn flat: XLA:CPU compiles jax's multi-axis draws for
# seconds per shape (growjax/nn.py), which would make these tests slow. Same distribution.
INIT = lecun_normal_flat

# ---------------------------------------------------------------------------------------------
# Models as NNX users write them


class MlpBlock(nnx.Module):
    def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(width, hidden, kernel_init=INIT, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, width, kernel_init=INIT, rngs=rngs)

    def __call__(self, x):
        return x + self.fc2(nnx.relu(self.fc1(x)))


class MLP(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs, width: int = 8, classes: int = 5):
        self.embed = nnx.Linear(6, width, kernel_init=INIT, rngs=rngs)
        self.blocks = nnx.List([MlpBlock(width, 16, rngs=rngs) for _ in range(2)])
        self.head = nnx.Linear(width, classes, kernel_init=INIT, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.embed(x))
        for block in self.blocks:
            x = block(x)
        return self.head(nnx.relu(x))


class CNN(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 8, (3, 3), kernel_init=INIT, rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, rngs=rngs)
        self.conv2 = nnx.Conv(8, 12, (3, 3), strides=2, kernel_init=INIT, rngs=rngs)
        self.head = nnx.Linear(12, 5, kernel_init=INIT, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.conv2(x))
        return self.head(x.mean(axis=(1, 2)))


class Encoder(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.embed = nnx.Linear(4, 8, kernel_init=INIT, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(2, 8, decode=False, kernel_init=INIT, rngs=rngs)
        self.head = nnx.Linear(8, 3, kernel_init=INIT, rngs=rngs)

    def __call__(self, x):
        h = self.embed(x)
        h = h + self.attn(h, mask=nnx.make_causal_mask(jnp.ones(x.shape[:2])))
        return self.head(h.mean(axis=1))


X = {'mlp': jax.random.normal(jax.random.key(0), (4, 6)),
     'cnn': jax.random.normal(jax.random.key(0), (4, 8, 8, 1)),
     'encoder': jax.random.normal(jax.random.key(0), (3, 5, 4))}
MODELS = {'mlp': MLP, 'cnn': CNN, 'encoder': Encoder}


def pretrained(name):
    model = MODELS[name](rngs=nnx.Rngs(0))
    model.eval()  # BatchNorm on its running averages: a deterministic function to compare
    return model


@nnx.jit
def run(model, x):
    return model(x)


def flat_state(model, *filters):
    return flatten(nnx.to_pure_dict(nnx.state(model, *filters)))


def small_block(rngs):
    return nnx.Sequential(nnx.Linear(8, 4, kernel_init=INIT, rngs=rngs), nnx.relu,
                          nnx.Linear(4, 8, kernel_init=INIT, rngs=rngs))


# name -> (model, operations, the new Param and BatchStat paths ('/'-joined))
CASES = {
    'widen_mlp': ('mlp', [surgery.Widen(r'blocks/\d+/fc1', units=4, into=r'blocks/\d+/fc2')], {
        f'blocks/{i}/{leaf}' for i in (0, 1) for leaf in (
            'fc1/plus/kernel', 'fc1/plus/bias', 'fc2/from_fc1_plus/kernel', 'fc2/norm/scale_0', 'fc2/norm/scale_1')}),
    'widen_cnn_through_batchnorm': ('cnn', [surgery.Widen('conv1', units=4, into='conv2', through='bn1')], {
        'conv1/plus/kernel', 'conv1/plus/bias', 'bn1/plus/scale', 'bn1/plus/bias', 'bn1/plus/mean', 'bn1/plus/var',
        'conv2/from_conv1_plus/kernel', 'conv2/norm/scale_0', 'conv2/norm/scale_1'}),
    'lora': ('mlp', [surgery.LoRA(r'blocks/\d+/fc\d', rank=2)], {
        f'blocks/{i}/fc{j}/lora_{ab}' for i in (0, 1) for j in (1, 2) for ab in 'ab'}),
    'insert_after_block': ('mlp', [surgery.InsertAfter('blocks/1', block=small_block)], {
        f'blocks/1/inserted/layers/{i}/{leaf}' for i in (0, 2) for leaf in ('kernel', 'bias')}),
    'insert_after_copy': ('mlp', [surgery.InsertAfter('blocks/0', residual=False, zero='fc2')], {
        f'blocks/0/inserted/fc{j}/{leaf}' for j in (1, 2) for leaf in ('kernel', 'bias')}),
    'deepen': ('mlp', [surgery.Deepen('head', units=8)], {'head/fc_a/kernel', 'head/fc_a/bias'}),
    'add_heads': ('encoder', [surgery.AddHeads('attn', heads=2)], {
        *(f'attn/extra_heads/{p}/{leaf}' for p in ('query', 'key', 'value') for leaf in ('kernel', 'bias')),
        'attn/out/from_extra_heads/kernel', 'attn/out/norm/scale_0', 'attn/out/norm/scale_1'}),
}
CHANGE_THE_FUNCTION = {'widen_mlp', 'widen_cnn_through_batchnorm', 'add_heads'}  # NormScale rescales old units


def joined(paths):
    return {'/'.join(str(part) for part in path) for path in paths}


def assert_pretrained_variables_kept(before: dict, grown: nnx.Module):
    after = flat_state(grown)
    for path, value in before.items():
        assert path in after, path
        assert after[path].dtype == value.dtype
        np.testing.assert_array_equal(after[path], value, err_msg=str(path))


# ---------------------------------------------------------------------------------------------
# Every operation: paths, values, the user's module, the function


@pytest.mark.parametrize('case', CASES)
def test_every_pretrained_variable_keeps_its_path_and_value(case):
    name, ops, expected_new = CASES[case]
    model = pretrained(name)
    before = flat_state(model)
    types_before = {path: type(node) for path, node in nnx.iter_graph(model)}
    grown = nnx_surgery.grow(model, ops, rngs=nnx.Rngs(1), sample=(X[name],))
    assert_pretrained_variables_kept(before, grown)
    assert joined(set(flat_state(grown)) - set(before)) == expected_new
    # The user's pretrained module is not touched: same values, same classes, no new attributes.
    assert flat_state(model).keys() == before.keys()
    for path, value in flat_state(model).items():
        np.testing.assert_array_equal(value, before[path])
    assert {path: type(node) for path, node in nnx.iter_graph(model)} == types_before
    assert isinstance(grown, MODELS[name]) and grown is not model
    assert run(grown, X[name]).shape == run(model, X[name]).shape


@pytest.mark.parametrize('case', CASES)
def test_each_operation_preserves_the_function_when_asked(case):
    name, ops, _ = CASES[case]
    model = pretrained(name)
    expected = run(model, X[name])
    preserving = nnx_surgery.grow(model, ops, rngs=nnx.Rngs(1), preserve_function=True, sample=(X[name],))
    np.testing.assert_allclose(run(preserving, X[name]), expected, atol=1e-5)
    if case in CHANGE_THE_FUNCTION:  # without preserving, NormScale and the new units change it
        free = nnx_surgery.grow(model, ops, rngs=nnx.Rngs(1))
        assert not np.allclose(run(free, X[name]), expected, atol=1e-3)


def test_in_place_grows_the_module_itself():
    model = pretrained('mlp')
    before = flat_state(model)
    grown = nnx_surgery.grow(model, surgery.LoRA('head', rank=2), rngs=nnx.Rngs(1), in_place=True)
    assert grown is model and 'lora_a' in vars(model.head) and isinstance(model.head, nnx.Linear)
    assert_pretrained_variables_kept(before, model)


def test_inserted_blocks_start_as_the_identity_with_their_last_layer_at_zero():
    model = pretrained('mlp')
    grown = nnx_surgery.grow(model, [surgery.InsertAfter('blocks/1', block=small_block),  # residual: y + block(y)
                                     surgery.InsertAfter('blocks/0', residual=False, zero='fc2')],  # its own residual
                             rngs=nnx.Rngs(1), sample=(X['mlp'],))
    block = nnx.to_pure_dict(nnx.state(grown.blocks[1].inserted, nnx.Param))['layers']
    assert not np.any(block[2]['kernel']) and np.any(block[0]['kernel'])
    copy = nnx.to_pure_dict(nnx.state(grown.blocks[0].inserted))
    np.testing.assert_array_equal(copy['fc1']['kernel'], grown.blocks[0].fc1.kernel[...])  # a copy, as pretrained
    assert not np.any(copy['fc2']['kernel']) and not np.any(copy['fc2']['bias'])  # its residual branch ends at zero
    assert type(grown.blocks[0].inserted) is MlpBlock  # the user's class, without growjax's parts
    np.testing.assert_allclose(grown(X['mlp']), model(X['mlp']), atol=1e-5)  # eagerly, outside jit, too


def test_deepen_to_another_width_reinitialises_the_consumer_only_when_asked():
    model = pretrained('mlp')
    with pytest.raises(surgery.SurgeryError, match=r"head reads 8 features and would read 12.*reinit='\^head/'"):
        nnx_surgery.grow(model, surgery.Deepen('head', units=12), rngs=nnx.Rngs(1))
    grown = nnx_surgery.grow(model, surgery.Deepen('head', units=12), rngs=nnx.Rngs(1), reinit='^head/')
    assert grown.head.kernel[...].shape == (12, 5) and grown.head.fc_a.kernel[...].shape == (8, 12)
    assert run(grown, X['mlp']).shape == (4, 5)
    labels = growjax.param_labels(nnx.state(grown, nnx.Param), nnx.state(model, nnx.Param), reinit='^head/')
    assert labels['head']['kernel'] == labels['head']['bias'] == 'new'
    assert labels['embed']['kernel'] == 'pretrained'


# ---------------------------------------------------------------------------------------------
# NormScale


def test_norm_scale_where_old_and_new_units_meet_is_the_papers():
    model = pretrained('mlp')
    grown = nnx_surgery.grow(model, surgery.Widen('blocks/0/fc1', units=4, into='blocks/0/fc2', scale_init=10.0),
                             rngs=nnx.Rngs(1))
    block = grown.blocks[0]
    scales = nnx.to_pure_dict(nnx.state(block.fc2.norm))
    assert scales['scale_0'].shape == (16,) and scales['scale_1'].shape == (4,)  # [old units, new units]
    np.testing.assert_array_equal(scales['scale_0'], 10.0)
    np.testing.assert_array_equal(scales['scale_1'], 10.0)
    # The block's output by hand: each group L2-normalised per example, times its scales.
    x = nnx.relu(grown.embed(X['mlp']))
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(block)))
    old = np.maximum(x @ p['fc1']['kernel'] + p['fc1']['bias'], 0)
    new = np.maximum(x @ p['fc1']['plus']['kernel'] + p['fc1']['plus']['bias'], 0)
    unit = lambda g: g / np.linalg.norm(g, axis=-1, keepdims=True)
    expected = x + (unit(old) * p['fc2']['norm']['scale_0']) @ p['fc2']['kernel'] + p['fc2']['bias'] + \
        (unit(new) * p['fc2']['norm']['scale_1']) @ p['fc2']['from_fc1_plus']['kernel']
    np.testing.assert_allclose(block(x), expected, rtol=2e-4, atol=2e-4)


def test_nnx_norm_scale_computes_what_the_linen_one_does():
    x = jax.random.normal(jax.random.key(3), (2, 3, 7)).at[0, 0, 4:].set(0.0)  # an all-zero group too
    ours = nnx_surgery.NormScale([4, 3], scale_init=2.5)
    ours.scale_1[...] = jnp.arange(3.0)
    linen = growjax.NormScale((4, 3), scale_init=2.5)
    params = {'params': {'scale_0': ours.scale_0[...], 'scale_1': ours.scale_1[...]}}
    np.testing.assert_allclose(ours(x), linen.apply(params, x), rtol=1e-6)
    graphdef = nnx.graphdef(ours)
    grads = jax.jit(jax.grad(lambda s: nnx.merge(graphdef, s)(x).sum()))(nnx.state(ours))
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
    assert ours(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


# ---------------------------------------------------------------------------------------------
# Training after growth


def loss_fn(model, x):
    return jnp.mean(jnp.square(model(x) - 1.0))


@pytest.mark.parametrize('case', ['widen_mlp', 'widen_cnn_through_batchnorm', 'add_heads', 'lora', 'deepen'])
def test_every_new_parameter_gets_a_gradient(case):
    name, ops, expected_new = CASES[case]
    grown = nnx_surgery.grow(pretrained(name), ops, rngs=nnx.Rngs(1))
    grown.train()
    if case in ('lora', 'deepen'):  # B = 0 / a zero-fan-in start: give the adapters something to pass on
        for variable in jax.tree_util.tree_leaves(nnx.state(grown, nnx.Param), is_leaf=lambda v: isinstance(
                v, nnx.Variable)):
            if not np.any(variable[...]):
                variable[...] = jnp.full_like(variable[...], 0.1)
    grads = nnx.to_pure_dict(nnx.jit(nnx.grad(loss_fn))(grown, X[name]))  # train mode: BatchNorm statistics update
    for path in expected_new:
        if '/mean' in path or '/var' in path:  # BatchStats are not parameters
            continue
        leaf = flatten(grads)[tuple(int(p) if p.isdigit() else p for p in path.split('/'))]
        assert np.any(leaf != 0), path


def test_a_training_step_with_nnx_optimizer_and_growth_optimizer_trains_only_new_leaves():
    model = pretrained('mlp')
    grown = nnx_surgery.grow(model, CASES['widen_mlp'][1], rngs=nnx.Rngs(1))
    groups = growjax.param_groups(grown, nnx.state(model, nnx.Param), 'new')
    assert groups.layer_order == ('embed', 'blocks', 'head')  # the order __init__ assigns them
    tx = growjax.growth_optimizer(optax.sgd(1e-3, momentum=0.9), groups)
    optimizer = nnx.Optimizer(grown, nnx_surgery.on_pure_dicts(tx), wrt=nnx.Param)
    before = flat_state(grown, nnx.Param)

    @nnx.jit
    def step(model, optimizer, x):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(grown, optimizer, X['mlp'])) for _ in range(3)]
    assert losses[-1] < losses[0]
    after = flat_state(grown, nnx.Param)
    new = {path for path in before if 'plus' in path[-2] or path[-2] == 'norm' or path[-2].startswith('from_')}
    assert new and all(np.any(after[p] != before[p]) for p in new)
    assert all(np.array_equal(after[p], before[p]) for p in before if p not in new)  # regime 'new': frozen


# ---------------------------------------------------------------------------------------------
# Labels and optimiser state over NNX state


def test_param_labels_on_nnx_state_marks_exactly_the_new_paths():
    name, ops, expected_new = CASES['widen_mlp']
    model = pretrained(name)
    grown = nnx_surgery.grow(model, ops, rngs=nnx.Rngs(1))
    for as_given in (lambda s: s, nnx.to_pure_dict):  # an nnx.State or its pure dict
        labels = growjax.param_labels(as_given(nnx.state(grown, nnx.Param)), as_given(nnx.state(model, nnx.Param)))
        assert isinstance(labels, dict)
        flat = flatten(labels)
        assert joined(p for p, label in flat.items() if label == 'new') == expected_new
        assert joined(p for p, label in flat.items() if label == 'pretrained') == joined(flat_state(model, nnx.Param))
    assert joined(growjax.new_paths(nnx.state(grown, nnx.Param), nnx.state(model, nnx.Param))) == expected_new


def test_grow_opt_state_with_adamw_over_pure_dicts():
    model = pretrained('mlp')
    tx = optax.adamw(1e-2, weight_decay=1e-3)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    old = nnx.to_pure_dict(params)
    state = tx.init(old)
    grads = jax.jit(jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), X['mlp'])))(old)
    updates, state = tx.update(grads, state, old)
    old = optax.apply_updates(old, updates)
    nnx.replace_by_pure_dict(params, old)
    nnx.update(model, params)

    grown = nnx_surgery.grow(model, CASES['widen_mlp'][1], rngs=nnx.Rngs(1))
    new = nnx.state(grown, nnx.Param)  # an nnx.State: read as its pure dict
    grown_state = growjax.grow_opt_state(state, old, new)
    adam = grown_state[0]
    assert int(adam.count) == 1
    for slot, old_slot in ((adam.mu, state[0].mu), (adam.nu, state[0].nu)):
        flat, old_flat = flatten(slot), flatten(old_slot)
        for path, value in flat.items():
            if path in old_flat:
                np.testing.assert_array_equal(value, old_flat[path])
            else:
                assert not np.any(value), path
        assert joined(set(flat) - set(old_flat)) == CASES['widen_mlp'][2]
    # Training goes on with the grown state.
    pure = nnx.to_pure_dict(new)
    graphdef, _, rest = nnx.split(grown, nnx.Param, ...)
    grads = jax.jit(jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), X['mlp'])))(pure)
    updates, _ = tx.update(grads, grown_state, pure)
    assert np.any(flatten(updates)[('blocks', 0, 'fc1', 'plus', 'kernel')])


def test_grow_opt_state_of_an_nnx_optimizer():
    model = pretrained('mlp')
    tx = nnx_surgery.on_pure_dicts(optax.adam(1e-2))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    optimizer.update(model, nnx.jit(nnx.grad(loss_fn))(model, X['mlp']))
    grown = nnx_surgery.grow(model, CASES['lora'][1], rngs=nnx.Rngs(1))
    state = growjax.grow_opt_state(nnx.as_pure(optimizer.opt_state), nnx.state(model, nnx.Param),
                                   nnx.state(grown, nnx.Param))
    grown_optimizer = nnx.Optimizer(grown, tx, wrt=nnx.Param)
    nnx.update(grown_optimizer.opt_state, nnx.state(state))
    mu = nnx.as_pure(grown_optimizer.opt_state)[0].mu
    np.testing.assert_array_equal(mu['head']['kernel'], nnx.as_pure(optimizer.opt_state)[0].mu['head']['kernel'])
    assert np.any(mu['head']['kernel']) and not np.any(mu['blocks'][0]['fc1']['lora_a'])
    grown_optimizer.update(grown, nnx.jit(nnx.grad(loss_fn))(grown, X['mlp']))
    assert int(nnx.as_pure(grown_optimizer.opt_state)[0].count) == 2


# ---------------------------------------------------------------------------------------------
# Growing again


def test_growing_twice_keeps_the_first_rounds_names_and_values():
    model = pretrained('mlp')
    first = nnx_surgery.grow(model, surgery.Widen('blocks/0/fc1', units=4, into='blocks/0/fc2'), rngs=nnx.Rngs(1))
    after_first = flat_state(first)
    second = nnx_surgery.grow(first, [surgery.Widen('blocks/0/fc1', units=3, into='blocks/0/fc2'),
                                      surgery.LoRA('head', rank=2)],
                              rngs=nnx.Rngs(2), preserve_function=True, sample=(X['mlp'],))
    assert_pretrained_variables_kept(after_first, second)
    assert joined(set(flat_state(second)) - set(after_first)) == {
        'blocks/0/fc1/plus2/kernel', 'blocks/0/fc1/plus2/bias', 'blocks/0/fc2/from_fc1_plus2/kernel',
        'head/lora_a', 'head/lora_b'}
    np.testing.assert_allclose(run(second, X['mlp']), run(first, X['mlp']), atol=1e-5)  # round 2 preserving
    labels = flatten(growjax.param_labels(nnx.state(second, nnx.Param), nnx.state(first, nnx.Param)))
    assert joined(p for p, label in labels.items() if label == 'new') == {
        'blocks/0/fc1/plus2/kernel', 'blocks/0/fc1/plus2/bias', 'blocks/0/fc2/from_fc1_plus2/kernel',
        'head/lora_a', 'head/lora_b'}


# ---------------------------------------------------------------------------------------------
# Errors


def test_a_pattern_that_matches_nothing_names_itself_and_the_paths_it_could_mean():
    model = pretrained('mlp')
    with pytest.raises(surgery.SurgeryError, match=r"Widen\(blocks/0/fc3, .*'blocks/0/fc3' matches no module.*"
                                                   r'Did you mean one of: .*blocks/0/fc1'):
        nnx_surgery.grow(model, surgery.Widen('blocks/0/fc3', units=2, into='blocks/0/fc2'), rngs=nnx.Rngs(1))
    with pytest.raises(surgery.SurgeryError, match=r"into='blocks/0/fc9' matches no module"):
        nnx_surgery.grow(model, surgery.Widen('blocks/0/fc1', units=2, into='blocks/0/fc9'), rngs=nnx.Rngs(1))
    with pytest.raises(surgery.SurgeryError, match=r"through='bn9' matches no module.*bn1"):
        nnx_surgery.grow(pretrained('cnn'), surgery.Widen('conv1', units=2, into='conv2', through='bn9'),
                         rngs=nnx.Rngs(1))
    # A failed grow leaves nothing behind, even in place: every operation is checked before any applies.
    with pytest.raises(surgery.SurgeryError):
        nnx_surgery.grow(model, [surgery.LoRA('head', rank=2), surgery.LoRA('nothing', rank=2)], rngs=nnx.Rngs(1),
                         in_place=True)
    assert type(model.head) is nnx.Linear and 'lora_a' not in vars(model.head)


def test_an_unsupported_module_kind_names_its_path_and_type():
    cnn = pretrained('cnn')
    with pytest.raises(surgery.SurgeryError, match=r'bn1 is a flax\.nnx\..*BatchNorm; Widen grows nnx\.Linear'):
        nnx_surgery.grow(cnn, surgery.Widen('bn1', units=2, into='conv2'), rngs=nnx.Rngs(1))
    with pytest.raises(surgery.SurgeryError, match=r'conv1 is a flax\.nnx\..*Conv; LoRA adapts nnx\.Linear'):
        nnx_surgery.grow(cnn, surgery.LoRA('conv1', rank=2), rngs=nnx.Rngs(1))
    with pytest.raises(surgery.SurgeryError, match=r'through module conv2 is a .*Conv; .*copies nnx\.BatchNorm'):
        nnx_surgery.grow(cnn, surgery.Widen('conv1', units=2, into='head', through='conv2'), rngs=nnx.Rngs(1))
    with pytest.raises(surgery.SurgeryError, match=r"head is a .*Linear without a 'query' projection"):
        nnx_surgery.grow(cnn, surgery.AddHeads('head', heads=1), rngs=nnx.Rngs(1))
    with pytest.raises(surgery.SurgeryError, match='expected a flax.nnx Module, got a Dense. For Flax linen'):
        nnx_surgery.grow(nn.Dense(3), surgery.LoRA('x', rank=1), rngs=nnx.Rngs(1))
    with pytest.raises(surgery.SurgeryError, match='For Flax NNX modules use growjax.nnx_surgery.grow'):
        surgery.grow(cnn, surgery.LoRA('head', rank=1))


def test_widened_units_that_reach_the_consumer_in_another_shape_are_an_error():
    grown = nnx_surgery.grow(pretrained('cnn'), surgery.Widen('conv1', units=2, into='head'), rngs=nnx.Rngs(1))
    with pytest.raises(surgery.SurgeryError, match=r'head reads shape \(4, 12\), but the new units of conv1'):
        run(grown, X['cnn'])


def test_module_paths_are_the_state_paths_of_the_models_modules():
    paths = nnx_surgery.module_paths(pretrained('mlp'))
    assert set(paths) == {'embed', 'blocks/0', 'blocks/0/fc1', 'blocks/0/fc2', 'blocks/1', 'blocks/1/fc1',
                          'blocks/1/fc2', 'head'}
    grown = nnx_surgery.grow(pretrained('mlp'), CASES['widen_mlp'][1], rngs=nnx.Rngs(1))
    assert set(nnx_surgery.module_paths(grown)) == set(paths)  # growjax's parts are not matched


# ---------------------------------------------------------------------------------------------
# README


def test_readme_flax_nnx_example_runs():
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')).read()
    section = readme.split('### Flax NNX', 1)[1]
    namespace = {}
    exec(compile(re.search(r'```python\n(.*?)```', section, re.S).group(1), 'README.md', 'exec'), namespace)
    assert 'plus' in namespace['labels']['fc1'] and namespace['labels']['fc1']['plus']['kernel'] == 'new'
