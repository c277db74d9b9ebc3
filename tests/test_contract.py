"""The PEFT contract, checked for every supported model class (`model_table.ROWS`), deep and shallow, eager and sdpa.

Every test here is parametrized over the table; supporting a new backbone means adding one row to the table (and a
reference forward in `references.py` for a new family), never a test. Family-specific behaviour (attention masks,
Swin windows, pooling options, hidden states) is tested in `test_vit_reference.py` and `test_swin.py`.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from model_table import ROWS
from peft import PeftModel, get_peft_model
from tiny_models import prompts_of
from torch import nn

import peft_visual_prompt  # noqa: F401  (registers the method)
from peft_visual_prompt import VisualPromptConfig

TESTS = Path(__file__).parent
MODES = {"deep": True, "shallow": False}
ATTENTION = ("eager", "sdpa")
NUM_PROMPTS = 3
PROJECTION_DIM = 6


def projection_for(mode: str, attn: str):
    """Tests that do not compare against the reference take the projection in half of the cases, so that each mode
    and each attention runs with and without it: (deep, sdpa) and (shallow, eager)."""
    return PROJECTION_DIM if (mode == "deep") == (attn == "sdpa") else None


def _cases(projected_only: bool = False):
    return [pytest.param(row, mode, attn, id=f"{row.id}-{mode}-{attn}")
            for row in ROWS for mode in MODES for attn in ATTENTION
            if not projected_only or projection_for(mode, attn)]


CASES = _cases()
PROJECTED_CASES = _cases(projected_only=True)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is faster


# --------------------------------------------------------------------------------------------------------- helpers


def wrap(row, mode, attn, num_prompts=NUM_PROMPTS, seed=3, **config):
    """(pristine copy of the base model, PEFT model in eval mode with clearly non-zero random prompts)."""
    base = row.build(attn)
    # Frozen like the backbone under PEFT: torch's nn.MultiheadAttention (SigLIP's pooling head) gives a result that
    # differs in the last bit when its weights require grad, even under no_grad (measured: 4.8e-7 on pooler_output).
    pristine = copy.deepcopy(base).requires_grad_(False)
    peft_model = get_peft_model(base, VisualPromptConfig(num_prompt_tokens=num_prompts, deep=MODES[mode], **config))
    randomize_prompts(peft_model, seed)
    return pristine, peft_model.eval()


def randomize_prompts(peft_model, seed: int, adapter: str = "default") -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prompts in prompts_of(peft_model, adapter):
            prompts.copy_(torch.randn(prompts.shape, generator=gen))


def perturb_trainable_(peft_model, scale: float = 0.1, seed: int = 5) -> None:
    """As if trained: every trainable tensor (prompts, projection, head copies) moves away from its initial value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen))


def prompted_layers(row, deep: bool) -> tuple[str, ...]:
    """Layers that own prompts: every layer (deep), the first one (shallow)."""
    return row.layers if deep else row.layers[:1]


def width_of(model, path: str) -> int:
    """A pre-norm transformer layer's token width: the size of its first LayerNorm."""
    return next(m.normalized_shape[0] for m in model.get_submodule(path).modules() if isinstance(m, nn.LayerNorm))


def projection_of(peft_model, adapter: str, width: int) -> nn.Linear:
    """The adapter's prompt projection to `width` (VPT's "project" option), wherever the package keeps it."""
    found = [m for name, m in peft_model.named_modules()
             if isinstance(m, nn.Linear) and "prompt_projection" in name and adapter in name.split(".")
             and m.out_features == width]
    assert found, f"no prompt projection to width {width} for adapter {adapter!r}"
    return found[0]


def layer_prompts(peft_model, row, adapter: str = "default", projected: bool = True) -> dict[int, torch.Tensor]:
    """{layer index in row.layers: the (projected) prompts that layer inserts}."""
    model = peft_model.get_base_model()
    config = peft_model.peft_config[adapter]
    found = {}
    for i, path in enumerate(row.layers):
        owned = prompts_of(model.get_submodule(path), adapter)
        assert len(owned) <= 1, path
        if owned:
            prompts = owned[0]
            if projected and config.projection_dim is not None:
                prompts = projection_of(peft_model, adapter, width_of(model, path))(prompts)
            found[i] = prompts
    return found


