"""Mixed-task batches (`adapter_names=`): every row of one pass equals that row run alone with its adapter (to 1e-6
of the output's scale).

Runs over the contract suite's table (`model_table.ROWS`): every supported model class, deep and shallow, eager and
sdpa, three adapters with three prompt counts plus "__base__", in shuffled row orders.
"""

from __future__ import annotations

import random

import pytest
import torch
from model_table import ROWS
from peft import get_peft_model
from torch import nn

from peft_visual_prompt import VisualPromptConfig, VisualPromptLayer

COUNTS = {"default": 3, "b": 2, "c": 5}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is faster


def _three_adapters(row, attn: str, deep: bool, uniform: bool = False, **config):
    counts = {name: 3 for name in COUNTS} if uniform else COUNTS
    model = get_peft_model(row.build(attn), VisualPromptConfig(num_prompt_tokens=counts["default"], deep=deep, **config))
    for name in ("b", "c"):
        model.add_adapter(name, VisualPromptConfig(num_prompt_tokens=counts[name], deep=deep, **config))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # clearly different prompts and heads per adapter, outputs of order 1
        for name, param in model.named_parameters():
            if "visual_prompt_embeddings" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
            elif "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)
    return model.eval()


def assert_close_to_scale(got, want, what: str) -> None:
    """Equal to 1e-6 of the output's scale (max |want|, at least 1): float32 rounding of a pass whose sequences
    are padded to the batch's widest prompt count, whatever the head's magnitude."""
    scale = max(1.0, float(want.abs().max()))
    error = float((got - want).abs().max())
    assert error <= 1e-6 * scale, f"{what}: max abs difference {error:.3g} > 1e-6 x scale {scale:.3g}"


def _outputs(row, output, index=None):
    """The row's compared outputs as a flat list of tensors (optionally one batch row of each)."""
    flat = []
    for value in row.select(output).values():
        for tensor in value if isinstance(value, (tuple, list)) else (value,):
            flat.append(tensor if index is None else tensor[index])
    return flat


def _alone(model, row, x, name):
    with torch.no_grad():
        if name == "__base__":
            with model.disable_adapter():
                return _outputs(row, model(pixel_values=x), 0)
        model.set_adapter(name)
        return _outputs(row, model(pixel_values=x), 0)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_every_row_equals_its_adapter_alone(row, attn, deep):
    model = _three_adapters(row, attn, deep)
    names = ["default", "b", "c", "__base__"] * 2
    if row.mixed_padding is False:  # layers without an attention mask: one prompt count, no "__base__" rows
        with pytest.raises(ValueError, match="takes no attention mask"):
            model(pixel_values=row.pixels(batch=len(names)), adapter_names=names)
        model = _three_adapters(row, attn, deep, uniform=True)
        names = ["default", "b", "c"] * 2
    random.Random(hash((row.id, attn, deep)) % 1000).shuffle(names)
    x = row.pixels(batch=len(names))
    with torch.no_grad():
        mixed = model(pixel_values=x, adapter_names=names)
    for i, name in enumerate(names):
        for got, want in zip(_outputs(row, mixed, i), _alone(model, row, x[i : i + 1], name)):
            assert_close_to_scale(got, want, f"row {i} ({name})")
    # the adapters differ, so a row run with another adapter would be caught
    a, b = _alone(model, row, x[:1], "b"), _alone(model, row, x[:1], "c")
    assert any((p - q).abs().max() > 1e-4 for p, q in zip(a, b))


@pytest.mark.parametrize("row", [r for r in ROWS if r.id in ("ViTForImageClassification", "SwinModel")],
                         ids=lambda r: r.id)
def test_a_batch_of_only_base_rows_is_the_base_model_bit_for_bit(row):
    base = row.build("sdpa")
    x = row.pixels(batch=3)
    with torch.no_grad():
        want = _outputs(row, base(pixel_values=x))
    model = _three_adapters(row, "sdpa", True)
    with torch.no_grad():
        got = _outputs(row, model(pixel_values=x, adapter_names=["__base__"] * 3))
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("row", [r for r in ROWS if r.id in ("ViTForImageClassification", "SwinForImageClassification")],
                         ids=lambda r: r.id)
