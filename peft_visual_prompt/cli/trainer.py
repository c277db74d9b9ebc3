"""The Trainer pieces of `train`: a Trainer with a separate head learning rate, graceful Ctrl-C, augmentation that
is a function of (seed, epoch, image) so that a resumed run sees the same images as an uninterrupted one, and the
test-only fault-injection points used by the reliability tests.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

# Test-only: `PEFT_VISUAL_PROMPT_FAULT=<point>` SIGKILLs the process at that point (spt, step:N, save:N, final), so
# tests can check that every interruption is survived. Unset, it does nothing.
FAULT_ENV = "PEFT_VISUAL_PROMPT_FAULT"


def fault_point(name: str, truncate: Optional[Path] = None) -> None:
    if os.environ.get(FAULT_ENV) != name:
        return
    if truncate is not None and truncate.is_file():  # a file half written when the process died
        with open(truncate, "r+b") as f:
            f.truncate(truncate.stat().st_size // 2)
    os.kill(os.getpid(), signal.SIGKILL)


def prompt_trainer_cls():
    from transformers import Trainer

    class PromptTrainer(Trainer):
        """A Trainer whose optimizer gives the head its own learning rate: prompts take a larger one (AdamW ~1e-2)
        than a fresh linear head on backbone features. Under AdamW every head weight moves by ~lr per step, so its
        logits move by ~lr * sum|features| (~1.3 per 1e-3 on DINOv2-S's [CLS, mean patch], norm ~60): at 3e-3..1e-2
        the first steps overshoot and the model predicts one class (docs/accuracy_findings.md)."""

        head_learning_rate: Optional[float] = None

        def create_optimizer(self, model=None):
            optimizer = super().create_optimizer(model)
            if self.head_learning_rate is None or self.head_learning_rate == self.args.learning_rate \
                    or getattr(optimizer, "_head_group_split", False):
                return optimizer
            model = self.model if model is None else model
            head = {id(p) for n, p in model.named_parameters() if p.requires_grad and "prompt_" not in n}
            for group in list(optimizer.param_groups):
                params = group["params"]
                moved = [p for p in params if id(p) in head]
                if moved:
                    group["params"] = [p for p in params if id(p) not in head]
                    extra = {k: v for k, v in group.items() if k != "params"}
                    optimizer.add_param_group({**extra, "params": moved, "lr": self.head_learning_rate})
            optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
            optimizer._head_group_split = True
            return optimizer

        def _save_optimizer_and_scheduler(self, output_dir):
            super()._save_optimizer_and_scheduler(output_dir)
            fault_point(f"save:{self.state.global_step}", truncate=Path(output_dir) / "optimizer.pt")

    return PromptTrainer


class SeededAugmentation(torch.utils.data.Dataset):
    """The training split with its random crop and flip drawn from a generator seeded by (seed, epoch, index), not
    from the global RNG: resuming mid-epoch then gives exactly the images an uninterrupted run sees."""

    def __init__(self, dataset, transform, seed: int):
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + int(index))
        row = self.dataset[int(index)]
        return self.transform.example(row, generator=generator)

    def callback(self):
        from transformers import TrainerCallback

        outer = self

        class _Epoch(TrainerCallback):
            def on_epoch_begin(self, args, state, control, **kwargs):
                outer.epoch = int(state.epoch + 1e-6) if state.epoch else 0

            def on_step_end(self, args, state, control, **kwargs):
                fault_point(f"step:{state.global_step}")

        return _Epoch()


class GracefulInterrupt:
    """First Ctrl-C: finish the current step, save a checkpoint and stop. A second Ctrl-C aborts at once."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                requested = outer.requested
                if args.world_size > 1:  # every rank must stop at the same step
                    import torch.distributed as dist

                    flag = torch.tensor([int(requested)])
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    requested = bool(flag.item())
                if requested:
                    outer.requested = outer.stopped = True
                    control.should_save = True
                    control.should_training_stop = True
                return control

        self.callback = _Callback()
        self.requested = self.stopped = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nInterrupted: saving a checkpoint after this step (Ctrl-C again to abort now).", file=sys.stderr,
              flush=True)

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._previous = signal.signal(signal.SIGINT, self._handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, self._previous)


HEAD_INITS = ("random", "linear_probe")


def trained_head(model) -> Optional[torch.nn.Linear]:
    """The one trainable Linear that is not a prompt projection (the classifier head, or its trained copy inside
    PEFT's ModulesToSaveWrapper), or None when there is not exactly one."""
    heads = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.weight.requires_grad
             and "prompt" not in n]
    return heads[0] if len(heads) == 1 else None


@torch.no_grad()
def _head_inputs(model, head, dataset, collate, batch_size: int, max_images: int, device) -> tuple:
    inputs, labels = [], []

    def capture(module, args):
        inputs.append(args[0].detach().float().cpu())

    hook = head.register_forward_pre_hook(capture)
    was_training = model.training
    model.eval()
    try:
        n = min(len(dataset), max_images)
        # evenly spaced over the dataset, so a class-sorted dataset still gives every class
        indices = [i * len(dataset) // n for i in range(n)]
        for start in range(0, n, batch_size):
            batch = collate([dataset[i] for i in indices[start:start + batch_size]])
            labels.append(batch["labels"])
            model(pixel_values=batch["pixel_values"].to(device))
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(inputs), torch.cat(labels)


def fit_head_linear_probe(model, dataset, collate, num_labels: int, batch_size: int = 64, max_images: int = 256,
                          inverse_l2: float = 0.01, iterations: int = 100, device=None) -> dict:
    """Linear probing before prompt tuning (LP-FT, Kumar et al., 2022): the head starts as an L2-regularised
    logistic regression on the features the prompted model gives `max_images` training images (centre view), fitted
    by full-batch L-BFGS on standardised features and folded back into the head's weight and bias.

    `inverse_l2` is scikit-learn's C (the loss is C * sum of cross-entropies + |W|^2 / 2): 0.01 is what a validation
    grid {0.01, 0.1, 1} chose for DINOv2-S on the textiles at 112 and 224 px (benchmarks/demo_recall.py probe). A
    weaker penalty fits the 256 centre views too tightly: its large logits meet the augmented views and the moving
    prompts with a training loss near 3 in the first steps.

    Why: a random head on DINOv2-S's [CLS, mean patch] features (norm ~60) needs either a head learning rate large
    enough to overshoot in its first AdamW steps (the loss rises above chance and one class is predicted) or more
    steps than a short run has. A fitted head starts where a linear probe ends, so the prompts train against a
    sensible classifier from the first step. Deterministic for a given model, data and thread count."""
    head = trained_head(model)
    if head is None or head.out_features != num_labels:
        return {"head_init": "random", "reason": "no single trainable Linear head with one output per class"}
    device = device if device is not None else head.weight.device
    x, y = _head_inputs(model, head, dataset, collate, batch_size, max_images, device)
    x = x.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    weight = torch.zeros(num_labels, z.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_labels, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    l2 = 1.0 / (inverse_l2 * len(y))  # the same objective divided by C * n: mean cross-entropy + l2/2 |W|^2

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        w = weight / std
        b = bias - w @ mean
        head.weight.copy_(w.to(head.weight.dtype))
        if head.bias is not None:
            head.bias.copy_(b.to(head.bias.dtype))
        train_accuracy = float(((z @ weight.T + bias).argmax(1) == y).double().mean())
    return {"head_init": "linear_probe", "images": int(len(y)), "C": inverse_l2,
            "train_accuracy": round(train_accuracy, 4)}