def reference(row, base_model, peft_model, pixel_values, adapter="default"):
    """The reference forward for the adapter's prompts, on `base_model` (heads: the adapter's trained copies)."""
    deep = peft_model.peft_config[adapter].deep
    model = copy.deepcopy(base_model)
    for head in row.heads:
        copy_ = peft_model.get_base_model().get_submodule(head).modules_to_save[adapter]
        model.get_submodule(head).load_state_dict(copy_.state_dict())
    with torch.no_grad():
        prompts = {i: p.detach() for i, p in layer_prompts(peft_model, row, adapter).items()}
        return row.select(row.reference(model, pixel_values, prompts, deep, num_prefix=row.num_prefix_tokens))


def tensors(value) -> list[torch.Tensor]:
    """Every tensor in an output (a ModelOutput, dict, tuple or tensor), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):  # ModelOutput included
        return [t for key in value for t in tensors(value[key])]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors(v)]
    return []


def assert_close(got: dict, want: dict, atol: float, rtol: float = 0.0) -> None:
    assert got.keys() == want.keys()
    for name in got:
        g, w = tensors(got[name]), tensors(want[name])
        assert len(g) == len(w) > 0, name
        for a, b in zip(g, w):
            torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def bit_equal(a, b) -> bool:
    ta, tb = tensors(a), tensors(b)
    return len(ta) == len(tb) > 0 and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(ta, tb))


def max_difference(a, b) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(tensors(a), tensors(b)))


def expected_trainable(row, pristine, deep: bool, adapter: str = "default", projection_dim=None):
    """(exact names of the trainable parameters, their count), stated from the row alone: the prompts of every
    prompted layer; with a projection, one Linear per token width, held by the first prompted layer of that width;
    the `modules_to_save` copy of each of the row's heads."""
    layers = prompted_layers(row, deep)
    names = {f"base_model.model.{path}.visual_prompt_embeddings.{adapter}" for path in layers}
    widths = {path: width_of(pristine, path) for path in layers}
    count = sum(NUM_PROMPTS * (projection_dim or w) for w in widths.values())
    if projection_dim is not None:
        holders = {}
        for path, width in widths.items():
            holders.setdefault(width, path)
        names |= {f"base_model.model.{path}.visual_prompt_projection.{adapter}.{p}"
                  for path in holders.values() for p in ("weight", "bias")}
        count += sum(projection_dim * w + w for w in holders)
    for head in row.heads:
        for name, param in pristine.get_submodule(head).named_parameters():
            names.add(f"base_model.model.{head}.modules_to_save.{adapter}.{name}")
            count += param.numel()
    return names, count


def assert_trainable_set(peft_model, row, pristine, deep, projection_dim=None) -> dict[str, nn.Parameter]:
    """The `requires_grad` parameters are exactly the prompts, the projection (if any) and the row's head copies."""
    names, count = expected_trainable(row, pristine, deep, projection_dim=projection_dim)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert set(trainable) == names
    assert sum(p.numel() for p in trainable.values()) == count
    return trainable


# ------------------------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("row,mode,attn", CASES)
def test_output_matches_the_reference_and_prompts_matter(row, mode, attn):
    pristine, peft_model = wrap(row, mode, attn)
    prompts = layer_prompts(peft_model, row)
    assert sorted(prompts) == list(range(len(prompted_layers(row, MODES[mode]))))
    assert all(p.shape == (NUM_PROMPTS, width_of(pristine, row.layers[i])) for i, p in prompts.items())
    x = row.pixels()
    with torch.no_grad():
        got = row.select(peft_model(pixel_values=x))
        base = row.select(pristine(pixel_values=x))
    assert [t.shape for t in tensors(got)] == [t.shape for t in tensors(base)]  # the base model's layout
    assert_close(got, reference(row, pristine, peft_model, x), atol=1e-5)
    for name in row.outputs:  # every compared output changes
        assert max_difference(got[name], base[name]) > 1e-3, name
    assert max_difference(got, base) > 1e-2


@pytest.mark.parametrize("row,mode,attn", PROJECTED_CASES)
def test_projection_maps_prompts_to_each_width_and_matches_the_reference(row, mode, attn):
    pristine, peft_model = wrap(row, mode, attn, projection_dim=PROJECTION_DIM)
    raw = layer_prompts(peft_model, row, projected=False)
    assert all(p.shape == (NUM_PROMPTS, PROJECTION_DIM) for p in raw.values())
    x = row.pixels()
    with torch.no_grad():
        got = row.select(peft_model(pixel_values=x))
    assert_close(got, reference(row, pristine, peft_model, x), atol=1e-5)


