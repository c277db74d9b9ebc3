"""`peft-visual-prompt evaluate`: accuracy and confusion matrix of a saved or Hub adapter on a dataset split.

By default it rebuilds the test split of the adapter's training run from `run_config.json` (same dataset, seed and
fractions), so it reproduces the accuracy `train` reported. It prints the matrix and writes
`eval_<split>.json` and `confusion_matrix_<split>.png`.
"""

from __future__ import annotations

from pathlib import Path

from .args import AdapterArguments, EvaluateArguments, parse
from .common import CLIError, write_json
from .inference import load_for_inference


def cmd_evaluate(argv: list[str]) -> int:
    adapter_args, args = parse((AdapterArguments, EvaluateArguments), argv, "peft-visual-prompt evaluate",
                               "Accuracy and confusion matrix of a saved or Hub adapter on a dataset.")
    model, processor, labels, image_size, run = load_for_inference(adapter_args)
    dataset_name = args.dataset_name if args.dataset_name is not None else run.get("dataset_name")
    image_column = args.image_column or run.get("image_column", "image")
    label_column = args.label_column or run.get("label_column", "label")
    ds, mapping = _split(args, run, dataset_name, image_column, label_column, labels)
    refs, preds = _predict_split(model, ds, processor, image_size, image_column, label_column, mapping,
                                 adapter_args.batch_size)
    from .metrics import load as load_metric

    accuracy = load_metric("accuracy").compute(predictions=preds, references=refs)["accuracy"]
    _report(adapter_args.adapter, args, dataset_name, labels, refs, preds, accuracy)
    return 0


def _split(args, run: dict, dataset_name, image_column: str, label_column: str, labels: list[str]):
    """(the split to evaluate, dataset label id -> model label id)."""
    from .data import check_columns, drop_corrupt_images, label_names, load_image_dataset, split_dataset, \
        stratified_subset

    raw = load_image_dataset(dataset_name, config_name=args.dataset_config_name or run.get("dataset_config_name"))
    check_columns(raw, image_column, label_column)
    mapping = label_mapping(label_names(raw, label_column), labels)
    if args.split in raw:
        ds = stratified_subset(raw[args.split], args.max_eval_samples, label_column, seed=0)
    elif args.split in ("train", "validation", "test"):
        s = run.get("splits", {})
        splits = split_dataset(raw, label_column=label_column, val_fraction=s.get("train_val_split", 0.1),
                               test_fraction=s.get("test_split", 0.15), seed=s.get("seed", 42),
                               max_train_samples=s.get("max_train_samples"),
                               max_eval_samples=args.max_eval_samples or s.get("max_eval_samples"))
        ds = splits[args.split]
    else:
        raise CLIError(f"Split {args.split!r} is not in the dataset (splits: {list(raw)}); pass --split.")
    return drop_corrupt_images(ds, image_column, args.on_corrupt_image, args.split), mapping


def _predict_split(model, ds, processor, image_size: int, image_column: str, label_column: str, mapping,
                   batch_size: int) -> tuple[list[int], list[int]]:
    import torch

    from .data import ImageClassificationTransform, collate

    transform = ImageClassificationTransform(processor, image_size, train=False, image_column=image_column,
                                             label_column=label_column)
    loader = torch.utils.data.DataLoader(ds.with_transform(transform), batch_size=batch_size, shuffle=False,
                                         collate_fn=collate)
    preds, refs = [], []
    with torch.inference_mode():
        for batch in loader:
            refs += [mapping[int(y)] for y in batch.pop("labels")]
            preds += model(**batch).logits.argmax(-1).tolist()
    return refs, preds


def _report(adapter: str, args, dataset_name, labels: list[str], refs, preds, accuracy: float) -> None:
    import numpy as np

    from .plots import plot_confusion_matrix

    matrix = np.zeros((len(labels), len(labels)), dtype=int)
    for t, y in zip(refs, preds):
        matrix[t, y] += 1
    out = Path(args.output_dir) if args.output_dir else (
        Path(adapter).expanduser() if Path(adapter).expanduser().is_dir()
        else Path("runs") / f"eval-{adapter.replace('/', '--')}")
    out.mkdir(parents=True, exist_ok=True)
    png = plot_confusion_matrix(matrix.tolist(), labels, out / f"confusion_matrix_{args.split}.png",
                                title=f"{adapter} on {dataset_name or 'textile'} [{args.split}]: "
                                      f"accuracy {accuracy:.3f}")
    write_json(out / f"eval_{args.split}.json", {"accuracy": accuracy, "num_images": len(refs), "labels": labels,
                                                 "confusion_matrix": matrix.tolist(), "adapter": adapter,
                                                 "dataset": dataset_name, "split": args.split})
    print(f"accuracy {accuracy:.4f} on {len(refs)} images ({args.split} split)\n")
    print(format_matrix(matrix, labels))
    print(f"\nconfusion matrix: {png}\nmetrics: {out / f'eval_{args.split}.json'}")


def label_mapping(dataset_labels: list[str], model_labels: list[str]) -> list[int]:
    """Dataset label id -> model label id, by name (by position for generic LABEL_i heads)."""
    if dataset_labels == model_labels:
        return list(range(len(model_labels)))
    if all(label == f"LABEL_{i}" for i, label in enumerate(model_labels)) and len(model_labels) == len(dataset_labels):
        return list(range(len(model_labels)))
    missing = sorted(set(dataset_labels) - set(model_labels))
    if missing:
        raise CLIError(f"The dataset's labels {missing} are not among the adapter's {model_labels}; evaluate on a "
                       "dataset with the adapter's classes.")
    return [model_labels.index(name) for name in dataset_labels]


def format_matrix(matrix, labels: list[str]) -> str:
    width = max(6, *(len(label) for label in labels), len(str(matrix.max())) + 1)
    head = " " * (width + 2) + " ".join(f"{label[:width]:>{width}}" for label in labels) + "   <- predicted"
    rows = [f"{label[:width]:>{width}}  " + " ".join(f"{v:>{width}}" for v in row) for label, row in zip(labels, matrix)]
    return "\n".join([head, *rows, f"{'^ true':>{width}}"])
