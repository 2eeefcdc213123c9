"""``python -m bridge_core.cli``: the ``transformer-bridge`` command."""

import sys

from bridge_core.cli.app import main

sys.exit(main())
