"""SPT's prompt-patch NMI (`peft_visual_prompt.spt.nmi`) against known answers, not re-implementations.

The estimator is the paper's: the sigmoid-normalised cross attention of the prompts over the patch tokens as the
joint distribution, NMI after Estevez et al. (2009); docs/nmi.md. Known answers: a table that is a permutation has
NMI 1, a product table 0; prompts sitting at the centres of tightly clustered patch tokens share nearly all their
information with them (high NMI), prompts drawn independently of the patches share almost none (NMI near 0); and
neither verdict may depend on the tokens' scale or on a large offset shared by every token (the residual stream of a
ViT has both: the former estimator fell to 0 or rose by accident with them).
"""

import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import tiny_model  # noqa: E402

from peft_visual_prompt import VisualPromptConfig  # noqa: E402
from peft_visual_prompt.spt import attention_nmi, nmi_from_joint, nmi_from_logits, nmi_from_tokens  # noqa: E402
from peft_visual_prompt.spt.nmi import attention_parts, cross_attention_logits  # noqa: E402

HIGH, LOW = 0.8, 0.06


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def clustered(num_prompts=4, patches=64, dim=256, images=2, spread=0.05, seed=0):
    """Patch tokens tightly around `num_prompts` random (hence well-separated, in 256-d) centres; the prompts at
    those centres; and prompts drawn independently of everything."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_prompts, dim, generator=g)
    labels = torch.arange(patches) % num_prompts
    tokens = centres[labels] + spread * torch.randn(images, patches, dim, generator=g)
    independent = torch.randn(images, num_prompts, dim, generator=g)
    return centres.expand(images, -1, -1), tokens, independent


def test_nmi_of_a_permutation_table_is_one_and_of_a_product_table_zero():
    assert nmi_from_joint(torch.eye(5)[torch.randperm(5)]).item() == pytest.approx(1.0, abs=1e-12)
    rows, cols = torch.rand(4, dtype=torch.float64), torch.rand(30, dtype=torch.float64)
    assert nmi_from_joint(rows[:, None] * cols[None, :]).item() == pytest.approx(0.0, abs=1e-12)
    # Estevez's normalisation, I / min(H): 2 prompts each owning half of 8 patches share all of the prompt's
    # information (I = H(prompt) = log 2), though the patch entropy is log 8.
    blocks = torch.zeros(2, 8, dtype=torch.float64)
    blocks[0, :4] = blocks[1, 4:] = 1
    assert nmi_from_joint(blocks).item() == pytest.approx(1.0, abs=1e-12)


def test_per_query_logit_offsets_do_not_change_the_nmi():
    """Softmax attention ignores a constant added to one query's logits (a key bias does that): so does the NMI."""
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(3, 5, 40, generator=g, dtype=torch.float64)
    shifted = logits + 50 * torch.randn(3, 5, 1, generator=g, dtype=torch.float64)
    assert nmi_from_logits(shifted) == pytest.approx(nmi_from_logits(logits), abs=1e-9)
    assert nmi_from_logits(shifted, center=False) < 0.5 * nmi_from_logits(logits)  # what centring protects against


def test_prompts_at_the_cluster_centres_give_a_high_nmi():
    prompts, patches, _ = clustered()
    assert nmi_from_tokens(prompts, patches) > HIGH
    assert nmi_from_tokens(prompts[0], patches) == pytest.approx(nmi_from_tokens(prompts, patches))  # (P, d) prompts


def test_prompts_independent_of_the_patches_give_a_nmi_near_zero():
    prompts, patches, independent = clustered()
    assert nmi_from_tokens(independent, patches) < LOW
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(patches.shape, generator=g)  # patches with no structure at all
    assert nmi_from_tokens(prompts, noise) < LOW


@pytest.mark.parametrize("transform", ["scale x10", "scale x0.01", "shared offset", "scale and offset"])
def test_the_verdicts_hold_under_scaling_and_a_large_shared_offset(transform):
    prompts, patches, independent = clustered()
    g = torch.Generator().manual_seed(2)
    offset = 1000.0 * torch.randn(patches.shape[-1], generator=g)  # far larger than the tokens' spread

    def t(x):
        if transform == "scale x10":
            return 10 * x
        if transform == "scale x0.01":
            return 0.01 * x
        if transform == "shared offset":
            return x + offset
        return 10 * x + offset

    high, low = nmi_from_tokens(t(prompts), t(patches)), nmi_from_tokens(t(independent), t(patches))
    assert high > HIGH and low < LOW, (high, low)
    assert high == pytest.approx(nmi_from_tokens(prompts, patches), abs=1e-4)
    assert low == pytest.approx(nmi_from_tokens(independent, patches), abs=1e-4)


def test_more_structure_means_more_nmi():
    """The estimator orders the cases: tighter clusters around the prompts share more information."""
    values = []
    for spread in (0.05, 0.5, 1.0, 3.0):
        prompts, patches, _ = clustered(spread=spread)
        values.append(nmi_from_tokens(prompts, patches))
    assert values == sorted(values, reverse=True) and values[0] > HIGH and values[-1] < 0.3, values


@pytest.mark.parametrize("model_type, norm_name", [("vit", "layernorm_before"), ("dinov2", "norm1")])
def test_attention_reading_uses_the_layer_norm_and_q_k_projections(model_type, norm_name):
    model = get_peft_model(tiny_model(model_type), VisualPromptConfig(num_prompt_tokens=3, deep=True))
    layer = next(m for m in model.modules() if hasattr(m, "prompts_and_patches"))
    base = layer.base_layer
    parts = attention_parts(layer)
    assert parts.norm is getattr(base, norm_name) and parts.num_heads == 4 and parts.head_dim == 8
    g = torch.Generator().manual_seed(0)
    prompts, patches = torch.randn(2, 3, 32, generator=g), torch.randn(2, 16, 32, generator=g)
    with torch.no_grad():
        q = base.attention.q_proj(getattr(base, norm_name)(prompts)).view(2, 3, 4, 8).transpose(1, 2)
        k = base.attention.k_proj(getattr(base, norm_name)(patches)).view(2, 16, 4, 8).transpose(1, 2)
        expected = q @ k.transpose(-1, -2) / 8**0.5
        torch.testing.assert_close(cross_attention_logits(prompts, patches, parts), expected)
        assert attention_nmi(prompts, patches, layer) == pytest.approx(nmi_from_logits(expected), rel=1e-5)
        # LayerNorm makes this reading scale-invariant too.
        assert attention_nmi(10 * prompts, 10 * patches, layer) == pytest.approx(
            attention_nmi(prompts, patches, layer), rel=1e-3)


def test_attention_parts_of_a_swin_block():
    from transformers import SwinConfig, SwinForImageClassification

    config = SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4)
    model = get_peft_model(SwinForImageClassification(config), VisualPromptConfig(num_prompt_tokens=3, deep=True))
    layers = [m for m in model.modules() if hasattr(m, "prompts_and_patches")]
    parts = [attention_parts(layer) for layer in layers]
    assert [p.num_heads for p in parts] == [2, 2, 4, 4] and [p.head_dim for p in parts] == [8, 8, 8, 8]
    assert all(p.norm is layer.base_layer.layernorm_before for p, layer in zip(parts, layers))
