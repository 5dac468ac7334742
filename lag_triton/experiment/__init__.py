"""The LAG knowledge-library experiment in miniature: synthetic documents, a tiny Llama, one
knowledge LoRA per document, and Arrow / SpectR / LAG routing compared with the oracle.
See ``run.py`` (``python -m lag_triton.experiment.run``), ``ablation.py`` and ``lag_triton.demo``."""

import importlib

__all__ = ["ExperimentConfig", "run_experiment", "run_seeds", "format_table", "write_outputs"]

_HOME = {
    "ExperimentConfig": "run",
    "run_experiment": "run",
    "run_seeds": "run",
    "format_table": "report",
    "write_outputs": "report",
}


def __getattr__(name: str):
    # imported on first use, so that ``python -m lag_triton.experiment.run`` runs run.py once, as __main__
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
