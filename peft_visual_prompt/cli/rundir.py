"""The output directory of `train`: where a run is written, what counts as a complete checkpoint, and how a run
that was interrupted (Ctrl-C, SIGKILL, a crash) is picked up again.

A checkpoint is *complete* when it holds `checkpoint_complete.json`, which `CheckpointMarker` writes after the
Trainer has written every file of the checkpoint (adapter, optimizer, scheduler, RNG state, trainer_state.json),
listing each file with its size; a checkpoint whose marker is missing, or whose files are missing or have another
size, is never resumed from and is deleted before training continues. A run is *finished* when `metrics.json`
exists: it is written last.

`plan_run` decides, before anything is written, where a run goes:
- an absent or empty output directory: the run is written there;
- an unfinished run with the same model, data and method: it is resumed from its last complete checkpoint (or,
  with no complete checkpoint, started over, since nothing in it is worth keeping);
- `--overwrite_output_dir` over anything else: the run is written to the sibling `.<name>.staging` and renamed
  into place only when it has finished, so a failed or interrupted run leaves the previous run as it was.
Everything else is refused with one line naming the flag that proceeds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .common import RUN_FILE, CLIError, check_adapter_files, read_run

MARKER = "checkpoint_complete.json"
FINISHED_FILE = "metrics.json"
# Keys of run_config.json that must match to resume a run in the same output directory.
RUN_IDENTITY = ("model_name_or_path", "adapter_name_or_path", "dataset_name", "image_column", "label_column",
                "splits", "method", "image_size")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints


def write_marker(checkpoint: Path) -> None:
    """Records every file of a checkpoint with its size; written atomically, last."""
    files = {str(p.relative_to(checkpoint)): p.stat().st_size for p in sorted(checkpoint.rglob("*"))
             if p.is_file() and p.name != MARKER and not p.name.startswith(".")}
    tmp = checkpoint / f".{MARKER}.tmp"
    with open(tmp, "w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, checkpoint / MARKER)


def is_complete(checkpoint: Path) -> bool:
    try:
        files = json.loads((checkpoint / MARKER).read_text())["files"]
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return "trainer_state.json" in files and all(
        (checkpoint / name).is_file() and (checkpoint / name).stat().st_size == size for name, size in files.items())


def checkpoints(directory: Path) -> list[Path]:
    """checkpoint-N directories, highest N first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def last_complete_checkpoint(directory: Path) -> Optional[Path]:
    return next((p for p in checkpoints(directory) if is_complete(p)), None)


def remove_incomplete_checkpoints(directory: Path, after: Optional[str]) -> None:
    """Incomplete checkpoints past the one resumed from (all of them when starting afresh): the Trainer would
    write into them again. The resumed checkpoint itself, and earlier ones, are left alone."""
    start = int(_CHECKPOINT.match(Path(after).name).group(1)) if after and _CHECKPOINT.match(Path(after).name) else -1
    for p in checkpoints(directory):
        if int(_CHECKPOINT.match(p.name).group(1)) > start and not is_complete(p):
            shutil.rmtree(p, ignore_errors=True)


