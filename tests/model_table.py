"""The table of supported model classes that `test_contract.py` runs every PEFT contract item over.

One row per supported model class: how to build a tiny random-weight model of it, where its transformer layers are,
how many prefix tokens stay in front of the prompts, which outputs to compare, which head modules must train (an
independent statement, not read from the package), and which hand-written reference forward applies
(`references.py`). Supporting a new backbone means adding one row here (and a reference if it is a new family).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from references import (
    data2vec_vision_reference,
    beit_reference,
    clip_reference,
    dinov3_reference,
    ijepa_reference,
    siglip_reference,
    swin_reference,
    vit_msn_reference,
    vit_reference,
)
from transformers import (
    Data2VecVisionConfig,
    Data2VecVisionForImageClassification,
    Data2VecVisionModel,
    BeitBackbone,
    BeitConfig,
    BeitForImageClassification,
    BeitModel,
    CLIPConfig,
    CLIPForImageClassification,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    DINOv3ViTBackbone,
    DINOv3ViTConfig,
    DINOv3ViTModel,
    IJepaConfig,
    IJepaForImageClassification,
    IJepaModel,
    MetaClip2Config,
    MetaClip2ForImageClassification,
    MetaClip2VisionConfig,
    MetaClip2VisionModel,
    SiglipConfig,
    SiglipForImageClassification,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTMSNConfig,
    ViTMSNForImageClassification,
    ViTMSNModel,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    Dinov2Backbone,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersBackbone,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersModel,
    SwinBackbone,
    SwinConfig,
    SwinForImageClassification,
    SwinModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

# ------------------------------------------------------------------------------------------------ tiny Swin models

SWIN_CONFIGS = {
    # 64 px: feature maps 16, 8, 4; the last stage equals the window, so Swin turns its shift off (the "shrink" rule).
    # 56 px: 14 and 7 are padded to the window, 7 is padded for patch merging.
    "w4": dict(image_size=64, patch_size=4, embed_dim=16, depths=[2, 2, 2], num_heads=[1, 2, 4], window_size=4),
    # Odd window (shift 1); 40 px: 10 and 5 are padded to multiples of 3.
    "w3": dict(image_size=48, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=3),
}


def perturb_swin_(model) -> None:
    """Swin initialises biases and norms to constants; make every weight matter."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.add_(0.2 * torch.randn_like(module.weight))
                module.bias.add_(0.2 * torch.randn_like(module.bias))
            if hasattr(module, "relative_position_bias_table"):
                module.relative_position_bias_table.normal_(0.0, 1.0)
        if hasattr(model, "classifier"):
            model.classifier.weight.normal_(0.0, 1.0)


def tiny_swin(name: str = "w4", cls=SwinForImageClassification, attn: str = "eager", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    kwargs = {**SWIN_CONFIGS[name], **overrides}
    if cls is not SwinModel:
        kwargs.setdefault("num_labels", 5)
    if cls is SwinBackbone:
        kwargs.setdefault("out_features", ["stem"] + [f"stage{i + 1}" for i in range(len(kwargs["depths"]))])
    model = cls(SwinConfig(**kwargs))
    perturb_swin_(model)
    model.set_attn_implementation(attn)
    return model.eval()


# ------------------------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Row:
    model_cls: type
    config_cls: type
    config: dict
    image_size: int  # of the test images
    num_prefix_tokens: int  # CLS / distillation / register tokens kept in front of the prompts
    layers: tuple[str, ...]  # module paths of the transformer layers (Swin: blocks), in model order
    outputs: tuple[str, ...]  # output fields compared with the reference
    heads: tuple[str, ...]  # head modules that must train (and be saved) with the prompts
    reference: Callable  # references.py: (base, pixel_values, {layer: prompts}, deep, num_prefix=) -> dict
    init: Optional[Callable] = field(default=None)  # in-place weight changes after construction
    mixed_padding: bool = True  # its layers can hide a mixed batch's padded prompts (they take an attention mask)

    @property
    def id(self) -> str:
        return self.model_cls.__name__

    def build(self, attn: str = "sdpa", seed: int = 0):
        torch.manual_seed(seed)
        model = self.model_cls(self.config_cls(**self.config))
        if self.init is not None:
            self.init(model)
        model.set_attn_implementation(attn)
        return model.eval()

    def pixels(self, batch: int = 2, seed: int = 1) -> torch.Tensor:
        return torch.randn(batch, 3, self.image_size, self.image_size, generator=torch.Generator().manual_seed(seed))

    def select(self, output) -> dict[str, torch.Tensor | tuple]:
        """The compared outputs of a model's (or the reference's) result."""
        return {name: output[name] for name in self.outputs}

    def loss(self, output) -> torch.Tensor:
        """A scalar that depends on every element of every compared output (and through them on every head): a fixed
        random weighting, since a plain norm of layer-normalised outputs is nearly constant."""
        gen = torch.Generator().manual_seed(17)
        total = 0.0
        for value in self.select(output).values():
            for tensor in value if isinstance(value, (tuple, list)) else (value,):
                total = total + (tensor.float() * torch.randn(tensor.shape, generator=gen)).mean()
        return total


VIT_SIZE = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                image_size=32, patch_size=8)
LABELS = dict(num_labels=5)
REGISTERS = dict(num_register_tokens=3)


