"""The README's examples run as written."""
import os
import re

import numpy as np
import optax

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')


def readme_example() -> str:
    text = open(README).read()
    section = text.split('## Using grow_params in your code', 1)[1]
    return re.search(r'```python\n(.*?)```', section, re.S).group(1)


def test_grow_params_example_runs():
    namespace = {}
    exec(compile(readme_example(), 'README.md', 'exec'), namespace)  # its asserts are the checks
    wider, state = namespace['wider'], namespace['wider_state']
    assert 'fc6_plus' in wider['params']
    momentum = optax.tree_utils.tree_get(state, 'trace')
    assert not np.any(momentum['fc6_plus']['kernel'])  # the new layer's momentum exists and is zero


def readme_section(title: str) -> str:
    text = open(README).read()
    section = text.split(title, 1)[1]
    return re.search(r'```python\n(.*?)```', section, re.S).group(1)


def test_grow_your_own_flax_model_example_runs(capsys):
    namespace = {}
    exec(compile(readme_section('## Grow your own Flax model'), 'README.md', 'exec'), namespace)
    wider, state = namespace['wider'], namespace['opt_state']
    assert 'plus' in wider['params']['block0']['fc1'] and 'plus' in wider['params']['block1']['fc1']
    assert 'block1_inserted' in wider['params']
    mu = optax.tree_utils.tree_get(state, 'mu')
    assert not np.any(mu['block0']['fc1']['plus']['kernel'])  # the second round's units start without history
    out = capsys.readouterr().out
    assert 'function check, on the function-preserving variant' in out and 'the model as grown' in out


def test_growing_a_model_during_training_example_runs():
    namespace = {}
    exec(compile(readme_section('## Growing a model during training (expand)'), 'README.md', 'exec'), namespace)
    grown, state = namespace['grown'], namespace['state']
    assert grown['params']['h_3']['proj']['kernel'].shape == (256, 64)
    mu = optax.tree_utils.tree_get(state, 'mu')
    assert mu['h_0']['fc']['kernel'].shape == (64, 256)
    assert not np.any(mu['h_3']['fc']['kernel'])  # a new block's moments start at zero
