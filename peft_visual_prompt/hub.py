"""Model cards for visual-prompt adapters, and pushing an adapter with its card to the Hub.

`PeftModel.save_pretrained` writes PEFT's card and then saves each adapter's config; `VisualPromptConfig` uses that
second step to add a section describing the adapter (see `config.py`). `PeftModel.push_to_hub` comes from
transformers, which replaces the saved README.md with a generic card when the repo has none yet, so
`push_to_hub` below uploads the saved folder itself and keeps the full card.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

from huggingface_hub import HfApi, ModelCard, ModelCardData

SECTION_START = "<!-- peft-visual-prompt:start -->"
SECTION_END = "<!-- peft-visual-prompt:end -->"
TAGS = ["peft-visual-prompt", "visual-prompt-tuning", "image-classification"]


def describe_method(config) -> str:
    mode = "VPT-Deep" if config.deep else "VPT-Shallow"
    layers = len(config.prompted_layer_widths or [])
    where = f"at the input of each of {layers} layers" if config.deep else "at the input of the first layer"
    text = f"{mode}: {config.num_prompt_tokens} prompt tokens {where}"
    if config.projection_dim:
        text += f", stored at width {config.projection_dim} and projected to the hidden size"
    return text


def card_section(config, adapter_name: str = "default") -> str:
    base = config.base_model_name_or_path or "(not recorded)"
    init = config.spt_init or {}
    init_text = (
        f"SPT `{init.get('strategy')}` prototypes from {init.get('num_images')} images"
        if init else f"`{config.prompt_init}` (VPT)"
    )
    trainable = getattr(config, "num_trainable_parameters", None)
    trainable_text = f"{trainable:,}" if trainable is not None else "(not recorded)"
    load_name = "<this repo id or local path>"
    return f"""{SECTION_START}
# Visual prompt tuning adapter

A [peft-visual-prompt](https://pypi.org/project/peft-visual-prompt/) adapter (Visual Prompt Tuning, Jia et al.,
2022) for `{base}`. The backbone stays frozen; only prompt tokens and the listed modules were trained.

- **Base model:** `{base}`
- **Method:** {describe_method(config)}
- **Prompt initialisation:** {init_text}
- **Trainable parameters:** {trainable_text} (prompts{', projection' if config.projection_dim else ''}
  and `modules_to_save`: {config.modules_to_save or []})
- **Adapter name:** `{adapter_name}`
- **Library:** peft-visual-prompt, on top of PEFT and transformers

## Usage

```python
import peft_visual_prompt  # registers the VISUAL_PROMPT method with PEFT; import it before loading
from peft import PeftModel
from transformers import AutoImageProcessor, AutoModelForImageClassification

base = AutoModelForImageClassification.from_pretrained("{base}", num_labels=..., ignore_mismatched_sizes=True)
model = PeftModel.from_pretrained(base, "{load_name}")
processor = AutoImageProcessor.from_pretrained("{base}")
```
{SECTION_END}"""


def write_card(directory: str | os.PathLike, config, adapter_name: str = "default") -> Path:
    """Adds (or refreshes) this package's section in `directory/README.md`, keeping whatever else is there."""
    path = Path(directory) / "README.md"
    card = ModelCard.load(path) if path.exists() else ModelCard.from_template(ModelCardData())
    text = card.text
    if SECTION_START in text and SECTION_END in text:
        head, rest = text.split(SECTION_START, 1)
        text = head + card_section(config, adapter_name) + rest.split(SECTION_END, 1)[1]
    else:
        text = card_section(config, adapter_name) + "\n\n" + text
    card.text = text
    card.data.library_name = card.data.library_name or "peft"
    card.data.tags = sorted(set(card.data.tags or []) | set(TAGS))
    if config.base_model_name_or_path:
        card.data.base_model = config.base_model_name_or_path
    card.save(path)
    return path


def upload_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    revision: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    commit_message: str = "Upload visual-prompt adapter",
    create_pr: bool = False,
    ignore_patterns: Optional[list[str]] = None,
) -> str:
    """Creates the repo (and branch) if needed and uploads `folder` as one commit; returns the commit URL.

    The one upload path of the package: `push_to_hub` below and the CLI's `train --push_to_hub` both use it. Hidden
    files and `checkpoint-*` folders are left out unless `ignore_patterns` says otherwise.
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), revision=revision, commit_message=commit_message,
        create_pr=create_pr, ignore_patterns=["checkpoint-*", ".*"] if ignore_patterns is None else ignore_patterns,
    )
    return commit.commit_url


def push_to_hub(
    peft_model,
    repo_id: str,
    *,
    revision: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    commit_message: str = "Upload visual-prompt adapter",
    create_pr: bool = False,
) -> str:
    """Saves the adapter(s) with their model card and uploads them with huggingface_hub's client.

    Returns the commit URL. `PeftModel.from_pretrained(base, repo_id, revision=...)` loads it back.
    """
    with tempfile.TemporaryDirectory() as folder:
        peft_model.save_pretrained(folder)
        return upload_folder_to_hub(folder, repo_id, revision=revision, private=private, token=token,
                                    commit_message=commit_message, create_pr=create_pr)
