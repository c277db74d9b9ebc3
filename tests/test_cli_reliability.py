"""No silent wrong answers from the CLI: bad input gets one clear line (exit status 2) with nothing lost, and a
`train` killed at any point (SIGKILL during SPT, mid-epoch, while a checkpoint is written, while the final files are
written) is finished by running the same command again, with the adapter an uninterrupted run gives.

The kills go through the test-only `PEFT_VISUAL_PROMPT_FAULT` hook (`peft_visual_prompt/cli/trainer.py`), which
SIGKILLs the process at a named point; every run after a kill is a fresh process with the same arguments.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_cli import FAST, REPO, make_digits_folder, save_tiny_vit

from peft_visual_prompt.cli import main

FAULT_ENV = "PEFT_VISUAL_PROMPT_FAULT"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli-reliability")


@pytest.fixture(scope="module")
def tiny_model(workdir) -> Path:
    return save_tiny_vit(workdir / "tiny-vit")  # 32 px, 8 px patches: 16 patch tokens per image


@pytest.fixture(scope="module")
def digits(workdir) -> Path:
    return make_digits_folder(workdir / "digits")


def _train_args(tiny_model, digits, output, *extra) -> list[str]:
    return ["train", "--model_name_or_path", str(tiny_model), "--dataset_name", str(digits), "--output_dir",
            str(output), *FAST, *extra]


@pytest.fixture(scope="module")
def trained(workdir, tiny_model, digits) -> Path:
    output = workdir / "run"
    assert main(_train_args(tiny_model, digits, output, "--init", "xavier_uniform", "--max_steps", "4",
                            "--save_strategy", "steps", "--save_steps", "2")) == 0
    return output


def _error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    rc = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert rc == 2, (rc, captured.err[-3000:])
    assert err and err[-1].startswith("error: "), err
    assert "Traceback" not in captured.err
    return err[-1]


def _snapshot(directory: Path) -> dict:
    return {p.relative_to(directory): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _leftovers(output: Path) -> list[str]:
    return sorted(p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}"))


# ---------------------------------------------------------------------------------------------------------------------
# 1. --overwrite_output_dir validates first and replaces the old run only on success


def test_overwrite_with_infeasible_spt_keeps_the_previous_run(trained, tiny_model, digits, capsys):
    before = _snapshot(trained)
    line = _error(capsys, _train_args(tiny_model, digits, trained, "--overwrite_output_dir", "--init", "mean",
                                      "--num_prompt_tokens", "20"))
    assert "16 patch tokens" in line and "--num_prompt_tokens" in line
    assert _snapshot(trained) == before  # the finished run is untouched
    assert _leftovers(trained) == []


# ---------------------------------------------------------------------------------------------------------------------
# 2. Interrupted runs: resume from the last complete checkpoint, or start over; never a message loop


def _unfinished_copy(trained: Path, destination: Path) -> Path:
    shutil.copytree(trained, destination)
    (destination / "metrics.json").unlink()  # killed before the run finished
    return destination


def test_killed_before_the_first_checkpoint_reruns(workdir, trained, tiny_model, digits, capsys):
    output = workdir / "killed-early"
    output.mkdir()
    shutil.copy(trained / "run_config.json", output)  # what a SIGKILL during SPT or the first steps leaves
    (output / "checkpoint-2").mkdir()
    shutil.copy(trained / "checkpoint-2" / "adapter_model.safetensors", output / "checkpoint-2")  # half written
    capsys.readouterr()
    assert main(_train_args(tiny_model, digits, output, "--init", "xavier_uniform", "--max_steps", "4",
                            "--save_strategy", "steps", "--save_steps", "2")) == 0, capsys.readouterr().err[-2000:]
    assert (output / "metrics.json").is_file()


def test_resume_with_flag_but_no_checkpoint_names_the_way_out(workdir, trained, tiny_model, digits, capsys):
    output = workdir / "killed-early-flag"
    output.mkdir()
    shutil.copy(trained / "run_config.json", output)
    args = _train_args(tiny_model, digits, output, "--init", "xavier_uniform", "--max_steps", "4")
    line = _error(capsys, [*args, "--resume_from_checkpoint", "true"])
    assert "without --resume_from_checkpoint" in line
    assert main(args) == 0  # ... and doing what it says works


def test_incomplete_checkpoint_is_never_resumed_from(workdir, trained, tiny_model, digits, capsys):
    output = _unfinished_copy(trained, workdir / "truncated-checkpoint")
    optimizer = output / "checkpoint-4" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # killed while writing checkpoint-4
    capsys.readouterr()
    rc = main(_train_args(tiny_model, digits, output, "--init", "xavier_uniform", "--max_steps", "4",
                          "--save_strategy", "steps", "--save_steps", "2"))
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    assert "from checkpoint-2" in err
    assert json.loads((output / "metrics.json").read_text())["global_step"] == 4


def test_explicit_incomplete_checkpoint_is_refused(workdir, trained, tiny_model, digits, capsys):
    output = _unfinished_copy(trained, workdir / "truncated-explicit")
    _truncate(output / "checkpoint-4" / "optimizer.pt")  # killed while writing checkpoint-4
    line = _error(capsys, _train_args(tiny_model, digits, output, "--init", "xavier_uniform", "--max_steps", "4",
                                      "--resume_from_checkpoint", str(output / "checkpoint-4")))
    assert "checkpoint-4" in line and "--resume_from_checkpoint" in line


# ---------------------------------------------------------------------------------------------------------------------
# 3. Read-only output directory, one class, an empty class folder


def _read_only_dir(workdir: Path) -> Path:
    if os.geteuid() != 0:
        parent = workdir / "read-only"
        parent.mkdir(exist_ok=True)
        parent.chmod(0o555)
        return parent / "run"
    if Path("/sys").is_dir() and not os.access("/sys", os.W_OK) or _cannot_mkdir(Path("/sys")):
        return Path("/sys/peft-visual-prompt-run")  # sysfs refuses new directories, even to root
    pytest.skip("no read-only directory available to this user")


def _cannot_mkdir(parent: Path) -> bool:
    try:
        (parent / ".peft-visual-prompt-probe").mkdir()
    except OSError:
        return True
    (parent / ".peft-visual-prompt-probe").rmdir()
    return False


def test_read_only_output_dir(workdir, tiny_model, digits, capsys):
    output = _read_only_dir(workdir)
    line = _error(capsys, _train_args(tiny_model, digits, output, "--init", "xavier_uniform"))
    assert "Cannot write" in line and "--output_dir" in line
    line = _error(capsys, ["init-prompts", "--model_name_or_path", str(tiny_model), "--dataset_name", str(digits),
                           "--output_dir", str(output), "--init", "mean", "--num_prompt_tokens", "4"])
    assert "Cannot write" in line


def test_one_class_dataset(workdir, tiny_model, digits, capsys):
    one = workdir / "one-class"
    shutil.copytree(digits / "zero", one / "zero")
    line = _error(capsys, _train_args(tiny_model, one, workdir / "err-one-class"))
    assert "only one class" in line and "at least 2" in line
    assert not (workdir / "err-one-class").exists()


def test_empty_class_folder_is_named(workdir, tiny_model, digits, capsys):
    root = workdir / "digits-empty-class"
    shutil.copytree(digits, root)
    (root / "three").mkdir()
    line = _error(capsys, _train_args(tiny_model, root, workdir / "err-empty-class"))
    assert "three" in line and "holds no images" in line
    assert not (workdir / "err-empty-class").exists()


# ---------------------------------------------------------------------------------------------------------------------
# 4. Broken adapter files: one line naming the file, for evaluate, predict and train --adapter_name_or_path


BREAKAGES = {
    "config-truncated": ("adapter_config.json", lambda p: _truncate(p), "not valid JSON"),
    "config-not-json": ("adapter_config.json", lambda p: p.write_text("<html>rate limited</html>"), "not valid JSON"),
    "weights-truncated": ("adapter_model.safetensors", lambda p: _truncate(p, 0.7), "truncated or corrupt"),
    "weights-empty": ("adapter_model.safetensors", lambda p: p.write_bytes(b""), "is empty"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_broken_adapter_files(workdir, trained, tiny_model, digits, breakage, capsys):
    name, damage, what = BREAKAGES[breakage]
    adapter = workdir / f"broken-{breakage}"
    shutil.copytree(trained, adapter, ignore=shutil.ignore_patterns("checkpoint-*"))
    damage(adapter / name)
    image = str(next((digits / "one").iterdir()))
    for argv in (["evaluate", "--adapter", str(adapter), "--output_dir", str(workdir / f"eval-{breakage}")],
                 ["predict", "--adapter", str(adapter), image],
                 _train_args(tiny_model, digits, workdir / f"train-{breakage}", "--adapter_name_or_path",
                             str(adapter))):
        line = _error(capsys, argv)
        assert name in line and what in line, (argv[0], line)
        assert "--model_name_or_path" not in line  # another base model is not the fix for a damaged file
    assert not (workdir / f"train-{breakage}").exists()


# ---------------------------------------------------------------------------------------------------------------------
# 5. Fault injection: SIGKILL at several points, rerun the same command, same adapter as an uninterrupted run


def _cli(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-m", "peft_visual_prompt.cli", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def _rerun_until_finished(args: list[str]) -> subprocess.CompletedProcess:
    """The same command again; if it refuses, its one line must name the one flag that proceeds, and that must
    work at once (no message loop)."""
    result = _cli(args)
    if result.returncode == 2:
        flags = set(re.findall(r"--\w+", result.stderr.strip().splitlines()[-1])) - set(args)
        assert len(flags) == 1, result.stderr[-2000:]
        result = _cli([*args, *flags])
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _adapter(output: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v.numpy() for k, v in load_file(output / "adapter_model.safetensors").items()}


def _assert_same_adapter(output: Path, reference: dict) -> None:
    got = _adapter(output)
    assert got.keys() == reference.keys()
    for key in reference:
        np.testing.assert_allclose(got[key], reference[key], rtol=1e-4, atol=1e-5, err_msg=f"{output.name}: {key}")


def _parallel(*calls):
    """Runs the (function, args...) calls two at a time: every CLI process here is single-threaded."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        return [f.result() for f in [pool.submit(fn, *a) for fn, *a in calls]]


