"""Adapter operations specific to visual prompts: one active adapter at a time, VPT's prompt initialisation.

Trainability, several adapters (switch, delete), disable, unload, merge, gradient checkpointing and bf16 are part of
the PEFT contract, checked for every supported model class in `test_contract.py`."""

import pytest
import torch
from peft import get_peft_model
from tiny_models import pixels, prompts_of, tiny_model

from peft_visual_prompt import VisualPromptConfig


def test_several_active_adapters_is_a_clear_error():
    # No head to save, so that PEFT's own one-adapter rule for ModulesToSaveWrapper does not fire first.
    peft_model = get_peft_model(tiny_model("vit"), VisualPromptConfig(num_prompt_tokens=4, modules_to_save=[]))
    peft_model.add_adapter("other", VisualPromptConfig(num_prompt_tokens=2, modules_to_save=[]))
    peft_model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="one adapter at a time"):
        peft_model(pixel_values=pixels())


def test_xavier_uniform_bound_follows_vpt():
    peft_model = get_peft_model(tiny_model("vit"), VisualPromptConfig(num_prompt_tokens=200))
    bound = (6.0 / (3 * 8**2 + 32)) ** 0.5
    prompts = torch.cat(prompts_of(peft_model))
    assert prompts.abs().max() <= bound
    assert prompts.abs().max() > 0.9 * bound  # uniform over the whole range, not a narrower init
    zeros = get_peft_model(tiny_model("vit"), VisualPromptConfig(num_prompt_tokens=3, prompt_init="zeros"))
    assert all(torch.count_nonzero(p) == 0 for p in prompts_of(zeros))
