"""Experiments on the built-in task: does self-rethinking (more rounds) help?"""

from .rounds import RoundsArm, format_rounds_table, run_rounds_experiment

__all__ = ["RoundsArm", "format_rounds_table", "run_rounds_experiment"]
