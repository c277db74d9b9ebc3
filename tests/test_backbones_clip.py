"""CLIP and MetaCLIP 2: prompts in the vision tower only, after the CLS token and the pre-layernorm, stripped before
the post-layernorm pooler, the projection and the classifier; against a hand-written forward (deep and shallow, eager
and sdpa); the text tower untouched; SPT."""

import pytest
import torch
from backbone_helpers import build, check_against_reference, check_spt, layer_prompts, prompt_layers, wrap
from references import clip_reference
from peft import get_peft_model
from transformers import (
    CLIPConfig,
    CLIPForImageClassification,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    MetaClip2Config,
    MetaClip2ForImageClassification,
    MetaClip2Model,
    MetaClip2VisionConfig,
    MetaClip2VisionModel,
    MetaClip2VisionModelWithProjection,
)

from peft_visual_prompt import VisualPromptConfig
from peft_visual_prompt.heads import find_heads

VISION = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=99,
            max_position_embeddings=16)
PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
INPUT_IDS = torch.randint(0, 99, (3, 7), generator=torch.Generator().manual_seed(2))

CASES = {
    # name: (model class, config factory, compared outputs)
    "CLIPVisionModel": (CLIPVisionModel, lambda: CLIPVisionConfig(**VISION), ("last_hidden_state", "pooler_output")),
    "CLIPVisionModelWithProjection": (CLIPVisionModelWithProjection,
                                      lambda: CLIPVisionConfig(**VISION, projection_dim=16),
                                      ("last_hidden_state", "image_embeds")),
    "CLIPForImageClassification": (CLIPForImageClassification,
                                   lambda: CLIPConfig(vision_config=VISION, text_config=TEXT, num_labels=5),
                                   ("logits",)),
    "CLIPModel": (CLIPModel, lambda: CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=16),
                  ("image_embeds", "text_embeds", "logits_per_image")),
    "MetaClip2VisionModel": (MetaClip2VisionModel, lambda: MetaClip2VisionConfig(**VISION),
                             ("last_hidden_state", "pooler_output")),
    "MetaClip2VisionModelWithProjection": (MetaClip2VisionModelWithProjection,
                                           lambda: MetaClip2VisionConfig(**VISION, projection_dim=16),
                                           ("last_hidden_state", "image_embeds")),
    "MetaClip2ForImageClassification": (MetaClip2ForImageClassification,
                                        lambda: MetaClip2Config(vision_config=VISION, text_config=TEXT, num_labels=5),
                                        ("logits",)),
    "MetaClip2Model": (MetaClip2Model,
                       lambda: MetaClip2Config(vision_config=VISION, text_config=TEXT, projection_dim=16),
                       ("image_embeds", "text_embeds", "logits_per_image")),
}


def _inputs(model):
    return {"pixel_values": PIXELS, **({"input_ids": INPUT_IDS} if hasattr(model, "text_model") else {})}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is faster


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_matches_the_hand_written_forward(name, attn, deep):
    model_cls, config, names = CASES[name]
    base = build(model_cls, config(), attn)
    # Heads are stated here, independently of find_heads (see test_heads_found_for_clip_classes).
    heads = ["classifier"] if hasattr(base, "classifier") else []
    pristine, peft_model = check_against_reference(base, clip_reference, deep, names, 1, _inputs(base),
                                                   modules_to_save=heads)
    layers = [n for n, _ in prompt_layers(peft_model)]
    tower = "" if not hasattr(base, "vision_model") else "vision_model."
    assert layers == [f"{tower}encoder.layers.{i}" for i in range(3)]


@pytest.mark.parametrize("name", ["CLIPModel", "MetaClip2Model"])
def test_two_tower_model_prompts_only_the_vision_tower(name):
    model_cls, config, _ = CASES[name]
    pristine, peft_model = wrap(build(model_cls, config()), deep=True)
    assert all(n.startswith("vision_model.") for n, _ in prompt_layers(peft_model))
    assert peft_model.peft_config["default"].modules_to_save == []  # the projections are pretrained: frozen
    with torch.no_grad():
        got = peft_model(**_inputs(pristine))
        base = pristine(**_inputs(pristine))
        text_only = peft_model.get_text_features(input_ids=INPUT_IDS).pooler_output
    torch.testing.assert_close(got.text_embeds, base.text_embeds, atol=0, rtol=0)
    torch.testing.assert_close(text_only, pristine.get_text_features(input_ids=INPUT_IDS).pooler_output)
    assert not torch.allclose(got.image_embeds, base.image_embeds)
    # get_image_features runs through the prompted vision tower too
    with torch.no_grad():
        features = peft_model.get_image_features(pixel_values=PIXELS).pooler_output
    torch.testing.assert_close(features / features.norm(dim=-1, keepdim=True), got.image_embeds, atol=1e-5, rtol=0)


def test_target_modules_reaching_into_the_text_tower_are_refused():
    base = build(CLIPModel, CASES["CLIPModel"][1]())
    config = VisualPromptConfig(num_prompt_tokens=2, target_modules=r".*encoder\.layers\.\d+")
    with pytest.raises(ValueError, match="text tower"):
        get_peft_model(base, config)


def test_pre_layernorm_runs_before_the_prompts():
    """Prompts enter after `pre_layrnorm`: scaling its output would change the patches but not the prompts, so a model
    whose pre-layernorm is perturbed must still match the reference (which applies it before inserting)."""
    model_cls, config, names = CASES["CLIPVisionModel"]
    base = build(model_cls, config())
    with torch.no_grad():
        base.pre_layrnorm.weight.mul_(3.0)
        base.pre_layrnorm.bias.add_(0.5)
    check_against_reference(base, clip_reference, True, names, 1, _inputs(base))


def test_heads_found_for_clip_classes():
    found = {name: find_heads(build(cls, config())) for name, (cls, config, _) in CASES.items()}
    assert found == {
        "CLIPVisionModel": [], "CLIPVisionModelWithProjection": [], "CLIPForImageClassification": ["classifier"],
        "CLIPModel": [], "MetaClip2VisionModel": [], "MetaClip2VisionModelWithProjection": [],
        "MetaClip2ForImageClassification": ["classifier"],
        "MetaClip2Model": [],
    }


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_spt_initialises_clip_prompts(deep):
    base = build(CLIPVisionModel, CASES["CLIPVisionModel"][1]())
    batches = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    check_spt(base, batches, deep)


def test_spt_runs_on_a_two_tower_model():
    base = build(CLIPModel, CASES["CLIPModel"][1]())
    batches = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    check_spt(base, batches, True, forward_kwargs={"input_ids": INPUT_IDS})


@pytest.mark.parametrize("name", ["CLIPForImageClassification", "CLIPModel"])
def test_gradient_checkpointing_enabled_before_wrapping(name):
    """These classes' own `get_input_embeddings` raises NotImplementedError (their vision tower has one): gradient
    checkpointing switched on before get_peft_model must still work, with the prompt gradients of a plain run."""
    model_cls, config, _ = CASES[name]
    inputs = {"pixel_values": PIXELS, **({"input_ids": INPUT_IDS} if name == "CLIPModel" else {})}
    grads = []
    for checkpointing in (False, True):
        base = build(model_cls, config(), "eager")
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        _, peft_model = wrap(base, False, modules_to_save=[])
        peft_model.train()
        output = peft_model(**inputs)
        (output.logits if name != "CLIPModel" else output.logits_per_image).pow(2).mean().backward()
        grads.append(layer_prompts(peft_model)[0].grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
