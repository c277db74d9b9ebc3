"""DINOv3 ViT: prompts after CLS + registers get no rotary position (transformers rotates the last num_patches tokens
only); the hand-written forward, with its own rotary attention, matches (deep and shallow, eager and sdpa, with and
without registers); backbone feature maps keep the base layout; SPT."""

import pytest
import torch
from backbone_helpers import build, check_against_reference, check_spt, layer_prompts, prompt_layers, wrap
from references import dinov3_reference
from transformers import DINOv3ViTBackbone, DINOv3ViTConfig, DINOv3ViTModel
from transformers.models.dinov3_vit.modeling_dinov3_vit import apply_rotary_pos_emb

from peft_visual_prompt.heads import find_heads

SIZE = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=32,
            patch_size=8)
PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is faster


def _config(registers: int, backbone: bool = False):
    extra = dict(out_features=["stem", "stage2", "stage3"]) if backbone else {}
    return DINOv3ViTConfig(**SIZE, num_register_tokens=registers, layerscale_value=0.5, **extra)


@pytest.mark.parametrize("registers", [0, 2])
@pytest.mark.parametrize("backbone", [False, True], ids=["model", "backbone"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_matches_the_hand_written_rotary_forward(registers, backbone, attn, deep):
    model_cls = DINOv3ViTBackbone if backbone else DINOv3ViTModel
    base = build(model_cls, _config(registers, backbone), attn)
    names = ("feature_maps",) if backbone else ("last_hidden_state", "pooler_output")
    # modules_to_save stated here: find_heads mistakes DINOv3ViTModel's embeddings/norm for heads (see below)
    _, peft_model = check_against_reference(base, dinov3_reference, deep, names, 1 + registers,
                                            {"pixel_values": PIXELS}, modules_to_save=[])
    assert [n for n, _ in prompt_layers(peft_model)] == [f"model.layer.{i}" for i in range(3)]


def test_transformers_rotates_only_the_last_num_patches_tokens():
    """What the design relies on: queries/keys in front of the last num_patches positions come back untouched."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 1 + 2 + 3 + 16, 8, generator=gen), torch.randn(2, 4, 1 + 2 + 3 + 16, 8, generator=gen)
    cos, sin = torch.randn(16, 8, generator=gen), torch.randn(16, 8, generator=gen)
    q_out, k_out = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(q_out[..., :6, :], q[..., :6, :]) and torch.equal(k_out[..., :6, :], k[..., :6, :])
    assert not torch.allclose(q_out[..., 6:, :], q[..., 6:, :])


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_prompts_carry_no_position(deep):
    """With no position (rotary or added), the prompts are exchangeable: reversing their order changes nothing."""
    _, peft_model = wrap(build(DINOv3ViTModel, _config(2), "eager"), deep, modules_to_save=[])
    with torch.no_grad():
        before = peft_model(pixel_values=PIXELS).last_hidden_state
        for prompts in layer_prompts(peft_model).values():
            prompts.copy_(prompts.flip(0))
        after = peft_model(pixel_values=PIXELS).last_hidden_state
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


def test_heads_found_for_dinov3():
    assert find_heads(build(DINOv3ViTModel, _config(2))) == []


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_spt_initialises_dinov3_prompts(deep):
    base = build(DINOv3ViTBackbone, _config(2, backbone=True))
    batches = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    check_spt(base, batches, deep)
