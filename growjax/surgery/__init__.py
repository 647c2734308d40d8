"""Grow a Flax model that growjax did not write, without editing its code.

    grown = surgery.grow(model, [surgery.Widen('block1/mlp/fc1', units=32, into='block1/mlp/fc2')])
    variables = growjax.grow_params(pretrained, grown, rng, x)      # linen
    grown = nnx_surgery.grow(model, ops, rngs=nnx.Rngs(1))          # Flax NNX (growjax.nnx_surgery)

The package: `ops` (each operation's spec and validation, naming, which ones claim to keep the
function, the rules and checks both back-ends share, their error texts), `report` (Report), and
one back-end per Flax API: `linen` (this package's `grow`, `report`, `check_function`, `Grown`;
its docstring says how it works) and `nnx` (growjax.nnx_surgery's). The pure computations both
back-ends and growjax's own models share (NormScale, LoRA's update) are in growjax.nn.
"""
from growjax.surgery.linen import Grown, check_function, check_matches, function_tolerance, grow, report
from growjax.surgery.ops import (COPY, AddHeads, Deepen, InsertAfter, LoRA, Operation, SurgeryError, Widen,
                                 activated_units, describe, resolve_causal)
from growjax.surgery.report import Report

__all__ = ['COPY', 'AddHeads', 'Deepen', 'Grown', 'InsertAfter', 'LoRA', 'Operation', 'Report', 'SurgeryError', 'Widen',
           'activated_units', 'check_function', 'check_matches', 'describe', 'function_tolerance', 'grow', 'report',
           'resolve_causal']
