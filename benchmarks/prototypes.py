"""SPT prototype costs on CPU: our K-means against scikit-learn's, and the whole prototype pass on ViT-B/16.

A. K-means. A clustered token set (default 200,000 x 768, float32): a Gaussian mixture of 40 components with unequal
   weights and spreads around a large shared offset (ViT tokens share a big mean direction). Both sides cluster it
   into k = 10 with the same stopping rule (max_iter 300, tol 1e-4 relative to the mean feature variance, sklearn's
   definition): `peft_visual_prompt.spt.kmeans` (torch; greedy k-means++ and Lloyd on a 4,096-point key-ordered
   sample, best of 3, then Lloyd on all points) and `sklearn.cluster.KMeans(n_clusters=10, n_init=1, random_state=0,
   algorithm="lloyd")` (greedy k-means++ on all points, then Lloyd). Ours always runs K-means on one CPU thread (by
   design, see `spt._kmeans`); sklearn runs on 1, then 2 threads (threadpoolctl). Runs alternate (ours, sklearn,
   ours, sklearn, ...) so that load on the machine hits both alike; the table shows every run and the ratio of
   medians. One more run of ours, configured like sklearn (seeding on all points, n_init 1), separates the engine
   (per-iteration cost) from the algorithm (most iterations on the sample).
   Inertia is recomputed for every result in float64 from the returned centroids.
B. The prototype pass. `initialize_prompts` on ViT-B/16 (random weights, 224 px, VPT-Deep, 10 prompts, K-means, the
   default cap of 65,536 tokens per layer) over N synthetic images (default 32, batch 16), and VPT-Shallow alike.
   Each pass runs in a fresh process. "collect" is the pass over the data (forward with hooks, reservoir updates),
   "prototypes" the K-means and writing. Per 1,000 images (196,000 tokens a layer: the cap is reached) we scale
   "collect" linearly (it is per image) and add K-means at the cap, measured once on 65,536 real tokens of this model
   (layer-0 inputs of 335 images, from the embeddings alone) and counted once per layer that owns prompts (12 deep,
   1 shallow).
C. Peak memory. The deep pass with `max_tokens_per_layer=4096` on N and 2N images, a fresh process each: peak RSS
   growth over the process's RSS after building the model (kernel high-water mark reset there), and the reservoir
   rows the pass stored. Both runs exceed the cap (N x 196 > 4,096), so the reservoir is full in both and the peak
   should not grow with the data.

D. The pass against a forward. In one process, on the same ViT-B/16 and the same loader (N synthetic images, batch
   16, VPT-Deep, 10 prompts, default cap): a plain no-grad forward of the model over the loader (adapter disabled,
   eval mode: the floor) and `initialize_prompts` with each strategy, interleaved (forward, kmeans, forward, mean,
   forward, max, forward, random, forward, ...) so that load on the machine hits all alike. Each pass is reported as
   a ratio to the mean of the two forwards around it.

E. K-means seeding, former against current, on `cap` real tokens of this model (layer-0 inputs, as in B), k = 10,
   alternating: the former seeding refined each of the 3 k-means++ seedings by Lloyd on the 4,096-token sample and kept
   the best; the current one keeps the seeding with the lowest potential and refines only it. Both then run Lloyd on
   all tokens; inertia is recomputed in float64.

F. The distance kernel of the Lloyd steps. The 12 layers' inputs of ViT-B/16 over N synthetic images (CLS excluded,
   what the deep pass clusters), each clustered into k = 10 one layer after the other on one thread, with each way
   of scoring a block of rows against the centres: oneDNN's linear (the default on CPU where torch has it), addmm
   in the (k, rows) layout (the fallback) and addmm in the (rows, k) layout (the former default). Alternating by
   repetition; the table shows the seconds for the 12 layers, their Lloyd iterations on all tokens, and the sum of
   the 12 inertias, which differ between kernels only by rounding.

Usage:
    python benchmarks/prototypes.py --section seeding --reps 3 --cap 6272   # 32 images' worth of tokens
    python benchmarks/prototypes.py --section seeding --reps 1              # the default cap, 65,536
    python benchmarks/prototypes.py                  # all sections (about 8 minutes on 2 busy cores)
    python benchmarks/prototypes.py --section ratio --images 32 --reps 2
    python benchmarks/prototypes.py --section kmeans --reps 3
    python benchmarks/prototypes.py --section kernel --images 32 --reps 3
    python benchmarks/prototypes.py --quick          # small sizes, a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------------------------------------- data


def mixture(n: int, dim: int, components: int = 40, seed: int = 0) -> np.ndarray:
    """Clustered float32 tokens: unequal weights and spreads, plus a shared offset of norm ~30."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(components, dim)).astype(np.float32) * 1.5
    spreads = rng.uniform(0.5, 1.5, size=components).astype(np.float32)
    weights = rng.dirichlet(np.full(components, 2.0))
    labels = rng.choice(components, size=n, p=weights)
    offset = rng.normal(size=dim).astype(np.float32) * (30.0 / np.sqrt(dim))
    x = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 50_000):
        part = labels[start : start + 50_000]
        noise = rng.standard_normal(size=(part.size, dim), dtype=np.float32)
        x[start : start + part.size] = centers[part] + spreads[part, None] * noise + offset
    return x


