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
        """A Trainer whose optimizer gives the head its own learning rate: prompts need a far larger one (AdamW
        ~1e-2..5e-2) than a fresh linear head on backbone features, which diverges at that rate."""

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
