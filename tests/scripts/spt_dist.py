"""SPT prototype pass, one process or under `torchrun --nproc_per_node N`; writes what each rank ends with.

    python tests/scripts/spt_dist.py OUT_DIR                          # one process
    torchrun --standalone --nproc_per_node 2 tests/scripts/spt_dist.py OUT_DIR

Writes OUT_DIR/rank<r>.pt: {case: {"prompts": [per owning layer], "projection": {...}, "stats": ...}}. The data,
model and seeds are fixed, so one-process and multi-rank files can be compared (tests/test_spt_distributed.py).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for peft_visual_prompt

warnings.filterwarnings("ignore")

NUM_IMAGES = 22  # not a multiple of batch size x ranks: the last batch is short and ranks get unequal shares
BATCH_SIZE = 4


class Images(Dataset):
    def __len__(self) -> int:
        return NUM_IMAGES

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(1000 + i)
        return {"pixel_values": torch.randn(3, 32, 32, generator=g), "labels": i % 3}


class ImagesWithNaN(Images):
    """Image 9 has one NaN pixel."""

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        if i == 9:
            item["pixel_values"][2, 5, 5] = float("nan")
        return item


def build(deep: bool = True, projection_dim=None):
    from peft import get_peft_model
    from transformers import ViTConfig, ViTForImageClassification

    import peft_visual_prompt as pvp

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                       intermediate_size=64, num_labels=3)
    model = ViTForImageClassification(config).eval()
    return get_peft_model(model, pvp.VisualPromptConfig(num_prompt_tokens=4, deep=deep, projection_dim=projection_dim))


def loader(shuffle: bool = True) -> DataLoader:
    return DataLoader(Images(), batch_size=BATCH_SIZE, shuffle=shuffle, generator=torch.Generator().manual_seed(7))


# case -> (strategy, deep, projection_dim, max_tokens_per_layer, shuffle, prepare the dataloader with accelerate)
CASES = {
    "kmeans": ("kmeans", True, None, 100, True, False),
    "mean": ("mean", True, None, 100, True, False),
    "max": ("max", True, None, 100, True, False),
    "random": ("random", True, None, 100, True, False),
    "kmeans_shallow_projected": ("kmeans", False, 16, 60, True, False),
    "random_prepared_loader": ("random", True, None, 100, False, True),
}


def owned(model) -> list:
    from peft_visual_prompt import VisualPromptLayer

    return [m.visual_prompt_embeddings["default"].detach().clone() for m in model.modules()
            if isinstance(m, VisualPromptLayer) and "default" in m.visual_prompt_embeddings]


def main(out_dir: str) -> None:
    from peft_visual_prompt import VisualPromptLayer
    from peft_visual_prompt.spt import initialize_prompts

    from peft_visual_prompt.spt import clustering

    # Seed on 32 of the 100 kept tokens, so that the distributed Lloyd steps have real work to do.
    clustering.KMEANS_SEEDING_SAMPLE = 32
    accelerator = Accelerator(cpu=True)
    results = {}
    for case, (strategy, deep, projection_dim, cap, shuffle, prepare) in CASES.items():
        model = build(deep, projection_dim)
        data = accelerator.prepare(loader(shuffle)) if prepare else loader(shuffle)
        stats = initialize_prompts(model, data, strategy, accelerator=accelerator, max_tokens_per_layer=cap, seed=3)
        prompts = [m.visual_prompt_embeddings["default"].detach().clone() for m in model.modules()
                   if isinstance(m, VisualPromptLayer) and "default" in m.visual_prompt_embeddings]
        projection = {f"{m.width}.{k}": v.detach().clone() for m in model.modules()
                      if isinstance(m, VisualPromptLayer) and m.projection("default") is not None
                      for k, v in m.projection("default").state_dict().items()}
        results[case] = {"prompts": prompts, "projection": projection, "stats": stats,
                         "spt_init": model.peft_config["default"].spt_init}
    # Non-finite tokens on one rank: every rank raises (none waits), and no rank writes its prompts.
    model = build()
    before = owned(model)
    try:
        initialize_prompts(model, DataLoader(ImagesWithNaN(), batch_size=BATCH_SIZE), "kmeans",
                           accelerator=accelerator, max_tokens_per_layer=100, seed=3)
        error = None
    except ValueError as e:
        error = str(e)
    results["nonfinite"] = {"error": error, "unchanged": all(torch.equal(a, b) for a, b in zip(before, owned(model)))}
    if accelerator.num_processes == 1:
        # The same pass with no accelerate at all.
        model = build()
        initialize_prompts(model, loader(True), "kmeans", max_tokens_per_layer=100, seed=3)
        results["kmeans_no_accelerator"] = {"prompts": [
            m.visual_prompt_embeddings["default"].detach().clone() for m in model.modules()
            if isinstance(m, VisualPromptLayer) and "default" in m.visual_prompt_embeddings]}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(results, out / f"rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
