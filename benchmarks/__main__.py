"""``python -m benchmarks [--rounds N] [--smoke] [--models tiny,small,llava] [--out DIR]``."""

import sys

from benchmarks.run import main

sys.exit(main())
