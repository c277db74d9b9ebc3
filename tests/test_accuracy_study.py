"""Smoke test of benchmarks/accuracy.py: --quick on a tiny random Dinov2 saved to a temporary directory, on a tiny
subset of the digits task. Checks that the report and the JSON are written with a row for every method, sane values,
and identical training budgets across methods (accuracy values themselves mean nothing on a random model)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "accuracy.py"
EPOCHS = 2


@pytest.fixture(scope="module")
def study_module():
    return load_benchmark("accuracy")


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    path = tmp_path_factory.mktemp("tiny-dinov2")
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          patch_size=4, image_size=16)
    Dinov2Model(config).save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def quick_run(tiny_dinov2, tmp_path_factory):
    out = tmp_path_factory.mktemp("accuracy-out")
    cmd = [sys.executable, str(SCRIPT), "--quick", "--model_name_or_path", str(tiny_dinov2), "--tasks", "digits",
           "--image_size", "16", "--train_size", "20", "--val_size", "10", "--test_size", "20",
           "--num_prompts", "4", "--epochs", str(EPOCHS), "--threads", "1", "--output_dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return out, proc.stdout


def test_quick_run_writes_report_and_json(quick_run, study_module):
    out, stdout = quick_run
    md, js = out / "accuracy_quick.md", out / "accuracy_quick.json"
    assert md.is_file() and js.is_file(), list(out.iterdir())
    report = md.read_text()
    results = json.loads(js.read_text())

    assert "python benchmarks/accuracy.py --quick" in report  # the exact command
    table = report.split("## Test accuracy")[1].split("## Claims")[0]
    for method in study_module.METHODS:
        assert f"| {method.title} |" in table, method.title
    assert set(results["summary"]["methods"]) == {m.key for m in study_module.METHODS}

    claims = report.split("## Claims")[1].split("## Learning rates")[0]
    assert claims.count("\n- **") == 5, claims
    for claim in results["claims"]:
        assert claim["verdict"] and claim["text"]
    for kind in ("convergence", "nmi"):
        assert Path(results["figures"][kind]).is_file()
        assert f"accuracy_quick_{kind}.png" in report


def test_quick_run_values_are_sane(quick_run, study_module):
    out, _ = quick_run
    results = json.loads((out / "accuracy_quick.json").read_text())
    settings = results["settings"]
    assert settings["epochs"] == EPOCHS and settings["seeds"] == [0] and settings["grid_points"] == 2

    steps = set()
    for key, per_task in results["methods"].items():
        method = study_module.METHODS_BY_KEY[key]
        block = per_task["digits"]
        assert len(block["grid"]) == 2 and block["chosen_lr"] in block["grid"]
        assert block["grid"] == study_module.lr_grid(method.family, 2)
        selected = [r for r in block["runs"] if r.get("selected")]
        assert len(selected) == 1 and selected[0]["lr"] == block["chosen_lr"]
        for run in block["runs"]:
            assert 0.0 <= run["val_accuracy"] <= 1.0
            assert len(run["history"]["train_loss"]) == EPOCHS  # the same epochs for every method
            steps.add(run["history"]["steps"])
            frac = run["trainable_fraction"]
            if method.kind == "full":
                assert frac >= 1.0
            else:
                assert 0.0 < frac < 1.0, (key, frac)
        assert 0.0 <= selected[0]["test_accuracy"] <= 1.0
        if key in study_module.CURVE_METHODS:
            hist = selected[0]["history"]
            assert len(hist["val_accuracy"]) == EPOCHS
            assert len(hist["nmi"]) == EPOCHS + 1  # initialisation, then every epoch
            assert all(0.0 <= v <= 1.0 for layer_values in hist["nmi"] for v in layer_values)
        if method.spt is not None:
            assert selected[0]["spt_init"]["strategy"] == method.spt
    assert len(steps) == 1, steps  # identical optimisation budget


def test_report_rerenders_from_json(quick_run, study_module, tmp_path):
    out, _ = quick_run
    copy = tmp_path / "accuracy_quick.json"
    copy.write_text((out / "accuracy_quick.json").read_text())
    assert study_module.main(["--from_json", str(copy)]) == 0
    assert (tmp_path / "accuracy_quick.md").read_text() == (out / "accuracy_quick.md").read_text()


def test_augment_keeps_shape_and_range(study_module):
    import torch

    x = torch.rand(4, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    y = study_module.augment(x, g, flip=True)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    again = study_module.augment(x, torch.Generator().manual_seed(0), flip=True)
    assert torch.equal(y, again)  # the run's generator alone decides the augmentation


def test_compare_rules(study_module):
    def s(a_mean, a_std, b_mean, b_std):
        mk = lambda m, sd: {"tasks": {"t": {"mean": m, "std": sd, "test_accuracies": {0: m, 1: m, 2: m}}}}  # noqa
        return {"methods": {"a": mk(a_mean, a_std), "b": mk(b_mean, b_std)}}

    assert study_module.compare(s(0.9, 0.01, 0.8, 0.01), ["t"], "a", "b").verdict == "a"
    assert study_module.compare(s(0.8, 0.01, 0.9, 0.01), ["t"], "a", "b").verdict == "b"
    assert study_module.compare(s(0.81, 0.05, 0.80, 0.05), ["t"], "a", "b").verdict == "tie"