@pytest.mark.parametrize("row,mode,attn", CASES)
def test_disable_adapter_is_the_base_model_bit_for_bit_and_restores(row, mode, attn):
    pristine, peft_model = wrap(row, mode, attn)
    x = row.pixels()
    with torch.no_grad():
        base = pristine(pixel_values=x, output_hidden_states=True)
        prompted = peft_model(pixel_values=x, output_hidden_states=True)
        with peft_model.disable_adapter():
            # heads fall back to the original modules too, so every output (hidden states included) is the base's
            disabled = peft_model(pixel_values=x, output_hidden_states=True)
        after = peft_model(pixel_values=x, output_hidden_states=True)
    assert list(disabled.keys()) == list(base.keys())
    assert bit_equal(disabled, base)
    assert bit_equal(after, prompted)
    assert not bit_equal(row.select(prompted), row.select(base))


@pytest.mark.parametrize("row,mode,attn", CASES)
def test_unload_gives_back_the_pristine_model(row, mode, attn):
    pristine, peft_model = wrap(row, mode, attn)
    x = row.pixels()
    with torch.no_grad():
        want = pristine(pixel_values=x)
        peft_model(pixel_values=x)
    perturb_trainable_(peft_model, scale=1.0)  # as if trained: the prompts and head copies move
    unloaded = peft_model.unload()
    assert type(unloaded) is row.model_cls
    assert list(unloaded.state_dict()) == list(pristine.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(unloaded.state_dict().values(), pristine.state_dict().values()))
    assert [(n, type(m)) for n, m in unloaded.named_modules()] == [(n, type(m)) for n, m in pristine.named_modules()]
    # no hook left behind: the same forward hooks as the base model has (transformers' own, for backbones)
    assert [(n, len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in unloaded.named_modules()] == [
        (n, len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in pristine.named_modules()]
    with torch.no_grad():
        assert bit_equal(unloaded(pixel_values=x), want)


@pytest.mark.parametrize("row,mode,attn", CASES)
def test_two_adapters_switch_delete_and_merge_is_refused(row, mode, attn):
    """A second adapter with another prompt count and the other mode: selecting it switches prompts and heads."""
    pristine, peft_model = wrap(row, mode, attn)
    peft_model.add_adapter("other", VisualPromptConfig(num_prompt_tokens=2, deep=not MODES[mode]))
    randomize_prompts(peft_model, seed=11, adapter="other")
    with torch.no_grad():  # the other adapter's head copies differ from the first's
        for head in row.heads:
            for p in peft_model.get_base_model().get_submodule(head).modules_to_save["other"].parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(13)))
    # A new adapter is neither active nor trainable until selected.
    assert prompts_of(peft_model, "other") and all(not p.requires_grad for p in prompts_of(peft_model, "other"))
    x = row.pixels()
    results = {}
    for adapter, other in [("default", "other"), ("other", "default"), ("default", "other")]:
        peft_model.set_adapter(adapter)
        assert all(p.requires_grad for p in prompts_of(peft_model, adapter))
        assert all(not p.requires_grad for p in prompts_of(peft_model, other))
        deep = peft_model.peft_config[adapter].deep
        assert sorted(layer_prompts(peft_model, row, adapter)) == list(range(len(prompted_layers(row, deep))))
        with torch.no_grad():
            got = row.select(peft_model(pixel_values=x))
        if adapter not in results:  # back to an adapter seen before: bit-equal to its first output, below
            assert_close(got, reference(row, pristine, peft_model, x, adapter), atol=1e-5)
        results.setdefault(adapter, []).append(got)
    assert bit_equal(results["default"][0], results["default"][1])
    assert max_difference(results["default"][0], results["other"][0]) > 1e-3

    peft_model.delete_adapter("other")
    assert prompts_of(peft_model, "other") == []
    assert "other" not in peft_model.peft_config
    with torch.no_grad():
        assert bit_equal(row.select(peft_model(pixel_values=x)), results["default"][0])
    with pytest.raises(ValueError, match="cannot be merged"):
        peft_model.merge_and_unload()


