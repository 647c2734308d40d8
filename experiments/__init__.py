"""Experiments built on growjax, run from the repository root: `python -m experiments.paper` (the
paper's comparisons), `experiments.vit` (the same protocol on the ViT), `experiments.map` (where
growing helps). They use the library and are not part of it: `pip install .` installs only growjax."""
import os

# Where reports go by default: this checkout's docs/, found from this file, not from the current folder.
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs')
