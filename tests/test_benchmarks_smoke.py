"""Smoke test of benchmarks/overhead.py: the --quick run finishes and prints every row (timings are not checked), and
the hand-written floor it measures the plugin against really computes what the plugin computes."""

import subprocess
import sys
from pathlib import Path

import pytest

from benchmark_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "overhead.py"


@pytest.fixture(scope="module")
def overhead():
    return load_benchmark("overhead")


def _table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| variant"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows.setdefault(cells[0], cells)  # the first table wins: ViT comes before Swin
    return rows


def _swin_supported() -> bool:
    from peft_visual_prompt.model import family_for

    return family_for("swin") is not None


def test_quick_run_prints_every_row(overhead):
    proc = subprocess.run(
        # ~25 s on 2 idle cores (7 sections); the timeout only guards against a hang, with room for a loaded machine
        [sys.executable, str(SCRIPT), "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "Command: `python " in out and "--quick" in out
    assert "### A. tiny ViT (--quick)" in out
    vit_part, _, swin_part = out.partition("### B. tiny Swin (--quick)")
    assert swin_part, out

    rows = _table_rows(vit_part)
    for variant in overhead.SECTION_VARIANTS["vit"]:
        title = overhead.VARIANT_TITLES[variant]
        assert title in rows, (title, out)
        cells = rows[title]
        assert len(cells) == 9, cells
        float(cells[2])  # median wall s/step
        float(cells[5])  # median CPU s/step
        float(cells[7])  # peak RSS growth (MiB): measured, not "n/a"
    assert "- floor check (OK)" in vit_part, vit_part
    assert "- plugin / floor (goal <= 1.05x): wall: ratio of medians" in vit_part
    assert "- plugin / full_ft: wall: ratio of medians" in vit_part

    swin_part, _, families_part = swin_part.partition("### C. tiny CLIP (--quick)")
    assert families_part, out
    _check_family_sections(overhead, "### C. tiny CLIP (--quick)" + families_part)

    if _swin_supported():
        swin_rows = _table_rows(swin_part)
        for variant in overhead.SECTION_VARIANTS["swin"]:
            assert overhead.VARIANT_TITLES[variant] in swin_rows, (variant, swin_part)
        assert "- plugin / full_ft: wall: ratio of medians" in swin_part
    else:
        assert "Section swin: skipped: " in swin_part, swin_part


def _check_family_sections(overhead, text: str) -> None:
    """Sections C-F (CLIP, SigLIP, DINOv3, BEiT): plugin and floor rows measured, the floor check passed, the ratio
    printed; section G (Swin V2) skipped with its reason."""
    parts = {}
    for section in overhead.FAMILY_SECTIONS + ["swinv2"]:
        title = f"### {overhead.QUICK_TITLES[section]}"
        assert title in text, (title, text)
        parts[section] = text.split(title, 1)[1].split("\n### ", 1)[0]
    for section in overhead.FAMILY_SECTIONS:
        part = parts[section]
        rows = _table_rows(part)
        for variant in overhead.SECTION_VARIANTS[section]:
            cells = rows[overhead.VARIANT_TITLES[variant]]
            assert len(cells) == 9, (section, cells)
            float(cells[2]), float(cells[5]), float(cells[7])  # wall, CPU, peak RSS growth: all measured
        assert rows[overhead.VARIANT_TITLES["plugin"]][1] == rows[overhead.VARIANT_TITLES["floor"]][1], part
        assert "- floor check (OK)" in part, (section, part)
        assert "- plugin / floor (goal <= 1.05x): wall: ratio of medians" in part, (section, part)
    assert "Section swinv2: skipped: " in parts["swinv2"] and "not supported" in parts["swinv2"], parts["swinv2"]


@pytest.mark.parametrize("section", ["clip", "siglip", "dinov3", "beit"])
def test_family_floor_computes_the_plugins_function(overhead, section):
    """Each family's hand-written floor (CLIP's pre-layernorm, SigLIP's no-CLS layout and head, DINOv3's registers
    and rotary embeddings, BEiT's zero-padded relative position biases) computes the plugin's logits, loss and
    prompt/head gradients; and a floor that feeds each layer another layer's prompts fails the check."""
    import torch

    check = overhead.compare_family_floor_and_plugin(section, quick=True, batch_size=2, num_prompts=3, seed=0)
    assert check["max_abs_logits_diff"] <= 1e-5 and check["abs_loss_diff"] <= 1e-5, check
    assert check["max_abs_grad_diff"] <= 1e-5, check
    assert check["max_abs_logits_diff_vs_no_prompts"] > 1e-4, check
    assert overhead.floor_matches(check)

    original = overhead.FamilyFloorVPT.copy_prompts_from

    def swapped(self, *args, **kwargs):
        original(self, *args, **kwargs)
        with torch.no_grad():
            first = self.prompts[0].clone()
            self.prompts[0].copy_(self.prompts[1])
            self.prompts[1].copy_(first)

    overhead.FamilyFloorVPT.copy_prompts_from = swapped
    try:
        wrong = overhead.compare_family_floor_and_plugin(section, quick=True, batch_size=2, num_prompts=3, seed=0)
    finally:
        overhead.FamilyFloorVPT.copy_prompts_from = original
    assert not overhead.floor_matches(wrong), wrong


def test_beit_floor_check_catches_misplaced_position_bias(overhead, monkeypatch):
    """The BEiT floor pads the relative position biases itself: padding them one token off must fail the check."""
    original = overhead._zero_pad_bias
    monkeypatch.setattr(overhead, "_zero_pad_bias", lambda bias, start, n: original(bias, start + 1, n))
    check = overhead.compare_family_floor_and_plugin("beit", quick=True, batch_size=2, num_prompts=3, seed=0)
    assert not overhead.floor_matches(check), check


def test_floor_computes_the_plugins_function(overhead):
    check = overhead.compare_floor_and_plugin(quick=True, batch_size=2, num_prompts=3, seed=0)
    assert check["max_abs_logits_diff"] <= 1e-5, check
    assert check["abs_loss_diff"] <= 1e-5, check
    assert check["max_abs_grad_diff"] <= 1e-5, check  # prompt and classifier gradients, layer by layer
    # Not vacuous: the prompts do change the logits, so matching them means matching the prompt path.
    assert check["max_abs_logits_diff_vs_no_prompts"] > 1e-4, check
    assert overhead.floor_matches(check)


def test_floor_check_catches_a_wrong_floor(overhead, monkeypatch):
    """A floor that feeds each layer another layer's prompts must fail the check."""
    import torch

    original = overhead.FloorVPT.copy_prompts_from

    def swapped(self, peft_model, adapter_name="default"):
        original(self, peft_model, adapter_name)
        with torch.no_grad():
            first = self.prompts[0].clone()
            self.prompts[0].copy_(self.prompts[1])
            self.prompts[1].copy_(first)

    monkeypatch.setattr(overhead.FloorVPT, "copy_prompts_from", swapped)
    check = overhead.compare_floor_and_plugin(quick=True, batch_size=2, num_prompts=3, seed=0)
    assert not overhead.floor_matches(check), check


def test_mixed_benchmark_quick_run_agrees_and_counts_adapter_memory():
    """benchmarks/mixed.py --quick: its three variants compute the same logits, and an added adapter costs exactly
    its own parameters (timings are not checked)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "mixed.py"), "--quick", "--tasks", "1", "4", "--warmup", "0",
         "--steps", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| 1 |") or line.startswith("| 4 |")]
    assert len(rows) == 2
    assert all(float(row[-2]) < 1e-5 for row in rows)  # max abs diff between mixed, floor and task_by_task
    assert "(ratio 1.000)" in proc.stdout
