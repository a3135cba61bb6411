"""`python -m fastvq ...`: the same command line as the `fastvq` console script."""

import sys

from fastvq.train.cli import run

sys.exit(run())
