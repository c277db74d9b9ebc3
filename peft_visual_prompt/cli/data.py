"""Image-classification datasets for the CLI and the examples: loading, checking, splitting and preprocessing.

Everything that can be wrong with a dataset (a missing path, a missing column, string labels, a corrupt image) is
reported as a `DataError` whose message names the fix, before anything is trained or written.
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path
from typing import Optional

import datasets
import torch
from PIL import Image

# Name shown for the offline default dataset.
TEXTILE_DATASET_NAME = "textile (conformal-clip-data)"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class DataError(ValueError):
    """A problem with the user's dataset or arguments; the message says how to fix it."""


def default_dataset_dir() -> Path:
    """The textile images shipped by `conformal-clip-data` (2,000 images, 3 classes, imagefolder layout)."""
    try:
        import conformal_clip_data
    except ImportError as e:
        raise DataError(
            "The default dataset needs the `conformal-clip-data` package: pip install \"peft-visual-prompt[demo]\" "
            "(or pass --dataset_name)."
        ) from e
    return Path(conformal_clip_data.textile_simulated_root())


def load_image_dataset(name_or_path: Optional[str], *, config_name: Optional[str] = None,
                       cache_dir: Optional[str] = None) -> datasets.DatasetDict:
    """A `DatasetDict` from a Hub id, an imagefolder directory or a `save_to_disk` directory (None: the textiles)."""
    if name_or_path is None:
        return datasets.load_dataset("imagefolder", data_dir=str(default_dataset_dir()), cache_dir=cache_dir)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
        check_class_folders(path)
        try:
            loaded = datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=cache_dir)
        except (ValueError, FileNotFoundError) as e:  # e.g. no image files in it
            raise DataError(f"Cannot read {name_or_path} as an imagefolder ({str(e).splitlines()[0]}); it needs one "
                            "sub-folder of images per class.") from e
        _check_imagefolder_labels(loaded, path)
        return loaded
    if path.exists():
        raise DataError(f"--dataset_name {name_or_path} is a file; pass a directory (imagefolder layout: one "
                        "sub-folder of images per class, or a `save_to_disk` directory) or a Hub dataset id.")
    looks_local = name_or_path.startswith((".", "/", "~")) or not _HUB_ID.match(name_or_path)
    if looks_local:
        raise DataError(f"Dataset directory {name_or_path} does not exist; pass an existing imagefolder or "
                        "`save_to_disk` directory, or a Hub dataset id (org/name), to --dataset_name.")
    try:
        loaded = datasets.load_dataset(name_or_path, config_name, cache_dir=cache_dir)
    except Exception as e:  # offline, unknown repo, gated, ...: one clear line
        raise DataError(f"Dataset {name_or_path!r} is neither a local directory nor loadable from the Hub "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the name or "
                        "pass a local imagefolder/`save_to_disk` directory to --dataset_name.") from e
    return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)


