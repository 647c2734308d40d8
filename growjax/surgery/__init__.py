"""Grow a Flax model that growjax did not write, without editing its code (linen: `surgery.grow`;
Flax NNX: `growjax.nnx_surgery.grow`, the same operations). See growjax.surgery.linen's docstring."""
from growjax.surgery.linen import (COPY, AddHeads, Deepen, Grown, InsertAfter, LoRA, Operation, Report, SurgeryError,
                                   Widen, activated_units, check_function, check_matches, describe, function_tolerance,
                                   grow, report, resolve_causal)

__all__ = ['COPY', 'AddHeads', 'Deepen', 'Grown', 'InsertAfter', 'LoRA', 'Operation', 'Report', 'SurgeryError', 'Widen',
           'activated_units', 'check_function', 'check_matches', 'describe', 'function_tolerance', 'grow', 'report',
           'resolve_causal']
