"""SPT (`peft_visual_prompt.spt`): K-means quality against scikit-learn, every strategy against an independent
computation, the memory bound, errors, save/load, deep vs shallow, projection exactness, NMI wiring and its callback, Swin."""

import copy
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits, make_blobs
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import VIT_FAMILY, tiny_model  # noqa: E402

from peft_visual_prompt import VisualPromptConfig, VisualPromptLayer  # noqa: E402
from peft_visual_prompt.spt import (  # noqa: E402
    PromptPatchNMICallback,
    attention_nmi,
    initialize_prompts,
    kmeans,
    nmi_from_tokens,
    prompt_patch_nmi,
)
from peft_visual_prompt.spt.clustering import _lloyd  # noqa: E402
from peft_visual_prompt.spt.comm import Comm  # noqa: E402
from peft_visual_prompt.spt.keys import Reservoir  # noqa: E402

P = 4  # prompt tokens in the small tests


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models and token sets are tiny: one thread is fastest, and far faster on a shared, busy machine."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------------ helpers


def batches(n_batches=3, batch=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(batch, 3, size, size, generator=g), "labels": torch.zeros(batch).long()}
            for _ in range(n_batches)]


def prompted(model_type="vit", deep=True, projection_dim=None, num_prompt_tokens=P, **model_kwargs):
    base = tiny_model(model_type, **model_kwargs)
    reference = copy.deepcopy(base)  # an untouched copy, to collect tokens independently
    config = VisualPromptConfig(num_prompt_tokens=num_prompt_tokens, deep=deep, projection_dim=projection_dim)
    return get_peft_model(base, config), reference


def owned_prompts(model, adapter="default"):
    return [m.visual_prompt_embeddings[adapter].detach().clone() for m in model.modules()
            if isinstance(m, VisualPromptLayer) and adapter in m.visual_prompt_embeddings]


def fed_prompts(model, adapter="default"):
    """What each owning layer inserts: prompts after the projection, if any."""
    return [m.prompts(adapter, 1, torch.float32)[0].detach().clone() for m in model.modules()
            if isinstance(m, VisualPromptLayer) and adapter in m.visual_prompt_embeddings]


def projections(model, adapter="default"):
    """The adapter's projection Linears, one per width: {width: Linear}."""
    return {m.width: m.projection(adapter) for m in model.modules()
            if isinstance(m, VisualPromptLayer) and m.projection(adapter) is not None}


def layer_inputs(reference, data, num_prefix, **forward_kwargs):
    """Independent token collection: `output_hidden_states` of an untouched copy (hidden_states[i] is the input of
    layer i), prefix tokens dropped, images in data order. Returns [layer] -> float64 array (images, tokens, width)."""
    per_layer = None
    with torch.no_grad():
        for batch in data:
            hidden = reference(pixel_values=batch["pixel_values"], output_hidden_states=True,
                               **forward_kwargs).hidden_states
            arrays = [h[:, num_prefix:].double().numpy() for h in hidden[:-1]]
            per_layer = arrays if per_layer is None else [np.concatenate([a, b]) for a, b in zip(per_layer, arrays)]
    return per_layer


def splitmix64(x: int) -> int:
    """Reference splitmix64 finaliser on Python integers."""
    mask = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def key(seed: int, layer: int, sample: int, position: int) -> int:
    return splitmix64(splitmix64(splitmix64(splitmix64(seed) ^ layer) ^ sample) ^ position) >> 1


def smallest_keys(seed, layer, num_samples, num_positions, count):
    """(sample, position) pairs of the `count` smallest priority keys, in key order."""
    keyed = sorted((key(seed, layer, s, t), s, t) for s in range(num_samples) for t in range(num_positions))
    return [(s, t) for _, s, t in keyed[:count]]


def inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    x, c = x.astype(np.float64), centroids.astype(np.float64)
    d = (x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :]
    return float(np.maximum(d.min(1), 0).sum())


# ------------------------------------------------------------------------------------------------------ K-means


