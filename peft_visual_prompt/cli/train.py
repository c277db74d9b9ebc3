"""`peft-visual-prompt train`: fine-tune a vision transformer with visual prompts (optionally SPT-initialised),
evaluate it on the test split and save the adapter with what is needed to reuse it.

The command runs as named steps: parse, load and check everything (nothing written), plan the output directory
(`rundir.plan_run`: fresh, resumed or staged), build the Trainer, initialise the prompts, train, and write the
results. The Trainer writes the adapter, `trainer_state.json` and its `*_results.json`; this module adds
`metrics.json` (the summary below, written last, so its presence means the run finished), `log_history.json`,
`run_config.json`, `preprocessor_config.json` and `training_curves.png`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from ..config import SPT_STRATEGIES
from . import rundir
from .args import DataArguments, MethodArguments, ModelArguments, TrainArguments, check_method, parse
from .common import (EXIT_INTERRUPTED, RUN_FILE, CLIError, Setup, human_bytes, human_time, param_counts, run_spt,
                     setup, transform)
from .trainer import GracefulInterrupt, SeededAugmentation, fault_point, prompt_trainer_cls

METRICS_FILE = rundir.FINISHED_FILE
CURVES_FILE = "training_curves.png"
LOG_HISTORY_FILE = "log_history.json"


def cmd_train(argv: list[str]) -> int:
    t_start = time.perf_counter()
    model_args, data_args, method, training_args, push = _parse_train(argv)
    # 1. Check and load everything; nothing is written yet.
    setup_ = setup(model_args, data_args, method, training_args.seed, training_args.main_process_first)
    plan = rundir.plan_run(Path(training_args.output_dir).expanduser().resolve(),
                           training_args.overwrite_output_dir, training_args.resume_from_checkpoint, setup_.run)
    t_loaded = time.perf_counter()
    # 2. Prepare the directory the Trainer writes to (main process only; the others wait).
    _barrier(training_args)
    if training_args.process_index == 0:
        rundir.prepare(plan, setup_.run)
        if plan.resume and training_args.resume_from_checkpoint is None:
            print(f"Resuming the unfinished run in {plan.target} from {Path(plan.resume).name}.", file=sys.stderr)
    _barrier(training_args)
    training_args.output_dir = str(plan.work_dir)
    try:
        return _train_and_save(setup_, model_args, data_args, training_args, plan, push, (t_start, t_loaded))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:
        if training_args.process_index == 0:
            rundir.abandon(plan)
        raise


def _parse_train(argv: list[str]):
    _use_cpu_if_no_gpu()
    model_args, data_args, method, training_args = parse(
        (ModelArguments, DataArguments, MethodArguments, TrainArguments), argv, "peft-visual-prompt train",
        "Fine-tune a vision transformer with visual prompts (optionally SPT-initialised) and evaluate it.")
    check_method(method, argv)
    training_args.remove_unused_columns = False
    training_args.label_names = ["labels"]
    push = training_args.push_to_hub  # done at the end, from the finished output directory
    training_args.push_to_hub = False
    return model_args, data_args, method, training_args, push


def _train_and_save(setup_: Setup, model_args, data_args, training_args, plan, push: bool, times) -> int:
    t_start, t_loaded = times
    trainer, interrupt = _build_trainer(setup_, data_args, training_args)
    spt_info, t_spt = _init_prompts(setup_, model_args, data_args, training_args, trainer, plan)
    head_info, t_head = _init_head(setup_, model_args, data_args, training_args, trainer, plan)
    t0 = time.perf_counter()
    with interrupt.installed():
        train_result = trainer.train(resume_from_checkpoint=plan.resume)
    t_train = time.perf_counter() - t0
    if interrupt.stopped:
        if trainer.is_world_process_zero():
            last = rundir.last_complete_checkpoint(plan.work_dir)
            print(f"Training interrupted at step {trainer.state.global_step}. Run the same command again to resume "
                  f"(or pass --resume_from_checkpoint {last})", file=sys.stderr)
        return EXIT_INTERRUPTED
    t0 = time.perf_counter()
    test_ds = setup_.splits["test"].with_transform(transform(setup_, data_args, train=False))
    test_metrics = trainer.evaluate(eval_dataset=test_ds, metric_key_prefix="test")
    t_test = time.perf_counter() - t0
    trainer.save_model(str(plan.work_dir))  # adapter files (main process only)
    if not trainer.is_world_process_zero():
        return 0
    timings = {"load": round(t_loaded - t_start, 2), "spt_init": round(t_spt, 2), "train": round(t_train, 2),
               "test": round(t_test, 2)}
    if head_info:
        head_info = {**head_info, "seconds": round(t_head, 2)}
    metrics = _write_results(setup_, trainer, training_args, plan.work_dir, train_result, test_metrics,
                             {"spt": spt_info, "head": head_info}, timings, t_start)
    rundir.finish(plan)
    hub_id = push and (training_args.hub_model_id or plan.target.name)
    if hub_id:
        from ..hub import upload_folder_to_hub

        upload_folder_to_hub(plan.target, hub_id, private=training_args.hub_private_repo,
                             token=training_args.hub_token,
                             commit_message="Upload visual-prompt adapter (peft-visual-prompt train)")
    _print_train_summary(metrics, setup_, plan.target, hub_id)
    return 0


def _build_trainer(setup_: Setup, data_args, training_args):
    from .data import collate
    from .metrics import load as load_metric

    train_ds = SeededAugmentation(setup_.splits["train"], transform(setup_, data_args, train=True), training_args.seed)
    val_ds = setup_.splits["validation"].with_transform(transform(setup_, data_args, train=False))
    metric = load_metric("accuracy")
    labels = list(setup_.labels)

    def compute_metrics(eval_pred):
        import numpy as np

        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        predictions = np.argmax(logits, axis=-1)
        out = metric.compute(predictions=predictions, references=eval_pred.label_ids)
        out.update(per_class_recall(predictions, eval_pred.label_ids, labels))
        return out

    interrupt = GracefulInterrupt()
    callbacks = [interrupt.callback, train_ds.callback(), rundir.marker_callback()]
    if setup_.method.init in SPT_STRATEGIES:
        callbacks.append(_nmi_callback(setup_, data_args))
    trainer = prompt_trainer_cls()(model=setup_.model, args=training_args, train_dataset=train_ds,
                                   eval_dataset=val_ds, data_collator=collate, compute_metrics=compute_metrics,
                                   callbacks=callbacks)
    trainer.head_learning_rate = setup_.method.head_learning_rate
    for callback in callbacks:
        if hasattr(callback, "trainer"):  # PromptPatchNMICallback logs through Trainer.log when it has the trainer
            callback.trainer = trainer
    return trainer, interrupt


RECALL_PREFIX = "recall_"


def per_class_recall(predictions, references, labels: list[str]) -> dict:
    """{"recall_<label>": share of that class's images predicted as it} for every class present in `references`:
    a model that never predicts a class shows 0 there, whatever its accuracy."""
    import numpy as np

    predictions, references = np.asarray(predictions), np.asarray(references)
    out = {}
    for index, name in enumerate(labels):
        mask = references == index
        if mask.any():
            out[f"{RECALL_PREFIX}{name}"] = float((predictions[mask] == index).mean())
    return out


def _nmi_callback(setup_: Setup, data_args):
    """SPT's prompt-patch NMI, logged at every evaluation on a fixed batch of validation images."""
    from .. import PromptPatchNMICallback
    from .data import collate

    val = setup_.splits["validation"]
    n = min(len(val), 32)
    batch = collate([val.with_transform(transform(setup_, data_args, train=False))[i] for i in range(n)])
    return PromptPatchNMICallback(batch["pixel_values"])


def _init_prompts(setup_: Setup, model_args, data_args, training_args, trainer, plan) -> tuple[dict, float]:
    """(SPT info, seconds): the SPT pass for a new adapter; a resumed run's checkpoint already holds the prompts
    and its config says how they were initialised."""
    if plan.resume is not None:
        return json.loads((Path(plan.resume) / "adapter_config.json").read_text()).get("spt_init") or {}, 0.0
    if setup_.method.init not in SPT_STRATEGIES or model_args.adapter_name_or_path:
        return {}, 0.0
    t0 = time.perf_counter()
    info = run_spt(setup_, data_args, training_args.seed, training_args.per_device_eval_batch_size,
                   accelerator=trainer.accelerator)
    fault_point("spt")
    return info, time.perf_counter() - t0


def _init_head(setup_: Setup, model_args, data_args, training_args, trainer, plan) -> tuple[dict, float]:
    """(head-init info, seconds): `--head_init linear_probe` fits a fresh head on the prompted model's features
    (after SPT); a resumed run or a given adapter keeps the head it has."""
    if setup_.method.head_init != "linear_probe" or plan.resume is not None or model_args.adapter_name_or_path:
        return {}, 0.0
    from .data import collate
    from .trainer import fit_head_linear_probe

    t0 = time.perf_counter()
    dataset = setup_.splits["train"].with_transform(transform(setup_, data_args, train=False))
    info = fit_head_linear_probe(trainer.model, dataset, collate, len(setup_.labels),
                                 batch_size=training_args.per_device_eval_batch_size,
                                 max_images=setup_.method.head_init_max_images)
    return info, time.perf_counter() - t0


def _write_results(setup_: Setup, trainer, training_args, work_dir: Path, train_result, test_metrics: dict,
                   init_info: dict, timings: dict, t_start: float) -> dict:
    """The Trainer's own files (trainer_state.json, train/test/all_results.json), then the CLI's; metrics.json is
    written last: its presence marks a finished run."""
    from .plots import plot_training_curves

    setup_.processor.save_pretrained(str(work_dir))
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_metrics("test", test_metrics)
    trainer.save_state()  # trainer_state.json, whose "log_history" is log_history.json's content
    shutil.copyfile(work_dir / "trainer_state.json", work_dir / LOG_HISTORY_FILE)
    method = setup_.method
    plot_training_curves(trainer.state.log_history, work_dir / CURVES_FILE,
                         title=f"{method.describe()} on {setup_.model_display}, {setup_.dataset_display}")
    metrics = _summary(setup_, trainer, training_args, work_dir, train_result, test_metrics, init_info["spt"],
                       {**timings, "total": round(time.perf_counter() - t_start, 2)})
    metrics["head_init"] = init_info["head"] or {"head_init": "random"}
    fault_point("final")
    from .common import write_json

    write_json(work_dir / METRICS_FILE, metrics)
    return metrics


def _summary(setup_: Setup, trainer, training_args, work_dir: Path, train_result, test_metrics: dict,
             spt_info: dict, timings: dict) -> dict:
    counts = param_counts(setup_.model)
    val_accuracy = next((e["eval_accuracy"] for e in reversed(trainer.state.log_history) if "eval_accuracy" in e),
                        None)
    return {
        "test_accuracy": test_metrics.get("test_accuracy"),
        "test_loss": test_metrics.get("test_loss"),
        "validation_accuracy": val_accuracy,
        "test_recall": {name: test_metrics[f"test_{RECALL_PREFIX}{name}"] for name in setup_.labels
                        if f"test_{RECALL_PREFIX}{name}" in test_metrics},
        **counts,
        "trainable_percent_of_backbone": 100.0 * counts["trainable_params"] / max(1, counts["backbone_params"]),
        "adapter_size_bytes": sum((work_dir / name).stat().st_size for name in
                                  ("adapter_model.safetensors", "adapter_config.json") if (work_dir / name).is_file()),
        "num_samples": {name: len(ds) for name, ds in setup_.splits.items()},
        "timings_s": timings,
        "train_loss": train_result.training_loss,
        "global_step": trainer.state.global_step,
        "epochs": training_args.num_train_epochs,
        "learning_rate": training_args.learning_rate,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "world_size": training_args.world_size,
        "model": setup_.model_display,
        "dataset": setup_.dataset_display,
        "method": setup_.method.describe(),
        "spt_init": spt_info or None,
    }


def _print_train_summary(metrics: dict, setup_: Setup, output_dir: Path, hub_id) -> None:
    t = metrics["timings_s"]
    n = metrics["num_samples"]
    lines = [
        "",
        f"{metrics['method']} on {setup_.model_display}, {setup_.dataset_display} ({len(setup_.labels)} classes)",
        f"  test accuracy     {metrics['test_accuracy']:.4f}  ({n['test']} test images; "
        + (f"validation {metrics['validation_accuracy']:.4f} on {n['validation']}; "
           if metrics["validation_accuracy"] is not None else "")
        + f"trained on {n['train']})",
        "  test recall       " + (", ".join(f"{name} {value:.2f}" for name, value in metrics["test_recall"].items())
                                     or "n/a") + "  (per class: share of its test images predicted as it)",
        f"  trainable params  {metrics['trainable_params']:,} (prompts {metrics['prompt_params']:,} + head "
        f"{metrics['head_params']:,}) vs {metrics['backbone_params']:,} frozen in the backbone "
        f"({metrics['trainable_percent_of_backbone']:.2f}%)",
        f"  adapter size      {human_bytes(metrics['adapter_size_bytes'])} on disk",
        f"  time              {human_time(t['total'])} (loading {human_time(t['load'])}, SPT init "
        f"{human_time(t['spt_init'])}, "
        + (f"head init {human_time(metrics['head_init']['seconds'])}, " if "seconds" in metrics["head_init"] else "")
        + f"training {human_time(t['train'])}, test {human_time(t['test'])})",
        f"  written to        {output_dir}/",
        "                      adapter_model.safetensors, adapter_config.json, preprocessor_config.json, "
        f"{RUN_FILE}",
        f"                      {METRICS_FILE}, {CURVES_FILE}, {LOG_HISTORY_FILE}, checkpoint-*/",
    ]
    if hub_id:
        lines.append(f"  pushed to         {hub_id} on the Hub")
    lines.append(f"  next              peft-visual-prompt evaluate --adapter {output_dir}")
    print("\n".join(lines))


def _use_cpu_if_no_gpu() -> None:
    """Under torchrun on a machine without GPUs, accelerate forms a gloo process group only when told to use the
    CPU; otherwise every rank trains alone. TrainingArguments sets up its devices while parsing, so this goes
    through accelerate's environment variable, before parsing."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def _barrier(training_args) -> None:
    if training_args.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
