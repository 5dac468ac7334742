"""pytest configuration for bench/ (collected only by `pytest bench/`; `pytest tests/` never looks here).

The bench tests always run on CPU at tiny sizes; without a GPU the Triton backend runs under the
Triton interpreter, which must be chosen before lag_triton.kernels.triton is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))
