"""Trains a tiny ViT with VPT through transformers.Trainer; run directly or under torchrun (2 gloo ranks)."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from digits_data import digits_dataset, with_pixel_values  # noqa: E402
from peft import get_peft_model  # noqa: E402
from tiny_models import tiny_model  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import peft_visual_prompt  # noqa: E402
from peft_visual_prompt import VisualPromptConfig  # noqa: E402
from peft_visual_prompt.cli import metrics


class CountSteps(TrainerCallback):
    """Counts the optimizer steps this process actually ran (a resumed run skips the restored ones)."""

    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def build_base():
    # A wider init than the default 0.02 gives a random backbone whose CLS features separate the digits (a linear
    # probe reaches ~0.7), so that training has something to find.
    return tiny_model("vit", attn_implementation="eager", initializer_range=0.2)


def main(output_dir: str, max_steps: int, resume: str | None = None) -> dict:
    splits = digits_dataset(n=240).train_test_split(test_size=0.25, seed=0, stratify_by_column="label")
    model = get_peft_model(build_base(), VisualPromptConfig(num_prompt_tokens=4))
    accuracy = metrics.load("accuracy")

    def compute_metrics(prediction):
        return accuracy.compute(predictions=np.argmax(prediction.predictions, -1), references=prediction.label_ids)

    args = TrainingArguments(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=16, per_device_eval_batch_size=32,
        learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=2, save_steps=max_steps // 2, eval_strategy="steps",
        eval_steps=max_steps // 2, report_to=[], remove_unused_columns=False, seed=0, use_cpu=True,
        dataloader_num_workers=0,
    )
    counter = CountSteps()
    trainer = Trainer(model=model, args=args, train_dataset=with_pixel_values(splits["train"]),
                      eval_dataset=with_pixel_values(splits["test"]), compute_metrics=compute_metrics,
                      callbacks=[counter])
    trainer.train(resume_from_checkpoint=resume)
    result = {
        "log_history": trainer.state.log_history,
        "global_step": trainer.state.global_step,
        "steps_run": counter.steps,
        "world_size": trainer.args.world_size,
        "eval": trainer.evaluate(),
    }
    trainer.save_model(os.path.join(output_dir, "final"))  # on every rank: it synchronises them
    if trainer.is_world_process_zero():
        with open(os.path.join(output_dir, "result.json"), "w") as f:
            json.dump(result, f, default=float)
    return result


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], int(sys.argv[2]))
