"""Shared by the tests/test_backbones_<family>.py files: wrap a tiny model, read its prompts, compare with a reference
forward (tests/references.py), and run SPT's four strategies on it."""

from __future__ import annotations

import copy

import torch
from peft import get_peft_model

from peft_visual_prompt import VisualPromptConfig, VisualPromptLayer, initialize_prompts

NUM_PROMPTS = 3
STRATEGIES = ("kmeans", "mean", "max", "random")


def build(model_cls, config, attn: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    model = model_cls(config)
    model.set_attn_implementation(attn)
    return model.eval()


def wrap(base, deep: bool, seed: int = 3, **config):
    """(pristine copy of `base`, PEFT model in eval mode with clearly non-zero random prompts)."""
    pristine = copy.deepcopy(base)
    peft_model = get_peft_model(base, VisualPromptConfig(num_prompt_tokens=NUM_PROMPTS, deep=deep, **config)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prompts in layer_prompts(peft_model).values():
            prompts.copy_(torch.randn(prompts.shape, generator=gen))
    return pristine, peft_model


def prompt_layers(peft_model) -> list[tuple[str, VisualPromptLayer]]:
    return [(n, m) for n, m in peft_model.get_base_model().named_modules() if isinstance(m, VisualPromptLayer)]


def layer_prompts(peft_model, adapter: str = "default") -> dict[int, torch.Tensor]:
    """{index among the wrapped layers: that layer's prompt parameter} (shallow: the first layer only)."""
    return {i: m.visual_prompt_embeddings[adapter] for i, (_, m) in enumerate(prompt_layers(peft_model))
            if adapter in m.visual_prompt_embeddings}


def flat(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in flat(v)]
    return []


def assert_matches(got, want, names, atol: float = 1e-5) -> None:
    for name in names:
        g, w = flat(got[name]), flat(want[name])
        assert len(g) == len(w) > 0, name
        for a, b in zip(g, w):
            assert a.shape == b.shape, (name, a.shape, b.shape)
            torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


def max_difference(got, want, names) -> float:
    return max((a.float() - b.float()).abs().max().item()
               for name in names for a, b in zip(flat(got[name]), flat(want[name])))


def check_against_reference(base, reference, deep: bool, names, num_prefix: int, inputs: dict, **config):
    """The prompted model's outputs `names` equal the reference forward to 1e-5 and differ from the base model's."""
    pristine, peft_model = wrap(base, deep, **config)
    prompts = {i: p.detach() for i, p in layer_prompts(peft_model).items()}
    assert len(prompts) == (len(prompt_layers(peft_model)) if deep else 1)
    with torch.no_grad():
        got = peft_model(**inputs)
        want = reference(pristine, inputs["pixel_values"], prompts, deep, num_prefix=num_prefix,
                         **{k: v for k, v in inputs.items() if k != "pixel_values"})
        plain = pristine(**inputs)
    assert_matches(got, want, names)
    assert max_difference(got, plain, names) > 1e-3, "prompts must change the output"
    return pristine, peft_model


def check_spt(base, pixel_batches, deep: bool = True, forward_kwargs=None) -> None:
    """Each SPT strategy writes new, finite prompts into every prompted layer."""
    for strategy in STRATEGIES:
        _, peft_model = wrap(copy.deepcopy(base), deep)
        before = {i: p.detach().clone() for i, p in layer_prompts(peft_model).items()}
        initialize_prompts(peft_model, [{"pixel_values": x} for x in pixel_batches], strategy,
                           forward_kwargs=forward_kwargs)
        after = layer_prompts(peft_model)
        assert before.keys() == after.keys() and before
        for i, prompts in after.items():
            assert torch.isfinite(prompts).all(), (strategy, i)
            assert not torch.allclose(prompts, before[i]), (strategy, i)
