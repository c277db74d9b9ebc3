"""End-to-end tests of the `peft-visual-prompt` CLI on a tiny random ViT and an imagefolder of upsampled digits.

Commands run in-process through `main([...])`, except the Ctrl-C test, which needs a real process to interrupt.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from peft_visual_prompt.cli import main

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("zero", "one", "two")
PER_CLASS = 24
# Fast settings shared by the training runs below.
FAST = ["--num_train_epochs", "2", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
        "--logging_steps", "2", "--num_prompt_tokens", "4", "--disable_tqdm", "true", "--seed", "0"]


def save_tiny_vit(directory: Path, num_hidden_layers: int = 2, hidden_size: int = 32) -> Path:
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                       num_attention_heads=4, intermediate_size=64, num_labels=2)
    ViTForImageClassification(config).save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        directory)
    return directory


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def tiny_model(workdir) -> Path:
    return save_tiny_vit(workdir / "tiny-vit")


def make_digits_folder(root: Path, per_class: int = PER_CLASS) -> Path:
    """An imagefolder: one sub-folder per class of 40x40 RGB PNGs made from scikit-learn's 8x8 digits."""
    from sklearn.datasets import load_digits

    data = load_digits()
    for label, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True)
        for i in np.flatnonzero(data.target == label)[:per_class]:
            pixels = (data.images[i] * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels).resize((40, 40), Image.NEAREST).convert("RGB").save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def digits(workdir) -> Path:
    return make_digits_folder(workdir / "digits")


@pytest.fixture(scope="module")
def trained(workdir, tiny_model, digits) -> Path:
    output = workdir / "run"
    rc = main(["train", "--model_name_or_path", str(tiny_model), "--dataset_name", str(digits),
               "--output_dir", str(output), "--init", "kmeans", *FAST])
    assert rc == 0
    return output


def _error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert err and err[-1].startswith("error: "), err
    return err[-1]


def _no_leftovers(output: Path) -> None:
    assert not output.exists(), sorted(os.listdir(output))
    assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}")]


# ---------------------------------------------------------------------------------------------------------------------
# The four commands


