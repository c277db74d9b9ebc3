"""VPT for Swin, checked against the independent, hand-written Swin forward with prompts (`references.swin_reference`).

The reference rebuilds the whole Swin forward from the base model's weights, one sample and one window at a time
(see its docstring). With every prompt key masked to -inf it reproduces the base model, which checks the reference
itself. This file covers what is specific to Swin (window sizes, shift, padding, shallow carry, pooling option, hidden
states, attentions, checkpointing at stage level, concurrency, errors); the PEFT contract for SwinModel,
SwinForImageClassification and SwinBackbone (reference outputs, disable, unload, adapters, trainability, save/load,
checkpointing, bf16) is in `test_contract.py`.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from model_table import SWIN_CONFIGS as CONFIGS
from model_table import tiny_swin
from peft import get_peft_model
from references import swin_of, swin_reference
from tiny_models import prompts_of
from transformers import (
    DonutSwinConfig,
    DonutSwinModel,
    SwinBackbone,
    SwinForImageClassification,
    SwinModel,
    Swinv2Config,
    Swinv2ForImageClassification,
)

import peft_visual_prompt  # noqa: F401  (registers the method)
from peft_visual_prompt import VisualPromptConfig
from peft_visual_prompt.backbones.swin import SwinPromptLayer

NUM_PROMPTS = 3


# --------------------------------------------------------------------------------------------------------- models


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is faster


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
            for name in peft_model.peft_config:
                if adapter is None or name == adapter:
                    for prompts in prompts_of(layer, name):
                        prompts.copy_(torch.randn(prompts.shape, generator=gen))


def prompt_layers(peft_model) -> list[SwinPromptLayer]:
    return [m for m in peft_model.modules() if isinstance(m, SwinPromptLayer)]


def plugin_prompts(peft_model, adapter: str = "default") -> dict[int, torch.Tensor]:
    """{network block index: (P, C)} for every block that owns prompts for `adapter`."""
    swin = swin_of(peft_model.get_base_model())
    blocks = [block for stage in swin.encoder.layers for block in stage.blocks]
    return {
        i: prompts_of(block, adapter)[0].detach().clone()
        for i, block in enumerate(blocks)
        if isinstance(block, SwinPromptLayer) and prompts_of(block, adapter)
    }


def prompted_pair(name="w4", attn="eager", cls=SwinForImageClassification, seed=0, model_overrides=None, **config):
    """(pristine copy of the base model, PEFT model)."""
    base = tiny_swin(name, cls=cls, attn=attn, seed=seed, **(model_overrides or {}))
    pristine = copy.deepcopy(base)
    return pristine, wrap(base, **config)


# -------------------------------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
@pytest.mark.parametrize("name,size", [("w4", 64), ("w3", 48), ("w3", 40)])  # w4 at 56 px: test_contract.py
def test_matches_reference(attn, deep, name, size):
    pristine, peft_model = prompted_pair(name, attn, deep=deep)
    x = pixels(size)
    with torch.no_grad():
        got = peft_model(pixel_values=x).logits
        want = swin_reference(pristine, x, plugin_prompts(peft_model), deep)["logits"]
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
        silenced = swin_reference(base, x, prompts, deep, silence_prompts=True)["logits"]
        loud = swin_reference(base, x, prompts, deep)["logits"]
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
        want = swin_reference(pristine, x, plugin_prompts(peft_model), False)["logits"]
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
        want = swin_reference(pristine, x, prompts, False)["logits"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_deep_subset_of_blocks_matches_reference():
    pristine, peft_model = prompted_pair("w4", "sdpa", deep=True, target_modules=r".*layers\.[02]\.blocks\.1")
    prompts = plugin_prompts(peft_model)
    assert list(prompts) == [1, 5]
    x = pixels(56)
    with torch.no_grad():
        got = peft_model(pixel_values=x).logits
        want = swin_reference(pristine, x, prompts, True)["logits"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_include_prompts_in_pooling_matches_reference(attn, deep):
    pristine, peft_model = prompted_pair("w4", attn, deep=deep, include_prompts_in_pooling=True)
    x = pixels(56)
    with torch.no_grad():
        out = peft_model(pixel_values=x, output_hidden_states=True)
        want = swin_reference(pristine, x, plugin_prompts(peft_model), deep, pool_prompts=True)
        without = swin_reference(pristine, x, plugin_prompts(peft_model), deep)
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
        want = swin_reference(pristine, x, plugin_prompts(peft_model), False, pool_prompts=True)
    torch.testing.assert_close(as_dict.pooler_output, want["pooler_output"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(as_dict.last_hidden_state, want["last_hidden_state"], atol=1e-5, rtol=1e-5)
    assert torch.equal(as_tuple[1], as_dict.pooler_output)


def test_include_prompts_in_pooling_errors():
    with pytest.raises(ValueError, match="no pooling layer"):
        wrap(tiny_swin("w4", cls=SwinBackbone), include_prompts_in_pooling=True)
    with pytest.raises(ValueError, match="last block"):
        wrap(tiny_swin("w4"), include_prompts_in_pooling=True, target_modules=r".*layers\.0\.blocks\.\d+")


# ------------------------------------------------------------------------------------------- outputs and layout


@pytest.mark.parametrize("deep", [True, False], ids=["deep", "shallow"])
def test_hidden_states_are_image_only_and_match_reference(deep):
    pristine, peft_model = prompted_pair("w4", "eager", deep=deep)
    x = pixels(56)
    with torch.no_grad():
        out = peft_model(pixel_values=x, output_hidden_states=True)
        base = pristine(pixel_values=x, output_hidden_states=True)
        ref = swin_reference(pristine, x, plugin_prompts(peft_model), deep)
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


def test_unload_after_include_prompts_in_pooling_returns_the_pristine_base_model():
    """The pooling option adds a hook to SwinModel; unload removes it (the plain case: test_contract.py)."""
    pristine, peft_model = prompted_pair("w4", "sdpa", deep=False, include_prompts_in_pooling=True)
    x = pixels(64)
    with torch.no_grad():
        peft_model(pixel_values=x)
    unloaded = peft_model.unload()
    assert list(unloaded.state_dict()) == list(pristine.state_dict())
    assert not any(isinstance(m, SwinPromptLayer) for m in unloaded.modules())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in unloaded.modules())
    with torch.no_grad():
        assert torch.equal(unloaded(pixel_values=x).logits, pristine(pixel_values=x).logits)


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
            want = swin_reference(pristine, x, plugin_prompts(peft_model, adapter), deep)["logits"]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        results.setdefault(adapter, []).append(got)
    assert torch.equal(results["shallow"][0], results["shallow"][1])
    assert not torch.allclose(results["shallow"][0], results["default"][0])


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