def _layers(prefix: str, count: int = 3) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(count))


def _swin_blocks(prefix: str, depths=SWIN_CONFIGS["w4"]["depths"]) -> tuple[str, ...]:
    return tuple(f"{prefix}encoder.layers.{s}.blocks.{b}" for s, depth in enumerate(depths) for b in range(depth))


def _vit_row(model_cls, config_cls, extra, prefix_tokens, layers, outputs, heads=()):
    return Row(model_cls, config_cls, {**VIT_SIZE, **extra}, 32, prefix_tokens, layers, outputs, heads, vit_reference)


def _swin_row(model_cls, extra, layers, outputs, heads=()):
    return Row(model_cls, SwinConfig, {**SWIN_CONFIGS["w4"], **extra}, 56, 0, layers, outputs, heads, swin_reference,
               init=perturb_swin_)


BARE = ("last_hidden_state", "pooler_output")

ROWS: list[Row] = [
    _vit_row(ViTModel, ViTConfig, {}, 1, _layers("layers."), BARE),
    _vit_row(ViTForImageClassification, ViTConfig, LABELS, 1, _layers("vit.layers."), ("logits",), ("classifier",)),
    _vit_row(DeiTModel, DeiTConfig, {}, 2, _layers("layers."), BARE),
    _vit_row(DeiTForImageClassification, DeiTConfig, LABELS, 2, _layers("deit.layers."), ("logits",),
             ("classifier",)),
    _vit_row(DeiTForImageClassificationWithTeacher, DeiTConfig, LABELS, 2, _layers("deit.layers."),
             ("logits", "cls_logits", "distillation_logits"), ("cls_classifier", "distillation_classifier")),
    _vit_row(Dinov2Model, Dinov2Config, {}, 1, _layers("encoder.layer."), BARE),
    _vit_row(Dinov2ForImageClassification, Dinov2Config, LABELS, 1, _layers("dinov2.encoder.layer."), ("logits",),
             ("classifier",)),
    _vit_row(Dinov2Backbone, Dinov2Config, dict(out_features=["stage1", "stage3"]), 1, _layers("encoder.layer."),
             ("feature_maps",)),
    _vit_row(Dinov2WithRegistersModel, Dinov2WithRegistersConfig, REGISTERS, 4, _layers("encoder.layer."), BARE),
    _vit_row(Dinov2WithRegistersForImageClassification, Dinov2WithRegistersConfig, {**REGISTERS, **LABELS}, 4,
             _layers("dinov2_with_registers.encoder.layer."), ("logits",), ("classifier",)),
    _vit_row(Dinov2WithRegistersBackbone, Dinov2WithRegistersConfig,
             dict(**REGISTERS, out_features=["stem", "stage2", "stage3"]), 4, _layers("encoder.layer."),
             ("feature_maps",)),
    _swin_row(SwinModel, {}, _swin_blocks(""), BARE),
    _swin_row(SwinForImageClassification, LABELS, _swin_blocks("swin."), ("logits",), ("classifier",)),
    _swin_row(SwinBackbone, dict(out_features=["stem", "stage1", "stage2", "stage3"]), _swin_blocks("swin."),
              ("feature_maps",)),
]

# ----------------------------------------------------------------------------- ViT-like families added by issue 13

TEXT_SIZE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=99,
                 max_position_embeddings=16)


def _row(model_cls, config_cls, config, prefix_tokens, layers, outputs, heads, reference):
    init = _unit_classifier_ if "classifier" in heads else None
    return Row(model_cls, config_cls, config, 32, prefix_tokens, layers, outputs, heads, reference, init=init)


def _unit_classifier_(model) -> None:
    """Classifiers start at std 0.02, and I-JEPA's averages over all tokens: give the logits a visible scale."""
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 1.0)


def _two_tower(**extra):
    """A CLIP/SigLIP-style task config: the vision tower is what the row prompts; its text tower is unused."""
    return dict(vision_config=VIT_SIZE, text_config=TEXT_SIZE, **extra)


