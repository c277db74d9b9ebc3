"""Import a script under benchmarks/ as a module, so its smoke test can call its functions as well as run it."""

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    path = BENCHMARKS / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"pvp_benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
