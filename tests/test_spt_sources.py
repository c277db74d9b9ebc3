"""SPT's token sources and pooling windows, checked exactly.

- `first_layer_tokens="patch_embeddings"` (SPT's official code): the first prompted layer's prototypes come from the
  patch-embedding module's output, before the position embedding, CLS excluded; computed by hand here.
- `"embeddings"`: that layer's input (position embedding included), prefix tokens excluded.
- Mean/max pooling windows: torch.tensor_split's near-equal windows, boundaries written out by hand.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import get_peft_model

sys.path.insert(0, str(Path(__file__).parent))
from test_spt import batches, owned_prompts, prompted, smallest_keys  # noqa: E402
from tiny_models import VIT_FAMILY, tiny_model  # noqa: E402

from peft_visual_prompt import VisualPromptConfig  # noqa: E402
from peft_visual_prompt.spt import initialize_prompts, kmeans, priority_keys  # noqa: E402
from peft_visual_prompt.spt.strategies import pool_windows  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def backbone(model):
    return getattr(model, model.base_model_prefix)


@pytest.mark.parametrize("model_type", ["vit", "dinov2_with_registers"])
@pytest.mark.parametrize("deep", [True, False])
def test_patch_embeddings_source_equals_the_patch_embedding_output_computed_by_hand(model_type, deep):
    data = batches()
    model, reference = prompted(model_type, deep=deep)
    initialize_prompts(model, data, "random", seed=3, first_layer_tokens="patch_embeddings")
    by_embeddings, _ = prompted(model_type, deep=deep)
    initialize_prompts(by_embeddings, data, "random", seed=3)  # default source
    num_prefix = VIT_FAMILY[model_type][3]
    with torch.no_grad():
        patch = torch.cat([backbone(reference).embeddings.patch_embeddings(b["pixel_values"]) for b in data])
        embedded = torch.cat([backbone(reference).embeddings(b["pixel_values"])[:, num_prefix:] for b in data])
    assert patch.shape == embedded.shape and not torch.allclose(patch, embedded)  # position embedding differs
    picks = smallest_keys(3, 0, patch.shape[0], patch.shape[1], 4)
    got, default = owned_prompts(model), owned_prompts(by_embeddings)
    torch.testing.assert_close(got[0], torch.stack([patch[s, t] for s, t in picks]), rtol=0, atol=0)
    torch.testing.assert_close(default[0], torch.stack([embedded[s, t] for s, t in picks]), rtol=0, atol=0)
    for a, b in zip(got[1:], default[1:]):  # later layers read their input tokens either way
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert model.peft_config["default"].spt_init["first_layer_tokens"] == "patch_embeddings"
    assert by_embeddings.peft_config["default"].spt_init["first_layer_tokens"] == "embeddings"


def test_patch_embeddings_source_with_kmeans_and_interpolated_positions():
    """The source is the patch embeddings whatever the position embedding does (here: interpolated to 48 px)."""
    data = batches(2, 4, size=48)
    model, reference = prompted("vit")
    stats = initialize_prompts(model, data, "kmeans", first_layer_tokens="patch_embeddings",
                               forward_kwargs={"interpolate_pos_encoding": True})
    assert stats["layers"][0]["tokens_per_image"] == 36 and stats["layers"][0]["tokens_used"] == 8 * 36
    with torch.no_grad():
        patch = torch.cat([reference.vit.embeddings.patch_embeddings(b["pixel_values"]) for b in data])
    # K-means of exactly those tokens, identified by the same priority keys, gives the same centroids.
    keys = torch.from_numpy(priority_keys(0, 0, np.arange(8), 36)).flatten()
    expected = kmeans(patch.reshape(-1, 32), 4, seed=0, keys=keys).centroids
    torch.testing.assert_close(owned_prompts(model)[0], expected, rtol=1e-5, atol=1e-5)


def test_patch_embeddings_source_refuses_a_first_prompted_layer_that_is_not_the_first():
    base = tiny_model("vit")
    config = VisualPromptConfig(num_prompt_tokens=4, deep=True, target_modules=r".*layers\.(1|2)")
    model = get_peft_model(base, config)
    with pytest.raises(ValueError, match="only the backbone's first layer receives"):
        initialize_prompts(model, batches(1), "random", first_layer_tokens="patch_embeddings")
    with pytest.raises(ValueError, match="first_layer_tokens must be one of"):
        initialize_prompts(model, batches(1), "random", first_layer_tokens="pixels")


# ------------------------------------------------------------------------------------------------ pooling windows

# (tokens per image L, prompts P) -> window boundaries, written out by hand: P contiguous windows covering all L
# tokens, sizes differing by at most one, the larger ones first (torch.tensor_split).
WINDOWS = {
    (10, 4): [(0, 3), (3, 6), (6, 8), (8, 10)],
    (16, 4): [(0, 4), (4, 8), (8, 12), (12, 16)],
    (7, 3): [(0, 3), (3, 5), (5, 7)],
    (196, 10): [(0, 20), (20, 40), (40, 60), (60, 80), (80, 100), (100, 120), (120, 139), (139, 158), (158, 177),
                (177, 196)],
    (5, 5): [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)],
}


@pytest.mark.parametrize("length, prompts", sorted(WINDOWS))
def test_pooling_windows_are_exactly_the_documented_ones(length, prompts):
    g = torch.Generator().manual_seed(length)
    tokens = torch.randn(2, length, 3, generator=g, dtype=torch.float64)
    bounds = WINDOWS[(length, prompts)]
    assert bounds[0][0] == 0 and bounds[-1][1] == length and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    mean = torch.stack([tokens[:, a:b].mean(1) for a, b in bounds], 1)
    top = torch.stack([tokens[:, a:b].amax(1) for a, b in bounds], 1)
    torch.testing.assert_close(pool_windows(tokens, prompts, "mean"), mean, rtol=0, atol=1e-15)
    torch.testing.assert_close(pool_windows(tokens, prompts, "max"), top, rtol=0, atol=0)


@pytest.mark.parametrize("strategy", ["mean", "max"])
def test_pooled_prototypes_use_those_windows(strategy):
    """Through `initialize_prompts`: 16 tokens a layer and 3 prompts give windows [0, 6), [6, 11), [11, 16)."""
    data = batches()
    model, reference = prompted("vit", num_prompt_tokens=3)
    initialize_prompts(model, data, strategy, seed=7)
    with torch.no_grad():
        hidden = [torch.cat(h) for h in zip(*[reference(pixel_values=b["pixel_values"], output_hidden_states=True)
                                                .hidden_states for b in data])]
    bounds = [(0, 6), (6, 11), (11, 16)]
    for i, got in enumerate(owned_prompts(model)):
        x = hidden[i][:, 1:].double().numpy()
        pool = np.mean if strategy == "mean" else np.max
        expected = np.stack([pool(x[s, bounds[w][0] : bounds[w][1]], axis=0)
                             for s, w in smallest_keys(7, i, x.shape[0], 3, 3)])
        np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)