def test_heads_with_different_numbers_of_labels_pad_with_minus_infinity(row):
    model = _three_adapters(row, "sdpa", True)
    wrapper = model.base_model.model.classifier
    narrow = nn.Linear(wrapper.original_module.in_features, 3)
    wrapper.modules_to_save["c"] = narrow
    names = ["c", "default", "__base__", "c"]
    x = row.pixels(batch=4)
    with torch.no_grad():
        logits = model(pixel_values=x, adapter_names=names).logits
        for i, name in enumerate(names):
            want = _alone(model, row, x[i : i + 1], name)[0]
            torch.testing.assert_close(logits[i, : want.shape[-1]], want, atol=1e-6, rtol=1e-6)
            assert torch.isneginf(logits[i, want.shape[-1] :]).all()
    assert logits.softmax(-1)[0, 3:].sum() == 0 and logits[[0, 3]].argmax(-1).max() < 3
    with pytest.raises(ValueError, match="heads of different sizes"):
        model(pixel_values=x, adapter_names=names, labels=torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("row", [r for r in ROWS if r.id in ("ViTForImageClassification", "SwinForImageClassification")],
                         ids=lambda r: r.id)
def test_training_moves_each_adapter_only_from_its_own_rows(row):
    model = _three_adapters(row, "sdpa", True).train()
    # PEFT makes only the active adapter trainable; a user training mixed batches makes them all trainable.
    trainable = {n: p for n, p in model.named_parameters() if "visual_prompt_embeddings" in n or "modules_to_save" in n}
    for p in trainable.values():
        p.requires_grad_(True)
    names = ["b", "default", "b", "__base__"]
    out = model(pixel_values=row.pixels(batch=4), adapter_names=names).logits
    out[[0, 2]].sum().backward()  # only rows of "b" carry loss
    for name, p in trainable.items():
        adapter = name.split(".")[-1] if "visual_prompt" in name else name.split("modules_to_save.")[1].split(".")[0]
        moved = p.grad is not None and p.grad.abs().sum() > 0
        assert moved == (adapter == "b"), name


def test_bad_adapter_names_fail_before_any_compute():
    row = next(r for r in ROWS if r.id == "ViTForImageClassification")
    model = _three_adapters(row, "sdpa", True)
    model.add_adapter("shallow", VisualPromptConfig(num_prompt_tokens=2, deep=False))
    calls = []
    model.base_model.model.vit.embeddings.register_forward_pre_hook(lambda *a: calls.append(1))
    x = row.pixels(batch=2)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        model(pixel_values=x, adapter_names=["default", "nope"])
    with pytest.raises(ValueError, match="has 3 names but the batch has 2 rows"):
        model(pixel_values=x, adapter_names=["default", "b", "c"])
    with pytest.raises(ValueError, match="'default' and 'shallow' cannot share a mixed batch"):
        model(pixel_values=x, adapter_names=["default", "shallow"])
    with pytest.raises(ValueError, match="list of adapter names"):
        model(pixel_values=x, adapter_names="default")
    assert calls == []
    assert isinstance(next(m for m in model.modules() if isinstance(m, VisualPromptLayer)), VisualPromptLayer)


def test_adapters_of_tasks_with_different_label_counts_load_and_mix(tmp_path):
    """Task A (5 labels, the base head's size) and task B (3 labels) share one backbone: B's saved head loads into a
    copy of its own size, and a mixed batch gives each row its task's logits."""
    row = next(r for r in ROWS if r.id == "ViTForImageClassification")
    x = row.pixels(batch=4)
    base_b = row.model_cls(row.config_cls(**{**row.config, "num_labels": 3}))
    base_b.vit.load_state_dict(row.build("sdpa").vit.state_dict())  # the same backbone, another task's head
    task_b = get_peft_model(base_b, VisualPromptConfig(num_prompt_tokens=2))
    with torch.no_grad():
        for p in task_b.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
        want_b = task_b.eval()(pixel_values=x).logits
    task_b.save_pretrained(tmp_path / "b")
    model = _three_adapters(row, "sdpa", True)
    model.load_adapter(tmp_path / "b", adapter_name="task_b")
    with torch.no_grad():
        mixed = model(pixel_values=x, adapter_names=["task_b", "default", "task_b", "__base__"]).logits
        model.set_adapter("default")
        want_default = model(pixel_values=x).logits
    torch.testing.assert_close(mixed[[0, 2], :3], want_b[[0, 2]], atol=1e-6, rtol=1e-6)
    assert torch.isneginf(mixed[[0, 2], 3:]).all()
    torch.testing.assert_close(mixed[1], want_default[1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_a_user_attention_mask_combines_with_the_padding(attn, deep):
    """ViT with a user padding mask: each row of a mixed batch (different prompt counts, "__base__") equals the row
    alone with the same mask."""
    row = next(r for r in ROWS if r.id == "ViTForImageClassification")
    model = _three_adapters(row, attn, deep)
    names = ["c", "__base__", "b", "default"]
    x = row.pixels(batch=4)
    key_mask = torch.ones(4, 17, dtype=torch.bool)
    key_mask[0, 3:9] = False
    key_mask[2, 10:12] = False
    with torch.no_grad():
        mixed = model(pixel_values=x, attention_mask=key_mask, adapter_names=names).logits
        unmasked = model(pixel_values=x, adapter_names=names).logits
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    want = model(pixel_values=x[i : i + 1], attention_mask=key_mask[i : i + 1]).logits[0]
            else:
                model.set_adapter(name)
                want = model(pixel_values=x[i : i + 1], attention_mask=key_mask[i : i + 1]).logits[0]
            assert_close_to_scale(mixed[i], want, f"row {i} ({name})")
    assert (mixed[0] - unmasked[0]).abs().max() > 1e-4  # the mask took effect
