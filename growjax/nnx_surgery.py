"""Grow a Flax NNX model that growjax did not write: the public NNX surface of growjax.surgery
(its NNX back-end, growjax.surgery.nnx, where the docstring says how)."""
from growjax.surgery.nnx import (CHECK_ATOL, CHECK_RTOL, NormScale, check_function, grow, module_paths, on_pure_dicts,
                                 report)

__all__ = ['CHECK_ATOL', 'CHECK_RTOL', 'NormScale', 'check_function', 'grow', 'module_paths', 'on_pure_dicts',
           'report']
