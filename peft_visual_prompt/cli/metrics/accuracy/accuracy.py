"""Top-1 accuracy as an `evaluate` metric module, shipped in the package because the Hub is not always reachable.

Load it with `peft_visual_prompt.metrics.load("accuracy")` (or `evaluate.load(<path to this folder>)`).
"""

import datasets
import evaluate

_DESCRIPTION = "Fraction of predictions equal to the references: (TP + TN) / N for classification."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground-truth labels.
    normalize (`bool`, default True): return the fraction of correct predictions, else their count.
    sample_weight (`list` of `float`, optional): per-sample weights.
Returns:
    accuracy (`float`).
"""
_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        correct = [float(p == r) for p, r in zip(predictions, references)]
        weights = [1.0] * len(correct) if sample_weight is None else [float(w) for w in sample_weight]
        total = sum(c * w for c, w in zip(correct, weights))
        return {"accuracy": float(total / sum(weights) if normalize else total)}
