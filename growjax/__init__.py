"""growjax: grow pretrained Flax networks (wider, deeper) and fine-tune them.

After Wang, Ramanan, Hebert, "Growing a Brain: Fine-Tuning by Increasing Model Capacity", CVPR 2017.
"""
__version__ = '0.2.0'  # also the package version (pyproject.toml reads it)

from growjax import methods, models, pretrained, surgery
from growjax.expand import expand, expand_opt_state  # growjax.expand: the function (the module: sys.modules)
from growjax.grow import GraftError, graft, grow_opt_state, grow_params, new_paths
from growjax.groups import (ParamGroups, forward_order, growth_optimizer, param_groups, param_labels, regime_names,
                            scale_by_group, trainable_mask)
from growjax.models.growth import Growth
from growjax.nn import MultiInputConv, MultiInputDense, NormScale

__all__ = [
    'GraftError', 'Growth', 'MultiInputConv', 'MultiInputDense', 'NormScale', 'ParamGroups', 'expand',
    'expand_opt_state', 'forward_order', 'graft', 'grow_opt_state', 'grow_params', 'growth_optimizer', 'methods', 'models', 'new_paths', 'param_groups',
    'param_labels', 'pretrained', 'regime_names', 'scale_by_group', 'surgery', 'trainable_mask',
]
