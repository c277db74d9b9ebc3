"""What is saved, loading under another adapter name, and the Hub round trip through the real client.

Reloading in a fresh process and resuming training (`is_trainable=True`) are part of the PEFT contract, checked for
every supported model class in `test_contract.py`."""

import json
import os

import torch
from huggingface_hub import HfApi
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import pixels, prompts_of, tiny_model

import peft_visual_prompt
from peft_visual_prompt import VisualPromptConfig


def _trained(model_type="vit", **config):
    peft_model = get_peft_model(tiny_model(model_type), VisualPromptConfig(num_prompt_tokens=4, **config))
    with torch.no_grad():  # give the prompts and head values unlike their initialisation
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return peft_model.eval()


def test_saved_files_hold_only_prompts_projection_and_head(tmp_path):
    peft_model = _trained(projection_dim=8)
    peft_model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(tensors) == sorted(
        [f"base_model.model.vit.layers.{i}.visual_prompt_embeddings" for i in range(3)]
        + ["base_model.model.vit.layers.0.visual_prompt_projection.weight",
           "base_model.model.vit.layers.0.visual_prompt_projection.bias",
           "base_model.model.classifier.weight", "base_model.model.classifier.bias"]
    )
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["prompted_layer_widths"] == [32, 32, 32] and config["modules_to_save"] == ["classifier"]


def test_load_adapter_adds_a_second_saved_adapter(tmp_path):
    first, second = _trained(), _trained(deep=False, projection_dim=8)
    second.save_pretrained(tmp_path)
    x = pixels()
    with torch.no_grad():
        want = second(pixel_values=x).logits
        first.load_adapter(tmp_path, adapter_name="loaded")
        first.set_adapter("loaded")
        torch.testing.assert_close(first(pixel_values=x).logits, want, atol=0, rtol=0)


def test_push_to_hub_and_load_by_repo_id_and_revision(hub_server, tmp_path):
    peft_model = _trained()
    x = pixels()
    with torch.no_grad():
        want_v1 = peft_model(pixel_values=x).logits
    peft_visual_prompt.push_to_hub(peft_model, "org/vpt-tiny")
    files = hub_server.files("org/vpt-tiny")
    assert sorted(files) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = files["README.md"].decode()
    assert "VPT-Deep: 4 prompt tokens" in card
    assert f"**Trainable parameters:** {3 * 4 * 32 + 32 * 5 + 5:,}" in card
    assert "import peft_visual_prompt" in card and "PeftModel.from_pretrained" in card
    assert "library_name: peft" in card

    # A second version on a branch; the first stays reachable by its commit.
    v1_commit = HfApi().model_info("org/vpt-tiny").sha
    with torch.no_grad():
        for p in prompts_of(peft_model):
            p.mul_(-1)
        want_v2 = peft_model(pixel_values=x).logits
    peft_visual_prompt.push_to_hub(peft_model, "org/vpt-tiny", revision="v2")

    for revision, want in ((None, want_v1), (v1_commit, want_v1), ("v2", want_v2)):
        loaded = PeftModel.from_pretrained(tiny_model("vit"), "org/vpt-tiny", revision=revision).eval()
        with torch.no_grad():
            assert torch.equal(loaded(pixel_values=x).logits, want), revision


def test_peft_model_push_to_hub_uploads_the_adapter(hub_server):
    """PEFT users' own call works too; transformers writes its generic card on a first push (see README)."""
    peft_model = _trained()
    peft_model.push_to_hub("org/vpt-plain")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(hub_server.files("org/vpt-plain"))
    loaded = PeftModel.from_pretrained(tiny_model("vit"), "org/vpt-plain").eval()
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels()).logits, peft_model(pixel_values=pixels()).logits)
