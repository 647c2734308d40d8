"""The README's "Using grow_params in your code" example runs as written."""
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
