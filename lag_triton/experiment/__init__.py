"""The LAG knowledge-library experiment in miniature: synthetic documents, a tiny Llama, one
knowledge LoRA per document, and Arrow / SpectR / LAG routing compared with the oracle.
See ``run.py`` (``python -m lag_triton.experiment.run``) and ``lag_triton.demo``."""

from .run import ExperimentConfig, format_table, run_experiment, write_outputs

__all__ = ["ExperimentConfig", "run_experiment", "format_table", "write_outputs"]
