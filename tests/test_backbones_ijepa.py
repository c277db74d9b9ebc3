"""I-JEPA: no CLS token, so prompts go first; the classifier's mean over all tokens and the optional first-token
pooler see the base layout (the contract suite runs IJepaModel and IJepaForImageClassification); SPT."""

import pytest
import torch
from backbone_helpers import build, check_against_reference, check_spt, prompt_layers
from references import ijepa_reference
from transformers import IJepaConfig, IJepaModel

SIZE = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=32,
            patch_size=8)
PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is faster


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_pooler_reads_the_first_patch_not_a_prompt(attn, deep):
    """IJepaModel(add_pooling_layer=True) pools the first token, which is a patch: prompts must be gone by then."""
    torch.manual_seed(0)
    base = IJepaModel(IJepaConfig(**SIZE), add_pooling_layer=True).eval()
    base.set_attn_implementation(attn)
    _, peft_model = check_against_reference(base, ijepa_reference, deep, ("last_hidden_state", "pooler_output"), 0,
                                            {"pixel_values": PIXELS})
    assert peft_model.peft_config["default"].num_prefix_tokens == 0
    assert [n for n, _ in prompt_layers(peft_model)] == [f"layers.{i}" for i in range(3)]


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_spt_initialises_ijepa_prompts(deep):
    batches = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    check_spt(build(IJepaModel, IJepaConfig(**SIZE)), batches, deep)
