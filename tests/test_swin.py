"""VPT for Swin, checked against an independent, hand-written Swin forward with prompts.

`reference_forward` below rebuilds the whole Swin forward from the base model's weights, one sample and one window at a
time: it writes out the padding, cyclic shift, shift-mask regions (the original slice-based construction), relative
position index, softmax attention over the explicit [prompts + window tokens] sequence with the bias and mask padded
by zeros, the window average of prompt outputs, the MLP, the patch merging (with the prompts tiled 4x) and the pooling.
It only borrows the base model's modules as weight holders (Linear, LayerNorm) and its patch embeddings. With every
prompt key masked to -inf it reproduces the base model, which checks the reference itself.
"""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch.nn import functional as F
from transformers import (
    DonutSwinConfig,
    DonutSwinModel,
    SwinBackbone,
    SwinConfig,
    SwinForImageClassification,
    SwinModel,
    Swinv2Config,
    Swinv2ForImageClassification,
)

import peft_visual_prompt  # noqa: F401  (registers the method)
from peft_visual_prompt import VisualPromptConfig
from peft_visual_prompt.backbones.swin import SwinPromptLayer

NUM_PROMPTS = 3
CONFIGS = {
    # 64 px: feature maps 16, 8, 4; the last stage equals the window, so Swin turns its shift off (the "shrink" rule).
    # 56 px: 14 and 7 are padded to the window, 7 is padded for patch merging.
    "w4": dict(image_size=64, patch_size=4, embed_dim=16, depths=[2, 2, 2], num_heads=[1, 2, 4], window_size=4),
    # Odd window (shift 1); 40 px: 10 and 5 are padded to multiples of 3.
    "w3": dict(image_size=48, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=3),
}


# --------------------------------------------------------------------------------------------------------- models


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread is faster, and immune to other processes competing for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