def _image_extensions() -> set[str]:
    return {e.lower() for e, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def check_class_folders(root: Path) -> None:
    """An imagefolder drops a class whose folder holds no images, silently: named here instead."""
    exts = _image_extensions()
    for folder in sorted(p for p in root.rglob("*") if p.is_dir()):
        if any(part.startswith(".") for part in folder.relative_to(root).parts):
            continue
        if not any(f.is_file() and f.suffix.lower() in exts for f in folder.rglob("*")):
            raise DataError(f"Class folder {folder} holds no images, so its class would be left out; add images to "
                            "it or remove the folder.")


def _check_imagefolder_labels(dataset: datasets.DatasetDict, root: Path) -> None:
    """imagefolder adds no label column when all images sit in one folder: say that, not "no label column"."""
    if any("label" in ds.features for ds in dataset.values()):
        return
    exts = _image_extensions()
    folders = sorted({f.parent for f in root.rglob("*") if f.is_file() and f.suffix.lower() in exts})
    if len(folders) > 1:  # labels come from elsewhere (metadata), or not from folder names
        return
    where = "directly in it" if folders == [root] else f"in the one folder {folders[0].name!r}" if folders else ""
    raise DataError(f"{root} holds images of only one class ({where}); classification needs at least 2 classes: "
                    "one sub-folder of images per class.")


def check_columns(dataset: datasets.DatasetDict, image_column: str, label_column: Optional[str]) -> None:
    """Image column present and an `Image` feature; label column present and a `ClassLabel`."""
    for split, ds in dataset.items():
        columns = list(ds.features)
        if image_column not in ds.features:
            raise DataError(f"Image column {image_column!r} is not in split {split!r} (columns: {columns}); "
                            "pass --image_column with one of them.")
        if not isinstance(ds.features[image_column], datasets.Image):
            raise DataError(f"Column {image_column!r} holds {ds.features[image_column]!r}, not images; pass the image "
                            f"column with --image_column (columns: {columns}).")
        if label_column is None:
            continue
        if label_column not in ds.features:
            raise DataError(f"Label column {label_column!r} is not in split {split!r} (columns: {columns}); "
                            "pass --label_column with one of them.")
        feature = ds.features[label_column]
        if not isinstance(feature, datasets.ClassLabel):
            kind = "strings" if getattr(feature, "dtype", None) == "string" else repr(feature)
            raise DataError(f"Labels in column {label_column!r} are {kind}, not a ClassLabel: cast them with "
                            f"`dataset = dataset.class_encode_column({label_column!r})` and save_to_disk, or use an "
                            "imagefolder directory (one sub-folder per class).")


def label_names(dataset: datasets.DatasetDict, label_column: str) -> list[str]:
    first = next(iter(dataset.values()))
    return list(first.features[label_column].names)


def split_dataset(dataset: datasets.DatasetDict, *, label_column: str, val_fraction: float, test_fraction: float,
                  seed: int, max_train_samples: Optional[int] = None,
                  max_eval_samples: Optional[int] = None) -> datasets.DatasetDict:
    """`train`/`validation`/`test`, stratified by label. Existing validation/test splits are kept; the missing ones
    are carved out of `train` (which is deterministic for a given seed, so `evaluate` can rebuild the test split).
    `max_*_samples` then take stratified subsets (eval: validation and test)."""
    train_name = "train" if "train" in dataset else next(iter(dataset))
    train = dataset[train_name]
    val = next((dataset[s] for s in ("validation", "valid", "val") if s in dataset), None)
    test = dataset["test"] if "test" in dataset and train_name != "test" else None
    if test is None:
        if not 0 < test_fraction < 1:
            raise DataError(f"The dataset has no test split, so --test_split must be in (0, 1); got {test_fraction}.")
        train, test = _stratified_split(train, test_fraction, label_column, seed)
    if val is None:
        if not 0 < val_fraction < 1:
            raise DataError(f"The dataset has no validation split, so --train_val_split must be in (0, 1); "
                            f"got {val_fraction}.")
        # The fraction is of the whole dataset, not of what is left after the test split.
        frac = val_fraction / (1.0 - test_fraction) if "test" not in dataset else val_fraction
        train, val = _stratified_split(train, min(frac, 0.9), label_column, seed)
    train = stratified_subset(train, max_train_samples, label_column, seed)
    val = stratified_subset(val, max_eval_samples, label_column, seed)
    test = stratified_subset(test, max_eval_samples, label_column, seed)
    return datasets.DatasetDict(train=train, validation=val, test=test)


def _stratified_split(ds: datasets.Dataset, fraction: float, label_column: str, seed: int):
    try:
        parts = ds.train_test_split(test_size=fraction, stratify_by_column=label_column, seed=seed)
    except ValueError:  # too few examples of some class to stratify
        parts = ds.train_test_split(test_size=fraction, seed=seed)
    return parts["train"], parts["test"]


def stratified_subset(ds: datasets.Dataset, n: Optional[int], label_column: str, seed: int) -> datasets.Dataset:
    """A subset of `n` examples with the label proportions of `ds` (all of `ds` when n is None or too large)."""
    if n is None or n <= 0 or n >= len(ds):
        return ds
    try:
        return ds.train_test_split(train_size=n, stratify_by_column=label_column, seed=seed)["train"]
    except ValueError:
        return ds.shuffle(seed=seed).select(range(n))


def drop_corrupt_images(ds: datasets.Dataset, image_column: str, on_corrupt: str, split: str = "") -> datasets.Dataset:
    """Decodes every image once. `on_corrupt="skip"` drops unreadable ones with a warning; `"error"` raises a
    DataError naming the file and the fix."""
    raw = ds.cast_column(image_column, datasets.Image(decode=False))
    bad = []
    for i, item in enumerate(raw[image_column]):
        try:
            with _open(item) as img:
                img.load()
        except Exception as e:  # PIL raises several types for broken files
            bad.append((i, item.get("path") or f"row {i}", e))
    if not bad:
        return ds
    where = f" in split {split!r}" if split else ""
    if on_corrupt == "error":
        i, name, e = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"Corrupt image {name}{where}{more}: {type(e).__name__}; delete or replace it, or pass "
                        "--on_corrupt_image skip to leave such images out.")
    names = ", ".join(str(name) for _, name, _ in bad[:5]) + (" ..." if len(bad) > 5 else "")
    warnings.warn(f"Skipping {len(bad)} corrupt image(s){where}: {names}", stacklevel=2)
    keep = sorted(set(range(len(ds))) - {i for i, _, _ in bad})
    return ds.select(keep)