FAULTS = ("spt", "step:5", "save:9", "final")


def test_killed_runs_finish_with_the_uninterrupted_adapter(workdir, tiny_model, digits):
    # 54 training images, batch 8: 7 steps per epoch, 14 in all; a checkpoint every 3 steps.
    def args(output):
        return _train_args(tiny_model, digits, output, "--init", "kmeans", "--save_strategy", "steps",
                           "--save_steps", "3")

    reference_dir = workdir / "fault-reference"
    outputs = {fault: workdir / f"fault-{fault.replace(':', '-')}" for fault in FAULTS}
    reference_run, *killed = _parallel((_cli, args(reference_dir)),
                                       *[(_cli, args(outputs[f]), f) for f in FAULTS])
    assert reference_run.returncode == 0, reference_run.stderr[-3000:]
    reference = _adapter(reference_dir)
    assert json.loads((reference_dir / "metrics.json").read_text())["global_step"] == 14
    for fault, result in zip(FAULTS, killed):
        assert result.returncode == -9, (fault, result.stderr[-2000:])
        assert not (outputs[fault] / "metrics.json").exists()

    # --overwrite_output_dir over a finished run, killed mid-epoch: the finished run stays intact.
    overwritten = workdir / "fault-overwrite"
    shutil.copytree(reference_dir, overwritten)
    (overwritten / "stale.txt").write_text("from the previous run")
    before = _snapshot(overwritten)
    other = [*args(overwritten), "--overwrite_output_dir", "--num_prompt_tokens", "3"]

    *reruns, killed_overwrite = _parallel(*[(_rerun_until_finished, args(outputs[f])) for f in FAULTS],
                                          (_cli, other, "step:5"))
    for fault, rerun in zip(FAULTS, reruns):
        if fault == "save:9":  # checkpoint-9 was half written: resumed from checkpoint-6
            assert "from checkpoint-6" in rerun.stderr, rerun.stderr[-2000:]
        _assert_same_adapter(outputs[fault], reference)
        assert _leftovers(outputs[fault]) == []

    assert killed_overwrite.returncode == -9, killed_overwrite.stderr[-2000:]
    assert _snapshot(overwritten) == before
    # The same command again finishes the new run, and only then replaces the old one.
    rerun = _rerun_until_finished(other)
    assert "from checkpoint-3" in rerun.stderr
    assert not (overwritten / "stale.txt").exists() and (overwritten / "metrics.json").is_file()
    assert json.loads((overwritten / "adapter_config.json").read_text())["num_prompt_tokens"] == 3
    assert _leftovers(overwritten) == []
