"""The paper's analyses of a grown network, as pure functions, run hooks and a command over a workdir.

- Cooperation of old and new units (paper Fig. 6): the accuracy of the classifier reading only one
  unit group (its share of the logits plus the bias), and all of them. Groups are what the head
  sows as 'intermediates' `classifier_in_<group>` (after NormScale), e.g. 'fc7' (old) and
  'fc7_plus' (new) for WA.
- Learned scales: the mean NormScale gamma of every group (`<layer>_norm/scale_<i>`; i = 0 is the
  old group), which says how much weight each group gets where they meet.
- Parameter change: ||theta - theta_0|| / ||theta_0|| per top-level layer, how far fine-tuning
  moved each layer from where it started.

The functions (measures.py) are jittable and vmappable (the paper experiment computes them inside
its vectorised eval); `hooks()` (eval_hooks.py) gives eval hooks for
`growjax.train.train_and_evaluate` that log them as split 'analysis' in metrics.jsonl (main.py
passes them with `--config.train.analysis=True`); and `python -m growjax.analysis --workdir=DIR`
(cli.py) plots them for a finished run. This package knows nothing of the training job: the job
calls the hooks it is given. This module is the surface: it re-exports both.
"""
from growjax.analysis.eval_hooks import hooks, masked_correct
from growjax.analysis.measures import (ALL_GROUPS, GROUP_PREFIX, analyse, classifier_inputs, cooperation_accuracies,
                                       group_label, group_logits, has_groups, is_new_group, relative_change,
                                       unit_scales)

__all__ = ['ALL_GROUPS', 'GROUP_PREFIX', 'analyse', 'classifier_inputs', 'cooperation_accuracies', 'group_label',
           'group_logits', 'has_groups', 'hooks', 'is_new_group', 'masked_correct', 'relative_change', 'unit_scales']