def inertia64(x: np.ndarray, centroids: np.ndarray) -> float:
    c = centroids.astype(np.float64)
    c2 = (c * c).sum(1)
    total = 0.0
    for start in range(0, x.shape[0], 20_000):
        block = x[start : start + 20_000].astype(np.float64)
        d = (block * block).sum(1)[:, None] - 2 * block @ c.T + c2[None, :]
        total += float(np.maximum(d.min(1), 0).sum())
    return total


def vit(quick: bool):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    if quick:
        config = ViTConfig(image_size=64, patch_size=16, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=128, num_labels=10)
    else:
        config = ViTConfig(image_size=224, patch_size=16, num_labels=100)  # ViT-B/16
    return ViTForImageClassification(config).eval()


def image(i: int, size: int) -> torch.Tensor:
    return torch.randn(3, size, size, generator=torch.Generator().manual_seed(i))


# ----------------------------------------------------------------------------------------------- section A


def bench_kmeans(n: int, dim: int, k: int, reps: int, threads: list[int]) -> dict:
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    from peft_visual_prompt.spt import KMEANS_MAX_ITER, KMEANS_TOL, kmeans

    x = mixture(n, dim)
    xt = torch.from_numpy(x)
    default_threads = torch.get_num_threads()
    runs = []
    for count in threads:
        torch.set_num_threads(count)
        with threadpool_limits(count):
            for rep in range(reps):
                row = {"threads": count, "rep": rep + 1}
                start = time.perf_counter()
                result = kmeans(xt, k, seed=0, max_iter=KMEANS_MAX_ITER, tol=KMEANS_TOL)
                row["ours"] = {"seconds": time.perf_counter() - start, "iterations": result.n_iter,
                               "inertia": inertia64(x, result.centroids.numpy())}
                start = time.perf_counter()
                fitted = KMeans(n_clusters=k, n_init=1, random_state=0, max_iter=KMEANS_MAX_ITER, tol=KMEANS_TOL,
                                algorithm="lloyd").fit(x)
                row["sklearn"] = {"seconds": time.perf_counter() - start, "iterations": int(fitted.n_iter_),
                                  "inertia": inertia64(x, fitted.cluster_centers_)}
                runs.append(row)
    torch.set_num_threads(default_threads)
    start = time.perf_counter()
    alike = kmeans(xt, k, seed=0, n_init=1, sample_size=n)  # seeding on every point, one run: sklearn's recipe
    alike = {"seconds": time.perf_counter() - start, "iterations": alike.n_iter + alike.seeding_iterations,
             "inertia": inertia64(x, alike.centroids.numpy())}
    return {"n": n, "dim": dim, "k": k, "runs": runs, "alike": alike}