def _open(item: dict) -> Image.Image:
    if item.get("bytes"):
        return Image.open(io.BytesIO(item["bytes"]))
    return Image.open(item["path"])


# ---------------------------------------------------------------------------------------------------------------------
# Preprocessing


def processor_image_size(processor) -> int:
    """The square side the processor produces: its crop size when it crops, else its resize target."""
    for attr in (("crop_size",) if getattr(processor, "do_center_crop", False) else ()) + ("size",):
        size = getattr(processor, attr, None)
        if size is None:
            continue
        get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
        for key in ("height", "shortest_edge", "width", "longest_edge"):
            if get(key):
                return int(get(key))
    return 224


def _resample(processor) -> int:
    resample = getattr(processor, "resample", None)
    try:
        return int(resample)
    except (TypeError, ValueError):
        return int(Image.Resampling.BICUBIC)


def resize_center_crop(img: Image.Image, size: int, resample: int) -> Image.Image:
    """Shortest edge to `size`, then the central `size` x `size` square (all of a square image)."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def random_resized_crop(img: Image.Image, size: int, resample: int, scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3),
                        generator: Optional[torch.Generator] = None) -> Image.Image:
    """torchvision's RandomResizedCrop, written with PIL and torch's RNG (so Trainer's seed governs it)."""
    w, h = img.size
    area = w * h
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(*scale, generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(*log_ratio.tolist(), generator=generator)).item()
        cw, ch = round((target * aspect) ** 0.5), round((target / aspect) ** 0.5)
        if 0 < cw <= w and 0 < ch <= h:
            left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
            top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
            return img.resize((size, size), resample, box=(left, top, left + cw, top + ch))
    return resize_center_crop(img, size, resample)


class ImageClassificationTransform:
    """`Dataset.with_transform` callable: images -> `pixel_values` (via the model's image processor, which rescales
    and normalises), labels -> `labels`. Geometry is done here so every processor gives `image_size` squares:
    training uses a random resized crop (scale 0.8-1) and a horizontal flip, evaluation a resize + center crop."""

    def __init__(self, processor, image_size: int, *, train: bool, image_column: str = "image",
                 label_column: Optional[str] = "label", crop_scale=(0.8, 1.0)):
        self.processor = processor
        self.image_size = int(image_size)
        self.train = train
        self.image_column = image_column
        self.label_column = label_column
        self.crop_scale = crop_scale
        self.resample = _resample(processor)

    def images(self, images: list, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """`generator`: where the random crop and flip come from (default: torch's global RNG)."""
        out = []
        for img in images:
            img = img.convert("RGB")
            if self.train:
                img = random_resized_crop(img, self.image_size, self.resample, scale=self.crop_scale,
                                          generator=generator)
                if torch.rand(1, generator=generator).item() < 0.5:
                    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            else:
                img = resize_center_crop(img, self.image_size, self.resample)
            out.append(img)
        return self.processor(out, do_resize=False, do_center_crop=False, return_tensors="pt")["pixel_values"]

    def __call__(self, batch: dict) -> dict:
        result = {"pixel_values": list(self.images(batch[self.image_column]))}
        if self.label_column is not None and self.label_column in batch:
            result["labels"] = batch[self.label_column]
        return result

    def example(self, row: dict, generator: Optional[torch.Generator] = None) -> dict:
        """One dataset row (not a batch) -> {"pixel_values", "labels"}."""
        result = {"pixel_values": self.images([row[self.image_column]], generator=generator)[0]}
        if self.label_column is not None and self.label_column in row:
            result["labels"] = row[self.label_column]
        return result


def collate(examples: list[dict]) -> dict:
    batch = {"pixel_values": torch.stack([e["pixel_values"] for e in examples])}
    if "labels" in examples[0]:
        batch["labels"] = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
    return batch


def find_images(paths: list[str]) -> list[Path]:
    """Image files named directly or found (recursively, sorted) in the given folders."""
    exts = _image_extensions()
    found = []
    for p in paths:
        path = Path(p).expanduser()
        if path.is_dir():
            found += sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in exts)
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"Image path {p} does not exist; pass image files or folders of images.")
    if not found:
        raise DataError(f"No image files found in {', '.join(paths)}; pass image files or folders of images.")
    return found
