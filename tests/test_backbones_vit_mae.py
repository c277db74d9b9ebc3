"""ViT-MAE: masking configs are refused with the fix named; with mask_ratio=0.0 the prompted forward matches the
hand-written one for a given shuffle (deep and shallow, eager and sdpa), is exact whatever the shuffle (prompts sit
after CLS, the layers are permutation-equivariant), and equals the recommended path (the same weights in ViTModel); SPT."""

import pytest
import torch
from backbone_helpers import build, check_against_reference, check_spt, layer_prompts, wrap
from peft import get_peft_model
from references import vit_mae_reference
from transformers import ViTConfig, ViTMAEConfig, ViTMAEModel, ViTModel

from peft_visual_prompt import VisualPromptConfig

SIZE = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=32,
            patch_size=8)
PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
NOISE = torch.rand(2, 16, generator=torch.Generator().manual_seed(2))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is faster


def _unshuffled(output):
    """last_hidden_state in image order: CLS, then the patches put back with ids_restore."""
    hidden, restore = output["last_hidden_state"], output["ids_restore"]
    patches = torch.gather(hidden[:, 1:], 1, restore[..., None].expand(-1, -1, hidden.shape[-1]))
    return torch.cat([hidden[:, :1], patches], dim=1)


def test_masking_is_refused_with_the_fix_named():
    model = build(ViTMAEModel, ViTMAEConfig(**SIZE))  # MAE's default mask_ratio=0.75
    with pytest.raises(ValueError, match=r"mask_ratio=0\.75.*ViTMAEConfig\(mask_ratio=0\.0\).*ViTForImageClassification"):
        get_peft_model(model, VisualPromptConfig(num_prompt_tokens=2))


def test_masking_switched_on_after_wrapping_is_refused_at_forward():
    _, peft_model = wrap(build(ViTMAEModel, ViTMAEConfig(**SIZE, mask_ratio=0.0)), deep=True)
    peft_model.get_base_model().config.mask_ratio = 0.5
    with pytest.raises(ValueError, match="mask_ratio=0.5"):
        peft_model(pixel_values=PIXELS)
    with peft_model.disable_adapter():  # the base model itself may mask (pre-training)
        assert peft_model(pixel_values=PIXELS).last_hidden_state.shape[1] == 1 + 8


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_matches_the_hand_written_forward_for_a_given_shuffle(attn, deep):
    base = build(ViTMAEModel, ViTMAEConfig(**SIZE, mask_ratio=0.0), attn)
    check_against_reference(base, vit_mae_reference, deep, ("last_hidden_state", "ids_restore"), 1,
                            {"pixel_values": PIXELS, "noise": NOISE})


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_any_shuffle_gives_the_same_prompted_result_as_vit_model(deep):
    """The recommended path: MAE weights in ViTModel (no shuffling). ViTMAEModel(mask_ratio=0) with random shuffles
    gives the same tokens once unshuffled, with the same prompts."""
    mae = build(ViTMAEModel, ViTMAEConfig(**SIZE, mask_ratio=0.0))
    vit = ViTModel(ViTConfig(**SIZE), add_pooling_layer=False).eval()
    vit.load_state_dict(mae.state_dict())
    _, mae_peft = wrap(mae, deep)
    vit_peft = get_peft_model(vit, VisualPromptConfig(num_prompt_tokens=3, deep=deep)).eval()
    with torch.no_grad():
        for i, prompts in layer_prompts(vit_peft).items():
            prompts.copy_(layer_prompts(mae_peft)[i])
        want = vit_peft(pixel_values=PIXELS).last_hidden_state
        for seed in range(2):
            torch.manual_seed(seed)  # a random shuffle each time
            got = _unshuffled(mae_peft(pixel_values=PIXELS))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_spt_initialises_vit_mae_prompts(deep):
    base = build(ViTMAEModel, ViTMAEConfig(**SIZE, mask_ratio=0.0))
    batches = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    check_spt(base, batches, deep)
