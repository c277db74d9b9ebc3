"""The K-means prototype schedule: parallel over layers after the pass (optionally overlapped with the last batch's
forward), one process on CPU, with the same prototypes as one layer after the other."""

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from test_spt import owned_prompts, prompted  # noqa: E402

from peft_visual_prompt.spt import initialize as init_module  # noqa: E402
from peft_visual_prompt.spt import initialize_prompts  # noqa: E402


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def loader(n=24, batch=8, size=32, bad=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    if bad is not None:
        x[bad] = float("nan")
    return DataLoader(TensorDataset(x), batch_size=batch, shuffle=False)


def run(parallel, data, monkeypatch, **kwargs):
    monkeypatch.setattr(init_module, "PARALLEL_PROTOTYPES", parallel)
    model, _ = prompted(num_prompt_tokens=4)
    stats = initialize_prompts(model, data, "kmeans", max_tokens_per_layer=200, **kwargs)
    return model, stats


@pytest.mark.parametrize("overlap", [True, False])
def test_parallel_kmeans_equals_sequential(two_threads, monkeypatch, overlap):
    monkeypatch.setattr(init_module, "OVERLAP_WITH_FORWARD", overlap)
    submitted = []
    original = init_module._PrototypeScheduler.submit
    monkeypatch.setattr(init_module._PrototypeScheduler, "submit",
                        lambda self, t, n: (submitted.append((t.name, n)), original(self, t, n)))
    parallel, p_stats = run(True, loader(), monkeypatch)
    # with the overlap, every layer started during the last batch's forward; without, after the pass
    assert [n for _, n in submitted] == ([24, 24, 24] if overlap else [])
    assert torch.get_num_threads() == 2  # the caller's setting is kept
    sequential, s_stats = run(False, loader(), monkeypatch)
    for a, b in zip(owned_prompts(parallel), owned_prompts(sequential)):
        assert torch.equal(a, b)  # each layer's K-means is the same computation, on one thread either way
    for a, b in zip(p_stats["layers"], s_stats["layers"]):
        assert a["inertia"] == b["inertia"] and a["iterations"] == b["iterations"]


def test_iterables_without_a_plan_still_run_layers_in_parallel(two_threads, monkeypatch):
    batches = [{"pixel_values": b[0]} for b in loader()]
    parallel, _ = run(True, batches, monkeypatch)
    sequential, _ = run(False, batches, monkeypatch)
    for a, b in zip(owned_prompts(parallel), owned_prompts(sequential)):
        assert torch.equal(a, b)


def test_non_finite_tokens_in_the_last_batch_write_nothing(two_threads, monkeypatch):
    monkeypatch.setattr(init_module, "PARALLEL_PROTOTYPES", True)
    model, _ = prompted(num_prompt_tokens=4)
    before = owned_prompts(model)
    with pytest.raises(ValueError, match="non-finite"):
        initialize_prompts(model, loader(bad=20), "kmeans", max_tokens_per_layer=200)
    for a, b in zip(before, owned_prompts(model)):
        assert torch.equal(a, b)
    assert model.peft_config["default"].spt_init is None
