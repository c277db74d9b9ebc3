"""Reading a saved adapter's files with errors that name the file and what is wrong with it.

PEFT and safetensors report a broken file as `JSONDecodeError: Expecting value: line 1 column 1` or
`SafetensorError: header too small`, without saying which file. These checks run where the package reads a local
adapter directory (`VisualPromptConfig.from_pretrained`, and so `PeftModel.from_pretrained`), before PEFT does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterFileError(ValueError):
    """An adapter file that cannot be read; the message names the file, the problem and the fix."""


def local_adapter_dir(name_or_path, subfolder: Optional[str] = None) -> Optional[Path]:
    path = Path(os.fspath(name_or_path)).expanduser()
    path = path / subfolder if subfolder else path
    return path if path.is_dir() else None


def check_config_file(path: Path) -> None:
    """`adapter_config.json` must be a JSON object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFileError(
            f"{path} is not valid JSON ({e}); the file is truncated or was overwritten. Save the adapter again with "
            "model.save_pretrained(...), or restore the file."
        ) from e
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} holds a JSON {type(data).__name__}, not an adapter config object.")


def check_weights_file(path: Path) -> None:
    """`adapter_model.safetensors`, when present, must have a complete safetensors header and data."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return
    try:
        with safe_open(str(path), "pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as e:
        size = path.stat().st_size
        raise AdapterFileError(
            f"{path} ({size:,} bytes) is not a readable safetensors file ({e}); it is empty, truncated or was "
            "overwritten. Save the adapter again with model.save_pretrained(...), or restore the file."
        ) from e