def test_kmeans_matches_sklearn_on_blobs():
    x, _ = make_blobs(n_samples=3000, centers=12, n_features=16, cluster_std=3.0, random_state=0)
    x = x.astype(np.float32)
    ours = kmeans(torch.from_numpy(x), 12, seed=0)
    theirs = KMeans(n_clusters=12, n_init=1, random_state=0).fit(x)
    ours_inertia, theirs_inertia = inertia(x, ours.centroids.numpy()), inertia(x, theirs.cluster_centers_)
    assert ours_inertia <= 1.01 * theirs_inertia, (ours_inertia, theirs_inertia)
    assert math.isclose(ours.inertia, ours_inertia, rel_tol=1e-4)  # the reported inertia is the real one
    assert ours.converged


def test_kmeans_accepts_tokens_that_require_grad():
    # Tokens taken from a model in training mode carry grad; K-means treats them as data, with the same result.
    x = torch.from_numpy(make_blobs(n_samples=600, centers=4, n_features=8, random_state=1)[0]).float()
    ours = kmeans(x.clone().requires_grad_(True), 4, seed=0)
    assert torch.equal(ours.centroids, kmeans(x, 4, seed=0).centroids) and not ours.centroids.requires_grad


def test_kmeans_matches_sklearn_on_vit_tokens_through_initialize_prompts():
    digits = load_digits()
    images = torch.from_numpy(digits.images[:480] / 16.0).float()[:, None]  # (n, 1, 8, 8) in [0, 1]
    images = torch.nn.functional.interpolate(images, size=32, mode="bilinear").repeat(1, 3, 1, 1)
    data = [{"pixel_values": (images[i : i + 32] - 0.5) / 0.5} for i in range(0, 480, 32)]
    model, reference = prompted(num_prompt_tokens=10)
    stats = initialize_prompts(model, data, "kmeans", max_tokens_per_layer=480 * 16)
    tokens = layer_inputs(reference, data, num_prefix=1)
    for i, (layer, prompts) in enumerate(zip(stats["layers"], owned_prompts(model))):
        x = tokens[i].reshape(-1, tokens[i].shape[-1]).astype(np.float32)
        assert layer["tokens_used"] == x.shape[0] == 480 * 16
        theirs = KMeans(n_clusters=10, n_init=1, random_state=0).fit(x)
        ours_inertia, theirs_inertia = inertia(x, prompts.numpy()), inertia(x, theirs.cluster_centers_)
        assert ours_inertia <= 1.01 * theirs_inertia, (i, ours_inertia, theirs_inertia)
        assert math.isclose(layer["inertia"], ours_inertia, rel_tol=1e-3)


