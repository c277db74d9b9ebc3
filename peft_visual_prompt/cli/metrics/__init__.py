"""`evaluate` metric modules shipped with the package, loadable offline."""

from __future__ import annotations

from pathlib import Path

import evaluate

METRICS_DIR = Path(__file__).parent


def load(name: str = "accuracy", **kwargs) -> evaluate.EvaluationModule:
    """`evaluate.load` on the module shipped in this package, so no Hub access is needed."""
    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        available = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise ValueError(f"No metric module {name!r} in peft_visual_prompt; available: {available}.")
    return evaluate.load(str(path), **kwargs)
