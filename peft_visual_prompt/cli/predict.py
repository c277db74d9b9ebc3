"""`peft-visual-prompt predict`: the top-k labels, with probabilities, of image files and folders (searched
recursively), from a saved or Hub adapter. Unreadable images are skipped with a warning; `--json` prints one JSON
object per image.

With several `--adapter`s (one frozen backbone, several tasks), every image is scored under every adapter in mixed
batches through one backbone (`adapter_names=`), and each adapter's top-k is printed with that adapter's labels. The
adapters must share a base model and an image size.
"""

from __future__ import annotations

import json
import sys

from .args import AdapterArguments, PredictArguments, parse
from .errors import CLIError
from .inference import load_for_inference, read_adapter

IMAGES = {"name": "images", "nargs": "+", "help": "Image files and/or folders (searched recursively)"}


def cmd_predict(argv: list[str]) -> int:
    adapters, argv = _adapters(argv)
    adapter_args, args, images = parse((AdapterArguments, PredictArguments), argv, "peft-visual-prompt predict",
                                       "Top-k labels with probabilities for images, from a saved or Hub adapter "
                                       "(or several: --adapter A --adapter B).", positional=IMAGES)
    from .data import ImageClassificationTransform, find_images

    files = find_images(images)
    others = _check_same_backbone(adapter_args, adapters[1:])  # before anything is loaded
    model, processor, labels, image_size, _ = load_for_inference(adapter_args)
    tasks = {adapters[0]: ("default", labels)}
    for index, other in enumerate(others, start=1):
        model.load_adapter(other.name_or_path, adapter_name=f"task{index}", revision=adapter_args.revision)
        tasks[other.name_or_path] = (f"task{index}", other.labels)
    transform = ImageClassificationTransform(processor, image_size, train=False)
    step = max(1, adapter_args.batch_size // len(tasks))  # rows per forward: images x adapters
    for start in range(0, len(files), step):
        ok, loaded = _open_images(files[start:start + step])
        if loaded:
            _print_top_k(model, transform.images(loaded), ok, tasks, args)
    return 0


def _adapters(argv: list[str]) -> tuple[list[str], list[str]]:
    """Every `--adapter X` (or `--adapter=X`) in order, and argv with only the first kept for the parser."""
    adapters, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == "--adapter" and i + 1 < len(argv):
            adapters.append(argv[i + 1])
            i += 2
            continue
        if argv[i].startswith("--adapter="):
            adapters.append(argv[i].split("=", 1)[1])
        else:
            rest.append(argv[i])
        i += 1
    if len(set(adapters)) != len(adapters):
        raise CLIError(f"--adapter names {adapters} repeat one; give each adapter once.")
    return adapters, (["--adapter", adapters[0]] if adapters else []) + rest


def _check_same_backbone(adapter_args, adapters: list[str]) -> list:
    """The other adapters, checked to share the first one's base model and image size."""
    first = read_adapter(adapter_args)
    others = [read_adapter(adapter_args, adapter) for adapter in adapters]
    for other in others:
        if other.model_path != first.model_path:
            raise CLIError(f"Adapters {first.name_or_path} and {other.name_or_path} were trained on different base "
                           f"models ({first.model_path} and {other.model_path}); predict mixes adapters of one base "
                           "model: run them separately.")
        sizes = {first.run.get("image_size"), other.run.get("image_size")}
        if adapter_args.image_size is None and None not in sizes and len(sizes) > 1:
            raise CLIError(f"Adapters {first.name_or_path} and {other.name_or_path} were trained at different image "
                           f"sizes {sorted(sizes)}; pass --image_size to score both at one size, or run them "
                           "separately.")
    return others


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


def _print_top_k(model, pixel_values, files, tasks: dict, args) -> None:
    """One forward for every (image, adapter) pair; each adapter's probabilities over its own labels."""
    import torch

    names = [name for _ in files for name, _ in tasks.values()]
    with torch.inference_mode():
        if len(tasks) == 1:
            logits = model(pixel_values=pixel_values).logits
        else:
            logits = model(pixel_values=pixel_values.repeat_interleave(len(tasks), dim=0), adapter_names=names).logits
    rows = iter(range(logits.shape[0]))
    for f in files:
        results = {}
        for adapter, (_, labels) in tasks.items():
            probs = logits[next(rows), : len(labels)].softmax(-1)
            top = probs.topk(max(1, min(args.top_k, len(labels))))
            results[adapter] = [(labels[i], v) for i, v in zip(top.indices.tolist(), top.values.tolist())]
        _print_image(f, results, args.json)


def _print_image(f, results: dict, as_json: bool) -> None:
    def listed(preds):
        return [{"label": lab, "score": round(v, 6)} for lab, v in preds]

    if as_json:
        if len(results) == 1:
            print(json.dumps({"image": str(f), "predictions": listed(next(iter(results.values())))}))
        else:
            print(json.dumps({"image": str(f), "adapters": {a: listed(p) for a, p in results.items()}}))
        return
    lines = [str(f)]
    for adapter, preds in results.items():
        if len(results) > 1:
            lines.append(f"  [{adapter}]")
        lines += [f"  {'  ' if len(results) > 1 else ''}{lab:<20} {v:.4f}" for lab, v in preds]
    print("\n".join(lines))
