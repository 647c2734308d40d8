"""What a growth grafted, and how far the grown model is from the pretrained one: both back-ends'
`report` return a Report."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Report:
    """Per module: which leaves were copied from the pretrained tree, which are new, which were
    re-initialised; what each operation matched; and, if checked, how far two models' outputs are
    from the pretrained model's on the sample input:

    - `max_abs_difference`: the grown model with the operations that change the function by design
      left out (linen: their function-preserving variant, new parts at zero and no NormScale; NNX:
      their parts switched off), which must match: a leaf grafted into the wrong place shows up
      here; None where it cannot be compared (NNX: re-initialised leaves, another output shape);
    - `grown_difference`: the model as it was grown, which differs by design where an operation
      in `changes_function` (NormScale, a random fan-in) rescales or adds to the old units.
    """
    modules: dict[str, dict[str, list[str]]]  # module path -> {'copied' | 'new' | 'reinitialised': [leaf names]}
    matches: dict[str, list[str]]
    max_abs_difference: float | None = None
    grown_difference: float | None = None
    changes_function: tuple[str, ...] = ()

    def __str__(self) -> str:
        lines = ['operation -> modules it matched:']
        lines += [f'  {op} -> {", ".join(paths) or "(none)"}' for op, paths in self.matches.items()]
        lines.append('module: copied | new | re-initialised leaves')
        for module, kinds in self.modules.items():
            cells = [', '.join(kinds.get(kind, [])) or '-' for kind in ('copied', 'new', 'reinitialised')]
            lines.append(f'  {module or "(root)"}: ' + ' | '.join(cells))
        if self.max_abs_difference is not None:
            lines.append('function check, on the function-preserving variant of these operations (those that change '
                         'the function by design left out), not the model as grown: max |difference| from the '
                         f'pretrained model = {self.max_abs_difference:.3g}')
        if self.grown_difference is not None:
            why = (f' (by design: {"; ".join(self.changes_function)} change the function)' if self.changes_function
                   else '')
            lines.append(f'the model as grown: max |difference| from the pretrained model = '
                         f'{self.grown_difference:.3g}{why}')
        return '\n'.join(lines)
