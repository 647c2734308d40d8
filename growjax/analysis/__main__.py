"""`python -m growjax.analysis --workdir=DIR` (see growjax/analysis/cli.py)."""
import sys

from growjax.analysis.cli import main

sys.exit(main(sys.argv[1:]))
