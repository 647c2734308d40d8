"""Experiments built on growjax: `python -m growjax.experiments.paper` reproduces the paper's comparisons."""