ROWS += [
    _row(CLIPVisionModel, CLIPVisionConfig, VIT_SIZE, 1, _layers("encoder.layers."), BARE, (), clip_reference),
    _row(MetaClip2VisionModel, MetaClip2VisionConfig, VIT_SIZE, 1, _layers("encoder.layers."), BARE, (),
         clip_reference),
    _row(SiglipVisionModel, SiglipVisionConfig, VIT_SIZE, 0, _layers("encoder.layers."), BARE, (), siglip_reference),
    _row(DINOv3ViTBackbone, DINOv3ViTConfig, dict(**VIT_SIZE, **REGISTERS, out_features=["stage1", "stage3"]), 4,
         _layers("model.layer."), ("feature_maps",), (), dinov3_reference),
    _row(IJepaModel, IJepaConfig, VIT_SIZE, 0, _layers("layers."), ("last_hidden_state",), (), ijepa_reference),
    _row(IJepaForImageClassification, IJepaConfig, {**VIT_SIZE, **LABELS}, 0, _layers("ijepa.layers."), ("logits",),
         ("classifier",), ijepa_reference),
    _row(ViTMSNModel, ViTMSNConfig, VIT_SIZE, 1, _layers("layers."), ("last_hidden_state",), (), vit_msn_reference),
    _row(ViTMSNForImageClassification, ViTMSNConfig, {**VIT_SIZE, **LABELS}, 1, _layers("vit.layers."), ("logits",),
         ("classifier",), vit_msn_reference),
]



def perturb_beit_(model) -> None:
    """BEiT initialises its relative position bias tables to zeros: make them matter (and the classifier visible)."""
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "relative_position_bias_table"):
                module.relative_position_bias_table.normal_(0.0, 1.0)
        if hasattr(model, "classifier"):
            model.classifier.weight.normal_(0.0, 1.0)


def perturb_beit_backbone_(model) -> None:
    """As `perturb_beit_`, and attention values 3x: BEiT's feature maps are unnormalised residual streams, in which
    the attention's share (and so the prompts' effect) is otherwise a few 1e-3."""
    perturb_beit_(model)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "o_proj"):
                module.v_proj.weight.mul_(3.0)
                module.o_proj.weight.mul_(3.0)


BEIT_SIZE = dict(**VIT_SIZE, layer_scale_init_value=1.0)
ROWS += [
    # the layer's own bias and the shared one together, CLS pooling
    Row(BeitModel, BeitConfig, dict(**BEIT_SIZE, use_relative_position_bias=True,
                                    use_shared_relative_position_bias=True, use_mean_pooling=False),
        32, 1, _layers("layers."), BARE, (), beit_reference, init=perturb_beit_),
    # the layer's own bias, mean pooling
    Row(BeitForImageClassification, BeitConfig, dict(**BEIT_SIZE, **LABELS, use_relative_position_bias=True), 32, 1,
        _layers("beit.layers."), ("logits",), ("classifier",), beit_reference, init=perturb_beit_),
    Row(BeitBackbone, BeitConfig, dict(**BEIT_SIZE, use_relative_position_bias=True,
                                       out_features=["stem", "stage2", "stage3"]),
        32, 1, _layers("beit.layers."), ("feature_maps",), (), beit_reference, init=perturb_beit_backbone_),
]

ROWS += [
    # Data2Vec-Vision picks its attention class when built: both rows run its default (sdpa) class under either
    # setting; tests/test_backbones_data2vec_vision.py builds both classes.
    Row(Data2VecVisionModel, Data2VecVisionConfig, dict(**BEIT_SIZE, use_relative_position_bias=True,
                                                        use_shared_relative_position_bias=True),
        32, 1, _layers("encoder.layer."), ("last_hidden_state",), (), data2vec_vision_reference, init=perturb_beit_,
        mixed_padding=False),
    Row(Data2VecVisionForImageClassification, Data2VecVisionConfig,
        dict(**BEIT_SIZE, **LABELS, use_relative_position_bias=True), 32, 1,
        _layers("data2vec_vision.encoder.layer."), ("logits",), ("classifier",), data2vec_vision_reference,
        init=perturb_beit_, mixed_padding=False),
]

ROWS += [
    _row(CLIPVisionModelWithProjection, CLIPVisionConfig, dict(**VIT_SIZE, projection_dim=16), 1,
         _layers("vision_model.encoder.layers."), ("last_hidden_state", "image_embeds"), (), clip_reference),
    _row(CLIPForImageClassification, CLIPConfig, _two_tower(**LABELS), 1, _layers("vision_model.encoder.layers."),
         ("logits",), ("classifier",), clip_reference),
    _row(MetaClip2ForImageClassification, MetaClip2Config, _two_tower(**LABELS), 1,
         _layers("vision_model.encoder.layers."), ("logits",), ("classifier",), clip_reference),
    _row(SiglipForImageClassification, SiglipConfig, _two_tower(**LABELS), 0, _layers("vision_model.encoder.layers."),
         ("logits",), ("classifier",), siglip_reference),
    _row(DINOv3ViTModel, DINOv3ViTConfig, dict(**VIT_SIZE, **REGISTERS), 4, _layers("model.layer."), BARE, (),
         dinov3_reference),
]
