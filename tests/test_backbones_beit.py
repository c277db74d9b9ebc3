"""BEiT: the layer's own relative position bias and the model's shared one are zero-padded at the prompt positions;
against a hand-written forward whose biases are built from the tables by hand (deep and shallow, eager and sdpa, each
bias kind, CLS and mean pooling, backbone); a user padding mask with the shared bias; another resolution; the bias hook
is stateless and removed by unload; SPT."""

import pytest
import torch
from backbone_helpers import build, check_against_reference, check_spt, layer_prompts, prompt_layers, wrap
from model_table import perturb_beit_
from references import beit_reference
from transformers import BeitBackbone, BeitConfig, BeitForImageClassification, BeitModel

SIZE = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=32,
            patch_size=8, layer_scale_init_value=1.0)
PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
OWN = dict(use_relative_position_bias=True)
SHARED = dict(use_shared_relative_position_bias=True)
BOTH = dict(use_relative_position_bias=True, use_shared_relative_position_bias=True, use_mean_pooling=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is faster


def _beit(model_cls=BeitModel, attn="sdpa", **extra):
    model = build(model_cls, BeitConfig(**SIZE, **extra), attn)
    perturb_beit_(model)
    return model


CASES = {
    "own-bias": (BeitModel, OWN, ("last_hidden_state", "pooler_output")),
    "shared-bias": (BeitModel, SHARED, ("last_hidden_state", "pooler_output")),
    "both-cls-pool": (BeitModel, BOTH, ("last_hidden_state", "pooler_output")),
    "classifier": (BeitForImageClassification, {**OWN, "num_labels": 5}, ("logits",)),
    "backbone": (BeitBackbone, {**OWN, "out_features": ["stem", "stage2", "stage3"]}, ("feature_maps",)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_matches_the_hand_written_forward(case, attn, deep):
    model_cls, extra, names = CASES[case]
    base = _beit(model_cls, attn, **extra)
    _, peft_model = check_against_reference(base, beit_reference, deep, names, 1, {"pixel_values": PIXELS})
    tower = "beit." if hasattr(base, "beit") else ""
    assert [n for n, _ in prompt_layers(peft_model)] == [f"{tower}layers.{i}" for i in range(3)]


@pytest.mark.parametrize("attn", ["eager"])
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_user_padding_mask_with_the_shared_bias(attn, deep):
    """The mask the model passes to the layers is the shared bias plus the user's mask: the bias part is zero-padded,
    the user part padded as for ViT (prompts visible). Eager only: with sdpa, transformers 5 adds the float shared bias
    to its *bool* mask (True -> +1.0, False -> +0.0), so the base model itself does not mask padding there."""
    base = _beit(BeitModel, attn, **BOTH)
    key_mask = torch.ones(2, 17, dtype=torch.bool)
    key_mask[0, 5:9] = False
    pristine, peft_model = wrap(base, deep)
    prompts = {i: p.detach() for i, p in layer_prompts(peft_model).items()}
    with torch.no_grad():
        got = peft_model(pixel_values=PIXELS, attention_mask=key_mask)
        want = beit_reference(pristine, PIXELS, prompts, deep, key_mask=key_mask)
        unmasked = peft_model(pixel_values=PIXELS)
    torch.testing.assert_close(got.last_hidden_state, want["last_hidden_state"], atol=1e-5, rtol=0)
    assert (got.last_hidden_state[0] - unmasked.last_hidden_state[0]).abs().max() > 1e-4  # the mask took effect


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_another_resolution_with_interpolate_pos_encoding(deep):
    pixels = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(4))
    base = _beit(BeitModel, "eager", **BOTH)
    pristine, peft_model = wrap(base, deep)
    prompts = {i: p.detach() for i, p in layer_prompts(peft_model).items()}
    with torch.no_grad():
        got = peft_model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        want = beit_reference(pristine, pixels, prompts, deep, interpolate_pos_encoding=True)["last_hidden_state"]
    assert got.shape == (2, 37, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_bias_hooks_are_no_ops_when_disabled_and_gone_after_unload():
    base = _beit(BeitModel, "eager", **OWN)
    pristine, peft_model = wrap(base, True)
    hooked = [layer.base_layer.relative_position_bias for _, layer in prompt_layers(peft_model)]
    assert all(len(module._forward_hooks) == 1 for module in hooked)
    with torch.no_grad(), peft_model.disable_adapter():
        assert torch.equal(peft_model(pixel_values=PIXELS).last_hidden_state,
                           pristine(pixel_values=PIXELS).last_hidden_state)
    unloaded = peft_model.unload()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unloaded.modules())


def test_gradient_checkpointing_recomputes_the_padded_bias():
    grads = []
    for checkpointing in (False, True):
        base = _beit(BeitModel, "eager", **BOTH)
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        _, peft_model = wrap(base, False)
        peft_model.train()
        peft_model(pixel_values=PIXELS).last_hidden_state.pow(2).mean().backward()
        grads.append(layer_prompts(peft_model)[0].grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_spt_initialises_beit_prompts(deep):
    batches = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    check_spt(_beit(BeitModel, **BOTH), batches, deep)