@pytest.mark.parametrize("row,mode,attn", CASES)
def test_only_prompts_projection_and_heads_train(row, mode, attn, capsys):
    projection_dim = projection_for(mode, attn)
    pristine, peft_model = wrap(row, mode, attn, projection_dim=projection_dim)
    assert sorted(peft_model.peft_config["default"].modules_to_save or []) == sorted(row.heads)
    trainable = assert_trainable_set(peft_model, row, pristine, MODES[mode], projection_dim)
    counted, _ = peft_model.get_nb_trainable_parameters()
    assert counted == sum(p.numel() for p in trainable.values())
    assert peft_model.peft_config["default"].num_trainable_parameters == counted
    peft_model.print_trainable_parameters()
    assert f"trainable params: {counted:,} ||" in capsys.readouterr().out

    # One optimizer step moves every trainable tensor and nothing else.
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    peft_model.train()
    optimizer = torch.optim.SGD(trainable.values(), lr=1.0)
    row.loss(peft_model(pixel_values=row.pixels())).backward()
    optimizer.step()
    params = dict(peft_model.named_parameters())
    assert all(torch.equal(params[n], value) for n, value in frozen.items())
    assert all(not torch.equal(params[n], value) for n, value in before.items())
    unloaded = peft_model.unload().state_dict()  # the original heads come back, untouched
    assert all(torch.equal(unloaded[k], v) for k, v in pristine.state_dict().items())


# ------------------------------------------------------------------------------------------------- save and load


@dataclass
class Saved:
    """One case's adapter, saved in-process and reloaded in the fresh process."""

    path: Path | None = None
    projection_dim: int | None = None
    want: dict | None = None  # outputs before saving
    got: dict | None = None  # outputs after reloading in the fresh process
    any_trainable: bool | None = None  # after reloading there (inference mode by default)
    error: str | None = None  # what went wrong for this case, in either process