def marker_callback():
    """A TrainerCallback that marks each checkpoint complete once the Trainer has saved it."""
    from transformers import TrainerCallback

    class CheckpointMarker(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if args.world_size > 1:  # every rank has written its RNG state
                import torch.distributed as dist

                dist.barrier()
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and checkpoint.is_dir():
                write_marker(checkpoint)
            return control

    return CheckpointMarker()


def check_checkpoint(path: str) -> str:
    """An explicit --resume_from_checkpoint: a checkpoint directory whose files are whole."""
    checkpoint = Path(path).expanduser()
    if not (checkpoint / "trainer_state.json").is_file():
        raise CLIError(f"--resume_from_checkpoint {path} is not a checkpoint directory (no trainer_state.json); "
                       f"pass one of {checkpoint.parent}/checkpoint-*.")
    if (checkpoint / MARKER).is_file() and not is_complete(checkpoint):
        raise CLIError(f"Checkpoint {path} is incomplete (a file is missing or truncated); pass an earlier "
                       "checkpoint to --resume_from_checkpoint.")
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except ValueError as e:
        raise CLIError(f"{checkpoint / 'trainer_state.json'} is not valid JSON ({e}); pass an earlier checkpoint "
                       "to --resume_from_checkpoint.") from e
    check_adapter_files(checkpoint)
    return str(checkpoint)


# ---------------------------------------------------------------------------------------------------------------------
# Planning a run


@dataclass
class Plan:
    target: Path  # the output directory the user asked for
    work_dir: Path  # where the Trainer writes: target, or its staging sibling
    resume: Optional[str]  # checkpoint to resume from
    staged: bool  # work_dir is renamed onto target when the run has finished
    start_over: bool  # work_dir holds nothing worth keeping: empty it first


def staging_dir(target: Path) -> Path:
    return target.parent / f".{target.name}.staging"


def _wants_resume(resume) -> Optional[str]:
    """None (no), "last", or an explicit checkpoint path."""
    if resume is None or str(resume).lower() in ("", "false", "no"):
        return None
    return "last" if str(resume).lower() in ("true", "yes", "last", "latest") else str(resume)


def check_writable(target: Path) -> None:
    """Creates and removes a temporary directory next to (or in) the output directory: a read-only file system or
    a directory without write permission fails here, with one line, before any training."""
    probe = target if target.is_dir() else next((p for p in target.parents if p.exists()), Path("/"))
    if not probe.is_dir():
        raise CLIError(f"--output_dir {target}: {probe} is a file; pass a directory path.")
    try:
        shutil.rmtree(tempfile.mkdtemp(prefix=".write-test-", dir=probe))
        if probe == target:  # an --overwrite_output_dir run is staged next to it
            shutil.rmtree(tempfile.mkdtemp(prefix=f".{target.name}.write-test-", dir=target.parent))
    except OSError as e:
        raise CLIError(f"Cannot write to --output_dir {target} ({e.strerror or type(e).__name__} in {probe}); pass a "
                       "writable --output_dir.") from e


def plan_run(target: Path, overwrite: bool, resume, run: dict) -> Plan:
    """Where this run goes and what it resumes from; raises CLIError, and writes nothing."""
    if target.exists() and not target.is_dir():
        raise CLIError(f"--output_dir {target} is a file; pass a directory.")
    check_writable(target)
    wanted = _wants_resume(resume)
    empty = not target.is_dir() or not any(target.iterdir())
    if overwrite and not empty:
        return _plan_staged(target, wanted, run)
    if empty:
        if wanted is not None:
            raise CLIError(f"No checkpoint to resume from in {target}: it holds no run; train without "
                           "--resume_from_checkpoint.")
        return Plan(target, target, None, staged=False, start_over=False)
    return _plan_in_place(target, wanted, run)


def _plan_staged(target: Path, wanted, run: dict) -> Plan:
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if target in (cwd, home) or target in cwd.parents or target in home.parents:
        raise CLIError(f"--overwrite_output_dir would delete {target}, which holds the working or home "
                       "directory; pass a dedicated --output_dir.")
    staging = staging_dir(target)
    previous = read_run(staging)
    same = previous is not None and not [k for k in RUN_IDENTITY if previous.get(k) != run.get(k)]
    last = last_complete_checkpoint(staging) if same and not (staging / FINISHED_FILE).exists() else None
    if wanted not in (None, "last"):
        return Plan(target, staging, check_checkpoint(wanted), staged=True, start_over=False)
    if last is not None:  # an interrupted --overwrite_output_dir run of the same settings
        return Plan(target, staging, str(last), staged=True, start_over=False)
    return Plan(target, staging, None, staged=True, start_over=True)


def _plan_in_place(target: Path, wanted, run: dict) -> Plan:
    previous = read_run(target)
    if previous is None:
        raise CLIError(f"Output directory {target} already holds other files; pass --overwrite_output_dir to "
                       "replace them, or another --output_dir.")
    changed = [k for k in RUN_IDENTITY if previous.get(k) != run.get(k)]
    finished = (target / FINISHED_FILE).is_file()
    last = last_complete_checkpoint(target)
    if not finished and last is None:  # an interrupted run that saved nothing worth keeping
        if wanted is not None:
            raise CLIError(f"No complete checkpoint to resume from in {target}; run again without "
                           "--resume_from_checkpoint to start over.")
        return Plan(target, target, None, staged=False, start_over=True)
    if changed:
        what = "an unfinished run" if not finished else "a run"
        raise CLIError(f"{target} holds {what} with a different {', '.join(changed)}; resume it with the same "
                       "arguments, or pass --overwrite_output_dir or another --output_dir.")
    if finished and wanted is None:
        hint = "--resume_from_checkpoint to continue it, " if last is not None else ""
        raise CLIError(f"Output directory {target} already holds a finished run; pass --overwrite_output_dir to "
                       f"replace it, {hint}or another --output_dir.")
    if wanted not in (None, "last"):
        return Plan(target, target, check_checkpoint(wanted), staged=False, start_over=False)
    if last is None:
        raise CLIError(f"No complete checkpoint to resume from in {target}; pass --overwrite_output_dir to train "
                       "again.")
    return Plan(target, target, str(last), staged=False, start_over=False)


# ---------------------------------------------------------------------------------------------------------------------
# Preparing and finishing (main process only)


def prepare(plan: Plan, run: dict) -> None:
    """Empties or creates the work directory, drops incomplete checkpoints, records the run."""
    from .common import write_json

    if plan.start_over and plan.work_dir.exists():
        shutil.rmtree(plan.work_dir)
    plan.work_dir.mkdir(parents=True, exist_ok=True)
    remove_incomplete_checkpoints(plan.work_dir, plan.resume)
    if (plan.work_dir / FINISHED_FILE).exists():  # resuming a finished run: it is unfinished again until the end
        (plan.work_dir / FINISHED_FILE).unlink()
    write_json(plan.work_dir / RUN_FILE, run)


def finish(plan: Plan) -> None:
    """A staged run replaces the previous output directory (two renames; the old one is deleted last)."""
    if not plan.staged:
        return
    old = None
    if plan.target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{plan.target.name}.old-", dir=plan.target.parent))
        os.replace(plan.target, old / plan.target.name)
    os.replace(plan.work_dir, plan.target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def abandon(plan: Plan) -> None:
    """After a failure (not an interruption): a work directory without a complete checkpoint is removed, so the
    next run is not blocked by what this one left (a lone run_config.json)."""
    if last_complete_checkpoint(plan.work_dir) is None and plan.work_dir.is_dir():
        shutil.rmtree(plan.work_dir, ignore_errors=True)
