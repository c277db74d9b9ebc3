"""The `peft-visual-prompt` command-line application: train, evaluate, predict and init-prompts.

It sits beside the library and is not imported by it; what only the application needs (datasets, the offline DINOv2
recovery, plots, the metric module) lives in this subpackage.
"""

from .main import main

__all__ = ["main"]
