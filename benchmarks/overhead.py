"""Training-step cost of VPT through the plugin, against a hand-written floor and against full fine-tuning, on CPU.

One training step = forward + loss + backward + AdamW step (`zero_grad(set_to_none=True)` first). All variants of a
section are built in this process and timed *interleaved*: repetition r runs every variant once, in an order rotated
by r, so slow drift (thermal, other jobs on the machine) hits every variant alike. The first `--warmup` repetitions
are discarded; the table reports the median of the remaining `--steps`, the ratio of medians and, for the key pairs,
the median of per-repetition (paired) ratios, which cancels drift better still. The order of the variants within a
repetition follows a Williams design (see `williams_orders`): each variant runs after each other one equally often
over a full cycle of orders (n repetitions for an even number n of variants, 2n for odd n), because the previous step
leaves allocator and cache state behind that shifts the next step's time by a few percent.

Peak memory is measured apart, one fresh process per variant (a fork of a server process forked right after the
imports, so no variant's allocations leak into another's numbers; see `MemoryServer`): the process builds the model
and optimizer, records its RSS, resets the kernel's high-water mark (`/proc/self/clear_refs`), runs `--mem-steps`
training steps and reports peak RSS minus that baseline: gradients, optimizer state, activations and allocator slack.
It does not count the weights themselves, which every variant holds alike. Repeated runs of the same variant differ by
a few tens of MiB (glibc's allocator), so only differences well above that mean anything.

Section A (`vit`): ViT-B/16, 224 px, random weights, `ViTForImageClassification` with 100 labels.
  plugin          VPT-Deep through `get_peft_model(model, VisualPromptConfig(num_prompt_tokens=P, deep=True))`.
  floor           The same frozen model and extra tokens through a plain loop (`FloorVPT`): embeddings, prompts
                  after CLS, `model.vit.layers` with the prompt slice replaced by a per-layer `nn.Parameter`,
                  strip, final LayerNorm, classifier. Same trainable parameters. plugin/floor = the plugin's overhead.
  frozen_backprop The frozen model, no prompts, with the gradient carried back through every layer to the
                  embeddings (what any input-side method pays, minus the P extra tokens).
  head_only       The frozen model, no prompts, training only the classifier (a linear probe: no backward through
                  the backbone at all).
  full_ft         Every parameter trainable.
Section B (`swin`): Swin-B (embed 128, depths 2-2-18-2, heads 4-8-16-32, window 7), 224 px, 100 labels: plugin,
  frozen_backprop, head_only, full_ft. There is no hand-written Swin floor: Swin prompting changes the windowed
  attention itself. If the plugin cannot wrap Swin yet, the section prints "skipped: <error>".
Sections C-F (`clip`, `siglip`, `dinov3`, `beit`), one realistic size per family added after ViT, random weights,
  224 px, 100 labels: plugin against a hand-written floor (`FamilyFloorVPT`: the same frozen model and extra tokens
  through a plain loop over the layers, with the family's pre-encoder step, post-processing and head; same trainable
  parameters, prompts + head). Each section first checks that its floor computes the plugin's logits, loss and
  gradients (`compare_family_floor_and_plugin`).
  C  CLIP ViT-B/16, `CLIPForImageClassification` (pre-layernorm before the prompts; mean of the patch tokens).
  D  SigLIP B/16, `SiglipForImageClassification` (no CLS: prompts first; post-layernorm, attention-pooling head).
  E  DINOv3 ViT-S/16 with 4 registers, `DINOv3ViTModel` + a Linear head on the CLS pooler (rotary cos/sin of the
     patch grid passed to every layer; prompts after CLS + registers, unrotated).
  F  BEiT-B/16, `BeitForImageClassification` with per-layer relative position biases (random tables); the floor
     builds each layer's bias and zero-pads it at the prompt positions itself.
Section G (`swinv2`): skipped with its reason: the package has no Swin V2 family.

Usage:
    python benchmarks/overhead.py --section vit                 # the ViT-B numbers (minutes on 2 cores)
    python benchmarks/overhead.py --section all --steps 5 --warmup 2
    python benchmarks/overhead.py --quick                       # tiny models, a smoke run in seconds
    python benchmarks/overhead.py --section vit --profile       # where the time goes, plugin vs floor
    python benchmarks/overhead.py --section beit --steps 4 --warmup 1   # one family, plugin vs its floor
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import multiprocessing as mp
import os
import platform
import random
import resource
import shlex
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from peft import get_peft_model  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    BeitConfig,
    BeitForImageClassification,
    CLIPConfig,
    CLIPForImageClassification,
    DINOv3ViTConfig,
    DINOv3ViTModel,
    SiglipConfig,
    SiglipForImageClassification,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

import peft_visual_prompt  # noqa: E402
from peft_visual_prompt import VisualPromptConfig, VisualPromptLayer  # noqa: E402

NUM_LABELS = 100
QUICK_LABELS = 10

VARIANT_TITLES = {
    "plugin": "VPT-Deep, plugin (get_peft_model)",
    "floor": "VPT-Deep, hand-written floor",
    "frozen_backprop": "Frozen base, no prompts, backprop to input",
    "head_only": "Frozen base, no prompts, head only",
    "full_ft": "Full fine-tuning",
}
# The families added after ViT and Swin (issue 13): plugin against a hand-written floor (`FamilyFloorVPT`) each.
FAMILY_SECTIONS = ["clip", "siglip", "dinov3", "beit"]
SECTION_VARIANTS = {
    "vit": ["plugin", "floor", "frozen_backprop", "head_only", "full_ft"],
    "swin": ["plugin", "frozen_backprop", "head_only", "full_ft"],
    **{section: ["plugin", "floor"] for section in FAMILY_SECTIONS},
    "swinv2": ["plugin"],
}
SECTION_TITLES = {
    "vit": "A. ViT-B/16, 224 px, random weights",
    "swin": "B. Swin-B (window 7), 224 px, random weights",
    "clip": "C. CLIP ViT-B/16 vision tower (CLIPForImageClassification), 224 px, random weights",
    "siglip": "D. SigLIP B/16 vision tower (SiglipForImageClassification, attention-pooling head on), 224 px, "
              "random weights",
    "dinov3": "E. DINOv3 ViT-S/16 with 4 registers (DINOv3ViTModel + linear head on the CLS pooler), 224 px, "
              "random weights",
    "beit": "F. BEiT-B/16 (BeitForImageClassification, per-layer relative position bias), 224 px, random weights",
    "swinv2": "G. Swin V2",
}
QUICK_TITLES = {
    "vit": "A. tiny ViT (--quick)",
    "swin": "B. tiny Swin (--quick)",
    "clip": "C. tiny CLIP (--quick)",
    "siglip": "D. tiny SigLIP (--quick)",
    "dinov3": "E. tiny DINOv3 (--quick)",
    "beit": "F. tiny BEiT (--quick)",
    "swinv2": "G. Swin V2 (--quick)",
}
ALL_SECTIONS = ["vit", "swin", *FAMILY_SECTIONS, "swinv2"]


# ----------------------------------------------------------------------------------------------------------- models


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


# --attn: the attention implementation of every model built here (None: transformers' default, sdpa). Set in main()
# before the memory server forks, and passed in each memory spec as well.
ATTN_IMPLEMENTATION: Optional[str] = None


def model_config(section: str, quick: bool):
    config = _model_config(section, quick)
    if ATTN_IMPLEMENTATION is not None:
        config._attn_implementation = ATTN_IMPLEMENTATION
        if getattr(config, "vision_config", None) is not None:  # CLIP, SigLIP: the vision tower's own config
            config.vision_config._attn_implementation = ATTN_IMPLEMENTATION
    return config


def vision_config(config):
    """The config holding image_size/patch_size/hidden_size: the vision tower's for CLIP and SigLIP."""
    return getattr(config, "vision_config", None) or config


