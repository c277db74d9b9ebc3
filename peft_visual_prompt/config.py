"""`VisualPromptConfig`: the adapter configuration stored in `adapter_config.json`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft import PeftConfig

from .files import CONFIG_FILE, WEIGHTS_FILE, check_config_file, check_weights_file, local_adapter_dir
from .hub import write_card
from .registration import VISUAL_PROMPT_PEFT_TYPE

PROMPT_INITS = ("xavier_uniform", "normal", "zeros")
# Values written by SPT (`initialize_prompts`): the prompts then hold data-driven prototypes.
SPT_STRATEGIES = ("kmeans", "mean", "max", "random")


@dataclass
class VisualPromptConfig(PeftConfig):
    """Configuration of Visual Prompt Tuning (Jia et al., 2022) for Hugging Face vision transformers.

    Args:
        num_prompt_tokens: Prompt tokens per prompted layer (VPT's `p`).
        deep: VPT-Deep (a fresh prompt set at the input of every layer) when True, VPT-Shallow (one set at the input
            of the first layer, which then evolves through the network) when False.
        prompt_dropout: Dropout applied to the prompts each time they are inserted.
        projection_dim: When set, prompts are stored at this width and one trainable Linear, shared by all layers of
            the same width, maps them to the hidden size (VPT's "project" option).
        prompt_init: How prompts are initialised: VPT's `"xavier_uniform"` (uniform(-v, v) with
            v = sqrt(6 / (3 * patch_size**2 + width))), `"normal"` (std 0.02) or `"zeros"`. `initialize_prompts`
            (SPT) overwrites the prompts with data-driven prototypes and records its strategy here.
        target_modules: Regex or list of module names of the transformer layers to prompt. Resolved from the model's
            `model_type` when not given.
        num_prefix_tokens: Tokens (CLS, distillation, registers) that stay in front of the prompts. Resolved from the
            model's config for supported models; needed with `target_modules` on other ViT-like models.
        modules_to_save: Modules trained and saved with the prompts. Defaults to the classification head
            (`classifier`) when the model has one.
        include_prompts_in_pooling: Swin only. The official VPT code averages the prompt outputs into Swin's final
            pool; by default prompts are left out so every output keeps the base model's layout.
        spt_init: Provenance written by `initialize_prompts`: strategy, images and tokens used.
    """

    num_prompt_tokens: int = field(default=10, metadata={"help": "Prompt tokens per prompted layer."})
    deep: bool = field(default=True, metadata={"help": "VPT-Deep (True) or VPT-Shallow (False)."})
    prompt_dropout: float = field(default=0.0, metadata={"help": "Dropout on the prompts, in [0, 1)."})
    projection_dim: Optional[int] = field(
        default=None, metadata={"help": "Store prompts at this width and project them to the hidden size."}
    )
    prompt_init: str = field(default="xavier_uniform", metadata={"help": f"One of {PROMPT_INITS}."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Transformer layers to prompt; resolved from model_type when None."}
    )
    num_prefix_tokens: Optional[int] = field(
        default=None, metadata={"help": "CLS/distillation/register tokens kept in front of the prompts."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained and saved besides the prompts (default: the classifier)."}
    )
    include_prompts_in_pooling: bool = field(
        default=False, metadata={"help": "Swin only: average prompt outputs into the final pool, as KMnP/vpt does."}
    )
    spt_init: Optional[dict] = field(
        default=None, metadata={"help": "Written by initialize_prompts: how the prompts were initialised."}
    )
    prompted_layer_widths: Optional[list[int]] = field(
        default=None,
        metadata={"help": "Filled in on injection: the width of each prompted layer, so that loading the adapter "
                          "onto a backbone of another width or depth fails early and clearly."},
    )
    # Read by PEFT's target matching.
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    target_parameters: Optional[list[str]] = field(default=None)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = VISUAL_PROMPT_PEFT_TYPE
        _check(
            _is_int(self.num_prompt_tokens) and self.num_prompt_tokens >= 1,
            "num_prompt_tokens", self.num_prompt_tokens, "an integer >= 1",
        )
        _check(isinstance(self.deep, bool), "deep", self.deep, "True (VPT-Deep) or False (VPT-Shallow)")
        _check(
            isinstance(self.prompt_dropout, (int, float)) and not isinstance(self.prompt_dropout, bool)
            and 0.0 <= self.prompt_dropout < 1.0,
            "prompt_dropout", self.prompt_dropout, "a float in [0, 1)",
        )
        _check(
            self.projection_dim is None
            or (_is_int(self.projection_dim) and self.projection_dim > 0),
            "projection_dim", self.projection_dim, "None or an integer > 0",
        )
        _check(self.prompt_init in PROMPT_INITS, "prompt_init", self.prompt_init, f"one of {PROMPT_INITS}")
        _check(
            self.num_prefix_tokens is None or (_is_int(self.num_prefix_tokens) and self.num_prefix_tokens >= 0),
            "num_prefix_tokens", self.num_prefix_tokens, "None or an integer >= 0",
        )
        self._check_containers()

    def _check_containers(self) -> None:
        """The non-numeric fields, which JSON or a caller can fill with the wrong type just as easily."""
        _check(
            self.target_modules is None or isinstance(self.target_modules, str) or _is_str_list(self.target_modules),
            "target_modules", self.target_modules, "None, a regex string, or a list of module names",
        )
        _check(
            self.modules_to_save is None or _is_str_list(self.modules_to_save),
            "modules_to_save", self.modules_to_save, "None or a list of module names, e.g. ['classifier']",
        )
        _check(
            isinstance(self.include_prompts_in_pooling, bool), "include_prompts_in_pooling",
            self.include_prompts_in_pooling, "True or False",
        )
        _check(self.spt_init is None or isinstance(self.spt_init, dict), "spt_init", self.spt_init, "None or a dict")
        _check(
            self.prompted_layer_widths is None
            or (isinstance(self.prompted_layer_widths, list) and all(_is_int(w) and w > 0
                                                                     for w in self.prompted_layer_widths)),
            "prompted_layer_widths", self.prompted_layer_widths, "None or a list of positive integers",
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        local = local_adapter_dir(pretrained_model_name_or_path, subfolder)
        if local is not None:  # broken files get errors that name them (PEFT reads the weights after this)
            check_config_file(local / CONFIG_FILE)
            check_weights_file(local / WEIGHTS_FILE)
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if not isinstance(config, cls):
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {type(config).__name__} adapter "
                f"(peft_type={config.peft_type!r}), not a visual-prompt adapter (peft_type='VISUAL_PROMPT'). "
                "Load it with peft.PeftConfig.from_pretrained / PeftModel.from_pretrained instead."
            )
        return config

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        super().save_pretrained(save_directory, **kwargs)
        # PeftModel.save_pretrained writes PEFT's model card first and each adapter's config after it: add this
        # adapter's description to the card here, so every save (and our push_to_hub) carries it.
        write_card(save_directory, self)


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"VisualPromptConfig.{name}={value!r} is invalid: expected {allowed}.")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_str_list(value) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
