"""`predict --adapter A --adapter B`: every image scored under every adapter in mixed batches through one backbone,
each adapter's top-k with its own labels, equal to predicting with that adapter alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_cli import FAST, main, make_digits_folder, save_tiny_vit


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    model = save_tiny_vit(root / "tiny-vit")
    digits = make_digits_folder(root / "digits3", per_class=16)
    binary = root / "digits2"
    shutil.copytree(digits / "zero", binary / "zero")
    shutil.copytree(digits / "one", binary / "one")
    runs = {}
    for name, data in (("three", digits), ("two", binary)):
        runs[name] = root / f"run-{name}"
        assert main(["train", "--model_name_or_path", str(model), "--dataset_name", str(data),
                     "--output_dir", str(runs[name]), "--init", "xavier_uniform", *FAST]) == 0
    return root, digits, runs


def _json_lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_every_image_under_every_adapter_equals_each_adapter_alone(two_tasks, capsys):
    _, digits, runs = two_tasks
    images = [str(digits / "two"), str(next((digits / "zero").iterdir()))]
    capsys.readouterr()
    assert main(["predict", "--adapter", str(runs["three"]), "--adapter", str(runs["two"]), *images, "--json",
                 "--batch_size", "8"]) == 0
    mixed = _json_lines(capsys)
    alone = {}
    for name, run in runs.items():
        assert main(["predict", "--adapter", str(run), *images, "--json", "--top_k", "3"]) == 0
        alone[str(run)] = {line["image"]: line["predictions"] for line in _json_lines(capsys)}
    assert len(mixed) == 17
    for line in mixed:
        assert set(line["adapters"]) == {str(runs["three"]), str(runs["two"])}
        for adapter, predictions in line["adapters"].items():
            want = alone[adapter][line["image"]]
            assert [p["label"] for p in predictions] == [p["label"] for p in want]
            assert [p["score"] for p in predictions] == pytest.approx([p["score"] for p in want], abs=1e-5)
        assert {p["label"] for p in line["adapters"][str(runs["two"])]} <= {"zero", "one"}  # its own labels


def test_adapters_of_different_base_models_are_one_clear_line(two_tasks, capsys, tmp_path):
    root, digits, runs = two_tasks
    other_model = save_tiny_vit(tmp_path / "other-vit")
    other = tmp_path / "run-other"
    assert main(["train", "--model_name_or_path", str(other_model), "--dataset_name", str(digits),
                 "--output_dir", str(other), "--init", "xavier_uniform", *FAST, "--num_train_epochs", "1"]) == 0
    capsys.readouterr()
    assert main(["predict", "--adapter", str(runs["three"]), "--adapter", str(other), str(digits / "one")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained on different base models" in err[0] and err[0].startswith("error: ")