# A tiny transformer for --quick: 2 layers of width 32 on a 4x4 patch grid.
_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
             patch_size=8)


def _model_config(section: str, quick: bool):
    if section == "vit":
        if quick:
            return ViTConfig(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                image_size=32, patch_size=8, num_labels=QUICK_LABELS,
            )
        return ViTConfig(num_labels=NUM_LABELS)  # defaults = ViT-B/16 at 224 px
    if section == "swin":
        if quick:
            return SwinConfig(
                image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=4,
                num_labels=QUICK_LABELS,
            )
        return SwinConfig(
            embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=7, num_labels=NUM_LABELS
        )
    labels = QUICK_LABELS if quick else NUM_LABELS
    if section == "clip":  # CLIPVisionConfig's defaults are ViT-B/32: B/16 needs patch_size=16
        return CLIPConfig(vision_config=dict(_TINY) if quick else dict(patch_size=16), num_labels=labels)
    if section == "siglip":  # SiglipVisionConfig's defaults are B/16 at 224 px, attention-pooling head on
        return SiglipConfig(vision_config=dict(_TINY) if quick else {}, num_labels=labels)
    if section == "dinov3":  # DINOv3ViTConfig's defaults are ViT-S/16; the released ViT-S/16 has 4 registers
        extra = dict(num_register_tokens=4)
        return DINOv3ViTConfig(**(dict(_TINY, num_register_tokens=2) if quick else extra), num_labels=labels)
    if section == "beit":  # BeitConfig's defaults are BEiT-B/16 at 224 px (mean pooling, layer scale, drop path 0.1)
        tiny = dict(_TINY, layer_scale_init_value=1.0)  # tiny and layer scale 0.1: prompts would barely move logits
        return BeitConfig(**(tiny if quick else {}), use_relative_position_bias=True, num_labels=labels)
    raise ValueError(f"unknown section {section!r}")


def build_base(section: str, quick: bool, seed: int) -> nn.Module:
    """The same random weights for every variant of a section (same seed, same construction order)."""
    seed_everything(seed)
    config = model_config(section, quick)
    model_cls = {
        "vit": ViTForImageClassification,
        "swin": SwinForImageClassification,
        "clip": CLIPForImageClassification,
        "siglip": SiglipForImageClassification,
        "dinov3": DINOv3ViTModel,  # no classification class in transformers: `build_head` adds a linear head
        "beit": BeitForImageClassification,
    }[section]
    model = model_cls(config)
    if section == "beit":
        # transformers initialises the relative position bias tables to zero: random ones, as a trained model has,
        # so that the floor check also checks where the floor puts the biases.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("relative_position_bias_table"):
                    param.normal_(0.0, 0.5)
    return model.train()


def build_head(section: str, quick: bool, seed: int) -> Optional[nn.Module]:
    """The classifier of a model class without one (DINOv3): a Linear on the CLS pooler, the same for every variant."""
    if section != "dinov3":
        return None
    config = model_config(section, quick)
    gen = torch.Generator().manual_seed(seed + 2)
    head = nn.Linear(config.hidden_size, config.num_labels)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * config.initializer_range)
        head.bias.zero_()
    return head


