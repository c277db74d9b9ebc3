"""SPT and the prompt-patch NMI on every model class of the contract table: prototypes are written, finite and
change the output; the NMI gives one value in [0, 1] per prompted layer."""

from __future__ import annotations

import pytest
import torch
from model_table import ROWS
from peft import get_peft_model

from peft_visual_prompt import VisualPromptConfig, initialize_prompts, prompt_patch_nmi


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is faster


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
@pytest.mark.parametrize("strategy", ["kmeans", "mean"])
def test_spt_and_nmi_run_on_every_class(row, strategy):
    model = get_peft_model(row.build("sdpa"), VisualPromptConfig(num_prompt_tokens=2, deep=True)).eval()
    before = [p.detach().clone() for n, p in model.named_parameters() if "visual_prompt_embeddings" in n]
    batches = [row.pixels(batch=4, seed=s) for s in range(2)]
    initialize_prompts(model, batches, strategy=strategy)
    after = [p.detach() for n, p in model.named_parameters() if "visual_prompt_embeddings" in n]
    assert len(after) == len(row.layers)
    assert all(torch.isfinite(a).all() and not torch.equal(a, b) for a, b in zip(after, before))
    values = prompt_patch_nmi(model, batches[0])
    assert len(values) == len(row.layers) and all(0.0 <= v <= 1.0 for v in values)
