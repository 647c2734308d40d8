"""Grow a Flax NNX model that growjax did not write: the public NNX surface of growjax.surgery
(its NNX back-end, growjax.surgery.nnx, where the docstring says how; the operations are
growjax.surgery's)."""
from growjax.surgery.nnx import NormScale, check_function, grow, module_paths, on_pure_dicts, report

__all__ = ['NormScale', 'check_function', 'grow', 'module_paths', 'on_pure_dicts', 'report']
