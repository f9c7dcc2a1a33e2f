"""Command-line entry points (``python -m graphmoe_fused``, ``graphmoe-demo``)."""