def test_train_writes_adapter_metrics_and_curves(trained, capsys):
    files = set(os.listdir(trained))
    assert {"adapter_model.safetensors", "adapter_config.json", "preprocessor_config.json", "run_config.json",
            "metrics.json", "training_curves.png", "log_history.json"} <= files
    metrics = json.loads((trained / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert metrics["trainable_params"] == metrics["prompt_params"] + metrics["head_params"]
    assert metrics["prompt_params"] == 2 * 4 * 32  # deep: 2 layers x 4 prompts x width 32
    assert metrics["head_params"] == 32 * 3 + 3
    assert metrics["backbone_params"] > 10 * metrics["trainable_params"]
    assert metrics["adapter_size_bytes"] == sum(
        (trained / f).stat().st_size for f in ("adapter_model.safetensors", "adapter_config.json"))
    assert set(metrics["timings_s"]) == {"load", "spt_init", "train", "test", "total"}
    assert metrics["spt_init"]["strategy"] == "kmeans"
    adapter_config = json.loads((trained / "adapter_config.json").read_text())
    assert adapter_config["spt_init"]["strategy"] == "kmeans"
    assert adapter_config["deep"] is True and adapter_config["num_prompt_tokens"] == 4
    history = json.loads((trained / "log_history.json").read_text())["log_history"]
    assert any("nmi/layer_1" in entry for entry in history)  # PromptPatchNMICallback ran on evaluate
    assert any("eval_accuracy" in entry for entry in history)
    assert (trained / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_reproduces_the_test_split(trained, capsys):
    capsys.readouterr()
    assert main(["evaluate", "--adapter", str(trained)]) == 0
    out = capsys.readouterr().out
    result = json.loads((trained / "eval_test.json").read_text())
    metrics = json.loads((trained / "metrics.json").read_text())
    # Same images (split rebuilt from run_config.json), same model: the accuracy the training run reported.
    assert result["num_images"] == metrics["num_samples"]["test"]
    assert result["accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert np.array(result["confusion_matrix"]).sum() == result["num_images"]
    assert f"accuracy {result['accuracy']:.4f}" in out and "<- predicted" in out
    assert (trained / "confusion_matrix_test.png").is_file()


def test_evaluate_on_another_dataset_dir(trained, digits, tmp_path, capsys):
    assert main(["evaluate", "--adapter", str(trained), "--dataset_name", str(digits), "--split", "train",
                 "--output_dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "eval_train.json").read_text())
    assert result["labels"] == sorted(CLASSES)  # imagefolder sorts class folders
    assert (tmp_path / "confusion_matrix_train.png").is_file()


def test_predict_prints_top_k(trained, digits, capsys):
    capsys.readouterr()
    assert main(["predict", "--adapter", str(trained), str(digits / "one"), str(next((digits / "two").iterdir())),
                 "--top_k", "2", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == PER_CLASS + 1
    for line in lines:
        scores = [p["score"] for p in line["predictions"]]
        assert len(scores) == 2 and scores == sorted(scores, reverse=True) and sum(scores) <= 1 + 1e-6
        assert {p["label"] for p in line["predictions"]} <= set(CLASSES)


def test_predict_plain_output(trained, digits, capsys):
    capsys.readouterr()
    assert main(["predict", "--adapter", str(trained), str(next((digits / "zero").iterdir()))]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith(".png") and len(out) == 4  # path + 3 labels (top_k 3 of 3 classes)


def test_init_prompts_then_train_from_it(workdir, tiny_model, digits, capsys):
    init_dir = workdir / "init"
    assert main(["init-prompts", "--model_name_or_path", str(tiny_model), "--dataset_name", str(digits),
                 "--output_dir", str(init_dir), "--init", "mean", "--num_prompt_tokens", "4", "--shallow"]) == 0
    config = json.loads((init_dir / "adapter_config.json").read_text())
    assert config["spt_init"]["strategy"] == "mean" and config["deep"] is False
    assert {"adapter_model.safetensors", "run_config.json", "preprocessor_config.json"} <= set(os.listdir(init_dir))
    assert not [p for p in workdir.iterdir() if p.name.startswith(".init.")]

    from safetensors.torch import load_file

    before = load_file(init_dir / "adapter_model.safetensors")
    output = workdir / "from-init"
    assert main(["train", "--model_name_or_path", str(tiny_model), "--dataset_name", str(digits),
                 "--adapter_name_or_path", str(init_dir), "--output_dir", str(output), *FAST]) == 0
    after = load_file(output / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    prompts = [k for k in after if "visual_prompt_embeddings" in k]
    assert len(prompts) == 1  # shallow: the adapter's own configuration, not the CLI's deep default
    assert not np.allclose(before[prompts[0]].numpy(), after[prompts[0]].numpy())  # trained from the SPT init


def test_xavier_init_and_shallow_projection(workdir, tiny_model, digits):
    output = workdir / "xavier"
    assert main(["train", "--model_name_or_path", str(tiny_model), "--dataset_name", str(digits),
                 "--output_dir", str(output), "--init", "xavier_uniform", "--shallow", "--projection_dim", "8",
                 "--max_train_samples", "30", "--max_eval_samples", "9", *FAST]) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["spt_init"] is None and metrics["num_samples"]["train"] == 30
    assert metrics["num_samples"]["test"] == 9
    assert "nmi" not in json.dumps(json.loads((output / "log_history.json").read_text()))


def test_save_to_disk_dataset_and_image_size(workdir, tiny_model, digits):
    import datasets

    saved = workdir / "saved-digits"
    datasets.load_dataset("imagefolder", data_dir=str(digits)).save_to_disk(str(saved))
    output = workdir / "saved-run"
    assert main(["train", "--model_name_or_path", str(tiny_model), "--dataset_name", str(saved),
                 "--output_dir", str(output), "--init", "random", "--image_size", "48", *FAST]) == 0
    run = json.loads((output / "run_config.json").read_text())
    assert run["image_size"] == 48 and run["labels"] == sorted(CLASSES)


def test_defaults_are_the_offline_demo():
    from peft_visual_prompt.cli.args import (DataArguments, MethodArguments, ModelArguments, TrainArguments,
                                        parse as _parse)

    model_args, data_args, method, training_args = _parse(
        (ModelArguments, DataArguments, MethodArguments, TrainArguments), [], "test", "")
    assert model_args.model_name_or_path is None and data_args.dataset_name is None
    assert method.num_prompt_tokens == 10 and method.is_deep and method.init == "kmeans"
    assert training_args.output_dir == "runs/vpt-textile" and training_args.remove_unused_columns is False
    # Every TrainingArguments flag still parses.
    _, _, _, training_args = _parse((ModelArguments, DataArguments, MethodArguments, TrainArguments),
                                    ["--report_to", "tensorboard", "--push_to_hub", "--hub_model_id", "me/x",
                                     "--gradient_accumulation_steps", "2"], "test", "")
    assert training_args.push_to_hub and training_args.gradient_accumulation_steps == 2


def test_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    assert "init-prompts" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    assert "--num_prompt_tokens" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------------
# Errors: one line naming the fix, exit status 2, nothing written


def test_missing_dataset_path(workdir, tiny_model, capsys):
    output = workdir / "err-missing"
    line = _error(capsys, ["train", "--model_name_or_path", str(tiny_model), "--dataset_name",
                           str(workdir / "no-such-dir"), "--output_dir", str(output)])
    assert "does not exist" in line and "--dataset_name" in line
    _no_leftovers(output)


def test_missing_image_column(workdir, tiny_model, digits, capsys):
    output = workdir / "err-column"
    line = _error(capsys, ["train", "--model_name_or_path", str(tiny_model), "--dataset_name", str(digits),
                           "--image_column", "img", "--output_dir", str(output)])
    assert "'img'" in line and "--image_column" in line and "'image'" in line
    _no_leftovers(output)


def test_string_labels(workdir, tiny_model, capsys):
    import datasets

    images = [Image.new("RGB", (32, 32), (i * 40, 0, 0)) for i in range(6)]
    ds = datasets.Dataset.from_dict({"image": images, "label": ["a", "b"] * 3},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("string")}))
    saved = workdir / "string-labels"
    ds.save_to_disk(str(saved))
    output = workdir / "err-strings"
    line = _error(capsys, ["train", "--model_name_or_path", str(tiny_model), "--dataset_name", str(saved),
                           "--output_dir", str(output)])
    assert "class_encode_column('label')" in line and "imagefolder" in line
    _no_leftovers(output)


@pytest.fixture(scope="module")
def digits_with_corrupt(workdir, digits) -> Path:
    import shutil

    root = workdir / "digits-corrupt"
    shutil.copytree(digits, root)
    (root / "one" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


def test_corrupt_image_fails_clearly(workdir, tiny_model, digits_with_corrupt, capsys):
    output = workdir / "err-corrupt"
    line = _error(capsys, ["train", "--model_name_or_path", str(tiny_model), "--dataset_name",
                           str(digits_with_corrupt), "--output_dir", str(output)])
    assert "broken.png" in line and "--on_corrupt_image skip" in line
    _no_leftovers(output)


def test_corrupt_image_skipped_with_a_warning(workdir, tiny_model, digits_with_corrupt):
    output = workdir / "skip-corrupt"
    with pytest.warns(UserWarning, match="broken.png"):
        rc = main(["train", "--model_name_or_path", str(tiny_model), "--dataset_name", str(digits_with_corrupt),
                   "--output_dir", str(output), "--on_corrupt_image", "skip", "--init", "xavier_uniform",
                   *FAST])
    assert rc == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert sum(metrics["num_samples"].values()) == 3 * PER_CLASS  # 73 files, the broken one left out


def test_adapter_for_another_backbone(workdir, trained, digits, capsys):
    deeper = save_tiny_vit(workdir / "tiny-vit-3-layers", num_hidden_layers=3)
    eval_dir = workdir / "err-eval"
    line = _error(capsys, ["evaluate", "--adapter", str(trained), "--model_name_or_path", str(deeper),
                           "--output_dir", str(eval_dir)])
    assert "does not fit this backbone" in line and "--model_name_or_path" in line
    _no_leftovers(eval_dir)
    output = workdir / "err-adapter-train"
    line = _error(capsys, ["train", "--model_name_or_path", str(deeper), "--dataset_name", str(digits),
                           "--adapter_name_or_path", str(trained), "--output_dir", str(output)])
    assert "does not fit this backbone" in line
    _no_leftovers(output)


def test_output_dir_holding_another_run(trained, tiny_model, digits, capsys):
    before = {p: p.stat().st_mtime_ns for p in trained.rglob("*")}
    line = _error(capsys, ["train", "--model_name_or_path", str(tiny_model), "--dataset_name", str(digits),
                           "--output_dir", str(trained), "--num_prompt_tokens", "3"])
    assert "--overwrite_output_dir" in line
    assert {p: p.stat().st_mtime_ns for p in trained.rglob("*")} == before  # untouched


def test_overwrite_output_dir_replaces_the_run(workdir, tiny_model, digits):
    output = workdir / "overwritten"
    output.mkdir()
    (output / "stale.txt").write_text("from an older run")
    assert main(["train", "--model_name_or_path", str(tiny_model), "--dataset_name", str(digits),
                 "--output_dir", str(output), "--overwrite_output_dir", "--init", "xavier_uniform", *FAST]) == 0
    assert not (output / "stale.txt").exists() and (output / "metrics.json").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# Ctrl-C


def test_ctrl_c_leaves_a_checkpoint_to_resume_from(workdir, tiny_model, digits):
    output = workdir / "interrupted"
    args = ["train", "--model_name_or_path", str(tiny_model), "--dataset_name", str(digits),
            "--output_dir", str(output), "--init", "xavier_uniform", "--max_steps", "400", "--eval_strategy", "no",
            "--save_strategy", "steps", "--save_steps", "3", "--per_device_train_batch_size", "4",
            "--logging_steps", "10", "--num_prompt_tokens", "4", "--disable_tqdm", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "peft_visual_prompt.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not list(output.glob("checkpoint-*/trainer_state.json")):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    assert "--resume_from_checkpoint" in out
    assert not (output / "metrics.json").exists()  # the run did not finish
    checkpoints = sorted(output.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    last = checkpoints[-1]
    stopped_at = json.loads((last / "trainer_state.json").read_text())["global_step"]
    assert 0 < stopped_at < 400
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt"} <= set(os.listdir(last))

    assert main([*args, "--resume_from_checkpoint", str(last)]) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["global_step"] == 400


def test_resume_with_other_settings_is_refused(workdir, trained, tiny_model, digits, capsys):
    checkpoint = sorted(trained.glob("checkpoint-*"))[-1]
    line = _error(capsys, ["train", "--model_name_or_path", str(tiny_model), "--dataset_name", str(digits),
                           "--output_dir", str(trained), "--num_prompt_tokens", "7",
                           "--resume_from_checkpoint", str(checkpoint)])
    assert "method" in line


# ---------------------------------------------------------------------------------------------------------------------
# Distributed


def test_train_under_torchrun_with_two_ranks(workdir, tiny_model, digits):
    output = workdir / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
         "peft_visual_prompt.cli", "train", "--model_name_or_path", str(tiny_model), "--dataset_name", str(digits),
         "--output_dir", str(output), "--init", "kmeans", *FAST],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    assert result.stdout.count("test accuracy") == 1  # only the main process prints the summary
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["spt_init"]["num_processes"] == 2  # the SPT pass was sharded over both ranks
    assert (output / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# Hub: --push_to_hub, then evaluate/predict from the repo id (local Hub stand-in, see conftest.py)


def test_push_to_hub_then_predict_and_evaluate_from_the_hub(workdir, tiny_model, digits, hub_server, tmp_path,
                                                             capsys):
    output = workdir / "pushed"
    assert main(["train", "--model_name_or_path", str(tiny_model), "--dataset_name", str(digits),
                 "--output_dir", str(output), "--init", "xavier_uniform", "--push_to_hub",
                 "--hub_model_id", "org/cli-run", *FAST]) == 0
    files = set(hub_server.files("org/cli-run"))
    assert {"adapter_config.json", "adapter_model.safetensors", "run_config.json", "metrics.json",
            "preprocessor_config.json"} <= files
    assert not any(f.startswith("checkpoint-") for f in files)

    capsys.readouterr()
    assert main(["predict", "--adapter", "org/cli-run", str(next((digits / "two").iterdir())), "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(line["predictions"]) == 3
    assert main(["evaluate", "--adapter", "org/cli-run", "--output_dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "eval_test.json").read_text())
    assert result["accuracy"] == pytest.approx(json.loads((output / "metrics.json").read_text())["test_accuracy"])


def test_unknown_hub_adapter(workdir, hub_server, capsys):
    line = _error(capsys, ["predict", "--adapter", "org/no-such-adapter", str(workdir)])
    assert "org/no-such-adapter" in line


def test_predict_and_evaluate_parse_through_hf_argument_parser():
    from peft_visual_prompt.cli.args import AdapterArguments, EvaluateArguments, PredictArguments, parse
    from peft_visual_prompt.cli.predict import IMAGES

    adapter, args, images = parse((AdapterArguments, PredictArguments),
                                  ["--adapter", "A", "--json", "img.png", "folder/", "--top_k", "2"], "p", "",
                                  positional=IMAGES)
    assert adapter.adapter == "A" and args.json and args.top_k == 2 and images == ["img.png", "folder/"]
    adapter, evaluate = parse((AdapterArguments, EvaluateArguments), ["--adapter", "A"], "e", "")
    assert evaluate.split == "test" and evaluate.on_corrupt_image == "error" and adapter.batch_size == 64
    with pytest.raises(SystemExit):
        parse((AdapterArguments, PredictArguments), ["--adapter", "A"], "p", "", positional=IMAGES)  # no images