@pytest.fixture(scope="session")
def reloaded_in_a_fresh_process(tmp_path_factory) -> dict[str, Saved]:
    """Saves every case's adapter (half of them with a projection), then reloads them all in ONE fresh Python process
    (import peft_visual_prompt, the same base model from the same seed, PeftModel.from_pretrained). A case that fails
    fails its own tests only."""
    root = tmp_path_factory.mktemp("contract-reload")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cases, jobs = {}, []
    try:
        for index, row in enumerate(ROWS):
            for mode in MODES:
                for attn in ATTENTION:
                    key = f"{row.id}-{mode}-{attn}"
                    case = cases[key] = Saved(root / key, projection_for(mode, attn))
                    try:
                        _, peft_model = wrap(row, mode, attn, projection_dim=case.projection_dim)
                        perturb_trainable_(peft_model)
                        with torch.no_grad():
                            case.want = row.select(peft_model(pixel_values=row.pixels()))
                        peft_model.save_pretrained(case.path)
                    except Exception:
                        case.error = "saving failed:\n" + traceback.format_exc()
                        continue
                    jobs.append((key, index, attn, str(case.path)))
    finally:
        torch.set_num_threads(threads)
    script = textwrap.dedent(f"""
        import sys, traceback, torch
        sys.path.insert(0, {str(TESTS)!r})
        import peft_visual_prompt
        from peft import PeftModel
        from model_table import ROWS
        torch.set_num_threads(1)
        results = {{}}
        for key, index, attn, path in {jobs!r}:
            try:
                row = ROWS[index]
                model = PeftModel.from_pretrained(row.build(attn), path).eval()
                with torch.no_grad():
                    outputs = row.select(model(pixel_values=row.pixels()))
                results[key] = (outputs, any(p.requires_grad for p in model.parameters()), None)
            except Exception:
                results[key] = (None, None, traceback.format_exc())
        torch.save(results, {str(root / "reloaded.pt")!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for key, (outputs, any_trainable, error) in torch.load(root / "reloaded.pt").items():
        cases[key].got, cases[key].any_trainable = outputs, any_trainable
        if error:
            cases[key].error = "reloading in the fresh process failed:\n" + error
    return cases


def saved_case(reloaded: dict[str, Saved], row, mode, attn) -> Saved:
    case = reloaded[f"{row.id}-{mode}-{attn}"]
    if case.error:
        pytest.fail(case.error, pytrace=False)
    return case


@pytest.mark.parametrize("row,mode,attn", CASES)
def test_reload_in_a_fresh_process_gives_identical_outputs(row, mode, attn, reloaded_in_a_fresh_process):
    case = saved_case(reloaded_in_a_fresh_process, row, mode, attn)
    assert case.got.keys() == case.want.keys()
    assert bit_equal(case.got, case.want), max_difference(case.got, case.want)
    assert case.any_trainable is False  # inference mode by default


@pytest.mark.parametrize("row,mode,attn", CASES)
def test_is_trainable_reload_resumes_training(row, mode, attn, reloaded_in_a_fresh_process):
    case = saved_case(reloaded_in_a_fresh_process, row, mode, attn)
    pristine = row.build(attn)
    model = PeftModel.from_pretrained(row.build(attn), case.path, is_trainable=True)
    trainable = assert_trainable_set(model, row, pristine, MODES[mode], case.projection_dim)
    prompts = prompts_of(model)
    assert prompts and all(p.requires_grad for p in prompts)
    before = [p.detach().clone() for p in prompts]
    model.train()
    row.loss(model(pixel_values=row.pixels())).backward()
    torch.optim.SGD(trainable.values(), lr=1.0).step()
    assert all(not torch.equal(a, b) for a, b in zip(before, prompts_of(model)))


# ------------------------------------------------------------------------------------------------ training modes


@pytest.mark.parametrize("row,mode,attn", CASES)
def test_gradient_checkpointing_gives_the_same_prompt_gradients(row, mode, attn):
    x = row.pixels()
    grads, norm_calls = [], []
    for checkpointing in (False, True):
        base = row.build(attn)
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model = get_peft_model(base, VisualPromptConfig(num_prompt_tokens=NUM_PROMPTS, deep=MODES[mode]))
        randomize_prompts(peft_model, seed=3)
        peft_model.train()
        calls = [0]
        handles = [m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
                   for m in peft_model.modules() if isinstance(m, nn.LayerNorm)]
        torch.manual_seed(0)
        row.loss(peft_model(pixel_values=x)).backward()
        for handle in handles:
            handle.remove()
        norm_calls.append(calls[0])
        grads.append({i: p.grad.clone() for i, p in layer_prompts(peft_model, row).items()})
    assert norm_calls[1] > norm_calls[0]  # layers were recomputed
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and plain
    for i in plain:
        assert plain[i].abs().sum() > 0, i
        torch.testing.assert_close(checkpointed[i], plain[i], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("row,mode,attn", CASES)
def test_bf16_autocast_is_close_to_fp32_and_trains_fp32_prompts(row, mode, attn):
    pristine, peft_model = wrap(row, mode, attn)
    x = row.pixels()
    with torch.no_grad():
        fp32, base_fp32 = row.select(peft_model(pixel_values=x)), row.select(pristine(pixel_values=x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            base_bf16 = row.select(pristine(pixel_values=x))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # eval mode, gradients on
        bf16 = row.select(peft_model(pixel_values=x))
    row.loss(bf16).backward()
    if "logits" in bf16:
        assert bf16["logits"].dtype == torch.bfloat16
    assert_close(bf16, fp32, atol=5e-2, rtol=5e-2)
    error = max_difference(bf16, fp32)
    assert 0 < error <= 3 * max_difference(base_bf16, base_fp32) + 0.02  # no worse than the base model in bf16
    prompts = prompts_of(peft_model)
    assert prompts and all(p.dtype == torch.float32 for p in prompts)
    for p in prompts:
        assert p.grad is not None and p.grad.dtype == torch.float32
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("row,mode,attn", CASES)
def test_bf16_model_keeps_fp32_prompts_with_fp32_gradients(row, mode, attn):
    model = row.build(attn).to(torch.bfloat16)
    peft_model = get_peft_model(model, VisualPromptConfig(num_prompt_tokens=NUM_PROMPTS, deep=MODES[mode]))
    prompts = prompts_of(peft_model)
    assert prompts and all(p.dtype == torch.float32 for p in prompts)
    output = peft_model(pixel_values=row.pixels().to(torch.bfloat16))
    assert all(t.dtype == torch.bfloat16 for t in tensors(row.select(output)))
    row.loss(output).backward()
    for p in prompts:
        assert p.grad is not None and p.grad.dtype == torch.float32
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
