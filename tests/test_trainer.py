"""Training with transformers.Trainer: loss falls, accuracy via the packaged metric, adapter-only checkpoints,
resuming, frozen backbone; and a 2-rank gloo run under torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from trainer_run import build_base  # noqa: E402
from trainer_run import main as train  # noqa: E402

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}
TRAINER_STATE_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("full")
    return output, train(str(output), max_steps=20)


def test_loss_falls_and_accuracy_comes_from_the_packaged_metric(full_run):
    _, result = full_run
    losses = [e["loss"] for e in result["log_history"] if "loss" in e]
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    assert 0.3 < result["eval"]["eval_accuracy"] <= 1.0  # 5 classes: chance is 0.2


def test_checkpoints_hold_only_adapter_files(full_run):
    output, _ = full_run
    for checkpoint in ("checkpoint-10", "checkpoint-20"):
        files = set(os.listdir(output / checkpoint))
        assert files <= ADAPTER_FILES | TRAINER_STATE_FILES, files
        assert {"adapter_model.safetensors", "adapter_config.json"} <= files
        tensors = load_file(output / checkpoint / "adapter_model.safetensors")
        assert all("visual_prompt_embeddings" in k or "classifier" in k for k in tensors), sorted(tensors)


def test_backbone_weights_are_unchanged(full_run):
    output, _ = full_run
    from peft import PeftModel

    pristine = build_base().state_dict()
    trained = PeftModel.from_pretrained(build_base(), output / "final")
    unloaded = trained.unload().state_dict()
    # The adapter changed only the head, which modules_to_save kept out of the original module.
    assert all(torch.equal(unloaded[k], v) for k, v in pristine.items())


def test_resume_from_checkpoint_continues_to_the_same_result(full_run, tmp_path):
    output, result = full_run
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    os.system(f"cp -r {output / 'checkpoint-10'} {resumed_dir}")
    resumed = train(str(resumed_dir), max_steps=20, resume=str(resumed_dir / "checkpoint-10"))
    assert resumed["global_step"] == 20
    # It ran only steps 11..20 and still ends exactly where the uninterrupted run did: the checkpoint restored the
    # prompts, head, optimizer, scheduler, RNG and data position.
    assert resumed["steps_run"] == 10 and result["steps_run"] == 20
    full = load_file(output / "checkpoint-20" / "adapter_model.safetensors")
    again = load_file(resumed_dir / "checkpoint-20" / "adapter_model.safetensors")
    for key in full:
        torch.testing.assert_close(again[key], full[key], atol=1e-5, rtol=1e-4)


def test_two_rank_torchrun_trains(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = Path(__file__).parent / "scripts" / "trainer_run.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), str(tmp_path), "4"]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and result["global_step"] == 4
    assert set(os.listdir(tmp_path / "checkpoint-4")) <= ADAPTER_FILES | TRAINER_STATE_FILES | {"rng_state_1.pth", "rng_state_0.pth"}
    assert (tmp_path / "final" / "adapter_model.safetensors").exists()