def make_batch(section: str, quick: bool, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    config = model_config(section, quick)
    size = vision_config(config).image_size
    gen = torch.Generator().manual_seed(seed + 1)
    pixel_values = torch.randn(batch_size, 3, size, size, generator=gen)
    labels = torch.randint(0, config.num_labels, (batch_size,), generator=gen)
    return pixel_values, labels


def plugin_prompt_layers(peft_model: nn.Module) -> list[VisualPromptLayer]:
    return [m for m in peft_model.modules() if isinstance(m, VisualPromptLayer)]


class FloorVPT(nn.Module):
    """VPT-Deep for `ViTForImageClassification`, hand-written: the floor the plugin is measured against.

    The model is frozen except its classifier. Every layer gets its own `(P, hidden)` prompt parameter, placed after
    the `num_prefix_tokens` prefix tokens with one `torch.cat` (inserting at the first layer, replacing the previous
    layer's prompt outputs afterwards); the prompts are stripped after the last layer, before the final LayerNorm.
    """

    def __init__(self, model: ViTForImageClassification, num_prompts: int, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        self.model = model
        self.num_prompts = num_prompts
        self.num_prefix_tokens = num_prefix_tokens
        model.requires_grad_(False)
        model.classifier.requires_grad_(True)
        config = model.config
        bound = math.sqrt(6.0 / float(3 * config.patch_size**2 + config.hidden_size))  # VPT's xavier-uniform
        self.prompts = nn.ParameterList(
            [
                nn.Parameter(torch.empty(num_prompts, config.hidden_size).uniform_(-bound, bound))
                for _ in model.vit.layers
            ]
        )

    @torch.no_grad()
    def copy_prompts_from(self, peft_model: nn.Module, adapter_name: str = "default") -> None:
        """Takes the plugin's prompts and classifier, so that both compute the same function."""
        layers = plugin_prompt_layers(peft_model)
        assert len(layers) == len(self.prompts), (len(layers), len(self.prompts))
        for mine, layer in zip(self.prompts, layers):
            mine.copy_(layer.visual_prompt_embeddings[adapter_name])
        head = peft_model.get_submodule("base_model.model.classifier")
        if hasattr(head, "modules_to_save"):  # PEFT's ModulesToSaveWrapper: the trained copy
            head = head.modules_to_save[adapter_name]
        self.model.classifier.load_state_dict(head.state_dict())

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vit = self.model.vit
        start, end = self.num_prefix_tokens, self.num_prefix_tokens + self.num_prompts
        hidden = vit.embeddings(pixel_values)
        batch = hidden.shape[0]
        for i, layer in enumerate(vit.layers):
            patches = hidden[:, start:] if i == 0 else hidden[:, end:]
            hidden = torch.cat([hidden[:, :start], self.prompts[i].expand(batch, -1, -1), patches], dim=1)
            hidden = layer(hidden, None)
        hidden = torch.cat([hidden[:, :start], hidden[:, end:]], dim=1)
        hidden = vit.layernorm(hidden)
        return self.model.classifier(hidden[:, 0])


def _zero_pad_bias(bias: torch.Tensor, start: int, num_prompts: int) -> torch.Tensor:
    """A (1, heads, n, n) relative position bias with `num_prompts` zero rows and columns inserted at `start`: the
    prompts get no position. One padded copy per layer and step, built before the layers run."""
    *lead, n, _ = bias.shape
    out = bias.new_zeros(*lead, n + num_prompts, n + num_prompts)
    end = start + num_prompts
    out[..., :start, :start] = bias[..., :start, :start]
    out[..., :start, end:] = bias[..., :start, start:]
    out[..., end:, :start] = bias[..., start:, :start]
    out[..., end:, end:] = bias[..., start:, start:]
    return out


class FamilyFloorVPT(nn.Module):
    """VPT-Deep for the families added after ViT (CLIP, SigLIP, DINOv3, BEiT), hand-written: the floor the plugin is
    measured against in sections C-F. Same scheme as `FloorVPT`: the model frozen except its classifier, one
    `(P, hidden)` prompt parameter per layer after the family's prefix tokens, one `torch.cat` per layer, the layers
    called directly, prompts stripped after the last layer. Per family, what the model does around its layers:

    - clip:   embeddings, `pre_layrnorm` (before the prompts go in), layers; the pooler (post-layernorm of CLS, which
              the model computes though the classifier does not use it); classifier on the mean of the patch tokens.
    - siglip: no prefix token (prompts first); embeddings, layers, `post_layernorm`, the attention-pooling `head`
              (computed by the model, unused by the classifier); classifier on the mean of all tokens.
    - dinov3: [CLS, registers, patches]; embeddings, the rotary (cos, sin) of the patch grid computed once and passed
              to every layer (it rotates the last num_patches tokens only, so the prompts stay unrotated), final norm,
              `head` (a Linear, `build_head`) on CLS.
    - beit:   each layer's own relative position bias is taken out of the layer (so the layer does not build an
              unpadded one) and computed here, once per layer and step, from the same bias module, zero-padded at the
              prompt positions and passed as the layer's attention mask (plus the model's shared bias, if any, padded
              alike); final layernorm, the pooler (layernormed mean of the patches, or CLS), classifier.
    """

    def __init__(self, section: str, model: nn.Module, num_prompts: int, head: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.section = section
        self.model = model
        self.num_prompts = num_prompts
        model.requires_grad_(False)
        self.head = head if head is not None else model.classifier
        self.head.requires_grad_(True)
        vconfig = vision_config(model.config)
        if section in ("clip", "siglip"):
            layers = model.vision_model.encoder.layers
        elif section == "dinov3":
            layers = model.model.layer
        elif section == "beit":
            layers = model.beit.layers
        else:
            raise ValueError(f"no hand-written floor for section {section!r}")
        self.layers = list(layers)  # plain list: the layers stay registered under `model` only
        self.num_prefix_tokens = {"clip": 1, "siglip": 0, "dinov3": 1 + int(getattr(vconfig, "num_register_tokens", 0) or 0),
                                  "beit": 1}[section]
        self.position_biases = None
        if section == "beit":
            # The floor's own copy of the model: the bias modules move from the layers to here (same weights).
            self.position_biases = nn.ModuleList()
            for layer in layers:
                self.position_biases.append(layer.relative_position_bias or nn.Identity())
                layer.relative_position_bias = None
        patch = vconfig.patch_size[0] if isinstance(vconfig.patch_size, (list, tuple)) else vconfig.patch_size
        bound = math.sqrt(6.0 / float(3 * patch**2 + vconfig.hidden_size))  # VPT's xavier-uniform
        self.prompts = nn.ParameterList(
            [nn.Parameter(torch.empty(num_prompts, vconfig.hidden_size).uniform_(-bound, bound)) for _ in layers]
        )

    @torch.no_grad()
    def copy_prompts_from(self, peft_model: nn.Module, head: Optional[nn.Module] = None,
                          adapter_name: str = "default") -> None:
        """Takes the plugin's prompts and head (its `modules_to_save` copy, or `head` for DINOv3)."""
        layers = plugin_prompt_layers(peft_model)
        assert len(layers) == len(self.prompts), (len(layers), len(self.prompts))
        for mine, layer in zip(self.prompts, layers):
            mine.copy_(layer.visual_prompt_embeddings[adapter_name])
        if head is None:
            head = peft_model.get_submodule("base_model.model.classifier")
            if hasattr(head, "modules_to_save"):
                head = head.modules_to_save[adapter_name]
        self.head.load_state_dict(head.state_dict())

    def _biases(self, hidden: torch.Tensor, pixel_values: torch.Tensor) -> list[Optional[torch.Tensor]]:
        beit = self.model.beit
        patch = self.model.config.patch_size
        window = (pixel_values.shape[2] // patch, pixel_values.shape[3] // patch)
        length = hidden.shape[1]
        shared = None
        if beit.shared_position_bias is not None:
            shared = beit.shared_position_bias(window, interpolate_pos_encoding=False, dim_size=length)
        biases = []
        for module in self.position_biases:
            bias = None if isinstance(module, nn.Identity) else module(window, False, dim_size=length)
            if shared is not None:
                bias = shared if bias is None else bias + shared
            biases.append(None if bias is None else _zero_pad_bias(bias, self.num_prefix_tokens, self.num_prompts))
        return biases

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        section, model = self.section, self.model
        start, end = self.num_prefix_tokens, self.num_prefix_tokens + self.num_prompts
        if section == "clip":
            vision = model.vision_model
            hidden = vision.pre_layrnorm(vision.embeddings(pixel_values))
        elif section == "siglip":
            vision = model.vision_model
            hidden = vision.embeddings(pixel_values)
        elif section == "dinov3":
            pixel_values = pixel_values.to(model.embeddings.patch_embeddings.weight.dtype)
            hidden = model.embeddings(pixel_values)
            rotary = model.rope_embeddings(pixel_values)
        else:  # beit
            hidden = model.beit.embeddings(pixel_values)
            biases = self._biases(hidden, pixel_values)
            resolution = pixel_values.shape[2:]
        batch = hidden.shape[0]
        for i, layer in enumerate(self.layers):
            patches = hidden[:, start:] if i == 0 else hidden[:, end:]
            hidden = torch.cat([hidden[:, :start], self.prompts[i].expand(batch, -1, -1), patches], dim=1)
            if section == "dinov3":
                hidden = layer(hidden, None, position_embeddings=rotary)
            elif section == "beit":
                hidden = layer(hidden, biases[i], resolution=resolution)
            else:
                hidden = layer(hidden, None)
        hidden = torch.cat([hidden[:, :start], hidden[:, end:]], dim=1)
        if section == "clip":
            vision.post_layernorm(hidden[:, 0])  # the model's pooler output (what CLIPVisionModel returns)
            return self.head(hidden[:, 1:].mean(dim=1))
        if section == "siglip":
            hidden = vision.post_layernorm(hidden)
            if vision.use_head:
                vision.head(hidden)  # the model's pooler output (what SiglipVisionModel returns)
            return self.head(hidden.mean(dim=1))
        if section == "dinov3":
            return self.head(model.norm(hidden)[:, 0])
        beit = model.beit
        return self.head(beit.pooler(beit.layernorm(hidden)))


class PluginWithHead(nn.Module):
    """A PEFT model without a classification head of its own (DINOv3ViTModel) and the Linear head on its pooler."""

    def __init__(self, peft_model: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.peft_model = peft_model
        self.head = head

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.peft_model(pixel_values=pixel_values).pooler_output)


def _backprop_to_input_hook(module: nn.Module, args, output):
    """Makes the embeddings' output a leaf that requires grad, so backward runs through every frozen layer."""
    if isinstance(output, tuple):  # Swin: (embeddings, output_dimensions)
        return (output[0].detach().requires_grad_(),) + tuple(output[1:])
    return output.detach().requires_grad_()


@dataclass
class Runner:
    """One variant: a loss function of (pixel_values, labels) and the optimizer over its trainable parameters."""

    name: str
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    trainable: int
    module: nn.Module

    def step(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(pixel_values, labels)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def _optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)


def build_runner(section: str, variant: str, quick: bool, seed: int, num_prompts: int) -> Runner:
    if section == "swinv2":
        raise RuntimeError(swinv2_skip_reason())
    model = build_base(section, quick, seed)
    head = build_head(section, quick, seed)
    if variant == "plugin" and head is not None:  # DINOv3: no head in the model; ours trains beside the prompts
        peft_model = get_peft_model(model, VisualPromptConfig(num_prompt_tokens=num_prompts, deep=True))
        module = PluginWithHead(peft_model, head).train()

        def loss_fn(x, y):
            return F.cross_entropy(module(x), y)

    elif variant == "plugin":
        module = get_peft_model(model, VisualPromptConfig(num_prompt_tokens=num_prompts, deep=True))
        module.train()

        def loss_fn(x, y):
            return module(pixel_values=x, labels=y).loss

    elif variant == "floor" and section in FAMILY_SECTIONS:
        module = FamilyFloorVPT(section, model, num_prompts, head=head).train()

        def loss_fn(x, y):
            return F.cross_entropy(module(x), y)

    elif variant == "floor":
        if section != "vit":
            raise ValueError(f"no hand-written floor for section {section!r}")
        module = FloorVPT(model, num_prompts).train()

        def loss_fn(x, y):
            return F.cross_entropy(module(x), y)

    elif variant in ("frozen_backprop", "head_only"):
        module = model
        model.requires_grad_(False)
        model.classifier.requires_grad_(True)
        if variant == "frozen_backprop":
            backbone = model.vit if section == "vit" else model.swin
            backbone.embeddings.register_forward_hook(_backprop_to_input_hook)

        def loss_fn(x, y):
            return module(pixel_values=x, labels=y).loss

    elif variant == "full_ft":
        module = model
        model.requires_grad_(True)

        def loss_fn(x, y):
            return module(pixel_values=x, labels=y).loss

    else:
        raise ValueError(f"unknown variant {variant!r}")
    params = [p for p in module.parameters() if p.requires_grad]
    return Runner(variant, loss_fn, _optimizer(params), sum(p.numel() for p in params), module)


def compare_floor_and_plugin(
    quick: bool = True, batch_size: int = 2, num_prompts: int = 3, seed: int = 0
) -> dict[str, float]:
    """Runs the plugin and the hand-written floor on the same weights, prompts and input.

    Returns the largest absolute differences of their logits, losses and prompt/classifier gradients, and, as a
    guard against a vacuous match, how far the logits are from the same model run without prompts.
    """
    base = build_base("vit", quick, seed)
    floor_model = copy.deepcopy(base)
    plain = copy.deepcopy(base)
    peft_model = get_peft_model(base, VisualPromptConfig(num_prompt_tokens=num_prompts, deep=True))
    floor = FloorVPT(floor_model, num_prompts)
    floor.copy_prompts_from(peft_model)
    pixel_values, labels = make_batch("vit", quick, batch_size, seed)

    out = peft_model(pixel_values=pixel_values, labels=labels)
    logits_floor = floor(pixel_values)
    logits_diff = float((out.logits - logits_floor).detach().abs().max())
    loss_floor = F.cross_entropy(logits_floor, labels)
    out.loss.backward()
    loss_floor.backward()
    with torch.no_grad():
        logits_plain = plain(pixel_values=pixel_values).logits

    plugin_grads = [layer.visual_prompt_embeddings["default"].grad for layer in plugin_prompt_layers(peft_model)]
    plugin_head = peft_model.get_submodule("base_model.model.classifier").modules_to_save["default"]
    plugin_grads += [plugin_head.weight.grad, plugin_head.bias.grad]
    floor_grads = [p.grad for p in floor.prompts] + [floor.model.classifier.weight.grad, floor.model.classifier.bias.grad]
    grad_diff = max(float((a - b).abs().max()) for a, b in zip(plugin_grads, floor_grads))
    return {
        "max_abs_logits_diff": logits_diff,
        "abs_loss_diff": float((out.loss - loss_floor).detach().abs()),
        "max_abs_grad_diff": grad_diff,
        "max_abs_logits": float(out.logits.detach().abs().max()),
        "max_abs_logits_diff_vs_no_prompts": float((out.logits.detach() - logits_plain).abs().max()),
    }


def compare_family_floor_and_plugin(
    section: str, quick: bool = True, batch_size: int = 2, num_prompts: int = 3, seed: int = 0
) -> dict[str, float]:
    """`compare_floor_and_plugin` for the sections C-F: plugin and `FamilyFloorVPT` on the same weights, prompts,
    head and input, in eval mode (DINOv3's rotary augmentation and BEiT's drop path are random in training mode; the
    timed steps run in training mode, where both variants draw them alike). Returns the same differences."""
    base = build_base(section, quick, seed).eval()
    floor_model = copy.deepcopy(base)
    plain = copy.deepcopy(base)
    head = build_head(section, quick, seed)
    floor_head = copy.deepcopy(head) if head is not None else None
    peft_model = get_peft_model(base, VisualPromptConfig(num_prompt_tokens=num_prompts, deep=True)).eval()
    floor = FamilyFloorVPT(section, floor_model, num_prompts, head=floor_head).eval()
    floor.copy_prompts_from(peft_model, head=head)
    pixel_values, labels = make_batch(section, quick, batch_size, seed)

    if head is None:
        out = peft_model(pixel_values=pixel_values, labels=labels)
        logits, loss = out.logits, out.loss
        plugin_head = peft_model.get_submodule("base_model.model.classifier").modules_to_save["default"]
        with torch.no_grad():
            logits_plain = plain(pixel_values=pixel_values).logits
    else:
        logits = head(peft_model(pixel_values=pixel_values).pooler_output)
        loss = F.cross_entropy(logits, labels)
        plugin_head = head
        with torch.no_grad():
            logits_plain = head(plain(pixel_values=pixel_values).pooler_output)
    logits_floor = floor(pixel_values)
    logits_diff = float((logits - logits_floor).detach().abs().max())
    loss_floor = F.cross_entropy(logits_floor, labels)
    loss.backward()
    loss_floor.backward()

    plugin_grads = [layer.visual_prompt_embeddings["default"].grad for layer in plugin_prompt_layers(peft_model)]
    plugin_grads += [plugin_head.weight.grad, plugin_head.bias.grad]
    floor_grads = [p.grad for p in floor.prompts] + [floor.head.weight.grad, floor.head.bias.grad]
    grad_diff = max(float((a - b).abs().max()) for a, b in zip(plugin_grads, floor_grads))
    return {
        "max_abs_logits_diff": logits_diff,
        "abs_loss_diff": float((loss - loss_floor).detach().abs()),
        "max_abs_grad_diff": grad_diff,
        "max_abs_logits": float(logits.detach().abs().max()),
        "max_abs_logits_diff_vs_no_prompts": float((logits.detach() - logits_plain).abs().max()),
    }


def swinv2_skip_reason() -> str:
    """Why section G (Swin V2) measures nothing: the package has no family for it (checked, not assumed)."""
    from peft_visual_prompt.backbones import family_for

    if family_for("swinv2") is None:
        return ("Swin V2 (model_type 'swinv2') is not supported by peft_visual_prompt: no backbone family serves it, "
                "so get_peft_model cannot wrap it and there is nothing to measure")
    return "Swin V2 is supported by the package now, but this benchmark has no Swin V2 section yet"


# ----------------------------------------------------------------------------------------------------------- timing


def williams_orders(n: int) -> list[list[int]]:
    """Orders for n variants, one per repetition, from a Williams design: over the full cycle every variant runs in
    every position, and right after every other variant, equally often (n orders for even n, 2n for odd n).

    The predecessor matters: a step after full fine-tuning starts from a different allocator and cache state (freed
    gradients, trimmed heap) than a step after a light variant. A plain rotation always puts the same variant before
    each one, which biases a comparison by a few percent."""
    if n <= 1:
        return [[0]] * max(n, 1)
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    rows = [[(x + i) % n for x in first] for i in range(n)]
    if n % 2:  # odd n: the mirrored rows complete the carry-over balance; alternate them so short runs stay mixed
        rows = [r for row in rows for r in (row, row[::-1])]
    return rows


def time_interleaved(
    runners: dict[str, Runner],
    batch: tuple[torch.Tensor, torch.Tensor],
    warmup: int,
    steps: int,
    log: Optional[Callable[[str], None]] = None,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process CPU seconds (all threads) of each measured step, per variant. CPU time is the steadier
    of the two when other jobs share the cores: waiting for a core costs wall time, not CPU time (OpenMP spin-waits
    and cache/memory-bandwidth contention still leak into it)."""
    names = list(runners)
    orders = williams_orders(len(names))
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu_times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.freeze()  # long-lived objects (models, libraries) out of the collector's way: each collect below is ~free
    try:
        for rep in range(warmup + steps):
            for name in [names[i] for i in orders[(rep - warmup) % len(orders)]]:
                gc.collect()  # no collector pause inside a timed step
                t0, c0 = time.perf_counter(), time.process_time()
                runners[name].step(*batch)
                elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
                if rep >= warmup:
                    times[name].append(elapsed)
                    cpu_times[name].append(cpu)
            if log is not None:
                kind = "warm-up" if rep < warmup else "measured"
                log(f"repetition {rep + 1}/{warmup + steps} ({kind}) done")
    finally:
        gc.unfreeze()
    return times, cpu_times


# ----------------------------------------------------------------------------------------------------------- memory


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _memory_child(spec: dict, conn) -> None:
    global ATTN_IMPLEMENTATION
    try:
        ATTN_IMPLEMENTATION = spec.get("attn")
        torch.set_num_threads(spec["threads"])
        runner = build_runner(spec["section"], spec["variant"], spec["quick"], spec["seed"], spec["prompts"])
        batch = make_batch(spec["section"], spec["quick"], spec["batch_size"], spec["seed"])
        gc.collect()
        baseline = _status_kib("VmRSS")
        if baseline is not None and _reset_peak_rss():
            for _ in range(spec["mem_steps"]):
                runner.step(*batch)
            peak, method = _status_kib("VmHWM"), "VmHWM"
        else:  # no clear_refs: the lifetime peak, which also covers the model build (a lower bound of the growth)
            baseline = baseline or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            for _ in range(spec["mem_steps"]):
                runner.step(*batch)
            peak, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
        conn.send(("ok", (peak - baseline) / 1024.0, baseline / 1024.0, method))
    except BaseException as exc:  # report, never hang the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _run_forked(spec: dict, timeout: float) -> tuple:
    """Forks this process, runs `_memory_child(spec)` in the child and returns its message."""
    reader, writer = mp.Pipe(duplex=False)
    pid = os.fork()
    if pid == 0:  # child
        reader.close()
        try:
            _memory_child(spec, writer)
        finally:
            os._exit(0)
    writer.close()
    try:
        msg = reader.recv() if reader.poll(timeout) else ("error", "timeout")
    except EOFError:
        msg = ("error", "the measuring process died")
    finally:
        reader.close()
    if msg == ("error", "timeout"):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return msg


def _memory_server_loop(conn) -> None:
    while True:
        try:
            request = conn.recv()
        except EOFError:
            break
        if request is None:
            break
        conn.send(_run_forked(*request))


class MemoryServer:
    """Measures each variant in a fresh process: a fork of a server process that was itself forked right after the
    imports, before the benchmark computed or allocated anything.

    Forking the benchmark process later would be wrong twice over: the child would inherit the parent's freed heap,
    whose pages are already resident, so new allocations would hide in them and the growth would read low; and it
    would inherit a used OpenMP (libgomp) pool, and libgomp hangs in a forked child that runs more than one thread.
    Where `fork` does not exist, each measurement is a spawned process instead (slower: it re-imports everything).
    """

    def __init__(self) -> None:
        self._conn = None
        self._proc = None
        if "fork" in mp.get_all_start_methods():
            ctx = mp.get_context("fork")
            self._conn, child = ctx.Pipe()
            self._proc = ctx.Process(target=_memory_server_loop, args=(child,), daemon=True)
            self._proc.start()
            child.close()

    def measure(self, spec: dict, timeout: float = 3600.0) -> tuple[Optional[float], str]:
        if self._proc is not None:
            self._conn.send((spec, timeout))
            msg = self._conn.recv()
        else:
            ctx = mp.get_context("spawn")
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_memory_child, args=(spec, writer), daemon=True)
            proc.start()
            writer.close()
            try:
                msg = reader.recv() if reader.poll(timeout) else ("error", "timeout")
            except EOFError:
                msg = ("error", f"the measuring process died (exit code {proc.exitcode})")
            if proc.is_alive():
                proc.kill()
            proc.join(10)
        if msg[0] == "ok":
            return msg[1], msg[3]
        return None, msg[1]

    def close(self) -> None:
        if self._proc is not None:
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
            self._proc = None


# ----------------------------------------------------------------------------------------------------------- report


@dataclass
class SectionResult:
    section: str
    title: str
    times: dict[str, list[float]]
    cpu_times: dict[str, list[float]]
    trainable: dict[str, int]
    memory: dict[str, Optional[float]]
    memory_notes: dict[str, str]
    skipped: Optional[str] = None
    floor_check: Optional[dict] = None


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _paired_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def format_section(res: SectionResult) -> str:
    lines = [f"### {res.title}", ""]
    if res.skipped:
        lines.append(f"Section {res.section}: skipped: {res.skipped}")
        return "\n".join(lines)
    ref = "plugin" if "plugin" in res.times else next(iter(res.times))
    med = {k: _median(v) for k, v in res.times.items()}
    cpu = {k: _median(v) for k, v in res.cpu_times.items()}
    lines += [
        f"| variant | trainable params | median wall s/step | min-max wall s/step | wall / {ref} "
        f"| median CPU s/step | CPU / {ref} | peak RSS growth (MiB) | memory / {ref} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, ts in res.times.items():
        mem = res.memory.get(name)
        mem_ref = res.memory.get(ref)
        mem_s = f"{mem:.0f}" if mem is not None else f"n/a ({res.memory_notes.get(name, 'not measured')})"
        mem_ratio = f"{mem / mem_ref:.2f}x" if mem is not None and mem_ref else "n/a"
        lines.append(
            f"| {VARIANT_TITLES[name]} | {res.trainable[name]:,} | {med[name]:.3f} | {min(ts):.3f}-{max(ts):.3f} "
            f"| {med[name] / med[ref]:.3f}x | {cpu[name]:.3f} | {cpu[name] / cpu[ref]:.3f}x | {mem_s} | {mem_ratio} |"
        )
    lines.append("")
    if res.floor_check is not None:
        c = res.floor_check
        verdict = "OK" if floor_matches(c) else "MISMATCH"
        lines.append(
            f"- floor check ({verdict}): plugin vs hand-written floor on the same weights, prompts and input: "
            f"max |logits diff| {c['max_abs_logits_diff']:.2e}, |loss diff| {c['abs_loss_diff']:.2e}, "
            f"max |grad diff| {c['max_abs_grad_diff']:.2e} (prompts move the logits by "
            f"{c['max_abs_logits_diff_vs_no_prompts']:.2e})"
        )
    pairs = [("plugin", "floor", " (goal <= 1.05x)"), ("plugin", "frozen_backprop", ""), ("plugin", "full_ft", "")]
    for a, b, note in pairs:
        if a in res.times and b in res.times:
            mem_a, mem_b = res.memory.get(a), res.memory.get(b)
            mem_s = f"; peak memory {mem_a / mem_b:.2f}x" if mem_a is not None and mem_b else ""
            lines.append(
                f"- {a} / {b}{note}: wall: ratio of medians {med[a] / med[b]:.3f}x, median of paired ratios "
                f"{_paired_ratio(res.times[a], res.times[b]):.3f}x; CPU: ratio of medians {cpu[a] / cpu[b]:.3f}x, "
                f"median of paired ratios {_paired_ratio(res.cpu_times[a], res.cpu_times[b]):.3f}x{mem_s}"
            )
    return "\n".join(lines)


def floor_matches(check: dict, tol: float = 1e-4) -> bool:
    """The floor computes the plugin's function (float32, relative to the logits' scale)."""
    scale = max(1.0, check["max_abs_logits"])
    return (
        check["max_abs_logits_diff"] <= tol * scale
        and check["abs_loss_diff"] <= tol * scale
        and check["max_abs_grad_diff"] <= tol * scale
        and check["max_abs_logits_diff_vs_no_prompts"] > 100 * check["max_abs_logits_diff"]
    )


def _log(msg: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", file=sys.stderr, flush=True)


def run_section(section: str, args) -> SectionResult:
    title = (QUICK_TITLES if args.quick else SECTION_TITLES)[section]
    variants = [v for v in SECTION_VARIANTS[section] if not args.variants or v in args.variants]
    t0 = args.t0
    check = None
    if section == "swinv2":
        return SectionResult(section, title, {}, {}, {}, {}, {}, skipped=swinv2_skip_reason())
    if "floor" in variants:
        _log(f"[{section}] floor check: plugin vs hand-written floor, same weights and input ...", t0)
        if section == "vit":
            check = compare_floor_and_plugin(quick=args.quick, batch_size=2, num_prompts=args.prompts, seed=args.seed)
        else:
            check = compare_family_floor_and_plugin(section, quick=args.quick, batch_size=2, num_prompts=args.prompts,
                                                    seed=args.seed)
        if not floor_matches(check):  # timing a floor that computes something else would mean nothing
            _log(f"[{section}] floor check FAILED: {check}", t0)
    _log(f"[{section}] building {', '.join(variants)} ...", t0)
    runners: dict[str, Runner] = {}
    for name in variants:
        try:
            runners[name] = build_runner(section, name, args.quick, args.seed, args.prompts)
        except Exception as exc:
            if name == "plugin":
                return SectionResult(section, title, {}, {}, {}, {}, {}, skipped=f"{type(exc).__name__}: {exc}")
            raise
    batch = make_batch(section, args.quick, args.batch_size, args.seed)
    _log(f"[{section}] timing: {args.warmup} warm-up + {args.steps} measured repetitions, interleaved ...", t0)
    times, cpu_times = time_interleaved(runners, batch, args.warmup, args.steps, log=lambda m: _log(f"[{section}] {m}", t0))
    trainable = {k: r.trainable for k, r in runners.items()}
    del runners, batch
    gc.collect()

    memory: dict[str, Optional[float]] = {}
    notes: dict[str, str] = {}
    if not args.no_memory:
        for name in variants:
            _log(f"[{section}] memory: {name} (fresh process) ...", t0)
            spec = dict(section=section, variant=name, quick=args.quick, seed=args.seed, prompts=args.prompts,
                        batch_size=args.batch_size, mem_steps=args.mem_steps, threads=args.threads,
                        attn=ATTN_IMPLEMENTATION)
            memory[name], notes[name] = args.memory_server.measure(spec)
    _log(f"[{section}] done", t0)
    return SectionResult(section, title, times, cpu_times, trainable, memory, notes, floor_check=check)


def profile_plugin_vs_floor(args, top: int = 12) -> str:
    """One training step of plugin and floor under torch.profiler (after one warm-up step each): the ops where the
    two differ, by self CPU time, and each step's total."""
    from torch.profiler import ProfilerActivity, profile

    batch = make_batch("vit", args.quick, args.batch_size, args.seed)
    out = []
    tables = {}
    for name in ("plugin", "floor"):
        runner = build_runner("vit", name, args.quick, args.seed, args.prompts)
        runner.step(*batch)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            t0 = time.perf_counter()
            runner.step(*batch)
            wall = time.perf_counter() - t0
        ka = prof.key_averages()
        tables[name] = {e.key: (e.self_cpu_time_total, e.count) for e in ka}
        out.append(f"{name}: profiled step {wall:.3f} s, self CPU total {sum(e.self_cpu_time_total for e in ka)/1e6:.3f} s")
        del runner
        gc.collect()
    keys = set(tables["plugin"]) | set(tables["floor"])
    count_diff = sorted(k for k in keys if tables["plugin"].get(k, (0, 0))[1] != tables["floor"].get(k, (0, 0))[1])
    out.append("")
    out.append(
        "ops whose call counts differ (plugin vs floor): "
        + (", ".join(f"{k} {tables['plugin'].get(k, (0, 0))[1]} vs {tables['floor'].get(k, (0, 0))[1]}"
                     for k in count_diff) or "none: both run the same aten ops the same number of times")
    )
    rows = sorted(keys, key=lambda k: -abs(tables["plugin"].get(k, (0, 0))[0] - tables["floor"].get(k, (0, 0))[0]))
    out.append("")
    out.append("| op | plugin self CPU ms (calls) | floor self CPU ms (calls) | difference ms |")
    out.append("|---|---:|---:|---:|")
    for k in rows[:top]:
        p, f = tables["plugin"].get(k, (0, 0)), tables["floor"].get(k, (0, 0))
        out.append(f"| {k} | {p[0]/1e3:.1f} ({p[1]}) | {f[0]/1e3:.1f} ({f[1]}) | {(p[0]-f[0])/1e3:+.1f} |")
    return "\n".join(out)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--section", choices=ALL_SECTIONS + ["all"], default="all")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 (2 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="measured repetitions (default 5, 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="discarded repetitions (default 2, 1 with --quick)")
    parser.add_argument("--mem-steps", type=int, default=2, help="training steps per memory measurement")
    parser.add_argument("--prompts", type=int, default=10, help="prompt tokens per layer")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default 2, 1 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--variants", type=lambda s: [v for v in s.split(",") if v], default=None,
        help=f"comma-separated subset of {sorted(VARIANT_TITLES)} (default: all of each section)",
    )
    parser.add_argument("--attn", choices=["sdpa", "eager"], default=None,
                        help="attention implementation (default: transformers' default, sdpa). Swin's prompts are "
                             "broadcast over windows with eager and copied once per window with sdpa")
    parser.add_argument("--quick", action="store_true", help="tiny models of every section: a smoke run in seconds")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory processes")
    parser.add_argument("--profile", action="store_true", help="also profile one step of plugin vs floor (ViT)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.variants or []) - set(VARIANT_TITLES))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANT_TITLES)}")
    if args.batch_size is None:
        args.batch_size = 2 if args.quick else 8
    if args.steps is None:
        args.steps = 3 if args.quick else 5
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.threads is None:  # tiny ops gain nothing from a 2nd thread, and lose a lot when the cores are shared
        args.threads = 1 if args.quick else 2
    if args.quick and args.prompts == 10:
        args.prompts = 3
    return args


def _cycle_note(args, sections: list[str]) -> str:
    notes = []
    for section in sections:
        if section == "swinv2":  # skipped: nothing is timed
            continue
        n = len([v for v in SECTION_VARIANTS[section] if not args.variants or v in args.variants])
        notes.append(f"{len(williams_orders(n))} repetitions for {section}")
    return ", ".join(notes)


def main(argv=None) -> int:
    global ATTN_IMPLEMENTATION
    args = parse_args(argv)
    ATTN_IMPLEMENTATION = args.attn
    args.t0 = time.perf_counter()
    # Before anything is computed or allocated here: see MemoryServer.
    args.memory_server = None if args.no_memory else MemoryServer()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    command = "python " + " ".join(shlex.quote(a) for a in ([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])))
    load_before = os.getloadavg()
    sections = ALL_SECTIONS if args.section == "all" else [args.section]
    try:
        results = [run_section(s, args) for s in sections]
    finally:
        if args.memory_server is not None:
            args.memory_server.close()
    profile_text = profile_plugin_vs_floor(args) if args.profile else None
    load_after = os.getloadavg()

    print("## Training-step overhead (forward + backward + AdamW step), CPU")
    print()
    print(f"Command: `{command}`")
    print()
    print(
        f"torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
        f"peft {__import__('peft').__version__}, peft_visual_prompt {peft_visual_prompt.__version__}, "
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; "
        f"attention {args.attn or 'sdpa (default)'}; "
        f"batch {args.batch_size}, {args.prompts} prompts/layer, {args.warmup} warm-up + {args.steps} measured "
        f"interleaved repetitions (Williams-design orders: a full carry-over-balanced cycle is "
        f"{_cycle_note(args, sections)}); memory: "
        f"{'not measured' if args.no_memory else f'{args.mem_steps} steps per fresh process'}; seed {args.seed}; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
        f"(anything above {args.threads} means other work shared the cores and timings are noisy); "
        f"wall {time.perf_counter() - args.t0:.0f} s"
    )
    print()
    for res in results:
        print(format_section(res))
        print()
    if profile_text:
        print("### Profile: one step, plugin vs floor (ViT)")
        print()
        print(profile_text)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
