"""``python -m graphmoe_fused`` runs the demo (same as ``graphmoe-demo``)."""

import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
