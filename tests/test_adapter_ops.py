"""PEFT adapter operations: trainability, several adapters, disable, delete, unload, merge."""

import copy

import pytest
import torch
from peft import get_peft_model
from tiny_models import pixels, prompts_of, reference_logits, tiny_model

from peft_visual_prompt import VisualPromptConfig


def test_only_prompts_and_head_train(capsys):
    peft_model = get_peft_model(tiny_model("vit"), VisualPromptConfig(num_prompt_tokens=4, projection_dim=8))
    peft_model.print_trainable_parameters()
    expected = 3 * 4 * 8 + (8 * 32 + 32) + (32 * 5 + 5)
    assert f"trainable params: {expected:,} ||" in capsys.readouterr().out
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == (
        {f"base_model.model.vit.layers.{i}.visual_prompt_embeddings.default" for i in range(3)}
        | {"base_model.model.vit.layers.0.visual_prompt_projection.default.weight",
           "base_model.model.vit.layers.0.visual_prompt_projection.default.bias"}
        | {"base_model.model.classifier.modules_to_save.default.weight",
           "base_model.model.classifier.modules_to_save.default.bias"}
    )
    counted, _ = peft_model.get_nb_trainable_parameters()
    assert counted == expected
    assert peft_model.peft_config["default"].num_trainable_parameters == counted


def test_training_moves_prompts_and_head_only():
    base = tiny_model("vit")
    frozen = {k: v.clone() for k, v in base.state_dict().items() if "classifier" not in k}
    peft_model = get_peft_model(base, VisualPromptConfig(num_prompt_tokens=4)).train()
    before = [p.detach().clone() for p in prompts_of(peft_model)]
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):
        loss = peft_model(pixel_values=pixels(), labels=torch.tensor([1, 3])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(a, b) for a, b in zip(before, prompts_of(peft_model)))
    unloaded = peft_model.unload().state_dict()
    for key, value in frozen.items():
        assert torch.equal(unloaded[key], value), key


def test_disable_adapter_is_bit_exact_and_restores():
    base = tiny_model("dinov2")
    x = pixels()
    with torch.no_grad():
        want = base(pixel_values=x).logits
    peft_model = get_peft_model(base, VisualPromptConfig(num_prompt_tokens=4)).eval()
    with torch.no_grad():
        prompted = peft_model(pixel_values=x).logits
        with peft_model.disable_adapter():
            # modules_to_save also falls back to the original head, so this is exactly the base model
            assert torch.equal(peft_model(pixel_values=x).logits, want)
        assert torch.equal(peft_model(pixel_values=x).logits, prompted)


def test_two_adapters_switch_and_delete():
    base = tiny_model("vit")
    reference = copy.deepcopy(base)
    peft_model = get_peft_model(base, VisualPromptConfig(num_prompt_tokens=4, deep=True))
    peft_model.add_adapter("other", VisualPromptConfig(num_prompt_tokens=2, deep=False))
    x = pixels()
    # The new adapter is not active and not trainable until selected.
    assert all(not p.requires_grad for p in prompts_of(peft_model, "other"))
    with torch.no_grad():
        first = peft_model(pixel_values=x).logits
        peft_model.set_adapter("other")
        assert all(p.requires_grad for p in prompts_of(peft_model, "other"))
        assert all(not p.requires_grad for p in prompts_of(peft_model, "default"))
        second = peft_model(pixel_values=x).logits
        # "other" is shallow with 2 prompts: only the first layer has a prompt set.
        assert len(prompts_of(peft_model, "other")) == 1
        classifier = peft_model.base_model.model.classifier.modules_to_save["other"]
        reference.classifier.load_state_dict(classifier.state_dict())
        want = reference_logits(reference, prompts_of(peft_model, "other"), x, deep=False, num_prefix=1)
        torch.testing.assert_close(second, want, atol=1e-5, rtol=0)
        peft_model.set_adapter("default")
        assert torch.equal(peft_model(pixel_values=x).logits, first)
        peft_model.delete_adapter("other")
    assert prompts_of(peft_model, "other") == []
    assert "other" not in peft_model.peft_config


def test_several_active_adapters_is_a_clear_error():
    # No head to save, so that PEFT's own one-adapter rule for ModulesToSaveWrapper does not fire first.
    peft_model = get_peft_model(tiny_model("vit"), VisualPromptConfig(num_prompt_tokens=4, modules_to_save=[]))
    peft_model.add_adapter("other", VisualPromptConfig(num_prompt_tokens=2, modules_to_save=[]))
    peft_model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="one adapter at a time"):
        peft_model(pixel_values=pixels())


def test_unload_gives_back_the_pristine_model():
    base = tiny_model("deit")
    keys = list(base.state_dict())
    x = pixels()
    with torch.no_grad():
        want = base(pixel_values=x).logits
    peft_model = get_peft_model(base, VisualPromptConfig(num_prompt_tokens=4))
    with torch.no_grad():  # as if trained: the head copy and the prompts move
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    unloaded = peft_model.unload()
    assert list(unloaded.state_dict()) == keys
    assert type(unloaded.deit.layers[0]).__name__ == "DeiTLayer"
    with torch.no_grad():
        assert torch.equal(unloaded(pixel_values=x).logits, want)


def test_merge_is_refused_with_an_explanation():
    peft_model = get_peft_model(tiny_model("vit"), VisualPromptConfig(num_prompt_tokens=4))
    with pytest.raises(ValueError, match="cannot be merged"):
        peft_model.merge_and_unload()


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        base = tiny_model("vit")
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model = get_peft_model(base, VisualPromptConfig(num_prompt_tokens=4)).train()
        torch.manual_seed(0)
        peft_model(pixel_values=pixels(), labels=torch.tensor([0, 2])).loss.backward()
        grads.append([p.grad.clone() for p in prompts_of(peft_model)])
    for a, b in zip(*grads):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_runs_close_to_fp32():
    peft_model = get_peft_model(tiny_model("vit"), VisualPromptConfig(num_prompt_tokens=4)).eval()
    x = pixels()
    with torch.no_grad():
        full = peft_model(pixel_values=x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = peft_model(pixel_values=x).logits
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, atol=5e-2, rtol=5e-2)


def test_bf16_model_keeps_fp32_prompts():
    peft_model = get_peft_model(tiny_model("vit").to(torch.bfloat16), VisualPromptConfig(num_prompt_tokens=4))
    assert all(p.dtype == torch.float32 for p in prompts_of(peft_model))
    out = peft_model(pixel_values=pixels().to(torch.bfloat16), labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in prompts_of(peft_model))


def test_xavier_uniform_bound_follows_vpt():
    peft_model = get_peft_model(tiny_model("vit"), VisualPromptConfig(num_prompt_tokens=200))
    bound = (6.0 / (3 * 8**2 + 32)) ** 0.5
    prompts = torch.cat(prompts_of(peft_model))
    assert prompts.abs().max() <= bound
    assert prompts.abs().max() > 0.9 * bound  # uniform over the whole range, not a narrower init
    zeros = get_peft_model(tiny_model("vit"), VisualPromptConfig(num_prompt_tokens=3, prompt_init="zeros"))
    assert all(torch.count_nonzero(p) == 0 for p in prompts_of(zeros))