def plain_lloyd(x: np.ndarray, centers: np.ndarray, steps: int):
    """Textbook Lloyd in float64 (every point's distances, sums recounted each step): (labels, centres) per step."""
    history = []
    for _ in range(steps):
        d = ((x[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
        labels = d.argmin(1)
        centers = np.stack([x[labels == j].mean(0) for j in range(len(centers))])
        history.append((labels, centers))
    return history


def test_lloyd_with_updated_sums_takes_the_textbook_steps():
    # Tokens around a large shared offset, as a residual stream's are; 20 steps, so the sums are updated (not
    # recounted) many times over points that change cluster.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3000, 24, generator=g) + 40.0 + 0.3 * torch.randn(8, 24, generator=g)[torch.arange(3000) % 8]
    mu = x.double().mean(0)
    init = x[:8].double() - mu
    steps = 20
    history = plain_lloyd(x.double().numpy(), (init + mu).numpy(), steps)
    assert all((a[0] != b[0]).sum() > 20 for a, b in zip(history, history[1:]))  # points changed cluster each step
    final, final_inertia, iters, _, _ = _lloyd(
        x, ((x.double() - mu) ** 2).sum(1).float(), init.clone(), mu=mu, comm=Comm(None), max_iter=steps,
        tol_abs=0.0, chunk_size=256, keys=torch.arange(3000),
    )
    assert iters == steps
    # One point in another cluster would move a centre by ~1e-2; the sums are float64 on both sides.
    np.testing.assert_allclose((final + mu).numpy(), history[-1][1], rtol=0, atol=1e-9)
    centers = history[-1][1]
    assert math.isclose(final_inertia, inertia(x.numpy(), centers), rel_tol=1e-5)


@pytest.mark.parametrize("kernel", ["onednn", "addmm"])
def test_both_distance_kernels_find_the_float64_nearest_centres(kernel, monkeypatch):
    # The assignment step scores by oneDNN's linear on CPU where torch has it, else by addmm: each must give the
    # nearest centre and its distance as float64 does, on tokens around a large shared offset.
    from peft_visual_prompt.spt import clustering

    if kernel == "addmm":
        monkeypatch.setattr(clustering, "_onednn_linear", lambda: None)
    elif clustering._onednn_linear() is None:
        pytest.skip("this torch build has no oneDNN linear")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5000, 96, generator=g) + 30.0
    mu = x.double().mean(0)
    centers = x[:10].double() - mu + torch.randn(10, 96, generator=g, dtype=torch.float64)
    labels, dmin = torch.full((5000,), -1), torch.empty(5000)
    x2 = ((x.double() - mu) ** 2).sum(1).float()
    packed = clustering._assign(x, x2, centers, mu.float(), labels, dmin, 1024, update=False)
    d = ((x.double()[:, None, :] - (centers + mu)[None]) ** 2).sum(-1)
    nearest = d.topk(2, dim=1, largest=False).values
    clear = nearest[:, 1] - nearest[:, 0] > 1e-4 * nearest[:, 0]  # not a tie at float32 precision
    assert clear.float().mean() > 0.95
    assert torch.equal(labels[clear], d.argmin(1)[clear])
    torch.testing.assert_close(dmin.double(), nearest[:, 0], rtol=1e-5, atol=1e-3)
    assert math.isclose(packed[0].item(), nearest[:, 0].sum().item(), rel_tol=1e-6)


def test_empty_clusters_are_reseeded_with_the_farthest_points():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(50, 4, generator=g), torch.randn(50, 4, generator=g) + 20])
    centers = torch.tensor([[0.0] * 4, [1e4] * 4, [2e4] * 4], dtype=torch.float64)  # two centres win no point
    mu = torch.zeros(4, dtype=torch.float64)

    def run():
        return _lloyd(x, (x * x).sum(1), centers.clone(), mu=mu, comm=Comm(None), max_iter=100,
                      tol_abs=0.0, chunk_size=32, keys=torch.arange(100))

    final, final_inertia, _, converged, reseeded = run()
    assert reseeded >= 2 and converged
    assert final.abs().max() < 30  # nothing left far away
    assert inertia(x.numpy(), final.numpy()) < inertia(x.numpy(), np.array([[0.0] * 4, [20.0] * 4]))
    assert torch.cdist(final, final).fill_diagonal_(1.0).min() > 0.5  # three distinct centroids
    assert torch.equal(run()[0], final)  # deterministic


# ------------------------------------------------------------------------------------------------------ strategies


