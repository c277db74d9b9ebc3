"""Data2Vec-Vision: BEiT's relative position biases (the layer's own and the encoder's shared one, which the encoder
computes from the length it hands over) zero-padded at the prompt positions; against a hand-written forward with the
biases built from their tables (deep and shallow, eager and sdpa attention classes); the encoder's collected hidden
states keep the base layout; another resolution; SPT."""

import pytest
import torch
from backbone_helpers import check_against_reference, check_spt, layer_prompts, prompt_layers, wrap
from model_table import perturb_beit_
from references import data2vec_vision_reference
from transformers import Data2VecVisionConfig, Data2VecVisionForImageClassification, Data2VecVisionModel

SIZE = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=32,
            patch_size=8, layer_scale_init_value=1.0)
PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
OWN = dict(use_relative_position_bias=True)
SHARED = dict(use_shared_relative_position_bias=True, use_mean_pooling=False)
BOTH = dict(use_relative_position_bias=True, use_shared_relative_position_bias=True)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is faster


def _model(model_cls=Data2VecVisionModel, attn="sdpa", **extra):
    """Data2Vec-Vision picks its attention class when built, so the implementation goes into the config."""
    torch.manual_seed(0)
    config = Data2VecVisionConfig(**SIZE, **extra)
    config._attn_implementation = attn
    model = model_cls(config).eval()
    perturb_beit_(model)  # a BEiT copy: the same zero-initialised tables
    return model


CASES = {
    "own-bias": (Data2VecVisionModel, OWN, ("last_hidden_state",)),
    "shared-bias": (Data2VecVisionModel, SHARED, ("last_hidden_state",)),
    "classifier-both": (Data2VecVisionForImageClassification, {**BOTH, "num_labels": 5}, ("logits",)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_matches_the_hand_written_forward(case, attn, deep):
    model_cls, extra, names = CASES[case]
    base = _model(model_cls, attn, **extra)
    _, peft_model = check_against_reference(base, data2vec_vision_reference, deep, names, 1, {"pixel_values": PIXELS})
    tower = "data2vec_vision." if hasattr(base, "data2vec_vision") else ""
    assert [n for n, _ in prompt_layers(peft_model)] == [f"{tower}encoder.layer.{i}" for i in range(3)]


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_collected_hidden_states_keep_the_base_layout(deep):
    base = _model(Data2VecVisionModel, "eager", **BOTH)
    pristine, peft_model = wrap(base, deep)
    prompts = {i: p.detach() for i, p in layer_prompts(peft_model).items()}
    with torch.no_grad():
        got = peft_model(pixel_values=PIXELS, output_hidden_states=True).hidden_states
        want = data2vec_vision_reference(pristine, PIXELS, prompts, deep)["hidden_states"]
    assert [h.shape for h in got] == [(2, 17, 32)] * 4
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_another_resolution_with_interpolate_pos_encoding(deep):
    pixels = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(4))
    pristine, peft_model = wrap(_model(Data2VecVisionModel, "eager", **BOTH), deep)
    prompts = {i: p.detach() for i, p in layer_prompts(peft_model).items()}
    with torch.no_grad():
        got = peft_model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        want = data2vec_vision_reference(pristine, pixels, prompts, deep,
                                         interpolate_pos_encoding=True)["last_hidden_state"]
    assert got.shape == (2, 37, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_unload_removes_every_hook():
    pristine, peft_model = wrap(_model(Data2VecVisionModel, "eager", **BOTH), True)
    assert any(m._forward_hooks for m in peft_model.modules())
    unloaded = peft_model.unload()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unloaded.modules())
    with torch.no_grad():
        assert torch.equal(unloaded(pixel_values=PIXELS).last_hidden_state,
                           pristine(pixel_values=PIXELS).last_hidden_state)


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_spt_initialises_data2vec_vision_prompts(deep):
    batches = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    check_spt(_model(Data2VecVisionModel, **BOTH), batches, deep)
