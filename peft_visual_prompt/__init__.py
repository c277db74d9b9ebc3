"""Visual Prompt Tuning for Hugging Face vision transformers, as a PEFT method.

`import peft_visual_prompt` registers the VISUAL_PROMPT method with PEFT, so that `get_peft_model`,
`PeftModel.from_pretrained` and `PeftConfig.from_pretrained` know it. The command-line application lives in
`peft_visual_prompt.cli`; importing the library does not import it (nor `datasets`, `evaluate` or `matplotlib`).
"""

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import VisualPromptConfig
from .hub import push_to_hub
from .layer import VisualPromptLayer
from .model import VisualPromptModel
from .registration import NAME, PREFIX, VISUAL_PROMPT_PEFT_TYPE
from .spt import PromptPatchNMICallback, initialize_prompts, prompt_patch_nmi

# Idempotent: a re-import (e.g. after importlib.reload) must not register twice, which PEFT refuses.
if PEFT_TYPE_TO_TUNER_MAPPING.get(VISUAL_PROMPT_PEFT_TYPE) is not VisualPromptModel:
    register_peft_method(name=NAME, config_cls=VisualPromptConfig, model_cls=VisualPromptModel, prefix=PREFIX)

__version__ = "0.1.0"

__all__ = [
    "VISUAL_PROMPT_PEFT_TYPE",
    "VisualPromptConfig",
    "VisualPromptLayer",
    "VisualPromptModel",
    "PromptPatchNMICallback",
    "initialize_prompts",
    "prompt_patch_nmi",
    "push_to_hub",
    "__version__",
]
