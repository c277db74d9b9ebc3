"""`peft-visual-prompt predict`: the top-k labels, with probabilities, of image files and folders (searched
recursively), from a saved or Hub adapter. Unreadable images are skipped with a warning; `--json` prints one JSON
object per image.
"""

from __future__ import annotations

import json
import sys

from .args import AdapterArguments, PredictArguments, parse
from .inference import load_for_inference

IMAGES = {"name": "images", "nargs": "+", "help": "Image files and/or folders (searched recursively)"}


def cmd_predict(argv: list[str]) -> int:
    adapter_args, args, images = parse((AdapterArguments, PredictArguments), argv, "peft-visual-prompt predict",
                                       "Top-k labels with probabilities for images, from a saved or Hub adapter.",
                                       positional=IMAGES)
    from .data import ImageClassificationTransform, find_images

    files = find_images(images)
    model, processor, labels, image_size, _ = load_for_inference(adapter_args)
    transform = ImageClassificationTransform(processor, image_size, train=False)
    k = max(1, min(args.top_k, len(labels)))
    for start in range(0, len(files), adapter_args.batch_size):
        chunk = files[start:start + adapter_args.batch_size]
        ok, loaded = _open_images(chunk)
        if loaded:
            _print_top_k(model, transform, ok, loaded, labels, k, args.json)
    return 0


def _open_images(files) -> tuple[list, list]:
    from PIL import Image

    ok, images = [], []
    for f in files:
        try:
            with Image.open(f) as img:
                images.append(img.convert("RGB"))
            ok.append(f)
        except Exception as e:
            print(f"warning: skipping unreadable image {f} ({type(e).__name__})", file=sys.stderr)
    return ok, images


def _print_top_k(model, transform, files, images, labels: list[str], k: int, as_json: bool) -> None:
    import torch

    with torch.inference_mode():
        probs = model(pixel_values=transform.images(images)).logits.softmax(-1)
    top = probs.topk(k, dim=-1)
    for f, values, indices in zip(files, top.values.tolist(), top.indices.tolist()):
        preds = [(labels[i], v) for i, v in zip(indices, values)]
        if as_json:
            print(json.dumps({"image": str(f), "predictions": [{"label": lab, "score": round(v, 6)}
                                                                 for lab, v in preds]}))
        else:
            print(f"{f}\n" + "\n".join(f"  {lab:<20} {v:.4f}" for lab, v in preds))
