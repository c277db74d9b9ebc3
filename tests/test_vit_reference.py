"""The plugin's forward against an independent, hand-written prompted forward (tests/tiny_models.py)."""

import copy

import pytest
import torch
from peft import get_peft_model
from tiny_models import VIT_FAMILY, pixels, prompts_of, reference_logits, tiny_model

from peft_visual_prompt import VisualPromptConfig


def _wrapped(model_type, attn, deep, num_prompts=4, **cfg):
    base = tiny_model(model_type, attn)
    reference_base = copy.deepcopy(base)
    peft_model = get_peft_model(base, VisualPromptConfig(num_prompt_tokens=num_prompts, deep=deep, **cfg)).eval()
    return reference_base, peft_model


@pytest.mark.parametrize("model_type", list(VIT_FAMILY))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_logits_match_reference(model_type, attn, deep):
    reference_base, peft_model = _wrapped(model_type, attn, deep)
    x = pixels()
    prompts = prompts_of(peft_model)
    assert len(prompts) == (3 if deep else 1)
    with torch.no_grad():
        got = peft_model(pixel_values=x).logits
        want = reference_logits(reference_base, prompts, x, deep, VIT_FAMILY[model_type][3])
        base = reference_base(pixel_values=x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - base).abs().max() > 1e-3, "prompts must change the output"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_user_attention_mask_is_padded_for_prompts(attn, deep):
    reference_base, peft_model = _wrapped("vit", attn, deep)
    x = pixels()
    key_mask = torch.ones(2, 17, dtype=torch.bool)
    key_mask[0, 5:9] = False  # hide four patches of the first image
    with torch.no_grad():
        got = peft_model(pixel_values=x, attention_mask=key_mask).logits
        want = reference_logits(reference_base, prompts_of(peft_model), x, deep, 1, key_mask=key_mask)
        unmasked = peft_model(pixel_values=x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got[0] - unmasked[0]).abs().max() > 1e-4  # the mask took effect


def test_interpolate_pos_encoding_at_another_resolution():
    reference_base, peft_model = _wrapped("vit", "sdpa", True)
    x = pixels(size=48)
    with torch.no_grad():
        got = peft_model(pixel_values=x, interpolate_pos_encoding=True).logits
        want = reference_logits(reference_base, prompts_of(peft_model), x, True, 1, interpolate_pos_encoding=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_projection_maps_prompts_to_hidden_size():
    reference_base, peft_model = _wrapped("vit", "sdpa", True, projection_dim=6)
    projection = peft_model.base_model.model.vit.layers[0].visual_prompt_projection["default"]
    raw = prompts_of(peft_model)
    assert all(p.shape == (4, 6) for p in raw)
    x = pixels()
    with torch.no_grad():
        got = peft_model(pixel_values=x).logits
        want = reference_logits(reference_base, [projection(p) for p in raw], x, True, 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_prompt_dropout_is_active_in_train_mode_only():
    _, peft_model = _wrapped("vit", "sdpa", True, prompt_dropout=0.5)
    x = pixels()
    with torch.no_grad():
        eval_a, eval_b = peft_model(pixel_values=x).logits, peft_model(pixel_values=x).logits
        peft_model.train()
        torch.manual_seed(0)
        train_a = peft_model(pixel_values=x).logits
        torch.manual_seed(1)
        train_b = peft_model(pixel_values=x).logits
    assert torch.equal(eval_a, eval_b)
    assert not torch.allclose(train_a, train_b)


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_hidden_states_keep_the_base_layout(deep):
    """Every hidden state is the prompt-free sequence between layers: the input embeddings first, then each layer's
    image and prefix tokens, so dense heads can reshape them into a grid."""
    reference_base, peft_model = _wrapped("dinov2", "eager", deep)
    x = pixels()
    with torch.no_grad():
        out = peft_model(pixel_values=x, output_hidden_states=True, output_attentions=True)
        base = reference_base(pixel_values=x, output_hidden_states=True, output_attentions=True)
        embeddings = reference_base.dinov2.embeddings(x)
    assert [h.shape for h in out.hidden_states] == [h.shape for h in base.hidden_states]
    torch.testing.assert_close(out.hidden_states[0], embeddings)
    assert not torch.allclose(out.hidden_states[-1], base.hidden_states[-1])
    # Attention maps cover the prompted sequence: prompts sit at [1, 1 + 4).
    assert [a.shape[-1] for a in out.attentions] == [17 + 4] * 3
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 4, 21))


def test_dense_backbone_feature_maps_have_base_shapes():
    from transformers import Dinov2Backbone, Dinov2Config

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                          image_size=32, patch_size=8, out_features=["stage1", "stage3"])
    base = Dinov2Backbone(config).eval()
    reference = copy.deepcopy(base)
    peft_model = get_peft_model(base, VisualPromptConfig(num_prompt_tokens=4))
    assert peft_model.peft_config["default"].modules_to_save == []
    x = pixels()
    with torch.no_grad():
        got = peft_model(pixel_values=x).feature_maps
        want = reference(pixel_values=x).feature_maps
    assert [f.shape for f in got] == [f.shape for f in want] == [(2, 32, 4, 4)] * 2
    assert not torch.allclose(got[-1], want[-1])
