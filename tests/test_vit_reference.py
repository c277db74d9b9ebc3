"""ViT-family specifics against the independent, hand-written prompted forward (`references.vit_reference`): user
attention masks, interpolate_pos_encoding, prompt dropout, hidden_states/attentions outputs. The PEFT contract (every
model class's outputs against the reference, adapters, training, saving) is in `test_contract.py`."""

import copy

import pytest
import torch
from peft import get_peft_model
from references import vit_reference
from tiny_models import pixels, prompts_of, tiny_model

from peft_visual_prompt import VisualPromptConfig


def _wrapped(model_type, attn, deep, num_prompts=4, **cfg):
    base = tiny_model(model_type, attn)
    reference_base = copy.deepcopy(base)
    peft_model = get_peft_model(base, VisualPromptConfig(num_prompt_tokens=num_prompts, deep=deep, **cfg)).eval()
    return reference_base, peft_model


def layer_prompts(peft_model) -> dict[int, torch.Tensor]:
    """{layer index: prompts}: deep, every layer; shallow, the first."""
    return dict(enumerate(prompts_of(peft_model)))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_user_attention_mask_is_padded_for_prompts(attn, deep):
    reference_base, peft_model = _wrapped("vit", attn, deep)
    x = pixels()
    key_mask = torch.ones(2, 17, dtype=torch.bool)
    key_mask[0, 5:9] = False  # hide four patches of the first image
    with torch.no_grad():
        got = peft_model(pixel_values=x, attention_mask=key_mask).logits
        want = vit_reference(reference_base, x, layer_prompts(peft_model), deep, 1, key_mask=key_mask)["logits"]
        unmasked = peft_model(pixel_values=x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got[0] - unmasked[0]).abs().max() > 1e-4  # the mask took effect


def test_interpolate_pos_encoding_at_another_resolution():
    reference_base, peft_model = _wrapped("vit", "sdpa", True)
    x = pixels(size=48)
    with torch.no_grad():
        got = peft_model(pixel_values=x, interpolate_pos_encoding=True).logits
        want = vit_reference(reference_base, x, layer_prompts(peft_model), True, 1,
                             interpolate_pos_encoding=True)["logits"]
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
    want = vit_reference(reference_base, x, layer_prompts(peft_model), deep, 1)["hidden_states"]
    for got, expected in zip(out.hidden_states, want, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(out.hidden_states[-1], base.hidden_states[-1])
    # Attention maps cover the prompted sequence: prompts sit at [1, 1 + 4).
    assert [a.shape[-1] for a in out.attentions] == [17 + 4] * 3
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 4, 21))