@pytest.mark.parametrize("model_type", ["vit", "dinov2_with_registers"])
def test_mean_max_random_equal_an_independent_computation(model_type):
    data = batches()
    num_images = sum(b["pixel_values"].shape[0] for b in data)
    num_prefix = VIT_FAMILY[model_type][3]
    tokens = None
    for strategy in ("mean", "max", "random"):
        model, reference = prompted(model_type)
        tokens = tokens or layer_inputs(reference, data, num_prefix)
        stats = initialize_prompts(model, data, strategy, seed=5)
        assert stats["num_images"] == num_images
        for i, got in enumerate(owned_prompts(model)):
            x = tokens[i]  # (images, N, width), float64
            n_tokens = x.shape[1]
            if strategy == "random":
                picks = smallest_keys(5, i, num_images, n_tokens, P)
                expected = np.stack([x[s, t] for s, t in picks])
            else:
                # Each image's tokens split into P contiguous windows (sizes differ by at most one, larger first),
                # pooled; the prompts are the P (image, window) candidates with the smallest keys.
                bounds = np.cumsum([0] + [n_tokens // P + (w < n_tokens % P) for w in range(P)])
                pool = np.mean if strategy == "mean" else np.max
                picks = smallest_keys(5, i, num_images, P, P)
                expected = np.stack([pool(x[s, bounds[w] : bounds[w + 1]], axis=0) for s, w in picks])
            if strategy == "mean":
                np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)
            else:  # selections of actual values: exact
                np.testing.assert_array_equal(got.numpy(), expected.astype(np.float32))


def test_dataset_indices_make_the_result_independent_of_shuffling_and_batch_size():
    data = batches(4, 4)
    images = torch.cat([b["pixel_values"] for b in data])

    class Images(Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return {"pixel_values": images[i]}

    results = []
    for batch_size, shuffle in ((4, False), (3, True), (16, True)):
        model, _ = prompted()
        loader = DataLoader(Images(), batch_size=batch_size, shuffle=shuffle,
                            generator=torch.Generator().manual_seed(batch_size))
        initialize_prompts(model, loader, "random", seed=1)
        results.append(owned_prompts(model))
    list_model, _ = prompted()
    initialize_prompts(list_model, data, "random", seed=1)  # a plain list: arrival order = dataset order here
    for other in results[1:] + [owned_prompts(list_model)]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_deep_gives_one_set_per_layer_shallow_one_set():
    data = batches()
    deep, _ = prompted(deep=True)
    shallow, _ = prompted(deep=False)
    deep_stats = initialize_prompts(deep, data, "random")
    as_tuples = [(b["pixel_values"], b["labels"]) for b in data]  # torchvision-style batches work too
    shallow_stats = initialize_prompts(shallow, as_tuples, "random")
    assert len(deep_stats["layers"]) == 3 and len(owned_prompts(deep)) == 3
    assert len(shallow_stats["layers"]) == 1 and len(owned_prompts(shallow)) == 1
    # Same first-layer input, same keys: the shallow set is the deep model's first set.
    assert torch.equal(owned_prompts(shallow)[0], owned_prompts(deep)[0])
    assert not torch.equal(owned_prompts(deep)[0], owned_prompts(deep)[1])


def test_pass_restores_modes_and_leaves_the_adapter_enabled():
    model, _ = prompted()
    model.train()
    before = {name: m.training for name, m in model.named_modules()}
    initialize_prompts(model, batches(1), "mean")
    assert {name: m.training for name, m in model.named_modules()} == before
    assert all(not m.disable_adapters for m in model.modules() if isinstance(m, VisualPromptLayer))
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules() if isinstance(m, VisualPromptLayer))


# ------------------------------------------------------------------------------------------------------ memory


def test_reservoir_never_exceeds_the_cap(monkeypatch):
    cap = 64
    allocated = []
    offer = Reservoir.offer

    def spy(self, keys, take):
        offer(self, keys, take)
        allocated.append((self._rows.shape[0], self.size, self.capacity))

    monkeypatch.setattr(Reservoir, "offer", spy)

    def stream():  # a generator: no length, read once
        g = torch.Generator().manual_seed(0)
        for _ in range(40):
            yield {"pixel_values": torch.randn(8, 3, 32, 32, generator=g)}

    model, _ = prompted()
    stats = initialize_prompts(model, stream(), "kmeans", max_tokens_per_layer=cap)
    assert stats["num_images"] == 320
    for layer in stats["layers"]:
        assert layer["tokens_seen"] == 320 * 16 == 80 * cap
        assert layer["tokens_used"] == layer["reservoir_peak"] == layer["reservoir_capacity"] == cap
    assert max(rows for rows, _, _ in allocated) <= cap and max(size for _, size, _ in allocated) == cap
    assert model.peft_config["default"].spt_init["num_tokens"] == 3 * cap


# ------------------------------------------------------------------------------------------------------ errors


def test_errors_name_the_fix():
    model, _ = prompted()
    with pytest.raises(ValueError, match="no batches"):
        initialize_prompts(model, [], "kmeans")
    with pytest.raises(ValueError, match="no batches"):
        initialize_prompts(model, DataLoader([], batch_size=2), "kmeans")
    with pytest.raises(ValueError, match=r"'pixel_values'.*\['image', 'labels'\]"):
        initialize_prompts(model, [{"image": torch.zeros(2, 3, 32, 32), "labels": torch.zeros(2)}], "kmeans")
    many, _ = prompted(num_prompt_tokens=20)
    one_image = [{"pixel_values": torch.randn(1, 3, 32, 32)}]  # 16 tokens a layer
    for strategy in ("kmeans", "random"):
        with pytest.raises(ValueError, match="kept 16 tokens from 1 images, fewer than num_prompt_tokens=20.*more "):
            initialize_prompts(many, one_image, strategy)
    with pytest.raises(ValueError, match="num_prompt_tokens=20 windows.*receives only 16 tokens"):
        initialize_prompts(many, one_image, "mean")
    with pytest.raises(ValueError, match=r"Unknown SPT strategy 'kmedoids'.*kmeans"):
        initialize_prompts(model, batches(1), "kmedoids")
    with pytest.raises(ValueError, match="max_tokens_per_layer=2 is smaller than num_prompt_tokens=4"):
        initialize_prompts(model, batches(1), "kmeans", max_tokens_per_layer=2)
    with pytest.raises(TypeError, match="visual-prompt PEFT model.*get_peft_model"):
        initialize_prompts(tiny_model(), batches(1))
    lora = get_peft_model(tiny_model(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="visual-prompt PEFT model"):
        initialize_prompts(lora, batches(1))
    with pytest.raises(ValueError, match="Adapter 'other' is not a visual-prompt adapter"):
        initialize_prompts(model, batches(1), adapter_name="other")


class Images(Dataset):
    """A map-style dataset over a tensor of images."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i]}


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_tokens_raise_naming_batch_images_and_layer_and_leave_prompts_untouched(bad_value):
    images = torch.cat([b["pixel_values"] for b in batches(2, 4)])
    images[5, 1, 7, 9] = bad_value  # one pixel of one image: dataset index 5, in the second batch of 4
    for strategy in ("kmeans", "mean"):
        model, _ = prompted(projection_dim=16)
        before = [p.clone() for p in owned_prompts(model)]
        projection_before = {w: copy.deepcopy(l.state_dict()) for w, l in projections(model).items()}
        model.train()
        with pytest.raises(ValueError, match=r"non-finite tokens .*batch 1 \(images \[1\] of that batch; dataset "
                                             r"indices \[5\]\) at the input of layer .*layers\.0\b"):
            initialize_prompts(model, DataLoader(Images(images), batch_size=4), strategy)
        for a, b in zip(before, owned_prompts(model)):
            assert torch.equal(a, b)  # bit-identical: nothing was written
        for width, linear in projections(model).items():
            for name, tensor in linear.state_dict().items():
                assert torch.equal(tensor, projection_before[width][name])
        assert model.training and all(len(m._forward_pre_hooks) == 0 for m in model.modules())
        assert model.peft_config["default"].spt_init is None
    # A plain iterable of batches: images are named by their position in the batch.
    model, _ = prompted()
    before = owned_prompts(model)
    with pytest.raises(ValueError, match=r"non-finite tokens .*batch 1 \(images \[1\] of that batch\) at the input"):
        initialize_prompts(model, [{"pixel_values": images[:4]}, {"pixel_values": images[4:]}], "random")
    for a, b in zip(before, owned_prompts(model)):
        assert torch.equal(a, b)


def test_forward_kwargs_reach_the_backbone_interpolate_pos_encoding():
    data = batches(2, 3, size=48)  # the model was built for 32 px: 6 x 6 = 36 patches instead of 16
    model, reference = prompted()
    with pytest.raises(ValueError, match=r"Input image size \(48\*48\) doesn't match model"):
        initialize_prompts(model, data, "random")
    tokens = layer_inputs(reference, data, num_prefix=1, interpolate_pos_encoding=True)
    assert tokens[0].shape[1] == 36
    for strategy in ("random", "mean"):
        model, _ = prompted()
        stats = initialize_prompts(model, data, strategy, seed=2, forward_kwargs={"interpolate_pos_encoding": True})
        assert [l["tokens_per_image"] for l in stats["layers"]] == [36, 36, 36]
        for i, got in enumerate(owned_prompts(model)):
            x = tokens[i]
            if strategy == "random":
                expected = np.stack([x[s, t] for s, t in smallest_keys(2, i, 6, 36, P)])
                np.testing.assert_array_equal(got.numpy(), expected.astype(np.float32))
            else:
                expected = np.stack([x[s, 9 * w : 9 * w + 9].mean(0) for s, w in smallest_keys(2, i, 6, P, P)])
                np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="forward_kwargs must be a dict .*without 'pixel_values'"):
        initialize_prompts(model, data, "random", forward_kwargs={"pixel_values": None})
    values = prompt_patch_nmi(model, data[0]["pixel_values"], forward_kwargs={"interpolate_pos_encoding": True})
    assert len(values) == 3 and all(0.0 <= v <= 1.0 for v in values)


# ------------------------------------------------------------------------------------------------------ save / load


def test_round_trip_reproduces_prompts_and_records_spt_init(tmp_path):
    model, _ = prompted(projection_dim=16)
    stats = initialize_prompts(model, batches(), "kmeans", max_tokens_per_layer=100, seed=2)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["spt_init"]
    assert saved["strategy"] == "kmeans" and saved["num_images"] == 12 and saved["seed"] == 2
    assert saved["tokens_used_per_layer"] == [l["tokens_used"] for l in stats["layers"]] == [100, 100, 100]
    assert saved["num_tokens"] == 300
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    assert loaded.peft_config["default"].spt_init == saved
    for a, b in zip(owned_prompts(model), owned_prompts(loaded)):
        assert torch.equal(a, b)
    for a, b in zip(fed_prompts(model), fed_prompts(loaded)):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------------ projection


def test_projection_reproduces_the_prototypes_exactly():
    data = batches()
    plain, _ = prompted()
    projected, _ = prompted(projection_dim=16)  # 3 layers x 4 prompts: affine rank <= 11 <= 16
    initialize_prompts(plain, data, "kmeans", max_tokens_per_layer=100)
    initialize_prompts(projected, data, "kmeans", max_tokens_per_layer=100)
    for want, got in zip(owned_prompts(plain), fed_prompts(projected)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    linear = projections(projected)[32]
    weight = linear.weight.detach().double()
    torch.testing.assert_close(weight[:, :11].T @ weight[:, :11], torch.eye(11, dtype=torch.float64), atol=1e-5,
                               rtol=0)
    assert torch.all(weight[:, 11:] == 0)

    narrow, _ = prompted(projection_dim=8)
    with pytest.raises(ValueError, match=r"projection_dim=8 cannot.*rank 11.*projection_dim>=11"):
        initialize_prompts(narrow, data, "kmeans", max_tokens_per_layer=100)


# ------------------------------------------------------------------------------------------------------ NMI


@pytest.mark.parametrize("estimator", ["tokens", "attention"])
@pytest.mark.parametrize("deep", [True, False])
def test_nmi_reads_each_layers_prompts_and_patches(deep, estimator):
    """Wiring: `prompt_patch_nmi` applies the estimator to the (prompts, patches) each layer reads, captured here by a
    hand-written VPT forward. The estimator itself is tested against known answers in test_spt_nmi.py."""
    model, reference = prompted(deep=deep)
    data = batches(2)
    initialize_prompts(model, data, "random")
    with torch.no_grad():
        for m in model.modules():  # large prompts make the sigmoid table far from uniform
            if isinstance(m, VisualPromptLayer) and "default" in m.visual_prompt_embeddings:
                m.visual_prompt_embeddings["default"].mul_(6.0)
    pixels = data[0]["pixel_values"][:2]
    got = prompt_patch_nmi(model, pixels, estimator=estimator)
    layers = [m for m in model.modules() if isinstance(m, VisualPromptLayer)]
    # Hand-written VPT forward on the untouched copy, recording (prompts, patches) at each layer's input.
    own = owned_prompts(model)
    expected = []
    with torch.no_grad():
        backbone = reference.vit
        hidden = backbone.embeddings(pixels)
        for i, layer in enumerate(backbone.layers):
            if i == 0 or deep:
                rest = hidden[:, 1:] if i == 0 else hidden[:, 1 + P :]
                hidden = torch.cat([hidden[:, :1], own[i].expand(2, -1, -1), rest], dim=1)
            prompts, patches = hidden[:, 1 : 1 + P], hidden[:, 1 + P :]
            expected.append(nmi_from_tokens(prompts, patches) if estimator == "tokens"
                            else attention_nmi(prompts, patches, layers[i]))
            hidden = layer(hidden)
    assert len(got) == 3
    assert all(0.0 <= v <= 1.0 for v in got)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)
    assert max(got) > (1e-3 if estimator == "tokens" else 1e-7)  # not trivially 0
    with pytest.raises(ValueError, match="estimator must be one of"):
        prompt_patch_nmi(model, pixels, estimator="dot")


def test_nmi_callback_logs_into_log_history(tmp_path):
    from transformers import Trainer, TrainingArguments

    model, _ = prompted()
    pixels = batches(1)[0]["pixel_values"]
    g = torch.Generator().manual_seed(0)
    rows = [{"pixel_values": torch.randn(3, 32, 32, generator=g), "labels": i % 5} for i in range(8)]

    class Rows(Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    every_step = PromptPatchNMICallback(pixels, every_n_steps=1, on_evaluate=False)
    on_eval = PromptPatchNMICallback(pixels, prefix="eval_nmi")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, use_cpu=True,
                             report_to=[], save_strategy="no", eval_strategy="steps", eval_steps=2, logging_steps=1,
                             learning_rate=1e-2, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), eval_dataset=Rows(),
                      callbacks=[every_step, on_eval])
    on_eval.trainer = trainer  # through Trainer.log
    trainer.train()
    metrics = trainer.evaluate()
    history = trainer.state.log_history
    per_step = [e for e in history if "nmi/layer_0" in e]
    assert [e["step"] for e in per_step] == [1, 2]
    assert all(0.0 <= e[f"nmi/layer_{i}"] <= 1.0 for e in per_step for i in range(3))
    evaluated = [e for e in history if "eval_nmi/layer_2" in e]
    assert len(evaluated) == 2 and "eval_nmi/mean" in metrics  # after the step-2 evaluation and evaluate()


# ------------------------------------------------------------------------------------------------------ Swin


def tiny_swin():
    from transformers import SwinConfig, SwinForImageClassification

    torch.manual_seed(0)
    config = SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4,
                        num_labels=3)
    return SwinForImageClassification(config).eval()


def swin_block_inputs(reference, data):
    from transformers.models.swin.modeling_swin import SwinLayer

    blocks = [m for m in reference.modules() if isinstance(m, SwinLayer)]
    seen = [[] for _ in blocks]
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].double().numpy()))
               for i, b in enumerate(blocks)]
    with torch.no_grad():
        for batch in data:
            reference(pixel_values=batch["pixel_values"])
    for h in handles:
        h.remove()
    return [np.concatenate(s) for s in seen]


def test_swin_tokens_pooling_projection_and_nmi():
    data = batches(2, 3)
    reference = tiny_swin()
    tokens = swin_block_inputs(reference, data)  # widths 16, 16, 32, 32; 64, 64, 16, 16 tokens
    for strategy in ("random", "max"):
        model = get_peft_model(tiny_swin(), VisualPromptConfig(num_prompt_tokens=3, deep=True))
        stats = initialize_prompts(model, data, strategy, seed=4)
        assert [l["tokens_per_image"] for l in stats["layers"]] == [64, 64, 16, 16]
        for i, got in enumerate(owned_prompts(model)):
            x = tokens[i]
            if strategy == "random":
                expected = np.stack([x[s, t] for s, t in smallest_keys(4, i, 6, x.shape[1], 3)])
            else:
                bounds = np.cumsum([0] + [x.shape[1] // 3 + (w < x.shape[1] % 3) for w in range(3)])
                expected = np.stack([x[s, bounds[w] : bounds[w + 1]].max(0) for s, w in smallest_keys(4, i, 6, 3, 3)])
            np.testing.assert_array_equal(got.numpy(), expected.astype(np.float32))

    plain = get_peft_model(tiny_swin(), VisualPromptConfig(num_prompt_tokens=3, deep=True))
    projected = get_peft_model(tiny_swin(), VisualPromptConfig(num_prompt_tokens=3, deep=True, projection_dim=8))
    initialize_prompts(plain, data, "kmeans", max_tokens_per_layer=200)
    initialize_prompts(projected, data, "kmeans", max_tokens_per_layer=200)
    assert set(projections(projected)) == {16, 32}  # one Linear per stage width
    for want, got in zip(owned_prompts(plain), fed_prompts(projected)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    for deep in (True, False):
        model = get_peft_model(tiny_swin(), VisualPromptConfig(num_prompt_tokens=3, deep=deep))
        stats = initialize_prompts(model, data, "kmeans", max_tokens_per_layer=200)
        assert len(stats["layers"]) == (4 if deep else 1)
        values = prompt_patch_nmi(model, data[0]["pixel_values"])
        assert len(values) == 4 and all(0.0 <= v <= 1.0 for v in values)
