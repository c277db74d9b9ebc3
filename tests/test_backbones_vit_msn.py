"""ViT-MSN: a ViT with one CLS token; the classifier reads CLS after the final layernorm (the contract suite runs
ViTMSNModel and ViTMSNForImageClassification); SPT."""

import pytest
import torch
from backbone_helpers import build, check_against_reference, check_spt
from references import vit_msn_reference
from transformers import ViTMSNConfig, ViTMSNForImageClassification, ViTMSNModel

SIZE = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=32,
            patch_size=8)
PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is faster


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_classifier_reads_cls_after_the_prompts_are_stripped(attn, deep):
    base = build(ViTMSNForImageClassification, ViTMSNConfig(**SIZE, num_labels=5), attn)
    with torch.no_grad():
        base.classifier.weight.normal_(0.0, 1.0)
    _, peft_model = check_against_reference(base, vit_msn_reference, deep, ("logits",), 1, {"pixel_values": PIXELS})
    assert peft_model.peft_config["default"].num_prefix_tokens == 1
    assert peft_model.peft_config["default"].modules_to_save == ["classifier"]


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_spt_initialises_vit_msn_prompts(deep):
    batches = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    check_spt(build(ViTMSNModel, ViTMSNConfig(**SIZE)), batches, deep)
