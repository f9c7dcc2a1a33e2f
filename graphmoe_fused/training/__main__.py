"""``python -m graphmoe_fused.training [flags]``: ``graphmoe-fused train`` by itself, for
launchers that start a module (``accelerate launch -m graphmoe_fused.training ...``)."""

import sys

from ..cli.train_command import main

sys.exit(main())
