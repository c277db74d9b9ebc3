"""Mixed-task inference: one frozen backbone serving T tasks in one batch, against what users do today and a floor.

For T tasks (adapters) with the batch's rows spread evenly over them, three variants compute the same logits:
  mixed         the plugin: `peft_model(pixel_values=x, adapter_names=[task of each row])`, one pass.
  task_by_task  the same rows grouped by task, `set_adapter(task)` and one forward per task (what users do today).
  floor         one forward of the same frozen model fed the same extra tokens by a hand-written loop: embeddings,
                each row's task prompts gathered from a (T, P, hidden) table per layer and put after CLS, the
                layers, strip, final LayerNorm, each row's task head (a gathered weight). No PEFT, no hooks.
Variants are timed interleaved (Williams orders, as in `overhead.py`), under `torch.inference_mode()`; the table
reports medians and ratios of medians. A second section mixes tasks with different prompt counts (default 5/10/50):
`mixed` pads every row to the widest count and hides the padding with an attention mask; it is compared with
`task_by_task` and with a mixed batch whose rows all have the widest count (`uniform`, no mask): what padding costs.
Memory: the bytes each added adapter adds to the model (unique tensor storage), against its own parameters.

Usage:
    python benchmarks/mixed.py                    # ViT-B/16, 224 px, batch 32, T = 1, 4, 16, 32 (minutes on 2 cores)
    python benchmarks/mixed.py --section padding  # only the different-prompt-count section
    python benchmarks/mixed.py --quick            # a tiny model, seconds (the smoke test runs this)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import torch  # noqa: E402
from overhead import time_interleaved  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import ViTConfig, ViTForImageClassification  # noqa: E402

from peft_visual_prompt import VisualPromptConfig, VisualPromptLayer  # noqa: E402


def build(quick: bool, tasks: int, counts: list[int], seed: int = 0):
    torch.manual_seed(seed)
    if quick:
        config = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           image_size=32, patch_size=8, num_labels=10)
    else:
        config = ViTConfig(image_size=224, patch_size=16, num_labels=100)  # ViT-B/16
    model = get_peft_model(ViTForImageClassification(config), VisualPromptConfig(num_prompt_tokens=counts[0]))
    for t in range(1, tasks):
        model.add_adapter(f"task{t}", VisualPromptConfig(num_prompt_tokens=counts[t % len(counts)]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "visual_prompt_embeddings" in name or "modules_to_save" in name:
                param.normal_(0, 0.02)
    return model.eval()


def task_names(model) -> list[str]:
    return list(model.peft_config)


class Variant:
    """Duck-types `overhead.Runner`: `step(pixel_values, names)` runs one inference."""

    def __init__(self, fn):
        self.fn = fn

    def step(self, pixel_values, names):
        with torch.inference_mode():
            self.fn(pixel_values, names)


def mixed(model):
    return Variant(lambda x, names: model(pixel_values=x, adapter_names=names).logits)


def task_by_task(model):
    def run(x, names):
        out = None
        for task in dict.fromkeys(names):
            rows = [i for i, n in enumerate(names) if n == task]
            model.set_adapter(task)
            logits = model(pixel_values=x[rows]).logits
            out = logits.new_empty(len(names), logits.shape[-1]) if out is None else out
            out[rows] = logits
        return out

    return Variant(run)


def floor(model):
    """The hand-written mixed forward (equal prompt counts)."""
    tasks = task_names(model)
    layers = [m for m in model.modules() if isinstance(m, VisualPromptLayer)]
    tables = [torch.stack([layer.visual_prompt_embeddings[t].detach() for t in tasks]) for layer in layers]
    head = model.base_model.model.classifier.modules_to_save
    weights = torch.stack([head[t].weight.detach() for t in tasks])
    biases = torch.stack([head[t].bias.detach() for t in tasks])
    vit = model.base_model.model.vit
    num_prompts = tables[0].shape[1]

    def run(x, names):
        index = torch.tensor([tasks.index(n) for n in names])
        hidden = vit.embeddings(x)
        for i, layer in enumerate(layers):
            patches = hidden[:, 1:] if i == 0 else hidden[:, 1 + num_prompts:]
            hidden = torch.cat([hidden[:, :1], tables[i][index], patches], dim=1)
            hidden = layer.base_layer(hidden, None)
        cls = vit.layernorm(torch.cat([hidden[:, :1], hidden[:, 1 + num_prompts:]], dim=1))[:, 0]
        return torch.einsum("bc,bkc->bk", cls, weights[index]) + biases[index]

    return Variant(run)


def spread(tasks: list[str], batch: int) -> list[str]:
    return [tasks[i * len(tasks) // batch] for i in range(batch)]


def check_same_logits(model, x, names) -> float:
    with torch.inference_mode():
        a = model(pixel_values=x, adapter_names=names).logits
        b = floor(model).fn(x, names)
        c = task_by_task(model).fn(x, names)
    return max((a - b).abs().max().item(), (a - c).abs().max().item())


def adapter_bytes(model) -> tuple[int, int]:
    """(bytes of unique tensor storage in the model, bytes of the last adapter's own parameters)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.untyped_storage().data_ptr() not in seen:
            seen.add(tensor.untyped_storage().data_ptr())
            total += tensor.untyped_storage().nbytes()
    last = task_names(model)[-1]
    own = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.endswith(f".{last}")
              or f".{last}." in n)
    return total, own