def report_kmeans(res: dict) -> None:
    print(f"### A. K-means, {res['n']:,} x {res['dim']} float32 tokens (40-component mixture), k = {res['k']}\n")
    print("| sklearn threads | run | ours (s) | ours Lloyd iters on all points | ours inertia | sklearn (s) | "
          "sklearn iters | sklearn inertia | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in res["runs"]:
        a, b = r["ours"], r["sklearn"]
        print(f"| {r['threads']} | {r['rep']} | {a['seconds']:.2f} | {a['iterations']} | {a['inertia']:.6e} | "
              f"{b['seconds']:.2f} | {b['iterations']} | {b['inertia']:.6e} | {b['seconds'] / a['seconds']:.1f}x |")
    print()
    for count in sorted({r["threads"] for r in res["runs"]}):
        rows = [r for r in res["runs"] if r["threads"] == count]
        ours = statistics.median(r["ours"]["seconds"] for r in rows)
        theirs = statistics.median(r["sklearn"]["seconds"] for r in rows)
        ratio = rows[0]["ours"]["inertia"] / rows[0]["sklearn"]["inertia"]
        print(f"- sklearn on {count} thread(s): median ours {ours:.2f} s, sklearn {theirs:.2f} s: "
              f"**{theirs / ours:.1f}x faster**; inertia ours / sklearn = {ratio:.5f} "
              f"({'equal or better' if ratio <= 1 + 1e-9 else 'worse'})")
    alike = res["alike"]
    print(f"- ours configured like sklearn (k-means++ on all {res['n']:,} points, n_init 1): {alike['seconds']:.2f} s, "
          f"{alike['iterations']} Lloyd iterations, inertia {alike['inertia']:.6e}\n")


# ----------------------------------------------------------------------------------------------- sections B and C


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def one_pass(images: int, deep: bool, cap: int, quick: bool, batch_size: int) -> dict:
    """Runs in a fresh process: builds the model, resets the RSS high-water mark, runs one pass."""
    from peft import get_peft_model
    from torch.utils.data import DataLoader, Dataset

    from peft_visual_prompt import VisualPromptConfig
    from peft_visual_prompt.spt import initialize_prompts

    base = vit(quick)
    size = base.config.image_size
    model = get_peft_model(base, VisualPromptConfig(num_prompt_tokens=10, deep=deep))

    class Synthetic(Dataset):  # generated on the fly: the data itself takes no memory
        def __len__(self):
            return images

        def __getitem__(self, i):
            return {"pixel_values": image(i, size)}

    loader = DataLoader(Synthetic(), batch_size=batch_size)
    baseline = _rss_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    start = time.perf_counter()
    stats = initialize_prompts(model, loader, "kmeans", max_tokens_per_layer=cap)
    wall = time.perf_counter() - start
    growth = (_rss_kib("VmHWM") - baseline) / 1024 if reset else None
    return {
        "images": images, "deep": deep, "cap": cap, "wall": wall, "seconds": stats["seconds"],
        "tokens_per_image": stats["layers"][0]["tokens_per_image"], "layers": len(stats["layers"]),
        "reservoir_peak": [layer["reservoir_peak"] for layer in stats["layers"]],
        "iterations": [layer["iterations"] for layer in stats["layers"]],
        "rss_baseline_mib": baseline / 1024, "peak_growth_mib": growth,
    }


def run_pass(images: int, deep: bool, cap: int, quick: bool, batch_size: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_pass", json.dumps(
        {"images": images, "deep": deep, "cap": cap, "quick": quick, "batch_size": batch_size})]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def layer0_tokens(quick: bool, cap: int) -> tuple[torch.Tensor, int, int]:
    """(`cap` real layer-0 tokens of the model from enough synthetic images, the cap used, the images needed)."""
    model = vit(quick)
    size = model.config.image_size
    per_image = (size // model.config.patch_size) ** 2
    cap = cap if not quick else 4096
    needed = -(-cap // per_image)
    tokens = []
    with torch.no_grad():
        for start in range(0, needed, 64):
            pixels = torch.stack([image(10_000 + i, size) for i in range(start, min(needed, start + 64))])
            tokens.append(model.vit.embeddings(pixels)[:, 1:].reshape(-1, model.config.hidden_size))
    return torch.cat(tokens)[:cap].contiguous(), cap, needed


def kmeans_at_cap(quick: bool, k: int = 10, cap: int = 65536) -> dict:
    """K-means on `cap` real tokens of the model: layer-0 inputs (embeddings only) of enough synthetic images."""
    from peft_visual_prompt.spt import kmeans

    tokens, cap, needed = layer0_tokens(quick, cap)
    start = time.perf_counter()
    result = kmeans(tokens, k)
    return {"cap": cap, "images": needed, "seconds": time.perf_counter() - start, "iterations": result.n_iter}


def report_pass(runs: list[dict], at_cap: dict, quick: bool) -> None:
    model = "tiny ViT (--quick)" if quick else "ViT-B/16, 224 px, random weights"
    print(f"### B. Prototype pass, {model}, 10 prompts, K-means, default cap\n")
    print("| variant | images | collect (s) | prototypes (s) | total (s) | K-means iters (full set, per layer) | "
          "collect s / 1,000 images | est. total s / 1,000 images |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        per_image = r["seconds"]["collect"] / r["images"]
        estimate = per_image * 1000 + at_cap["seconds"] * r["layers"]
        iters = f"{min(r['iterations'])}-{max(r['iterations'])}" if len(r["iterations"]) > 1 else r["iterations"][0]
        print(f"| {'deep' if r['deep'] else 'shallow'} ({r['layers']} layer(s) own prompts) | {r['images']} | "
              f"{r['seconds']['collect']:.1f} | {r['seconds']['prototypes']:.2f} | {r['wall']:.1f} | {iters} | "
              f"{per_image * 1000:.0f} | {estimate:.0f} |")
    print(f"\n- K-means at the cap: {at_cap['cap']:,} layer-0 tokens of this model ({at_cap['images']} images), "
          f"k = 10: {at_cap['seconds']:.2f} s, {at_cap['iterations']} Lloyd iterations on all points.")
    print("- est. total = collect per image x 1,000 + K-means at the cap x layers that own prompts; measured on the "
          "images above and scaled, not run on 1,000 images.\n")


def report_memory(runs: list[dict]) -> None:
    print(f"### C. Peak memory of the deep pass, max_tokens_per_layer = {runs[0]['cap']:,}\n")
    print("| images | tokens seen a layer | reservoir rows stored a layer (max) | RSS after model build (MiB) | "
          "peak RSS growth during the pass (MiB) |")
    print("|---|---|---|---|---|")
    for r in runs:
        growth = "n/a" if r["peak_growth_mib"] is None else f"{r['peak_growth_mib']:.0f}"
        print(f"| {r['images']} | {r['images'] * r['tokens_per_image']:,} | {max(r['reservoir_peak']):,} | "
              f"{r['rss_baseline_mib']:.0f} | {growth} |")
    print()


# ----------------------------------------------------------------------------------------------- section F


def layer_inputs(images: int, batch_size: int, quick: bool) -> list[torch.Tensor]:
    """What each of the model's layers receives over `images` synthetic images, CLS excluded: (tokens, width) each."""
    model = vit(quick)
    size, per_layer = model.config.image_size, None
    with torch.no_grad():
        for start in range(0, images, batch_size):
            pixels = torch.stack([image(i, size) for i in range(start, min(images, start + batch_size))])
            states = model(pixel_values=pixels, output_hidden_states=True).hidden_states[:-1]
            batch = [h[:, 1:].reshape(-1, h.shape[-1]) for h in states]
            per_layer = batch if per_layer is None else [torch.cat(pair) for pair in zip(per_layer, batch)]
    return per_layer


def former_scorer(c32: torch.Tensor, bias: torch.Tensor):
    """The former Lloyd-step scoring: one addmm per block in the (rows, k) layout."""
    def scores(block, best_out, label_out):
        torch.min(torch.addmm(bias[None, :], block, c32.T, alpha=-2.0), 1, out=(best_out, label_out))
    return scores


def bench_kernel(images: int, batch_size: int, reps: int, quick: bool, k: int = 10) -> dict:
    from peft_visual_prompt.spt import clustering

    layers = layer_inputs(images, batch_size, quick)
    default_scorer, probe = clustering._scorer, clustering._onednn_linear
    kernels = {"oneDNN linear": (default_scorer, probe), "addmm (k, rows)": (default_scorer, lambda: None),
               "addmm (rows, k), former": (former_scorer, probe)}
    if probe() is None:
        del kernels["oneDNN linear"]
    rows = []
    try:
        clustering.kmeans(layers[0], k)  # warm-up
        for rep in range(reps):
            for name, (scorer, onednn) in kernels.items():
                clustering._scorer, clustering._onednn_linear = scorer, onednn
                start = time.perf_counter()
                results = [clustering.kmeans(x, k) for x in layers]
                rows.append({"rep": rep + 1, "kernel": name, "seconds": time.perf_counter() - start,
                             "iterations": [r.n_iter for r in results],
                             "inertia": sum(r.inertia for r in results)})
    finally:
        clustering._scorer, clustering._onednn_linear = default_scorer, probe
    return {"images": images, "tokens": layers[0].shape[0], "layers": len(layers), "rows": rows}


def report_kernel(res: dict) -> None:
    print(f"### F. The Lloyd steps' distance kernel: K-means of {res['layers']} layers' inputs, {res['images']} images "
          f"({res['tokens']:,} tokens a layer), k = 10, one thread, layers one after the other\n")
    print("| rep | kernel | seconds (all layers) | Lloyd iterations on all tokens, per layer | sum of inertias |")
    print("|---|---|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['rep']} | {r['kernel']} | {r['seconds']:.2f} | {' '.join(map(str, r['iterations']))} | "
              f"{r['inertia']:.7e} |")
    medians = {}
    for r in res["rows"]:
        medians.setdefault(r["kernel"], []).append(r["seconds"])
    base = statistics.median(medians["addmm (rows, k), former"])
    for name, seconds in medians.items():
        print(f"- {name}: median {statistics.median(seconds):.2f} s, "
              f"{base / statistics.median(seconds):.2f}x the former kernel's speed")
    print()


# ----------------------------------------------------------------------------------------------- section E


def former_kmeans(x: torch.Tensor, k: int, seed: int = 0):
    """The former `clustering._cluster`: Lloyd on the sample from each of n_init seedings, keep the best."""
    from peft_visual_prompt.spt import clustering as c
    from peft_visual_prompt.spt.comm import Comm

    original = c._kmeans_plusplus
    box = {}

    def plusplus(sample, k_, gen, n_init):
        # The current code picks one of n_init seedings by potential; here: run Lloyd from each seeding (drawn one
        # after the other, as the current code draws them) and keep the lowest Lloyd inertia, the former choice.
        best = None
        for _ in range(n_init):
            centers, _ = original(sample, k_, gen, 1)
            refined, inertia, _, _, _ = c._lloyd(
                sample, (sample * sample).sum(1), centers, mu=torch.zeros(sample.shape[1], dtype=torch.float64),
                comm=Comm(None), max_iter=c.KMEANS_MAX_ITER, tol_abs=box["tol"], chunk_size=4096,
                keys=torch.arange(sample.shape[0]))
            if best is None or inertia < best[1]:
                best = (refined, inertia)
        return best

    # tol_abs as `_cluster` computes it (mean per-feature variance of all points)
    box["tol"] = float(c.KMEANS_TOL * x.double().var(0, unbiased=False).mean())
    c._kmeans_plusplus = plusplus
    try:
        return c.kmeans(x, k, seed=seed)
    finally:
        c._kmeans_plusplus = original


def bench_seeding(quick: bool, reps: int, k: int = 10, cap: int = 65536) -> dict:
    from peft_visual_prompt.spt import kmeans

    x, cap, _ = layer0_tokens(quick, cap)
    xn = x.numpy()
    rows = []
    for rep in range(reps):
        for name, fn in (("former", lambda: former_kmeans(x, k)), ("current", lambda: kmeans(x, k))):
            start = time.perf_counter()
            result = fn()
            rows.append({"rep": rep + 1, "seeding": name, "seconds": time.perf_counter() - start,
                         "iterations": result.n_iter, "inertia": inertia64(xn, result.centroids.numpy())})
    return {"cap": cap, "rows": rows}


def report_seeding(res: dict) -> None:
    print(f"### E. K-means seeding, former against current, {res['cap']:,} real layer-0 tokens, k = 10\n")
    print("| rep | seeding | seconds | Lloyd iterations on all tokens | inertia (float64) |")
    print("|---|---|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['rep']} | {r['seeding']} | {r['seconds']:.2f} | {r['iterations']} | {r['inertia']:.6e} |")
    for name in ("former", "current"):
        sel = [r for r in res["rows"] if r["seeding"] == name]
        print(f"- {name}: median {statistics.median(r['seconds'] for r in sel):.2f} s, inertia "
              f"{statistics.median(r['inertia'] for r in sel):.6e}")
    print()


# ----------------------------------------------------------------------------------------------- section D


def bench_ratio(images: int, batch_size: int, reps: int, quick: bool, strategies: list[str]) -> dict:
    from peft import get_peft_model
    from torch.utils.data import DataLoader, Dataset

    from peft_visual_prompt import VisualPromptConfig
    from peft_visual_prompt.spt import initialize_prompts

    base = vit(quick)
    size = base.config.image_size
    model = get_peft_model(base, VisualPromptConfig(num_prompt_tokens=10, deep=True))

    class Synthetic(Dataset):
        def __len__(self):
            return images

        def __getitem__(self, i):
            return {"pixel_values": image(i, size)}

    loader = DataLoader(Synthetic(), batch_size=batch_size)

    def forward(batches: int | None = None) -> float:
        start = time.perf_counter()
        model.eval()
        with torch.no_grad(), model.disable_adapter():
            for i, batch in enumerate(loader):
                if batches is not None and i == batches:
                    break
                model(pixel_values=batch["pixel_values"])
        return time.perf_counter() - start

    def spt(strategy: str) -> tuple[float, dict]:
        from peft_visual_prompt.spt import initialize as module

        # "kmeans-sequential": the layers' K-means one after the other after the pass (the former schedule);
        # "kmeans-overlap": started during the last batch's forward (OVERLAP_WITH_FORWARD)
        module.PARALLEL_PROTOTYPES = strategy != "kmeans-sequential"
        module.OVERLAP_WITH_FORWARD = strategy == "kmeans-overlap"
        start = time.perf_counter()
        stats = initialize_prompts(model, loader, strategy.split("-")[0])
        module.PARALLEL_PROTOTYPES, module.OVERLAP_WITH_FORWARD = True, False
        return time.perf_counter() - start, stats

    forward(batches=2)  # warm-up (allocator, kernels)
    rows, previous = [], forward()
    for rep in range(reps):
        for strategy in strategies:
            seconds, stats = spt(strategy)
            after = forward()
            floor = (previous + after) / 2
            rows.append({"rep": rep + 1, "strategy": strategy, "seconds": seconds, "forward_before": previous,
                         "forward_after": after, "ratio": seconds / floor, "collect": stats["seconds"]["collect"],
                         "prototypes": stats["seconds"]["prototypes"],
                         "iterations": [layer.get("iterations") for layer in stats["layers"]]})
            previous = after
    return {"images": images, "batch_size": batch_size, "threads": torch.get_num_threads(), "rows": rows}


def report_ratio(res: dict, quick: bool) -> None:
    model = "tiny ViT (--quick)" if quick else "ViT-B/16, 224 px, random weights"
    print(f"### D. Prototype pass / plain no-grad forward, {model}, {res['images']} images, batch "
          f"{res['batch_size']}, deep, 10 prompts, default cap, {res['threads']} threads\n")
    print("| rep | strategy | pass (s) | collect (s) | prototypes after the pass (s) | forward before / after (s) | "
          "pass / forward |")
    print("|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['rep']} | {r['strategy']} | {r['seconds']:.2f} | {r['collect']:.2f} | {r['prototypes']:.2f} | "
              f"{r['forward_before']:.2f} / {r['forward_after']:.2f} | {r['ratio']:.2f}x |")
    print()
    for strategy in dict.fromkeys(r["strategy"] for r in res["rows"]):
        ratios = [r["ratio"] for r in res["rows"] if r["strategy"] == strategy]
        print(f"- {strategy}: median {statistics.median(ratios):.2f}x a plain forward over the same images "
              f"({', '.join(f'{x:.2f}' for x in ratios)})")
    print()


# ----------------------------------------------------------------------------------------------- main


def cpu_name() -> str:
    """The CPU's model name (the distance kernels' speeds depend on it), or the machine type where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=["all", "kmeans", "pass", "memory", "ratio", "seeding", "kernel"],
                        default="all")
    parser.add_argument("--cap", type=int, default=65536, help="section E's token count (6,272 = 32 images)")
    parser.add_argument("--strategies", default="kmeans,mean,max,random",
                        help="section D's strategies; 'kmeans-sequential' runs the layers' K-means one after the "
                             "other after the pass, 'kmeans-overlap' starts them during the last batch's forward")
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", default="1,2", help="sklearn's thread counts in section A, comma-separated")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--_pass", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._pass:
        print(json.dumps(one_pass(**json.loads(args._pass))))
        return
    if args.quick:
        args.tokens, args.dim, args.images, args.reps, args.batch_size = 20_000, 64, 8, 1, 4

    print(f"Command: `python {' '.join(shlex.quote(a) for a in ['benchmarks/prototypes.py', *sys.argv[1:]])}`\n")
    print(f"Machine: {cpu_name()}, {os.cpu_count()} CPU(s), torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average at start {os.getloadavg()[0]:.1f}\n")
    if args.section in ("all", "kmeans"):
        threads = [int(t) for t in args.threads.split(",")]
        report_kmeans(bench_kmeans(args.tokens, args.dim, args.k, args.reps, threads))
    if args.section in ("all", "pass"):
        runs = [run_pass(args.images, deep, 65536, args.quick, args.batch_size) for deep in (True, False)]
        report_pass(runs, kmeans_at_cap(args.quick), args.quick)
    if args.section in ("all", "seeding"):
        report_seeding(bench_seeding(args.quick, args.reps, cap=args.cap))
    if args.section in ("all", "ratio"):
        report_ratio(bench_ratio(args.images, args.batch_size, args.reps, args.quick, args.strategies.split(",")),
                     args.quick)
    if args.section in ("all", "kernel"):
        report_kernel(bench_kernel(args.images, args.batch_size, args.reps, args.quick))
    if args.section in ("all", "memory"):
        cap = 4096 if not args.quick else 64
        runs = [run_pass(n, True, cap, args.quick, args.batch_size) for n in (args.images, 2 * args.images)]
        report_memory(runs)
    print(f"Load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
