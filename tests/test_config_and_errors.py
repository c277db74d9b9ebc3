"""Config validation and the clear errors for bad input."""

import json

import pytest
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from tiny_models import tiny_model

from peft_visual_prompt import VisualPromptConfig


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("num_prompt_tokens", 0, "integer >= 1"),
        ("num_prompt_tokens", 2.5, "integer >= 1"),
        ("prompt_dropout", 1.0, r"\[0, 1\)"),
        ("prompt_dropout", -0.1, r"\[0, 1\)"),
        ("projection_dim", 0, "integer > 0"),
        ("prompt_init", "orthogonal", "one of"),
        ("deep", "yes", "True"),
    ],
)
def test_invalid_values_name_field_value_and_allowed(field, value, allowed):
    with pytest.raises(ValueError, match=rf"VisualPromptConfig\.{field}=.*{allowed}"):
        VisualPromptConfig(**{field: value})


def test_config_round_trips_through_adapter_config_json(tmp_path):
    config = VisualPromptConfig(num_prompt_tokens=7, deep=False, prompt_dropout=0.1, projection_dim=16,
                                prompt_init="normal", target_modules=r".*layers\.\d+", num_prefix_tokens=1,
                                modules_to_save=["classifier"])
    config.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "adapter_config.json").read_text())
    assert stored["peft_type"] == "VISUAL_PROMPT"
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, VisualPromptConfig)
    assert loaded.to_dict() == config.to_dict()


def test_unsupported_model_type_lists_supported_and_explains_target_modules():
    from transformers import Swinv2Config, Swinv2ForImageClassification

    model = Swinv2ForImageClassification(Swinv2Config(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                      num_heads=[1, 2], window_size=4))
    with pytest.raises(ValueError) as error:
        get_peft_model(model, VisualPromptConfig())
    message = str(error.value)
    assert "model_type='swinv2'" in message and "cosine attention" in message
    assert "dinov2, dinov2_with_registers" in message and "target_modules" in message


def test_adapter_for_another_width_or_depth_fails_before_loading(tmp_path):
    get_peft_model(tiny_model("vit"), VisualPromptConfig(num_prompt_tokens=4)).save_pretrained(tmp_path)
    for other in (tiny_model("vit", hidden_size=48), tiny_model("vit", num_hidden_layers=2)):
        with pytest.raises(ValueError, match="does not fit this backbone"):
            PeftModel.from_pretrained(other, tmp_path)


def test_wrong_peft_type_is_refused(tmp_path):
    get_peft_model(tiny_model("vit"), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="peft_type"):
        VisualPromptConfig.from_pretrained(tmp_path)
    peft_model = get_peft_model(tiny_model("vit"), VisualPromptConfig())
    with pytest.raises(ValueError, match="different peft types"):
        peft_model.add_adapter("lora", LoraConfig(target_modules=["q_proj"]))


def test_custom_target_modules_on_unknown_model_type():
    """A ViT-like model the package does not know works once its layers and prefix tokens are named."""
    from tiny_models import pixels

    model = tiny_model("vit")
    model.config.model_type = "my_vit"
    peft_model = get_peft_model(model, VisualPromptConfig(target_modules=r"vit\.layers\.\d+", num_prefix_tokens=1))
    assert peft_model(pixel_values=pixels()).logits.shape == (2, 5)
