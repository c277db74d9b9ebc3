"""`peft-visual-prompt init-prompts`: run only SPT's prototype pass on training images and save the initialised
adapter (with its processor and `run_config.json`), to be trained later with `train --adapter_name_or_path`.

The adapter is written into a temporary sibling directory and renamed into place, so a failure leaves nothing
behind and an existing directory (with --overwrite_output_dir) is only replaced once the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..config import SPT_STRATEGIES
from .args import DataArguments, InitPromptsArguments, MethodArguments, ModelArguments, check_method, parse
from .common import RUN_FILE, CLIError, human_time, run_spt, setup, write_json
from .rundir import check_writable


def cmd_init_prompts(argv: list[str]) -> int:
    model_args, data_args, method, args = parse(
        (ModelArguments, DataArguments, MethodArguments, InitPromptsArguments), argv,
        "peft-visual-prompt init-prompts", "Run only SPT's prototype pass and save the initialised adapter.")
    output_dir = _check_args(model_args, method, args, argv)
    from accelerate import Accelerator

    import torch

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    setup_ = setup(model_args, data_args, method, args.seed, None)
    t0 = time.perf_counter()
    info = run_spt(setup_, data_args, args.seed, args.batch_size, accelerator=accelerator)
    elapsed = time.perf_counter() - t0
    if not accelerator.is_main_process:
        return 0
    save_atomically(output_dir, lambda tmp: (setup_.model.save_pretrained(str(tmp)),
                                             setup_.processor.save_pretrained(str(tmp)),
                                             write_json(tmp / RUN_FILE, setup_.run)))
    print(f"SPT {method.init} prompts ({method.describe()}) for {setup_.model_display} from "
          f"{min(len(setup_.splits['train']), method.spt_max_images)} training images in {human_time(elapsed)}"
          f"{'; ' + json.dumps(info, default=str) if info else ''}\n"
          f"  saved to {output_dir}/\n"
          f"  next: peft-visual-prompt train --adapter_name_or_path {output_dir}"
          f"{'' if model_args.model_name_or_path is None else ' --model_name_or_path ' + model_args.model_name_or_path}")
    return 0


def _check_args(model_args, method, args, argv: list[str]) -> Path:
    if method.init not in SPT_STRATEGIES:
        raise CLIError(f"init-prompts runs an SPT strategy; pass --init one of {', '.join(SPT_STRATEGIES)}.")
    if model_args.adapter_name_or_path:
        raise CLIError("init-prompts makes a new adapter; drop --adapter_name_or_path.")
    check_method(method, argv)
    output_dir = Path(args.output_dir).expanduser().resolve()
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not args.overwrite_output_dir:
        raise CLIError(f"Output directory {output_dir} is not empty; pass --overwrite_output_dir or another "
                       "--output_dir.")
    check_writable(output_dir)
    return output_dir


def save_atomically(target: Path, write) -> None:
    """Writes into a temporary sibling directory and renames it into place, so a failure leaves nothing behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
