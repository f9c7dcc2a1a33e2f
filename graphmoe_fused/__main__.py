"""``python -m graphmoe_fused``: the ``graphmoe-fused`` command (train, eval, plot, experiment,
demo)."""

import sys

from .cli.app import main

if __name__ == "__main__":
    sys.exit(main())