def time_variants(variants: dict, x, names, warmup: int, steps: int) -> dict[str, float]:
    times, _ = time_interleaved(variants, (x, names), warmup, steps)
    return {name: statistics.median(values) for name, values in times.items()}


def section_tasks(args) -> None:
    """Prints one table row per T as soon as it is measured."""
    print("| T tasks | rows/task | mixed (s) | task_by_task (s) | floor (s) | mixed / floor | mixed / task_by_task |"
          " max abs diff |\n|---|---|---|---|---|---|---|---|", flush=True)
    for tasks in args.tasks:
        model = build(args.quick, tasks, [args.prompts])
        x = torch.randn(args.batch, 3, model.config.image_size, model.config.image_size,
                        generator=torch.Generator().manual_seed(1))
        names = spread(task_names(model), args.batch)
        diff = check_same_logits(model, x, names)
        med = time_variants({"mixed": mixed(model), "task_by_task": task_by_task(model), "floor": floor(model)},
                            x, names, args.warmup, args.steps)
        print(f"| {tasks} | {args.batch // tasks} | {med['mixed']:.3f} | {med['task_by_task']:.3f} | "
              f"{med['floor']:.3f} | {med['mixed'] / med['floor']:.3f}x | "
              f"{med['mixed'] / med['task_by_task']:.3f}x | {diff:.1e} |", flush=True)


def section_padding(args) -> list[str]:
    counts = args.counts
    model = build(args.quick, len(counts), counts)
    uniform_model = build(args.quick, len(counts), [max(counts)])
    x = torch.randn(args.batch, 3, model.config.image_size, model.config.image_size,
                    generator=torch.Generator().manual_seed(1))
    names = spread(task_names(model), args.batch)
    med = time_variants({"mixed": mixed(model), "task_by_task": task_by_task(model),
                         "uniform": mixed(uniform_model)}, x, names, args.warmup, args.steps)
    total_before, _ = adapter_bytes(build(args.quick, 1, counts))
    total_after, own = adapter_bytes(build(args.quick, 2, counts))
    return [
        f"| prompt counts {'/'.join(map(str, counts))} | mixed (s) | task_by_task (s) | uniform at {max(counts)} (s) |"
        " mixed / task_by_task | mixed / uniform |", "|---|---|---|---|---|---|",
        f"| batch {args.batch} | {med['mixed']:.3f} | {med['task_by_task']:.3f} | {med['uniform']:.3f} | "
        f"{med['mixed'] / med['task_by_task']:.3f}x | {med['mixed'] / med['uniform']:.3f}x |",
        "", f"memory: adding a second adapter ({counts[1]} prompts/layer + head) adds "
        f"{total_after - total_before:,} bytes to the model; its own parameters are {own:,} bytes "
        f"(ratio {(total_after - total_before) / own:.3f}).",
    ]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, seconds")
    parser.add_argument("--section", choices=["tasks", "padding", "all"], default="all")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--prompts", type=int, default=10, help="prompt tokens per layer (task section)")
    parser.add_argument("--counts", type=int, nargs="+", default=[5, 10, 50], help="padding section")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{'tiny ViT' if args.quick else 'ViT-B/16 224 px'}, inference_mode", flush=True)
    if args.section in ("tasks", "all"):
        section_tasks(args)
        print()
    if args.section in ("padding", "all"):
        print("\n".join(section_padding(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
