"""`python -m vitkernels.bench` = the `vitkernels-bench` console script."""

import sys

from .cli import main

sys.exit(main())
