"""`python -m fastvq ...`: the same command line as the `fastvq` console script."""

import sys

from fastvq.train.cli import main

sys.exit(main())