def tiny_swin(name: str = "w4", cls=SwinForImageClassification, attn: str = "eager", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    kwargs = {**CONFIGS[name], **overrides}
    if cls is not SwinModel:
        kwargs.setdefault("num_labels", 5)
    if cls is SwinBackbone:
        kwargs.setdefault("out_features", ["stem"] + [f"stage{i + 1}" for i in range(len(kwargs["depths"]))])
    model = cls(SwinConfig(**kwargs))
    with torch.no_grad():  # Swin initialises biases and norms to constants; make every weight matter
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.add_(0.2 * torch.randn_like(module.weight))
                module.bias.add_(0.2 * torch.randn_like(module.bias))
            if hasattr(module, "relative_position_bias_table"):
                module.relative_position_bias_table.normal_(0.0, 1.0)
        if hasattr(model, "classifier"):
            model.classifier.weight.normal_(0.0, 1.0)
    model.set_attn_implementation(attn)
    return model.eval()


def pixels(size: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def wrap(model, seed: int = 3, **config):
    """get_peft_model, with the prompts set to clearly non-zero random values."""
    peft_model = get_peft_model(model, VisualPromptConfig(num_prompt_tokens=NUM_PROMPTS, **config))
    randomize_prompts(peft_model, seed)
    return peft_model


def randomize_prompts(peft_model, seed: int, adapter: str | None = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in prompt_layers(peft_model):
            for name, prompts in layer.visual_prompt_embeddings.items():
                if adapter is None or name == adapter:
                    prompts.copy_(torch.randn(prompts.shape, generator=gen))


def swin_of(model):
    return model if isinstance(model, SwinModel) else model.swin


def prompt_layers(peft_model) -> list[SwinPromptLayer]:
    return [m for m in peft_model.modules() if isinstance(m, SwinPromptLayer)]


def plugin_prompts(peft_model, adapter: str = "default") -> dict[int, torch.Tensor]:
    """{network block index: (P, C)} for every block that owns prompts for `adapter`."""
    swin = swin_of(peft_model.get_base_model())
    blocks = [block for stage in swin.encoder.layers for block in stage.blocks]
    return {
        i: block.visual_prompt_embeddings[adapter].detach().clone()
        for i, block in enumerate(blocks)
        if isinstance(block, SwinPromptLayer) and adapter in block.visual_prompt_embeddings
    }


# ------------------------------------------------------------------------------------------------------ reference


def reference_forward(model, pixel_values, prompts: dict[int, torch.Tensor], deep: bool, *, shallow_last=None,
                      pool_prompts: bool = False, silence_prompts: bool = False, always_partition: bool = False):
    """Hand-written Swin forward with VPT prompts, on the (unwrapped) base model's weights.

    prompts: {network block index: (P, C)}. Deep: those blocks get their own prompts. Shallow: the single entry is
    inserted at that block and carried through block `shallow_last` (default: the last block).
    Returns a dict with logits (if the model has a classifier), pooled, last_hidden_state, and per stage the token
    grid before and after patch merging.
    """
    swin = swin_of(model)
    config = swin.config
    hidden, (height, width) = swin.embeddings(pixel_values)
    batch = hidden.shape[0]
    num_blocks = sum(config.depths)
    shallow_last = num_blocks - 1 if shallow_last is None else shallow_last
    carried, final_prompts = None, None
    before_merge, after_merge = [], []
    index = 0
    for stage in swin.encoder.layers:
        for b, block in enumerate(stage.blocks):
            if deep:
                block_prompts = prompts[index].expand(batch, -1, -1) if index in prompts else None
            else:
                if index in prompts:
                    carried = prompts[index].expand(batch, -1, -1)
                block_prompts = carried if index <= shallow_last else None
            shift = 0 if b % 2 == 0 else config.window_size // 2
            hidden, prompt_out = reference_block(
                block, config, hidden, (height, width), block_prompts, shift, always_partition, silence_prompts
            )
            if not deep:
                carried = prompt_out
            if pool_prompts and index == num_blocks - 1:
                final_prompts = prompt_out
            index += 1
        before_merge.append((hidden, height, width))
        if stage.downsample is not None:
            hidden = reference_merge(stage.downsample, hidden, height, width)
            if carried is not None:
                carried = stage.downsample.reduction(stage.downsample.norm(torch.cat([carried] * 4, dim=-1)))
            height, width = (height + 1) // 2, (width + 1) // 2
        after_merge.append((hidden, height, width))

    sequence = swin.layernorm(hidden)
    pooled_tokens = sequence
    if pool_prompts:
        pooled_tokens = torch.cat([sequence, swin.layernorm(final_prompts)], dim=1)
    pooled = pooled_tokens.mean(dim=1)
    logits = model.classifier(pooled) if hasattr(model, "classifier") else None
    return dict(logits=logits, pooled=pooled, last_hidden_state=sequence, before_merge=before_merge,
                after_merge=after_merge)


def reference_block(block, config, hidden, dims, prompts, shift, always_partition, silence_prompts):
    """One Swin block with prompts, window by window. Returns (tokens, prompt outputs or None)."""
    height, width = dims
    window = config.window_size
    if not always_partition and min(height, width) <= window:  # Swin's rule for small feature maps
        shift, window = 0, min(height, width)
    if window != config.window_size:
        raise ValueError("the reference, like transformers' Swin, has no bias for a shrunk window")
    batch, length, channels = hidden.shape
    attention = block.attention
    heads = attention.num_attention_heads
    head_dim = channels // heads
    area = window * window
    num_prompts = 0 if prompts is None else prompts.shape[1]

    height_pad, width_pad = math.ceil(height / window) * window, math.ceil(width / window) * window
    grid = hidden.new_zeros(batch, height_pad, width_pad, channels)
    grid[:, :height, :width] = block.layernorm_before(hidden).reshape(batch, height, width, channels)
    grid = torch.roll(grid, shifts=(-shift, -shift), dims=(1, 2))

    # Shift-mask regions, as in the original Swin: slices of the shifted (padded) map.
    regions = torch.zeros(height_pad, width_pad, dtype=torch.long)
    if shift > 0:
        label = 0
        for rows in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            for cols in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
                regions[rows, cols] = label
                label += 1

    # Relative position bias: token i = (r1, c1), j = (r2, c2) in a window -> table[(r1 - r2 + w - 1) * (2w - 1) + ...]
    coords = [(r, c) for r in range(window) for c in range(window)]
    index = torch.tensor([[(r1 - r2 + window - 1) * (2 * window - 1) + (c1 - c2 + window - 1)
                           for (r2, c2) in coords] for (r1, c1) in coords])
    bias = attention.relative_position_bias.relative_position_bias_table[index].permute(2, 0, 1)  # heads, area, area

    normed_prompts = block.layernorm_before(prompts) if prompts is not None else None
    out_grid = torch.zeros_like(grid)
    prompt_sum = hidden.new_zeros(batch, num_prompts, channels)
    num_windows = (height_pad // window) * (width_pad // window)
    for n in range(batch):
        for top in range(0, height_pad, window):
            for left in range(0, width_pad, window):
                tokens = grid[n, top:top + window, left:left + window].reshape(area, channels)
                labels = regions[top:top + window, left:left + window].reshape(area)
                sequence = tokens if prompts is None else torch.cat([normed_prompts[n], tokens])
                size = num_prompts + area

                def split_heads(x):
                    return x.view(size, heads, head_dim).transpose(0, 1)

                q = split_heads(attention.q_proj(sequence))
                k = split_heads(attention.k_proj(sequence))
                v = split_heads(attention.v_proj(sequence))
                added = torch.zeros(heads, size, size)
                added[:, num_prompts:, num_prompts:] = bias + torch.where(
                    labels[:, None] != labels[None, :], -100.0, 0.0
                )
                if silence_prompts and num_prompts:
                    added[:, :, :num_prompts] = float("-inf")
                scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + added
                out = (scores.softmax(dim=-1) @ v).transpose(0, 1).reshape(size, channels)
                out = attention.o_proj(out)
                out_grid[n, top:top + window, left:left + window] = out[num_prompts:].view(window, window, channels)
                prompt_sum[n] += out[:num_prompts]

    out_grid = torch.roll(out_grid, shifts=(shift, shift), dims=(1, 2))[:, :height, :width]
    hidden = hidden + out_grid.reshape(batch, length, channels)
    hidden = hidden + reference_mlp(block, hidden)
    if prompts is None:
        return hidden, None
    prompts = prompts + prompt_sum / num_windows
    return hidden, prompts + reference_mlp(block, prompts)


def reference_mlp(block, x):
    x = block.layernorm_after(x)
    return block.mlp.fc2(F.gelu(block.mlp.fc1(x)))


def reference_merge(merging, hidden, height, width):
    batch, _, channels = hidden.shape
    grid = hidden.reshape(batch, height, width, channels)
    grid = F.pad(grid, (0, 0, 0, width % 2, 0, height % 2))
    grid = torch.cat([grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 1::2]], dim=-1)
    return merging.reduction(merging.norm(grid.reshape(batch, -1, 4 * channels)))


def prompted_pair(name="w4", attn="eager", cls=SwinForImageClassification, seed=0, model_overrides=None, **config):
    """(pristine copy of the base model, PEFT model)."""
    base = tiny_swin(name, cls=cls, attn=attn, seed=seed, **(model_overrides or {}))
    pristine = copy.deepcopy(base)
    return pristine, wrap(base, **config)


# -------------------------------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
@pytest.mark.parametrize("name,size", [("w4", 64), ("w4", 56), ("w3", 48), ("w3", 40)])
def test_matches_reference(attn, deep, name, size):
    pristine, peft_model = prompted_pair(name, attn, deep=deep)
    x = pixels(size)
    with torch.no_grad():
        got = peft_model(pixel_values=x).logits
        want = reference_forward(pristine, x, plugin_prompts(peft_model), deep)["logits"]
        base = pristine(pixel_values=x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - base).abs().max() > 1e-2  # the prompts do matter


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
@pytest.mark.parametrize("name,size", [("w4", 56), ("w3", 40)])
def test_reference_with_silenced_prompts_is_the_base_model(deep, name, size):
    base = tiny_swin(name)
    prompts = {i: torch.randn(NUM_PROMPTS, base.config.embed_dim * 2 ** s)
               for i, s in enumerate(s for s, d in enumerate(base.config.depths) for _ in range(d))}
    if not deep:
        prompts = {0: prompts[0]}
    x = pixels(size)
    with torch.no_grad():
        silenced = reference_forward(base, x, prompts, deep, silence_prompts=True)["logits"]
        loud = reference_forward(base, x, prompts, deep)["logits"]
        torch.testing.assert_close(silenced, base(pixel_values=x).logits, atol=1e-5, rtol=1e-5)
    assert (loud - silenced).abs().max() > 1e-2


def test_small_feature_map_turns_shift_off_and_matches_reference():
    """w4 at 64 px: the last stage's 4x4 map equals the window, so `set_shift_and_window_size` turns its shift off."""
    pristine, peft_model = prompted_pair("w4", deep=False)
    x = pixels(64)
    last_stage = swin_of(peft_model.get_base_model()).encoder.layers[-1]
    assert last_stage.blocks[1].base_layer.shift_size == 2
    with torch.no_grad():
        got = peft_model(pixel_values=x).logits
    assert last_stage.blocks[1].base_layer.shift_size == 0
    with torch.no_grad():
        want = reference_forward(pristine, x, plugin_prompts(peft_model), False)["logits"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_window_smaller_than_map_is_a_clear_error_like_the_base_model():
    """A 2x2 last-stage map would shrink the 4x4 window; transformers' Swin keeps the 4x4 bias and fails itself."""
    x = pixels(32)
    with pytest.raises(RuntimeError):
        tiny_swin("w4")(pixel_values=x)
    _, peft_model = prompted_pair("w4", deep=True)
    with pytest.raises(ValueError, match="relative position bias is built for the configured window 4"):
        peft_model(pixel_values=x)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_shallow_span_of_later_blocks_matches_reference(attn):
    pristine, peft_model = prompted_pair("w4", attn, deep=False, target_modules=r".*layers\.[12]\.blocks\.\d+")
    prompts = plugin_prompts(peft_model)
    assert list(prompts) == [2]
    x = pixels(56)
    with torch.no_grad():
        got = peft_model(pixel_values=x).logits
        want = reference_forward(pristine, x, prompts, False)["logits"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_deep_subset_of_blocks_matches_reference():
    pristine, peft_model = prompted_pair("w4", "sdpa", deep=True, target_modules=r".*layers\.[02]\.blocks\.1")
    prompts = plugin_prompts(peft_model)
    assert list(prompts) == [1, 5]
    x = pixels(56)
    with torch.no_grad():
        got = peft_model(pixel_values=x).logits
        want = reference_forward(pristine, x, prompts, True)["logits"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_include_prompts_in_pooling_matches_reference(attn, deep):
    pristine, peft_model = prompted_pair("w4", attn, deep=deep, include_prompts_in_pooling=True)
    x = pixels(56)
    with torch.no_grad():
        out = peft_model(pixel_values=x, output_hidden_states=True)
        want = reference_forward(pristine, x, plugin_prompts(peft_model), deep, pool_prompts=True)
        without = reference_forward(pristine, x, plugin_prompts(peft_model), deep)
    torch.testing.assert_close(out.logits, want["logits"], atol=1e-5, rtol=1e-5)
    assert (want["logits"] - without["logits"]).abs().max() > 1e-3
    # Image-only everywhere else.
    assert out.hidden_states[-1].shape == pristine(pixel_values=x, output_hidden_states=True).hidden_states[-1].shape


def test_include_prompts_in_pooling_on_swin_model_tuple_output():
    pristine, peft_model = prompted_pair("w4", cls=SwinModel, deep=False, include_prompts_in_pooling=True)
    x = pixels(64)
    with torch.no_grad():
        as_dict = peft_model(pixel_values=x)
        as_tuple = peft_model(pixel_values=x, return_dict=False)
        want = reference_forward(pristine, x, plugin_prompts(peft_model), False, pool_prompts=True)
    torch.testing.assert_close(as_dict.pooler_output, want["pooled"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(as_dict.last_hidden_state, want["last_hidden_state"], atol=1e-5, rtol=1e-5)
    assert torch.equal(as_tuple[1], as_dict.pooler_output)


def test_include_prompts_in_pooling_errors():
    with pytest.raises(ValueError, match="no pooling layer"):
        wrap(tiny_swin("w4", cls=SwinBackbone), include_prompts_in_pooling=True)
    with pytest.raises(ValueError, match="last block"):
        wrap(tiny_swin("w4"), include_prompts_in_pooling=True, target_modules=r".*layers\.0\.blocks\.\d+")


# ------------------------------------------------------------------------------------------- outputs and layout


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_backbone_feature_maps_match_reference_and_base_shapes(deep):
    pristine, peft_model = prompted_pair("w4", "sdpa", cls=SwinBackbone, deep=deep)
    x = pixels(56)
    with torch.no_grad():
        got = peft_model(pixel_values=x).feature_maps
        base = pristine(pixel_values=x).feature_maps
        ref = reference_forward(pristine, x, plugin_prompts(peft_model), deep, always_partition=True)
        stem, _ = pristine.swin.embeddings(x)
        grids = [(stem, 14, 14)] + ref["before_merge"]
        want = []
        for stage, (tokens, height, width) in zip(pristine.stage_names, grids):
            tokens = pristine.hidden_states_norms[stage](tokens)
            want.append(tokens.reshape(x.shape[0], height, width, -1).permute(0, 3, 1, 2))
    assert [f.shape for f in got] == [f.shape for f in base]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), peft_model.disable_adapter():
        disabled = peft_model(pixel_values=x).feature_maps
    assert all(torch.equal(d, b) for d, b in zip(disabled, base))


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_hidden_states_are_image_only_and_match_reference(deep):
    pristine, peft_model = prompted_pair("w4", "eager", deep=deep)
    x = pixels(56)
    with torch.no_grad():
        out = peft_model(pixel_values=x, output_hidden_states=True)
        base = pristine(pixel_values=x, output_hidden_states=True)
        ref = reference_forward(pristine, x, plugin_prompts(peft_model), deep)
    assert [h.shape for h in out.reshaped_hidden_states] == [h.shape for h in base.reshaped_hidden_states]
    assert [h.shape for h in out.hidden_states] == [h.shape for h in base.hidden_states]
    for got, (tokens, height, width) in zip(out.reshaped_hidden_states[1:], ref["after_merge"]):
        want = tokens.reshape(x.shape[0], height, width, -1).permute(0, 3, 1, 2)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_output_attentions_eager_has_prompt_columns():
    _, peft_model = prompted_pair("w4", "eager", deep=True)
    x = pixels(64)
    with torch.no_grad():
        attentions = peft_model(pixel_values=x, output_attentions=True).attentions
    # Last block of each stage: (batch * windows, heads, ws**2, P + ws**2); rows are distributions.
    assert [a.shape for a in attentions] == [(2 * 16, 1, 16, 19), (2 * 4, 2, 16, 19), (2 * 1, 4, 16, 19)]
    for a in attentions:
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_prompt_keys_values_are_projected_once_per_sample(attn):
    """The shared prompts are projected once per sample, never once per window."""
    _, peft_model = prompted_pair("w4", attn, deep=False)
    shapes = []
    block = prompt_layers(peft_model)[0]
    handle = block.base_layer.attention.k_proj.register_forward_hook(lambda m, a, o: shapes.append(tuple(a[0].shape)))
    with torch.no_grad():
        peft_model(pixel_values=pixels(64))
    handle.remove()
    assert sorted(shapes) == sorted([(2 * 16, 16, 16), (2, NUM_PROMPTS, 16)])


# ---------------------------------------------------------------------------------------------- adapter plumbing


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_disable_adapter_is_bit_exact(attn, deep):
    pristine, peft_model = prompted_pair("w4", attn, deep=deep)
    pristine.requires_grad_(False)
    x = pixels(56)
    with torch.no_grad():
        base = pristine(pixel_values=x, output_hidden_states=True)
        with peft_model.disable_adapter():
            disabled = peft_model(pixel_values=x, output_hidden_states=True)
        prompted = peft_model(pixel_values=x).logits
    assert torch.equal(disabled.logits, base.logits)
    assert all(torch.equal(a, b) for a, b in zip(disabled.reshaped_hidden_states, base.reshaped_hidden_states))
    assert not torch.equal(prompted, base.logits)


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_unload_returns_the_pristine_base_model(deep):
    pristine, peft_model = prompted_pair("w4", "sdpa", deep=deep, include_prompts_in_pooling=not deep)
    x = pixels(64)
    with torch.no_grad():
        peft_model(pixel_values=x)
    unloaded = peft_model.unload()
    assert list(unloaded.state_dict()) == list(pristine.state_dict())
    assert not any(isinstance(m, SwinPromptLayer) for m in unloaded.modules())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in unloaded.modules())
    with torch.no_grad():
        assert torch.equal(unloaded(pixel_values=x).logits, pristine(pixel_values=x).logits)


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_save_and_load_round_trip(tmp_path, deep):
    _, peft_model = prompted_pair("w4", deep=deep)
    x = pixels(56)
    with torch.no_grad():
        before = peft_model(pixel_values=x).logits
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_swin("w4"), tmp_path)
    with torch.no_grad():
        after = loaded(pixel_values=x).logits
    assert torch.equal(before, after)


def test_two_adapters_switch():
    """A deep adapter on the first stage, then (add_adapter) a shallow one on every block, which wraps new blocks."""
    pristine, peft_model = prompted_pair("w4", "sdpa", deep=True, target_modules=r".*layers\.0\.blocks\.\d+")
    peft_model.add_adapter("shallow", VisualPromptConfig(num_prompt_tokens=2, deep=False))
    randomize_prompts(peft_model, seed=11, adapter="shallow")
    x = pixels(56)
    results = {}
    for adapter, deep in [("shallow", False), ("default", True), ("shallow", False)]:
        peft_model.set_adapter(adapter)
        with torch.no_grad():
            got = peft_model(pixel_values=x).logits
            want = reference_forward(pristine, x, plugin_prompts(peft_model, adapter), deep)["logits"]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        results.setdefault(adapter, []).append(got)
    assert torch.equal(results["shallow"][0], results["shallow"][1])
    assert not torch.allclose(results["shallow"][0], results["default"][0])


def test_only_prompts_and_classifier_train():
    for deep in (True, False):
        _, peft_model = prompted_pair("w4", deep=deep)
        trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
        prompt_names = {n for n in trainable if ".visual_prompt_embeddings." in n}
        assert len(prompt_names) == (6 if deep else 1)
        assert trainable - prompt_names and all("classifier" in n for n in trainable - prompt_names)


# --------------------------------------------------------------------------------------- training-time behaviour


def _train_step(peft_model, inputs, labels, seed=7):
    torch.manual_seed(seed)
    peft_model.zero_grad(set_to_none=True)
    loss = sum(peft_model(pixel_values=x, labels=y).loss for x, y in zip(inputs, labels))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", ["deep", "shallow", "shallow-pool"])
def test_gradient_checkpointing_gives_the_same_gradients(attn, variant, monkeypatch):
    """Stage- and block-level non-reentrant checkpointing, two forwards before one backward, stochastic depth and
    prompt dropout on: the same loss and gradients as without checkpointing."""
    overrides = dict(drop_path_rate=0.3, hidden_dropout_prob=0.1)
    config = dict(deep=variant == "deep", include_prompts_in_pooling=variant.endswith("pool"), prompt_dropout=0.2)
    inputs, labels = [pixels(56, seed=1), pixels(64, seed=2)], [torch.tensor([0, 3]), torch.tensor([1, 4])]

    calls = {"n": 0}
    block = SwinPromptLayer._block

    def counting_block(self, *args, **kwargs):
        calls["n"] += 1
        return block(self, *args, **kwargs)

    monkeypatch.setattr(SwinPromptLayer, "_block", counting_block)
    results = []
    for checkpointing in (False, True):
        _, peft_model = prompted_pair("w4", attn, model_overrides=overrides, **config)
        peft_model.train()
        if checkpointing:
            peft_model.get_base_model().activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
            stages = swin_of(peft_model.get_base_model()).encoder.layers
            assert all(s.gradient_checkpointing for s in stages)
            assert all(layer.base_layer.gradient_checkpointing for layer in prompt_layers(peft_model))
        calls["n"] = 0
        results.append(_train_step(peft_model, inputs, labels) + (calls["n"],))
    (loss, grads, plain_calls), (gc_loss, gc_grads, gc_calls) = results
    assert gc_calls > plain_calls  # blocks were recomputed
    torch.testing.assert_close(gc_loss, loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == gc_grads.keys()
    for name in grads:
        assert grads[name].abs().sum() > 0, name
        torch.testing.assert_close(gc_grads[name], grads[name], atol=1e-6, rtol=1e-5)


def test_reentrant_gradient_checkpointing_is_a_clear_error():
    _, peft_model = prompted_pair("w4", deep=False)
    peft_model.train()
    peft_model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="non-reentrant"):
        peft_model(pixel_values=pixels(64), labels=torch.tensor([0, 1])).loss.backward()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_bf16_autocast_is_close_to_fp32(attn, deep):
    """Under bf16 autocast the prompted model strays from its fp32 self no more than the base model does."""
    pristine, peft_model = prompted_pair("w4", attn, deep=deep)
    x = pixels(56)
    with torch.no_grad():
        fp32, base_fp32 = peft_model(pixel_values=x).logits, pristine(pixel_values=x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            base_bf16 = pristine(pixel_values=x).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):  # eval mode (no stochastic depth), gradients on
        bf16 = peft_model(pixel_values=x).logits
    bf16.float().sum().backward()
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), fp32, atol=0.1, rtol=0.05)
    base_error = (base_bf16.float() - base_fp32).abs().max()
    assert (bf16.float() - fp32).abs().max() <= 3 * base_error + 0.02
    grads = [p.grad for layer in prompt_layers(peft_model) for p in layer.visual_prompt_embeddings.values()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_concurrent_forwards_on_one_model():
    """The shallow carry is per forward call: threads sharing one model get their own results."""
    _, peft_model = prompted_pair("w4", "sdpa", deep=False, include_prompts_in_pooling=True)
    inputs = [pixels(64, seed=s) for s in range(4)]
    with torch.no_grad():
        expected = [peft_model(pixel_values=x).logits for x in inputs]
    results, errors = {}, []

    def run(i):
        try:
            with torch.no_grad():
                for _ in range(5):
                    results.setdefault(i, []).append(peft_model(pixel_values=inputs[i]).logits)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, outs in results.items():
        assert all(torch.equal(o, expected[i]) for o in outs)


# -------------------------------------------------------------------------------------------------------- errors


def test_swinv2_and_donut_swin_are_rejected_clearly():
    swinv2 = Swinv2ForImageClassification(Swinv2Config(**CONFIGS["w4"], num_labels=2))
    for model in (swinv2, DonutSwinModel(DonutSwinConfig(**CONFIGS["w4"]))):
        model_type = model.config.model_type
        for config in (VisualPromptConfig(), VisualPromptConfig(target_modules=r".*blocks\.\d+")):
            with pytest.raises(ValueError, match=f"does not support model_type='{model_type}'") as info:
                get_peft_model(copy.deepcopy(model), config)
            assert "attention" in str(info.value) and "target_modules` cannot help" in str(info.value)


def test_bad_targets_are_clear_errors():
    with pytest.raises(ValueError, match="wrap Swin blocks"):
        wrap(tiny_swin("w4"), target_modules=r".*blocks\.\d+\.attention")
    with pytest.raises(ValueError, match="must be consecutive"):
        wrap(tiny_swin("w4"), deep=False, target_modules=r".*layers\.[02]\.blocks\.\d+")


def test_shallow_needs_the_swin_model_hook():
    _, peft_model = prompted_pair("w4", cls=SwinModel, deep=False)
    swin = peft_model.get_base_model()
    hidden, dims = swin.embeddings(pixels(64))
    with pytest.raises(RuntimeError, match="carried"):
        swin.encoder(hidden, dims)
