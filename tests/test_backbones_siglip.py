"""SigLIP and SigLIP 2: no CLS token (prompts first), stripped before the post-layernorm and the attention-pooling
head; SigLIP 2's padding-patch mask padded for the prompts; against a hand-written forward (deep and shallow, eager and
sdpa); SPT."""

import pytest
import torch
from backbone_helpers import build, check_against_reference, check_spt, prompt_layers, wrap
from references import siglip_reference
from transformers import (
    Siglip2Config,
    Siglip2ForImageClassification,
    Siglip2Model,
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SiglipConfig,
    SiglipForImageClassification,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from peft_visual_prompt.heads import find_heads

VISION = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, patch_size=8)
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=99,
            max_position_embeddings=16)
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
INPUT_IDS = torch.randint(0, 99, (3, 7), generator=torch.Generator().manual_seed(2))


def siglip2_inputs():
    """Variable resolution: the first image is 4x4 patches, the second 3x4 patches plus 4 padding patches."""
    patches = torch.randn(2, 16, 3 * 8 * 8, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0
    return {"pixel_values": patches, "pixel_attention_mask": mask, "spatial_shapes": torch.tensor([[4, 4], [3, 4]])}


CASES = {
    # name: (model class, config factory, compared outputs, needs text, SigLIP 2)
    "SiglipVisionModel": (SiglipVisionModel, lambda: SiglipVisionConfig(**VISION, image_size=32),
                          ("last_hidden_state", "pooler_output"), False, False),
    "SiglipForImageClassification": (SiglipForImageClassification, lambda: SiglipConfig(
        vision_config=dict(**VISION, image_size=32), text_config=TEXT, num_labels=5), ("logits",), False, False),
    "SiglipModel": (SiglipModel, lambda: SiglipConfig(vision_config=dict(**VISION, image_size=32), text_config=TEXT),
                    ("image_embeds", "text_embeds", "logits_per_image"), True, False),
    "Siglip2VisionModel": (Siglip2VisionModel, lambda: Siglip2VisionConfig(**VISION, num_patches=16),
                           ("last_hidden_state", "pooler_output"), False, True),
    "Siglip2Model": (Siglip2Model, lambda: Siglip2Config(vision_config=dict(**VISION, num_patches=16), text_config=TEXT),
                     ("image_embeds", "text_embeds", "logits_per_image"), True, True),
    "Siglip2ForImageClassification": (Siglip2ForImageClassification, lambda: Siglip2Config(
        vision_config=dict(**VISION, num_patches=16), text_config=TEXT, num_labels=5), ("logits",), False, True),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is faster


def _siglip_model_reference(base_model, pixel_values, prompts, deep, num_prefix=0, input_ids=None, **vision_inputs):
    """SiglipModel / Siglip2Model: the vision reference's pooled image embedding against the (unprompted) text
    tower."""
    out = siglip_reference(base_model.vision_model, pixel_values, prompts, deep, num_prefix, **vision_inputs)
    image = out["pooler_output"]
    text = base_model.text_model(input_ids=input_ids).pooler_output
    image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
    logits = image @ text.t() * base_model.logit_scale.exp() + base_model.logit_bias
    return {"image_embeds": image, "text_embeds": text, "logits_per_image": logits}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_matches_the_hand_written_forward(name, attn, deep):
    model_cls, config, names, text, v2 = CASES[name]
    base = build(model_cls, config(), attn)
    inputs = siglip2_inputs() if v2 else {"pixel_values": IMAGES}
    if text:
        inputs["input_ids"] = INPUT_IDS
    reference = _siglip_model_reference if text else siglip_reference
    heads = ["classifier"] if hasattr(base, "classifier") else []  # stated independently of find_heads
    _, peft_model = check_against_reference(base, reference, deep, names, 0, inputs, modules_to_save=heads)
    tower = "vision_model." if hasattr(base, "vision_model") else ""
    assert [n for n, _ in prompt_layers(peft_model)] == [f"{tower}encoder.layers.{i}" for i in range(3)]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_siglip2_padding_patches_stay_hidden(attn):
    """The padding patches of the second image are masked for every query, prompts included: changing their pixels
    changes nothing in its pooled output, with prompts as without."""
    _, peft_model = wrap(build(Siglip2VisionModel, CASES["Siglip2VisionModel"][1](), attn), deep=False)
    inputs = siglip2_inputs()
    changed = {**inputs, "pixel_values": inputs["pixel_values"].clone()}
    changed["pixel_values"][1, 12:] += 5.0
    with torch.no_grad():
        a, b = peft_model(**inputs).pooler_output, peft_model(**changed).pooler_output
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=0)


def test_siglip_head_pools_image_tokens_only():
    """The attention-pooling head reads the stripped sequence: the last hidden state has the base model's length and
    the pooler is the head applied to it."""
    pristine, peft_model = wrap(build(SiglipVisionModel, CASES["SiglipVisionModel"][1]()), deep=True)
    with torch.no_grad():
        out = peft_model(pixel_values=IMAGES)
        base = pristine(pixel_values=IMAGES)
        head = peft_model.get_base_model().head(out.last_hidden_state)
    assert out.last_hidden_state.shape == base.last_hidden_state.shape == (2, 16, 32)
    torch.testing.assert_close(out.pooler_output, head, atol=0, rtol=0)


def test_two_tower_model_leaves_the_text_tower_alone():
    pristine, peft_model = wrap(build(SiglipModel, CASES["SiglipModel"][1]()), deep=True)
    assert all(n.startswith("vision_model.") for n, _ in prompt_layers(peft_model))
    assert peft_model.peft_config["default"].modules_to_save == []
    with torch.no_grad():
        got = peft_model(pixel_values=IMAGES, input_ids=INPUT_IDS)
        base = pristine(pixel_values=IMAGES, input_ids=INPUT_IDS)
    torch.testing.assert_close(got.text_embeds, base.text_embeds, atol=0, rtol=0)


def test_heads_found_for_siglip_classes():
    found = {name: find_heads(build(cls, config())) for name, (cls, config, *_) in CASES.items()}
    assert found == {"SiglipVisionModel": [], "SiglipForImageClassification": ["classifier"], "SiglipModel": [],
                     "Siglip2VisionModel": [], "Siglip2Model": [],
                     "Siglip2ForImageClassification": ["classifier"]}


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_spt_initialises_siglip_prompts(deep):
    base = build(SiglipVisionModel, CASES["SiglipVisionModel"][1]())
    batches = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    check_spt(base, batches, deep)


def test_spt_refuses_siglip2_patch_inputs_clearly():
    """SigLIP 2 takes pre-patchified (batch, patches, channels * patch**2) inputs, not images; SPT's pass needs
    (batch, channels, height, width) images and says so."""
    from peft_visual_prompt import initialize_prompts

    _, peft_model = wrap(build(Siglip2VisionModel, CASES["Siglip2VisionModel"][1]()), deep=True)
    inputs = siglip2_inputs()
    with pytest.raises(ValueError, match="batch, channels, height, width"):
        initialize_prompts(peft_model, [{"pixel_values": inputs["pixel_values"]}], "mean",
                           forward_kwargs={k: v for k, v in inputs.items() if k != "pixel_values"})
